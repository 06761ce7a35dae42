"""Sanity rules that must hold on real trials (issue 23) and one study = one config, one writer
(issue 20): the original study's bug planted in the trainer and caught with no comparison;
repeat noise as the floor of the 'seeds not applied' and 'activation not applied' rules; a
second config or a second writer refused before training."""
import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
import torch.nn.functional as F

import activations
import analyze_results
import cli
import store
import train
from activation_names import applied_function
from config import RunOptions

N_EVAL, N_CLASSES = 200, 12


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def jitter(probs, seed, rel):
    p = probs.astype(np.float64) * (1 + rel * np.random.default_rng(seed).normal(size=probs.shape))
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def trial_probs(k):
    rng = np.random.default_rng(1000 + k)
    return softmax(np.random.default_rng(0).normal(size=(N_EVAL, N_CLASSES)) + 0.5 * rng.normal(size=(N_EVAL, N_CLASSES)))


def write(study, act, k, probs, vary='all', calls='named'):
    folder = study / 'minigpt' / act
    folder.mkdir(parents=True, exist_ok=True)
    npz = folder / f'trial_{k}.npz'
    np.savez(npz, probs=probs, targets=np.arange(N_EVAL) % N_CLASSES, eval_indices=np.arange(N_EVAL))
    s = 42 if vary == 'none' else 42 + k
    rec = {'schema_version': 1, 'source': 'measured', 'task': 'lm', 'model': 'minigpt', 'activation': act, 'trial': k,
           'vary': vary, 'seeds': {'trial_seed': 42 + k, 'init': s, 'data': s, 'dropout': s},
           'config': {'n_layer': 1}, 'eval_hash': 'h', 'predictions_file': npz.name,
           'predictions_sha256': hashlib.sha256(npz.read_bytes()).hexdigest(),
           'metrics': {'train_loss': 1.6, 'val_loss': 1.7, 'training_time': 1.0,
                       'val_accuracy': float((probs.argmax(1) == np.arange(N_EVAL) % N_CLASSES).mean())},
           'history': {'iter': [0], 'train_loss': [1.6], 'val_loss': [1.7]}, 'provenance': {}}
    if calls is not None:
        rec['activation_calls'] = {applied_function(act): 1} if calls == 'named' else calls
    (folder / f'trial_{k}.json').write_text(json.dumps(rec))


def test_repeat_noise_is_the_floor_of_the_activation_rule(tmp_path):
    """Two runs of one seed differ by a known small amount (the repeat); an 'other activation'
    within 3x of it is flagged, one at 100x is not."""
    study = tmp_path / 's'
    for k in range(3):
        write(study, 'relu', k, trial_probs(k))
        write(study, 'gelu', k, jitter(trial_probs(k), 10 + k, 3e-4), calls=None)   # ~3x the repeat noise
        write(study, 'swish', k, jitter(trial_probs(k), 20 + k, 1e-2))              # ~100x
    write(study / 'repeats', 'relu', 0, jitter(trial_probs(0), 99, 1e-4), vary='none')
    s = analyze_results.build_summary(str(study))
    noise = float(np.mean(np.abs(jitter(trial_probs(0), 99, 1e-4) - trial_probs(0)).sum(1) / 2))
    assert 'repeat noise measured (1 repeat(s))' in s['sanity_evidence']['minigpt/relu']
    assert 'repeat noise not measured' in s['sanity_evidence']['minigpt/gelu']
    hits = [w for w in s['warnings'] if 'activation probably not applied' in w]
    assert len(hits) == 1 and 'gelu and relu' in hits[0] and 'x the measured repeat noise' in hits[0], hits
    ratios = [float(x.split('x the measured')[0].rsplit(', ', 1)[1]) for x in hits[0].split('relative PD')[1:]]
    assert all(1 < r < 10 for r in ratios) and noise > 0
    assert not [w for w in s['warnings'] if 'swish' in w and 'not applied' in w]


def test_seeds_not_applied_is_caught_in_a_study_of_one_activation(tmp_path):
    """Trials whose 'different seeds' differ only by GPU-like noise: with no second activation
    there was no scale to compare against; repeat noise is one."""
    study = tmp_path / 's'
    for k in range(3):
        write(study, 'relu', k, jitter(trial_probs(0), 50 + k, 1e-4))
    before = analyze_results.build_summary(str(study))
    assert not [w for w in before['warnings'] if 'seeds not applied' in w]  # the case the issue reports
    write(study / 'repeats', 'relu', 0, jitter(trial_probs(0), 99, 1e-4), vary='none')
    after = analyze_results.build_summary(str(study))
    hits = [w for w in after['warnings'] if 'seeds not applied' in w]
    assert len(hits) == 3 and all('measured repeat noise' in w for w in hits)


def test_the_original_bug_is_caught_with_no_comparison(tiny_config, tmp_path, monkeypatch):
    """'gelu' built with ReLU inside, trained with other seeds than the relu trials, so no
    comparison of predictions can tell: the trials' own record says gelu never ran."""
    real = activations.get_activation_fn
    monkeypatch.setattr(activations, 'get_activation_fn', lambda name: F.relu if name == 'gelu' else real(name))
    cfg = replace(tiny_config, max_iters=2, eval_interval=2)
    opts = RunOptions(results_dir=str(tmp_path), progress=False, threads=1, snapshots='off')
    for k in range(3):
        train.run_trial('minigpt', 'gelu', k, replace(cfg, seed_base=500), 's', opts)
        train.run_trial('minigpt', 'relu', k, cfg, 's', opts)
    s = analyze_results.build_summary(str(tmp_path / 's'))
    errors = [w for w in s['warnings'] if w.startswith('ERROR minigpt/gelu') and 'gelu (gelu) was never called' in w]
    assert len(errors) == 3 and all('called: relu x' in w for w in errors)
    assert not [w for w in s['warnings'] if w.startswith('ERROR minigpt/relu')]


def test_a_second_config_in_one_study_is_refused_before_training(tiny_corpus, tmp_path, capsys):
    base = ['--trials', '1', '--threads', '1', '--data', tiny_corpus, '--results-dir', str(tmp_path),
            '--study', 's', '--n_layer', '1', '--n_embd', '16', '--n_head', '2', '--block_size', '16',
            '--batch_size', '4', '--eval_iters', '2', '--n_eval', '24', '--max_iters', '2', '--eval_interval', '2']
    train.main(['--model', 'minigpt', '--activation', 'relu', *base])
    with pytest.raises(SystemExit) as e:
        train.main(['--model', 'minigpt', '--activation', 'gelu', *base, '--max_iters', '3'])
    err = capsys.readouterr().err
    assert e.value.code == cli.EXIT_USAGE and 'holds trials of another config' in err and 'max_iters: 2 -> 3' in err
    assert not (tmp_path / 's' / 'minigpt' / 'gelu').exists()


def test_train_py_respects_the_study_lock(tiny_corpus, tmp_path, capsys):
    lock = store.StudyLock(str(tmp_path / 's'))  # a sweep holding the study
    try:
        with pytest.raises(SystemExit) as e:
            train.main(['--model', 'minigpt', '--activation', 'relu', '--trials', '1', '--data', tiny_corpus,
                        '--results-dir', str(tmp_path), '--study', 's', '--max_iters', '2', '--n_eval', '24',
                        '--block_size', '16'])
    finally:
        lock.release()
    assert e.value.code == cli.EXIT_USAGE and 'another run' in capsys.readouterr().err
    assert not list((tmp_path / 's').glob('*/*/trial_*'))
