"""Faults people who run such studies report (issue 20), each replayed: what a trial's identity
must hold, a diverging run, a group that mixes thread counts."""
from dataclasses import replace

import pytest

import analyze_results
import cli
import store
import train
from config import RunOptions

TINY = ['--n_layer', '1', '--n_embd', '16', '--n_head', '2', '--block_size', '16', '--batch_size', '4',
        '--max_iters', '2', '--eval_interval', '2', '--eval_iters', '2', '--n_eval', '24', '--threads', '1']


def test_a_study_extended_with_another_dtype_is_refused(tiny_corpus, tmp_path, capsys):
    """float32 trials are not 'done' for a bfloat16 run: the dtype is part of the identity."""
    argv = ['--model', 'minigpt', '--activation', 'relu', '--trials', '1', *TINY, '--data', tiny_corpus,
            '--results-dir', str(tmp_path), '--study', 's']
    train.main(argv)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main([*argv, '--trials', '2', '--dtype', 'bfloat16'])
    err = capsys.readouterr().err
    assert e.value.code == cli.EXIT_USAGE and "dtype: 'float32' -> 'bfloat16'" in err


def test_a_diverged_trial_is_kept_with_null_perplexity_and_flagged(tiny_config, tmp_path, monkeypatch):
    """A loss of ~17,000 nats is finite but exp() of it overflows: nothing after training may
    lose the trained trial, and a rerun must not crash again."""
    monkeypatch.setattr(train, 'estimate_loss', lambda *a, **k: {'train': 17000.0, 'val': 17000.0})
    opts = RunOptions(results_dir=str(tmp_path), progress=False, threads=1)
    cfg = replace(tiny_config, max_iters=2, eval_interval=2)
    for k in range(2):
        rec = train.run_trial('minigpt', 'relu', k, cfg, 's', opts)
        assert rec['metrics']['perplexity'] is None  # inf: no value, in strict JSON
    assert train.run_trial('minigpt', 'relu', 0, cfg, 's', opts)['metrics']['val_loss'] == 17000.0  # done
    assert not list((tmp_path / 's').rglob('.trial_*.ckpt'))
    s = analyze_results.build_summary(str(tmp_path / 's'))
    assert len([w for w in s['warnings'] if 'the trial diverged' in w]) == 2


def test_a_group_that_mixes_thread_counts_is_warned_about(tiny_config, tmp_path):
    """--vary none trials at different thread counts differ by float-reduction noise only: the
    analysis must name the setting and the trials instead of reporting it as reproducibility."""
    cfg = replace(tiny_config, max_iters=2, eval_interval=2)
    for k, threads in ((0, 1), (1, 1), (2, 2)):
        train.run_trial('minigpt', 'relu', k, cfg, 's', RunOptions(results_dir=str(tmp_path), vary='none',
                                                                   progress=False, threads=threads))
    s = analyze_results.build_summary(str(tmp_path / 's'))
    hits = [w for w in s['warnings'] if 'different threads' in w]
    assert len(hits) == 1 and '1: trial(s) 0, 1' in hits[0] and '2: trial(s) 2' in hits[0]
    assert store.load_trial(str(tmp_path / 's' / 'minigpt' / 'relu' / 'trial_2.json'))['record']['provenance']['threads'] == 2
