"""bench/run.py on a machine without the RL frameworks (the GPU image has none): each section that
reaches for one completes and says what it skipped. In a subprocess, each framework is made
unimportable (None in sys.modules: import raises ModuleNotFoundError, find_spec returns None).
The sections that import no framework are checked from their source, so a new section that
imports one must be run here too."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
FRAMEWORKS = ("gymnasium", "stable_baselines3", "rsl_rl", "rl_games", "skrl", "torchrl", "tensordict", "vmas")
# The sections that import a framework (fastnorm.integrations imports them too), and peers.py,
# through which running_norm reaches the frameworks: run below without them.
REACH_FRAMEWORKS = ("frameworks", "wrappers", "vmas_rollout")
RUN = """
import json, runpy, sys
for name in {frameworks!r}:
    sys.modules[name] = None
sys.argv = ["bench/run.py", "--quick", "--device", "cpu", "--json", {json_path!r}, "--sections", *{sections!r}]
runpy.run_path({run_py!r}, run_name="__main__")
sys.path.insert(0, {bench!r})
import torch
from peers import peer_cases
cases, skipped = peer_cases(torch.randn(16, 3, 2), (3, 2))
print("PEERS " + json.dumps(skipped))
"""


def _imports(module: str) -> set[str]:
    """The top-level modules bench/<module>.py imports anywhere in it."""
    with open(os.path.join(BENCH, module + ".py")) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _frameworks_reached(module: str, seen: set[str]) -> set[str]:
    """The frameworks bench/<module>.py imports, itself or through the other bench modules (not peers)."""
    seen.add(module)
    reached = set()
    for name in _imports(module):
        top = name.split(".")[0]
        if top in FRAMEWORKS or name.startswith("fastnorm.integrations"):
            reached.add(name)
        elif top != "peers" and top not in seen and os.path.exists(os.path.join(BENCH, top + ".py")):
            reached |= _frameworks_reached(top, seen)
    return reached


def test_the_other_sections_import_no_framework():
    sys.path.insert(0, BENCH)
    from run import SECTIONS

    for section in SECTIONS:
        reached = _frameworks_reached(section, set())
        assert (section in REACH_FRAMEWORKS) == bool(reached), (section, reached)


def test_the_sections_skip_the_frameworks_that_are_not_installed(tmp_path):
    json_path = str(tmp_path / "bench.json")
    code = RUN.format(frameworks=FRAMEWORKS, json_path=json_path, sections=REACH_FRAMEWORKS,
                      run_py=os.path.join(BENCH, "run.py"), bench=BENCH)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sections = json.load(open(json_path))["sections"]

    wrappers = sections["wrappers"]
    assert wrappers["rows"] == [] and set(wrappers["skipped"]) == {"Gymnasium", "SB3"}
    assert all("gymnasium" in reason for reason in wrappers["skipped"].values())
    assert "skipped Gymnasium: ModuleNotFoundError" in done.stdout

    rows = sections["frameworks"]["rows"]
    assert rows and all(r["framework_us"] is None and r["fastnorm_us"] is None for r in rows)
    for r in rows:
        module = "tensordict" if r["framework"] == "torchrl" else r["framework"]
        assert r["framework_skip"] == r["fastnorm_skip"] == f"not installed ({module})", r

    assert "vmas" in sections["vmas_rollout"]["skipped"] and "skipped: vmas is not installed" in done.stdout

    peers = json.loads(done.stdout.split("PEERS ", 1)[1])
    assert set(peers) == {"stable-baselines3", "rsl-rl-lib", "rl-games", "torchrl"}
    assert all(reason.startswith("ModuleNotFoundError") for reason in peers.values())
