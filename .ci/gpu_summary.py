"""The one-screen summary of .ci/gpu_check.py: each stage's status, the tests per file (and the
files that never ran), crashed workers, the failures, the benchmark's summary tables, and each
GPU-UNVERIFIED prediction of bench/NOTES.md beside what the benchmark measured (or why nothing was
matched)."""

from __future__ import annotations

import collections
import json
import os
import re
import xml.etree.ElementTree as ET

OUTCOMES = ("passed", "failed", "error", "skipped", "crashed")
# failures.txt's entries (.ci/failures_plugin.py): "==== <nodeid> (<when>)" or "==== worker gwN down".
ENTRY = re.compile(r"^==== (\S+) \((setup|call|teardown|collection|worker crashed)\)$", re.M)
WORKER_DOWN = re.compile(r"^==== worker (\S+) down$", re.M)
CRASH_MESSAGE = "crashed while running"
# A test's line in pytest -v output, with or without xdist: "tests/x.py::t PASSED", "[gw1] ... PASSED tests/x.py::t".
VERBOSE_LINE = re.compile(r"(?:(tests/\S+?\.py)::\S*\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
                          r"|(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(tests/\S+?\.py)::)")


def tests_per_file(out: str) -> tuple[dict, str]:
    """{file: Counter of OUTCOMES} from the junit XML, else from the -v log (a stage killed at its
    budget writes no XML); and which of the two it came from."""
    counts = collections.defaultdict(collections.Counter)
    xml_path = os.path.join(out, "tests.xml")
    if os.path.exists(xml_path):
        for case in ET.parse(xml_path).iter("testcase"):
            name = _test_file(case.get("classname") or case.get("name", ""))
            kinds = {child.tag: child.get("message") or "" for child in case}
            outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
            if CRASH_MESSAGE in kinds.get(outcome, ""):  # xdist reports a crashed worker's test so
                outcome = "crashed"
            counts[name][{"failure": "failed"}.get(outcome, outcome)] += 1
        return counts, "tests.xml"
    log_path = os.path.join(out, "tests.log")
    if os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            for match in VERBOSE_LINE.finditer(f.read()):
                path = match.group(1) or match.group(4)
                word = (match.group(2) or match.group(3)).lower()
                counts[os.path.basename(path)][{"xfail": "skipped", "xpass": "passed"}.get(word, word)] += 1
    for nodeid in failures(out)["crashed"]:  # the log reads FAILED for them
        name = os.path.basename(nodeid.split("::")[0])
        if counts[name]["failed"]:
            counts[name]["failed"] -= 1
            counts[name]["crashed"] += 1
    return counts, "tests.log (no junit XML: the run was cut short)"


def failures(out: str) -> dict:
    """failures.txt's entries: {"failed": ["nodeid (when)", ...], "crashed": [nodeid, ...], "workers down": [gwN, ...]}."""
    path = os.path.join(out, "failures.txt")
    text = open(path, errors="replace").read() if os.path.exists(path) else ""
    entries = ENTRY.findall(text)
    return {"failed": [f"{nodeid} ({when})" for nodeid, when in entries if when != "worker crashed"],
            "crashed": [nodeid for nodeid, when in entries if when == "worker crashed"],
            "workers down": WORKER_DOWN.findall(text)}


def _test_file(dotted: str) -> str:
    """The file of a junit classname ("tests.test_x" or "tests.test_x.TestCase")."""
    parts = dotted.split(".")
    return next((p for p in parts if p.startswith("test_")), parts[-1]) + ".py"


def summary_tables(out: str) -> list[str]:
    """The "Summary" tables of the benchmark's markdown, with their headings."""
    path = os.path.join(out, "bench.md")
    if not os.path.exists(path):
        return ["(no bench.md: the benchmark did not finish)"]
    lines, keep = [], False
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                keep = "Summary" in line
            if keep and line.strip():
                lines.append(line.rstrip())
    return lines or ["(bench.md holds no summary table)"]


def notes_predictions(notes_path: str) -> list[dict]:
    """Every row of a markdown table in NOTES whose outcome reads GPU-UNVERIFIED, as {column: text},
    with the heading above its table ("section")."""
    rows, header, section = [], None, ""
    with open(notes_path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("#"):
                section, header = line.lstrip("# "), None
            elif not line.startswith("|"):
                header = None
            else:
                cells = [c.strip() for c in line.strip("|").split("|")]
                if header is None:
                    header = [c.lower() for c in cells]
                elif not set(line) <= set("|- :") and any("GPU-UNVERIFIED" in c for c in cells):
                    rows.append({"section": section, **dict(zip(header, cells))})
    return rows


def _fastnorm_rows(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if r["impl"].startswith("fastnorm ") and all(r.get(k) == v for k, v in match.items())]


def _describe(rows: list[dict]) -> str:
    return "; ".join(f"{r['impl'][len('fastnorm '):]} {r['fraction_of_copy']:.2f} of copy, "
                     f"{r['speedup_vs_eager']:.1f}x eager" for r in rows)


DTYPES = {"fp32": ["float32"], "bf16": ["bfloat16"], "both": ["float32", "bfloat16"],
          "fp32/bf16": ["float32", "bfloat16"]}


def measured(prediction: dict, bench: dict) -> str:
    """What the benchmark measured for a prediction row, or why nothing matches."""
    sections = bench.get("sections", {})
    shape = re.fullmatch(r"\((\d+), (\d+), (\d+)\)", prediction.get("shape", ""))
    if shape and prediction.get("dtype") in DTYPES:
        rows = sections.get("running_norm", {}).get("rows", [])
        found = [f"{dtype}: {_describe(_fastnorm_rows(rows, shape=[int(s) for s in shape.groups()], dtype=dtype))}"
                 for dtype in DTYPES[prediction["dtype"]]]
        found = [f for f in found if not f.endswith(": ")]
        return " | ".join(found) or "not measured by --quick (the full bench/run.py has it)"
    case = re.fullmatch(r"advantages (global|per agent|masked rows) ([\d/M ]+) fp32", prediction.get("case", ""))
    if case:
        rows = sections.get("advantages", {}).get("rows", [])
        found = []
        for size in re.findall(r"\d+M", case.group(2)):
            got = _fastnorm_rows(rows, layout=case.group(1), numel=int(size[:-1]) * 2**20)
            found.append(f"{size}: {_describe(got)}" if got else f"{size}: not measured by --quick")
        return " | ".join(found)
    return "no bench/run.py row matches: the command in its NOTES section measures it"


def _short(prediction: str, width: int = 60) -> str:
    return prediction if len(prediction) <= width else prediction[:width - 3] + "..."


def prediction_lines(notes_path: str, out: str) -> list[str]:
    bench_path = os.path.join(out, "bench.json")
    bench = json.load(open(bench_path)) if os.path.exists(bench_path) else {}
    lines = []
    for row in notes_predictions(notes_path):
        what = row.get("case") or f"running_norm {row.get('shape')} {row.get('dtype')}"
        predicted = next((v for k, v in row.items() if k.startswith("predicted")), "?")
        got = measured(row, bench) if bench else "no bench.json: the benchmark did not finish"
        lines.append(f"- {what}: predicted {_short(predicted)} | measured: {got}")
    return lines


def test_lines(out: str, files: list[str], left_out: dict[str, str], listed: int = 40) -> list[str]:
    """Each test file's outcomes (or that it never ran, or why it was left out), the crashed
    workers, and the first `listed` failures of failures.txt."""
    counts, source = tests_per_file(out)
    names = sorted(set(counts) | {os.path.basename(f) for f in files})
    if not names and not left_out:
        return []
    lines = [f"tests per file (from {source}):"]
    for name in names:
        c = counts.get(name)
        result = " ".join(f"{k} {c[k]}" for k in OUTCOMES if c[k]) if c else ""
        lines.append(f"  {name:<40} " + (result or "NEVER RAN (no result: the stage ended first, or not collected)"))
    for name, why in sorted(left_out.items()):
        lines.append(f"  {os.path.basename(name):<40} left out: {why}")
    total = sum(counts.values(), collections.Counter())
    never = sum(1 for name in names if not counts.get(name))
    lines.append(f"  {'total':<40} " + " ".join(f"{k} {total[k]}" for k in OUTCOMES)
                 + f"; files never ran {never}, left out {len(left_out)}")
    found = failures(out)
    lines.append(f"crashed workers: {len(found['workers down'])}"
                 + (f" ({', '.join(found['workers down'])}; while running: {', '.join(found['crashed']) or '-'})"
                    if found["workers down"] else ""))
    failed = found["failed"] + [f"{nodeid} (worker crashed)" for nodeid in found["crashed"]]
    if failed:
        lines.append(f"failures (tracebacks in failures.txt), {len(failed)}:")
        lines += [f"  {entry}" for entry in failed[:listed]]
        if len(failed) > listed:
            lines.append(f"  ... and {len(failed) - listed} more")
    return lines


def summary(results: list[dict], out: str, notes_path: str, seconds: float, files: list[str] = (),
            left_out: dict[str, str] | None = None) -> str:
    """The summary's text; `files` are the test files the tests stage ran, `left_out` those it did not (and why)."""
    lines = [f"==== gpu check summary ({seconds:.0f} s; logs and results in {out})"]
    lines += [f"{r['name']:>8}: {r['status']} ({r['seconds']:.0f} s)" for r in results]
    lines += test_lines(out, list(files), left_out or {})
    lines.append("benchmark summary:")
    lines += summary_tables(out)
    lines.append("GPU-UNVERIFIED predictions of bench/NOTES.md and what this run measured:")
    lines += prediction_lines(notes_path, out)
    return "\n".join(lines)
