"""``fastnorm scan`` on real event files written with torch's SummaryWriter: a healthy run, the
seed's reconstructed catastrophe, NaN from step N, missing and remapped tags, several runs, damaged
files; findings, verdicts, exit codes, JSON and the plot."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("google_crc32c")
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from fastnorm.monitoring import events  # noqa: E402
from fastnorm.__main__ import main  # noqa: E402
from fastnorm.monitoring.scan import SEED_TAGS, parse_tag_mapping, scan  # noqa: E402

T = SEED_TAGS
# Healthy ranges from the seed ("Normal" / "Before").
HEALTHY = {
    "advantages_std_raw": (0.01, 0.5), "advantages_norm_max_abs": (1.0, 5.0), "grad_norm": (0.1, 1.0),
    "clip_fraction": (0.1, 0.3), "explained_variance": (0.3, 0.9), "policy_loss": (-0.002, 0.01),
    "value_loss": (0.01, 0.5), "ep_rew_mean": (50.0, 150.0),
}
# The seed's "Real Example (Reconstructed)"; keys not listed stay healthy.
CATASTROPHE = {
    1095: dict(advantages_std_raw=0.0008, advantages_norm_max_abs=4.2, policy_loss=-0.003, value_loss=0.12,
               explained_variance=0.75),
    1098: dict(advantages_std_raw=0.00005, advantages_norm_max_abs=8.5, policy_loss=-0.02, value_loss=0.35,
               explained_variance=0.68),
    1099: dict(advantages_std_raw=0.000018, advantages_norm_max_abs=385.2, policy_loss=-47.3, value_loss=156.8,
               clip_fraction=0.98, grad_norm=2847.3, explained_variance=-3.2),
    1100: dict(advantages_std_raw=math.nan, advantages_norm_max_abs=math.nan, policy_loss=math.nan,
               value_loss=math.nan, explained_variance=math.nan, ep_rew_mean=-850.3),
}


def healthy_values(gen: np.random.Generator, keys=tuple(HEALTHY)) -> dict[str, float]:
    return {key: float(gen.uniform(*HEALTHY[key])) for key in keys}


def write_run(path, rows: dict[int, dict[str, float]], tags=T, new_style=False) -> None:
    """rows: step -> {key: value}, written in step order with one SummaryWriter."""
    writer = SummaryWriter(str(path))
    for step in sorted(rows):
        for key, value in rows[step].items():
            writer.add_scalar(tags.get(key, key), value, step, new_style=new_style)
    writer.close()


@pytest.fixture
def rng(gen) -> np.random.Generator:
    return np.random.default_rng(gen.initial_seed())


def healthy_rows(rng, steps, keys=tuple(HEALTHY)):
    return {s: healthy_values(rng, keys) for s in steps}


def catastrophe_rows(rng):
    rows = healthy_rows(rng, list(range(1000, 1095, 3)) + [1095, 1096, 1097, 1098, 1099, 1100])
    for step, values in CATASTROPHE.items():
        rows[step].update(values)
    return rows


def run_main(capsys, *args) -> tuple[int, str, str]:
    code = main(["scan", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def strict_json(text: str):
    def no_constants(name):
        raise ValueError(f"invalid JSON constant {name}")

    return json.loads(text, parse_constant=no_constants)


def test_healthy_run(tmp_path, rng, capsys):
    write_run(tmp_path / "healthy", healthy_rows(rng, range(120)))
    (report,) = scan(str(tmp_path))
    assert (report.run, report.status, report.findings, report.missing, report.problems) == (
        "healthy", "healthy", [], [], [])
    assert report.verdict == "healthy: no signal in 120 logged updates"
    assert report.series["grad_norm"] == {"tag": "train/grad_norm", "points": 120, "first_step": 0, "last_step": 119}
    code, out, err = run_main(capsys, tmp_path)
    assert code == 0 and "run healthy: HEALTHY" in out and err == ""


def test_the_seeds_catastrophe(tmp_path, rng, capsys):
    write_run(tmp_path / "ppo", catastrophe_rows(rng))
    (report,) = scan(str(tmp_path))
    assert report.status == "diverged" and report.diverged_at == 1100
    assert report.first_non_finite == {"step": 1100, "tags": [
        T["advantages_std_raw"], T["advantages_norm_max_abs"], T["explained_variance"], T["policy_loss"],
        T["value_loss"]]}
    found = {(f.rule, f.tag): f for f in report.findings}
    window = found["advantages_std_low", T["advantages_std_raw"]]
    assert (window.severity, window.first_step, window.onsets, window.points) == ("warning", 1098, [1098], 2)
    assert window.first_value == pytest.approx(5e-5)
    expect_first = {
        ("advantages_norm_extreme", "advantages_norm_max_abs"): ("critical", 385.2),
        ("grad_norm_explosion", "grad_norm"): ("critical", 2847.3),
        ("clip_fraction_high", "clip_fraction"): ("warning", 0.98),
        ("explained_variance_negative", "explained_variance"): ("critical", -3.2),
        ("loss_explosion", "policy_loss"): ("warning", -47.3),
        ("loss_explosion", "value_loss"): ("warning", 156.8),
    }
    for (rule, key), (severity, value) in expect_first.items():
        f = found[rule, T[key]]
        assert (f.severity, f.first_step, f.points) == (severity, 1099, 1)
        assert f.first_value == pytest.approx(value, rel=1e-6)
    assert len(found) == 7
    assert report.verdict.startswith(
        "diverged at step 1100 (first non-finite: train/advantages_std_raw, train/advantages_norm_max_abs, "
        "train/explained_variance, train/policy_loss, train/value_loss), preceded by advantages_std_low from step "
        "1098 (train/advantages_std_raw = 5e-05); advantages_norm_extreme from step 1099 "
        "(train/advantages_norm_max_abs = 385.2); ")
    for signal in ("grad_norm_explosion from step 1099 (train/grad_norm = 2847)", "clip_fraction_high from step 1099",
                   "explained_variance_negative from step 1099 (train/explained_variance = -3.2)"):
        assert signal in report.verdict
    assert report.verdict.endswith("to -850.3")

    code, out, _ = run_main(capsys, tmp_path, "--json")
    assert code == 1
    data = strict_json(out)
    assert data["critical"] is True and data["tags"] == T
    (run,) = data["runs"]
    assert run["status"] == "diverged" and run["diverged_at"] == 1100 and run["verdict"] == report.verdict
    assert {(f["rule"], f["tag"], f["first_step"]) for f in run["findings"]} == {
        (f.rule, f.tag, f.first_step) for f in report.findings}


def test_nan_from_step_n_without_precursors(tmp_path, rng, capsys):
    n = 40 + int(rng.integers(0, 40))
    rows = healthy_rows(rng, range(100))
    for step in range(n, 100):
        rows[step]["value_loss"] = math.nan
        rows[step]["grad_norm"] = math.inf if step == n else math.nan
    write_run(tmp_path, rows)
    (report,) = scan(str(tmp_path))
    assert report.run == "." and report.status == "diverged" and report.diverged_at == n
    assert report.first_non_finite == {"step": n, "tags": [T["grad_norm"], T["value_loss"]]}
    assert report.findings == []
    assert report.verdict.startswith(f"diverged at step {n} (first non-finite: train/grad_norm, train/value_loss), "
                                     "with no signal in the 50 logged points before")
    code, out, _ = run_main(capsys, tmp_path, "--json")
    assert code == 1 and strict_json(out)["runs"][0]["diverged_at"] == n


def test_precursors_older_than_the_lookback_are_not_blamed(tmp_path, rng, capsys):
    rows = healthy_rows(rng, range(200))
    rows[20]["advantages_std_raw"] = 2e-5
    rows[190]["policy_loss"] = math.nan
    write_run(tmp_path, rows)
    (report,) = scan(str(tmp_path))
    assert report.diverged_at == 190 and "no signal in the 50 logged points" in report.verdict
    (long_lookback,) = scan(str(tmp_path), lookback=200)
    assert "preceded by advantages_std_low from step 20" in long_lookback.verdict
    code, out, _ = run_main(capsys, tmp_path, "--lookback", "200")
    assert code == 1 and "preceded by advantages_std_low from step 20" in out


def test_warnings_alone_exit_zero_and_report_each_window_entry(tmp_path, rng, capsys):
    rows = healthy_rows(rng, range(300))
    for step in (*range(50, 53), *range(200, 210)):
        rows[step]["advantages_std_raw"] = float(rng.uniform(1e-7, 9e-5))
    write_run(tmp_path / "late", rows)
    (report,) = scan(str(tmp_path))
    (finding,) = report.findings
    assert (report.status, finding.rule, finding.onsets, finding.streaks, finding.points) == (
        "warning", "advantages_std_low", [50, 200], 2, 13)
    assert report.verdict.startswith("healthy, with warnings: advantages_std_low from step 50")
    code, out, _ = run_main(capsys, tmp_path)
    assert code == 0 and "streaks from step 50, 200" in out


def test_a_critical_spike_without_divergence_exits_one(tmp_path, rng, capsys):
    rows = healthy_rows(rng, range(100))
    rows[70]["grad_norm"] = 1500.0
    rows[71]["explained_variance"] = -0.7
    write_run(tmp_path, rows)
    (report,) = scan(str(tmp_path))
    assert report.status == "critical" and report.diverged_at is None
    assert report.verdict == ("no divergence, but critical signals: grad_norm_explosion from step 70 "
                              "(train/grad_norm = 1500); explained_variance_negative from step 71 "
                              "(train/explained_variance = -0.7)")
    assert run_main(capsys, tmp_path)[0] == 1


def test_missing_tags_and_runs_without_any(tmp_path, rng, capsys):
    write_run(tmp_path / "partial", healthy_rows(rng, range(30), keys=("grad_norm", "clip_fraction")))
    write_run(tmp_path / "other", {s: {"eval/success": 1.0} for s in range(10)})
    partial, other = sorted(scan(str(tmp_path)), key=lambda r: r.run, reverse=True)
    assert partial.status == "healthy" and set(partial.series) == {"grad_norm", "clip_fraction"}
    assert partial.missing == [T[k] for k in SEED_TAGS if k not in ("grad_norm", "clip_fraction")]
    assert other.status == "no data" and other.verdict == "none of the scanned tags were logged"
    assert other.missing == list(T.values())
    code, out, _ = run_main(capsys, tmp_path)
    assert code == 0 and "missing tags: train/advantages_std_raw" in out


def test_several_runs_under_one_directory(tmp_path, rng, capsys):
    write_run(tmp_path, healthy_rows(rng, range(20)))
    write_run(tmp_path / "seed1", healthy_rows(rng, range(20)))
    write_run(tmp_path / "sweep" / "seed2", catastrophe_rows(rng))
    reports = scan(str(tmp_path))
    assert [(r.run, r.status) for r in reports] == [(".", "healthy"), ("seed1", "healthy"),
                                                     (os.path.join("sweep", "seed2"), "diverged")]
    code, out, _ = run_main(capsys, tmp_path, "--json")
    data = strict_json(out)
    assert code == 1 and [r["status"] for r in data["runs"]] == ["healthy", "healthy", "diverged"]
    assert run_main(capsys, tmp_path / "seed1")[0] == 0


def test_tags_can_be_mapped(tmp_path, rng, capsys):
    rows = healthy_rows(rng, range(50), keys=("advantages_std_raw", "clip_fraction"))
    for step, values in rows.items():
        values["optim/gn"] = 2000.0 if step == 30 else 0.5
        values["ppo/clipfrac"] = values.pop("clip_fraction")
    write_run(tmp_path, rows)
    (unmapped,) = scan(str(tmp_path))
    assert unmapped.status == "healthy" and T["grad_norm"] in unmapped.missing
    tags = parse_tag_mapping(["grad_norm=optim/gn", "clip_fraction=ppo/clipfrac"])
    (mapped,) = scan(str(tmp_path), tags)
    assert mapped.status == "critical" and "grad_norm" in mapped.series and "clip_fraction" in mapped.series
    assert [(f.rule, f.tag, f.first_step) for f in mapped.findings] == [("grad_norm_explosion", "optim/gn", 30)]
    code, out, _ = run_main(capsys, tmp_path, "--tags", "grad_norm=optim/gn,clip_fraction=ppo/clipfrac", "--json")
    assert code == 1 and strict_json(out)["tags"]["grad_norm"] == "optim/gn"
    assert run_main(capsys, tmp_path, "--tags", "grad_norm=optim/gn", "--tags", "clip_fraction=ppo/clipfrac")[0] == 1


def test_restarts_and_tensor_style_scalars_are_read(tmp_path, rng):
    first = healthy_rows(rng, range(0, 60))
    second = healthy_rows(rng, range(50, 80))
    second[75]["grad_norm"] = 5000.0
    write_run(tmp_path, first)
    write_run(tmp_path, second, new_style=True)
    (report,) = scan(str(tmp_path))
    assert report.series["grad_norm"]["points"] == 90
    assert [(f.rule, f.first_step, f.first_value) for f in report.findings] == [("grad_norm_explosion", 75, 5000.0)]


def test_a_reasonably_large_log(tmp_path, rng):
    steps = 1500
    writer = SummaryWriter(str(tmp_path))
    std = rng.uniform(0.01, 0.5, steps)
    std[[400, 401, 900, 1200]] = [5e-5, 3e-5, 8e-6, 9e-5]
    for step in range(steps):
        writer.add_scalar(T["advantages_std_raw"], std[step], step)
        writer.add_scalar(T["grad_norm"], 3000.0 if step == 1300 else 0.5, step)
    writer.close()
    (report,) = scan(str(tmp_path))
    found = {f.rule: f for f in report.findings}
    assert found["advantages_std_low"].onsets == [400, 900, 1200] and found["advantages_std_low"].points == 4
    assert found["grad_norm_explosion"].first_step == 1300
    assert report.series["advantages_std_raw"]["points"] == steps


def test_damaged_files_are_read_as_far_as_they_can_be(tmp_path, rng):
    rows = healthy_rows(rng, range(40))
    rows[35]["grad_norm"] = 1e4
    write_run(tmp_path, rows)
    (path,) = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path)]
    data = bytearray(open(path, "rb").read())
    # Flip a byte of the value of the 11th advantages_std_raw record (its data CRC now fails).
    needle = T["advantages_std_raw"].encode()
    hits = [i for i in range(len(data)) if data.startswith(needle, i)]
    data[hits[10] + len(needle) + 2] ^= 0xFF
    with open(path, "wb") as f:
        f.write(data + data[:20])  # and a truncated record at the end
    (report,) = scan(str(tmp_path))
    assert report.series["advantages_std_raw"]["points"] == 39
    assert report.series["grad_norm"]["points"] == 40
    assert report.status == "critical"
    assert len(report.problems) == 2
    assert "corrupted record" in report.problems[0] and "truncated record" in report.problems[1]


def test_usage_errors_exit_two(tmp_path, rng, capsys, monkeypatch):
    write_run(tmp_path / "run", healthy_rows(rng, range(5)))
    code, _, err = run_main(capsys, tmp_path, "--tags", "grad=x")
    assert code == 2 and "unknown tag key 'grad'" in err
    code, _, err = run_main(capsys, tmp_path, "--tags", "grad_norm")
    assert code == 2 and "KEY=TAG" in err
    code, _, err = run_main(capsys, tmp_path, "--lookback", "-1")
    assert code == 2 and "--lookback must be >= 0" in err
    code, _, err = run_main(capsys, tmp_path / "nope")
    assert code == 2 and "does not exist" in err
    (tmp_path / "file").write_text("x")
    code, _, err = run_main(capsys, tmp_path / "file")
    assert code == 2 and "is not a directory" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(capsys, tmp_path / "empty")
    assert code == 2 and "no TensorBoard event files" in err
    code, _, err = run_main(capsys)
    assert code == 2 and "the following arguments are required: LOGDIR" in err

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(events.os, "listdir", unreadable)
    code, _, err = run_main(capsys, tmp_path)
    assert code == 2 and "cannot read" in err and "Permission denied" in err


def test_without_the_extra_scan_says_what_to_install(tmp_path, rng, capsys, monkeypatch):
    write_run(tmp_path, healthy_rows(rng, range(5)))

    def missing():
        raise events.MissingExtraError("reading TensorBoard logs needs the optional extra: pip install "
                                       "'fastnorm[monitor]' (No module named 'tensorboard')")

    monkeypatch.setattr(events, "_require_extra", missing)
    code, out, err = run_main(capsys, tmp_path)
    assert code == 2 and out == "" and "pip install 'fastnorm[monitor]'" in err


def test_plot(tmp_path, rng, capsys):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "logs" / "bad", catastrophe_rows(rng))
    write_run(tmp_path / "logs" / "partial", healthy_rows(rng, range(30), keys=("grad_norm",)))
    png = tmp_path / "scan.png"
    code, out, _ = run_main(capsys, tmp_path / "logs", "--plot", png)
    assert code == 1 and "run bad: DIVERGED" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    code, _, err = run_main(capsys, tmp_path / "logs", "--plot", tmp_path / "no" / "such" / "dir.png")
    assert code == 2 and "the directory of" in err and "does not exist" in err


def test_the_command_line_entry_points(tmp_path, rng):
    write_run(tmp_path / "bad", catastrophe_rows(rng))
    module = subprocess.run([sys.executable, "-m", "fastnorm", "scan", str(tmp_path), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert module.returncode == 1, module.stderr
    assert strict_json(module.stdout)["runs"][0]["diverged_at"] == 1100
    script = shutil.which("fastnorm", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the fastnorm console script is not installed (pip install -e .)")
    console = subprocess.run([script, "scan", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert console.returncode == 2 and "does not exist" in console.stderr
