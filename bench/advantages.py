"""The normalize_advantages benchmark: a section of bench/run.py, and a standalone table.

    python bench/advantages.py [--device cpu|cuda] [--sizes 1M,16M] [--dtype float32] [--compile]

Each case is a `Case` (bench/timing.py): a name and a step that runs one call on the advantages
(timed). The peer is what PPO code does today: ``(adv - adv.mean()) / (adv.std() + 1e-8)`` plus
the diagnostics fastnorm returns, computed the eager way (std_raw, max |y|, the floor flag), also
through torch.compile (dynamic shapes: one compilation per layout serves every size; compile time
reported apart), and the float64 reference (at 1M elements at most: seconds a call beyond); the
memory floor is a copy (one read and one write). GB/s counts one read and one write of adv, as for the copy, although normalizing must
read adv twice (statistics, then y). Issue 5's bar on CPU at 1M and 16M elements: at least 4x the
eager formula and at least half the copy's GB/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from report import SectionResult, Table, as_text, timing_table  # noqa: E402
from running_norm import COPY, copy_case, timed_backends  # noqa: E402  (bench/running_norm.py)
from timing import Case, Plan, interleaved_medians  # noqa: E402

import fastnorm  # noqa: E402
from fastnorm import advantages_reference  # noqa: E402
from fastnorm.advantages import reduced_dims  # noqa: E402

TITLE = "Advantage normalization: y and its statistics, beside (adv - adv.mean()) / (adv.std() + 1e-8)"
MIN_STD = 1e-4
EAGER = "eager formula + diagnostics"
SPEEDUP_BAR, COPY_BAR = 4.0, 0.5  # issue 5: at least 4x eager and half the copy's GB/s

# (name, shape for n elements, dim, whether a (rows,) mask is passed)
LAYOUTS = {
    "global": (lambda n: (n,), None, False),
    "per agent": (lambda n: (n // 16, 16), 0, False),
    "masked rows": (lambda n: (n // 16, 16), None, True),
}
# The section: sizes, layouts and whether torch.compile runs (compiling costs seconds a layout).
SECTION = {False: dict(sizes=["1M", "16M"], layouts=list(LAYOUTS), compile=True),
           True: dict(sizes=["1M"], layouts=["global", "per agent"], compile=False)}
REFERENCE_MAX_NUMEL = 2**20
PLANS = {False: Plan(rounds=21, warmup=3, budget_s=0.75), True: Plan(rounds=9, warmup=2, budget_s=0.25)}


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
    return Case(EAGER, lambda: eager_step(adv, dim, mask), "(adv - mean) / (std + 1e-8)")


def compile_eager():
    """eager_step through torch.compile with dynamic shapes, from a clean dynamo cache: each layout
    compiles once (dim and the mask's presence are guarded on), every size reuses it."""
    torch._dynamo.reset()
    return torch.compile(eager_step, dynamic=True)


def compiled_eager_case(compiled, adv, dim=None, mask=None) -> Case:
    start = time.perf_counter()
    compiled(adv, dim, mask)
    if adv.device.type == "cuda":
        torch.cuda.synchronize(adv.device)
    return Case("torch.compile(eager)", lambda: compiled(adv, dim, mask), setup_seconds=time.perf_counter() - start)


def reference_case(adv, dim=None, mask=None) -> Case:
    dims = reduced_dims(dim, adv.dim())
    return Case("reference (float64)", lambda: advantages_reference.normalize_advantages(adv, mask, dims,
                                                                                         min_std=MIN_STD))


def build_cases(adv, dim=None, mask=None, compiled=None) -> list[Case]:
    """The copy, every fastnorm backend that has the op, the eager formula, compiled (a
    compile_eager() function) when given, and the reference up to REFERENCE_MAX_NUMEL elements."""
    cases = [copy_case(adv)]
    cases += [fastnorm_case(adv, name, dim, mask) for name in timed_backends(adv, "normalize_advantages")]
    cases.append(eager_case(adv, dim, mask))
    if compiled is not None:
        cases.append(compiled_eager_case(compiled, adv, dim, mask))
    if adv.numel() <= REFERENCE_MAX_NUMEL:
        cases.append(reference_case(adv, dim, mask))
    return cases


def measure(numel: int, layout: str, dtype: torch.dtype, device: torch.device, plan: Plan,
            compiled=None) -> list[dict]:
    """One record per case for advantages of numel elements in layout."""
    make_shape, dim, masked = LAYOUTS[layout]
    shape = make_shape(numel)
    adv = torch.randn(shape, device=device).to(dtype)
    mask = torch.rand(shape[0], device=device) < 0.8 if masked else None
    cases = build_cases(adv, dim, mask, compiled)
    medians = interleaved_medians(cases, device, plan)
    bytes_moved = 2 * adv.numel() * adv.element_size()
    copy_s, eager_s = medians[COPY][0], medians[EAGER][0]
    records = []
    for case in cases:
        seconds, calls = medians[case.name]
        records.append({"numel": adv.numel(), "shape": list(shape), "layout": layout,
                        "dtype": str(dtype).replace("torch.", ""), "impl": case.name, "median_us": seconds * 1e6,
                        "calls": calls, "gb_per_s": bytes_moved / seconds / 1e9, "fraction_of_copy": copy_s / seconds,
                        "speedup_vs_eager": eager_s / seconds, "setup_s": case.setup_seconds, "note": case.note})
    return records


def run(device: torch.device, quick: bool) -> SectionResult:
    """bench/run.py's section: float32, the sizes and layouts of SECTION[quick]."""
    config, plan = SECTION[quick], PLANS[quick]
    compiled = compile_eager() if config["compile"] else None
    records = []
    for numel in map(parse_size, config["sizes"]):
        for layout in config["layouts"]:
            records += measure(numel, layout, torch.float32, device, plan, compiled)
    keys = list(dict.fromkeys((r["numel"], r["layout"]) for r in records))
    tables = [detail_table([r for r in records if (r["numel"], r["layout"]) == key]) for key in keys]
    tables.append(summary_table(records, keys))
    return SectionResult(tables, {"rows": records, "plan": vars(plan), **config})


def detail_table(records: list[dict]) -> Table:
    first = records[0]
    return timing_table(f"{first['layout']}, adv {tuple(first['shape'])} {first['dtype']}: {first['numel']:,} elements",
                        records)


def summary_table(records: list[dict], keys: list[tuple[int, str]]) -> Table:
    """One row per implementation, one column per (size, layout): fraction of the copy / speed-up
    over the eager formula; a note per fastnorm backend on issue 5's bar."""
    impls = list(dict.fromkeys(r["impl"] for r in records))
    cell = {(r["impl"], r["numel"], r["layout"]): r for r in records}
    table = Table(f"Summary, {records[0]['dtype']}: fraction of the copy's speed / speed-up over the eager formula",
                  ["implementation"] + [f"{size_name(n)} {layout}" for n, layout in keys])
    for impl in impls:
        table.rows.append([impl] + [f"{cell[impl, n, layout]['fraction_of_copy']:.3g} / "
                                    f"{cell[impl, n, layout]['speedup_vs_eager']:.3g}x"
                                    if (impl, n, layout) in cell else "-" for n, layout in keys])
    for impl in (i for i in impls if i.startswith("fastnorm")):
        misses = [f"{size_name(r['numel'])} {r['layout']}" for r in records if r["impl"] == impl
                  and (r["speedup_vs_eager"] < SPEEDUP_BAR or r["fraction_of_copy"] < COPY_BAR)]
        verdict = f"misses it in {', '.join(misses)}" if misses else "meets it in every column"
        table.notes.append(f"{impl} against the bar of at least {SPEEDUP_BAR:g}x eager and {COPY_BAR:g} of the "
                           f"copy's speed: {verdict}")
    return table


def parse_size(text: str) -> int:
    scale = {"K": 2**10, "M": 2**20}.get(text[-1].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def size_name(numel: int) -> str:
    return f"{numel // 2**20}M" if numel % 2**20 == 0 else f"{numel:,}"


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
          f"torch {torch.__version__}, backends: {fastnorm.backends()}\n")
    plan = Plan(rounds=args.rounds, warmup=2, budget_s=float("inf"))
    compiled = compile_eager() if args.compile else None
    for numel in map(parse_size, args.sizes.split(",")):
        for layout in args.layouts.split(","):
            print(as_text(detail_table(measure(numel, layout, dtype, device, plan, compiled))) + "\n")


if __name__ == "__main__":
    main()
