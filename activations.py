"""
Activation functions by name (the names: activation_names.py), and the one feed-forward
layer every model uses.

Gated activations (GLU variants, Shazeer 2020) compute act(x W) * (x V) and project
back down. Width rule, applied everywhere: a gated feed-forward whose ungated width
would be `hidden` uses round(2/3 * hidden) units, so that its three weight matrices
hold the same number of parameters as the two of the ungated layer.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from activation_names import (ACTIVATION_NAMES, base_activation, check_activation, is_gated,  # noqa: F401
                              smelu_beta)


def smelu(x, beta=1.0):
    """Smooth ReLU (Shamir et al.): 0 for x <= -beta, (x+beta)^2/(4 beta) for |x| < beta,
    x for x >= beta. Continuous with a continuous first derivative."""
    # clamp keeps the quadratic branch finite (and its gradient zero) outside (-beta, beta)
    z = torch.clamp(x, -beta, beta)
    return torch.where(x >= beta, x, (z + beta) ** 2 / (4.0 * beta))


# base name (activation_names.base_activation) -> elementwise function
_FUNCTIONS = {
    'relu': F.relu,
    'gelu': F.gelu,  # exact (erf) GELU
    'swish': F.silu,
    'mish': F.mish,
    'elu': F.elu,
    'selu': F.selu,
    'leaky_relu': F.leaky_relu,  # negative slope 0.01
}


class SmeLU:
    """smelu at one beta, named as trial_checks.activation_calls counts it (it is no torch
    builtin, so it is counted where it is called)."""

    def __init__(self, beta):
        self.beta = beta
        self.activation_name = f'smelu(beta={beta:g})'

    def __call__(self, x):
        return smelu(x, self.beta)


def get_activation_fn(name):
    """The elementwise function of `name` (for gated names: the function on the gate)."""
    beta = smelu_beta(base_activation(name))
    if beta is not None:
        return SmeLU(beta)
    return _FUNCTIONS[base_activation(name)]


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
