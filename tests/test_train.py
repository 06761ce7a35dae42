"""Configs, data, seeds and what a trial saves: the trainer's science and its safety."""
import glob
import hashlib
import json
import os
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import fileio
import prepare_data
import train
from config import get_config, preset_names
from conftest import ROOT, limit, trial_path
from model_factories import build_model
from fileio import DataError
from prepare_data import make_task
import store
from config import RunOptions

SHAKESPEARE_DIR = os.environ.get('REPRO_DATA_DIR') or os.path.join(ROOT, '..', 'shared', 'data')
HAVE_SHAKESPEARE = os.path.exists(os.path.join(SHAKESPEARE_DIR, 'tinyshakespeare', 'input.txt'))


def run(cfg, tmp_path, trial=0, vary='all', study='s', **kw):
    opts = RunOptions(results_dir=str(tmp_path / 'results'), vary=vary, progress=False, **kw)
    return train.run_trial('minigpt', 'gelu', trial, cfg, study, opts)


def load_npz(record, tmp_path, study='s'):
    path = trial_path(str(tmp_path / 'results'), study, record['model'], record['activation'],
                            record['trial'], 'npz')
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------- configs

def test_presets_match_the_study_table():
    expected = {  # layers, n_embd, heads, block, batch, iters, eval every, eval iters, dropout, lr
        'cpu': (2, 128, 4, 128, 32, 200, 50, 50, 0.2, 3e-4),
        'gpu_lite': (2, 128, 4, 128, 64, 200, 50, 200, 0.2, 3e-4),
        'gpu': (2, 256, 4, 256, 64, 500, 100, 200, 0.2, 3e-4),
        'gpu_full': (6, 384, 6, 256, 64, 5000, 500, 200, 0.2, 3e-4),
    }
    for name, row in expected.items():
        c = get_config(name)
        assert (c.n_layer, c.n_embd, c.n_head, c.block_size, c.batch_size, c.max_iters, c.eval_interval,
                c.eval_iters, c.dropout, c.learning_rate) == row, name
        assert c.lr_schedule == 'constant' and c.weight_decay == 0 and c.grad_clip == 0
    assert {'cpu', 'gpu_lite', 'gpu', 'gpu_full', 'cpu_reference'} <= set(preset_names())


def test_overrides_and_bad_values():
    c = get_config('cpu', max_iters=10, n_embd=64, n_eval=200)
    assert (c.max_iters, c.n_embd, c.n_eval, c.n_layer) == (10, 64, 200, 2)
    with pytest.raises(ValueError, match='unknown config key.*n_embd'):
        get_config('cpu', n_emb=3)
    with pytest.raises(ValueError, match='unknown config.*cpu, gpu_lite'):
        get_config('tpu')
    for bad in (dict(dropout=1.0), dict(n_head=3), dict(lr_schedule='linear'), dict(batch_size=0)):
        with pytest.raises(ValueError):
            get_config('cpu', **bad)


@pytest.mark.parametrize('args,needle', [
    (['--max_iters', 'ten'], "invalid int value: 'ten'"),
    (['--max_iter', '3'], 'unrecognized arguments: --max_iter 3; did you mean --max_iters?'),
    (['--config', 'huge'], "unknown config 'huge'"),
    (['--n_embd', '30'], 'divisible'),
    (['--vary', 'seeds'], "invalid choice: 'seeds'"),
])
def test_cli_errors_are_one_line_and_nonzero(args, needle, tmp_path, procs):
    p = procs.run([sys.executable, 'train.py', '--model', 'minigpt', '--activation', 'gelu',
                   '--results-dir', str(tmp_path), *args], limit())
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert not os.listdir(tmp_path)


def test_cli_unknown_model_and_activation_list_choices(tmp_path, procs):
    for flag, bad, valid in (('--model', 'gpt9', 'nanotransformer'), ('--activation', 'relu9', 'geglu')):
        argv = {'--model': 'minigpt', '--activation': 'gelu', flag: bad}
        p = procs.run([sys.executable, 'train.py', *sum(([k, v] for k, v in argv.items()), []),
                       '--results-dir', str(tmp_path)], limit())
        assert p.returncode != 0 and valid in p.stderr and len(p.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- data

def test_checksum_rejects_a_corrupted_corpus(tmp_path):
    bad = tmp_path / 'tinyshakespeare' / 'input.txt'
    bad.parent.mkdir()
    bad.write_text('To be, or not to be' * 100)
    with pytest.raises(DataError, match='sha256'):
        prepare_data.shakespeare_path(str(tmp_path))
    assert bad.exists(), "a corrupt file is reported, not silently replaced"


def test_offline_without_corpus_says_where_to_put_it(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise OSError('network unreachable')
    monkeypatch.setattr(fileio.urllib.request, 'urlopen', no_network)
    with pytest.raises(DataError) as e:
        prepare_data.shakespeare_path(str(tmp_path))
    assert str(tmp_path / 'tinyshakespeare' / 'input.txt') in str(e.value)
    assert not list(tmp_path.rglob('*.tmp'))


def test_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv('REPRO_DATA_DIR', str(tmp_path))
    assert fileio.data_dir() == str(tmp_path)
    assert fileio.data_dir('elsewhere') == 'elsewhere'


@pytest.mark.skipif(not HAVE_SHAKESPEARE, reason='Tiny Shakespeare not found (set REPRO_DATA_DIR)')
def test_real_corpus_verifies_and_splits():
    path = prepare_data.shakespeare_path(SHAKESPEARE_DIR, fetch=False)
    corpus = prepare_data.load_corpus(path)
    assert os.path.getsize(path) == 1115394 and corpus.vocab_size == 65
    assert len(corpus.train) == int(0.9 * 1115394) and len(corpus.train) + len(corpus.val) == 1115394


def test_text_file_task_batches_and_eval_set(tiny_config):
    task = make_task(tiny_config)
    g = torch.Generator().manual_seed(0)
    x, y = task.get_batch('train', 5, g)
    assert x.shape == y.shape == (5, tiny_config.block_size)
    assert torch.equal(x[:, 1:], y[:, :-1]), "targets are the inputs shifted by one"
    assert task.eval_x.shape == (tiny_config.n_eval, tiny_config.block_size)
    # the evaluation windows come from the validation split only
    val = task.corpus.val
    for s, row in zip(task.eval_indices[:5], task.eval_x[:5]):
        assert torch.equal(val[s:s + tiny_config.block_size], row)
    assert make_task(tiny_config).eval_hash == task.eval_hash
    assert make_task(replace(tiny_config, eval_seed=99)).eval_hash != task.eval_hash


def test_bad_text_inputs(tmp_path, tiny_config):
    binary = tmp_path / 'b.bin'
    binary.write_bytes(b'\xff\xfe\x00\x81' * 100)
    with pytest.raises(DataError, match='not UTF-8'):
        make_task(replace(tiny_config, dataset=str(binary)))
    short = tmp_path / 's.txt'
    short.write_text('abc' * 10)
    with pytest.raises(DataError, match='too few'):
        make_task(replace(tiny_config, dataset=str(short)))
    with pytest.raises(DataError, match='shakespeare_char, mnist, mnist1d or the path'):
        make_task(replace(tiny_config, dataset=str(tmp_path / 'missing.txt')))


# ----------------------------------------------------------------------------- seeds

def test_trial_seeds_follow_vary():
    assert store.trial_seeds(42, 3, 'all') == {'trial_seed': 45, 'init': 45, 'data': 45, 'dropout': 45}
    assert store.trial_seeds(42, 3, 'init') == {'trial_seed': 45, 'init': 45, 'data': 42, 'dropout': 42}
    assert store.trial_seeds(42, 3, 'none') == {'trial_seed': 45, 'init': 42, 'data': 42, 'dropout': 42}
    with pytest.raises(ValueError, match='all, init, data, dropout, none'):
        store.trial_seeds(42, 0, 'everything')


def test_same_trial_twice_is_bitwise_identical(tiny_config, tmp_path):
    a = run(tiny_config, tmp_path / 'a')
    b = run(tiny_config, tmp_path / 'b')
    pa, pb = load_npz(a, tmp_path / 'a'), load_npz(b, tmp_path / 'b')
    assert pa['probs'].tobytes() == pb['probs'].tobytes()
    assert a['predictions_sha256'] == b['predictions_sha256']


@pytest.mark.parametrize('vary,identical', [('all', False), ('init', False), ('data', False),
                                            ('dropout', False), ('none', True)])
def test_vary_controls_what_differs_between_trials(tiny_config, tmp_path, vary, identical):
    r0, r1 = run(tiny_config, tmp_path, 0, vary), run(tiny_config, tmp_path, 1, vary)
    p0, p1 = load_npz(r0, tmp_path)['probs'], load_npz(r1, tmp_path)['probs']
    assert np.array_equal(p0, p1) == identical
    assert r0['eval_hash'] == r1['eval_hash'], "every trial of a study is evaluated on the same inputs"
    assert np.array_equal(load_npz(r0, tmp_path)['eval_indices'], load_npz(r1, tmp_path)['eval_indices'])


# ----------------------------------------------------------------------------- what a trial saves

def test_trial_record_and_predictions(tiny_config, tmp_path):
    r = run(tiny_config, tmp_path, trial=2, deterministic=True)
    z = load_npz(r, tmp_path)
    n, V = tiny_config.n_eval, r['config']['vocab_size']
    assert z['probs'].shape == (n, V) and z['probs'].dtype == np.float32
    np.testing.assert_allclose(z['probs'].sum(1), 1, atol=1e-5)
    assert z['eval_indices'].dtype == np.int64 and z['targets'].shape == (n,)
    assert r['source'] == 'measured' and r['seeds']['trial_seed'] == tiny_config.seed_base + 2
    assert r['config']['n_embd'] == tiny_config.n_embd and r['deterministic'] is True
    for key in ('git_commit', 'git_dirty', 'torch_version', 'cuda_version', 'device', 'device_name',
                'deterministic', 'started_at', 'finished_at'):
        assert key in r['provenance']
    m = r['metrics']
    for key in ('train_loss', 'val_loss', 'val_accuracy', 'token_accuracy', 'training_time', 'total_time',
                'tokens_per_sec', 'n_params', 'peak_memory_mb'):
        assert m[key] is not None, key
    # accuracy on the evaluation set is exactly what the saved predictions say
    assert m['val_accuracy'] == pytest.approx(float((z['probs'].argmax(1) == z['targets']).mean()))
    assert r['history']['iter'] == [0, 3, 6] and len(r['history']['val_loss']) == 3
    assert all(g is not None for g in r['history']['grad_norm'][1:]), "gradient norm logged at eval points"
    npz_path = trial_path(str(tmp_path / 'results'), 's', 'minigpt', 'gelu', 2, 'npz')
    assert hashlib.sha256(open(npz_path, 'rb').read()).hexdigest() == r['predictions_sha256']
    # atomic writes go through a private temp file; the result gets a normal file's mode
    umask = os.umask(0)
    os.umask(umask)
    for path in (npz_path, npz_path[:-3] + 'json'):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path


def test_finished_trial_is_reused_and_a_different_one_never_overwritten(tiny_config, tmp_path):
    r = run(tiny_config, tmp_path)
    again = run(tiny_config, tmp_path)
    assert again['provenance']['started_at'] == r['provenance']['started_at'], "done trials are not retrained"
    path = trial_path(str(tmp_path / 'results'), 's', 'minigpt', 'gelu', 0)
    before = open(path, 'rb').read()
    with pytest.raises(FileExistsError, match='n_embd'):
        run(replace(tiny_config, n_embd=32), tmp_path)
    assert open(path, 'rb').read() == before
    forced = run(replace(tiny_config, n_embd=32), tmp_path, force=True)
    assert forced['config']['n_embd'] == 32


def test_a_killed_trial_leaves_no_json(tiny_config, tmp_path, monkeypatch):
    calls = {'n': 0}
    real = train.train_step

    def dies_midway(*a, **k):
        calls['n'] += 1
        if calls['n'] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(train, 'train_step', dies_midway)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config, tmp_path)
    # dying while writing predictions leaves neither file, nor a temp file
    monkeypatch.setattr(train, 'train_step', real)

    def broken_savez(f, **arrays):
        f.write(b'PK partial')
        raise KeyboardInterrupt
    monkeypatch.setattr(np, 'savez', broken_savez)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config, tmp_path)
    left = [f for _, _, files in os.walk(tmp_path / 'results') for f in files]  # hidden temp files too
    assert sorted(left) == ['.trial_0.ckpt', '.trial_0.ckpt.json'], left  # only the checkpoint the next run resumes from (and its metadata)


def test_non_finite_loss_stops_the_trial(tiny_config, tmp_path):
    with pytest.raises(train.TrainingError, match='non-finite'):
        run(replace(tiny_config, learning_rate=1e30), tmp_path)
    assert not glob.glob(str(tmp_path / 'results' / '**' / '*.json'), recursive=True)


# ----------------------------------------------------------------------------- recipe options (issue 6)

def test_learning_rate_schedule():
    c = get_config('cpu', lr_schedule='cosine', learning_rate=1e-3, min_lr=1e-4, warmup_iters=100,
                   lr_decay_iters=2000, max_iters=2000)
    assert train.lr_at(0, c) == pytest.approx(1e-3 * 1 / 101)
    assert train.lr_at(99, c) == pytest.approx(1e-3 * 100 / 101)
    assert train.lr_at(100, c) == pytest.approx(1e-3)
    assert train.lr_at(1050, c) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # mid-decay: half way
    assert train.lr_at(2000, c) == pytest.approx(1e-4)
    assert train.lr_at(5000, c) == pytest.approx(1e-4)
    assert train.lr_at(1234, get_config('cpu')) == 3e-4


def _tiny_model_and_batches(tiny_config, n=2, b=4, seed=0):
    task = make_task(tiny_config)
    cfg = replace(tiny_config, dropout=0.0, **task.config_updates())
    g = torch.Generator().manual_seed(seed)
    return cfg, build_model('minigpt', 'gelu', cfg, seed=0), [task.get_batch('train', b, g) for _ in range(n)]


def test_gradient_clipping_bounds_the_gradient(tiny_config):
    from contextlib import nullcontext
    cfg, model, batches = _tiny_model_and_batches(tiny_config)
    cfg = replace(cfg, grad_clip=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches[0]
    model(x, y)[1].backward()
    raw = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    opt.zero_grad()
    _, norm = train.train_step(model, opt, [batches[0]], cfg, nullcontext())
    assert norm == pytest.approx(raw.item(), rel=1e-5) and raw > cfg.grad_clip
    # with SGD at lr 1 the update is the clipped gradient: its norm is the clip value
    step = torch.sqrt(sum(((p.detach() - q) ** 2).sum() for p, q in zip(model.parameters(), before))).item()
    assert step == pytest.approx(cfg.grad_clip, rel=1e-4)


def test_gradient_accumulation_equals_a_larger_batch(tiny_config):
    from contextlib import nullcontext
    cfg, m1, batches = _tiny_model_and_batches(tiny_config, n=3)
    _, m2, _ = _tiny_model_and_batches(tiny_config, n=3)
    o1, o2 = (train.make_optimizer(m, cfg, torch.device('cpu')) for m in (m1, m2))
    train.train_step(m1, o1, batches, replace(cfg, grad_accum_steps=3), nullcontext())
    big = (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    train.train_step(m2, o2, [big], cfg, nullcontext())
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_weight_decay_spares_biases_norms_and_embeddings(tiny_config):
    cfg, model, _ = _tiny_model_and_batches(tiny_config)
    opt = train.make_optimizer(model, replace(cfg, weight_decay=0.1), torch.device('cpu'))
    decayed = {id(p) for g in opt.param_groups if g['weight_decay'] > 0 for p in g['params']}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2 and 'wte' not in name and 'wpe' not in name), name


def test_defaults_are_the_plain_adamw_recipe(tiny_config, tmp_path):
    """With the default recipe (constant lr, no decay, no clipping, no accumulation) a trial
    equals a hand-written AdamW loop on the same batches, dropout stream and init."""
    cfg = replace(tiny_config, eval_interval=100, max_iters=5)
    r = run(cfg, tmp_path)
    task = make_task(cfg)
    cfg = replace(cfg, **task.config_updates())
    seeds = store.trial_seeds(cfg.seed_base, 0, 'all')
    torch.manual_seed(seeds['dropout'])
    stream = task.train_batches(cfg.batch_size, torch.Generator().manual_seed(seeds['data']))
    model = build_model('minigpt', 'gelu', cfg, seed=seeds['init'])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    model.eval(); [model(task.eval_x[:1])]; model.train()  # the trainer's iter-0 estimate uses no RNG
    for _ in range(cfg.max_iters):
        x, y = next(stream)
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(task.eval_x)[0][:, -1], -1).numpy()
    np.testing.assert_allclose(load_npz(r, tmp_path)['probs'], probs, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- end to end

@pytest.mark.skipif(not HAVE_SHAKESPEARE, reason='Tiny Shakespeare not found (set REPRO_DATA_DIR)')
def test_end_to_end_on_the_real_corpus(tmp_path, procs):
    p = procs.run([sys.executable, 'train.py', '--model', 'minigpt', '--activation', 'swiglu',
                   '--config', 'cpu', '--trials', '2', '--max_iters', '6', '--eval_interval', '3',
                   '--eval_iters', '2', '--n_eval', '50', '--results-dir', str(tmp_path),
                   '--data-dir', SHAKESPEARE_DIR], limit(trials=2))
    assert p.returncode == 0, p.stderr
    # a run with overrides says where its results go, and it is not the preset's own folder
    study = tmp_path / 'cpu_eval_interval3_eval_iters2_max_iters6_n_eval50'
    assert f"results go to {study}" in p.stdout and not (tmp_path / 'cpu').exists()
    files = sorted(os.listdir(study / 'minigpt' / 'swiglu'))
    assert files == ['trial_0.json', 'trial_0.npz', 'trial_1.json', 'trial_1.npz']
    r = json.load(open(study / 'minigpt' / 'swiglu' / 'trial_1.json'))
    assert r['data']['sha256'] == prepare_data.SHAKESPEARE_SHA256 and r['config']['vocab_size'] == 65
    assert r['metrics']['val_loss'] < r['history']['val_loss'][0], "six steps already lower the loss"
    assert 'val loss' in p.stdout
