"""Every model x every activation at a tiny size: shapes, finite loss, gradients reaching
every parameter, causality, and the activation really changing the function."""
import itertools

import pytest
import torch

from config import get_config
from model_factories import ACTIVATION_NAMES, MODEL_NAMES, build_model, count_parameters

ACTS = ACTIVATION_NAMES + ['smelu_0.25']
ALIASES = {frozenset(('swish', 'silu'))}  # the same function under two names
VOCAB, T = 11, 12


def tiny(**kw):
    return get_config('cpu', **{**dict(n_layer=2, n_embd=16, n_head=2, block_size=T, dropout=0.1,
                                       vocab_size=VOCAB), **kw})


def test_the_six_architectures_are_registered():
    for name in ['charlm', 'tinylstm', 'minigpt', 'convlm', 'hybridlm', 'nanotransformer']:
        assert name in MODEL_NAMES


@pytest.mark.parametrize('model_name', MODEL_NAMES)
@pytest.mark.parametrize('act', ACTS)
def test_shapes_loss_and_gradients(model_name, act):
    model = build_model(model_name, act, tiny(), seed=0)
    idx = torch.randint(VOCAB, (3, T), generator=torch.Generator().manual_seed(1))
    logits, loss = model(idx, torch.roll(idx, -1, 1))
    assert logits.shape == (3, T, VOCAB)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient reaches {missing}"
    # a forward pass without targets gives no loss
    assert model(idx)[1] is None


@pytest.mark.parametrize('model_name', MODEL_NAMES)
@pytest.mark.parametrize('act', ACTS)
def test_causal(model_name, act):
    model = build_model(model_name, act, tiny(), seed=0).eval()  # eval: dropout off
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(VOCAB, (2, T), generator=g)
    with torch.no_grad():
        base = model(idx)[0]
        for t in (1, T // 2, T - 1):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1 + torch.randint(VOCAB - 1, (2,), generator=g)) % VOCAB
            out = model(changed)[0]
            torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-5, rtol=0,
                                       msg=f"{model_name}/{act}: logits before {t} depend on token {t}")
            assert not torch.allclose(out[:, t], base[:, t]), "the test must be able to see a change"


@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_activation_is_really_used(model_name):
    """Same seed, different activation -> different logits, for every pair of names."""
    idx = torch.randint(VOCAB, (2, T), generator=torch.Generator().manual_seed(3))
    outs = {}
    for act in ACTS:
        with torch.no_grad():
            outs[act] = build_model(model_name, act, tiny(), seed=0).eval()(idx)[0]
    for a, b in itertools.combinations(ACTS, 2):
        if frozenset((a, b)) in ALIASES:
            assert torch.equal(outs[a], outs[b])
        else:
            assert not torch.allclose(outs[a], outs[b], atol=1e-6), f"{model_name}: {a} and {b} give the same logits"


@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_same_seed_same_weights_and_global_rng_untouched(model_name):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(model_name, 'gelu', tiny(), seed=7)
    after = torch.rand(1)
    assert torch.equal(before, after), "building a model must not consume the global (dropout) RNG"
    b = build_model(model_name, 'gelu', tiny(), seed=7)
    c = build_model(model_name, 'gelu', tiny(), seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_refuses_sequences_longer_than_block_size(model_name):
    model = build_model(model_name, 'relu', tiny(), seed=0)
    with pytest.raises(ValueError, match='block_size'):
        model(torch.zeros(1, T + 1, dtype=torch.long))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError) as e:
        build_model('gpt5', 'relu', tiny())
    assert all(m in str(e.value) for m in MODEL_NAMES)
    with pytest.raises(ValueError) as e:
        build_model('minigpt', 'relu7', tiny())
    assert all(a in str(e.value) for a in ACTIVATION_NAMES)


def test_invalid_sizes_fail_before_allocation():
    with pytest.raises(ValueError, match='divisible'):
        tiny(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match='even'):
        build_model('nanotransformer', 'relu', tiny(n_embd=6, n_head=2))
    with pytest.raises(ValueError, match='n_layer'):
        tiny(n_layer=0)


def test_minigpt_ties_embedding_and_output_weights():
    model = build_model('minigpt', 'gelu', tiny(), seed=0)
    assert model.lm_head.weight is model.wte.weight
    assert count_parameters(model) == sum(p.numel() for p in set(model.parameters()))


def test_tinylstm_is_unidirectional():
    model = build_model('tinylstm', 'relu', tiny(), seed=0)
    assert not model.lstm.bidirectional


@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_bias_switch_removes_every_bias(model_name):
    with_bias = build_model(model_name, 'relu', tiny(), seed=0)
    without = build_model(model_name, 'relu', tiny(bias=False), seed=0)
    assert not [n for n, _ in without.named_parameters() if 'bias' in n]
    if model_name != 'nanotransformer':  # bias-free by design
        assert [n for n, _ in with_bias.named_parameters() if 'bias' in n]
