"""The record/normalize protocol (Algorithm 1, lines 10-12).

A train-mode forward always normalizes as in training; whether it also *records* statistics
(MBN's memory, BN/BRN running averages) is a per-layer switch. Double forward trains with
recording off, steps the optimizer, then records with a second no-grad forward on the same
batch, so that the stored statistics come from the updated weights.
"""
import contextlib

from torch import nn


def set_recording(model: nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if hasattr(m, "record"):
            m.record = enabled


@contextlib.contextmanager
def recording(model: nn.Module, enabled: bool):
    """Within the block, train-mode forwards record statistics iff `enabled`."""
    previous = [(m, m.record) for m in model.modules() if hasattr(m, "record")]
    set_recording(model, enabled)
    try:
        yield model
    finally:
        for m, flag in previous:
            m.record = flag
