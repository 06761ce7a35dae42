"""Resume (issue 15): mid-trial checkpoints give bitwise the same trial as an uninterrupted
run, bad checkpoints are refused and kept aside, damaged results are set aside and retrained,
and a sweep killed again and again finishes every trial exactly once.

Kills are real SIGKILLs at chosen points (checkpoint.py's REPRO_TEST_KILL_AT hook, no timing):
in a `python train.py` subprocess once, otherwise in a forked child of this process (no
second torch import: the tests stay fast). Every run uses one torch thread."""
import glob
import itertools
import json
import os
import random
import signal
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import analyze_results
import checkpoint
import mnist
import report
import run_all_experiments as rae
import store
import train
from conftest import limit, trial_path
from fileio import sha256_file
from prepare_data import make_task
from config import RunOptions

# 12 iterations, an evaluation (and by default a checkpoint) every 4: checkpoints at 4 and 8
TINY = ['--n_layer', '1', '--n_embd', '16', '--n_head', '2', '--block_size', '16', '--batch_size', '4',
        '--max_iters', '12', '--eval_interval', '4', '--eval_iters', '2', '--n_eval', '24', '--dropout', '0.1']


def train_argv(corpus, results, vary='all', *extra):
    return ['--model', 'minigpt', '--activation', 'gelu', '--trials', '1', '--threads', '1', *TINY,
            '--data', corpus, '--results-dir', str(results), '--study', 's', '--vary', vary, *extra]


def KEY(results, m='minigpt', a='gelu', k=0):
    return store.TrialKey(str(results), 's', m, a, k)


def trial_files(results, m='minigpt', a='gelu', k=0):
    path = trial_path(str(results), 's', m, a, k)
    with open(path) as f:
        rec = json.load(f)
    with np.load(path[:-len('json')] + 'npz') as z:
        return rec, z['probs']


def assert_same_trial(a, b):
    """Bitwise the same predictions, loss history and validation loss; the same stream
    fingerprints (a resumed trial has them from its checkpoint)."""
    (ra, pa), (rb, pb) = a, b
    assert pa.dtype == np.float32 and np.array_equal(pa, pb)
    assert ra['streams'] == rb['streams'] and set(ra['streams']) == {'init', 'data', 'dropout'}
    for k in ('iter', 'train_loss', 'val_loss', 'lr', 'grad_norm'):
        assert ra['history'][k] == rb['history'][k], k
    assert ra['metrics']['val_loss'] == rb['metrics']['val_loss']
    assert ra['metrics']['train_loss'] == rb['metrics']['train_loss']


def killed(procs, fn, kill_at, trials=1):
    """Run fn() in a forked child with REPRO_TEST_KILL_AT=kill_at; assert that it died by SIGKILL.
    The child is reaped (or killed and reaped) with the test, however it ends."""
    def child():
        os.environ[checkpoint.KILL_ENV] = kill_at
        fn()
    status = procs.wait(procs.fork(child, limit(trials=trials, processes=0)))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"not killed at {kill_at}: {status}"


def interrupted(monkeypatch, after_steps, fn):
    """Run fn() until it has taken `after_steps` training steps, then stop it (in-process, as
    Ctrl-C does: train.main exits 130)."""
    real, calls = train.train_step, {'n': 0}

    def step(*a, **k):
        calls['n'] += 1
        if calls['n'] > after_steps:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(train, 'train_step', step)
    with pytest.raises((KeyboardInterrupt, SystemExit)) as e:
        fn()
    assert e.type is KeyboardInterrupt or e.value.code == 130
    monkeypatch.setattr(train, 'train_step', real)


@pytest.fixture(scope='module')
def uninterrupted(corpus, tmp_path_factory):
    """The uninterrupted trial per vary mode, without checkpoints (they must not change it)."""
    out = {}
    for vary in ('all', 'dropout'):
        results = tmp_path_factory.mktemp(f'ref_{vary}')
        train.main(train_argv(corpus, results, vary, '--checkpoint-every', '0'))
        out[vary] = trial_files(results)
        assert out[vary][0]['resumed_from'] == [] and out[vary][0]['metrics']['checkpoint_time'] == 0
    return out


# ----------------------------------------------------------------------------- SIGKILL, then the same command

@pytest.mark.parametrize('vary,kills,resumed_from,where', [
    ('all', ['step:4'], [4], 'just after the checkpoint at 4'),
    ('all', ['step:6'], [4], 'between the checkpoints at 4 and 8'),
    ('all', ['checkpoint-write:2'], [4], 'while the checkpoint at 8 is being written'),
    ('all', ['step:5', 'step:6'], [4, 8], 'twice: at 5, then at 4 + 6 = 10'),
    ('dropout', ['step:9'], [8], 'between checkpoints, --vary dropout'),
    ('dropout', ['checkpoint-write:2'], [4], 'while writing, --vary dropout'),
])
def test_sigkilled_trial_resumes_bitwise(vary, kills, resumed_from, where, corpus, tmp_path, uninterrupted,
                                         capsys, procs):
    argv = train_argv(corpus, tmp_path, vary)
    ckpt = KEY(tmp_path).ckpt
    for kill_at in kills:
        killed(procs, lambda: train.main(argv), kill_at)
        assert os.path.exists(ckpt) and not os.path.exists(trial_path(str(tmp_path), 's', 'minigpt', 'gelu', 0))
        assert bool(store.checkpoint_temp_files(KEY(tmp_path))) == kill_at.startswith('checkpoint-write')  # half a file: unused
    train.main(argv)  # the same command again
    rec, probs = trial_files(tmp_path)
    assert rec['resumed_from'] == resumed_from, where
    assert_same_trial((rec, probs), uninterrupted[vary])
    assert sorted(os.listdir(os.path.dirname(ckpt))) == ['trial_0.json', 'trial_0.npz']  # checkpoint gone
    assert f"resumed from iteration {', '.join(map(str, resumed_from))}" in capsys.readouterr().out


def test_sigkilled_train_py_process_resumes_bitwise(corpus, tmp_path, uninterrupted, procs):
    """The real command line in a real process."""
    argv = [sys.executable, 'train.py', *train_argv(corpus, tmp_path)]
    p = procs.run(argv, limit(trials=1), env={**os.environ, checkpoint.KILL_ENV: 'step:5'})
    assert p.returncode == -signal.SIGKILL, p.stderr
    p = procs.run(argv, limit(trials=1))
    assert p.returncode == 0, p.stderr
    rec, probs = trial_files(tmp_path)
    assert rec['resumed_from'] == [4] and 'resumed from iteration 4' in p.stdout
    assert_same_trial((rec, probs), uninterrupted['all'])


def test_moe_accumulation_and_early_stopping_state_survive_a_resume(tiny_config, tmp_path, monkeypatch):
    """switchlm's routing statistics (a model hook), gradient accumulation (the stream's
    position) and early stopping's best weights are restored, not recomputed."""
    # lr 0.2: the best validation loss is at iteration 10, and training stops at 14 with those weights
    cfg = replace(tiny_config, max_iters=16, eval_interval=2, grad_accum_steps=2, learning_rate=0.2,
                  early_stop_patience=2)

    def run(results):
        return train.run_trial('switchlm', 'relu', 0, cfg, 's',
                               RunOptions(results_dir=str(results), progress=False, threads=1))
    ref = run(tmp_path / 'ref')
    assert ref['metrics']['stopped_early_at'] == 14 and np.argmin(ref['history']['val_loss']) == 5
    interrupted(monkeypatch, 13, lambda: run(tmp_path / 'res'))  # the last checkpoint: 12, best weights of 10
    rec = run(tmp_path / 'res')
    assert rec['resumed_from'] == [12]
    for k in ('moe_train_dropped_fraction', 'moe_train_aux_loss', 'moe_dropped_fraction', 'stopped_early_at',
              'val_loss', 'iters'):
        assert rec['metrics'][k] == ref['metrics'][k], k
    assert rec['history'] == ref['history']
    with np.load(trial_path(str(tmp_path / 'ref'), 's', 'switchlm', 'relu', 0, 'npz')) as a, \
            np.load(trial_path(str(tmp_path / 'res'), 's', 'switchlm', 'relu', 0, 'npz')) as b:
        assert all(np.array_equal(a[k], b[k]) for k in a.files) and a.files == b.files


# ----------------------------------------------------------------------------- data streams restart bitwise

def test_text_stream_restarts_at_any_position(tiny_config):
    task = make_task(tiny_config)
    whole = list(itertools.islice(task.train_batches(4, torch.Generator().manual_seed(3)), 12))
    for start in (0, 1, 7):
        again = list(itertools.islice(task.train_batches(4, torch.Generator().manual_seed(3), start=start), 3))
        assert all(torch.equal(a, b) for x, y in zip(whole[start:start + 3], again) for a, b in zip(x, y))


def test_classification_stream_restarts_across_epochs():
    task = mnist.ClassificationTask.__new__(mnist.ClassificationTask)  # the stream needs only the split
    task.train_x, task.train_y = torch.randn(50, 40), torch.arange(50) % 10
    whole = list(itertools.islice(task.train_batches(8, torch.Generator().manual_seed(5)), 30))  # 7 per epoch
    for start in (0, 3, 6, 7, 13, 14, 20):
        again = list(itertools.islice(task.train_batches(8, torch.Generator().manual_seed(5), start=start), 9))
        assert all(torch.equal(a, b) for x, y in zip(whole[start:start + 9], again) for a, b in zip(x, y)), start


# ----------------------------------------------------------------------------- refused checkpoints

@pytest.mark.parametrize('change,needle', [
    (['--learning_rate', '0.002'], 'belongs to another config or run (config.learning_rate: 0.0003 -> 0.002)'),
    (['--threads', '2'], 'belongs to another config or run (run.threads: 1 -> 2)'),
])
def test_checkpoint_of_another_config_is_refused_and_kept(change, needle, corpus, tmp_path, monkeypatch, capsys):
    interrupted(monkeypatch, 6, lambda: train.main(train_argv(corpus, tmp_path)))
    ckpt = KEY(tmp_path).ckpt
    saved = open(ckpt, 'rb').read()
    capsys.readouterr()
    train.main(train_argv(corpus, tmp_path, 'all', *change))
    err = [ln for ln in capsys.readouterr().err.splitlines() if 'checkpoint' in ln]
    assert len(err) == 1 and needle in err[0] and 'the trial starts over' in err[0], err
    kept = glob.glob(str(tmp_path / 's' / 'damaged' / '*' / 'minigpt' / 'gelu' / 'trial_0.ckpt'))
    assert len(kept) == 1 and f"kept as {kept[0]}" in err[0] and open(kept[0], 'rb').read() == saved
    assert trial_files(tmp_path)[0]['resumed_from'] == []


def test_truncated_checkpoint_is_reported_kept_and_the_trial_starts_over(corpus, tmp_path, uninterrupted,
                                                                         monkeypatch, capsys):
    interrupted(monkeypatch, 9, lambda: train.main(train_argv(corpus, tmp_path)))
    ckpt = KEY(tmp_path).ckpt
    half = open(ckpt, 'rb').read()[:os.path.getsize(ckpt) // 2]
    open(ckpt, 'wb').write(half)
    capsys.readouterr()
    train.main(train_argv(corpus, tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'is truncated or corrupt' in err[0] and 'the trial starts over' in err[0], err
    kept = glob.glob(str(tmp_path / 's' / 'damaged' / '*' / 'minigpt' / 'gelu' / 'trial_0.ckpt'))
    assert len(kept) == 1 and open(kept[0], 'rb').read() == half
    rec, probs = trial_files(tmp_path)
    assert rec['resumed_from'] == []
    assert_same_trial((rec, probs), uninterrupted['all'])


def test_force_starts_over_and_checkpoint_every_is_validated(corpus, tmp_path, monkeypatch, capsys):
    interrupted(monkeypatch, 6, lambda: train.main(train_argv(corpus, tmp_path)))
    train.main(train_argv(corpus, tmp_path, 'all', '--force'))
    assert trial_files(tmp_path)[0]['resumed_from'] == []
    assert not glob.glob(str(tmp_path / 's' / '**' / '.trial_*'), recursive=True)
    with pytest.raises(SystemExit) as e:
        train.main(train_argv(corpus, tmp_path, 'all', '--checkpoint-every', '-1'))
    assert e.value.code == 2
    assert '--checkpoint-every must be >= 0' in capsys.readouterr().err


# ----------------------------------------------------------------------------- sweeps

GRID = ['--models', 'minigpt', '--activations', 'relu', 'gelu', '--trials', '3']  # 6 trials
JOBS = [('minigpt', a, k) for a in ('relu', 'gelu') for k in range(3)]


def sweep_argv(corpus, results, *extra, max_iters='12'):
    tiny = [*TINY]
    tiny[tiny.index('--max_iters') + 1] = max_iters
    return [*GRID, *tiny, '--threads', '1', '--study', 's', '--data', corpus, '--results-dir', str(results),
            '--no-analyze', *extra]


def test_damaged_trials_of_a_finished_sweep_are_set_aside_and_retrained(corpus, tmp_path, capsys):
    results = tmp_path / 'r'
    assert rae.main(sweep_argv(corpus, results)) == 0
    before = {j: trial_files(results, *j) for j in JOBS}
    path = {j: trial_path(str(results), 's', *j) for j in JOBS}
    gone, cut, bad = JOBS[0], JOBS[2], JOBS[4]
    os.remove(path[gone][:-len('json')] + 'npz')
    npz = path[cut][:-len('json')] + 'npz'
    open(npz, 'r+b').truncate(os.path.getsize(npz) // 2)
    open(path[bad], 'w').write('{"schema_version": 1, "model": "minig')
    capsys.readouterr()

    assert rae.main(sweep_argv(corpus, results, '--dry-run')) == 0
    out = capsys.readouterr().out
    assert '6: 3 done, 3 to run (3 damaged, to train again)' in out
    damaged = [ln for ln in out.splitlines() if ln.startswith('  damaged ')]
    assert len(damaged) == 3 and 'trial_0.npz is missing' in damaged[0] and 'does not match' in damaged[1] \
        and 'unreadable JSON' in damaged[2]
    assert not os.path.exists(results / 's' / 'damaged')  # a dry run moves nothing

    assert rae.main(sweep_argv(corpus, results)) == 0
    out = capsys.readouterr().out
    reports = [ln for ln in out.splitlines() if 'is damaged' in ln]
    assert len(reports) == 3 and all('training it again' in ln for ln in reports), reports
    assert '3 trial(s) trained, 3 already done, 0 failed' in out
    aside = sorted(os.path.relpath(p, results / 's' / 'damaged') .split(os.sep, 1)[1]
                   for p in glob.glob(str(results / 's' / 'damaged' / '*' / '*' / '*' / '*')))
    assert aside == ['minigpt/gelu/trial_1.json', 'minigpt/gelu/trial_1.npz', 'minigpt/relu/trial_0.json',
                     'minigpt/relu/trial_2.json', 'minigpt/relu/trial_2.npz']
    for j in JOBS:  # retrained bitwise (one thread, deterministic on CPU); the others untouched
        assert_same_trial(trial_files(results, *j), before[j])
        assert (trial_files(results, *j)[0]['provenance']['started_at']
                == before[j][0]['provenance']['started_at']) == (j not in (gone, cut, bad))
    summary = analyze_results.build_summary(str(results / 's'))
    assert summary['bad_files'] == [] and summary['provenance']['n_trials'] == 6


def test_a_json_of_another_config_is_still_refused_as_such(corpus, tmp_path, capsys):
    assert rae.main(sweep_argv(corpus, tmp_path)) == 0
    capsys.readouterr()
    assert rae.main(sweep_argv(corpus, tmp_path, '--learning_rate', '0.001')) == 2
    err = capsys.readouterr().err
    assert '6 existing result(s)' in err and 'belong to another config' in err and 'learning_rate' in err
    assert 'damaged' not in err


def test_sweep_killed_ten_times_finishes_every_trial_once(corpus, tmp_path, capsys, procs):
    """Ten SIGKILLs in a row at seeded random points (a training step, or half-way through
    writing a checkpoint), each followed by the same command; then it runs to the end."""
    ref, results = tmp_path / 'ref', tmp_path / 'r'
    assert rae.main(sweep_argv(corpus, ref, max_iters='16')) == 0
    rng = random.Random(15)
    finished = {}
    for _ in range(10):  # 10 kills x at most 8 steps < the 96 steps of the grid: every run is killed
        kill_at = rng.choice([f'step:{rng.randint(1, 8)}', f'checkpoint-write:{rng.randint(1, 2)}'])
        killed(procs, lambda: rae.main(sweep_argv(corpus, results, max_iters='16')), kill_at, trials=len(JOBS))
        for j in JOBS:
            p = trial_path(str(results), 's', *j)
            if os.path.exists(p):  # a finished trial is whole and never rewritten
                rec = json.load(open(p))
                assert sha256_file(p[:-len('json')] + 'npz') == rec['predictions_sha256']
                assert finished.setdefault(j, rec['provenance']['finished_at']) == rec['provenance']['finished_at']
    assert len(finished) < len(JOBS)
    capsys.readouterr()
    assert rae.main(sweep_argv(corpus, results, max_iters='16')) == 0
    out = capsys.readouterr().out
    assert f"{len(JOBS) - len(finished)} trial(s) trained, {len(finished)} already done, 0 failed" in out
    resumed = [j for j in JOBS if trial_files(results, *j)[0]['resumed_from']]
    assert resumed, 'no trial was resumed'
    for j in JOBS:
        assert_same_trial(trial_files(results, *j), trial_files(ref, *j))
    files = sorted(os.path.relpath(p, results / 's') for p in glob.glob(str(results / 's' / '**' / '*'),
                                                                         recursive=True) if os.path.isfile(p))
    assert files == sorted(f"minigpt/{a}/trial_{k}.{e}" for _, a, k in JOBS for e in ('json', 'npz'))
    assert not glob.glob(str(results / 's' / '*' / '*' / '.*'))  # no checkpoint, no temp file left
    summary = analyze_results.build_summary(str(results / 's'))
    assert summary['bad_files'] == [] and summary['provenance']['n_trials'] == 6
    assert sorted(r['trial'] for r in summary['provenance']['resumed']) == \
        sorted(f"minigpt/{a}/trial_{k}" for _, a, k in resumed)
    assert 'Resumed from a mid-trial checkpoint after an interruption' in report.render_report(summary)
