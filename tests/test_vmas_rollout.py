"""The vmas section of the benchmark (bench/vmas_rollout.py) runs end to end at its smallest size and
reports consistent records; without vmas it is skipped with the reason. Nothing here is timed
against a threshold: the benchmark measures, the test checks that it can."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import fastnorm

pytest.importorskip("vmas")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import vmas_rollout  # noqa: E402


@pytest.fixture
def smallest(monkeypatch):
    """Every scenario at 16 envs, 2 agents, one timed step."""
    monkeypatch.setitem(vmas_rollout.ENVS["cpu"], True, (16,))
    monkeypatch.setitem(vmas_rollout.AGENTS, True, (2,))
    monkeypatch.setitem(vmas_rollout.TIMED_STEPS, True, 1)


def test_section_runs_at_the_smallest_size(smallest):
    result = vmas_rollout.run(torch.device("cpu"), quick=True)
    rows = [r for r in result.records["rows"] if "skipped" not in r]
    for scenario in vmas_rollout.SCENARIOS:
        got = {r["normalizer"]: r for r in rows if r["scenario"] == scenario}
        expected = {vmas_rollout.NONE, vmas_rollout.SEED, vmas_rollout.FASTNORM}
        assert expected <= set(got), f"{scenario}: {sorted(got)}"
        none = got[vmas_rollout.NONE]
        assert none["normalize_ms"] == 0 and none["envs"] == 16 and none["agents"] == 2
        for r in got.values():
            assert 0 <= r["normalize_share"] < 1
            assert r["step_ms"] >= r["normalize_ms"] and r["step_ms"] >= none["env_ms"]
            assert r["env_steps_per_s"] == pytest.approx(16 / (r["step_ms"] / 1e3))
    summary, detail = result.tables
    assert len(summary.rows) == len(vmas_rollout.SCENARIOS)
    assert summary.notes[0].startswith("goal")


def test_fastnorm_normalizes_the_stacked_observations_per_agent_and_feature():
    """The benchmark's fastnorm call updates statistics of shape (agents, features) from the env's
    observations stacked to (envs, agents, features), as RunningNorm does on the same batch."""
    bench = vmas_rollout.Bench("transport", 16, 3, torch.device("cpu"))
    x = bench.obs.clone()
    call = bench.prepared[vmas_rollout.FASTNORM](x.clone())
    y = call()
    expected = fastnorm.RunningNorm(x.shape[1:])
    torch.testing.assert_close(y, expected(x))
    assert y.shape == (16, 3, 11)


def test_skipped_without_vmas(monkeypatch):
    monkeypatch.setitem(sys.modules, "vmas", None)  # import vmas raises ImportError
    result = vmas_rollout.run(torch.device("cpu"), quick=True)
    assert "skipped" in result.records and not result.tables[0].rows
    assert "vmas is not installed" in result.tables[0].notes[0]
