"""
Activation functions by name, and the one feed-forward layer every model uses.

An unknown name is an error that lists every valid name. There is deliberately no
default: the study this tool replaces silently turned unknown activations into ReLU
in five of its six models and concluded that "activations make no difference".

Gated activations (GLU variants, Shazeer 2020) compute act(x W) * (x V) and project
back down. Width rule, applied everywhere: a gated feed-forward whose ungated width
would be `hidden` uses round(2/3 * hidden) units, so that its three weight matrices
hold the same number of parameters as the two of the ungated layer.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


def smelu(x, beta=1.0):
    """Smooth ReLU (Shamir et al.): 0 for x <= -beta, (x+beta)^2/(4 beta) for |x| < beta,
    x for x >= beta. Continuous with a continuous first derivative."""
    # clamp keeps the quadratic branch finite (and its gradient zero) outside (-beta, beta)
    z = torch.clamp(x, -beta, beta)
    return torch.where(x >= beta, x, (z + beta) ** 2 / (4.0 * beta))


# name -> elementwise function; gated names map to the function applied to the gate
_ELEMENTWISE = {
    'relu': F.relu,
    'gelu': F.gelu,  # exact (erf) GELU
    'swish': F.silu,
    'silu': F.silu,  # alias of swish
    'smelu_05': lambda x: smelu(x, 0.5),
    'smelu_1': lambda x: smelu(x, 1.0),
    'mish': F.mish,
    'elu': F.elu,
    'selu': F.selu,
    'leaky_relu': F.leaky_relu,  # negative slope 0.01
}
_GATED = {
    'swiglu': F.silu,
    'geglu': F.gelu,
    'reglu': F.relu,
}
# any SmeLU beta by name: smelu_0.25, smelu_2, smelu_1.5 (a leading zero needs a point,
# so 'smelu_05' can only mean the registered beta=0.5)
_SMELU_RE = re.compile(r'^smelu_((?:[1-9]\d*|0)\.\d+|[1-9]\d*)$')

ACTIVATION_NAMES = list(_ELEMENTWISE) + list(_GATED)


def _invalid(name):
    return ValueError(f"unknown activation {name!r}; valid names: {', '.join(ACTIVATION_NAMES)}, "
                      f"or smelu_<beta> such as smelu_0.25")


def smelu_beta(name):
    """beta of a SmeLU activation name, or None if the name is not SmeLU."""
    if name == 'smelu_05':
        return 0.5
    if name == 'smelu_1':
        return 1.0
    m = _SMELU_RE.match(name) if isinstance(name, str) else None
    if m is None:
        return None
    beta = float(m.group(1))
    return beta if beta > 0 else None  # smelu_0.0 is no SmeLU: an unknown name


def is_gated(name):
    check_activation(name)
    return name in _GATED


def check_activation(name):
    """Raise ValueError naming the valid choices unless `name` is a known activation."""
    if name in _ELEMENTWISE or name in _GATED or smelu_beta(name) is not None:
        return name
    raise _invalid(name)


def get_activation_fn(name):
    """The elementwise function of `name` (for gated names: the function on the gate)."""
    check_activation(name)
    if name in _ELEMENTWISE:
        return _ELEMENTWISE[name]
    if name in _GATED:
        return _GATED[name]
    beta = smelu_beta(name)
    return lambda x: smelu(x, beta)


def gated_hidden(hidden):
    """Hidden width of a gated feed-forward standing in for an ungated one of width `hidden`."""
    return max(1, round(2 * hidden / 3))


class Activation(nn.Module):
    """Activation layer by name. A gated activation takes an input twice as wide as its
    output (gate and value side by side, so one matmul makes both) and returns
    act(gate) * value; `in_mult` says how much wider the input must be."""

    def __init__(self, name):
        super().__init__()
        self.name = name
        self.gated = is_gated(name)
        self.in_mult = 2 if self.gated else 1
        self.fn = get_activation_fn(name)

    def forward(self, x):
        if self.gated:
            gate, value = x.chunk(2, dim=-1)
            return self.fn(gate) * value
        return self.fn(x)

    def extra_repr(self):
        return self.name


class FeedForward(nn.Module):
    """Linear -> activation -> Linear (-> dropout). `hidden` is the ungated width; gated
    activations get gated_hidden(hidden) units so parameter counts match."""

    def __init__(self, d_in, hidden, activation, d_out=None, bias=True, dropout=0.0):
        super().__init__()
        self.act = Activation(activation)
        self.hidden = gated_hidden(hidden) if self.act.gated else hidden
        self.fc = nn.Linear(d_in, self.hidden * self.act.in_mult, bias=bias)
        self.proj = nn.Linear(self.hidden, d_in if d_out is None else d_out, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        return self.dropout(self.proj(self.act(self.fc(x))))
