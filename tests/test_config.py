"""The composed defaults (mbn/config.py's schemas under configs/*.yaml) are the paper's training
settings, as its Experiments section states them: "SGD with a minibatch size of 128. The momentum
for SGD is 0.9 and the weight decay is set to 10^-4. The learning rate is initialized as 0.1 and
then is divided by 10 at 40% and 60% of the training procedure [...] λ = 0.1 and then increase it
to 0.5 and 0.9 at 40% and 60% [...] η in Eqn.(8) is set to 0.9", "200 training epochs"."""
from tests.conftest import make_cfg


def test_the_defaults_are_the_papers_training_settings():
    cfg = make_cfg(["norm=mbn"])
    assert (cfg.data.name, cfg.train.batch_size, cfg.train.epochs, cfg.train.steps) == ("cifar10", 128, 200, None)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.1, 0.9, 1e-4)
    assert (cfg.schedule.name, list(cfg.schedule.milestones), cfg.schedule.gamma) == ("step", [0.4, 0.6], 0.1)
    assert (list(cfg.norm.lam), list(cfg.norm.lam_milestones), cfg.norm.eta) == ([0.1, 0.5, 0.9], [0.4, 0.6], 0.9)
    assert cfg.train.double_forward is True  # MBN-2, the method the paper proposes
