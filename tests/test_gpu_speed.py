"""bench/gpu_speed.py, issue 23's GPU speed command, runs end to end on the CPU (--quick, in a
subprocess): its JSON holds a row per shape of the issue's table with a cell per column, and a
verdict per goal and backend, which its output prints a line for. A cell that raises is reported,
never stops the run; the goals name the shape that misses. No timing is checked: a shared CPU's
times say nothing of a GPU's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import fastnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_speed  # noqa: E402
import gpu_speed_report as layout  # noqa: E402
from timing import Rotation  # noqa: E402

VERDICTS = {"MET", "MISSED", "NOT MEASURED"}


# The quick run measures the C++ cpu backend in every cell (make test-oldest runs without it).
needs_cpu_backend = pytest.mark.skipif(bool(fastnorm.backends()["cpu"]), reason=f"the cpu backend is unavailable: "
                                       f"{fastnorm.backends()['cpu']}")


def _cell_kinds(cell: dict) -> set[str]:
    return {"us", "failed", "skipped"} & set(cell)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_speed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # interpreted Triton takes minutes
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_speed.py"), "--device", "cpu", "--quick",
                           "--json", str(out / "speed.json"), "--md", str(out / "speed.md")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "speed.json") as f:
        results = json.load(f)
    return results, done.stdout, (out / "speed.md").read_text()


@needs_cpu_backend
def test_quick_run_has_every_row_and_cell(quick_run):
    results, _, _ = quick_run
    sections = results["sections"]
    assert [(tuple(r["shape"]), r["dtype"]) for r in sections["loop"]] == layout.LOOP_ROWS
    assert [tuple(r["shape"]) for r in sections["small"]] == layout.SMALL_ROWS
    assert [r["numel"] for r in sections["advantages"]] == layout.ADVANTAGE_SIZES
    backends = results["environment"]["backends_timed"]
    assert backends == ["cpu", "triton"]
    loop_cols = [layout.COPY] + [layout.column(b, m) for b in backends for m in layout.MODES] + [
        layout.BATCH_NORM, layout.COMPILE]
    for i, row in enumerate(sections["loop"]):
        extra = [layout.allocating("cpu")] if i == 0 else []
        assert sorted(row["cells"]) == sorted(loop_cols + extra), row["label"]
        assert row["buffers"] >= 2
    for row in sections["small"]:
        names = {layout.GRAPH + c for c in [layout.COPY, layout.BATCH_NORM, "cpu", "cpu previous", "triton",
                                            "triton previous"]}
        names |= {layout.EAGER + c for c in [layout.COPY, layout.BATCH_NORM, "cpu", "cpu out=", "cpu previous",
                                             "triton", "triton out=", "triton previous"]}
        assert set(row["cells"]) == names, row["label"]
        assert all(row["cells"][n] == {"skipped": "no CUDA graphs on cpu"} for n in names if n.startswith("graph"))
    for row in sections["advantages"]:
        assert set(row["cells"]) == {layout.COPY, "cpu", "triton", layout.EAGER_FORMULA}
    for section in sections.values():
        for row in section:
            assert "error" not in row, row
            for name, cell in row["cells"].items():
                assert len(_cell_kinds(cell)) == 1, (row["label"], name, cell)
                assert "failed" not in cell, (row["label"], name, cell)  # everything runs on the CPU
                if "triton" not in name and name != layout.COMPILE and not name.startswith(layout.GRAPH):
                    assert cell["us"] > 0 and cell["samples"] >= 1 and cell["calls"] >= 1, (row["label"], name)
            measured, shape = row["measured_shape"], row["shape"]  # --quick cuts the batch, keeps the rest
            assert measured[1:] == shape[1:] and measured[0] <= shape[0] and math.prod(measured) <= 2**14


@needs_cpu_backend
def test_quick_run_checks_every_goal(quick_run):
    results, stdout, markdown = quick_run
    goals = results["goals"]
    # Ten goals per backend, and Triton's throughput against the native backend's.
    assert [g["backend"] for g in goals] == ["cpu"] * 10 + ["triton"] * 11
    for goal in goals:
        assert goal["verdict"] in VERDICTS
        assert layout.goal_line(goal) in stdout
        assert f"- {layout.goal_line(goal)}" in markdown
    assert all(g["verdict"] == "NOT MEASURED" for g in goals if g["backend"] == "triton")
    for title in ("Loops of calls", "CUDA-graph replay", "The same, eager", "normalize_advantages"):
        assert title in stdout and title in markdown


def _cells(**us):
    return {name.replace("_", " "): {"us": value, "calls": 1, "samples": 1} for name, value in us.items()}


def test_goals_name_the_shape_that_misses():
    loop = [{"label": str(shape), "shape": list(shape), "dtype": "float32",
             "cells": {"copy": {"us": 10.0}, "cuda": {"us": us}, "cuda previous": {"us": 11.0},
                       "F.batch_norm": {"us": 40.0}, "torch.compile": {"skipped": "--compile off"}}}
            for shape, us in (((65536, 8, 64), 15.0), ((1_000_000, 1, 8), 25.0), ((4_000_000, 1, 8), 16.0))]
    goals = {g["goal"]: g for g in layout.goals({"loop": loop}, ["cuda"])}
    default = goals["beyond the L2, default mode >= 0.6 of the copy"]
    assert default["verdict"] == "MISSED" and default["where"] == "(1000000, 1, 8) cuda"
    assert default["worst"] == pytest.approx(0.4)
    assert goals["beyond the L2, previous mode >= 0.85 of the copy"]["verdict"] == "MET"
    loop[2]["cells"]["cuda previous"] = {"failed": "RuntimeError: boom"}
    previous = {g["goal"]: g for g in layout.goals({"loop": loop}, ["cuda"])}[
        "beyond the L2, previous mode >= 0.85 of the copy"]
    assert previous["verdict"] == "NOT MEASURED" and "RuntimeError: boom" in previous["detail"]
    rl = [{"label": "(64, 4, 8)", "shape": [64, 4, 8], "cells": {"graph cuda": {"us": 4.0},
                                                                 "graph cuda previous": {"us": 6.5}}}]
    rl_goal = {g["goal"]: g for g in layout.goals({"small": rl}, ["cuda"])}["RL sizes in graph replay <= 5 us per call"]
    assert rl_goal["verdict"] == "MISSED" and rl_goal["worst"] == 6.5


def test_a_failing_cell_is_reported_and_the_others_measured():
    run = gpu_speed.Run(torch.device("cpu"), gpu_speed.QUICK, budget_s=10.0, compile_mode="off", rows=1)
    xs = [torch.randn(8, 3) for _ in range(3)]
    rotation = Rotation([(x, torch.empty_like(x)) for x in xs])
    calls = {"n": 0}

    def fails_later(x, y):
        calls["n"] += 1
        if calls["n"] > 6:
            raise ValueError("late failure\nsecond line")
        y.copy_(x)

    def broken():
        raise RuntimeError("cannot build\nmore detail")

    cells = gpu_speed.measure_cells(run, [
        ("copy", lambda: (lambda x, y: y.copy_(x)), rotation, False),
        ("broken", broken, rotation, False),
        ("late", lambda: fails_later, rotation, False),
        ("skipped", "not on this device", rotation, False)])
    assert list(cells) == ["copy", "broken", "late", "skipped"]
    assert cells["copy"]["us"] > 0
    assert cells["broken"] == {"failed": "RuntimeError: cannot build"}
    assert cells["late"] == {"failed": "while timed: ValueError: late failure"}
    assert cells["skipped"] == {"skipped": "not on this device"}
