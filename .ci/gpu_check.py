"""Everything a GPU loan must verify, in one command (`make gpu-check OUT=dir`), on a bare GPU
machine with its own CUDA torch (run with that python):

  1. build   fastnorm._C with its CUDA kernels for one architecture (TORCH_CUDA_ARCH_LIST, MAX_JOBS
             = the cores), then .ci/check_cuda_build.py: every op has a CUDA kernel, the machine code
  2. tests   pytest over tests/ on cuda (every backend that runs there: cuda, triton, reference),
             without -x, a per-test timeout where pytest-timeout is installed, xdist workers where
             pytest-xdist is; junit XML and a plain log
  3. bench   bench/run.py --quick --device cuda --json --plot
  4. summary build ok, tests passed/failed/skipped per file, the benchmark's summary tables, and
             each GPU-UNVERIFIED prediction of bench/NOTES.md beside its measured value (.ci/gpu_summary.py)

Each stage runs under its own time budget (its process group is killed when it runs over), so a
slow stage cannot eat the others' time; PYTHONUNBUFFERED=1 keeps the logs whole. Logs and results
go to OUT (8 files at most, the device tool's limit): build.log, tests.log, tests.xml, bench.log,
bench.json, bench.md, bench.png, summary.txt.

--cpu-rehearsal runs every stage tiny on the CPU (the CPU build, two test files, the advantages
section of the benchmark; tests/test_gpu_summary.py covers the matching of the running_norm rows): CI runs it so that this script cannot rot.

Estimates on an H200 machine (16 cores), from this project's 2-core CPU runs (README, "The GPU
check"), and budgets: install 5-10 s (30), build 45-90 s (120), check 10 s (30), tests 100-200 s
(210), bench 60-120 s (140): at most 530 s in all.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_summary  # noqa: E402

# Device-independent test files (CI runs them) and the CPU emulation of the CUDA kernels, which
# the GPU runs for real: left out of the GPU run.
NOT_ON_GPU = ("tests/test_cuda_emulated.py", "tests/test_cuda_emulated_split.py",
              "tests/test_cuda_emulated_advantages.py", "tests/test_cuda_emulated_advantages_split.py",
              "tests/test_scan.py", "tests/test_monitor.py")
# The integrations' tests and the framework each needs: the bare GPU machine lacks the frameworks
# (CI runs these files on the CPU, where make test installs them), so a file whose framework is
# missing there is left out of the GPU run, and the log says so.
NEEDS_FRAMEWORK = {"tests/test_rsl_rl.py": "rsl_rl", "tests/test_rl_games.py": "rl_games",
                   "tests/test_frameworks_distributed.py": "rl_games", "tests/test_integrations_skrl.py": "skrl",
                   "tests/test_integrations_torchrl.py": "torchrl", "tests/test_integrations_gymnasium.py": "gymnasium",
                   "tests/test_integrations_sb3.py": "stable_baselines3", "tests/test_vmas_mappo.py": "vmas",
                   "tests/test_vmas_rollout.py": "vmas", "tests/test_export.py": "onnxruntime"}
# The rehearsal's tests: a few quick files, enough to exercise the run and the per-file summary.
REHEARSAL_TESTS = ("tests/test_reference.py", "tests/test_running_norm_api.py")


class Stage:
    """One step: its command, environment, time budget and log file under OUT."""

    def __init__(self, name: str, command: list[str], budget_s: int, log: str, env: dict | None = None):
        self.name, self.command, self.budget_s, self.log, self.env = name, command, budget_s, log, env or {}

    def run(self, out: str) -> dict:
        """Runs the stage into its log; its status ok, failed (exit status) or timed out."""
        path = os.path.join(out, self.log)
        print(f"== {self.name} (budget {self.budget_s} s, log {self.log}): {' '.join(self.command)}", flush=True)
        start = time.monotonic()
        with open(path, "a") as log:
            log.write(f"$ {' '.join(self.command)}\n")
            log.flush()
            process = subprocess.Popen(self.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env}, start_new_session=True)
            try:
                code = process.wait(timeout=self.budget_s)
                status = "ok" if code == 0 else f"failed (exit status {code})"
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                status = f"timed out after {self.budget_s} s"
        seconds = time.monotonic() - start
        print(f"   {self.name}: {status} in {seconds:.0f} s", flush=True)
        if status != "ok":
            with open(path) as log:
                print("".join(log.readlines()[-25:]), flush=True)
        return {"name": self.name, "status": status, "seconds": seconds}


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def stages(args, out: str) -> list[Stage]:
    python = sys.executable
    device = "cpu" if args.cpu_rehearsal else "cuda"
    build_env = {"MAX_JOBS": str(args.jobs)}
    if not args.cpu_rehearsal:
        build_env["TORCH_CUDA_ARCH_LIST"] = args.arch
    result = []
    if not has_module("fastnorm.triton_kernels"):  # a fresh clone: register the package (no compiling)
        result.append(Stage("install", [python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                                        "--no-index", "-e", "."], 30, "build.log", {"FASTNORM_NO_EXTENSION": "1"}))
    result.append(Stage("build", [python, "setup.py", "build_ext", "--inplace"], args.build_budget, "build.log",
                        build_env))
    if not args.cpu_rehearsal:
        result.append(Stage("check", [python, ".ci/check_cuda_build.py", args.arch], 30, "build.log"))

    if args.cpu_rehearsal:
        tests = list(REHEARSAL_TESTS)
    else:
        missing = [f for f, module in NEEDS_FRAMEWORK.items() if not has_module(module)]
        if missing:
            print(f"left out of the GPU tests, their framework is not installed here: {', '.join(missing)}")
        tests = ["tests"] + [f"--ignore={f}" for f in NOT_ON_GPU + tuple(missing)]
    pytest = [python, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", f"--junitxml={out}/tests.xml"] + tests
    if has_module("pytest_timeout"):
        pytest.append(f"--timeout={args.test_timeout}")
    if has_module("xdist") and args.workers > 1:
        pytest += ["-n", str(args.workers)]
    result.append(Stage("tests", pytest, args.test_budget, "tests.log",
                        {"FASTNORM_TEST_DEVICE": device, "FASTNORM_SEED": str(args.seed)}))

    bench = [python, "bench/run.py"] + ([] if args.full_bench else ["--quick"]) + [
        "--device", device, "--json", f"{out}/bench.json", "--plot", f"{out}/bench.png"]
    if args.cpu_rehearsal:
        bench += ["--sections", "advantages"]
    result.append(Stage("bench", bench, args.bench_budget, "bench.log"))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the folder for the logs and results (created)")
    parser.add_argument("--cpu-rehearsal", action="store_true", help="every stage tiny, on the CPU (CI)")
    parser.add_argument("--arch", default="9.0", help="the CUDA architecture to build for (default 9.0: H100, H200)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs (MAX_JOBS)")
    parser.add_argument("--workers", type=int, default=8, help="pytest-xdist workers, where it is installed")
    parser.add_argument("--seed", type=int, default=random.SystemRandom().randrange(2**31), help="FASTNORM_SEED")
    parser.add_argument("--build-budget", type=int, default=120, help="seconds")
    parser.add_argument("--test-budget", type=int, default=210, help="seconds")
    parser.add_argument("--test-timeout", type=int, default=60, help="seconds per test (with pytest-timeout)")
    parser.add_argument("--bench-budget", type=int, default=140, help="seconds")
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
    results = []
    for stage in stages(args, out):
        results.append(stage.run(out))
        if stage.name in ("install", "build", "check") and results[-1]["status"] != "ok":
            break  # nothing to test without the package
    summary = gpu_summary.summary(results, out, os.path.join(ROOT, "bench", "NOTES.md"),
                                  time.monotonic() - start)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(summary + "\n")
    print(summary)
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
