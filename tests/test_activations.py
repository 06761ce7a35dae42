"""Every activation against its formula (values and gradients), SmeLU's regions and
continuity, the gated feed-forward, and the refusal of unknown names."""
import math

import pytest
import torch

from activations import (ACTIVATION_NAMES, Activation, FeedForward, check_activation,
                         gated_hidden, get_activation_fn, is_gated, smelu_beta)

SELU_ALPHA, SELU_SCALE = 1.6732632423543772, 1.0507009873554805


def ref_smelu(x, b):
    return torch.where(x <= -b, torch.zeros_like(x), torch.where(x >= b, x, (x + b) ** 2 / (4 * b)))


def ref_smelu_grad(x, b):
    return torch.where(x <= -b, torch.zeros_like(x), torch.where(x >= b, torch.ones_like(x), (x + b) / (2 * b)))


def sig(x):
    return 1 / (1 + torch.exp(-x))


# name -> (f(x), f'(x)) written out from the definitions, independently of activations.py
REFERENCE = {
    'relu': (lambda x: torch.where(x > 0, x, 0 * x), lambda x: (x > 0).double()),
    'gelu': (lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
             lambda x: 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-x ** 2 / 2) / math.sqrt(2 * math.pi)),
    'swish': (lambda x: x * sig(x), lambda x: sig(x) * (1 + x * (1 - sig(x)))),
    'smelu_05': (lambda x: ref_smelu(x, 0.5), lambda x: ref_smelu_grad(x, 0.5)),
    'smelu_1': (lambda x: ref_smelu(x, 1.0), lambda x: ref_smelu_grad(x, 1.0)),
    'smelu_0.25': (lambda x: ref_smelu(x, 0.25), lambda x: ref_smelu_grad(x, 0.25)),
    'mish': (lambda x: x * torch.tanh(torch.log1p(torch.exp(x))),
             lambda x: torch.tanh(torch.log1p(torch.exp(x))) + x * sig(x) * (1 - torch.tanh(torch.log1p(torch.exp(x))) ** 2)),
    'elu': (lambda x: torch.where(x > 0, x, torch.exp(x) - 1), lambda x: torch.where(x > 0, torch.ones_like(x), torch.exp(x))),
    'selu': (lambda x: SELU_SCALE * torch.where(x > 0, x, SELU_ALPHA * (torch.exp(x) - 1)),
             lambda x: SELU_SCALE * torch.where(x > 0, torch.ones_like(x), SELU_ALPHA * torch.exp(x))),
    'leaky_relu': (lambda x: torch.where(x > 0, x, 0.01 * x), lambda x: torch.where(x > 0, torch.ones_like(x), 0.01 * torch.ones_like(x))),
}
REFERENCE['silu'] = REFERENCE['swish']
GATE_OF = {'swiglu': 'swish', 'geglu': 'gelu', 'reglu': 'relu'}


def test_registry_has_the_required_names():
    required = ['relu', 'gelu', 'swish', 'silu', 'smelu_05', 'smelu_1', 'mish', 'elu', 'selu',
                'leaky_relu', 'swiglu', 'geglu', 'reglu']
    assert sorted(required) == sorted(ACTIVATION_NAMES)
    assert all(n in REFERENCE or n in GATE_OF for n in ACTIVATION_NAMES)


@pytest.mark.parametrize('name', sorted(REFERENCE) + sorted(GATE_OF))
def test_values_and_gradients_match_the_formula(name):
    # a grid that avoids the kinks themselves (0 for relu-likes), where derivatives are one-sided
    x = torch.linspace(-4, 4, 1601, dtype=torch.float64)
    x = x[(x.abs() > 1e-3)].clone().requires_grad_(True)
    fn = get_activation_fn(name)
    f, df = REFERENCE[GATE_OF.get(name, name)]
    y = fn(x)
    torch.testing.assert_close(y, f(x.detach()), atol=1e-10, rtol=1e-10)
    y.sum().backward()
    torch.testing.assert_close(x.grad, df(x.detach()), atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize('name,beta', [('smelu_05', 0.5), ('smelu_1', 1.0), ('smelu_0.25', 0.25), ('smelu_2', 2.0)])
def test_smelu_regions_and_continuity(name, beta):
    assert smelu_beta(name) == beta
    fn = get_activation_fn(name)
    x = torch.tensor([-3 * beta, -beta, -beta / 2, 0.0, beta / 2, beta, 3 * beta], dtype=torch.float64)
    expected = torch.tensor([0, 0, (beta / 2) ** 2 / (4 * beta), beta / 4, (1.5 * beta) ** 2 / (4 * beta), beta, 3 * beta],
                            dtype=torch.float64)
    torch.testing.assert_close(fn(x), expected)
    # continuity of the value and of the first derivative at -beta and +beta
    eps = 1e-7
    for edge in (-beta, beta):
        pts = torch.tensor([edge - eps, edge + eps], dtype=torch.float64, requires_grad=True)
        y = fn(pts)
        assert abs(y[0].item() - y[1].item()) < 1e-6
        y.sum().backward()
        assert abs(pts.grad[0].item() - pts.grad[1].item()) < 1e-5


@pytest.mark.parametrize('bad', ['relu6', 'RELU', '', 'smelu', 'smelu_0', 'smelu_-1', 'smelu_abc', 'smelu_0.0', 'smelu_007'])
def test_unknown_names_are_refused_with_the_valid_list(bad):
    with pytest.raises(ValueError) as e:
        check_activation(bad)
    msg = str(e.value)
    assert all(n in msg for n in ACTIVATION_NAMES)
    with pytest.raises(ValueError):
        FeedForward(4, 8, bad)


@pytest.mark.parametrize('name,gate', [('swiglu', torch.nn.functional.silu), ('geglu', torch.nn.functional.gelu),
                                       ('reglu', torch.relu)])
def test_gated_feed_forward_is_act_xW_times_xV(name, gate):
    torch.manual_seed(0)
    ff = FeedForward(8, 24, name, bias=False)
    assert is_gated(name) and ff.hidden == gated_hidden(24) == 16
    x = torch.randn(5, 8)
    W, V = ff.fc.weight[:16], ff.fc.weight[16:]
    expected = (gate(x @ W.T) * (x @ V.T)) @ ff.proj.weight.T
    torch.testing.assert_close(ff(x), expected)


def test_gated_width_rule_keeps_parameter_count():
    d, h = 96, 384
    plain = sum(p.numel() for p in FeedForward(d, h, 'relu', bias=False).parameters())
    gated = sum(p.numel() for p in FeedForward(d, h, 'swiglu', bias=False).parameters())
    assert plain == gated


def test_elementwise_activation_layer_uses_the_function():
    x = torch.linspace(-2, 2, 9)
    assert torch.equal(Activation('relu')(x), torch.relu(x))
    assert not torch.equal(Activation('gelu')(x), torch.relu(x))
