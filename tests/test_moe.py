"""switchlm (moe.py) and routing agreement (routing_metrics.py): capacity and dropping,
the auxiliary losses against their formulas, causality and batch independence under tight
capacity, routing agreement's invariances, a planted NaN, and a real trial saving routing."""
import glob
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moe
import routing_metrics as rm
import train
from config import get_config
from model_factories import MODEL_NAMES, build_model
from conftest import trial_path
from config import RunOptions

VOCAB, T = 11, 12


def agree(a, b):
    """Routing agreement of two trials (mean over MoE layers)."""
    return rm.pairwise_routing_agreement([a, b])['mean']


def tiny(**kw):
    return get_config('cpu', **{**dict(n_layer=2, n_embd=16, n_head=2, block_size=T, dropout=0.0,
                                       vocab_size=VOCAB), **kw})


def tokens(b=3, seed=1):
    return torch.randint(VOCAB, (b, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- config

def test_registered_and_config_validated():
    assert 'switchlm' in MODEL_NAMES
    for bad in (dict(n_experts=0), dict(top_k=3), dict(n_experts=1, top_k=2), dict(capacity_factor=0),
                dict(moe_every=0), dict(router_init_scale=0), dict(router_jitter=1.0), dict(aux_loss_coef=-1),
                dict(z_loss_coef=-0.1)):
        with pytest.raises(ValueError):
            tiny(**bad)
    with pytest.raises(ValueError, match='moe_every'):
        build_model('switchlm', 'relu', tiny(moe_every=3))
    m = build_model('switchlm', 'relu', tiny(n_layer=4, moe_every=2), seed=0)
    assert m.moe_layers == [1, 3]
    assert [type(b).__name__ for b in m.blocks] == ['Block', 'SwitchBlock', 'Block', 'SwitchBlock']


# ----------------------------------------------------------------------------- capacity

def test_capacity_formula():
    assert moe.expert_capacity(128, 4, 1, 1.25) == 40
    assert moe.expert_capacity(12, 4, 1, 1.25) == 4
    assert moe.expert_capacity(12, 4, 2, 1.0) == 6
    assert moe.expert_capacity(8, 2, 2, 4.0) == 8       # never more than one slot per position
    assert moe.expert_capacity(8, 64, 1, 0.1) == 1      # never zero


def test_capacity_drops_later_tokens_per_sequence_on_a_hand_made_routing():
    # top-1, capacity 2: the third and later tokens of an expert in a sequence are dropped,
    # earlier tokens win, and the other sequence's routing changes nothing
    choices = torch.tensor([[0, 0, 0, 1, 0, 2],
                            [1, 1, 1, 1, 1, 1]]).unsqueeze(-1)
    keep = moe.capacity_keep(choices, 3, 2).squeeze(-1)
    assert keep.tolist() == [[True, True, False, True, False, True],
                             [True, True, False, False, False, False]]
    assert moe.capacity_keep(choices[:1], 3, 2).squeeze(-1).tolist() == keep[:1].tolist()
    # top-2, capacity 2: assignments counted in position order
    choices2 = torch.tensor([[[0, 1], [1, 0], [0, 2], [2, 1]]])
    assert moe.capacity_keep(choices2, 3, 2).tolist() == [[[True, True], [True, True], [False, True],
                                                           [True, False]]]


def test_dropped_tokens_pass_through_the_residual_and_are_counted():
    # hand-made routing: n_embd = n_experts = 3 and an identity router, so a one-hot input
    # goes to the expert of its hot dimension
    layer = moe.SwitchFeedForward(3, 8, 'relu', n_experts=3, top_k=1, capacity_factor=0.5,
                                  block_size=6, bias=True).eval()
    assert layer.capacity == 1
    with torch.no_grad():
        layer.router.weight.copy_(10 * torch.eye(3))
    route = torch.tensor([[0, 0, 1, 2, 1, 0]])
    x = F.one_hot(route, 3).float()
    with torch.no_grad():
        y, info = layer(x)
    kept = torch.tensor([True, False, True, True, False, False])
    assert info['first_choice'].tolist() == route.tolist()
    assert info['first_dropped'][0].tolist() == (~kept).tolist()
    assert torch.equal(y[0, ~kept], torch.zeros(3, 3)), "a dropped token gets no expert output"
    for t in torch.nonzero(kept).flatten().tolist():
        e = route[0, t].item()
        gate = torch.softmax(10 * x[0, t], -1)[e]
        torch.testing.assert_close(y[0, t], gate * layer.experts[e](x[0, t]))
    E = 3
    stats = info['stats']
    assert stats[:E].tolist() == [3, 2, 1] and stats[E:2 * E].tolist() == [1, 1, 1]
    # through the block: a dropped token leaves the feed-forward sub-layer unchanged
    c = tiny(n_layer=1, n_experts=3, capacity_factor=0.25, router_init_scale=2000.0)
    block = build_model('switchlm', 'gelu', c, seed=0).eval().blocks[0]
    h = torch.randn(2, T, c.n_embd, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = block(h)
        mid = h + block.attn(block.ln_1(h))
    dropped = block.info['first_dropped']
    assert dropped.any() and (~dropped).any()
    torch.testing.assert_close(out[dropped], mid[dropped], rtol=0, atol=0)


# ----------------------------------------------------------------------------- auxiliary losses

def test_aux_loss_and_z_loss_equal_their_formulas_on_a_known_routing():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.5]])
    probs = logits.softmax(-1)
    choices = probs.argmax(-1, keepdim=True)                   # experts 0, 1, 2, 0
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    f = np.array([2, 1, 1]) / 4
    expected_aux = 3 * sum(f[e] * p[:, e].mean() for e in range(3))
    expected_z = np.mean([math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()])
    assert moe.load_balancing_loss(probs, choices, 3).item() == pytest.approx(expected_aux, rel=1e-6)
    assert moe.router_z_loss(logits).item() == pytest.approx(expected_z, rel=1e-6)
    # a perfectly balanced, uniform router has load-balancing loss 1 and z-loss (ln E)^2
    flat = torch.zeros(4, 4)
    assert moe.load_balancing_loss(flat.softmax(-1), torch.arange(4)[:, None], 4).item() == pytest.approx(1.0)
    assert moe.router_z_loss(flat).item() == pytest.approx(math.log(4) ** 2)
    # top-2: f counts both assignments
    c2 = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 1]])
    f2 = np.array([3, 3, 2]) / 8
    assert moe.load_balancing_loss(probs, c2, 3).item() == pytest.approx(
        3 * sum(f2[e] * p[:, e].mean() for e in range(3)), rel=1e-6)


def test_model_aux_loss_is_the_weighted_sum_over_layers_and_training_only():
    c = tiny(aux_loss_coef=0.3, z_loss_coef=0.05, router_init_scale=50.0)
    model = build_model('switchlm', 'swiglu', c, seed=0).train()
    idx = tokens()
    inputs = {}  # the router input of every MoE layer, caught on its way in
    hooks = [model.blocks[i].ln_2.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, o))
             for i in model.moe_layers]
    logits, loss = model(idx, idx)
    for h in hooks:
        h.remove()
    expected = 0
    for i in model.moe_layers:
        z = F.linear(inputs[i], model.blocks[i].moe.router.weight).reshape(-1, c.n_experts)
        pr = z.softmax(-1)
        expected = expected + 0.3 * moe.load_balancing_loss(pr, pr.argmax(-1, keepdim=True), c.n_experts) \
            + 0.05 * moe.router_z_loss(z)
    torch.testing.assert_close(model.aux_loss, expected)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.reshape(-1, VOCAB), idx.reshape(-1)).item()), \
        "the returned loss is the language-model loss alone"
    model.aux_loss.backward()
    assert all(model.blocks[i].moe.router.weight.grad.abs().sum() > 0 for i in model.moe_layers)
    model.eval()
    model(idx, idx)
    assert model.aux_loss is None, "evaluation adds no auxiliary loss"


# ----------------------------------------------------------------------------- causality, batches

@pytest.mark.parametrize('act,top_k', [('gelu', 1), ('swiglu', 2)])
def test_causal_and_batch_independent_under_tight_capacity(act, top_k):
    # a large router init makes routing lopsided and capacity 0.5 makes it overflow, so
    # tokens really are dropped; causality and batch independence must still hold
    c = tiny(capacity_factor=0.5, router_init_scale=300.0, top_k=top_k)
    model = build_model('switchlm', act, c, seed=0).eval()
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(VOCAB, (4, T), generator=g)
    with torch.no_grad():
        base = model(idx)[0]
        extras = model.eval_extras()
        assert extras['routing_dropped'].any(), "the test needs dropped tokens"
        for t in (1, T // 2, T - 1):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1 + torch.randint(VOCAB - 1, (4,), generator=g)) % VOCAB
            out = model(changed)[0]
            torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-5, rtol=0)
            assert np.array_equal(model.eval_extras()['routing_dropped'][:, :, :t],
                                  extras['routing_dropped'][:, :, :t])
        # one sequence at a time gives what the batch gave: no coupling between sequences
        for b in range(len(idx)):
            alone = model(idx[b:b + 1])[0]
            torch.testing.assert_close(alone[0], base[b], atol=1e-5, rtol=0)
            e = model.eval_extras()
            assert np.array_equal(e['routing'][0], extras['routing'][b])
            assert np.array_equal(e['routing_dropped'][0], extras['routing_dropped'][b])
        # prefix consistency: a shorter input gives the same logits on its positions
        torch.testing.assert_close(model(idx[:, :T // 2])[0], base[:, :T // 2], atol=1e-5, rtol=0)


def test_jitter_draws_from_the_global_rng_in_training_only():
    c = tiny(router_jitter=0.5, router_init_scale=300.0)
    model = build_model('switchlm', 'relu', c, seed=0)
    idx = tokens(8)
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(model.train()(idx)[0].detach())
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    model.eval()(idx)
    assert torch.equal(torch.rand(1), before), "evaluation draws no noise"


# ----------------------------------------------------------------------------- routing agreement

def test_routing_agreement_is_one_for_a_model_with_itself_and_invariant_to_expert_relabelling():
    c = tiny(n_experts=4, router_init_scale=300.0)
    idx = tokens(6)
    with torch.no_grad():
        a_model = build_model('switchlm', 'gelu', c, seed=0).eval()
        logits_a = a_model(idx)[0]
        a = a_model.eval_extras()['routing']
        b_model = build_model('switchlm', 'gelu', c, seed=1).eval()
        b_model(idx)
        b = b_model.eval_extras()['routing']
    assert a.shape == (6, 2, T) and a.dtype == np.int16
    assert agree(a, a) == 1.0
    assert np.all(rm.routing_agreement_per_layer(a, a) == 1.0)
    perm = np.array([2, 0, 3, 1])
    assert agree(a, perm[a]) == 1.0
    assert agree(b, perm[a]) == agree(b, a) == agree(a, b)
    assert agree(a, b) < 1.0
    # relabel the experts of the model itself (router rows and expert modules): same
    # function, permuted routing, agreement 1
    with torch.no_grad():
        for i in a_model.moe_layers:
            layer = a_model.blocks[i].moe
            layer.router.weight.copy_(layer.router.weight[torch.as_tensor(np.argsort(perm))])
            layer.experts = torch.nn.ModuleList(layer.experts[j] for j in np.argsort(perm))
        logits_p = a_model(idx)[0]
        p = a_model.eval_extras()['routing']
    torch.testing.assert_close(logits_p, logits_a)
    assert np.array_equal(p, perm[a]) and rm.pairwise_routing_agreement([a, p])['mean'] == 1.0


def test_routing_agreement_matches_experts_by_maximum_assignment():
    a = np.array([0, 0, 0, 1, 1, 2, 2, 2])[:, None]   # one layer, 8 tokens
    b = np.array([1, 1, 2, 0, 0, 2, 2, 1])[:, None]
    counts = rm.co_routing_counts(a, b)
    assert counts.tolist() == [[0, 2, 1], [2, 0, 0], [0, 1, 2]]
    assert rm.match_experts(counts).tolist() == [1, 0, 2]
    assert rm.pairwise_routing_agreement([a, b])['mean'] == pytest.approx(6 / 8)
    r = rm.pairwise_routing_agreement([a, b, a])
    assert [x[2] for x in r['pairs']] == pytest.approx([0.75, 1.0, 0.75])
    with pytest.raises(ValueError):
        rm.pairwise_routing_agreement([a, b[:4]])


# ----------------------------------------------------------------------------- through the trainer

def run(cfg, tmp_path, trial=0, vary='all', activation='gelu'):
    return train.run_trial('switchlm', activation, trial, cfg, 's',
                           RunOptions(results_dir=str(tmp_path / 'results'), vary=vary, progress=False))


def test_trial_trains_and_saves_routing(tiny_config, tmp_path):
    cfg = replace(tiny_config, router_jitter=0.01)
    r0, r1 = run(cfg, tmp_path, 0), run(cfg, tmp_path, 1)
    m = r0['metrics']
    n_layers = len(m['moe_layers'])
    util = np.array(m['moe_expert_utilisation'])
    assert util.shape == (n_layers, cfg.n_experts) and np.allclose(util.sum(1), 1)
    for key in ('moe_dropped_fraction', 'moe_router_entropy', 'moe_aux_loss', 'moe_z_loss',
                'moe_train_aux_loss', 'moe_train_z_loss', 'moe_train_dropped_fraction'):
        assert math.isfinite(m[key]), key
    assert 0 <= m['moe_dropped_fraction'] <= 1 and 0 < m['moe_router_entropy'] <= math.log(cfg.n_experts) + 1e-6
    paths = [trial_path(str(tmp_path / 'results'), 's', 'switchlm', 'gelu', k, 'npz') for k in (0, 1)]
    with np.load(paths[0]) as z:
        assert z['routing'].shape == (cfg.n_eval, n_layers, cfg.block_size)
        assert z['routing'].dtype == np.int16 and z['routing_dropped'].dtype == bool
        # the evaluation-set dropped fraction is exactly what the saved flags say (top-1)
        assert m['moe_dropped_fraction'] == pytest.approx(float(z['routing_dropped'].mean()))
    routing = []
    for p in paths:
        with np.load(p) as z:
            routing.append(z['routing'])
    agreement = rm.pairwise_routing_agreement(routing)['mean']
    assert 0 < agreement <= 1
    assert json.load(open(trial_path(str(tmp_path / 'results'), 's', 'switchlm', 'gelu', 0)))['metrics'] == m


def test_a_planted_nan_stops_the_trial_with_a_training_error(tiny_config, tmp_path, monkeypatch):
    real = moe.SwitchFeedForward.route
    calls = {'n': 0}

    def route_goes_nan(self, x):
        logits, probs, choices, gates = real(self, x)
        if self.training:
            calls['n'] += 1
            if calls['n'] >= 3:  # third training step (tiny_config: one MoE layer)
                gates = gates * float('nan')
        return logits, probs, choices, gates
    monkeypatch.setattr(moe.SwitchFeedForward, 'route', route_goes_nan)
    with pytest.raises(train.TrainingError, match='non-finite training loss nan at iteration 3'):
        run(tiny_config, tmp_path)
    assert not glob.glob(str(tmp_path / 'results' / '**' / '*.json'), recursive=True)


def test_switchlm_study_is_analysed_with_routing_agreement_next_to_pd(tiny_config, tmp_path):
    """Three real switchlm trials through the analysis: routing agreement per pair with a CI,
    the routing statistics and perplexity summarised, the report table and the plot written."""
    import analyze_results
    for k in range(3):
        run(tiny_config, tmp_path, k)
    study = tmp_path / 'results' / 's'
    s = analyze_results.analyze(str(study), verbose=False)
    r = s['results'][0]
    ra = r['routing_agreement']
    assert len(ra['values']) == 3 and all(0 < v <= 1 for v in ra['values']) and ra['ci'] is not None
    assert len(ra['per_layer_mean']) == len(moe.moe_layer_indices(tiny_config.n_layer, tiny_config.moe_every))
    assert r['trial_stats']['moe_router_entropy']['mean'] > 0
    assert r['trial_stats']['perplexity']['mean'] == pytest.approx(
        np.mean([math.exp(t['val_loss']) for t in r['trials']]))
    assert 'routing agreement' in (study / 'REPORT.md').read_text()
    assert (study / 'plots' / 'routing_agreement.png').stat().st_size > 0
