"""Mutation testing: plant realistic single-line bugs one at a time and check that the tests catch them.

    python scripts/mutants.py                     # every mutant; prints the score and the survivors
    python scripts/mutants.py --list              # the list, and which snippets no longer match (STALE)
    python scripts/mutants.py --only brn_lower_clip step_lr_late
    python scripts/mutants.py --jobs 2            # two mutants at a time (each in its own copy)
    python scripts/mutants.py --only step_lr_late --tests tests/test_schedules.py   # one test's verdict

Each mutant is (name, file, exact original snippet, replacement, tests, description). By default
the work happens in a scratch copy of the working tree (tracked and untracked, not ignored), so the
checkout and anyone working in it never see a bug; `--in-place` mutates the checkout itself. Either
way the file is restored byte for byte (and its mtime) after each mutant, on Ctrl-C and on errors.

A mutant is KILLED when its tests fail (or time out, or no longer import), SURVIVED when they pass.
A snippet that no longer occurs exactly once is STALE: reported, never silently skipped, so the list
stays honest as the code changes; fix the snippet or drop the mutant. Tests that already fail
without any mutant (checked first, once) make their mutants BASELINE-FAIL, not scored.
Not part of CI: a full run takes minutes.
"""
import argparse
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
    M("step_errors_after_record_pass", "mbn/step.py",
      "        self.errors += (out.detach().argmax(-1) != y).sum(0)\n", "",
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
MUTANTS += NEW_NORMALIZER_MUTANTS + GRAPH_REPLAY_MUTANTS

# Not listed because they are equivalent by construction (no test can tell them apart):
# - "MBN memory not detached": the recorded statistics are detached at the call, and both
#   MemorizedBatchNorm2d.push and StatsMemory.push run under torch.no_grad; removing any one of
#   the three guards changes nothing observable.
# - "BRN moving averages not detached": the update runs under torch.no_grad on detached tensors.


# ------------------------------------------------------------------------------------- running
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


def run_pytest(args: List[str], cwd: str, timeout: float):
    """(returncode or None on timeout, output). The whole process group goes on timeout or Ctrl-C."""
    env = dict(os.environ, PYTHONPATH=cwd, PYTHONDONTWRITEBYTECODE="1")  # no stale .pyc of a mutant
    proc = subprocess.Popen(PYTEST + args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
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


def baseline_failures(mutants: List[Mutant], root: str, timeout: float) -> List[str]:
    selections = sorted({t for m in mutants for t in m.tests})
    code, out = run_pytest(["-rfE", *selections], root, timeout)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="list the mutants and whether their snippets match")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    ap.add_argument("--tests", nargs="+", metavar="SELECTION",
                    help="run these tests instead of each mutant's own (e.g. to see one test kill a mutant)")
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
    mutants = MUTANTS
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            sys.exit(f"unknown mutants {unknown}; see --list")
        mutants = [m for m in MUTANTS if m.name in args.only]
    if args.tests:
        mutants = [dataclasses.replace(m, tests=tuple(args.tests)) for m in mutants]

    if args.list:
        for m in mutants:
            status = status_of(m, REPO)
            print(f"{m.name:32s} {'' if status == 'ok' else status + ' '}{m.file}: {m.description}")
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
    results = {}
    try:
        roots = [REPO] if args.in_place else [make_copy(REPO, os.path.join(scratch, str(j))) for j in range(jobs)]
        runnable = [m for m in mutants if status_of(m, roots[0]) == "ok"]
        for m in mutants:
            if m not in runnable:
                results[m.name] = ("STALE", 0.0, "")
        if not args.no_baseline and runnable:
            print(f"baseline: the {len({t for m in runnable for t in m.tests})} test selections without mutants ...",
                  flush=True)
            failing = baseline_failures(runnable, roots[0], args.timeout * 3)
            for f in failing:
                print(f"  fails unmutated: {f}")
            for m in list(runnable):
                if any(covers(t, f) for t in m.tests for f in failing):
                    results[m.name] = ("BASELINE-FAIL", 0.0, "")
                    runnable.remove(m)
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
            print(f"[{done[0]:2d}/{len(runnable)}] {status:9s} {m.name} ({seconds:.0f} s) {detail}", flush=True)

        if jobs == 1:
            for m in runnable:
                work(m)
        else:
            pool = ThreadPoolExecutor(jobs)
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
    except KeyboardInterrupt:
        STOP.set()
        print("\ninterrupted; every file is restored. Results so far:")
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    by = {}
    for m in mutants:
        if m.name in results:
            by.setdefault(results[m.name][0], []).append(m)
    killed = len(by.get("KILLED", [])) + len(by.get("TIMEOUT", []))
    survived = by.get("SURVIVED", [])
    scored = killed + len(survived)
    print()
    if scored:
        print(f"score: {killed}/{scored} killed = {100.0 * killed / scored:.1f} %"
              + (f" ({len(by['TIMEOUT'])} by timeout)" if by.get("TIMEOUT") else ""))
    for label in ("SURVIVED", "STALE", "BASELINE-FAIL", "ERROR"):
        for m in by.get(label, []):
            extra = results[m.name][2]
            print(f"{label:13s} {m.name}: {m.description} [{m.file}; tests: {' '.join(m.tests)}] {extra}")
    return 0 if scored and not survived and not any(by.get(k) for k in ("STALE", "BASELINE-FAIL", "ERROR")) else 1


if __name__ == "__main__":
    sys.exit(main())
