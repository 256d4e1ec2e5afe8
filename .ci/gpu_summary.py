"""The one-screen summary of .ci/gpu_check.py: each stage's status, the tests per file, the
benchmark's summary tables, and each GPU-UNVERIFIED prediction of bench/NOTES.md beside what the
benchmark measured (or why nothing was matched)."""

from __future__ import annotations

import collections
import json
import os
import re
import xml.etree.ElementTree as ET

OUTCOMES = ("passed", "failed", "error", "skipped")
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
            kinds = {child.tag for child in case}
            outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
            counts[name][{"failure": "failed"}.get(outcome, outcome)] += 1
        return counts, "tests.xml"
    log_path = os.path.join(out, "tests.log")
    if os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            for match in VERBOSE_LINE.finditer(f.read()):
                path = match.group(1) or match.group(4)
                word = (match.group(2) or match.group(3)).lower()
                counts[os.path.basename(path)][{"xfail": "skipped", "xpass": "passed"}.get(word, word)] += 1
    return counts, "tests.log (no junit XML: the run was cut short)"


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


def summary(results: list[dict], out: str, notes_path: str, seconds: float) -> str:
    """The summary's text."""
    lines = [f"==== gpu check summary ({seconds:.0f} s; logs and results in {out})"]
    lines += [f"{r['name']:>8}: {r['status']} ({r['seconds']:.0f} s)" for r in results]
    counts, source = tests_per_file(out)
    if counts:
        lines.append(f"tests per file (from {source}):")
        for name, c in sorted(counts.items()):
            lines.append(f"  {name:<40} " + " ".join(f"{k} {c[k]}" for k in OUTCOMES if c[k]))
        total = sum(counts.values(), collections.Counter())
        lines.append(f"  {'total':<40} " + " ".join(f"{k} {total[k]}" for k in OUTCOMES))
    lines.append("benchmark summary:")
    lines += summary_tables(out)
    lines.append("GPU-UNVERIFIED predictions of bench/NOTES.md and what this run measured:")
    lines += prediction_lines(notes_path, out)
    return "\n".join(lines)
