"""Random streams (issue 13) and the causality probe: every source of randomness follows its
own seed, each trial records digests of the streams it really used, the analysis checks
them against --vary, and each language-model trial records whether it sees the future."""
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

import analyze_results
import sanity
import model_factories
import train
from leaky import LeakyLM, use_leaky_model
from config import get_config
from model_factories import MODEL_NAMES
from conftest import trial_path
import store
import trial_checks
import prepare_data
from config import RunOptions

STREAMS = ('init', 'data', 'dropout')
EXPECTED = {'all': {'init', 'data', 'dropout'}, 'init': {'init'}, 'data': {'data'},
            'dropout': {'dropout'}, 'none': set()}


@pytest.fixture
def cfg(tiny_config):
    return replace(tiny_config, max_iters=3, eval_interval=3, eval_iters=1, n_eval=8)


def run(cfg, tmp_path, trial, vary, model='minigpt', study='s'):
    opts = RunOptions(results_dir=str(tmp_path / 'results'), vary=vary, progress=False)
    return train.run_trial(model, 'gelu', trial, cfg, study, opts)


def stream_warnings(tmp_path, study='s'):
    trials, bad, _ = analyze_results.load_study(str(tmp_path / 'results' / study))
    assert not bad, bad
    groups = {}
    for t in trials:
        groups.setdefault(t['model'], {}).setdefault(t['activation'], []).append(t)
    warnings = []
    sanity.check_streams(groups, warnings)
    return warnings


def probs(record, tmp_path, study='s'):
    path = trial_path(str(tmp_path / 'results'), study, record['model'], record['activation'],
                            record['trial'], 'npz')
    with np.load(path) as z:
        return z['probs']


# ----------------------------------------------------------------------------- fingerprints

@pytest.mark.parametrize('vary', store.VARY_MODES)
def test_fingerprints_differ_in_exactly_the_varied_streams(cfg, tmp_path, vary):
    r0, r1 = run(cfg, tmp_path, 0, vary), run(cfg, tmp_path, 1, vary)
    for r in (r0, r1):
        assert set(r['streams']) == set(STREAMS) and all(len(v) == 16 for v in r['streams'].values())
        assert r['seeds'] == store.trial_seeds(cfg.seed_base, r['trial'], vary)  # seed numbers stay
    differ = {k for k in STREAMS if r0['streams'][k] != r1['streams'][k]}
    assert differ == EXPECTED[vary]
    assert stream_warnings(tmp_path) == []


def test_fingerprints_are_the_real_state(cfg):
    """Digests of weights, batch and RNG state: a change to any of them changes its digest."""
    model = model_factories.build_model('minigpt', 'gelu', replace(cfg, vocab_size=30), seed=1)
    batch = [(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))]
    cpu = torch.device('cpu')
    torch.manual_seed(5)
    f = trial_checks.stream_fingerprints(model, batch, cpu)
    assert trial_checks.stream_fingerprints(model, batch, cpu) == f, "reading the streams consumes nothing"
    torch.rand(1)
    assert trial_checks.stream_fingerprints(model, batch, cpu)['dropout'] != f['dropout']
    torch.manual_seed(5)
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1
    g = trial_checks.stream_fingerprints(model, [(batch[0][0] + 1, batch[0][1])], cpu)
    assert g['init'] != f['init'] and g['data'] != f['data'] and g['dropout'] == f['dropout']


def test_fingerprints_of_a_classifier(tiny_mnist, tmp_path):
    cfg = get_config('mnist_ffn', dataset='mnist', batch_size=8, eval_interval=2, eval_iters=2)
    opts = RunOptions(results_dir=str(tmp_path / 'results'), vary='data', data_dir=tiny_mnist, progress=False)
    rs = [train.run_trial('ffn', 'relu', k, cfg, 's', opts) for k in (0, 1)]
    assert {k for k in STREAMS if rs[0]['streams'][k] != rs[1]['streams'][k]} == {'data'}
    # a classifier's input has no time axis: there is no future to leak
    assert all(r['metrics']['causality_max_change'] is None for r in rs)


# ----------------------------------------------------------------------------- the seeding order

def test_nothing_seeds_the_global_rng_between_the_dropout_seed_and_the_first_step(cfg, tmp_path, monkeypatch):
    events = []

    def recorder(name, real):
        def f(*a, **k):
            events.append((name, a[0] if name == 'manual_seed' else None))
            return real(*a, **k)
        return f
    monkeypatch.setattr(torch, 'manual_seed', recorder('manual_seed', torch.manual_seed))
    monkeypatch.setattr(torch, 'set_rng_state', recorder('set_rng_state', torch.set_rng_state))
    monkeypatch.setattr(torch, 'seed', recorder('seed', torch.seed))
    monkeypatch.setattr(train, 'train_step', recorder('step', train.train_step))
    run(cfg, tmp_path, 1, 'init')
    seeds = store.trial_seeds(cfg.seed_base, 1, 'init')
    first_step = events.index(('step', None))
    assert events[first_step - 1] == ('manual_seed', seeds['dropout']), events[:first_step + 1]
    assert [e for e in events[:first_step] if e[0] == 'manual_seed'] == [('manual_seed', seeds['dropout'])]


def test_init_touches_no_cuda_generator_and_forks_every_live_one(cfg, monkeypatch):
    """No GPU here. Building seeds the CPU generator alone: no CUDA seed is set or queued (a
    queued torch.cuda.manual_seed_all(init) runs when CUDA starts, after any fork: the CUDA
    bug). Once CUDA is initialised (faked here: two GPUs), the fork covers every device."""
    cuda_seeds, forks = [], []
    monkeypatch.setattr(torch.cuda, 'manual_seed_all', lambda seed: cuda_seeds.append(seed))
    monkeypatch.setattr(torch.cuda, 'manual_seed', lambda seed: cuda_seeds.append(seed))
    c = replace(cfg, vocab_size=30)
    a = model_factories.build_model('charlm', 'relu', c, seed=3)
    assert cuda_seeds == []
    real_fork = torch.random.fork_rng

    def fork(devices=None, **kw):
        forks.append((list(devices), kw.get('device_type')))
        return real_fork(devices=[])  # the CPU fork only: there is no CUDA state to save here
    monkeypatch.setattr(torch.random, 'fork_rng', fork)
    monkeypatch.setattr(torch.cuda, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    b = model_factories.build_model('charlm', 'relu', c, seed=3)
    assert forks == [([0, 1], 'cuda')] and cuda_seeds == []
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_reseeding_with_the_init_seed_after_the_build_cannot_reach_dropout(cfg, tmp_path, monkeypatch):
    """The CUDA bug, planted on CPU: the global RNG is reseeded with the init seed right after
    the model is built (what torch.manual_seed(init) did to every CUDA generator). The dropout
    seed is applied after the build, so the leak changes nothing."""
    clean = run(cfg, tmp_path, 1, 'init', study='clean')
    real = model_factories.build_model

    def leaks_init_seed(*a, seed=None, **k):
        model = real(*a, seed=seed, **k)
        torch.manual_seed(seed)
        return model
    monkeypatch.setattr(train, 'build_model', leaks_init_seed)
    r0, r1 = run(cfg, tmp_path, 0, 'init'), run(cfg, tmp_path, 1, 'init')
    assert np.array_equal(probs(r1, tmp_path), probs(clean, tmp_path, 'clean'))
    assert r1['streams'] == clean['streams']
    assert r0['streams']['dropout'] == r1['streams']['dropout']
    assert stream_warnings(tmp_path) == []


def test_a_dropout_stream_drawn_from_the_init_seed_is_flagged(cfg, tmp_path, monkeypatch):
    """The leak planted where nothing can undo it (the dropout stream gets the init seed, the
    effect of the CUDA bug): under --vary init the analysis names the dropout stream."""
    real = train.seed_dropout_stream
    for k in (0, 1):
        init_seed = store.trial_seeds(cfg.seed_base, k, 'init')['init']
        monkeypatch.setattr(train, 'seed_dropout_stream', lambda seed, s=init_seed: real(s))
        run(cfg, tmp_path, k, 'init')
    w = stream_warnings(tmp_path)
    assert len(w) == 1 and 'minigpt/gelu: dropout stream differs across trials although --vary init' in w[0], w


def test_stream_check_wording_and_old_results(cfg, tmp_path):
    r0, r1 = run(cfg, tmp_path, 0, 'data'), run(cfg, tmp_path, 1, 'data')
    trials, _, _ = analyze_results.load_study(str(tmp_path / 'results' / 's'))

    def check(edit):
        ts = [{**t, 'record': {**t['record'], 'streams': dict(t['record']['streams'])}} for t in trials]
        edit(ts)
        w = []
        sanity.check_streams({'minigpt': {'gelu': ts}}, w)
        return w
    assert check(lambda ts: None) == []
    w = check(lambda ts: ts[1]['record']['streams'].update(data=ts[0]['record']['streams']['data']))
    assert w == ["minigpt/gelu: data stream identical across trials 0 and 1 although --vary data"]
    w = check(lambda ts: ts[1]['record']['streams'].update(init='0' * 16))
    assert len(w) == 1 and w[0].startswith("minigpt/gelu: init stream differs across trials although --vary data")
    # a result saved before streams were recorded is still read; the check says what it cannot verify
    w = check(lambda ts: ts[0]['record'].pop('streams'))
    assert w == ["minigpt/gelu: trial(s) 0 saved no stream fingerprints (older results): cannot verify "
                 "that --vary data changed only its streams"]
    os.remove(trial_path(str(tmp_path / 'results'), 's', 'minigpt', 'gelu', 1))
    os.remove(trial_path(str(tmp_path / 'results'), 's', 'minigpt', 'gelu', 1, 'npz'))
    import json
    path = trial_path(str(tmp_path / 'results'), 's', 'minigpt', 'gelu', 0)
    rec = json.load(open(path))
    del rec['streams']
    json.dump(rec, open(path, 'w'))
    assert analyze_results.load_study(str(tmp_path / 'results' / 's'))[1] == []  # still readable


# ----------------------------------------------------------------------------- causality probe

@pytest.mark.parametrize('model', MODEL_NAMES)
def test_causality_probe_is_zero_for_every_real_model(cfg, tmp_path, model):
    r = run(replace(cfg, max_iters=2, eval_interval=2), tmp_path, 0, 'all', model=model)
    change = r['metrics']['causality_max_change']
    assert isinstance(change, float) and change <= 1e-6, (model, change)


def test_causality_probe_catches_a_model_that_sees_the_next_token(cfg, tmp_path, monkeypatch):
    use_leaky_model(monkeypatch)
    r = run(replace(cfg, max_iters=2, eval_interval=2), tmp_path, 0, 'all')
    assert r['metrics']['causality_max_change'] > 1e-2
    # the probe itself: a real model is causal, the same model shifted by one token is not
    task = prepare_data.make_task(cfg)
    model = model_factories.build_model('minigpt', 'gelu', replace(cfg, **task.config_updates()), seed=0)
    assert trial_checks.causality_probe(model, task, torch.device('cpu')) == 0.0
    assert trial_checks.causality_probe(LeakyLM(model), task, torch.device('cpu')) > 1e-2
