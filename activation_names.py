"""
The activation names: which exist, which are gated, which are aliases, SmeLU's beta.
Plain Python (no torch), so that the trainer (activations.py) and the analysis and plots
(plot_utils.py, analyze_results.py) share one grammar.

    relu gelu swish silu mish elu selu leaky_relu   elementwise (silu: an alias of swish)
    smelu_05 smelu_1 smelu_<beta>                   SmeLU: smelu_0.25, smelu_2, smelu_1.5, ...
    swiglu geglu reglu                              gated: act(x W) * (x V), act = GATE_OF[name]

An unknown name is an error that lists every valid name. There is deliberately no
default: the study this tool replaces silently turned unknown activations into ReLU in
five of its six models.
"""
import re

ELEMENTWISE_NAMES = ('relu', 'gelu', 'swish', 'silu', 'smelu_05', 'smelu_1', 'mish', 'elu', 'selu',
                     'leaky_relu')
GATE_OF = {'swiglu': 'swish', 'geglu': 'gelu', 'reglu': 'relu'}  # gated name -> activation on the gate
ALIASES = {'silu': 'swish'}  # one function, two names
ACTIVATION_NAMES = list(ELEMENTWISE_NAMES) + list(GATE_OF)
# any SmeLU beta by name: smelu_0.25, smelu_2, smelu_1.5 (a leading zero needs a point,
# so 'smelu_05' can only mean the registered beta=0.5)
SMELU_RE = re.compile(r'^smelu_((?:[1-9]\d*|0)\.\d+|[1-9]\d*)$')


def smelu_beta(name):
    """beta of a SmeLU activation name (smelu_05 = 0.5, smelu_1, smelu_<beta>), else None."""
    if name == 'smelu_05':
        return 0.5
    m = SMELU_RE.match(name) if isinstance(name, str) else None
    beta = float(m.group(1)) if m else 0.0
    return beta if beta > 0 else None  # smelu_0.0 is no SmeLU: an unknown name


def check_activation(name):
    """`name` if it is a known activation, else ValueError listing the valid names."""
    if name in ACTIVATION_NAMES or smelu_beta(name) is not None:
        return name
    raise ValueError(f"unknown activation {name!r}; valid names: {', '.join(ACTIVATION_NAMES)}, "
                     f"or smelu_<beta> such as smelu_0.25")


def is_gated(name):
    return check_activation(name) in GATE_OF


def base_activation(name):
    """The elementwise function a name applies, by name: the gate's for gated names
    (swiglu -> swish), aliases resolved (silu -> swish); SmeLU names are their own."""
    check_activation(name)
    name = GATE_OF.get(name, name)
    return ALIASES.get(name, name)


def applied_function(name):
    """The function a name applies, as trial_checks.activation_calls counts it: the gate's
    for gated names, one name per function (silu: swish; smelu_1: smelu(beta=1))."""
    return canonical_activation(base_activation(name))


def canonical_activation(name):
    """One name per distinct function: silu -> swish, smelu_1 and smelu_1.0 -> smelu(beta=1).
    Two names with one canonical form give identical predictions by design."""
    beta = smelu_beta(name)
    return f'smelu(beta={beta:g})' if beta is not None else ALIASES.get(name, name)
