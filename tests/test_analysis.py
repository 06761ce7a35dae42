"""analyze_results and plot_utils on studies written here by hand in the trainer's format:
outputs and their round trip, each planted sanity problem, bad files, bad input, --compare,
--plots-only, the numpy activation formulas, and that none of the three imports torch."""
import hashlib
import json
import os
import sys

import numpy as np
import pytest
from scipy import special, stats

import analyze_results
from activation_names import applied_function
import pairwise
import stat_tests
import plot_utils
from conftest import limit

N_EVAL, N_CLASSES = 40, 7
HASH = 'e' * 64


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def make_probs(model, activation, trial, spread=0.5):
    """Predictions that depend on model, activation and trial, like real ones."""
    base = np.random.default_rng(sum(map(ord, model))).normal(size=(N_EVAL, N_CLASSES))
    shift = np.random.default_rng(sum(map(ord, activation))).normal(size=(N_EVAL, N_CLASSES))
    noise = np.random.default_rng(1000 + trial + 7 * sum(map(ord, activation))).normal(size=(N_EVAL, N_CLASSES))
    return softmax(base + shift + spread * noise)


def write_trial(study, model, act, k, probs=None, eval_hash=HASH, vary='all', seeds=None, task='lm',
                train_loss=1.6, val_loss=1.7, config=None, eval_indices=None, causality=0.0, calls='named'):
    folder = study / model / act
    folder.mkdir(parents=True, exist_ok=True)
    probs = make_probs(model, act, k) if probs is None else probs
    targets = np.arange(len(probs)) % probs.shape[1]
    npz = folder / f'trial_{k}.npz'
    np.savez(npz, probs=probs, targets=targets,
             eval_indices=np.arange(len(probs)) if eval_indices is None else eval_indices,
             extra_array=np.zeros((len(probs), 2)))  # an array the analysis does not know: ignored
    s = 42 + k
    seeds = seeds or {'trial_seed': s, 'init': s, 'data': s, 'dropout': s}
    rec = {
        'schema_version': 1, 'source': 'measured', 'task': task, 'study': study.name,
        'model': model, 'activation': act, 'trial': k, 'vary': vary, 'seeds': seeds,
        # stand-ins for the trainer's digests of the streams: one per seed
        'streams': {n: hashlib.sha256(f'{n}:{seeds[n]}'.encode()).hexdigest()[:16] for n in ('init', 'data', 'dropout')},
        'config': config or {'n_layer': 1, 'n_embd': 16, 'max_iters': 6, 'n_eval': N_EVAL},
        'eval_hash': eval_hash, 'predictions_file': npz.name,
        'predictions_sha256': hashlib.sha256(npz.read_bytes()).hexdigest(),
        'metrics': {'train_loss': train_loss, 'val_loss': val_loss,
                    'val_accuracy': float((probs.argmax(1) == targets).mean()), 'token_accuracy': 0.3,
                    'training_time': 2.0 + k, 'total_time': 3.0 + k, 'tokens_per_sec': 1000.0,
                    'n_params': 1234, 'peak_memory_mb': None},
        'history': {'iter': [0, 3, 6], 'train_loss': [4.0, 2.5, train_loss], 'val_loss': [4.1, 2.6, val_loss],
                    'lr': [3e-4] * 3, 'grad_norm': [None, 1.0, 0.9]},
        'provenance': {'git_commit': 'abc123', 'git_dirty': False, 'torch_version': '2.x', 'cuda_version': None,
                       'device': 'cpu', 'device_name': 'x86_64', 'deterministic': True, 'python_version': '3.12',
                       'hostname': 'h', 'started_at': 't0', 'finished_at': 't1'},
    }
    if causality is not None:  # the trainer's causality probe (older trainers wrote none)
        rec['metrics']['causality_max_change'] = causality
    if calls is not None:  # the functions one forward pass called ('named': the activation's own; older: none)
        rec['activation_calls'] = {applied_function(act): 2} if calls == 'named' else calls
    (folder / f'trial_{k}.json').write_text(json.dumps(rec))
    return rec


def make_study(root, name='s', models=('minigpt', 'charlm'), acts=('relu', 'gelu', 'swish'), trials=3):
    study = root / name
    for m in models:
        for a in acts:
            for k in range(trials):
                write_trial(study, m, a, k)
    return study


def entry(summary, model, act):
    return next(r for r in summary['results'] if (r['model_name'], r['activation']) == (model, act))


@pytest.fixture
def study(tmp_path):
    return make_study(tmp_path)


# ----------------------------------------------------------------------------- a clean study

def test_clean_study_outputs_and_round_trip(study, tmp_path):
    plots = tmp_path / 'plots'
    summary = analyze_results.analyze(str(study), str(plots), verbose=False)
    assert summary['warnings'] == []  # nothing planted: no false alarms
    with open(study / 'summary.json') as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    assert len(summary['results']) == 6 and summary['baseline'] == 'relu'

    # the numbers are those of the saved arrays
    r = entry(summary, 'minigpt', 'gelu')
    p = [make_probs('minigpt', 'gelu', k) for k in range(3)]
    assert r['reproducibility_metrics'][0] == {'model_pair': [0, 1], 'relative_pd': pytest.approx(pairwise.relative_pd(p[0], p[1])),
                                               'prediction_differences': int(pairwise.prediction_differences(p[0], p[1])),
                                               'total_predictions': N_EVAL}
    assert r['avg_relative_pd'] == pytest.approx(np.mean([pairwise.relative_pd(p[i], p[j]) for i, j in ((0, 1), (0, 2), (1, 2))]))
    assert r['avg_val_loss'] == pytest.approx(1.7) and r['std_val_loss'] == pytest.approx(0, abs=1e-12)
    assert r['avg_training_time'] == 3.0
    # the interval is the leave-one-trial-out jackknife t-interval on the metric's scale (logit for
    # metrics in [0, 1], log for metrics >= 0), recomputed here by hand and transformed back
    scales = {'logit': (special.logit, special.expit), 'log': (np.log, np.exp), 'linear': (np.asarray, np.asarray)}
    for m in pairwise.PAIR_METRICS:
        v = r['pairwise'][m]['values']  # pairs (0, 1), (0, 2), (1, 2): leaving out trial i keeps one pair
        g, back = scales[pairwise.PAIR_METRIC_SCALE[m]]
        loo = g(np.array([v[2], v[1], v[0]]))
        half = stats.t.ppf(0.975, 2) * 2 * np.std(loo, ddof=1) / np.sqrt(3)  # (n - 1) sd(loo) / sqrt(n)
        centre = g(np.mean(v))
        assert r['pairwise'][m]['ci'] == pytest.approx(back(np.array([centre - half, centre + half])), rel=1e-9)
        assert r['pairwise'][m]['ci_method'].startswith('leave-one-trial-out jackknife t-interval, 2 df')
        assert r['pairwise'][m]['ci'][0] >= 0 and (pairwise.PAIR_METRIC_SCALE[m] != 'logit' or r['pairwise'][m]['ci'][1] <= 1)
    vl = r['trial_stats']['val_accuracy']  # an accuracy: on the logit scale, inside [0, 1]
    accs = np.array([float((p[k].argmax(1) == np.arange(N_EVAL) % N_CLASSES).mean()) for k in range(3)])
    loo = special.logit((accs.sum() - accs) / 2)
    half = stats.t.ppf(0.975, 2) * 2 * np.std(loo, ddof=1) / np.sqrt(3)
    centre = special.logit(accs.mean())
    assert vl['ci'] == pytest.approx(special.expit([centre - half, centre + half])) and 't-interval' in vl['ci_method']
    assert [t['trial_id'] for t in r['trials']] == [0, 1, 2] and r['trials'][0]['history']['iter'] == [0, 3, 6]
    cmp = [c for c in summary['comparisons'] if c['model'] == 'minigpt']
    assert {c['activation'] for c in cmp} == {'gelu', 'swish'}
    for c in cmp:
        for test in ('dispersion', 'prediction_shift'):
            res = c[test]
            assert res['exact'] and res['n_permutations'] == 20 and 0 < res['p_value'] <= res['p_value_holm'] <= 1
            assert res['min_p_value'] == pytest.approx(0.1) and res['method']
        disp = c['dispersion']
        assert disp['difference'] == pytest.approx(c['mean'] - c['mean_baseline']) == pytest.approx(c['difference'])
        assert disp['ci'][0] < disp['difference'] < disp['ci'][1] and 'Welch' in disp['ci_method']
        # 3 + 3 trials: an exact test cannot go below p = 0.1, so nothing is detectable, and it says so
        assert disp['min_detectable_difference'] is None
        # ... though equal spreads (which these are) can be shown equal within the margin (equivalence)
        if c['equivalence']['equivalent']:
            assert disp['verdict'].startswith('equally reproducible within ±25%')
        else:
            assert disp['verdict'].startswith('no detectable difference at n = 3 + 3 trials') and '0.1' in disp['verdict']
    # Holm runs over all comparisons of the study (both models), separately per test
    for test in ('dispersion', 'prediction_shift'):
        ps = [c[test]['p_value'] for c in summary['comparisons']]
        assert len(ps) == 4 and [c[test]['p_value_holm'] for c in summary['comparisons']] == stat_tests.holm(ps)
    assert len(summary['provenance']['files']) == 36 and summary['provenance']['git_commits'] == ['abc123']

    report = (study / 'REPORT.md').read_text()
    assert report.index('## Warnings') < report.index('## minigpt') and '## charlm' in report
    assert 'p-value' in report and '**' in report
    assert 'no reproducibility difference of any size can be detected' in report
    assert 'needs at least 3 trials per group' in report and 'takes at least 5 trials per group' in report

    names = {'training_curves_minigpt.png', 'training_curves_charlm.png', 'relative_pd.png', 'top1_disagreement.png',
             'accuracy_vs_relative_pd.png', 'relative_pd_heatmap.png', 'activation_functions.png'}
    assert set(os.listdir(plots)) == names  # and no temp files left behind
    for n in names:
        assert (plots / n).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_same_files_give_the_same_summary(study):
    analyze_results.analyze(str(study), plots=False, verbose=False)
    first = (study / 'summary.json').read_bytes()
    analyze_results.analyze(str(study), plots=False, verbose=False)
    assert (study / 'summary.json').read_bytes() == first


def test_fewer_than_three_trials_give_no_interval(tmp_path):
    study = make_study(tmp_path, acts=('relu', 'gelu'), models=('minigpt',), trials=2)
    write_trial(study, 'minigpt', 'elu', 0)
    s = analyze_results.analyze(str(study), plots=False, verbose=False)
    r = entry(s, 'minigpt', 'gelu')
    assert r['pairwise']['relative_pd']['ci'] is None and 'no interval possible' in r['pairwise']['relative_pd']['ci_note']
    assert r['trial_stats']['val_loss']['ci'] is None
    one = entry(s, 'minigpt', 'elu')
    assert one['avg_relative_pd'] is None and one['std_val_loss'] is None
    report = (study / 'REPORT.md').read_text()
    assert 'no interval possible' in report and '1 trial: no pairs' in report


# ----------------------------------------------------------------------------- planted problems

def test_identical_predictions_across_activations(study):
    for k in range(3):  # gelu's files carry relu's predictions: the activation was never used
        write_trial(study, 'minigpt', 'gelu', k, probs=make_probs('minigpt', 'relu', k), calls={'relu': 2})
    s = analyze_results.analyze(str(study), plots=False, verbose=False)
    hits = [w for w in s['warnings'] if 'activation probably not applied' in w]
    assert len(hits) == 1 and 'minigpt' in hits[0] and 'gelu' in hits[0] and 'relu' in hits[0]
    # and each planted trial, on its own record: gelu never ran
    assert len([w for w in s['warnings'] if w.startswith('ERROR minigpt/gelu') and 'never called' in w]) == 3
    assert len(s['results']) == 6 and entry(s, 'charlm', 'gelu')['avg_relative_pd'] > 0
    assert 'activation probably not applied' in (study / 'REPORT.md').read_text()


def test_silu_and_swish_are_one_function(study):
    for k in range(3):
        write_trial(study, 'minigpt', 'silu', k, probs=make_probs('minigpt', 'swish', k))
    s = analyze_results.analyze(str(study), plots=False, verbose=False)
    assert s['warnings'] == []


def test_identical_predictions_across_seeds(study):
    same = make_probs('charlm', 'gelu', 0)
    for k in range(3):
        write_trial(study, 'charlm', 'gelu', k, probs=same)
    s = analyze_results.analyze(str(study), plots=False, verbose=False)
    hits = [w for w in s['warnings'] if 'seeds not applied' in w]
    assert len(hits) == 3 and all(w.startswith('charlm/gelu') for w in hits)
    assert entry(s, 'charlm', 'gelu')['avg_relative_pd'] == 0  # reported as measured, not hidden


def test_identical_predictions_with_vary_none_are_expected(study):
    same = make_probs('charlm', 'gelu', 0)
    for k in range(3):
        write_trial(study, 'charlm', 'gelu', k, probs=same, vary='none',
                    seeds={'trial_seed': 42 + k, 'init': 42, 'data': 42, 'dropout': 42})
    s = analyze_results.analyze(str(study), plots=False, verbose=False)
    assert not [w for w in s['warnings'] if 'seeds not applied' in w]


def jitter(probs, seed, rel=1e-4):
    """probs with every probability moved by relative noise `rel` (renormalised): what a GPU
    without deterministic kernels does to a repeat of the same computation."""
    p = probs.astype(np.float64) * (1 + rel * np.random.default_rng(seed).normal(size=probs.shape))
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def test_activation_equal_to_baseline_up_to_noise_is_flagged(study):
    # minigpt/gelu: relu's predictions, trial by trial, up to relative noise 1e-4 (not bitwise equal)
    for k in range(3):
        write_trial(study, 'minigpt', 'gelu', k, probs=jitter(make_probs('minigpt', 'relu', k), 100 + k), calls=None)
    s = analyze_results.analyze(str(study), plots=False, verbose=False)
    hits = [w for w in s['warnings'] if 'activation probably not applied' in w]
    assert len(hits) == 1 and hits[0].startswith('minigpt: activations gelu and relu')
    assert 'identical)' not in hits[0] and hits[0].count('% of the between-seed') == 3  # the ratio, per trial
    ratio = float(hits[0].split('% of the between-seed')[0].rsplit(', ', 1)[1]) / 100
    assert 0 < ratio < analyze_results.sanity.SANITY_RATIO / 10
    # the really different activations (swish vs both, and everything in charlm) are not flagged
    assert not [w for w in s['warnings'] if 'swish' in w or 'charlm' in w]


def test_seeds_differing_only_by_noise_are_flagged(study):
    same = make_probs('charlm', 'gelu', 0)
    for k in range(3):
        write_trial(study, 'charlm', 'gelu', k, probs=jitter(same, 200 + k))
    s = analyze_results.analyze(str(study), plots=False, verbose=False)
    hits = [w for w in s['warnings'] if 'seeds not applied' in w]
    assert len(hits) == 3 and all(w.startswith('charlm/gelu: trials') and '% of the between-seed' in w for w in hits)
    assert len(s['warnings']) == 3  # nothing else flagged


def test_seeds_ignored_in_every_group_of_a_model_are_flagged(study):
    # every charlm group repeats one prediction per activation up to noise: no group has a
    # between-seed scale of its own, but the activations still differ from each other
    for act in ('relu', 'gelu', 'swish'):
        same = make_probs('charlm', act, 0)
        for k in range(3):
            write_trial(study, 'charlm', act, k, probs=jitter(same, 300 + k))
    s = analyze_results.analyze(str(study), plots=False, verbose=False)
    hits = [w for w in s['warnings'] if 'seeds not applied' in w]
    assert len(hits) == 1 and hits[0].startswith('charlm: trials with different seeds differ by relative PD')
    assert not [w for w in s['warnings'] if 'minigpt' in w]


def test_a_model_that_sees_the_future_is_flagged(study):
    write_trial(study, 'minigpt', 'gelu', 1, causality=0.37)       # the probe moved earlier logits
    write_trial(study, 'minigpt', 'gelu', 2, causality=2e-7)       # float noise: causal
    write_trial(study, 'charlm', 'relu', 0, causality=None)        # an older trainer: no probe recorded
    s = analyze_results.analyze(str(study), plots=False, verbose=False)
    hits = [w for w in s['warnings'] if 'model sees the future' in w]
    assert len(hits) == 1 and hits[0].startswith('minigpt/gelu/trial_1') and '0.37' in hits[0]
    unchecked = [w for w in s['warnings'] if 'could not be checked' in w]
    assert len(unchecked) == 1 and unchecked[0].startswith('1 language-model trial(s)') and 'charlm/relu/trial_0' in unchecked[0]
    assert len(s['warnings']) == 2 and 'model sees the future' in (study / 'REPORT.md').read_text()


def test_implausibly_low_val_loss(study):
    write_trial(study, 'minigpt', 'relu', 1, train_loss=1.5, val_loss=0.3)
    s = analyze_results.analyze(str(study), plots=False, verbose=False)
    hits = [w for w in s['warnings'] if 'possible information leakage (non-causal model?)' in w]
    assert len(hits) == 1 and hits[0].startswith('minigpt/relu/trial_1')
    # the ratio rule alone, for a classification task (no nats floor there)
    write_trial(study, 'minigpt', 'relu', 1, train_loss=0.3, val_loss=0.1, task='classification')
    s = analyze_results.analyze(str(study), plots=False, verbose=False)
    assert any('information leakage' in w for w in s['warnings'])


def test_corrupt_missing_and_truncated_files_are_listed_and_skipped(study):
    d = study / 'minigpt' / 'gelu'
    (d / 'trial_0.json').write_text('{"schema_version": 1, "model": ')            # truncated JSON
    npz = (d / 'trial_1.npz').read_bytes()
    (d / 'trial_1.npz').write_bytes(npz[:len(npz) // 2])                           # truncated npz
    rec = json.loads((d / 'trial_2.json').read_text())
    (d / 'trial_2.npz').write_bytes(b'not a zip at all')                            # garbage npz whose
    rec['predictions_sha256'] = hashlib.sha256(b'not a zip at all').hexdigest()    # sha256 matches
    (d / 'trial_2.json').write_text(json.dumps(rec))
    (study / 'charlm' / 'relu' / 'trial_2.npz').unlink()                            # missing npz
    (study / 'charlm' / 'relu' / 'trial_3.npz').write_bytes(npz)                    # npz without JSON
    s = analyze_results.analyze(str(study), plots=False, verbose=False)
    bad = {b['path']: b['reason'] for b in s['bad_files']}
    j = os.path.join
    assert set(bad) == {j('minigpt', 'gelu', 'trial_0.json'), j('minigpt', 'gelu', 'trial_1.json'),
                        j('minigpt', 'gelu', 'trial_2.json'), j('charlm', 'relu', 'trial_2.json'),
                        j('charlm', 'relu', 'trial_3.npz')}
    assert 'unreadable JSON' in bad[j('minigpt', 'gelu', 'trial_0.json')]
    assert 'sha256' in bad[j('minigpt', 'gelu', 'trial_1.json')]
    assert 'cannot be loaded' in bad[j('minigpt', 'gelu', 'trial_2.json')]
    assert 'missing' in bad[j('charlm', 'relu', 'trial_2.json')]
    assert sum(w.startswith('skipped ') for w in s['warnings']) == 5
    # the rest is analysed: minigpt/gelu is gone, charlm/relu has two trials
    assert {(r['model_name'], r['activation']) for r in s['results']} == \
        {(m, a) for m in ('minigpt', 'charlm') for a in ('relu', 'gelu', 'swish')} - {('minigpt', 'gelu')}
    assert entry(s, 'charlm', 'relu')['trial_ids'] == [0, 1]
    assert '## Skipped files' in (study / 'REPORT.md').read_text()


def test_bad_probabilities_and_misplaced_files_are_skipped(study):
    d = study / 'charlm' / 'swish'
    write_trial(study, 'charlm', 'swish', 0, probs=np.full((N_EVAL, N_CLASSES), 0.5, dtype=np.float32))
    rec = json.loads((d / 'trial_1.json').read_text())
    rec['activation'] = 'gelu'
    (d / 'trial_1.json').write_text(json.dumps(rec))
    rec = json.loads((d / 'trial_2.json').read_text())
    rec['source'] = 'synthetic'
    (d / 'trial_2.json').write_text(json.dumps(rec))
    s = analyze_results.analyze(str(study), plots=False, verbose=False)
    reasons = ' | '.join(b['reason'] for b in s['bad_files'])
    assert 'not probability distributions' in reasons and 'lies at' in reasons and "not 'measured'" in reasons
    assert not [r for r in s['results'] if (r['model_name'], r['activation']) == ('charlm', 'swish')]


def test_odd_values_from_the_files_keep_summary_strict_json(study):
    d = study / 'charlm' / 'gelu'
    rec = json.loads((d / 'trial_0.json').read_text())
    rec['history']['grad_norm'] = [None, float('inf'), float('nan')]  # json.dumps writes Infinity, NaN
    rec['metrics']['peak_memory_mb'] = float('nan')
    (d / 'trial_0.json').write_text(json.dumps(rec))
    rec = json.loads((d / 'trial_1.json').read_text())
    rec['history'] = {'iter': [0, 3], 'train_loss': [1.0]}
    (d / 'trial_1.json').write_text(json.dumps(rec))
    s = analyze_results.analyze(str(study), plots=False, verbose=False)
    text = (study / 'summary.json').read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f'non-strict JSON constant {c}'))
    r = entry(s, 'charlm', 'gelu')
    # fileio.json_ready's rule: a non-finite number is no value (null), in the file and in memory
    assert r['trials'][0]['history']['grad_norm'] == [None, None, None] and r['trials'][0]['peak_memory_mb'] is None
    assert r['n_trials'] == 3 and r['trials'][1]['history'] is None
    assert any(w.startswith('charlm/gelu/trial_1: history missing or malformed') for w in s['warnings'])


def test_mismatched_eval_hash_is_an_error_not_a_number(study):
    write_trial(study, 'minigpt', 'swish', 2, eval_hash='f' * 64)
    s = analyze_results.analyze(str(study), plots=False, verbose=False)
    r = entry(s, 'minigpt', 'swish')
    assert r['error'] and r['pairwise'] is None and r['avg_relative_pd'] is None and r['reproducibility_metrics'] == []
    errors = [w for w in s['warnings'] if w.startswith('ERROR')]
    assert s['warnings'][:len(errors)] == errors  # errors come first
    assert any(w.startswith('ERROR minigpt/swish:') for w in errors) and any('swish vs relu' in w for w in errors)
    cmp = next(c for c in s['comparisons'] if (c['model'], c['activation']) == ('minigpt', 'swish'))
    assert cmp['error'] and cmp['difference'] is None and cmp['dispersion'] is None and cmp['prediction_shift'] is None
    assert 'ERROR' in (study / 'REPORT.md').read_text()
    assert entry(s, 'minigpt', 'gelu')['avg_relative_pd'] > 0  # the rest is untouched


def test_failures_are_listed_not_counted(study):
    lines = [json.dumps({'model': 'minigpt', 'activation': 'gelu', 'trial': 3, 'error': 'RuntimeError: boom',
                         'traceback': 'Traceback ...'}), '{broken']
    (study / 'failures.jsonl').write_text('\n'.join(lines) + '\n')
    s = analyze_results.analyze(str(study), plots=False, verbose=False)
    assert [f['trial'] for f in s['failures']] == [3] and s['failures'][0]['has_result'] is False
    assert entry(s, 'minigpt', 'gelu')['n_trials'] == 3
    assert any('failed trial' in w for w in s['warnings'])
    assert any(b['path'] == 'failures.jsonl line 2' for b in s['bad_files'])
    assert 'RuntimeError: boom' in (study / 'REPORT.md').read_text()


# ----------------------------------------------------------------------------- command line

def test_bad_input_is_a_one_line_error_and_overwrites_nothing(study, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        analyze_results.main(['--results-dir', str(tmp_path / 'nope')])
    err = capsys.readouterr().err  # bad input: a usage error, exit 2 (cli.py)
    assert e.value.code == 2 and err.startswith('error: ') and 'does not exist' in err and err.count('\n') == 1

    analyze_results.main(['--results-dir', str(study), '--no-plots'])
    before = (study / 'summary.json').read_bytes()
    write_trial(study, 'minigpt', 'relu', 0, train_loss=9.9)  # new data, which a bad call must not write out
    with pytest.raises(SystemExit) as e:
        analyze_results.main(['--results-dir', str(study), '--baseline', 'tanh'])
    msg = capsys.readouterr().err
    assert e.value.code == 2 and "'tanh'" in msg and 'gelu, relu, swish' in msg and msg.count('\n') == 1
    assert (study / 'summary.json').read_bytes() == before

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        analyze_results.main([])
    assert e.value.code == 2 and capsys.readouterr().err.count('\n') == 1


def test_plots_only(study, tmp_path, capsys):
    plots = tmp_path / 'p'
    analyze_results.main(['--results-dir', str(study), '--no-plots'])
    assert not plots.exists()
    analyze_results.main(['--results-dir', str(study), '--plots-dir', str(plots), '--plots-only'])
    assert len(list(plots.iterdir())) == 7 and all(f.stat().st_size > 0 for f in plots.iterdir())
    # a corrupt summary.json: a one-line error, and the plots already there stay as they were
    stamp = {f.name: f.read_bytes() for f in plots.iterdir()}
    (study / 'summary.json').write_text('{"results": [')
    with pytest.raises(SystemExit) as e:
        analyze_results.main(['--results-dir', str(study), '--plots-dir', str(plots), '--plots-only'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'summary.json' in err and 'without --plots-only' in err
    assert {f.name: f.read_bytes() for f in plots.iterdir()} == stamp
    (study / 'summary.json').write_text(json.dumps({'results': [{'model_name': 'minigpt', 'activation': 'relu'}]}))
    with pytest.raises(SystemExit) as e:
        analyze_results.main(['--results-dir', str(study), '--plots-dir', str(plots), '--plots-only'])
    assert e.value.code == 2 and 'trials' in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in plots.iterdir()} == stamp


def test_compare_two_studies(tmp_path):
    a = make_study(tmp_path, 'partial', acts=('relu', 'gelu'))
    b = make_study(tmp_path, 'full', acts=('relu', 'gelu', 'mish'))
    for k in range(3):
        write_trial(b, 'minigpt', 'gelu', k, val_loss=1.5)
    out = tmp_path / 'cmp'
    analyze_results.main(['--compare', str(a), str(b), '--out-dir', str(out)])
    c = json.loads((out / 'compare.json').read_text())
    row = next(r for r in c['rows'] if (r['model'], r['activation']) == ('minigpt', 'gelu'))
    assert row['change']['val_loss'] == pytest.approx(1.5 - 1.7) and row['change']['relative_pd'] == 0
    mish = next(r for r in c['rows'] if (r['model'], r['activation']) == ('minigpt', 'mish'))
    assert mish['a']['relative_pd'] is None and mish['change']['relative_pd'] is None
    assert '| minigpt | gelu |' in (out / 'COMPARE.md').read_text()
    assert (out / 'compare.png').stat().st_size > 0
    assert not (a / 'summary.json').exists()  # comparing writes nothing into the studies


# ----------------------------------------------------------------------------- activations, no torch

def test_analysis_modules_do_not_import_torch(tmp_path, procs):
    # a fresh interpreter in which importing torch fails; then use the statistics too, since
    # scipy imports some of its parts lazily
    code = ("import sys\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError('torch imported')\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "import numpy as np, intervals, stat_tests, pairwise, snapshot_stats, best_of_k, analyze_results, plot_utils, report, sanity\n"
            "d = np.ones((6, 6)) - np.eye(6)\n"
            "intervals.describe([1.0, 2.0, 3.0]); intervals.pairwise_interval(d); stat_tests.exchangeability_test(d, [0, 1, 2], [3, 4, 5])\n"
            "stat_tests.dispersion_test(d[:3, :3], d[3:, 3:]); stat_tests.holm([0.1, 0.2])\n"
            "plot_utils.save_figure(plot_utils.activation_functions(['relu', 'gelu']), sys.argv[1])\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'torch']\n"
            "assert 'matplotlib.pyplot' not in sys.modules  # Agg canvas only: no global backend\n")
    p = procs.run([sys.executable, '-c', code, str(tmp_path / 'a.png')], limit())
    assert p.returncode == 0, p.stderr


def test_numpy_activation_derivatives_match_finite_differences():
    x = np.linspace(-3, 3, 1201)
    x = x[np.abs(x) > 1e-3]
    names = ['relu', 'gelu', 'swish', 'silu', 'smelu_05', 'smelu_1', 'smelu_0.25', 'mish', 'elu', 'selu',
             'leaky_relu', 'swiglu', 'geglu', 'reglu']
    h = 1e-6
    for name in names:
        f, df, _ = plot_utils.activation_fn(name)
        kinks = np.zeros_like(x, dtype=bool)
        beta = plot_utils.smelu_beta(name)
        if beta:
            kinks = np.abs(np.abs(x) - beta) < 1e-3
        num = (f(x + h) - f(x - h)) / (2 * h)
        np.testing.assert_allclose(df(x)[~kinks], num[~kinks], atol=1e-5, err_msg=name)
    b = 0.5  # SmeLU by its definition
    f, _, _ = plot_utils.activation_fn('smelu_05')
    assert f(np.array([-1.0, -0.5, 0.0, 0.25, 0.5, 2.0])) == pytest.approx([0, 0, b / 4, 0.75 ** 2 / 2, 0.5, 2.0])
    with pytest.raises(ValueError, match='known'):
        plot_utils.activation_fn('tanhh')


def test_numpy_activations_match_the_torch_ones():
    torch = pytest.importorskip('torch')
    from activations import ACTIVATION_NAMES, get_activation_fn
    x = np.linspace(-4, 4, 801)
    x = x[np.abs(x) > 1e-3]
    for name in ACTIVATION_NAMES + ['smelu_0.25']:
        f, df, _ = plot_utils.activation_fn(name)
        xt = torch.tensor(x, requires_grad=True)
        y = get_activation_fn(name)(xt)
        y.sum().backward()
        np.testing.assert_allclose(f(x), y.detach().numpy(), atol=1e-10, err_msg=name)
        np.testing.assert_allclose(df(x), xt.grad.numpy(), atol=1e-10, err_msg=name)


# ----------------------------------------------------------------------------- mixture of experts

def test_routing_agreement_in_summary_report_and_plot(tmp_path):
    """Trials that save routing get a routing agreement: 1 for a relabelled copy of the same
    routing, chance-level for unrelated routings; a malformed routing array is a bad file."""
    study = tmp_path / 'moe'
    rng = np.random.default_rng(0)
    same = rng.integers(0, 4, size=(N_EVAL, 2, 5))
    for k in range(3):
        write_trial(study, 'switchlm', 'relu', k)
        write_trial(study, 'switchlm', 'gelu', k)
        # relu: trial k routes exactly like trial 0 with its experts renamed by a permutation
        routings = {'relu': np.roll(np.arange(4), k)[same], 'gelu': rng.integers(0, 4, size=(N_EVAL, 2, 5))}
        for act, routing in routings.items():
            npz = study / 'switchlm' / act / f'trial_{k}.npz'
            with np.load(npz) as z:
                arrays = dict(z)
            np.savez(npz, **arrays, routing=routing.astype(np.int16))
            rec_path = study / 'switchlm' / act / f'trial_{k}.json'
            rec = json.loads(rec_path.read_text())
            rec['predictions_sha256'] = hashlib.sha256(npz.read_bytes()).hexdigest()
            rec['config']['n_experts'] = 4
            rec['metrics'].update(moe_dropped_fraction=0.1, moe_router_entropy=1.2, moe_aux_loss=1.0, moe_z_loss=0.5)
            rec_path.write_text(json.dumps(rec))
    s = analyze_results.analyze(str(study), verbose=False)
    relu, gelu = entry(s, 'switchlm', 'relu'), entry(s, 'switchlm', 'gelu')
    assert relu['routing_agreement']['values'] == pytest.approx([1.0] * 3)
    assert relu['routing_agreement']['ci'] == pytest.approx([1.0, 1.0])
    g = gelu['routing_agreement']
    assert len(g['values']) == 3 and g['mean'] < 0.5 and abs(g['mean'] - g['chance_mean']) < 0.1
    assert relu['trial_stats']['moe_dropped_fraction']['mean'] == pytest.approx(0.1)
    report = (study / 'REPORT.md').read_text()
    assert 'routing agreement' in report and '| relu | 1.0000 [1.0000, 1.0000] |' in report
    assert (study / 'plots' / 'routing_agreement.png').stat().st_size > 0
    # trials without routing (dense models) get no routing entry and no plot
    plain = analyze_results.build_summary(str(make_study(tmp_path, 'dense', models=('minigpt',), acts=('relu',))))
    assert plain['results'][0]['routing_agreement'] is None
    # a routing array that is not integer expert indices makes the file unusable, loudly
    npz = study / 'switchlm' / 'gelu' / 'trial_2.npz'
    with np.load(npz) as z:
        arrays = dict(z)
    arrays['routing'] = arrays['routing'].astype(np.float32)
    np.savez(npz, **arrays)
    rec_path = study / 'switchlm' / 'gelu' / 'trial_2.json'
    rec = json.loads(rec_path.read_text())
    rec['predictions_sha256'] = hashlib.sha256(npz.read_bytes()).hexdigest()
    rec_path.write_text(json.dumps(rec))
    s2 = analyze_results.build_summary(str(study))
    assert any('trial_2.json' in b['path'] and 'routing' in b['reason'] for b in s2['bad_files'])


def test_a_folder_of_studies_is_named_as_such(tmp_path):
    """analyze_results.py --results-dir results (the parent of several studies): say so and name
    them, not 'an FFN study grid holds ffn trials only' (issue 20)."""
    for name in ('cpu', 'cpu_max_iters20'):
        for k in range(2):
            write_trial(tmp_path / name, 'minigpt', 'relu', k)
    with pytest.raises(analyze_results.AnalysisError) as e:
        analyze_results.analyze(str(tmp_path), plots=False, verbose=False)
    assert 'is not a study but holds 2 of them: cpu, cpu_max_iters20' in str(e.value)
