"""Checks every normalizer must pass on the real models and the real training loop (shared by
tests/test_mabn.py, test_rbn.py, test_gn.py)."""
import copy
import json

import pytest
import torch

from mbn.build import make_model
from mbn.norms import inference_modes, normalizers, precise_statistics
from mbn.step import train_step
from tests.conftest import TINY, make_cfg, run_cli


def assert_models_train(norm, layer_type, models=("resnet20", "vgg16", "nin"), extra=()):
    """ResNet-20, VGG-16 and NIN built by make_model: every normalizer is `layer_type`; a single and
    a double forward step, a state_dict copy reproducing the eval outputs, PreciseBN."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        for name in models:
            cfg = make_cfg([f"model={name}", f"norm={norm}", *extra])
            model = make_model(cfg)
            layers = [m for m in normalizers(model)]
            assert layers and all(isinstance(m, layer_type) for m in layers), name
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
            for double_forward in (False, True):
                loss, _ = train_step(model, opt, x, y, double_forward)
                assert torch.isfinite(loss), name
            fresh = make_model(cfg)
            fresh.load_state_dict(copy.deepcopy(model.state_dict()))
            with torch.no_grad():
                torch.testing.assert_close(fresh.eval()(x), model.eval()(x))
                precise_statistics(fresh, [(x, y)])
                assert torch.isfinite(fresh(x)).all(), name
    finally:
        torch.set_default_dtype(previous)


def assert_fit_and_eval(tmp_path, overrides, double_forward, cli=False):
    """Two steps of the tiny synthetic run (one epoch), then eval.py on the run dir (in this
    process, or with `cli` through the command line) reproduces the test error; PreciseBN where
    the normalizer has statistics."""
    from eval import evaluate_checkpoint
    from mbn.engine import fit

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        cfg = make_cfg(TINY + list(overrides) + ["train.epochs=1", "train.steps=2",
                                                 f"train.double_forward={double_forward}"])
        summary = fit(cfg, str(tmp_path))
        assert summary["finished"] and summary["step"] == 2
        assert 0 <= summary["test_err"] <= 100
        has_stats = bool(inference_modes(make_model(cfg)))
        assert ("test_err_precise" in summary) == has_stats
        if cli:
            r = run_cli("eval.py", f"run_dir={tmp_path}", "precise_batches=2")
            assert r.returncode == 0, r.stderr
            report = json.loads(r.stdout)
        else:
            report = evaluate_checkpoint(str(tmp_path / "checkpoint.pt"), precise_batches=2)
        assert report["test_err"] == pytest.approx(summary["test_err"])
        assert ("test_err_precise" in report) == has_stats
        return summary, report
    finally:
        torch.set_default_dtype(previous)
