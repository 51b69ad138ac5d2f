"""Scaling out: W&B offline, Hydra launchers, torchrun/DDP with synchronised statistics, ImageNet."""
import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from mbn.checkpoint import load_checkpoint
from mbn.engine import fit
from tests.conftest import REPO, TINY, make_cfg, run_cli


def test_wandb_offline_run_holds_metrics_and_config(tmp_path, monkeypatch):
    from tests.wandb_log import records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = ["norm=mbn", "logger=wandb", "train.progress=false"]
    fit(make_cfg(TINY + overrides), str(tmp_path), overrides)
    # run.finish() returns before wandb-core has written the run file: its records sit in a
    # 32 KiB block buffer until the service closes the run's stream, which `finish` only
    # requests (asynchronously). teardown() waits for the service to exit, streams closed.
    import wandb

    wandb.teardown()
    files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    recs = records(files[0])
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    assert run.run_group == "smoke" and set(run.tags) == {"resnet20", "mbn", "synthetic", "bs32"}
    assert run.display_name == "norm=mbn"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["norm"]["name"] == "mbn" and config["train"]["epochs"] == 2
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in recs
               if r.WhichOneof("record_type") == "history"]
    epochs = [h for h in history if "test/err" in h]
    local = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [h["epoch"] for h in epochs] == [1, 2]
    assert [h["test/err"] for h in epochs] == [m["test_err"] for m in local]
    assert all({"train/loss", "train/err", "test/loss", "hparams/lam", "hparams/lr"} <= set(h) for h in epochs)


def test_logger_none_never_imports_wandb(tmp_path):
    code = ("import sys; from tests.conftest import make_cfg, TINY; from mbn.engine import fit; "
            f"fit(make_cfg(TINY + ['logger=none']), {str(tmp_path)!r}); "
            "assert 'wandb' not in sys.modules, 'wandb was imported'; print('clean')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "clean" in r.stdout, r.stderr


def test_joblib_launcher_runs_two_jobs_in_parallel(tmp_path):
    r = run_cli("train.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", *TINY,
                "train.epochs=1", f"hydra.sweep.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    done = sorted(glob.glob(str(tmp_path / "*" / "metrics.json")))
    assert len(done) == 2 and "seed0" in done[0] and "seed1" in done[1]


def test_slurm_launcher_config_composes():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    assert "submitit" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.gpus_per_node == 1
    assert cfg.hydra.launcher.partition == "gpu"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("norm", ["mbn", pytest.param("bn", marks=pytest.mark.slow)])  # BN's sync: exact below
def test_two_process_ddp_equals_one_process(tmp_path, norm):
    """gloo, 2 processes x 16 images vs 1 process x 32: the global batch, the normalizers'
    statistics (MBN memory, running averages) and the losses agree to float tolerance."""
    overrides = TINY + [f"norm={norm}", "train.epochs=2", "device=cpu", "optim.lr=0.01"]
    single = tmp_path / "single"
    fit(make_cfg(overrides), str(single))
    ddp = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                        f"--master_port={free_port()}", "train.py", *overrides, f"hydra.run.dir={ddp}"],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = load_checkpoint(single / "checkpoint.pt"), load_checkpoint(ddp / "checkpoint.pt")
    keys = [k for k in a["model"] if any(s in k for s in ("memory.", "running_"))]
    assert keys
    # float32 round-off grows over 8 SGD steps: merely running the single-process job with 1
    # instead of 2 threads moves these numbers by ~1e-3. Sharding or synchronisation mistakes move
    # them by ~1e-1. The exactness of the synchronised gradients is checked in float64 below.
    for k in a["model"]:
        if a["model"][k].is_floating_point():
            torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-2, atol=1e-2, msg=k)
        else:
            assert torch.equal(a["model"][k], b["model"][k]), k
    for ha, hb in zip(a["history"], b["history"]):
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-3)
        assert hb["test_loss"] == pytest.approx(ha["test_loss"], rel=1e-3)
    record = json.loads((ddp / "run_record.json").read_text())
    assert record["world_size"] == 2


def make_image_folder(root, classes=3, train=4, val=2, size=(40, 48)):
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"n0000{c}"
            d.mkdir(parents=True)
            for i in range(n):
                pixels = (rng.random((*size, 3)) * 80 + c * 60).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"img{i}.png")


def test_imagenet_path_end_to_end(tmp_path):
    make_image_folder(tmp_path / "imagenet")
    overrides = ["experiment=imagenet", f"data.root={tmp_path / 'imagenet'}", "data.num_classes=3",
                 "data.image_size=32", "data.workers=0", "model=resnet18", "norm=mbn", "train.batch_size=4",
                 "train.eval_batch_size=3", "train.epochs=2", "train.progress=false", "device=cpu"]
    summary = fit(make_cfg(overrides), str(tmp_path / "run"))
    assert summary["finished"] and summary["step"] == 6  # 12 images, batch 4, 2 epochs
    assert 0 <= summary["test_err"] <= 100 and summary["test_err5"] == 0.0  # 3 classes: top-5 always right
    from eval import evaluate_checkpoint  # (its command line: tests/test_train.py)

    report = evaluate_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert report["test_err"] == pytest.approx(summary["test_err"])
    assert {"test_err", "test_err5", "test_err_running", "test_err5_running"} <= set(report)


def test_imagenet_missing_says_where_to_put_it(tmp_path):
    r = run_cli("train.py", "experiment=imagenet", f"data.root={tmp_path}", "device=cpu", f"hydra.run.dir={tmp_path}/r")
    assert r.returncode == 2 and "ImageFolder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "vgg16_imagenet"])
def test_imagenet_models_take_our_norm_layer(name):
    from mbn.build import make_model

    cfg = make_cfg(["experiment=imagenet", f"model={name}", "norm=mbn"])
    model = make_model(cfg)
    from mbn.norms import MemorizedBatchNorm2d

    assert sum(isinstance(m, MemorizedBatchNorm2d) for m in model.modules()) > 10
    assert not any(type(m) is torch.nn.BatchNorm2d for m in model.modules())


def _tiny(kind):
    from torch import nn

    from mbn.norms import BatchNorm2d, BatchRenorm2d, MemorizedBatchNorm2d

    torch.manual_seed(0)
    layer = {"bn": BatchNorm2d, "brn": lambda c: BatchRenorm2d(c, r_max=3, d_max=5),
             "mbn": lambda c: MemorizedBatchNorm2d(c, lam=0.5)}[kind](4)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), layer, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(5)
    if kind == "mbn":
        for _ in range(3):
            layer.push(torch.randn(4, generator=g, dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64) + 0.5, 36)
    if kind == "brn":
        layer.r_max.fill_(1.5)
        layer.d_max.fill_(0.5)
        layer.running_std.fill_(0.7)
    return net


def _tiny_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def _tiny_grads(net, x, y):
    out = net(x)
    torch.nn.functional.cross_entropy(out, y).backward()
    return out.detach(), [p.grad for p in net.parameters()], dict(net.named_buffers())


KINDS = ("bn", "brn", "mbn")


def _ddp_worker(rank, port, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for kind in KINDS:  # one pair of processes for all (starting one costs seconds)
        net = _tiny(kind)
        ddp = torch.nn.parallel.DistributedDataParallel(net, broadcast_buffers=False)
        x, y = _tiny_data()
        part = slice(4 * rank, 4 * rank + 4)
        out, grads, _ = _tiny_grads(ddp, x[part], y[part])
        buffers = dict(net.named_buffers())
        # numpy arrays travel by value: torch tensors would be shared through file descriptors that
        # vanish when this process exits
        queue.put((kind, rank, out.numpy(), [g.numpy() for g in grads], {k: v.numpy() for k, v in buffers.items()}))
    dist.barrier()
    dist.destroy_process_group()


def test_synchronised_statistics_and_gradients_are_exact_in_float64():
    """BN, BRN and MBN, 2 gloo processes x 4 samples vs 1 process x 8: outputs, parameter gradients
    (averaged by DDP) and recorded statistics equal the single-process ones to float64 round-off."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {(r[0], r[1]): r[2:] for r in (queue.get(timeout=300) for _ in range(2 * len(KINDS)))}
    for p in procs:
        p.join(timeout=60)
    assert sorted(results) == sorted((kind, rank) for kind in KINDS for rank in range(2))
    x, y = _tiny_data()
    for (kind, rank), (out, grads, buffers) in results.items():
        ref_out, ref_grads, ref_buffers = _tiny_grads(_tiny(kind), x, y)
        out, grads = torch.from_numpy(out), [torch.from_numpy(g) for g in grads]
        buffers = {k: torch.from_numpy(v) for k, v in buffers.items()}
        torch.testing.assert_close(out, ref_out[4 * rank:4 * rank + 4], rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"{kind}: {m}")
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-14, msg=lambda m: f"{kind}: {m}")
        for k, v in buffers.items():
            torch.testing.assert_close(v, ref_buffers[k], rtol=1e-12, atol=1e-14, msg=lambda m: f"{kind} {k}: {m}")
