"""Everything a GPU loan must verify, in one command (`make gpu-check OUT=dir`), on a bare GPU
machine with its own CUDA torch (run with that python), in one 10-minute device call:

  wheels   the frameworks' wheels carried in .whl/ (`make gpu-wheels`), installed into --site
           (no network, no deps, no compile), which goes on PYTHONPATH for every later stage
  install  register the package (pip install -e ., no compile) where fastnorm is not installed
  build    fastnorm._C with its CUDA kernels for one architecture (TORCH_CUDA_ARCH_LIST, MAX_JOBS
           = the cores), then check: .ci/check_cuda_build.py (a CUDA kernel per op, the machine code)
  tests    pytest over every tests/test_*.py on cuda (cuda, triton and reference backends), a file
           whose framework is missing left out (and said), without -x, xdist workers, a timeout per
           test; each failure's traceback appended to OUT/failures.txt as it happens (.ci/failures_plugin.py)
  bench    bench/run.py --quick --device cuda (every section skips what is not installed)
  speed    bench/gpu_speed.py (issue 23's table), skipped with a message where it is not in the tree
  summary  each stage, the tests per file (passed/failed/error/skipped/crashed, or never ran),
           crashed workers, the benchmark's summary tables, bench/NOTES.md's GPU-UNVERIFIED
           predictions beside what was measured (.ci/gpu_summary.py)

Each stage runs under its own budget, cut to what is left before --deadline (seconds from the
start), and its process group is killed when it runs over. The plan is printed first. OUT holds at
most 8 files (the device tool's limit): build.log, tests.log, failures.txt, bench.log, bench.md,
speed.txt, summary.txt, and results.tar.gz (tests.xml, bench.json, bench.png, speed.json).

--cpu-rehearsal runs every stage tiny on the CPU (the CPU build, two test files, the advantages
section of the benchmark; no wheels, no speed): CI runs it so that this script cannot rot.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from typing import Callable, Union

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, CI)

import gpu_summary  # noqa: E402

# Device-independent files and the CPU emulation of the CUDA kernels (CI runs them): run last, so
# that a stage cut short at its budget loses what CI covers anyway.
LAST = ("tests/test_cuda_emulated.py", "tests/test_cuda_emulated_split.py", "tests/test_cuda_emulated_advantages.py",
        "tests/test_cuda_emulated_advantages_split.py", "tests/test_scan.py", "tests/test_monitor.py")
# The modules a test file imports without importorskip: left out (and said) where one is missing.
NEEDS_FRAMEWORK = {"tests/test_rsl_rl.py": ("rsl_rl", "tensordict"), "tests/test_rl_games.py": ("rl_games",),
                   "tests/test_frameworks_distributed.py": ("rl_games", "rsl_rl"),
                   "tests/test_integrations_skrl.py": ("skrl",),
                   "tests/test_integrations_torchrl.py": ("torchrl", "tensordict")}
# The rehearsal's tests: a few quick files, enough to exercise the run and the per-file summary.
REHEARSAL_TESTS = ("tests/test_reference.py", "tests/test_running_norm_api.py")
SPEED_SCRIPT = "bench/gpu_speed.py"
SPEED_MARGIN_S = 20  # its start (torch, CUDA) and the rows' overrun, beyond its own --budget-s
# Folded into results.tar.gz at the end, to keep OUT within 8 files.
TARRED = ("tests.xml", "bench.json", "bench.png", "speed.json")
# What the summary and the tar need after the last stage.
RESERVE_S = 10
Command = Union[list, str]  # a command, or why the stage is skipped


@dataclass
class Stage:
    """One step: what it does (for the plan), its budget, its log under OUT, and a function giving
    its command when it starts, from the seconds it may take (or why it is skipped)."""

    name: str
    what: str
    budget_s: int
    log: str
    command: Callable[[int], Command]
    env: dict = field(default_factory=dict)

    def run(self, out: str, seconds_left: float) -> dict:
        """Runs the stage into its log: ok, failed (exit status), timed out, skipped or not run."""
        start = time.monotonic()
        budget = int(min(self.budget_s, seconds_left - RESERVE_S))
        command = self.command(budget)
        if isinstance(command, str):
            return self.result(f"skipped: {command}", start)
        if budget < 10:
            return self.result(f"not run: {max(0, int(seconds_left))} s left before the deadline", start)
        path = os.path.join(out, self.log)
        print(f"== {self.name} (budget {budget} s, log {self.log}): {' '.join(command)}", flush=True)
        with open(path, "a") as log:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env}, start_new_session=True)
            try:
                code = process.wait(timeout=budget)
                status = "ok" if code == 0 else f"failed (exit status {code})"
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                status = f"timed out after {budget} s"
        if status != "ok":
            with open(path, errors="replace") as log:
                print("".join(log.readlines()[-25:]), flush=True)
        return self.result(status, start)

    def result(self, status: str, start: float) -> dict:
        seconds = time.monotonic() - start
        print(f"   {self.name}: {status} in {seconds:.0f} s", flush=True)
        return {"name": self.name, "status": status, "seconds": seconds}


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):  # its parent package is missing
        return False


def wheels_command(args) -> Command:
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    if args.cpu_rehearsal:
        return "the CPU rehearsal installs no GPU wheels"
    if not wheels:
        return "no .whl/*.whl in the tree (make gpu-wheels; carry=['.whl']): the frameworks' tests are left out"
    return [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
            "--no-cache-dir", "--upgrade", "--target", args.site] + wheels


def on_path(folder: str):
    """Puts folder first on the path of this process (has_module) and of every later stage."""
    if folder not in sys.path:
        sys.path.insert(0, folder)
        importlib.invalidate_caches()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p)


def test_files(args) -> tuple[list[str], dict[str, str]]:
    """The test files to run and {file: why it is left out}."""
    if args.cpu_rehearsal:
        return list(REHEARSAL_TESTS), {}
    files, left_out = [], {}
    names = sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
    for name in sorted(names, key=lambda name: name in LAST):
        missing = [m for m in NEEDS_FRAMEWORK.get(name, ()) if not has_module(m)]
        if missing:
            left_out[name] = f"{', '.join(missing)} not installed"
        else:
            files.append(name)
    return files, left_out


def pytest_command(args, out: str, plan: dict) -> list[str]:
    files, plan["left_out"] = test_files(args)
    plan["files"] = files
    for name, why in plan["left_out"].items():
        print(f"   left out: {name} ({why})")
    command = [sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", "-p", "failures_plugin",
               "--continue-on-collection-errors", f"--failures-file={out}/failures.txt", f"--junitxml={out}/tests.xml"]
    if has_module("pytest_timeout"):
        command.append(f"--timeout={args.test_timeout}")
    return command + xdist_options(args.workers) + files


def xdist_options(workers: int) -> list[str]:
    """-n workers where pytest-xdist is installed; worksteal (xdist 3.2+) evens out the last tests."""
    if workers <= 1 or not has_module("xdist"):
        return []
    from importlib.metadata import version

    major_minor = tuple(int(part) for part in version("pytest-xdist").split(".")[:2] if part.isdigit())
    return ["-n", str(workers)] + (["--dist", "worksteal"] if major_minor >= (3, 2) else [])


def stages(args, out: str, plan: dict) -> list[Stage]:
    python = sys.executable
    device = "cpu" if args.cpu_rehearsal else "cuda"
    build_env = {"MAX_JOBS": str(args.jobs)}
    if not args.cpu_rehearsal:
        build_env["TORCH_CUDA_ARCH_LIST"] = args.arch
    result = [Stage("wheels", f".whl/*.whl into {args.site}, on PYTHONPATH after", 20, "build.log",
                    lambda budget: wheels_command(args))]
    if not has_module("fastnorm.triton_kernels"):  # a fresh clone: register the package (no compiling)
        result.append(Stage("install", "pip install --no-index --no-deps -e .", 20, "build.log",
                            lambda budget: [python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                                     "--no-index", "-e", "."], {"FASTNORM_NO_EXTENSION": "1"}))
    result.append(Stage("build", f"setup.py build_ext --inplace, MAX_JOBS={args.jobs}"
                        + ("" if args.cpu_rehearsal else f", sm_{args.arch.replace('.', '')}"), args.build_budget,
                        "build.log", lambda budget: [python, "setup.py", "build_ext", "--inplace"], build_env))
    if not args.cpu_rehearsal:
        result.append(Stage("check", ".ci/check_cuda_build.py", 30, "build.log",
                            lambda budget: [python, ".ci/check_cuda_build.py", args.arch]))
    workers = f"{args.workers} xdist workers, " if args.workers > 1 else ""
    result.append(Stage("tests", f"pytest on {device}: {workers}{args.test_timeout} s a test", args.test_budget,
                        "tests.log", lambda budget: pytest_command(args, out, plan),
                        {"FASTNORM_TEST_DEVICE": device, "FASTNORM_SEED": str(args.seed), "OMP_NUM_THREADS": "2"}))
    bench = [python, "bench/run.py"] + ([] if args.full_bench else ["--quick"]) + [
        "--device", device, "--json", f"{out}/bench.json", "--plot", f"{out}/bench.png"]
    if args.cpu_rehearsal:
        bench += ["--sections", "advantages"]
    result.append(Stage("bench", f"bench/run.py{'' if args.full_bench else ' --quick'} --device {device}",
                        args.bench_budget, "bench.log", lambda budget: bench))
    result.append(Stage("speed", f"{SPEED_SCRIPT} --budget-s (its budget - {SPEED_MARGIN_S} s)", args.speed_budget,
                        "speed.txt", lambda budget: speed_command(args, out, budget)))
    return result


def speed_command(args, out: str, budget: int) -> Command:
    if args.cpu_rehearsal:
        return "the CPU rehearsal does not time the GPU"
    if not os.path.exists(os.path.join(ROOT, SPEED_SCRIPT)):
        return f"{SPEED_SCRIPT} is not in this tree"
    return [sys.executable, SPEED_SCRIPT, "--budget-s", str(max(budget - SPEED_MARGIN_S, 10)),
            "--json", f"{out}/speed.json"]


def print_plan(stage_list: list[Stage], args):
    print(f"plan (deadline {args.deadline} s from the start; each budget is cut to what is left before it):")
    for stage in stage_list:
        print(f"  {stage.name:>8}  {stage.budget_s:>4} s  {stage.log:<12} {stage.what}")
    print(f"  {'summary':>8}  {RESERVE_S:>4} s  summary.txt  and {', '.join(TARRED)} folded into results.tar.gz",
          flush=True)


def fold_results(out: str):
    """Moves TARRED into OUT/results.tar.gz (the device tool brings back 8 files at most)."""
    present = [name for name in TARRED if os.path.exists(os.path.join(out, name))]
    if not present:
        return
    with tarfile.open(os.path.join(out, "results.tar.gz"), "w:gz") as tar:
        for name in present:
            tar.add(os.path.join(out, name), arcname=name)
    for name in present:
        os.remove(os.path.join(out, name))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the folder for the logs and results (created)")
    parser.add_argument("--cpu-rehearsal", action="store_true", help="every stage tiny, on the CPU (CI)")
    parser.add_argument("--arch", default="9.0", help="the CUDA architecture to build for (default 9.0: H100, H200)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs (MAX_JOBS)")
    parser.add_argument("--workers", type=int, default=14, help="pytest-xdist workers, where it is installed")
    parser.add_argument("--seed", type=int, default=random.SystemRandom().randrange(2**31), help="FASTNORM_SEED")
    parser.add_argument("--site", default="/tmp/site", help="where the wheels of .whl/ are installed")
    parser.add_argument("--deadline", type=int, default=560,
                        help="seconds from the start by which every stage has ended (default: a 600-s call)")
    parser.add_argument("--build-budget", type=int, default=100, help="seconds")
    parser.add_argument("--test-budget", type=int, default=180, help="seconds")
    parser.add_argument("--test-timeout", type=int, default=60, help="seconds per test (with pytest-timeout)")
    parser.add_argument("--bench-budget", type=int, default=120, help="seconds")
    parser.add_argument("--speed-budget", type=int, default=180, help="seconds")
    parser.add_argument("--full-bench", action="store_true",
                        help="every shape and size (matches every prediction; give it --bench-budget 400 or more)")
    args = parser.parse_args(argv)
    if args.cpu_rehearsal:
        args.workers = 1
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):  # this run's results only
        os.remove(os.path.join(out, name))

    start = time.monotonic()
    print(f"gpu check{' (CPU rehearsal)' if args.cpu_rehearsal else ''}: python {sys.executable}, "
          f"FASTNORM_SEED={args.seed}, results in {out}", flush=True)
    on_path(CI)  # pytest -p failures_plugin
    plan = {"files": [], "left_out": {}}
    stage_list = stages(args, out, plan)
    print_plan(stage_list, args)
    results = []
    for stage in stage_list:
        results.append(stage.run(out, args.deadline - (time.monotonic() - start)))
        if stage.name == "wheels" and results[-1]["status"] == "ok":
            on_path(args.site)
        if stage.name in ("install", "build", "check") and results[-1]["status"] != "ok":
            break  # nothing to test without the package
    summary = gpu_summary.summary(results, out, os.path.join(ROOT, "bench", "NOTES.md"),
                                  time.monotonic() - start, plan["files"], plan["left_out"])
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(summary + "\n")
    print(summary)
    fold_results(out)
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
