"""What issue 23 asks of the GPU kernels, and how bench/gpu_speed.py shows it: the rows it times,
the column names, the goals (each checked at every row in its scope, one line per goal and
backend: MET, MISSED with the worst shape, or NOT MEASURED with what is missing) and the tables in
the issue's layout."""

from __future__ import annotations

from typing import Optional

from report import Table

MODES = ("updated", "previous")
LOOP_ROWS = [((65536, 8, 64), "float32"), ((65536, 8, 64), "bfloat16"), ((1_000_000, 1, 8), "float32"),
             ((1_000_000, 1, 8), "bfloat16"), ((4_000_000, 1, 8), "float32"), ((4_000_000, 1, 8), "bfloat16"),
             ((4096, 16, 32), "float32"), ((1024, 256, 16), "float32"), ((256, 1024, 8), "float32")]
BEYOND_L2 = {(65536, 8, 64), (1_000_000, 1, 8), (4_000_000, 1, 8)}
L2_FITTING = [(4096, 16, 32), (1024, 256, 16), (256, 1024, 8)]
RL_SIZES = [(64, 4, 8), (4096, 1, 48), (8192, 4, 18)]
SMALL_ROWS = L2_FITTING + RL_SIZES
ADVANTAGE_SIZES = [2**20, 2**24]
COPY, BATCH_NORM, COMPILE, EAGER_FORMULA = "copy", "F.batch_norm", "torch.compile", "eager formula"
GRAPH, EAGER = "graph ", "eager "  # the small rows' column prefixes


def column(backend: str, mode: str = "updated") -> str:
    return backend if mode == "updated" else f"{backend} previous"


def allocating(backend: str) -> str:
    """The loop column of the module call that allocates y (first row only)."""
    return f"{backend}, y allocated"


def with_out(backend: str) -> str:
    """The small rows' eager column of the call into out= (the plain name: the module call)."""
    return f"{backend} out="


def row_label(shape, dtype: str = "float32") -> str:
    return str(tuple(shape)) + ("" if dtype == "float32" else " bf16" if dtype == "bfloat16" else f" {dtype}")


def size_label(numel: int) -> str:
    return f"{numel // 2**20}M" if numel % 2**20 == 0 else f"{numel:,}"


# ---------------------------------------------------------------- goals

def _us(row: dict, col: str) -> tuple[Optional[float], str]:
    cell = row["cells"].get(col) or {"skipped": row.get("error", "not timed")}
    if "us" in cell:
        return cell["us"], ""
    return None, f"{col}: {cell.get('failed') or cell.get('skipped')}"


def _ratio(row: dict, numerator: str, denominator: str) -> tuple[Optional[float], str]:
    """numerator's time over denominator's: "of copy" with numerator the copy."""
    top, why_top = _us(row, numerator)
    bottom, why_bottom = _us(row, denominator)
    if top is None or bottom is None:
        return None, why_top or why_bottom
    return top / bottom, ""


def _verdict(text: str, backend: str, samples: list[tuple[str, Optional[float], str]], bound: float,
             at_least: bool) -> dict:
    """samples: (where, value or None, why not measured). MET when every sample is measured and
    within the bound; MISSED when a measured one is not; NOT MEASURED otherwise."""
    measured = [(where, value) for where, value, _ in samples if value is not None]
    missing = [f"{where} ({why})" for where, value, why in samples if value is None]
    goal = {"goal": text, "backend": backend, "bound": bound, "at_least": at_least, "cells": len(samples),
            "measured": len(measured)}
    if not measured:
        return {**goal, "verdict": "NOT MEASURED", "detail": missing[0] if missing else "no row in scope"}
    where, worst = (min if at_least else max)(measured, key=lambda s: s[1])
    misses = [w for w, v in measured if (v < bound if at_least else v > bound)]
    goal.update(worst=worst, where=where)
    if misses:
        return {**goal, "verdict": "MISSED", "detail": f"worst {worst:.3g} at {where}; {len(misses)} of "
                                                      f"{len(measured)} measured miss: {_listed(misses, ', ')}"}
    if missing:
        return {**goal, "verdict": "NOT MEASURED", "detail": f"worst measured {worst:.3g} at {where}; not measured: "
                                                            f"{_listed(missing, '; ')}"}
    return {**goal, "verdict": "MET", "detail": f"worst {worst:.3g} at {where} ({len(measured)} cells)"}


def _listed(items: list[str], sep: str, most: int = 4) -> str:
    return sep.join(items[:most]) + (f"{sep}..." if len(items) > most else "")


def goals(sections: dict[str, list[dict]], backends: list[str]) -> list[dict]:
    """Every goal of issue 23, for each backend (the first is the native one: cuda on a GPU)."""
    loop, small, adv = sections.get("loop", []), sections.get("small", []), sections.get("advantages", [])
    beyond = [r for r in loop if tuple(r["shape"]) in BEYOND_L2]
    fitting = [r for r in small if tuple(r["shape"]) in L2_FITTING]
    rl = [r for r in small if tuple(r["shape"]) in RL_SIZES]
    native = backends[0]
    out = []
    for b in backends:
        cols = [column(b, mode) for mode in MODES]

        def fraction(rows, col, copy=COPY):
            return [(f"{r['label']} {col}", *_ratio(r, copy, col)) for r in rows]

        out.append(_verdict("beyond the L2, default mode >= 0.6 of the copy", b, fraction(beyond, cols[0]), 0.6, True))
        out.append(_verdict("beyond the L2, previous mode >= 0.85 of the copy", b, fraction(beyond, cols[1]), 0.85,
                            True))
        if b != native:
            out.append(_verdict(f"beyond the L2, {b} >= 0.8x {native}'s throughput", b,
                                [(f"{r['label']} {mode}", *_ratio(r, column(native, mode), column(b, mode)))
                                 for r in beyond for mode in MODES], 0.8, True))
        out.append(_verdict("L2-fitting batches in graph replay >= 0.6 of the copy", b,
                            [s for c in cols for s in fraction(fitting, GRAPH + c, GRAPH + COPY)], 0.6, True))
        out.append(_verdict("RL sizes in graph replay <= 5 us per call", b,
                            [(f"{r['label']} {c}", *_us(r, GRAPH + c)) for r in rl for c in cols], 5.0, False))
        bound = 1.0 if b == native else 2.0
        out.append(_verdict(f"RL sizes, eager module call <= {bound:g}x F.batch_norm's time", b,
                            [(f"{r['label']} {c}", *_ratio(r, EAGER + c, EAGER + BATCH_NORM))
                             for r in rl for c in cols], bound, False))
        for numel, share in zip(ADVANTAGE_SIZES, (0.5, 0.6)):
            rows = [r for r in adv if r["numel"] == numel]
            out.append(_verdict(f"normalize_advantages at {size_label(numel)} >= {share:g} of the copy", b,
                                fraction(rows, b), share, True))
        out.append(_verdict("normalize_advantages >= 3x the eager formula", b,
                            [(f"{r['label']} {b}", *_ratio(r, EAGER_FORMULA, b)) for r in adv], 3.0, True))
        out.append(_verdict("faster than F.batch_norm at every shape (loops; graph replay at small shapes)", b,
                            [(f"{r['label']} {c}", *_ratio(r, BATCH_NORM, c)) for r in loop for c in cols]
                            + [(f"{r['label']} graph {c}", *_ratio(r, GRAPH + BATCH_NORM, GRAPH + c))
                               for r in small for c in cols], 1.0, True))
        compiled = [r for r in loop if "skipped" not in r["cells"].get(COMPILE, {"skipped": ""})]
        out.append(_verdict(f"faster than torch.compile at every shape compiled ({len(compiled)} of {len(loop)})", b,
                            [(f"{r['label']} {c}", *_ratio(r, COMPILE, c)) for r in compiled for c in cols], 1.0,
                            True))
    return out


def goal_line(goal: dict) -> str:
    return f"{goal['verdict']:<12} {goal['goal']} [{goal['backend']}]: {goal['detail']}"


# ---------------------------------------------------------------- tables

def _cell(row: dict, col: str, show) -> str:
    cell = row["cells"].get(col)
    if cell is None:
        return f"failed: {row['error']}" if "error" in row else "-"
    if "failed" in cell:
        return "failed: " + cell["failed"][:90]
    if "skipped" in cell:
        return "-"
    return show(cell)


def _of_copy(row: dict, copy: str = COPY):
    """The cell's "of copy": the copy's time over the cell's."""
    if "us" not in row["cells"].get(copy, {}):
        return lambda cell: "-"
    return lambda cell: _fraction(row["cells"][copy]["us"] / cell["us"])


def _fraction(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def _skip_notes(rows: list[dict]) -> list[str]:
    """One note per reason a cell was skipped, naming its columns."""
    columns = {}
    for r in rows:
        for col, cell in r["cells"].items():
            if "skipped" in cell:
                columns.setdefault(cell["skipped"], {})[col] = None
    return [f"skipped (-): {', '.join(cols)}: {why}" for why, cols in columns.items()]


def loop_table(rows: list[dict], backends: list[str]) -> Table:
    cols = [column(b, m) for b in backends for m in MODES] + [BATCH_NORM, COMPILE]
    table = Table("Loops of calls over inputs rotated through more than twice the L2: the copy's time, then of copy",
                  ["x (B, A, F)", "copy"] + cols)
    for r in rows:
        table.rows.append([f"{r['label']}, {r['mb']:.0f} MB", _cell(r, COPY, lambda c: f"{c['us']:.1f} us")]
                          + [_cell(r, c, _of_copy(r)) for c in cols])
        for name, cell in r["cells"].items():
            if name == COMPILE and "first_call_s" in cell:
                table.notes.append(f"torch.compile at {r['label']}: compiling and the first call took "
                                   f"{cell['first_call_s']:.1f} s (not timed above)")
            if name.endswith("y allocated") and "us" in cell:
                table.notes.append(f"RunningNorm(x) allocating y at {r['label']} ({name}): {_of_copy(r)(cell)} "
                                   f"of copy, {cell['us']:.1f} us")
    table.notes += _skip_notes(rows)
    return table


def small_tables(rows: list[dict], backends: list[str], captured: int) -> list[Table]:
    graph_cols = [COPY] + [column(b, m) for b in backends for m in MODES] + [BATCH_NORM]
    graph = Table(f"L2-fitting and RL sizes, CUDA-graph replay of {captured} captured calls: device us per call "
                  "(of copy)", ["x (B, A, F)"] + graph_cols)
    eager_cols = [COPY, BATCH_NORM] + [c for b in backends for c in (b, with_out(b), column(b, "previous"))]
    eager = Table("The same, eager: us per call in loops of calls (the module call allocates y; out= does not)",
                  ["x (B, A, F)"] + eager_cols)
    for r in rows:
        graph.rows.append([r["label"]] + [_cell(r, GRAPH + c, lambda cell, c=c: f"{cell['us']:.2f}" + (
            "" if c == COPY else f" ({_of_copy(r, GRAPH + COPY)(cell)})")) for c in graph_cols])
        eager.rows.append([r["label"]] + [_cell(r, EAGER + c, lambda cell: f"{cell['us']:.1f}") for c in eager_cols])
    graph.notes += _skip_notes([{"cells": {c[len(GRAPH):]: v for c, v in r["cells"].items() if c.startswith(GRAPH)}}
                                for r in rows])
    eager.notes += _skip_notes([{"cells": {c[len(EAGER):]: v for c, v in r["cells"].items() if c.startswith(EAGER)}}
                                for r in rows])
    return [graph, eager]


def advantages_table(rows: list[dict], backends: list[str]) -> Table:
    table = Table("normalize_advantages (global, float32, out=), loops over rotated inputs: of copy, x eager formula",
                  ["adv elements", "copy", EAGER_FORMULA] + backends)
    for r in rows:
        def both(cell, r=r):
            eager = r["cells"].get(EAGER_FORMULA, {})
            speedup = f", {eager['us'] / cell['us']:.1f}x" if "us" in eager else ""
            return _of_copy(r)(cell) + speedup
        table.rows.append([r["label"], _cell(r, COPY, lambda c: f"{c['us']:.1f} us"),
                           _cell(r, EAGER_FORMULA, lambda c: f"{c['us']:.1f} us")]
                          + [_cell(r, b, both) for b in backends])
    table.notes += _skip_notes(rows)
    return table


def tables(results: dict) -> list[Table]:
    sections, backends = results["sections"], results["environment"]["backends_timed"]
    out = [loop_table(sections.get("loop", []), backends)]
    out += small_tables(sections.get("small", []), backends, results["settings"]["captured"])
    out.append(advantages_table(sections.get("advantages", []), backends))
    if results["settings"]["quick"]:
        for table in out:
            table.notes.append("--quick: every row measured tiny (its measured_shape in the JSON)")
    return out
