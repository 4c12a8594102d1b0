"""Accuracy against state size from the MQAR results CSV: a text table and a PNG.

    python -m benchmarks.recall.plot results/recall/results.csv [-o plot.png] [--setup TAG]

One panel per test slice (sequence length, key-value pairs); per model kind, the best accuracy over the
learning rates at each size, against the elements of recurrent state (log scale). Attention's KV cache
is the ceiling: its best accuracy is also drawn as a dashed line across the panel. Without matplotlib
the plot is skipped with a note (the table still prints).
"""
from __future__ import annotations

import argparse
import collections
import csv
import sys

KIND_ORDER = ["gsa", "gla", "abc", "hybrid", "attention"]


def load_rows(csv_path: str) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def best_over_lr(rows: list[dict]) -> dict:
    """``{(seq_len, kv): {kind: [(state_size, accuracy, size_name, lr), ...] sorted by state}}``, the best
    learning rate of each model size."""
    best = {}
    for r in rows:
        key = (int(r["seq_len"]), int(r["num_kv_pairs"]), r["model"], r["run_id"].rsplit("-lr", 1)[0])
        acc = float(r["accuracy"])
        if key not in best or acc > best[key][1]:
            best[key] = (int(r["state_size"]), acc, key[3], r["lr"])
    out = collections.defaultdict(lambda: collections.defaultdict(list))
    for (t, n, kind, _), value in best.items():
        out[(t, n)][kind].append(value)
    for panel in out.values():
        for points in panel.values():
            points.sort()
    return out


def summarize(rows: list[dict]) -> str:
    """A text table: one line per model size, the best accuracy (and its lr) per test slice."""
    if not rows:
        return "(no results)"
    best = best_over_lr(rows)
    slices = sorted(best)
    sizes = {}
    for (t, n), panel in best.items():
        for kind, points in panel.items():
            for state, acc, name, lr in points:
                sizes.setdefault((KIND_ORDER.index(kind) if kind in KIND_ORDER else 99, name), {})[(t, n)] = (state, acc, lr)
    head = f"{'model':<24}" + "".join(f"{f'T={t} kv={n}':>30}" for t, n in slices)
    lines = [head, f"{'':<24}" + "".join(f"{'state / best acc (lr)':>30}" for _ in slices)]
    for (_, name), cells in sorted(sizes.items()):
        line = f"{name:<24}"
        for sl in slices:
            if sl in cells:
                state, acc, lr = cells[sl]
                line += f"{f'{state} / {acc:.3f} ({lr})':>30}"
            else:
                line += f"{'-':>30}"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict], png_path: str) -> bool:
    """Write the accuracy-vs-state plot; False (with a note) when matplotlib is missing or no rows."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[recall] matplotlib is not installed: plot skipped (pip install matplotlib; then "
              "python -m benchmarks.recall.plot <csv>)")
        return False
    if not rows:
        print("[recall] no rows: plot skipped")
        return False
    best = best_over_lr(rows)
    slices = sorted(best)
    fig, axes = plt.subplots(1, len(slices), figsize=(5.2 * len(slices), 4.2), squeeze=False)
    for ax, (t, n) in zip(axes[0], slices):
        panel = best[(t, n)]
        for kind in sorted(panel, key=lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else 99):
            xs, ys = [p[0] for p in panel[kind]], [p[1] for p in panel[kind]]
            style = dict(marker="s", linestyle="--") if kind == "attention" else dict(marker="o")
            ax.plot(xs, ys, label=kind, **style)
            if kind == "attention":
                ax.axhline(max(ys), color=ax.lines[-1].get_color(), linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("recurrent state per sequence (elements, all layers)")
        ax.set_ylabel("MQAR accuracy")
        ax.set_title(f"T={t}, {n} key-value pairs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("MQAR recall vs state size (2-layer models, best lr)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recall.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("csv")
    p.add_argument("-o", "--output", help="PNG path (default: next to the CSV)")
    p.add_argument("--setup", help="keep only the rows of this setup tag (default: all)")
    args = p.parse_args(argv)
    rows = load_rows(args.csv)
    if args.setup:
        rows = [r for r in rows if r["setup"] == args.setup]
    print(summarize(rows))
    import os
    png = args.output or os.path.join(os.path.dirname(os.path.abspath(args.csv)), "mqar_accuracy_vs_state.png")
    if plot(rows, png):
        print(f"[recall] plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
