"""Convergence curves of the paper's Figures 1 and 2 from the runs' per-epoch metrics.

    python scripts/plot_curves.py --runs runs/e30          # writes results/e30/figure{1,2}.png

Curves are the mean over seeds; the band spans the seeds' min and max."""
import argparse
import os
import textwrap
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mbn.results import REPO, curves, load_grid, provenance  # noqa: E402

COLORS = {"bn": "tab:blue", "brn": "tab:green", "mbn": "tab:red"}


def band(ax, runs, key, color, lw, name, ls="-"):
    epochs, mean, lo, hi = curves(runs, key)
    ax.plot(epochs, mean, color=color, lw=lw, ls=ls, label=name)
    if len(runs) > 1:
        ax.fill_between(epochs, lo, hi, color=color, alpha=0.15, lw=0)


def caption(fig, prov):
    text = (f"{prov['schedule']}; seeds per curve ≤ {prov['seeds asked']}; {', '.join(prov['devices'])}; "
            f"commits {', '.join(prov['commits'])}; overrides: {prov['extra overrides']}")
    fig.text(0.01, 0.005, textwrap.fill(text, int(fig.get_figwidth() * 16)), fontsize=7, va="bottom")


def figure1(cells, grid, prov, path):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (norm, double), runs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if runs:
            band(ax, runs, "test_err", COLORS.get(norm), 2.0 if double else 1.2,
                 f"{norm.upper()}-{2 if double else 1} (n={len(runs)})", "-" if double else "--")
    ax.set(xlabel="epoch", ylabel="test error (%)", title=grid.title)
    ax.grid(alpha=0.3)
    ax.legend()
    caption(fig, prov)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure2(cells, grid, prov, path):
    models = [m for m in grid.rows if any(cells.get((m, n)) for n in grid.cols)] or list(grid.rows)
    fig, axes = plt.subplots(1, len(models), figsize=(max(7, 5 * len(models)), 4.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        for norm in grid.cols:
            runs = cells.get((model, norm)) or []
            if runs:
                band(ax, runs, "train_err", COLORS.get(norm), 0.8, f"{norm.upper()} train")
                band(ax, runs, "test_err", COLORS.get(norm), 2.2, f"{norm.upper()} test (n={len(runs)})")
        ax.set(xlabel="epoch", ylabel="error (%)", title=model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(grid.title)
    caption(fig, prov)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True)
    ap.add_argument("--out", default=None, help="default: results/<basename of --runs>")
    args = ap.parse_args(argv)
    out = args.out or os.path.join(REPO, "results", os.path.basename(os.path.normpath(args.runs)))
    os.makedirs(out, exist_ok=True)
    made = 0
    for name, draw in (("figure1", figure1), ("figure2", figure2)):
        loaded = load_grid(args.runs, name)
        if loaded is None:
            continue
        sweep, grid, cells, runs = loaded
        if not runs:
            print(f"[plot] {name}: no finished runs yet; skipped")
            continue
        path = os.path.join(out, f"{name}.png")
        draw(cells, grid, provenance(runs, sweep), path)
        made += 1
        print(f"[plot] {name}: {len(runs)} runs -> {path}")
    return 0 if made else 1


if __name__ == "__main__":
    sys.exit(main())
