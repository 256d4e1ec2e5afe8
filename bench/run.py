"""The fastnorm benchmark (`make bench`): how much faster than what RL code uses today, how close to
the memory floor, and whether it fixes the failures the seed analyses describe.

    python bench/run.py [--device cpu|cuda] [--quick] [--json PATH] [--plot PATH] [--sections NAME ...]

Runs every section in SECTIONS in turn, prints its tables, and writes the results with the
device, versions and date to bench/results/<device>-<date>.json (or --json PATH), the tables as
markdown beside it (.md) and the fraction-of-copy bar chart (.png, or --plot PATH; needs
matplotlib, which `pip install fastnorm[bench]` brings). The JSON and markdown are rewritten after
each section, so a run stopped midway keeps what it measured. --quick measures fewer shapes, sizes
and rounds: under two minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastnorm  # noqa: E402

import plot  # noqa: E402
from report import as_markdown, as_text  # noqa: E402

# The sections, run in this order: each is a module bench/<name>.py with TITLE and
# run(device, quick) -> report.SectionResult. Adding one is adding its name here.
SECTIONS = [
    "calls",
    "running_norm",
    "advantages",
    "rollout",
    "stability",
    "frameworks",
    "wrappers",
    "vmas_rollout",
]
PEER_PACKAGES = ("numpy", "stable-baselines3", "rsl-rl-lib", "rl-games", "skrl", "torchrl", "tensordict", "vmas",
                 "matplotlib")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def environment(device: torch.device) -> dict:
    """Where and with what the numbers were taken."""
    from importlib import metadata

    env = {"date": datetime.date.today().isoformat(), "device": device.type, "torch": torch.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "fastnorm": fastnorm.__version__, "backends": fastnorm.backends(), "machine": platform.machine(),
           "load_average_at_start": os.getloadavg()}
    versions = {}
    for package in PEER_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    env["packages"] = versions
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        try:
            with open("/proc/cpuinfo") as f:
                env["device_name"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            env["device_name"] = platform.processor() or platform.machine()
    return env


def busy_warning(env: dict) -> str:
    """A warning for the results when other processes competed for the CPUs during the run."""
    if max(env["load_average_at_start"][0], env["load_average_at_end"][0]) <= (env["cpus"] or 1):
        return ""
    return (" Other processes competed for the cores: expect noise, most of all in small ops that wait for a "
            "second OpenMP thread to be scheduled (seen in F.batch_norm and the compiled reference at the tiny "
            "shape). Each row is compared with the copy timed in the same interleaved rounds.")


def write_results(path: str, env: dict, quick: bool, results: dict, markdown: list[str]):
    """The JSON at path and the markdown beside it (.md), rewritten after each section: a run
    stopped midway keeps the sections done."""
    env["load_average_at_end"] = os.getloadavg()
    stem = os.path.splitext(path)[0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "quick": quick, "sections": results}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# fastnorm benchmark, {env['date']}: {env['device_name']} ({env['device']}, {env['threads']} threads), "
                f"torch {env['torch']}{', quick' if quick else ''}\n\n"
                f"Load average (1 min) {env['load_average_at_start'][0]:.1f} at the start, "
                f"{env['load_average_at_end'][0]:.1f} at the end, on {env['cpus']} CPUs.{busy_warning(env)}\n\n"
                + "\n".join(markdown))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer shapes, sizes and rounds (under 2 minutes on CPU)")
    parser.add_argument("--json", help="where to write the results (default: bench/results/<device>-<date>.json)")
    parser.add_argument("--plot", help="where to draw the fraction-of-copy chart (default: the JSON path, .png)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS,
                        help="which sections to run (default: all)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    print(f"fastnorm benchmark{' (quick)' if args.quick else ''}: {env['device_name']} ({device.type}), "
          f"torch {env['torch']}, {env['threads']} threads, fastnorm backends available: "
          f"{[name for name, reasons in env['backends'].items() if not reasons]}, load average "
          f"{env['load_average_at_start'][0]:.1f} (other processes share these cores: expect noise)\n")

    path = args.json or os.path.join(RESULTS, f"{device.type}-{env['date']}.json")
    stem = os.path.splitext(path)[0]
    results, markdown, details = {}, [], []
    for name in args.sections:
        section = importlib.import_module(name)
        print(f"== {section.TITLE}\n", flush=True)
        start = time.perf_counter()
        result = section.run(device, args.quick)
        seconds = time.perf_counter() - start
        for table in result.tables:
            print(as_text(table) + "\n")
        print(f"({name} took {seconds:.0f} s)\n", flush=True)
        results[name] = {"seconds": seconds, **result.records}
        markdown += [f"## {section.TITLE}", ""] + [as_markdown(t) + "\n" for t in result.tables if not t.detail]
        details += [as_markdown(t) + "\n" for t in result.tables if t.detail]
        write_results(path, env, args.quick, results, markdown + (["## Details", ""] + details if details else []))
        if name == "running_norm":
            print(plot.fraction_of_copy(results["running_norm"]["rows"], args.plot or stem + ".png", env) + "\n")
    print(f"results written to {path} and {stem}.md")


if __name__ == "__main__":
    main()
