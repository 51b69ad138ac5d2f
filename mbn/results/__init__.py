"""Runs -> tables and figures. Every number comes from a run directory's metrics files; every
table says which schedule, seeds, devices, commits and runs produced it. One job per module:

- `stats`: mean ± std over seeds, paired differences with Student-t intervals and p-values,
  Holm's correction, TOST, the verdict;
- `configs`: the config Hydra builds for a cell, a recorded config on today's keys;
- `runs`: reading run directories (damaged ones warned and skipped), indexing them by config,
  finding each cell's runs, what two runs must share to pair, sweep files;
- `tables`: a table's rows — pairs, diverged seeds, verdicts gated by schedule and power;
- `render`: Markdown and CSV;
- `outputs`: atomic writes, and the guard that never replaces a committed output made from other runs."""
from mbn.results.configs import (PAPER, REPO, compose, compose_cached, filled_identity, flat,  # noqa: F401
                                 merge_overrides, steps_per_epoch_at_128)
from mbn.results.outputs import PNG_RUNS_KEY, check_replace, copy_atomic, recorded_runs, tracked, write_atomic  # noqa: F401
from mbn.results.render import render  # noqa: F401
from mbn.results.runs import (_INDEXES, DIVERGED, FINISHED, IN_TABLES, PARTIAL, DamagedFile, RunIndex,  # noqa: F401
                              by_schedule, infer_sweeps, is_synthetic, load_grid, load_run, lookup, pair_mismatch,
                              profile_name, read_json, read_sweep, run_index, schedule_name, seed_of, status_of, warn)
from mbn.results.stats import (curves, holm, mean_std, paired_difference, t_critical, tost_p,  # noqa: F401
                               verdict)
from mbn.results.tables import DEFAULT_MARGIN, provenance, table_rows  # noqa: F401
