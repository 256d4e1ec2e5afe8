"""The summary of `make gpu-check` (.ci/gpu_summary.py) on made-up results: the tests counted per
file from junit XML or, when the run was cut short, from the -v log, crashed workers and files that
never ran; bench/NOTES.md's predictions matched to the benchmark's rows. And .ci/failures_plugin.py
in a real pytest run (with xdist, where it is installed: a crashed worker). (The CPU rehearsal in
CI runs the rest of .ci/gpu_check.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, ".ci"))

import gpu_summary  # noqa: E402

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_cuda" name="test_a[float32]" time="0.1"/>
<testcase classname="tests.test_cuda" name="test_b" time="0.1"><failure message="boom"/></testcase>
<testcase classname="tests.test_triton.TestOps" name="test_c" time="0.1"><skipped message="no"/></testcase>
<testcase classname="" name="tests.test_broken" time="0"><error message="collection"/></testcase>
<testcase classname="tests.test_cuda" name="test_d" time="0"><error message="failed on setup with &quot;worker 'gw2'
 crashed while running 'tests/test_cuda.py::test_d'&quot;"/></testcase>
</testsuite></testsuites>"""

LOG = """tests/test_cuda.py::test_a[float32] PASSED [ 10%]
[gw1] [ 20%] FAILED tests/test_cuda.py::test_b
[gw0] [ 30%] SKIPPED tests/test_triton.py::test_c
[gw3] node down: Not properly terminated
[gw3] [ 40%] FAILED tests/test_cuda.py::test_d
"""
FAILURES = """==== tests/test_cuda.py::test_b (call)
E   assert 1 == 2

==== worker gw3 down
Not properly terminated

==== tests/test_cuda.py::test_d (worker crashed)
worker 'gw3' crashed while running 'tests/test_cuda.py::test_d'
"""
TOY_TESTS = """import os, signal
def test_passes(): pass
def test_fails(): assert 1 == 2, "boom"
def test_crashes():
    if os.environ.get("TOY_CRASH"):
        os.kill(os.getpid(), signal.SIGSEGV)
"""


def record(impl, fraction, speedup, **where):
    return {"impl": impl, "fraction_of_copy": fraction, "speedup_vs_eager": speedup, **where}


def bench_json():
    shape = dict(shape=[4096, 16, 32], dtype="float32")
    return {"sections": {
        "running_norm": {"rows": [record("copy (memory floor)", 1.0, 20.0, **shape),
                                  record("fastnorm cuda", 0.61, 9.5, **shape),
                                  record("fastnorm triton", 0.52, 8.1, **shape)]},
        "advantages": {"rows": [record("fastnorm cuda", 0.41, 4.2, numel=2**20, layout="global")]},
    }}


def test_tests_counted_per_file_from_junit(tmp_path):
    (tmp_path / "tests.xml").write_text(JUNIT)
    counts, source = gpu_summary.tests_per_file(str(tmp_path))
    assert source == "tests.xml"
    assert counts["test_cuda.py"] == {"passed": 1, "failed": 1, "crashed": 1}
    assert counts["test_triton.py"] == {"skipped": 1}
    assert counts["test_broken.py"] == {"error": 1}


def test_tests_counted_from_the_log_when_the_run_was_cut_short(tmp_path):
    (tmp_path / "tests.log").write_text(LOG)
    (tmp_path / "failures.txt").write_text(FAILURES)
    counts, source = gpu_summary.tests_per_file(str(tmp_path))
    assert source.startswith("tests.log")
    assert counts["test_cuda.py"] == {"passed": 1, "failed": 1, "crashed": 1}
    assert counts["test_triton.py"] == {"skipped": 1}


def test_files_that_never_ran_crashed_workers_and_failures_are_reported(tmp_path):
    (tmp_path / "tests.log").write_text(LOG)
    (tmp_path / "failures.txt").write_text(FAILURES)
    files = ["tests/test_cuda.py", "tests/test_triton.py", "tests/test_vmas_rollout.py"]
    lines = gpu_summary.test_lines(str(tmp_path), files, {"tests/test_rsl_rl.py": "rsl_rl not installed"})
    text = "\n".join(lines)
    assert next(l for l in lines if "test_vmas_rollout.py" in l).endswith("NEVER RAN (no result: the stage ended "
                                                                          "first, or not collected)")
    assert "test_rsl_rl.py" in text and "left out: rsl_rl not installed" in text
    assert "passed 1 failed 1 error 0 skipped 1 crashed 1; files never ran 1, left out 1" in text
    assert "crashed workers: 1 (gw3; while running: tests/test_cuda.py::test_d)" in text
    assert "  tests/test_cuda.py::test_b (call)" in lines and "  tests/test_cuda.py::test_d (worker crashed)" in lines


def _run_toy_tests(tmp_path, *args, crash=False):
    (tmp_path / "test_toy.py").write_text(TOY_TESTS)
    (tmp_path / "test_broken.py").write_text("import a_module_that_does_not_exist\n")
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, ".ci"), **({"TOY_CRASH": "1"} if crash else {})}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "failures_plugin",
                    "--continue-on-collection-errors", f"--failures-file={tmp_path / 'failures.txt'}", *args, "test_toy.py", "test_broken.py"],
                   cwd=tmp_path, env=env, capture_output=True, timeout=300)
    return gpu_summary.failures(str(tmp_path)), (tmp_path / "failures.txt").read_text()


def test_the_plugin_writes_each_failure_with_its_traceback(tmp_path):
    found, text = _run_toy_tests(tmp_path)
    assert found == {"failed": ["test_broken.py (collection)", "test_toy.py::test_fails (call)"],
                     "crashed": [], "workers down": []}
    assert "AssertionError: boom" in text and "a_module_that_does_not_exist" in text


def test_the_plugin_records_a_crashed_xdist_worker(tmp_path):
    pytest.importorskip("xdist")
    found, text = _run_toy_tests(tmp_path, "-n", "2", crash=True)
    assert sorted(found["failed"]) == ["test_broken.py (collection)", "test_toy.py::test_fails (call)"]
    assert found["crashed"] == ["test_toy.py::test_crashes"] and len(found["workers down"]) == 1
    assert text.count("AssertionError: boom") == 1  # written once, by the controller


def test_every_unverified_row_of_the_notes_is_read():
    notes = os.path.join(ROOT, "bench", "NOTES.md")
    rows = gpu_summary.notes_predictions(notes)
    with open(notes) as f:
        unverified_rows = sum(1 for line in f if line.startswith("|") and "GPU-UNVERIFIED" in line)
    assert len(rows) == unverified_rows > 0
    assert all(row.get("shape") or row.get("case") for row in rows)


def test_predictions_beside_the_measured_values(tmp_path):
    notes = tmp_path / "NOTES.md"
    notes.write_text("## Running norm\n\n| shape | dtype | predicted fraction of copy | outcome |\n|---|---|---|---|\n"
                     "| (4096, 16, 32) | fp32 | 0.55-0.7: reasons | GPU-UNVERIFIED |\n"
                     "| (4096, 16, 32) | bf16 | 0.5-0.65 | GPU-UNVERIFIED |\n"
                     "| (64, 4, 8) | fp32 | 0.3 | 0.31 (measured) |\n\n"
                     "| case | predicted | outcome |\n|---|---|---|\n"
                     "| advantages global 1M / 16M fp32 | 0.35-0.5 of copy | GPU-UNVERIFIED |\n"
                     "| graph capture | works | GPU-UNVERIFIED |\n")
    (tmp_path / "bench.json").write_text(json.dumps(bench_json()))
    lines = gpu_summary.prediction_lines(str(notes), str(tmp_path))
    assert len(lines) == 4
    assert "float32: cuda 0.61 of copy, 9.5x eager; triton 0.52 of copy, 8.1x eager" in lines[0]
    assert "predicted 0.55-0.7: reasons" in lines[0]
    assert "not measured by --quick" in lines[1]
    assert "1M: cuda 0.41 of copy, 4.2x eager | 16M: not measured by --quick" in lines[2]
    assert "no bench/run.py row matches" in lines[3]


def test_summary_without_any_result(tmp_path):
    text = gpu_summary.summary([{"name": "build", "status": "failed (exit status 1)", "seconds": 3.0}],
                               str(tmp_path), os.path.join(ROOT, "bench", "NOTES.md"), 3.0)
    assert "build: failed (exit status 1)" in text
    assert "no bench.md" in text and "no bench.json" in text
