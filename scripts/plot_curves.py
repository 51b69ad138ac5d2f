"""Figures from the runs' metrics: the paper's Figures 1 and 2 (convergence curves) and the
small-batch study (final test error against batch size).

    python scripts/plot_curves.py --runs runs/e30          # writes results/e30/<figure>.png

Curves are the mean over seeds; the band spans the seeds' min and max. Diverged runs draw no
curve; the legend counts them. Damaged runs are named and skipped. Figures of synthetic-data runs
are titled so. A figure committed to git is only replaced by one made from the same runs (each PNG
records its runs in a text chunk), unless --force."""
import os
import statistics
import textwrap
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mbn import UserError  # noqa: E402
from mbn.cli import ArgumentParser, existing_dir, run  # noqa: E402
from mbn.results import (FINISHED, PNG_RUNS_KEY, REPO, DamagedFile, check_replace, curves, is_synthetic,  # noqa: E402
                         load_grid, provenance, seed_of, warn, write_atomic)

COLORS = {"bn": "tab:blue", "brn": "tab:green", "mbn": "tab:red", "cbn": "tab:orange", "mabn": "tab:purple",
          "rbn": "tab:brown", "gn": "tab:gray"}
SYNTHETIC = "SYNTHETIC DATA, not comparable with the paper: "


def finished(runs):
    """The runs that draw curves, and a legend note counting the diverged ones."""
    done = [r for r in runs if r["status"] == FINISHED]
    diverged = len(runs) - len(done)
    return done, (f", {diverged} diverged" if diverged else "")


def band(ax, runs, key, color, lw, name, ls="-"):
    runs, _ = finished(runs)
    drawable = [r for r in runs if r["history"] and all(isinstance(h.get("epoch"), (int, float))
                                                        and isinstance(h.get(key), (int, float)) for h in r["history"])]
    for r in runs:
        if r not in drawable:
            warn(f"{os.path.join(r['dir'], 'metrics.jsonl')}: not every line has 'epoch' and '{key}'; "
                 "its curve is left out")
    if not drawable:
        return
    runs = drawable
    epochs, mean, lo, hi = curves(runs, key)
    ax.plot(epochs, mean, color=color, lw=lw, ls=ls, label=name)
    if len(runs) > 1:
        ax.fill_between(epochs, lo, hi, color=color, alpha=0.15, lw=0)


def caption(fig, prov):
    text = (f"{prov['schedule']}; seeds per curve ≤ {prov['seeds asked']}; {', '.join(prov['devices'])}, "
            f"{'/'.join(prov['precision'])}; commits {', '.join(prov['commits'])}; overrides: {prov['extra overrides']}")
    fig.text(0.01, 0.005, textwrap.fill(text, int(fig.get_figwidth() * 16)), fontsize=7, va="bottom")


def figure1(cells, grid, ax_title):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (norm, double), runs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if runs:
            done, note = finished(runs)
            band(ax, runs, "test_err", COLORS.get(norm), 2.0 if double else 1.2,
                 f"{norm.upper()}-{2 if double else 1} (n={len(done)}{note})", "-" if double else "--")
    ax.set(xlabel="epoch", ylabel="test error (%)", title=ax_title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def figure2(cells, grid, title):
    models = [m for m in grid.rows if any(cells.get((m, n)) for n in grid.cols)] or list(grid.rows)
    fig, axes = plt.subplots(1, len(models), figsize=(max(7, 5 * len(models)), 4.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        for norm in grid.cols:
            runs = cells.get((model, norm)) or []
            if runs:
                done, note = finished(runs)
                band(ax, runs, "train_err", COLORS.get(norm), 0.8, f"{norm.upper()} train")
                band(ax, runs, "test_err", COLORS.get(norm), 2.2, f"{norm.upper()} test (n={len(done)}{note})")
        ax.set(xlabel="epoch", ylabel="error (%)", title=model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def small_batch(cells, grid, title):
    """Final test error against batch size (log x), one line per normalizer (and BN's PreciseBN
    errors, dashed): mean over seeds, band from the seeds' min to max."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for norm in grid.cols:
        pts, diverged = [], 0
        for bs in grid.rows:
            done, _ = finished(cells.get((bs, norm)) or [])
            diverged += len(cells.get((bs, norm)) or []) - len(done)
            vals = [r["summary"].get(grid.metric_of(bs, norm)) for r in done]
            vals = [v for v in vals if isinstance(v, (int, float))]
            if vals:
                pts.append((bs, statistics.fmean(vals), min(vals), max(vals), len(vals)))
        if not pts:
            continue
        xs, mean, lo, hi, ns = zip(*pts)
        source = grid.derived.get(norm, (norm,))[0]
        ax.plot(xs, mean, "o--" if norm in grid.derived else "o-", color=COLORS.get(source), lw=1.8,
                label=f"{norm.upper()} (n ≤ {max(ns)}" + (f", {diverged} diverged)" if diverged else ")"))
        if max(ns) > 1:
            ax.fill_between(xs, lo, hi, color=COLORS.get(norm), alpha=0.15, lw=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(grid.rows), [str(b) for b in grid.rows])
    ax.set(xlabel="batch size", ylabel="final test error (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


FIGURES = {"figure1": figure1, "figure2": figure2, "small_batch_steps": small_batch,
           "small_batch_epochs": small_batch}


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--runs", required=True, help="directory holding the run directories and sweep_*.json")
    ap.add_argument("--out", default=None, help="default: results/<basename of --runs>")
    ap.add_argument("--figures", nargs="+", default=list(FIGURES), choices=list(FIGURES), metavar="FIGURE",
                    help=f"figures to draw (default: all): {' '.join(FIGURES)}")
    ap.add_argument("--force", action="store_true", help="replace committed figures made from other runs")
    args = ap.parse_args(argv)
    existing_dir(args.runs)
    out = args.out or os.path.join(REPO, "results", os.path.basename(os.path.normpath(args.runs)))
    todo, absent = [], []
    for name in args.figures:
        try:
            loaded = load_grid(args.runs, name)
        except DamagedFile as e:
            warn(f"{e}; {name} skipped")
            continue
        if loaded is None:
            absent.append(name)
            continue
        sweep, grid, cells, runs = loaded
        if not any(r["status"] == FINISHED for r in runs):
            print(f"[plot] {name}: no finished runs yet; skipped")
            continue
        path = os.path.join(out, f"{name}.png")
        check_replace(path, runs, args.force)
        todo.append((name, sweep, grid, cells, runs, path))
    if absent:
        print(f"[plot] no sweep file in {args.runs} for {', '.join(absent)}; skipped")
    if not todo:
        raise UserError(f"no figure drawn from {args.runs}: no finished runs of {', '.join(args.figures)} with a "
                        "readable sweep_<figure>.json there (scripts/sweep.py writes them; for runs launched by "
                        "hand, scripts/collect_runs.py)")
    os.makedirs(out, exist_ok=True)
    for name, sweep, grid, cells, runs, path in todo:
        title = (SYNTHETIC if is_synthetic(sweep, runs) else "") + grid.title
        fig = FIGURES[name](cells, grid, textwrap.fill(title, 80))
        caption(fig, provenance(runs, sweep))
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        meta = {PNG_RUNS_KEY: " ".join(sorted(r["name"] for r in runs)), "Title": title}
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120, metadata=meta))
        plt.close(fig)
        print(f"[plot] {name}: {len(runs)} runs (seeds {sorted({seed_of(r) for r in runs})}) -> {path}")
    return 0


if __name__ == "__main__":
    run(main)
