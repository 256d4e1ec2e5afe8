"""What a benchmark section hands back, and how it is printed: aligned text on the terminal,
markdown for bench/results/*.md and the README."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

NUMBER = re.compile(r"^[-+]?[\d,]*\.?\d+(e[-+]?\d+)?(x|%| s)?$")


@dataclass
class Table:
    """A titled table of already formatted cells; `notes` are printed under it. A `detail`
    table is printed on the terminal but goes after the summaries in the markdown."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    detail: bool = False


@dataclass
class SectionResult:
    """The tables a section prints and the raw records it stores in the results JSON."""

    tables: list[Table]
    records: dict


def timing_table(title: str, records: list[dict]) -> Table:
    """A detail table of timed cases: one row per record (the keys bench/running_norm.py and
    bench/advantages.py store), compile times in the notes."""
    table = Table(title, ["implementation", "median us", "GB/s", "of copy", "vs eager", "calls", "note"], detail=True)
    for r in records:
        table.rows.append([r["impl"], f"{r['median_us']:.1f}", f"{r['gb_per_s']:.3g}", f"{r['fraction_of_copy']:.3g}",
                           f"{r['speedup_vs_eager']:.3g}x", str(r["calls"]), r["note"]])
        if r["setup_s"] is not None:
            table.notes.append(f"{r['impl']}: compiling and the first call took {r['setup_s']:.1f} s (not timed above)")
    return table


def numeric_columns(table: Table) -> list[bool]:
    """Columns whose cells are all numbers (or "-"): right-aligned, the others left-aligned."""
    return [all(NUMBER.match(str(c)) or c == "-" for c in column) and bool(column)
            for column in zip(*table.rows)] if table.rows else [False] * len(table.columns)


def as_text(table: Table) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(table.columns, *table.rows)]
    right = numeric_columns(table)

    def line(cells):
        return "  ".join(str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    header = line(table.columns)
    return "\n".join([table.title, header, "-" * len(header)] + [line(row) for row in table.rows] + table.notes)


def as_markdown(table: Table) -> str:
    out = [f"### {table.title}", "", "| " + " | ".join(table.columns) + " |",
           "|" + "|".join("---:" if r else "---" for r in numeric_columns(table)) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in table.rows]
    if table.notes:
        out += [""] + [f"- {note}" for note in table.notes]
    return "\n".join(out)
