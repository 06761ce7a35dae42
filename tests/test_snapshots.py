"""Snapshots of the predictions at every evaluation point (issue 21): they must not change the
training (bitwise, dropout on, every language model), the last one is the saved probs, a
resumed trial keeps those taken before the kill, and results without them still analyse."""
import os
import signal
from dataclasses import replace

import numpy as np
import pytest

import analyze_results
import checkpoint
import store
import train
from config import RunOptions, get_config, snapshot_bytes, takes_snapshots
from conftest import limit
from model_factories import MODEL_NAMES


def trial(cfg, tmp_path, model, snapshots, name='s'):
    opts = RunOptions(results_dir=str(tmp_path), progress=False, threads=1, snapshots=snapshots)
    rec = train.run_trial(model, 'gelu', 0, cfg, name, opts)
    with np.load(store.TrialKey(str(tmp_path), name, model, 'gelu', 0).npz) as z:
        return rec, {k: z[k] for k in z.files}


@pytest.mark.parametrize('model', MODEL_NAMES)
def test_snapshots_do_not_perturb_training(model, tiny_config, tmp_path):
    cfg = replace(tiny_config, dropout=0.2, max_iters=6, eval_interval=2)
    off, a_off = trial(cfg, tmp_path / 'off', model, 'off')
    on, a_on = trial(cfg, tmp_path / 'on', model, 'on')
    assert 'snapshot_probs' not in a_off
    assert np.array_equal(a_on['probs'], a_off['probs'])
    assert on['history']['train_loss'] == off['history']['train_loss']
    assert on['history']['val_loss'] == off['history']['val_loss']
    assert on['metrics']['val_loss'] == off['metrics']['val_loss'] and on['streams'] == off['streams']
    # one snapshot per evaluation point, the last one bitwise the saved predictions
    assert a_on['snapshot_iters'].tolist() == [0, 2, 4, 6] == on['history']['iter']
    assert a_on['snapshot_probs'].shape == (4, *a_on['probs'].shape)
    assert np.array_equal(a_on['snapshot_probs'][-1], a_on['probs'])
    assert not np.array_equal(a_on['snapshot_probs'][0], a_on['probs'])  # training moved them


def test_auto_takes_snapshots_only_while_they_are_small():
    small, big = get_config('cpu', vocab_size=65), get_config('cpu', vocab_size=65, n_eval=100000, max_iters=5000)
    assert snapshot_bytes(small) == 5 * 1000 * 65 * 4 and takes_snapshots('auto', small)
    assert not takes_snapshots('auto', big) and takes_snapshots('on', big) and not takes_snapshots('off', small)
    with pytest.raises(ValueError, match='--snapshots'):
        RunOptions(snapshots='sometimes')


def test_a_resumed_trial_keeps_the_snapshots_taken_before_the_kill(tiny_config, tmp_path, procs):
    cfg = replace(tiny_config, dropout=0.1, max_iters=8, eval_interval=2)
    _, ref = trial(cfg, tmp_path / 'ref', 'minigpt', 'on')

    def killed_after_5_steps():  # the checkpoint at 4 holds snapshots 0, 2, 4
        os.environ[checkpoint.KILL_ENV] = 'step:5'
        trial(cfg, tmp_path / 'res', 'minigpt', 'on')
    status = procs.wait(procs.fork(killed_after_5_steps, limit(trials=1, processes=0)))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    rec, res = trial(cfg, tmp_path / 'res', 'minigpt', 'on')
    assert rec['resumed_from'] == [4]
    assert res['snapshot_iters'].tolist() == ref['snapshot_iters'].tolist() == [0, 2, 4, 6, 8]
    assert np.array_equal(res['snapshot_probs'], ref['snapshot_probs'])


def test_results_without_snapshots_still_analyse(tiny_config, tmp_path):
    cfg = replace(tiny_config, max_iters=4, eval_interval=2)
    for k in range(3):
        train.run_trial('minigpt', 'relu', k, cfg, 's',
                        RunOptions(results_dir=str(tmp_path), progress=False, threads=1, snapshots='off'))
    summary = analyze_results.build_summary(str(tmp_path / 's'))
    assert summary['results'][0]['pairwise']['relative_pd']['mean'] > 0
    assert summary['results'][0]['snapshots'] is None
    assert 'no snapshots' in summary['results'][0]['snapshots_note']


def test_analysis_over_training_on_real_snapshots(tiny_config, tmp_path):
    """Per snapshot: mean relative PD with its interval, in summary.json, REPORT.md and a plot;
    the paired comparison of the first and last snapshots, worded."""
    cfg = replace(tiny_config, max_iters=6, eval_interval=2)
    for k in range(3):
        train.run_trial('minigpt', 'relu', k, cfg, 's',
                        RunOptions(results_dir=str(tmp_path), progress=False, threads=1, snapshots='on'))
    s = analyze_results.analyze(str(tmp_path / 's'), verbose=False)
    sn = s['results'][0]['snapshots']
    assert sn['iters'] == [0, 2, 4, 6] and len(sn['relative_pd']) == 4 and all(x['ci'] for x in sn['relative_pd'])
    # the last snapshot is the final predictions: its mean PD is the group's final figure
    assert sn['relative_pd'][-1]['mean'] == pytest.approx(s['results'][0]['pairwise']['relative_pd']['mean'])
    ch = s['results'][0]['snapshot_change']
    assert (ch['early_iter'], ch['late_iter']) == (2, 6) and 'at 2' in ch['sentence'] and 'at 6' in ch['sentence']
    assert 'Over training' in (tmp_path / 's' / 'REPORT.md').read_text()
    assert (tmp_path / 's' / 'plots' / 'relative_pd_over_training.png').exists()
    with pytest.raises(Exception, match='no snapshot at iteration 5'):
        analyze_results.build_summary(str(tmp_path / 's'), snapshots=(2, 5))
