"""A table's rows straight from mbn.results.tables.table_rows, and their Markdown from
mbn.results.render, on hand-built runs of the paper's schedule (no run directories, no configs
composed): a diverged seed counts in n and leaves no interval, a diverged reference seed too, and
Holm's family holds only the cells of at least three pairs. Expected values by hand
(tests/test_stats.py: Student's t with df = 2 in closed form)."""
import statistics

import pytest

from mbn.results.render import render
from mbn.results.runs import Cells
from mbn.results.tables import table_rows
from mbn.sweeps import grids
from tests.test_stats import by_hand, cdf_df2

PAPER = {"bn": {"nin": 7.54, "resnet20": 8.41, "resnet56": 6.97, "vgg16": 6.75}, "brn": {"resnet20": 8.18},
         "mbn": {"resnet20": 7.93, "resnet56": 6.23, "vgg16": 6.43}, "normprop": {"nin": 7.25}}
# (norm, model) -> the test error of seeds 0, 1, ...; None: that seed diverged
ERRORS = {("bn", "resnet20"): [10.0, 10.2, 9.9], ("mbn", "resnet20"): [9.0, 9.3, 9.1],
          ("brn", "resnet20"): [10.4, 10.8, 10.7],
          ("bn", "resnet56"): [7.0, 7.2], ("mbn", "resnet56"): [6.3, 6.6],  # two pairs: no test
          ("bn", "vgg16"): [7.0, 7.5, 7.2], ("mbn", "vgg16"): [6.5, None, 6.8],
          ("bn", "nin"): [8.0, None, 8.1], ("normprop", "nin"): [8.3, 8.1, 8.2]}


def run(seed, err):
    """A run as mbn.results.runs.load_run returns it."""
    summary = {"test_err": err, "train_err": err - 2} if err is not None else {"train_loss": float("nan")}
    return {"name": f"run{seed}", "seed": seed, "status": "diverged" if err is None else "finished",
            "summary": summary, "record": {"perf": {"precision": "fp32"}, "device": "cuda"}, "history": []}


@pytest.fixture(scope="module")
def table():
    grid, cells = grids(200)["table1"], Cells()
    for key, errs in ERRORS.items():
        cells[key] = [run(seed, err) for seed, err in enumerate(errs)]
    rows = table_rows(grid, cells, PAPER)
    return grid, rows, {(r["method"], r["model"]): r for r in rows}


def test_a_diverged_seed_counts_in_n_and_leaves_no_interval(table):
    _, _, rows = table
    survivors = [6.5, 6.8]
    mbn = rows[("mbn", "vgg16")]
    assert (mbn["n"], mbn["diverged"]) == (3, 1)
    assert (mbn["mean"], mbn["std"]) == pytest.approx((statistics.fmean(survivors), statistics.stdev(survivors)))
    assert mbn["delta"] is None and mbn["p_holm"] is None and mbn["verdict"] == "diverged 1/3"
    normprop = rows[("normprop", "nin")]  # its own seeds all finished; the reference's seed 1 diverged
    assert normprop["n"] == 3 and normprop["delta"] is None and normprop["verdict"] == "reference diverged 1/3"


def test_holm_adjusts_over_the_cells_of_at_least_three_pairs_only(table):
    _, _, rows = table
    raw = {}
    for norm in ("mbn", "brn"):
        *_, t = by_hand(dict(enumerate(ERRORS[norm, "resnet20"])), dict(enumerate(ERRORS["bn", "resnet20"])))
        raw[norm] = 2 * (1 - cdf_df2(abs(t)))
        assert rows[(norm, "resnet20")]["p"] == pytest.approx(raw[norm], rel=1e-9)
    low, high = sorted(raw, key=raw.get)  # m = 2
    assert rows[(low, "resnet20")]["p_holm"] == pytest.approx(2 * raw[low], rel=1e-9)
    assert rows[(high, "resnet20")]["p_holm"] == pytest.approx(max(2 * raw[low], raw[high]), rel=1e-9)
    r56 = rows[("mbn", "resnet56")]
    assert r56["delta"]["n"] == 2 and r56["p"] is None and r56["p_holm"] is None
    assert r56["verdict"] == "n = 2 (< 3 pairs)"


def test_the_markdown_of_diverged_cells(table):
    grid, rows, _ = table
    md, _ = render(grid, rows, {}, paper=PAPER)
    cells = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): [c.strip() for c in line.strip("|").split("|")]
             for line in md.splitlines() if line.startswith("| ")}
    survivors = [6.5, 6.8]
    mbn = cells[("mbn", "vgg16")]  # method, model, ours, n, train error, Δ, ..., verdict
    mean, std = statistics.fmean(survivors), statistics.stdev(survivors)
    assert mbn[2] == f"diverged 1/3; the other 2: {mean:.2f} ± {std:.2f}"
    assert mbn[3] == "3" and mbn[5] == "no interval: diverged 1/3" and mbn[-1] == "diverged 1/3"
    normprop = cells[("normprop", "nin")]
    assert normprop[5] == "no interval: the reference diverged 1/3" and normprop[-1] == "reference diverged 1/3"
