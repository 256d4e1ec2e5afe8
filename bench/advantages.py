"""The normalize_advantages benchmark: cases in the style of bench/running_norm.py, and a
standalone table.

    python bench/advantages.py [--device cpu|cuda] [--sizes 1M,16M] [--dtype float32] [--compile]

Each case is a `Case` (bench/running_norm.py): a name and a step that runs one call on the
advantages (timed). The peer is what PPO code does today: ``(adv - adv.mean()) / (adv.std() +
1e-8)`` plus the diagnostics fastnorm returns, computed the eager way (std_raw, max |y|, the floor
flag); the memory floor is a copy (one read and one write). GB/s counts one read and one write of
adv, as for the copy, although normalizing must read adv twice (statistics, then y).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from running_norm import Case, copy_case  # noqa: E402  (bench/running_norm.py)

import fastnorm  # noqa: E402
from fastnorm import advantages_reference  # noqa: E402
from fastnorm.advantages import reduced_dims  # noqa: E402
from fastnorm.backends import BACKENDS  # noqa: E402

MIN_STD = 1e-4

# (name, shape for n elements, dim, whether a (rows,) mask is passed)
LAYOUTS = {
    "global": (lambda n: (n,), None, False),
    "per agent": (lambda n: (n // 16, 16), 0, False),
    "masked rows": (lambda n: (n // 16, 16), None, True),
}


def fastnorm_case(adv, backend: str, dim=None, mask=None) -> Case:
    out = torch.empty_like(adv)
    return Case(f"fastnorm {backend}", lambda: fastnorm.normalize_advantages(adv, mask=mask, dim=dim, min_std=MIN_STD,
                                                                            backend=backend, out=out),
                "y + stats in one call, out=")


def eager_step(adv, dim=None, mask=None):
    """The usual formula and the diagnostics the eager way (masked: over the selected entries)."""
    if mask is None:
        keep = {} if dim is None else dict(dim=dim, keepdim=True)
        mean, std = adv.mean(**keep), adv.std(**keep)
        y = (adv - mean) / (std + 1e-8)
        norm_max_abs = y.abs().max() if dim is None else y.abs().amax(dim)
        count = adv.numel() // norm_max_abs.numel()
    else:
        selected = adv[mask]
        mean, std = selected.mean(), selected.std()
        y = (adv - mean) / (std + 1e-8)
        norm_max_abs = y[mask].abs().max()
        count = selected.numel()
    return y, (mean, std, count, norm_max_abs, std < MIN_STD)


def eager_case(adv, dim=None, mask=None) -> Case:
    return Case("eager formula + diagnostics", lambda: eager_step(adv, dim, mask), "(adv - mean) / (std + 1e-8)")


def compiled_eager_case(adv, dim=None, mask=None) -> Case:
    compiled = torch.compile(eager_step, dynamic=False)
    start = time.perf_counter()
    compiled(adv, dim, mask)
    return Case("torch.compile(eager)", lambda: compiled(adv, dim, mask), setup_seconds=time.perf_counter() - start)


def reference_case(adv, dim=None, mask=None) -> Case:
    dims = reduced_dims(dim, adv.dim())
    return Case("reference (float64)", lambda: advantages_reference.normalize_advantages(adv, mask, dims,
                                                                                         min_std=MIN_STD))


def build_cases(adv, dim=None, mask=None, compile_eager=False) -> list[Case]:
    cases = [copy_case(adv)]
    for name, backend in BACKENDS.items():
        if name != "reference" and not backend.not_supported_reasons(adv, "normalize_advantages"):
            cases.append(fastnorm_case(adv, name, dim, mask))
    cases.append(eager_case(adv, dim, mask))
    if compile_eager:
        cases.append(compiled_eager_case(adv, dim, mask))
    return cases


def median_seconds(cases: list[Case], device: torch.device, rounds: int, warmup: int) -> dict[str, float]:
    """Each case's median time, interleaved round by round so that all see the same machine state."""
    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for case in cases:
        for _ in range(warmup):
            case.step()
    samples = {case.name: [] for case in cases}
    for _ in range(rounds):
        for case in cases:
            samples[case.name].append(timed(case.step))
    return {name: statistics.median(s) for name, s in samples.items()}


def parse_size(text: str) -> int:
    scale = {"K": 2**10, "M": 2**20}.get(text[-1].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="1M,16M", help="element counts, e.g. 1M,16M")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated: " + ", ".join(LAYOUTS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the eager formula")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"normalize_advantages on {device.type} ({torch.get_num_threads()} threads), {args.dtype}, "
          f"torch {torch.__version__}, backends: {fastnorm.backends()}")
    header = f"{'elements':>10} {'layout':<20} {'implementation':<28} {'median us':>10} {'GB/s':>7} {'of copy':>8} " \
             f"{'vs eager':>8}"
    print(header)
    print("-" * len(header))
    for size in (parse_size(s) for s in args.sizes.split(",")):
        for layout in args.layouts.split(","):
            make_shape, dim, masked = LAYOUTS[layout]
            shape = make_shape(size)
            adv = torch.randn(shape, device=device).to(dtype)
            mask = torch.rand(shape[0], device=device) < 0.8 if masked else None
            cases = build_cases(adv, dim, mask, args.compile)
            rounds = args.rounds if size <= 2**20 else max(5, args.rounds // 2)
            times = median_seconds(cases, device, rounds=rounds, warmup=2)
            copy_time, eager_time = times[cases[0].name], times["eager formula + diagnostics"]
            bytes_moved = 2 * adv.numel() * adv.element_size()
            for case in cases:
                t = times[case.name]
                print(f"{adv.numel():>10} {layout:<20} {case.name:<28} {t * 1e6:>10.1f} {bytes_moved / t / 1e9:>7.1f} "
                      f"{copy_time / t:>8.2f} {eager_time / t:>7.1f}x")


if __name__ == "__main__":
    main()
