"""The record/normalize protocol (Algorithm 1, lines 10-12).

A train-mode forward always normalizes as in training; whether it also *records* statistics
(MBN's memory, BN/BRN running averages) is a per-layer switch of every `mbn.norms.Normalizer`.
Double forward trains with recording off, steps the optimizer, then records with a second
no-grad forward on the same batch, so that the stored statistics come from the updated weights.
The switch and its context manager live with the protocol in mbn/norms/base.py.
"""
from mbn.norms.base import recording, set_recording

__all__ = ["recording", "set_recording"]
