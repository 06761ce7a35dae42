"""Test-only: a language model that sees the future, made from a real one.

LeakyLM wraps a real model and feeds it the window shifted left by one token, so the
logits at position t are computed from tokens up to t+1: the next token, which is the
target, is in view. Trained, it learns to copy; probed, its earlier positions move when a
later token changes. Tests use it to check that the trainer's causality probe
(metrics.causality_max_change) and the analysis's leakage rules catch such a model:

    from leaky import use_leaky_model
    use_leaky_model(monkeypatch)   # every model train.run_trial builds is wrapped
"""
import torch
from torch import nn

import train
import model_factories


class LeakyLM(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    @property
    def aux_loss(self):  # the trainer adds a model's auxiliary loss: pass the inner one on
        return getattr(self.inner, 'aux_loss', None)

    def forward(self, idx, targets=None):
        # position t gets token t+1 (the last position repeats the last token)
        return self.inner(torch.cat([idx[:, 1:], idx[:, -1:]], dim=1), targets)


def use_leaky_model(monkeypatch):
    """Make train.run_trial build LeakyLM(real model) for the rest of the test."""
    real = model_factories.build_model
    monkeypatch.setattr(train, 'build_model', lambda *a, **k: LeakyLM(real(*a, **k)))
