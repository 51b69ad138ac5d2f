"""Mutation testing: plant realistic single-line bugs one at a time and check that the tests catch them.

    python scripts/mutants.py                     # every mutant; prints the score and the survivors
    python scripts/mutants.py --list              # the list, and which snippets no longer match (STALE)
    python scripts/mutants.py --only brn_lower_clip step_lr_late
    python scripts/mutants.py --jobs 2            # two mutants at a time (each in its own copy)
    python scripts/mutants.py --only step_lr_late --tests tests/test_schedules.py   # one test's verdict
    python scripts/mutants.py --per-module        # also: each mutant against its file's own tests only
    python scripts/mutants.py --list --per-module # which test files each mutant's file has

Each mutant is (name, file, exact original snippet, replacement, tests, description). By default
the work happens in a scratch copy of the working tree (tracked and untracked, not ignored), so the
checkout and anyone working in it never see a bug; `--in-place` mutates the checkout itself. Either
way the file is restored byte for byte (and its mtime) after each mutant, on Ctrl-C and on errors.

A mutant is KILLED when its tests fail (or time out, or no longer import), SURVIVED when they pass.
A snippet that no longer occurs exactly once is STALE: reported, never silently skipped, so the list
stays honest as the code changes; fix the snippet or drop the mutant. Tests that already fail
without any mutant (checked first, once) are deselected from each mutant's run, and a mutant whose
selection is nothing but such tests is BASELINE-FAIL, not scored.

Two scores. The narrow selection (each mutant's `tests`) says whether some test catches the bug.
`--per-module` also asks whether the mutated file's OWN tests catch it, on their own: its
tests/test_<file>.py and the test files that import it (see TestIndex), not an end-to-end test
that happens to pass through it; a file no test imports scores its mutants UNTESTED. Where the
per-module run already decides the narrow verdict (its first failure is a narrow test, or it
survived a superset of the narrow selection) the narrow run is not repeated.
Not part of CI: a full run takes minutes.
"""
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from queue import Queue
from typing import List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from mbn import UserError  # noqa: E402  (light: the error boundary every script shares)
from mbn.cli import ArgumentParser, run  # noqa: E402


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str          # relative to the repository root
    original: str      # must occur exactly once in the file
    replacement: str
    tests: Tuple[str, ...]  # pytest node ids or files: the narrow selection that should catch it
    description: str


def M(name, file, original, replacement, tests, description):
    return Mutant(name, file, original, replacement, tuple(tests.split()), description)


T_NORMS = "tests/test_norms.py"
T_REG = "tests/test_regressions.py"
T_DF = "tests/test_double_forward.py"
T_SCHED = "tests/test_schedules.py"
T_DATA = "tests/test_data.py"
# a resumed run equals an uninterrupted one: the small ImageNet-path test first, the CIFAR one after
RESUME = ("tests/test_regressions.py::test_resume_continues_the_global_rng_stream "
          "tests/test_train.py::test_interrupted_and_resumed_run_is_bitwise_identical[bn]")

MUTANTS: List[Mutant] = [
    # ------------------------------------------------------------------ normalizers
    M("pooled_variance_correction", "mbn/norms/base.py",
      "var = (w * (variances + (means - mean) ** 2)).sum(0)", "var = (w * variances).sum(0)",
      T_NORMS, "eq. 6 without the (μ_i − μ̂)² term: pooled variance = mean of the group variances"),
    M("batch_var_unbiased", "mbn/norms/base.py",
      "torch.var_mean(x.to(dtype), dim=channel_dims(x), correction=0)",
      "torch.var_mean(x.to(dtype), dim=channel_dims(x))",
      T_NORMS, "normalize with the unbiased batch variance (BN uses the biased one)"),
    M("running_var_biased", "mbn/norms/base.py",
      "var.detach().to(self.running_var.dtype) * (n / (n - 1))", "var.detach().to(self.running_var.dtype)",
      f"{T_REG}::test_running_averages_follow_the_configured_momentum {T_NORMS}",
      "MBN's BN-style running_var tracks the biased variance"),
    M("affine_shift_sign", "mbn/norms/base.py", "bias - mean * scale", "bias + mean * scale",
      T_NORMS, "normalize with x + μ instead of x − μ"),
    M("bn_momentum", "configs/norm/bn.yaml", "momentum: 0.1", "momentum: 0.01",
      f"{T_REG}::test_running_averages_follow_the_configured_momentum",
      "norm=bn ships with momentum 0.01 instead of PyTorch's 0.1"),
    M("bn_records_always", "mbn/norms/bn.py",
      "return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)",
      "return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, self.momentum, "
      "self.eps)",
      f"{T_DF} {T_NORMS}", "BN updates its running averages in forwards that should not record"),
    M("brn_lower_clip", "mbn/norms/brn.py", ".clamp(1 / r_max, r_max)", ".clamp(0, r_max)",
      f"{T_REG}::test_brn_clips_r_to_both_bounds_and_d_to_both_signs {T_NORMS}",
      "BRN clips r to [0, r_max] instead of [1/r_max, r_max]"),
    M("brn_d_clip_one_sided", "mbn/norms/brn.py", ".clamp(-d_max, d_max)", ".clamp(max=d_max)",
      f"{T_REG}::test_brn_clips_r_to_both_bounds_and_d_to_both_signs {T_NORMS}",
      "BRN clips d only from above"),
    M("brn_rd_not_detached", "mbn/norms/brn.py",
      "    with torch.no_grad():\n        r = (std / ref_std)", "    if True:\n        r = (std / ref_std)",
      f"{T_NORMS}::test_brn_no_gradient_through_r_and_d", "BRN backpropagates through r and d"),
    M("brn_running_std_is_var", "mbn/norms/brn.py", "self.running_std.lerp_(std.detach(), self.momentum)",
      "self.running_std.lerp_(var.detach(), self.momentum)", T_NORMS,
      "BRN's moving σ averages the variance instead of the standard deviation"),
    M("brn_momentum", "configs/norm/brn.yaml", "momentum: 0.01 ", "momentum: 0.1 ",
      f"{T_REG}::test_running_averages_follow_the_configured_momentum",
      "norm=brn ships with momentum 0.1 instead of 0.01"),
    M("mbn_decay_off_by_one", "mbn/norms/mbn.py", "torch.pow(self.eta, age.to(self.memory.count.dtype))",
      "torch.pow(self.eta, (age + 1).to(self.memory.count.dtype))", T_NORMS,
      "eq. 8 decay exponent off by one: the newest slot gets λ·η instead of λ"),
    M("mbn_lambda_on_oldest_slot", "mbn/norms/mbn.py", "torch.pow(self.eta, age.to(self.memory.count.dtype))",
      "torch.pow(self.eta, (self.memory_size - 1 - age).to(self.memory.count.dtype))", T_NORMS,
      "eq. 8 read with i counted from the newest: λ goes to the oldest slot"),
    M("mbn_ages_reversed", "mbn/norms/base.py", "torch.remainder(self.head - 1 - self.slots, self.size)",
      "torch.remainder(self.slots - self.head, self.size)", T_NORMS,
      "the ring buffer's ages count from the oldest slot (λ weight on the wrong slot)"),
    M("mbn_current_batch_weight", "mbn/norms/mbn.py", "mem_weights.new_full((1,), float(n))",
      "mem_weights.new_full((1,), 1.0)", T_NORMS,
      "the current batch enters eq. 6 with weight 1 instead of α·n = n"),
    M("mbn_backward_batch_count", "mbn/norms/mbn.py", "ctx.save_for_backward(x, weight, mu, inv_std, weights.sum())",
      "ctx.save_for_backward(x, weight, mu, inv_std, weights[-1])", T_NORMS,
      "MBN's written-out backward divides by the batch size n (BN's) instead of the pooled weight W"),
    M("mbn_inference_newest_weighted", "mbn/norms/mbn.py",
      "alpha = torch.where(age == 0, torch.ones_like(mem.count), self.alpha((age - 1).clamp(min=0)))",
      "alpha = self.alpha(age)", T_NORMS,
      "inference weighs the newest recorded batch with λ instead of treating it as the current batch"),
    M("mbn_records_always", "mbn/norms/mbn.py", "            if self.record:\n                self.push(mean, var, n)",
      "            if True:\n                self.push(mean, var, n)", f"{T_NORMS} {T_DF}",
      "MBN records in forwards that should not"),
    M("memory_fills_past_size", "mbn/norms/base.py", "self.filled.copy_((self.filled + 1).clamp(max=self.size))",
      "self.filled.copy_(self.filled + 1)", T_NORMS, "the memory's fill count grows past its size"),
    # ------------------------------------------------------------------ double forward
    M("second_forward_before_step", "mbn/step.py",
      "        loss.sum().backward()\n        self.optimizer.step()\n",
      "        loss.sum().backward()\n        if self.double_forward:\n"
      "            with torch.no_grad(), recording(self.model, True):\n"
      "                self.forward(x)\n        self.optimizer.step()\n",
      T_DF, "double forward records before the SGD step (statistics of the old weights)"),
    M("recording_flag_inverted", "mbn/step.py", "recording(self.model, not self.double_forward)",
      "recording(self.model, self.double_forward)",
      f"{T_DF} tests/test_step.py::test_graph_style_step_equals_the_plain_step_in_float64",
      "the training forward records under double forward and not under single forward"),
    M("second_forward_records_nothing", "mbn/step.py", "with torch.no_grad(), recording(self.model, True)",
      "with torch.no_grad(), recording(self.model, False)", T_DF, "the second forward does not record"),
    # ------------------------------------------------------------------ schedules
    M("step_lr_late", "mbn/schedules.py", "gamma ** sum(progress >= m for m in milestones)",
      "gamma ** sum(progress > m for m in milestones)", T_SCHED,
      "the lr drops one step late at a milestone"),
    M("piecewise_late", "mbn/schedules.py", "i = sum(progress >= m for m in milestones)",
      "i = sum(progress > m for m in milestones)", T_SCHED, "λ switches one step late at a milestone"),
    M("progress_off_by_one", "mbn/engine.py", "self.scheduled, step / self.total_steps)",
      "self.scheduled, (step + 1) / self.total_steps)",
      f"{T_SCHED}::test_training_logs_the_new_lr_and_lambda_from_the_milestone_step_on",
      "the loop computes progress after the step: every schedule switches one step early"),
    M("brn_ramp_inverted", "mbn/schedules.py", "if progress <= start:\n        return v0",
      "if progress <= start:\n        return v1", f"{T_SCHED} {T_NORMS}::test_brn_relaxation_schedule",
      "BRN's r_max/d_max start relaxed instead of at (1, 0)"),
    # ------------------------------------------------------------------ data
    M("crop_pad_2", "mbn/data.py", "world: int = 1, pad: int = 4):", "world: int = 1, pad: int = 2):",
      f"{T_REG}::test_loader_crops_from_a_4_pixel_zero_padding_and_flips",
      "the CIFAR loader pads crops by 2 instead of 4"),
    M("flip_never", "mbn/data.py", "flip = torch.rand(n, 1, generator=generator, device=device) < 0.5",
      "flip = torch.rand(n, 1, generator=generator, device=device) < 0.0",
      f"{T_DATA} {T_REG}::test_loader_crops_from_a_4_pixel_zero_padding_and_flips",
      "horizontal flip never applied"),
    M("crop_one_sided", "mbn/data.py", "left = torch.randint(0, 2 * pad + 1,", "left = torch.randint(0, pad + 1,",
      f"{T_DATA} {T_REG}::test_loader_crops_from_a_4_pixel_zero_padding_and_flips",
      "crops only ever shift to one side horizontally"),
    M("normalize_by_variance", "mbn/data.py", "return x.mean((0, 2, 3)), x.std((0, 2, 3), correction=0)",
      "return x.mean((0, 2, 3)), x.var((0, 2, 3), correction=0)",
      f"{T_REG}::test_loader_normalizes_with_the_training_sets_channel_statistics",
      "inputs divided by the channel variance instead of the standard deviation"),
    M("normalize_with_test_stats", "mbn/data.py", "mean, std = channel_stats(train.images)",
      "mean, std = channel_stats(test.images)",
      f"{T_REG}::test_loader_normalizes_with_the_training_sets_channel_statistics",
      "normalization statistics taken from the test set"),
    # ------------------------------------------------------------------ checkpoints and resume
    M("optimizer_not_restored", "mbn/engine.py", '        optimizer.load_state_dict(state["optimizer"])\n', "",
      RESUME, "resume starts SGD momentum from zero"),
    M("rng_not_restored", "mbn/engine.py",
      '        set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])\n', "",
      f"{T_REG}::test_resume_continues_the_global_rng_stream", "resume skips restoring the global RNG state"),
    M("torch_rng_not_restored", "mbn/checkpoint.py", '    torch.set_rng_state(state["torch"])\n', "",
      f"{T_REG}::test_rng_state_round_trip_continues_every_global_stream",
      "set_rng_state restores python's and numpy's generators but not torch's"),
    M("checkpoint_epoch_off_by_one", "mbn/engine.py", '"epoch": epoch + 1, "step": step, "rng": rngs,',
      '"epoch": epoch, "step": step, "rng": rngs,', RESUME,
      "the checkpoint records the epoch it is in, not the one done"),
    # ------------------------------------------------------------------ run ids and tables
    M("run_id_ignores_norm", "mbn/naming.py", "hashlib.sha1(json.dumps(d, sort_keys=True).encode())",
      'hashlib.sha1(json.dumps({k: v for k, v in d.items() if k != "norm"}, sort_keys=True).encode())',
      f"{T_REG}::test_run_id_changes_with_what_the_run_computes",
      "the run id's hash ignores the normalizer's settings"),
    M("run_free_prefix", "mbn/naming.py", 'key == f or key.startswith(f + ".")', "key.startswith(f)",
      f"{T_REG}::test_run_changing_matches_whole_key_components",
      "a RUN_FREE entry also frees every key that merely starts with its letters"),
    M("run_free_misses_progress", "mbn/naming.py", '"train.progress", ', "",
      f"{T_REG}::test_run_id_ignores_run_free_settings", "train.progress changes the run id"),
    M("population_std", "mbn/results/stats.py", "statistics.stdev(values)", "statistics.pstdev(values)",
      f"{T_REG}::test_mean_std_is_the_sample_statistics {T_REG}::test_table_cells_are_mean_and_sample_std_over_seeds",
      "tables report the population std (n) instead of the sample std (n − 1)"),
    M("median_over_seeds", "mbn/results/stats.py", "return statistics.fmean(values), (",
      "return statistics.median(values), (",
      f"{T_REG}::test_mean_std_is_the_sample_statistics {T_REG}::test_table_cells_are_mean_and_sample_std_over_seeds",
      "tables report the median over seeds instead of the mean"),
]

# ---------------------------------------------------------------------------------------------
# TO BE ADDED by the engineers writing them (the lead): mutants of the new normalizers (CBN,
# MABN, RBN, GN) and of the graph-replay step (mbn/step.py `Replay`, `TrainStep`), e.g. CBN's
# Taylor compensation dropped, MABN's SMA window off by one, RBN's running-mean update sign, GN's
# group reshape over the wrong axis, a replayed step whose key ignores the lr. Append them here
# in the same form; a GPU-only behaviour needs a test that runs on a CPU (the eager body) or is
# marked as such.
NEW_NORMALIZER_MUTANTS: List[Mutant] = [
    M("cbn_var_guard_off", "mbn/norms/cbn.py", "v = v.clamp(min=0)  # max(ν̃, μ̃²)", "v = v",
      "tests/test_cbn.py", "CBN without the paper's max(ν̃, μ̃²) guard"),
    M("cbn_no_taylor_quadratic", "mbn/norms/cbn.py", "return mem.mean + dmu, mem.var + dvar - dmu * dmu",
      "return mem.mean + dmu, mem.var + dvar", "tests/test_cbn.py",
      "CBN's compensated variance forgets the −(ρ⟨Dμ,ΔW⟩)² term"),
    M("cbn_pool_without_correction", "mbn/norms/cbn.py",
      "var_bar = (w * (variances + (means - mean_bar) ** 2)).sum(0) / total",
      "var_bar = (w * variances).sum(0) / total", "tests/test_cbn.py",
      "CBN pools the window's variances without the mean-difference term"),
    M("mabn_sma_off", "mbn/norms/mabn.py", "v = torch.where(use_batch, q, ring.mean(0))",
      "v = torch.where(use_batch, q, q)", "tests/test_mabn.py", "MABN never uses the SMA of ⟨x²⟩"),
    M("mabn_renorm_upper_clip_only", "mbn/norms/mabn.py", ".clamp(1 / self.r_max, self.r_max)",
      ".clamp(max=self.r_max)", "tests/test_mabn.py", "MABN clips r only from above"),
    M("mabn_ema_weight_swapped", "mbn/norms/mabn.py", "torch.lerp(self.running_sq, v, 1 - self.momentum)",
      "torch.lerp(self.running_sq, v, self.momentum)", "tests/test_mabn.py",
      "MABN's EMA weights the new value with α instead of 1 − α"),
    M("rbn_gamma_full_lr", "mbn/norms/rbn.py", '"lr_scale": 1.0 / c.gamma_lr_div', '"lr_scale": 1.0',
      "tests/test_rbn.py", "Revisiting-BN trains γ at the full lr"),
    M("rbn_decay_on_biases", "mbn/norms/rbn.py",
      '{"name": "no_decay", "params": others, "lr_scale": 1.0, "weight_decay": wd}',
      '{"name": "no_decay", "params": others, "lr_scale": 1.0}', "tests/test_rbn.py",
      "Revisiting-BN decays β and biases"),
    M("gn_smallest_divisor", "mbn/norms/gn.py",
      "return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)",
      "return min(g for g in range(2, min(groups, channels) + 1) if channels % g == 0)", "tests/test_gn.py",
      "GroupNorm takes the smallest divisor instead of the largest ≤ 32"),
    M("mbn_lambda_zero_infers_from_memory", "mbn/norms/mbn.py",
      'is_bn = newest_weight == "lam" and not any(lam_values)', "is_bn = False", "tests/test_norms.py",
      "MBN with λ = 0 throughout infers from its memory, not like BN"),
    M("mbn_newest_weight_one_ignored", "mbn/norms/mbn.py", 'if self.newest_weight == "one":', "if False:",
      "tests/test_norms.py", "norm.newest_weight=one weighs the newest slot with λ"),
    M("precise_raw_second_moment", "mbn/norms/base.py", "self.load_population_stats(mean, s[1] / s[2] - mean * mean)",
      "self.load_population_stats(mean, s[1] / s[2])", "tests/test_norms.py",
      "PreciseBN writes E[x²] instead of the variance"),
    M("normprop_filter_lengths_not_set", "mbn/norms/normprop.py", "residual_ok=False, wrap_model=init_filter_lengths)",
      "residual_ok=False)", "tests/test_normprop.py",
      "NormProp's filters keep their He-init lengths (the direction's step size at lr 0.1 diverges)"),
    M("nin_classifier_he_init", "models/nin.py", "for m in self.features[:-1].modules():", "for m in self.modules():",
      "tests/test_normprop.py::test_nin_normprop_trains_at_the_default_lr",
      "NIN's classifier gets fan-out He init (logits of std ~3 at init)"),
]
T_STEP = "tests/test_step.py"
GRAPH_REPLAY_MUTANTS: List[Mutant] = [
    M("step_no_zero_grad", "mbn/step.py", "        self.optimizer.zero_grad(set_to_none=True)\n", "",
      f"{T_STEP}::test_graph_style_step_equals_the_plain_step_in_float64", "gradients accumulate across steps"),
    M("step_errors_after_record_pass", "mbn/step.py", "        self.errors += errors\n", "",
      f"{T_STEP}::test_graph_style_step_equals_the_plain_step_in_float64", "the step forgets the error count"),
    M("plan_cursor_not_advanced", "mbn/data.py", "        self.cursor.add_(1)\n", "",
      f"{T_STEP}::test_graph_style_step_equals_the_plain_step_in_float64 {T_DATA}",
      "every step of an epoch trains on its first batch"),
    M("eval_padding_counted", "mbn/step.py", "v = valid.double()", "v = torch.ones_like(valid, dtype=torch.double)",
      f"{T_STEP}::test_evaluator_masks_the_padded_last_batch", "the padded evaluation samples are counted"),
    M("lr_not_in_capture_key", "mbn/step.py", 'self.replay(key=tuple(g["lr"] for g in self.optimizer.param_groups))',
      "self.replay(key=None)", "tests/test_step.py::test_replay_recaptures_when_the_lr_changes",
      "a captured step keeps the lr it was captured with"),
    M("time_limit_ignored", "mbn/engine.py", "if limit and elapsed + 1.2 * epoch_wall > limit:",
      "if False:", f"{T_STEP}::test_time_limit_stops_at_an_epoch_boundary_and_resumes_bitwise",
      "train.time_limit never stops a run"),
    M("preempt_signal_ignored", "mbn/engine.py", "    if preempt.requested():\n", "    if False:\n",
      "tests/test_preempt.py::test_signal_stops_at_an_epoch_boundary_requeues_and_resumes_bitwise",
      "SLURM's time-limit signal does not stop the run at the next epoch boundary"),
    M("preempt_no_watchdog", "mbn/preempt.py", "    _state.received.wait()\n", "    return\n",
      "tests/test_preempt.py::test_epoch_longer_than_the_grace_is_requeued_at_once_from_the_last_checkpoint",
      "an epoch longer than SLURM's grace period is killed at the time limit and never requeued"),
    M("stacked_losses_averaged", "mbn/stacked.py", 'reduction="none").mean(0)', 'reduction="none").mean(0) / y.size(1)',
      "tests/test_stacked.py", "stacked seeds train on the mean of their losses (each model's gradient / K)"),
]
# issue 20: bugs in the code changed since the last harness run (the graph step, stacked seeds,
# preemption, the seed normalizers; not CBN or NormProp, being rewritten), and the two patterns a
# held-out set found unchecked: a value computed but never compared (top-5), and a leak that
# changes no number (a step's graph kept alive by an accumulator)
T_VALUES, T_LEAKS, T_PRE, T_STACK = "tests/test_values.py", "tests/test_leaks.py", "tests/test_preempt.py", \
    "tests/test_stacked.py"
ISSUE20_MUTANTS: List[Mutant] = [
    M("eval_top5_any_differs", "mbn/step.py", "wrong5 = (top != y[:, None]).all(1)",
      "wrong5 = (top != y[:, None]).any(1)", T_VALUES,
      "a sample counts as top-5 wrong when any of its top five differs from the label"),
    M("step_loss_sum_keeps_graph", "mbn/step.py", "mean_loss = loss.detach().double()", "mean_loss = loss.double()",
      T_LEAKS, "the loss sum accumulates without detach: each step's autograd graph stays alive"),
    M("eval_top5_of_three_classes", "mbn/step.py", "top = out.topk(min(5, out.size(1)), dim=1).indices",
      "top = out.topk(5, dim=1).indices", T_VALUES, "top-5 asks for five classes of a problem with fewer"),
    M("eval_loss_batch_mean", "mbn/step.py", 'loss = F.cross_entropy(out.float(), y, reduction="none")',
      "loss = F.cross_entropy(out.float(), y)", T_VALUES,
      "the test loss takes each batch's mean over its padded samples too"),
    M("eval_sums_not_reset", "mbn/step.py", "        self.sums.zero_()\n", "", T_VALUES,
      "each evaluation adds to the previous one's sums"),
    M("eval_divides_by_padded_count", "mbn/step.py", "n = self.batches.num_samples",
      "n = len(self.batches) * self.batches.batch_size", T_VALUES,
      "test loss and errors are divided by the padded sample count"),
    M("step_errors_argmax_dim1", "mbn/step.py", "errors = (out.detach().argmax(-1) != y).sum(0)",
      "errors = (out.detach().argmax(1) != y).sum(0)", T_STACK,
      "the step's error count takes the argmax over dim 1 (the model axis of stacked outputs)"),
    M("step_loss_not_times_batch", "mbn/step.py", "self.loss_sum += mean_loss * y.size(0)",
      "self.loss_sum += mean_loss", T_VALUES, "the loss sum adds batch means, then is divided by the sample count"),
    M("replay_no_eager_call_after_key_change", "mbn/step.py",
      "self.eager_left = self.warmup if self.eager_left is None else 1",
      "self.eager_left = self.warmup if self.eager_left is None else 0",
      "tests/test_step.py::test_replay_recaptures_when_the_lr_changes",
      "a new lr is captured at once, without the eager call a recompilation may need"),
    M("replay_keeps_the_old_capture", "mbn/step.py", "self.key, self.graph = key, None", "self.key = key",
      "tests/test_step.py::test_replay_recaptures_when_the_lr_changes",
      "after an lr change the old capture (with the old lr) is replayed"),
    M("stacked_shortcut_pads_one_side", "mbn/stacked.py",
      "(0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2)", "(0, 0, 0, 0, 0, self.extra)", T_STACK,
      "the stacked option-A shortcut pads each model's new channels on one side only"),
    M("stacked_linear_bias_transposed", "mbn/stacked.py", "y = y + self.bias.view(self.k, self.out_features)",
      "y = y + self.bias.view(self.out_features, self.k).t()", T_STACK,
      "StackedLinear hands the K models' biases out in the wrong order"),
    M("unstack_offset_not_scaled", "mbn/stacked.py", "out[key] = value.detach().narrow(dim, k * n, n).clone()",
      "out[key] = value.detach().narrow(dim, k, n).clone()", T_STACK,
      "unstack reads model k's slice at offset k instead of k·n"),
    M("stacked_conv_not_grouped", "mbn/stacked.py", "groups=k * c.groups, bias=c.bias is not None",
      "groups=c.groups, bias=c.bias is not None", T_STACK,
      "the stacked convolution is not grouped per model"),
    M("preempt_no_requeue_margin", "mbn/preempt.py", "return grace - min(30.0, grace / 4)", "return grace",
      f"{T_PRE}::test_watchdog_gives_up_a_quarter_of_the_grace_early_at_most_30_s",
      "the watchdog waits the whole grace period, leaving no time for the requeue"),
    M("preempt_other_ranks_requeue", "mbn/preempt.py", "    if not lead():\n        # exit 0",
      "    if False:\n        # exit 0", f"{T_PRE}::test_only_rank_0_requeues_the_others_exit_0",
      "every DDP rank requeues the job"),
    M("preempt_later_signal_resets_the_clock", "mbn/preempt.py", "if _state.received_at is None:", "if True:",
      f"{T_PRE}::test_the_grace_period_counts_from_the_first_signal",
      "a repeated signal restarts the watchdog's clock"),
    M("preempt_watchdog_requeues_a_finished_run", "mbn/preempt.py", "if _finished() or not _claim():",
      "if not _claim():", f"{T_PRE}::test_watchdog_leaves_a_finished_run_alone",
      "the watchdog requeues a run that finished while it waited"),
    M("mabn_centre_per_input_channel", "mbn/norms/mabn.py", "w = w - w.mean(dim=(1, 2, 3), keepdim=True)",
      "w = w - w.mean(dim=(2, 3), keepdim=True)", "tests/test_mabn.py",
      "weight centralisation subtracts each input channel's mean instead of the filter's"),
    M("mabn_warmup_one_step_short", "mbn/norms/mabn.py",
      "use_batch = (t <= self.buffer_size) | (t < self.warmup_iters)",
      "use_batch = (t < self.buffer_size) | (t < self.warmup_iters)", "tests/test_mabn.py",
      "MABN switches to the SMA one step before its ring holds S batches"),
    M("mabn_psi_sma_without_current", "mbn/norms/mabn.py",
      "psi_bar = torch.where(use_batch, batch_psi, psi.mean(0))",
      "psi_bar = torch.where(use_batch, batch_psi, psi_ring.mean(0))", "tests/test_mabn.py",
      "MABN's backward averages Ψ over the ring without the current batch's"),
    M("rbn_gamma_init_ignored", "mbn/norms/rbn.py", "self.weight.fill_(gamma_init)", "self.weight.fill_(1.0)",
      "tests/test_rbn.py", "Revisiting-BN's γ starts at 1, not at gamma_init"),
    M("rbn_input_bn_without_sigma_act", "mbn/norms/rbn.py", "gamma_init=c.gamma_init * c.sigma_act",
      "gamma_init=c.gamma_init", "tests/test_rbn.py", "the input BN's γ is γ₀ instead of γ₀·σ_act"),
    M("rbn_input_bias_trained", "mbn/norms/rbn.py", "    input_bn.bias.requires_grad_(False)\n", "",
      "tests/test_rbn.py", "the input BN's β is trained (the paper fixes it at 0)"),
    M("gn_groups_key_ignored", "mbn/norms/gn.py", "self.num_groups = num_groups(num_features, int(groups))",
      "self.num_groups = num_groups(num_features, 32)", "tests/test_gn.py", "norm.groups is ignored (always 32)"),
]
# issue 20, phase 2: bugs in the code this session added since (the results package and its scripts,
# declared constraints, run-dir locks, divergence on both losses, per-step curves, the W&B
# fallback, the plan and `next`, the compile cache, NormProp's arpit2016 recipe, CBN's official
# running variance)
T_STATS, T_TAB, T_VERD, T_RES, T_RUNDIR, T_PLAN, T_SWEEPS, T_EP, T_ERR = (
    "tests/test_stats.py", "tests/test_tables.py", "tests/test_verdicts.py", "tests/test_results.py",
    "tests/test_rundir.py", "tests/test_plan.py", "tests/test_sweeps.py", "tests/test_entry_points.py",
    "tests/test_errors.py")
SESSION_MUTANTS: List[Mutant] = [
    # ------------------------------------------------------------------ results: statistics, tables
    M("holm_not_monotone", "mbn/results/stats.py", "running = max(running, min(1.0, (len(order) - i) * p[key]))",
      "running = min(1.0, (len(order) - i) * p[key])", f"{T_STATS}::test_holm_adjusted_p_values_by_hand",
      "Holm without the step that keeps the adjusted p-values non-decreasing"),
    M("tost_two_sided", "mbn/results/stats.py", "return float(max(st.t.sf((mean + margin) / se, n - 1),",
      "return float(2 * max(st.t.sf((mean + margin) / se, n - 1),",
      f"{T_STATS}::test_tost_by_hand_and_against_the_90_percent_interval",
      "TOST doubles its one-sided p-value as a two-sided test would (equivalence shown at α/2)"),
    M("mde_normal_quantile", "mbn/results/stats.py", "half = t_critical(n - 1, level) * sd / math.sqrt(n)",
      "half = float(st.norm.ppf(0.5 + level / 2)) * sd / math.sqrt(n)",
      f"{T_STATS}::test_paired_t_test_p_value_and_interval_against_closed_forms",
      "the interval and the MDE from the normal quantile (1.96) instead of Student's t"),
    M("p_at_alpha_significant", "mbn/results/stats.py", "p_adjusted is not None and p_adjusted < ALPHA",
      "p_adjusted is not None and p_adjusted <= ALPHA", f"{T_STATS}::test_verdict_rules",
      "an adjusted p-value equal to α counts as significant"),
    M("zero_width_only_exact", "mbn/results/stats.py", "if sd < ZERO_WIDTH:", "if sd == 0:",
      f"{T_STATS}::test_differences_equal_up_to_float_noise_give_a_zero_width_interval",
      "differences identical up to float noise get an interval of width 1e-15 and a verdict"),
    M("diverged_seed_not_counted", "mbn/results/tables.py", '"n": len(values) + diverged,', '"n": len(values),',
      f"{T_TAB}::test_a_diverged_seed_counts_in_n_and_leaves_no_interval",
      "a diverged seed is silently dropped from n"),
    M("two_pairs_tested", "mbn/results/tables.py", 'd is not None and d["n"] >= MIN_PAIRS and not d["zero_width"]',
      'd is not None and d["n"] >= 2 and not d["zero_width"]',
      f"{T_TAB}::test_holm_adjusts_over_the_cells_of_at_least_three_pairs_only",
      "a cell of two pairs enters Holm's family (m grows: every other cell's adjusted p rises)"),
    M("pairing_ignores_precision", "mbn/results/runs.py",
      '            "precision": (run["record"].get("perf") or {}).get("precision", "unknown"),\n', "",
      f"{T_VERD}::test_zero_width_diverged_and_unpaired_cells", "a bf16 run pairs with an fp32 run of the same seed"),
    M("non_finite_test_loss_finished", "mbn/results/runs.py", 'for k in ("train_loss", "test_loss",',
      'for k in ("train_loss",', f"{T_VERD}::test_a_run_is_diverged_when_metrics_json_says_so_or_a_loss_is_not_finite",
      "a run recorded before divergence was judged on the test loss counts as finished with a NaN test loss"),
    M("diverged_rest_counts_all", "mbn/results/render.py", 'rest = row["n"] - row["diverged"]', 'rest = row["n"]',
      f"{T_TAB}::test_the_markdown_of_diverged_cells",
      "'diverged 1/3; the other 3' (the survivors' count includes the diverged seed)"),
    M("margin_not_passed_to_tests", "scripts/make_tables.py",
      "synthetic=synthetic, margin=args.margin)\n        md, csv_text", "synthetic=synthetic)\n        md, csv_text",
      f"{T_VERD}::test_table6_equivalence_by_tost", "--margin changes the rule's text but not the TOST"),
    M("outputs_replaced_by_more_runs", "mbn/results/outputs.py", "    if before == now:\n        return\n",
      "    if before is not None and before <= now:\n        return\n",
      f"{T_RES}::test_committed_outputs_are_replaced_only_from_the_same_runs",
      "a committed table is replaced without --force by one made from more runs (new runs change it silently)"),
    M("collect_leaves_diverged", "scripts/collect_runs.py",
      'runs = [r for r in found if r and r["status"] in IN_TABLES]',
      'runs = [r for r in found if r and r["status"] == "finished"]',
      f"{T_VERD}::test_collect_copies_diverged_runs_and_leaves_unfinished_ones",
      "diverged runs are not collected: the committed tables lose their `diverged k/n`"),
    M("diverged_runs_drawn", "scripts/plot_curves.py", 'done = [r for r in runs if r["status"] == FINISHED]',
      "done = list(runs)", f"{T_VERD}::test_a_figure_draws_finished_runs_only_and_counts_the_diverged",
      "diverged runs draw curves and the legend counts none"),
    M("batch_8_outside_the_rule", "mbn/sweeps.py", "for bs in SMALL_BATCHES if bs < PAPER_SMALLEST_BATCH}",
      "for bs in SMALL_BATCHES if bs <= PAPER_SMALLEST_BATCH}", f"{T_RES}::test_small_batch_grids",
      "batch 8, the paper's smallest, is labelled as outside its rule"),
    # ------------------------------------------------------------------ constraints, entry points, run dirs
    M("range_high_open_ignored", "mbn/validate.py", "(v < self.high if self.high_open else v <= self.high)",
      "v <= self.high", "tests/test_constraints.py::test_range_bounds_open_and_closed_by_hand",
      "an open upper bound admits the bound itself (seed=2147483648)"),
    M("epochs_he2016", "mbn/config.py", "epochs: int = key(200,", "epochs: int = key(164,",
      "tests/test_config.py", "the default schedule is He et al.'s 164 epochs (64k steps), not the paper's 200"),
    M("num_classes_unchecked", "mbn/config.py",
      'num_classes: int = key(10, "the number of classes", count, Matches("data.name", CIFAR_CLASSES))',
      'num_classes: int = key(10, "the number of classes", count)',
      "tests/test_constraints.py::test_train_py_refuses_in_one_line_and_creates_nothing",
      "data.num_classes=5 with CIFAR-10 is accepted (a 5-way classifier on 10 labels)"),
    M("refused_run_dir_left", "train.py",
      "            discard_unstarted(run_dir, multirun)  # e.g. a normalizer's own check of its hyper-parameters\n",
      "",
      f"{T_ERR}::test_a_run_refused_inside_fit_leaves_no_run_dir",
      "a run refused inside fit (NormProp on a ResNet) leaves its empty run dir behind"),
    M("eval_run_dir_and_ckpt", "eval.py", "if (cfg.run_dir is None) == (cfg.ckpt is None):",
      "if cfg.run_dir is None and cfg.ckpt is None:", f"{T_EP}::test_eval_py_takes_run_dir_or_ckpt_not_both",
      "eval.py takes run_dir and ckpt together (ckpt silently wins)"),
    M("read_only_disk_is_a_usage_error", "mbn/cli.py",
      "cls = UserError if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST) else EnvironmentFault",
      "cls = EnvironmentFault if e.errno in (errno.EACCES, errno.EPERM) else UserError",
      f"{T_EP}::test_a_run_dir_on_a_read_only_filesystem_is_one_line",
      "only permission errors are the machine's: a read-only or full disk exits 2 as a mistake in the command"),
    M("unreadable_root_is_missing", "mbn/data.py", "    except FileNotFoundError:\n        return False\n",
      "    except OSError:\n        return False\n", f"{T_EP}::test_an_unreadable_data_root_is_not_reported_missing",
      "a data.root this user may not read is reported as not found"),
    M("lock_always_stale", "mbn/rundir.py",
      'return holder.get("start") is not None and start is not None and start != holder["start"]', "return True",
      f"{T_RUNDIR}::test_a_second_run_into_a_locked_run_dir_is_refused",
      "the lock of a live process is taken over as stale"),
    M("finished_needs_status", "mbn/rundir.py",
      'not (summary.get("status") == "finished" or summary.get("finished") is True)',
      'summary.get("status") != "finished"',
      f"{T_RUNDIR}::test_a_committed_run_from_older_code_is_recognised_as_finished",
      "a run recorded before `status` existed (finished: true) is trained again"),
    M("test_loss_not_judged", "mbn/engine.py",
      'losses = agreed({"train_loss": train_loss, **({"test_loss": test["loss"]} if lead else {})}, world)',
      'losses = agreed({"train_loss": train_loss}, world)',
      f"{T_RUNDIR}::test_a_non_finite_test_loss_is_a_divergence_not_a_finished_run",
      "divergence judged on the training loss only: a NaN test loss finishes the run"),
    M("inf_loss_not_diverged", "mbn/tracking.py", "if not math.isfinite(v)}", "if math.isnan(v)}",
      f"{T_ERR}::test_any_non_finite_loss_is_a_divergence",
      "an infinite loss is not a divergence"),
    M("step_curve_index_not_advanced", "mbn/step.py", "        self.index += 1\n", "",
      f"{T_EP}::test_step_curves_equal_a_plain_loop", "every step's loss and error land in the curve's first row"),
    M("wandb_auto_mode_refuses", "mbn/tracking.py", "if unreachable and chosen:", "if unreachable:",
      f"{T_EP}::test_an_unreachable_wandb_server_falls_back_to_offline_within_seconds",
      "an unreachable W&B server ends a run whose mode was chosen automatically instead of logging offline"),
    M("progress_label_ignored", "mbn/tracking.py", 'getattr(v, "label", None) or k', "k",
      f"{T_ERR}::test_progress_postfix_shows_the_current_lr_and_scheduled_values",
      "the progress bar shows scheduled values under their config keys (lam), not their names (λ)"),
    M("compile_cache_not_inherited", "mbn/compile_cache.py", "os.environ[TORCH_ENV] = os.environ[ENV] = path",
      "os.environ[TORCH_ENV] = path", "tests/test_compile_cache.py::test_use_points_inductor_at_the_folder",
      "processes started later (a sweep's runs) do not get the cache folder"),
    # ------------------------------------------------------------------ the plan and `next`
    M("next_starts_at_the_deadline", "mbn/plan.py", "if left <= 0 or (need is not None and need > left):",
      "if left < 0 or (need is not None and need > left):", f"{T_PLAN}::test_next_starts_no_run_at_the_deadline_itself",
      "a run without an estimate starts at the deadline itself, with no time left"),
    M("partial_estimate_from_zero", "mbn/plan.py", "self.epoch_s * (self.epochs - self.epochs_done) * jobs",
      "self.epoch_s * self.epochs * jobs",
      f"{T_PLAN}::test_a_partial_runs_time_left_counts_only_its_epochs_still_to_run",
      "a partial run's time left counts the epochs it has done"),
    M("next_keeps_finished_checkpoint", "scripts/sweep.py", "            o.run.status = planner.FINISHED\n", "",
      f"{T_SWEEPS}::test_next_runs_resumes_bitwise_and_keeps_checkpoints_only_while_unfinished",
      "a run `next` finished keeps its checkpoint (drop_checkpoints sees its status from before the call)"),
    # ------------------------------------------------------------------ NormProp, CBN
    M("arpit2016_no_unit_filter_hook", "mbn/norms/normprop.py",
      "        model.register_forward_pre_hook(unit_filters)\n", "",
      "tests/test_normprop.py::test_arpit2016_update_is_sgd_then_unit_length_by_hand",
      "arpit2016 sets unit filters once at build, never again after an update"),
    M("arpit2016_rescales_in_eval", "mbn/norms/normprop.py", "            if module.training:\n",
      "            if True:\n",
      "tests/test_normprop.py::test_arpit2016_forward_sees_unit_filters_and_eval_writes_nothing",
      "arpit2016 rescales the filters in eval forwards too (evaluation writes the weights)"),
    M("cbn_pushes_unbiased_var", "mbn/norms/cbn.py", "self.push(u, x, mean, var, n)",
      "self.push(u, x, mean, norm_var, n)",
      "tests/test_cbn.py::test_official_running_averages_track_the_unbiased_batch_variance_through_burn_in",
      "official burn-in records the unbiased variance: update_running_stats applies n/(n − 1) a second time"),
    M("closest_key_deepest_first", "mbn/validate.py", 'key=lambda k: k.count("."))', 'key=lambda k: -k.count("."))',
      f"{T_EP}::test_mistakes_in_the_command_end_in_one_line_before_torch",
      "an unknown key suggests the deepest key of its name (train.seed -> data.seed, not seed)"),
    M("folder_accepts_a_file", "mbn/validate.py", "return os.path.isdir(nearest_existing(v))",
      "return os.path.exists(nearest_existing(v))", "tests/test_constraints.py",
      "a file named where a folder belongs (perf.compile_cache, data.root) passes the check"),
    M("output_dirs_made_while_checked", "mbn/cli.py", "        if not os.path.isdir(base):\n",
      "        if not os.path.exists(base):\n", f"{T_SWEEPS}::test_sweep_refuses_bad_arguments_with_one_line",
      "sweep.py makes its runs folder before it finds --compile-cache is a file: a refused command leaves a folder"),
    M("env_origin_unnamed", "mbn/validate.py", "    if env:\n        return f\"${env.group(1)}\"\n", "",
      f"{T_EP}::test_a_folder_from_an_environment_variable_is_checked_and_named",
      "a value from $MBN_DATA_ROOT is said to come 'from oc.env' instead of naming the variable"),
    M("bench_times_a_cpu", "scripts/bench.py", 'and args.device == "auto" and not args.tiny:',
      'and args.device == "auto" and args.tiny:', "tests/test_perf.py::test_bench_on_a_cpu_never_replaces_the_gpu_table",
      "bench.py without a GPU times ResNet-56 on the CPU and overwrites results/bench.md"),
    M("reason_never_shortened", "mbn/tracking.py", "if len(line) > 120 else line", "if len(line) > 1200 else line",
      f"{T_ERR}::test_a_checkpoint_cut_short_is_named_in_one_sentence",
      "a damaged checkpoint's line carries torch's whole multi-sentence message, cut mid-sentence"),
    M("group_check_only_null", "mbn/validate.py", "        if o.is_delete() or not isinstance(o.value(), str):\n",
      "        if o.value() is None:\n", "tests/test_constraints.py::test_a_config_group_takes_one_option_by_name",
      "only norm=null is refused: norm=[bn,gn] and ~norm reach Hydra's merge errors naming no group"),
    M("out_of_memory_keeps_run_dir", "train.py",
      "        discard_unstarted(run_dir, multirun)\n        raise err from None\n",
      "        raise err from None\n", f"{T_ERR}::test_out_of_memory_is_the_machines_fault_and_leaves_no_run_dir",
      "a run out of memory before it started (data.train_size=1e11) leaves its empty run dir behind"),
    M("float32_overflow_passes", "mbn/validate.py", " and math.isfinite(v) and abs(v) <= FLOAT32_MAX\n",
      " and math.isfinite(v)\n", "tests/test_constraints.py::test_range_bounds_open_and_closed_by_hand",
      "optim.lr=1e300 passes the check and the first SGD step ends in torch's overflow traceback"),
    M("section_value_only_null", "mbn/validate.py", "if dataclasses.is_dataclass(typ) and not isinstance(value, dict):",
      "if dataclasses.is_dataclass(typ) and value is None:",
      "tests/test_constraints.py::test_a_value_for_a_whole_section_names_it_and_its_keys",
      "train=5 or eval.py's data=cifar10 reach OmegaConf's 'not a subclass of TrainConfig', naming no fix"),
    M("sigterm_not_taken", "mbn/cli.py", "        signal.signal(signal.SIGTERM, _terminated)\n", "        pass\n",
      f"{T_EP}::test_ctrl_c_is_one_line_with_the_command_that_continues",
      "SIGTERM (kill, timeout) ends a run silently with 143 and leaves its run-dir lock"),
    M("eval_trusts_any_checkpoint", "eval.py", "    if run_config is not None:\n", "    if False:\n",
      f"{T_ERR}::test_eval_py_refuses_a_checkpoint_of_another_run_in_a_run_dir",
      "a GN checkpoint copied into a BN run dir is evaluated and printed as that run's numbers"),
    M("int64_overflow_passes", "mbn/validate.py", "and not isinstance(v, bool) and abs(v) <= INT64_MAX",
      "and not isinstance(v, bool)", "tests/test_constraints.py::test_range_bounds_open_and_closed_by_hand",
      "train.epochs=99999999999999999999999 is accepted and trains with no end"),
    M("dry_run_makes_folders", "mbn/cli.py", "            if make:\n                os.makedirs(",
      "            if True:\n                os.makedirs(", f"{T_EP}::test_output_folders_are_all_checked_before_any_is_made",
      "sweep.py --dry-run creates the runs and compile-cache folders it only had to check"),
    M("sigterm_handler_kept", "mbn/cli.py", "        if took and signal.getsignal(signal.SIGTERM) is _terminated:\n",
      "        if False:\n", f"{T_EP}::test_sigterm_is_taken_only_while_main_runs",
      "guarded leaves its SIGTERM handler installed: a test or joblib worker that called it raises on a later SIGTERM"),
]
MUTANTS += NEW_NORMALIZER_MUTANTS + GRAPH_REPLAY_MUTANTS + ISSUE20_MUTANTS + SESSION_MUTANTS

# Not listed because they are equivalent by construction (no test can tell them apart):
# - "MBN memory not detached": the recorded statistics are detached at the call, and both
#   MemorizedBatchNorm2d.push and StatsMemory.push run under torch.no_grad; removing any one of
#   the three guards changes nothing observable.
# - "BRN moving averages not detached": the update runs under torch.no_grad on detached tensors.


# ----------------------------------------------------------------- per module: the tests that use a file
# `--per-module` runs each mutant against its file's own tests only: tests/test_<stem>.py and the
# test files that import the file themselves (found by reading their imports, not by running them;
# a helper's imports are the helper's), so that a module's bugs are caught by the tests written for
# it, not by accident end to end (tests/test_mutants.py shows each rule on a small repository).
#   mbn/*.py, models/*.py   `import mbn.x`, `from mbn import x`, `from mbn.x.y import z`, attributes
#                           of an imported module (`norms.bn`), and names a package re-exports from
#                           the file (`from mbn.norms import recording` uses mbn/norms/base.py);
#                           where nothing names the file, the tests of a package whose __init__ imports it
#   train.py, scripts/*.py  the tests that name the script (run it) or import it; a script of scripts/
#                           also by its stem passed to a call (`script("make_tables")` loads it)
#   configs/G/O.yaml        the tests that compose configs with G=O (or G=<a formatted value>), or any
#                           composing test where O is G's default or an experiment they compose picks O
#   configs/*.yaml          every test that composes configs
COMPOSES = {"make_cfg", "cfg_factory", "compose", "initialize_config_dir"}
SCRIPTS_THAT_COMPOSE = ("train.py", "sweep.py")
FORMATTED = "\0"  # a formatted value inside an f-string


def module_of(path: str) -> str:
    """mbn/norms/base.py -> mbn.norms.base; mbn/norms/__init__.py -> mbn.norms."""
    name = path[:-3].replace(os.sep, ".").replace("/", ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def own_tests(path: str) -> str:
    return f"tests/test_{os.path.splitext(os.path.basename(path))[0]}.py"


def file_of(module: str, root: str):
    base = os.path.join(root, *module.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return os.path.relpath(path, root)
    return None


class TestIndex:
    """What each test file (tests/test_*.py) imports, names and composes, read with `ast`."""

    def __init__(self, root: str):
        import ast

        self.ast, self.root, self.trees = ast, root, {}
        tests = os.path.join(root, "tests")
        self.files = sorted(f"tests/{f}" for f in os.listdir(tests) if f.startswith("test_") and f.endswith(".py"))
        self.uses = {f: self.modules_used(f) for f in self.files}
        self.strings = {f: self.strings_of(f) | {s for h in self.helpers(f) for s in self.strings_of(h)}
                        for f in self.files}
        self.arguments = {f: self.call_arguments(f) for f in self.files}
        self.composing = {f: bool(self.names_of(f) & COMPOSES
                                  or any(s.endswith(SCRIPTS_THAT_COMPOSE) for s in self.strings[f]))
                          for f in self.files}

    def tree(self, rel: str):
        if rel not in self.trees:
            with open(os.path.join(self.root, rel), encoding="utf-8") as f:
                self.trees[rel] = self.ast.parse(f.read(), rel)
        return self.trees[rel]

    def provider(self, module: str, name: str, seen=()):
        """The module that `module.name` comes from: a submodule, the module defining it, or, for a
        name the package imports from elsewhere, that module (followed through re-exports)."""
        if file_of(f"{module}.{name}", self.root):
            return f"{module}.{name}"
        path = file_of(module, self.root)
        if path is None or module in seen:
            return None
        for node in self.tree(path).body:
            if isinstance(node, self.ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        return self.provider(node.module, alias.name, (*seen, module)) or node.module
        return module

    def modules_used(self, rel: str) -> set:
        ast, used, bound = self.ast, set(), {}
        for node in ast.walk(self.tree(rel)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    used.add(alias.name)
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                used.add(node.module)
                for alias in node.names:
                    found = self.provider(node.module, alias.name)
                    if found:
                        used.add(found)
                        if file_of(found, self.root) and found.endswith("." + alias.name):
                            bound[alias.asname or alias.name] = found
        for node in ast.walk(self.tree(rel)):  # attributes of imported modules: norms.bn, norms.NORMS
            chain = []
            while isinstance(node, ast.Attribute):
                chain.append(node.attr)
                node = node.value
            if isinstance(node, ast.Name) and node.id in bound and chain:
                module = bound[node.id]
                for attr in reversed(chain):
                    found = self.provider(module, attr)
                    if not found:
                        break
                    used.add(found)
                    if found != f"{module}.{attr}":
                        break
                    module = found
        return used

    def helpers(self, rel: str) -> list:
        """The tests/ modules this file imports names from (their strings count as its own: TINY)."""
        out = []
        for node in self.ast.walk(self.tree(rel)):
            if isinstance(node, self.ast.ImportFrom) and (node.module or "").startswith("tests."):
                path = file_of(node.module, self.root)
                if path and path != rel:
                    out.append(path)
        return out

    def strings_of(self, rel: str) -> set:
        ast, out = self.ast, set()
        for node in ast.walk(self.tree(rel)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.add(node.value)
            elif isinstance(node, ast.JoinedStr):
                out.add("".join(v.value if isinstance(v, ast.Constant) else FORMATTED for v in node.values))
        return out

    def call_arguments(self, rel: str) -> set:
        """String constants passed to a function called by its name: script("plot_curves") names
        scripts/plot_curves.py (a method's argument, name.startswith("sweep"), names nothing)."""
        ast = self.ast
        return {a.value for n in ast.walk(self.tree(rel)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                for a in n.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}

    def names_of(self, rel: str) -> set:
        return {n.id for n in self.ast.walk(self.tree(rel)) if isinstance(n, self.ast.Name)} | \
               {a.name.split(".")[-1] for n in self.ast.walk(self.tree(rel)) if isinstance(n, self.ast.ImportFrom)
                for a in n.names}

    # ------------------------------------------------------------------ who uses a file
    def importers(self, module: str) -> list:
        return [f for f in self.files if module in self.uses[f]]

    def script_users(self, path: str) -> list:
        base = os.path.basename(path)
        stem = os.path.splitext(base)[0] if path.startswith("scripts/") else None  # script("make_tables")
        return [f for f in self.files if module_of(path) in self.uses[f] or stem in self.arguments[f]
                or any(s == path or s == base or s.endswith("/" + path) or s.endswith("/" + base)
                       for s in self.strings[f])]

    def config_users(self, path: str) -> list:
        parts = os.path.relpath(path, "configs").replace(os.sep, "/")[:-len(".yaml")].split("/")
        composing = [f for f in self.files if self.composing[f]]
        if len(parts) == 1:
            return composing
        group, option = "/".join(parts[:-1]), parts[-1]
        default = self.defaults().get(group) == option
        return [f for f in composing if default or self.names_option(f, group, option)]

    def names_option(self, rel: str, group: str, option: str) -> bool:
        chosen = self.chosen(self.strings[rel], group)
        if option in chosen or FORMATTED in chosen:
            return True
        return any(option == picked for exp in self.chosen(self.strings[rel], "experiment")
                   for g, picked in self.experiment_overrides(exp) if g == group)

    @staticmethod
    def chosen(strings, group: str) -> set:
        """Options of `group` named in override strings: 'norm=mbn', 'norm=bn,mbn', f'norm={x}'."""
        pattern = re.compile(r"(?<![\w./])\+{0,2}" + re.escape(group) + r"=([^\s'\"]*)")
        return {o for s in strings for m in pattern.finditer(s) for o in m.group(1).split(",")}

    def defaults(self) -> dict:
        return dict(self.yaml_defaults("configs/train.yaml"))

    def experiment_overrides(self, name: str) -> list:
        return self.yaml_defaults(f"configs/experiment/{name}.yaml")

    def yaml_defaults(self, rel: str) -> list:
        """(group, option) pairs of a config's defaults list ('- norm: bn', '- override /data: synthetic')."""
        path = os.path.join(self.root, rel)
        if not os.path.isfile(path):
            return []
        with open(path, encoding="utf-8") as f:
            text = f.read()
        return [(g.strip("/"), o) for g, o in
                re.findall(r"^\s*-\s*(?:override\s+)?(/?[\w/]+)\s*:\s*([\w-]+)\s*(?:#.*)?$", text, flags=re.M)]

    def tests_for(self, path: str) -> Tuple[str, ...]:
        """The per-module selection of a mutated file: its own test file first, then its users."""
        path = path.replace(os.sep, "/")
        if path.startswith("configs/") and path.endswith(".yaml"):
            users = self.config_users(path)
        elif "/" not in path or path.startswith("scripts/"):
            users = self.script_users(path)
        else:
            module = module_of(path)
            users = self.importers(module)
            if not users:  # nothing names it: the tests of a package that imports it
                parent = module.rpartition(".")[0]
                while parent and not users:
                    if module in {self.provider(parent, n) for n in self.imported_names(parent)}:
                        users = self.importers(parent)
                    parent = parent.rpartition(".")[0]
        own = own_tests(path)
        first = [own] if own in self.files else []
        return tuple(first + [f for f in users if f not in first])

    def imported_names(self, package: str) -> list:
        path = file_of(package, self.root)
        if path is None:
            return []
        return [a.asname or a.name for n in self.tree(path).body if isinstance(n, self.ast.ImportFrom) for a in n.names]


# ------------------------------------------------------------------------------------- running
# one process per mutant run (-n 0: the suite's own -n 2 would start workers for a few tests); the
# baseline, which runs before any mutant, spreads over --jobs workers
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]


def workspace_files(repo: str) -> List[str]:
    out = subprocess.run(["git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, text=True, check=True).stdout
    return [p for p in out.split("\0") if p and os.path.isfile(os.path.join(repo, p))]


def make_copy(repo: str, dest: str) -> str:
    """The working tree as it is now (tracked and untracked, not ignored) in `dest`."""
    for rel in workspace_files(repo):
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(repo, rel), target)
    return dest


def status_of(m: Mutant, root: str) -> str:
    path = os.path.join(root, m.file)
    if not os.path.isfile(path):
        return "STALE"
    with open(path, encoding="utf-8", newline="") as f:
        count = f.read().count(m.original)
    return "ok" if count == 1 else "STALE"


RUNNING = set()           # pytest process groups in flight (killed on Ctrl-C)
STOP = threading.Event()  # set on Ctrl-C: queued mutants are not started


def run_pytest(args: List[str], cwd: str, timeout: float, workers: int = 0):
    """(returncode or None on timeout, output). The whole process group goes on timeout or Ctrl-C."""
    env = dict(os.environ, PYTHONPATH=cwd, PYTHONDONTWRITEBYTECODE="1")  # no stale .pyc of a mutant
    proc = subprocess.Popen(PYTEST + ["-n", str(workers)] + args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    RUNNING.add(proc)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        kill(proc)
        out, _ = proc.communicate()
        return None, out
    except BaseException:
        kill(proc)
        proc.communicate()
        raise
    finally:
        RUNNING.discard(proc)


def kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def covers(selection: str, nodeid: str) -> bool:
    return nodeid == selection or nodeid.startswith(selection + "::") or nodeid.startswith(selection + "[")


def baseline_failures(mutants: List[Mutant], root: str, timeout: float, workers: int) -> List[str]:
    selections = sorted({t for m in mutants for t in m.tests})
    code, out = run_pytest(["-rfE", *selections], root, timeout, workers if workers > 1 else 0)
    if code is None:
        sys.exit(f"the unmutated tests did not finish within {timeout:.0f} s; raise --timeout")
    if code not in (0, 1):
        sys.exit(f"the unmutated tests could not run (pytest exit {code}):\n{out[-3000:]}")
    return re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)


BACKUP = ".mutant-orig"  # the unmutated file, next to it while a mutant is planted


def write_exact(path: str, data: bytes, like: os.stat_result) -> None:
    """Replace `path` atomically by `data` with the permissions and times of `like`."""
    tmp = path + ".mutant-tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, like.st_mode & 0o7777)
    os.utime(tmp, ns=(like.st_atime_ns, like.st_mtime_ns))
    os.replace(tmp, path)


def apply_and_test(m: Mutant, root: str, timeout: float):
    """Plant `m` in root, run its tests, restore the file exactly. Returns (status, seconds, detail)."""
    path = os.path.join(root, m.file)
    with open(path, "rb") as f:
        original = f.read()
    stat = os.stat(path)
    text = original.decode("utf-8")
    if text.count(m.original) != 1:
        return "STALE", 0.0, ""
    t0 = time.perf_counter()
    shutil.copy2(path, path + BACKUP)  # survives even a SIGKILL of this script
    try:
        now = os.stat(path)
        write_exact(path, text.replace(m.original, m.replacement).encode("utf-8"), now)
        os.utime(path)  # a new mtime, so no cached bytecode of the original is trusted
        code, out = run_pytest(["-x", "-rfE", *m.tests], root, timeout)
    finally:
        write_exact(path, original, stat)
        with open(path, "rb") as f:
            if f.read() != original:
                raise RuntimeError(f"could not restore {path}; the original is in {path + BACKUP}")
        os.remove(path + BACKUP)
    seconds = time.perf_counter() - t0
    if code is None:
        return "TIMEOUT", seconds, ""
    if code == 0:
        return "SURVIVED", seconds, ""
    if code in (1, 2):  # failures, or a collection error caused by the mutant
        first = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)
        return "KILLED", seconds, (f"by {first[0]}" if first else "")
    return "ERROR", seconds, f"pytest exit {code}: {out.strip().splitlines()[-1] if out.strip() else ''}"


def test_all(mutants: List[Mutant], roots: List[str], args, label: str, results: dict) -> None:
    """Plant each mutant in turn (one per root at a time) and run its tests, filling `results`
    {name: (status, seconds, detail)} as they finish (so a Ctrl-C keeps the results so far)."""
    runnable = [m for m in mutants if status_of(m, roots[0]) == "ok"]
    for m in mutants:
        if m not in runnable:
            results[m.name] = ("STALE", 0.0, "")
        elif not m.tests:
            results[m.name] = ("UNTESTED", 0.0, "no test file imports it")
            runnable.remove(m)
    if not args.no_baseline and runnable:
        print(f"{label} baseline: the {len({t for m in runnable for t in m.tests})} test selections without "
              "mutants ...", flush=True)
        failing = baseline_failures(runnable, roots[0], args.timeout * 3, len(roots))
        for f in failing:
            print(f"  fails unmutated: {f}")
        for i, m in reversed(list(enumerate(runnable))):
            broken = [f for f in failing if any(covers(t, f) for t in m.tests)]
            if not broken:
                continue
            if all(t in broken for t in m.tests):  # nothing left to run
                results[m.name] = ("BASELINE-FAIL", 0.0, "")
                del runnable[i]
            else:  # the rest of its selection still decides, without the tests that fail anyway
                runnable[i] = dataclasses.replace(m, tests=m.tests + tuple(f"--deselect={f}" for f in broken))
    free: Queue = Queue()
    for r in roots:
        free.put(r)
    done = [0]

    def work(m: Mutant):
        if STOP.is_set():
            return
        root = free.get()
        try:
            results[m.name] = apply_and_test(m, root, args.timeout)
        finally:
            free.put(root)
        if STOP.is_set():  # killed by Ctrl-C, not by the mutant
            results.pop(m.name, None)
            return
        done[0] += 1
        status, seconds, detail = results[m.name]
        print(f"{label} [{done[0]:2d}/{len(runnable)}] {status:9s} {m.name} ({seconds:.0f} s) {detail}", flush=True)

    if len(roots) == 1:
        for m in runnable:
            work(m)
        return
    pool = ThreadPoolExecutor(len(roots))
    futures = [pool.submit(work, m) for m in runnable]
    try:
        for f in futures:
            f.result()
    finally:  # on Ctrl-C: stop queued work, kill running tests; workers restore their files
        if sys.exc_info()[0] is not None:
            STOP.set()
            for proc in list(RUNNING):
                kill(proc)
        pool.shutdown(wait=True)


def killer(detail: str):
    m = re.match(r"by (\S+)", detail)
    return m.group(1) if m else None


def inferred_narrow(m: Mutant, per_module: Mutant, result) -> tuple:
    """The narrow selection's verdict where the per-module run already decides it (tests are
    deterministic): its first failing test is in the narrow selection, or it survived although
    it contains the whole narrow selection. None: run the narrow selection."""
    status, _, detail = result
    if status == "KILLED" and killer(detail) and any(covers(t, killer(detail)) for t in m.tests):
        return "KILLED", 0.0, f"{detail} (per-module run)"
    if status == "SURVIVED" and all(any(covers(f, t) for f in per_module.tests) for t in m.tests):
        return "SURVIVED", 0.0, "(per-module run)"
    return None


def report(label: str, mutants: List[Mutant], results: dict) -> bool:
    """Print the score and every mutant not killed; True when all were killed."""
    by = {}
    for m in mutants:
        if m.name in results:
            by.setdefault(results[m.name][0], []).append(m)
    killed = len(by.get("KILLED", [])) + len(by.get("TIMEOUT", []))
    missed = by.get("SURVIVED", []) + by.get("UNTESTED", [])
    scored = killed + len(missed)
    print()
    if scored:
        print(f"score ({label}): {killed}/{scored} killed = {100.0 * killed / scored:.1f} %"
              + (f" ({len(by['TIMEOUT'])} by timeout)" if by.get("TIMEOUT") else ""))
    for status in ("SURVIVED", "UNTESTED", "STALE", "BASELINE-FAIL", "ERROR"):
        for m in by.get(status, []):
            extra = results[m.name][2]
            print(f"{status:13s} {m.name}: {m.description} [{m.file}; tests: {' '.join(m.tests)}] {extra}")
    return bool(scored) and not missed and not any(by.get(k) for k in ("STALE", "BASELINE-FAIL", "ERROR"))


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__)  # a usage mistake is one line (mbn.cli)
    ap.add_argument("--list", action="store_true", help="list the mutants and whether their snippets match")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    ap.add_argument("--tests", nargs="+", metavar="SELECTION",
                    help="run these tests instead of each mutant's own (e.g. to see one test kill a mutant)")
    ap.add_argument("--per-module", action="store_true",
                    help="also run each mutant against its file's own tests only (tests/test_<file>.py and the "
                         "test files that import it) and print that score beside the narrow selection's")
    ap.add_argument("--jobs", type=int, default=1, help="mutants tested at the same time (default 1)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per mutant's tests (default 300)")
    ap.add_argument("--in-place", action="store_true", help="mutate this checkout instead of a scratch copy")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` restores files like Ctrl-C

    names = [m.name for m in MUTANTS]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        sys.exit(f"duplicate mutant names: {dupes}")
    if args.tests and args.per_module:
        raise UserError("--tests and --per-module choose the tests in two different ways; give one of them")
    mutants = MUTANTS
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise UserError(f"--only: unknown mutants {', '.join(unknown)}; see --list")
        mutants = [m for m in MUTANTS if m.name in args.only]
    if args.tests:
        mutants = [dataclasses.replace(m, tests=tuple(args.tests)) for m in mutants]
    per_module = {}
    if args.per_module:
        index = TestIndex(REPO)
        for m in mutants:  # the files the narrow selection names first: a kill comes sooner (-x)
            files = index.tests_for(m.file)
            rank = {f: 0 if any(t.split("::")[0] == f for t in m.tests) else 1 if f == own_tests(m.file) else 2
                    for f in files}
            per_module[m.name] = dataclasses.replace(m, tests=tuple(sorted(files, key=rank.get)))

    if args.list:
        for m in mutants:
            status = status_of(m, REPO)
            print(f"{m.name:32s} {'' if status == 'ok' else status + ' '}{m.file}: {m.description}")
            if args.per_module:
                print(f"{'':32s} per module: {' '.join(per_module[m.name].tests) or '(no test file imports it)'}")
        stale = sum(status_of(m, REPO) != "ok" for m in mutants)
        print(f"{len(mutants)} mutants, {stale} stale")
        return 0

    left = sorted({os.path.join(REPO, m.file) + BACKUP for m in MUTANTS
                   if os.path.exists(os.path.join(REPO, m.file) + BACKUP)})
    if left:
        sys.exit("a mutant run was killed before restoring; put the originals back first:\n"
                 + "\n".join(f"  mv {p} {p[:-len(BACKUP)]}" for p in left))
    jobs = 1 if args.in_place else max(1, args.jobs)
    scratch = None if args.in_place else tempfile.mkdtemp(prefix="mbn-mutants-")
    narrow, modular = {}, {}
    try:
        roots = [REPO] if args.in_place else [make_copy(REPO, os.path.join(scratch, str(j))) for j in range(jobs)]
        if args.per_module:
            test_all([per_module[m.name] for m in mutants], roots, args, "per-module", modular)
            for m in mutants:
                known = modular.get(m.name) and inferred_narrow(m, per_module[m.name], modular[m.name])
                if known:
                    narrow[m.name] = known
        test_all([m for m in mutants if m.name not in narrow], roots, args, "narrow", narrow)
    except KeyboardInterrupt:
        STOP.set()
        print("\ninterrupted; every file is restored. Results so far:")
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    ok = report("narrow selection: each mutant's listed tests", mutants, narrow)
    if args.per_module:
        ok = report("per module: only the tests of the mutated file", [per_module[m.name] for m in mutants],
                    modular) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    run(main)
