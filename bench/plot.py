"""The benchmark's chart: fraction of the copy's speed per shape and implementation (1 = as fast
as a plain copy of x, the memory floor), one panel per dtype, log scale."""

from __future__ import annotations


def fraction_of_copy(rows: list[dict], path: str, env: dict) -> str:
    """Draws the chart of the running-norm rows to path; returns what was done, for the log."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        return f"plot skipped: {error} (pip install fastnorm[bench])"

    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if not i.startswith("copy")]
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in rows))
    value = {(r["dtype"], r["impl"], tuple(r["shape"])): r["fraction_of_copy"] for r in rows}
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(13, 4.2 * len(dtypes)), squeeze=False)
    width = 0.85 / len(impls)
    colors = plt.get_cmap("tab20").colors
    for ax, dtype in zip(axes[:, 0], dtypes):
        for k, impl in enumerate(impls):
            xs = [i + (k - (len(impls) - 1) / 2) * width for i in range(len(shapes))]
            ys = [value.get((dtype, impl, s), 0.0) for s in shapes]
            ax.bar(xs, ys, width, label=impl, color=colors[k % len(colors)])
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(shapes)), [str(s).replace(" ", "") for s in shapes])
        ax.set_ylabel("fraction of copy speed")
        ax.set_title(f"{dtype}: update + normalize of x (B, A, F), higher is better, 1 = memory floor")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=3, loc="lower left", bbox_to_anchor=(0, 1.12))
    fig.suptitle(f"fastnorm on {env['device_name']} ({env['device']}, {env['threads']} threads), "
                 f"torch {env['torch']}, {env['date']}", y=0.995, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"
