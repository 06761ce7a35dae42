"""The sweep runner: a tiny study end to end, resume, failure isolation, parallel and Ray
execution with bitwise-equal predictions, SIGKILL and Ctrl-C safety, validation, dry-run."""
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from multiprocessing import resource_tracker

import numpy as np
import pytest
import torch

import analyze_results
import checkpoint
import run_all_experiments as rae
import store
import sweep
import time_estimate
import train
from config import RunOptions
from conftest import descendants, limit, trial_path, wait_for, wait_gone
from fileio import json_ready, sha256_file
from plan import Job

GRID = ['--models', 'minigpt', 'charlm', '--activations', 'relu', 'gelu', '--trials', '2']
TINY = ['--n_layer', '1', '--n_embd', '16', '--n_head', '2', '--block_size', '16', '--batch_size', '4',
        '--max_iters', '4', '--eval_interval', '2', '--eval_iters', '2', '--n_eval', '20']
# the same per-trial thread count everywhere: float reductions depend on it
SAME = ['--deterministic', '--threads', '1', '--study', 's']
TRIALS = [(m, a, k) for m in ('minigpt', 'charlm') for a in ('relu', 'gelu') for k in (0, 1)]


def argv(corpus, results, *extra, grid=GRID, tiny=TINY):
    return [*grid, *tiny, *SAME, '--data', corpus, '--results-dir', str(results), *extra]


def record(results, m, a, k, study='s'):
    with open(trial_path(str(results), study, m, a, k)) as f:
        return json.load(f)


def probs(results, m, a, k, study='s'):
    with np.load(trial_path(str(results), study, m, a, k, 'npz')) as z:
        return z['probs']


def started(results):
    return {t: record(results, *t)['provenance']['started_at'] for t in TRIALS
            if os.path.exists(trial_path(str(results), 's', *t))}


def assert_same_predictions(a, b):
    for t in TRIALS:
        pa, pb = probs(a, *t), probs(b, *t)
        assert pa.dtype == np.float32 and np.array_equal(pa, pb), t


def assert_every_file_parses(results):
    """Every file under results is a whole JSON / npz / JSON-lines file, a whole mid-trial
    checkpoint (or the sweep lock); no temp file is left."""
    for path in glob.glob(os.path.join(str(results), '**', '*'), recursive=True) + \
            glob.glob(os.path.join(str(results), '**', '.*'), recursive=True):
        if os.path.isdir(path):
            continue
        name = os.path.basename(path)
        if name.endswith('.json'):
            with open(path) as f:
                json.load(f)
        elif name.endswith('.npz'):
            with np.load(path) as z:
                assert z['probs'].ndim == 2 and all(z[k].size for k in z.files)
        elif name.endswith('.jsonl'):
            with open(path) as f:
                for line in f:
                    json.loads(line)
        elif name.startswith('.trial_') and name.endswith('.ckpt'):
            state = torch.load(path, map_location='cpu', weights_only=True)
            assert set(checkpoint.FIELDS) <= set(state) and state['iter'] > 0, path
        elif name != '.sweep.lock':
            raise AssertionError(f"unexpected file in results: {path}")


@pytest.fixture(scope='module')
def reference(corpus, tmp_path_factory):
    """The tiny sweep (2 models x 2 activations x 2 trials), one process, one thread per trial."""
    results = tmp_path_factory.mktemp('reference')
    assert rae.main(argv(corpus, results, '--no-analyze')) == 0
    return results


@pytest.fixture
def copy_of(tmp_path):
    def copy(src):
        dst = tmp_path / 'results'
        shutil.copytree(src, dst)
        return dst
    return copy


# ----------------------------------------------------------------------------- the study end to end

def test_tiny_sweep_completes(reference, capsys):
    assert len(glob.glob(str(reference / 's' / '*' / '*' / 'trial_*.json'))) == 8
    assert len(glob.glob(str(reference / 's' / '*' / '*' / 'trial_*.npz'))) == 8
    for t in TRIALS:
        r = record(reference, *t)
        assert (r['model'], r['activation'], r['trial']) == t
        assert r['provenance']['threads'] == 1 and r['deterministic'] is True
    assert not os.path.exists(reference / 's' / 'failures.jsonl')
    assert_every_file_parses(reference)


def test_sweep_is_analysed_at_the_end(reference, copy_of, corpus, capsys):
    results = copy_of(reference)
    assert rae.main(argv(corpus, results)) == 0  # nothing to train, then the analysis
    out = capsys.readouterr().out
    study = results / 's'
    assert f"summary {study / 'summary.json'}" in out and f"report {study / 'REPORT.md'}" in out
    with open(study / 'summary.json') as f:
        summary = json.load(f)
    assert summary['provenance']['n_trials'] == 8
    assert (study / 'REPORT.md').exists() and glob.glob(str(study / 'plots' / '*.png'))
    # what the sweep wrote is what the analysis computes from the same files
    again = json.loads(json.dumps(json_ready(analyze_results.build_summary(str(study)))))
    assert summary['results'] == again['results'] and summary['comparisons'] == again['comparisons']


def test_rerun_trains_nothing_and_a_deleted_trial_alone_retrains(reference, copy_of, corpus, capsys):
    results = copy_of(reference)
    before = started(results)
    capsys.readouterr()
    assert rae.main(argv(corpus, results, '--no-analyze')) == 0
    out = capsys.readouterr().out
    assert '0 trial(s) trained, 8 already done' in out and 'val loss' not in out
    assert started(results) == before

    gone = ('charlm', 'gelu', 1)
    os.remove(trial_path(str(results), 's', *gone))
    assert rae.main(argv(corpus, results, '--no-analyze')) == 0
    out = capsys.readouterr().out
    assert '1 trial(s) trained, 7 already done' in out
    trained = [ln for ln in out.splitlines() if 'val loss' in ln]
    assert len(trained) == 1 and 'charlm/gelu trial 1:' in trained[0]
    after = started(results)
    assert after[gone] != before[gone]
    assert {t: v for t, v in after.items() if t != gone} == {t: v for t, v in before.items() if t != gone}
    assert_same_predictions(reference, results)  # deterministic: the retrained trial is the same trial

    assert rae.main(argv(corpus, results, '--no-analyze', '--force', grid=[
        '--models', 'charlm', '--activations', 'relu', '--trials', '1'])) == 0
    assert started(results)[('charlm', 'relu', 0)] != before[('charlm', 'relu', 0)]  # --force reruns


def test_failed_trial_is_recorded_and_the_others_complete(corpus, tmp_path, monkeypatch, capsys):
    real = train.run_trial

    def flaky(model, activation, trial, *a, **kw):
        if (model, activation, trial) == ('charlm', 'gelu', 0):
            raise RuntimeError('simulated failure (test)')
        return real(model, activation, trial, *a, **kw)
    monkeypatch.setattr(train, 'run_trial', flaky)
    grid = ['--models', 'minigpt', 'charlm', '--activations', 'relu', 'gelu', '--trials', '1']
    assert rae.main(argv(corpus, tmp_path, '--no-analyze', grid=grid)) == 1
    cap = capsys.readouterr()
    assert 'FAILED charlm/gelu trial 0: RuntimeError: simulated failure (test)' in cap.out
    assert 'error: 1 trial(s) failed: charlm/gelu trial 0;' in cap.err and 'failures.jsonl' in cap.err
    with open(tmp_path / 's' / 'failures.jsonl') as f:
        lines = f.read().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert (rec['model'], rec['activation'], rec['trial']) == ('charlm', 'gelu', 0)
    assert rec['error'] == 'RuntimeError: simulated failure (test)'
    assert 'simulated failure' in rec['traceback'] and 'Traceback' in rec['traceback'] and rec['time']
    done = sorted(glob.glob(str(tmp_path / 's' / '*' / '*' / 'trial_*.json')))
    assert len(done) == 3 and not os.path.exists(trial_path(str(tmp_path), 's', 'charlm', 'gelu', 0))

    monkeypatch.setattr(train, 'run_trial', real)  # fixed: the rerun does only the failed trial
    assert rae.main(argv(corpus, tmp_path, '--no-analyze', grid=grid)) == 0
    assert '1 trial(s) trained, 3 already done, 0 failed' in capsys.readouterr().out
    assert_every_file_parses(tmp_path)


def test_failures_jsonl_lines_stay_whole(tmp_path):
    path = str(tmp_path / 'failures.jsonl')
    with open(path, 'w') as f:
        f.write('{"model": "cut short by a cr')  # what an older crash might have left
    store.append_failure(str(tmp_path), {'model': 'm', 'error': 'multi\nline', 'trial': 0})
    with open(path) as f:
        lines = f.read().split('\n')
    assert lines[-1] == '' and json.loads(lines[1]) == {'model': 'm', 'error': 'multi\nline', 'trial': 0}


def test_each_job_runs_with_its_own_config_and_study(tiny_config, tmp_path):
    """The engine's contract: a job carries model, activation, trial, study and config; the
    sweep's one RunOptions says how they run."""
    jobs = [Job('minigpt', 'relu', 0, 'a', tiny_config),
            Job('charlm', 'gelu', 3, 'b', replace(tiny_config, max_iters=3, n_embd=8))]
    opts = RunOptions(results_dir=str(tmp_path), threads=1, progress=False)
    executor = sweep.InlineExecutor(opts)
    try:
        outcomes = list(executor.run(jobs))
    finally:
        executor.close()
    assert [j for j, _ in outcomes] == jobs and all(o['ok'] for _, o in outcomes)
    for job in jobs:
        r = record(tmp_path, job.model, job.activation, job.trial, study=job.study)
        assert r['study'] == job.study and r['metrics']['iters'] == job.config.max_iters
        assert r['config']['n_embd'] == job.config.n_embd and r['provenance']['threads'] == 1
    assert jobs[1].name == 'charlm/gelu trial 3'


# ----------------------------------------------------------------------------- parallel and distributed

def test_two_workers_give_the_same_predictions_as_one(reference, corpus, tmp_path, capsys):
    resource_tracker.ensure_running()  # multiprocessing's helper: it lives as long as this process
    before = descendants()
    assert rae.main(argv(corpus, tmp_path, '--no-analyze', '--workers', '2')) == 0
    assert not descendants() - before, 'a worker outlived the sweep'  # joined before it returns
    out = capsys.readouterr().out
    assert '2 worker process(es) on cpu, 1 thread(s) per trial' in out
    assert len([ln for ln in out.splitlines() if 'val loss' in ln]) == 8
    assert len({record(tmp_path, *t)['provenance']['hostname'] for t in TRIALS}) == 1
    assert_same_predictions(reference, tmp_path)


def test_ray_executor_gives_the_same_predictions_as_local(reference, corpus, tmp_path, capsys):
    ray = pytest.importorskip('ray', reason='Ray is optional (pip install "ray[default]")')
    before = descendants()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert rae.main(argv(corpus, tmp_path, '--no-analyze', '--executor', 'ray')) == 0
        assert 'Ray tasks (1 CPU, 0 GPU, 1 thread(s) per trial)' in capsys.readouterr().out
        assert rae.main(argv(corpus, tmp_path, '--no-analyze', '--executor', 'ray')) == 0  # resume
        assert '0 trial(s) trained, 8 already done' in capsys.readouterr().out
    finally:
        ray.shutdown()
    wait_for(lambda: not descendants() - before, limit(), "Ray's processes to end after ray.shutdown()")
    assert_same_predictions(reference, tmp_path)


# ----------------------------------------------------------------------------- kills

KILL_TINY = [*TINY[:10], '--max_iters', '300', '--eval_interval', '100', '--eval_iters', '2', '--n_eval', '20']
KILL_GRID = ['--models', 'minigpt', 'charlm', '--activations', 'relu', 'gelu', '--trials', '3']


def start_sweep(procs, corpus, results, trials=12):
    """The kill grid's sweep in a process group of its own (we can see its workers), ended
    with the test whatever happens; its limit: a new process and `trials` trials."""
    cmd = [sys.executable, 'run_all_experiments.py',
           *argv(corpus, results, '--no-analyze', '--workers', '2', grid=KILL_GRID, tiny=KILL_TINY)]
    return procs.start(cmd, limit(trials=trials), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished_trials(results):
    return glob.glob(str(results / 's' / '*' / '*' / 'trial_*.json'))


def wait_for_first_trial(proc, results):
    """Waits for a trial's file, not for a time; returns that trial's all-in seconds."""
    wait_for(lambda: finished_trials(results), limit(trials=1), 'a first finished trial', proc=proc)
    with open(finished_trials(results)[0]) as f:
        return json.load(f)['metrics']['total_time']


def all_trials():
    return [(m, a, k) for m in ('minigpt', 'charlm') for a in ('relu', 'gelu') for k in range(3)]


def test_sigkill_at_a_random_moment_then_restart_finishes_each_trial_once(corpus, tmp_path, procs):
    results = tmp_path / 'results'
    proc = start_sweep(procs, corpus, results)
    seconds = wait_for_first_trial(proc, results)
    # a seeded random moment within ~one trial's time after the first trial, in the machine's
    # own units: on a fast or a busy machine alike, trials are in flight and most are to run
    time.sleep(random.Random(4).uniform(0.0, 1.2) * seconds)
    proc.send_signal(signal.SIGKILL)  # the driver only, as the OOM killer would
    procs.communicate(proc)  # returns once the workers, which hold its pipes, are gone too
    assert proc.returncode == -signal.SIGKILL
    assert wait_gone(proc.pid), 'worker processes outlived the killed sweep'
    before = {t: record(results, *t)['provenance']['started_at'] for t in all_trials()
              if os.path.exists(trial_path(str(results), 's', *t))}
    assert before
    assert len(before) < 12, 'the sweep had finished before the kill'
    for t in before:  # a finished trial is whole: its .npz matches the hash in its JSON
        assert sha256_file(trial_path(str(results), 's', *t, 'npz')) == \
            record(results, *t)['predictions_sha256']

    proc = start_sweep(procs, corpus, results)
    out, err = procs.communicate(proc)
    assert proc.returncode == 0, err
    assert wait_gone(proc.pid), 'worker processes outlived the finished sweep'
    trained = sorted(ln.split(':')[0].split('] ')[1] for ln in out.splitlines() if 'val loss' in ln)
    assert trained == sorted(f"{m}/{a} trial {k}" for m, a, k in all_trials() if (m, a, k) not in before)
    assert f"{len(trained)} trial(s) trained, {len(before)} already done, 0 failed" in out
    for t, s in before.items():
        assert record(results, *t)['provenance']['started_at'] == s  # not trained again
    assert len(glob.glob(str(results / 's' / '*' / '*' / 'trial_*.json'))) == 12
    assert len(glob.glob(str(results / 's' / '*' / '*' / 'trial_*.npz'))) == 12
    assert_every_file_parses(results)  # and no stray temp file left


def test_stray_temp_files_include_half_written_checkpoints(tmp_path):
    """The names fileio.atomic_write gives its temp files (.<name>XXXX.tmp): of a result, and
    of a checkpoint (.trial_<k>.ckpt, itself hidden); whole files are never strays."""
    folder = tmp_path / 's' / 'minigpt' / 'relu'
    folder.mkdir(parents=True)
    strays = ['.trial_0.npzab12cd.tmp', '.trial_0.jsonef34gh.tmp', '..trial_1.ckptij56kl.tmp']
    for name in strays + ['trial_0.json', 'trial_0.npz', '.trial_1.ckpt']:
        (folder / name).write_bytes(b'x')
    assert sorted(map(os.path.basename, store.stray_temp_files(str(tmp_path / 's')))) == sorted(strays)
    assert store.remove_stray_temp_files(str(tmp_path / 's')) == 3
    assert sorted(os.listdir(folder)) == ['.trial_1.ckpt', 'trial_0.json', 'trial_0.npz']


def test_ctrl_c_stops_cleanly_and_says_what_finished(corpus, tmp_path, procs):
    results = tmp_path / 'results'
    proc = start_sweep(procs, corpus, results)
    wait_for_first_trial(proc, results)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    out, err = procs.communicate(proc)
    assert proc.returncode == 130, err
    assert 'interrupted:' in err and 'trial(s) finished in this run' in err and 'resume' in err
    assert wait_gone(proc.pid)
    assert_every_file_parses(results)
    n = len(glob.glob(str(results / 's' / '*' / '*' / 'trial_*.json')))
    assert 1 <= n and f"{n} of 12 done" in err


# ----------------------------------------------------------------------------- validation, dry run, designs

@pytest.mark.parametrize('extra,needle', [
    (['--models', 'gpt5'], "unknown model 'gpt5'; valid names: charlm"),
    (['--activations', 'relu', 'sigmoidish'], "unknown activation 'sigmoidish'; valid names: relu"),
    (['--models', 'all', 'minigpt'], "give 'all' alone"),
    (['--models', 'ffn'], "models for it: charlm"),
    (['--config', 'tpu'], "unknown config 'tpu'; valid: cpu"),
    (['--n_embd', '30', '--n_head', '4'], 'divisible'),
    (['--max_iters', 'ten'], "invalid int value: 'ten'"),
    (['--vary', 'seeds'], "invalid choice: 'seeds'"),
    (['--workers', '0'], '--workers must be >= 1'),
    (['--trials', '0'], '--trials must be >= 1'),
    (['--study', '../escape'], "invalid study name '../escape'"),
    (['--trials-per-gpu', '2', '--device', 'cpu'], '--trials-per-gpu is for CUDA devices'),
    (['--ray-address', 'auto'], '--ray-address go with --executor ray'),
    (['--n_embd', '18'], 'nanotransformer/relu cannot be built with this config: nanotransformer: head size'),
    (['--executor', 'dask'], "invalid choice: 'dask'"),
])
def test_invalid_input_fails_before_any_training_with_the_choices(extra, needle, corpus, tmp_path, capsys):
    grid = ['--models', 'nanotransformer', '--activations', 'relu'] if '18' in extra else []
    # a repeated flag: the last one counts, so `extra` overrides TINY
    args = [*TINY, '--data', corpus, '--results-dir', str(tmp_path / 'r'), *grid, *extra]
    assert rae.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not os.path.exists(tmp_path / 'r')


def test_a_study_whose_results_differ_is_refused_before_training(reference, copy_of, corpus, capsys):
    results = copy_of(reference)
    assert rae.main(argv(corpus, results, '--no-analyze', '--max_iters', '5')) == 2
    err = capsys.readouterr().err
    assert '8 existing result(s)' in err and 'max_iters: 4 -> 5' in err and '--force' in err


def test_dry_run_lists_trials_and_estimates_time_only(reference, copy_of, corpus, capsys):
    results = copy_of(reference)
    os.remove(trial_path(str(results), 's', 'minigpt', 'gelu', 1))
    files = sorted(glob.glob(str(results / '**'), recursive=True))
    assert rae.main(argv(corpus, results, '--dry-run')) == 0
    out = capsys.readouterr().out
    assert '8: 7 done, 1 to run' in out
    assert len([ln for ln in out.splitlines() if ln.startswith('  done ')]) == 7
    to_run = [ln for ln in out.splitlines() if ln.startswith('  to run ')]
    assert len(to_run) == 1 and 'minigpt/gelu trial 1' in to_run[0] and '~' in to_run[0]
    assert 'an estimate of time only, not of any result' in out
    assert '7 earlier trial(s) with the same config' in out and str(results) in out
    assert 'measured with 1 thread(s) per trial' in out
    assert sorted(glob.glob(str(results / '**'), recursive=True)) == files  # nothing written


def test_designs_set_the_grid_and_explicit_flags_override_them(corpus, tmp_path, capsys):
    base = ['--data', corpus, '--results-dir', str(tmp_path), '--n_eval', '20', '--dry-run']
    assert rae.main(['--study', 'seed_partial', *base]) == 0
    out = capsys.readouterr().out
    assert 'design seed_partial: preset gpu' in out and '6 model(s) x 5 activation(s) x 3 trial(s) = 90' in out
    assert 'activations: smelu_05 smelu_1 relu gelu swish' in out
    assert rae.main(['--study', 'seed_full', '--models', 'minigpt', '--trials', '1', *base]) == 0
    out = capsys.readouterr().out
    assert 'design seed_full: preset gpu_full (overrides: --models, --trials, --n_eval 20)' in out
    assert '1 model(s) x 6 activation(s) x 1 trial(s) = 6' in out and 'swiglu' in out
    assert rae.main(['--study', 'seed_partal', *base, '--models', 'minigpt', '--activations', 'relu']) == 0
    assert 'did you mean seed_partial?' in capsys.readouterr().out
    assert not os.listdir(tmp_path)


def test_dry_run_estimate_from_benchmark_figures(reference, corpus, tmp_path, monkeypatch, capsys):
    rec = record(reference, 'minigpt', 'relu', 0)
    figures = tmp_path / 'bench_sweep.json'
    figures.write_text(json.dumps({'trials': [
        {'model': 'minigpt', 'activation': 'relu', 'config': rec['config'], 'total_time': 30.0, 'threads': 1},
        {'model': 'charlm', 'activation': 'gelu', 'config': {**rec['config'], 'n_embd': 32}, 'total_time': 99.0,
         'threads': 1}]}))  # another config: not used
    monkeypatch.setattr(time_estimate, 'BENCH_FIGURES', str(figures))
    assert rae.main(argv(corpus, tmp_path / 'empty', '--dry-run', '--workers', '2')) == 0
    out = capsys.readouterr().out
    assert out.count('~30 s') == 4 and out.count('no estimate') == 4  # minigpt: figure; charlm: none
    assert '~2.0 min of trial time' in out and 'roughly 60 s wall time with 2 workers' in out
    assert f'1 earlier trial(s) with the same config in {figures}' in out and '4 with no figure' in out
    assert 'for the 4 of 8 trials to run that have a figure (4 more without one)' in out
