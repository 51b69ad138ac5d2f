"""A table as Markdown (a header with its provenance and rules, the rows, the runs it was made from)
and as CSV. Every column and rule is explained in results/README.md, "How to read a table"."""
import csv
import io
import math
from typing import List

from mbn.results.stats import ALPHA, LEVEL, MIN_PAIRS
from mbn.results.tables import DEFAULT_MARGIN, no_verdict_reason
from mbn.sweeps import Grid

OURS = "ours: test error % (mean ± std)"
TRAIN = "train error % (mean ± std)"


def _fmt(x, digits=2):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _mean_std(mean, std):
    return _fmt(mean) + (f" ± {_fmt(std)}" if std is not None else "")


def _fmt_ours(row) -> str:
    if row["n"] == 0:
        return "missing" if not row["runs"] else f"missing ({row['runs']} runs without this metric)"
    if row["diverged"]:
        rest = row["n"] - row["diverged"]
        return f"diverged {row['diverged']}/{row['n']}" + (f"; the other {rest}: {_mean_std(row['mean'], row['std'])}"
                                                           if row["mean"] is not None else "")
    return _mean_std(row["mean"], row["std"])


def _fmt_delta(row) -> str:
    if row["reference"]:
        return "reference"
    d = row["delta"]
    if row["diverged"]:
        text = f"no interval: diverged {row['diverged']}/{row['n']}"
    elif row["ref_diverged"]:
        text = f"no interval: the reference diverged {row['ref_diverged']}/{row['ref_n']}"
    elif d is None:
        text = "—"
    elif d["lo"] is None:
        text = f"{d['mean']:+.2f} (n = 1)"
    elif d["zero_width"]:
        text = f"{d['mean']:+.2f}, zero width: identical differences (n = {d['n']})"
    else:
        text = f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] (n = {d['n']})"
    if row["unpaired"]:
        text += "; not paired: " + "; ".join(f"seed {s} ({why})" for s, why in row["unpaired"].items())
    return text


def _fmt_p(row) -> str:
    if row["p_holm"] is None:
        return "—"
    return f"{row['p_holm']:.3g} ({row['p']:.3g})"


def rule_text(grid: Grid, reason, margin: float = DEFAULT_MARGIN) -> List[str]:
    lines = [f"**Δ vs reference (95% CI)**: reference = {grid.ref_text}. For every seed both cells have whose "
             "runs pair (same data, schedule, precision and device type; runs of one seed share initialization "
             "and data order), this cell's test error minus the reference's; the mean of those differences and "
             f"a two-sided {LEVEL:.0%} Student-t interval. `n = 1`: one pair, no interval; `zero width`: identical "
             "differences, no interval; `not paired`: the seeds left out and what differs. A cell with a diverged "
             "seed (`diverged k/n`) gets no interval over the others. Negative: lower error than the reference."]
    if reason is not None:
        return lines + ["", f"**No paper Δ and no verdicts**: {reason}."]
    if grid.claims == "same":
        rule = (f"the paper claims no difference (its text: \"relatively stable across different memory sizes\"), "
                f"an equivalence claim, judged by two one-sided paired t-tests (TOST) with margin ±{margin:g} "
                f"percentage points (`make_tables.py --margin`): `equivalent` = the Holm-adjusted TOST p < {ALPHA:.2g} "
                f"(for one test: the 90 % interval — not the 95 % one shown — lies inside ±{margin:g} pp); "
                "`not shown equivalent` otherwise")
    else:
        rule = (f"read as the sign of the paper's own difference to the reference, paper Δ. The paired t-test's "
                f"p-value is Holm–Bonferroni adjusted over this table's tested cells; `holds` = adjusted p < "
                f"{ALPHA:.2g} and our difference on the paper's side of 0; `fails` = adjusted p < {ALPHA:.2g} on the "
                "other side; `within noise` = not significant; `underpowered` = not significant and the paper's "
                "|Δ| is below our MDE, so this n and spread could not have seen the paper's effect")
    p_col = "p TOST Holm (raw)" if grid.claims == "same" else "p Holm (raw)"
    return lines + ["", f"**verdict** on the paper's claim, {rule}. A verdict needs n ≥ {MIN_PAIRS} pairs "
                        f"(`n = 1`, `n = 2`: none); `zero-width interval`: none. **MDE**: the minimum detectable "
                        f"effect, the half-width of our {LEVEL:.0%} interval at this n and spread. **{p_col}**: the "
                        "adjusted p-value, the unadjusted one in parentheses. **Multiple comparisons**: Holm–Bonferroni "
                        "over the cells of this table that have a test. **paper Δ in CI**: whether the paper's "
                        "difference lies inside our interval. The paper does not say whether its numbers are "
                        "final- or best-epoch values, nor over how many runs; ours are final-epoch values."]


def render(grid: Grid, rows, prov: dict, note: str = "", synthetic: bool = False, runs: List[dict] = (),
           paper: dict = None, margin: float = DEFAULT_MARGIN):
    """Markdown and CSV of a table."""
    judged = any("verdict" in r for r in rows)
    reason = None if judged else no_verdict_reason(grid, synthetic, paper or {})
    title = grid.title
    if synthetic:
        title = f"SYNTHETIC DATA (not the paper's data; not comparable with its numbers): {title}"
    md = [f"# {title}", "", "Generated by `scripts/make_tables.py` from the run directories; do not edit.", ""]
    md += [f"- {k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in prov.items()]
    mixed = [f"{r[grid.row_label]} × {r[grid.col_label]}: {', '.join(sorted(r['commits'][0]))} (reference: "
             f"{', '.join(sorted(r['commits'][1]))})" for r in rows if r.get("commits")]
    if mixed:
        md.append("- commits differ between paired runs: " + "; ".join(mixed))
    if note:
        md += ["", note]
    md += [""] + rule_text(grid, reason, margin)
    head = [grid.row_label, grid.col_label, OURS, "n"] + ([TRAIN] if grid.train_err else []) + ["Δ vs reference (95% CI)"]
    if judged:
        head += ["MDE", "p TOST Holm (raw)" if grid.claims == "same" else "p Holm (raw)", "paper", "paper Δ",
                 "paper Δ in CI", "verdict"]
    md += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r[grid.row_label], r[grid.col_label], _fmt_ours(r), str(r["n"])]
        if grid.train_err:
            cells.append(_mean_std(r["train_mean"], r["train_std"]))
        cells.append(_fmt_delta(r))
        if judged:
            in_ci = {None: "—", True: "yes", False: "no"}[r["paper_delta_in_ci"]]
            pd = "—" if r["paper_delta"] is None else f"{r['paper_delta']:+.2f}"
            cells += [_fmt(r["mde"]), _fmt_p(r), _fmt(r["paper"]), pd, in_ci, r["verdict"]]
        md.append("| " + " | ".join(cells) + " |")
    if runs:
        md += ["", "## Runs", ""] + [f"- `{name}`" for name in sorted(r["name"] for r in runs)]
    return "\n".join(md) + "\n", _csv(grid, rows, judged)


def _csv(grid: Grid, rows, judged: bool) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    keys = ["mean", "std", "n", "diverged"] + (["train_mean", "train_std"] if grid.train_err else [])
    paper_keys = ["mde", "p", "p_holm", "paper", "diff", "paper_delta", "paper_delta_in_ci", "verdict"]
    w.writerow([grid.row_label, grid.col_label] + keys + ["delta_mean", "delta_lo", "delta_hi", "delta_n", "unpaired"]
               + (paper_keys if judged else []))
    for r in rows:
        d = r["delta"] or {}
        unpaired = "; ".join(f"seed {s}: {why}" for s, why in r["unpaired"].items())
        vals = [r[k] for k in keys] + [d.get("mean"), d.get("lo"), d.get("hi"), d.get("n"), unpaired]
        if judged:
            vals += [r[k] for k in paper_keys]
        w.writerow([r[grid.row_label], r[grid.col_label]] + ["" if v is None else v for v in vals])
    return buf.getvalue()
