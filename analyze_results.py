"""
Reproducibility analysis of one study from the files train.py saved: metrics between trials,
statistics, sanity checks, summary.json, REPORT.md and plots. Nothing is retrained, and no
number is produced that does not come from those files. No torch.

    python analyze_results.py --results-dir results/cpu               # analyse a study
    python analyze_results.py --results-dir results/cpu --plots-only  # redraw plots from summary.json
    python analyze_results.py --compare results/cpu results/gpu       # two studies side by side

Reads  <study>/<model>/<activation>/trial_<k>.json, the .npz each names, <study>/failures.jsonl.
Writes <study>/summary.json, <study>/REPORT.md, and PNGs in <study>/plots/ (--plots-dir).
From Python: analyze(study_dir) does the same and returns the summary dict.

A trial counts only if its JSON parses and its .npz loads and matches the recorded sha256;
any other file is listed with the reason and skipped. Inputs are checked before anything is
written, and every output goes to a temp file that is then renamed into place, so bad input
overwrites nothing.

A folder of study folders (the mnist_ffn design's <results>/mnist_ffn/<task>/gated_<mode>/,
one study per grid cell) gets the FFN study's report instead: see build_ffn_summary.
"""
import glob
import hashlib
import io
import json
import math
import os
import sys

import numpy as np

import metrics
import plot_utils
import routing_metrics
from config import Parser
from fileio import atomic_write

SCHEMA_VERSION = 1
TRIAL_METRICS = ('train_loss', 'val_loss', 'perplexity', 'val_accuracy', 'token_accuracy', 'training_time',
                 'total_time', 'tokens_per_sec')
# mixture-of-experts trials (switchlm) also record these (see moe.py); summarised when present
MOE_METRICS = ('moe_dropped_fraction', 'moe_router_entropy', 'moe_aux_loss', 'moe_z_loss')
REQUIRED_METRICS = ('train_loss', 'val_loss', 'val_accuracy', 'training_time')
SEED_KEYS = ('init', 'data', 'dropout')  # the seeds that drive randomness; trial_seed is a label
# Two predictions count as identical when no probability differs by more than this: float32
# softmax of the same computation agrees to ~1e-7, genuinely different models by far more.
IDENTICAL_TOL = 1e-6
# Information-leakage rule. A model that cannot see the token it predicts does not score far
# better on unseen text than on its training text, and a character LM on Tiny Shakespeare
# reaches ~1.4-1.5 nats at best (nanoGPT's 10M-parameter model: 1.47). So flag a trial when
# val_loss < LEAK_RATIO * train_loss (any task), or, for character LMs (task 'lm'),
# val_loss < LM_LOSS_FLOOR nats.
LEAK_RATIO = 0.5
LM_LOSS_FLOOR = 0.5
PROVENANCE_KEYS = ('git_commit', 'git_dirty', 'torch_version', 'cuda_version', 'device', 'device_name',
                   'deterministic', 'python_version', 'hostname')


class AnalysisError(ValueError):
    """Input the analysis cannot use at all; the message names the problem and the choices."""


class BadFile(Exception):
    """One result file that cannot be used; the analysis lists it and goes on."""


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- loading

def load_trial(path, study_dir):
    """One trial as a dict (record, probs, eval_indices, targets, ...); raises BadFile."""
    rel = os.path.relpath(path, study_dir)
    model, activation, fname = rel.split(os.sep)[-3:]
    try:
        with open(path, 'rb') as f:
            raw = f.read()
        rec = json.loads(raw)
    except (OSError, ValueError) as e:
        raise BadFile(f"unreadable JSON ({e})")
    if not isinstance(rec, dict):
        raise BadFile("not a JSON object")
    if rec.get('schema_version') != SCHEMA_VERSION:
        raise BadFile(f"schema_version {rec.get('schema_version')!r}, this analysis reads {SCHEMA_VERSION}")
    if rec.get('source') != 'measured':
        raise BadFile(f"source is {rec.get('source')!r}, not 'measured'")
    where = (model, activation, fname[len('trial_'):-len('.json')])
    says = (rec.get('model'), rec.get('activation'), str(rec.get('trial')))
    if says != where or not isinstance(rec.get('trial'), int):
        raise BadFile(f"says model/activation/trial {'/'.join(says)} but lies at {'/'.join(where)}")
    m = rec.get('metrics')
    bad = [k for k in REQUIRED_METRICS if not (isinstance(m, dict) and _finite(m.get(k)))]
    if bad:
        raise BadFile(f"metrics {', '.join(bad)} missing or not finite numbers")
    for key in ('eval_hash', 'predictions_file', 'predictions_sha256'):
        if not isinstance(rec.get(key), str) or not rec[key]:
            raise BadFile(f"no {key}")
    pf = rec['predictions_file']
    if os.path.basename(pf) != pf:
        raise BadFile(f"predictions_file {pf!r} is not a file name beside the JSON")
    try:
        with open(os.path.join(os.path.dirname(path), pf), 'rb') as f:
            npz = f.read()
    except OSError as e:
        raise BadFile(f"predictions file {pf} missing or unreadable ({e.strerror})")
    if _sha256(npz) != rec['predictions_sha256']:
        raise BadFile(f"{pf} does not match predictions_sha256 (truncated or changed after the trial wrote it)")
    try:
        with np.load(io.BytesIO(npz), allow_pickle=False) as z:
            arrays = {k: z[k] for k in ('probs', 'eval_indices', 'targets')}
            # a mixture-of-experts trial's first-choice experts [n_eval, moe_layers, T]
            routing = z['routing'] if 'routing' in z.files else None
    except Exception as e:  # a corrupt archive fails in zipfile, zlib or numpy: any of them = unusable
        raise BadFile(f"{pf} cannot be loaded ({type(e).__name__}: {e})")
    probs = arrays['probs']
    if probs.ndim != 2 or probs.shape[0] == 0 or not np.issubdtype(probs.dtype, np.floating):
        raise BadFile(f"{pf}: probs should be a float array [n_eval, n_classes], got {probs.dtype} {probs.shape}")
    if not np.isfinite(probs).all() or (probs < 0).any() or not np.allclose(probs.sum(1, dtype=np.float64), 1, atol=1e-3):
        raise BadFile(f"{pf}: probs rows are not probability distributions")
    for k in ('eval_indices', 'targets'):
        if arrays[k].shape != (len(probs),):
            raise BadFile(f"{pf}: {k} has shape {arrays[k].shape}, expected ({len(probs)},)")
    if routing is not None and (routing.ndim < 2 or len(routing) != len(probs)
                                or not np.issubdtype(routing.dtype, np.integer) or (routing < 0).any()):
        raise BadFile(f"{pf}: routing should be non-negative expert indices [n_eval, layers, ...], "
                      f"got {routing.dtype} {routing.shape}")
    h = rec.get('history')
    curves_ok = isinstance(h, dict) and all(
        isinstance(h.get(k), list) and len(h[k]) == len(h.get('iter') or [None]) and all(map(_finite, h[k]))
        for k in ('iter', 'train_loss', 'val_loss'))
    if not curves_ok:  # the PD numbers do not need it: keep the trial, drop its curve
        rec['history'] = None
    return {'model': model, 'activation': activation, 'trial': rec['trial'], 'history_ok': curves_ok,
            'name': f"{model}/{activation}/trial_{rec['trial']}", 'record': rec, 'eval_hash': rec['eval_hash'],
            **arrays, 'routing': routing,
            'files': [{'path': rel, 'sha256': _sha256(raw)},
                      {'path': os.path.join(os.path.dirname(rel), pf), 'sha256': rec['predictions_sha256']}]}


def load_failures(study_dir, bad):
    """Records of failures.jsonl (trials that crashed); unreadable lines go to `bad`."""
    path = os.path.join(study_dir, 'failures.jsonl')
    if not os.path.exists(path):
        return []
    out = []
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        bad.append({'path': 'failures.jsonl', 'reason': f"unreadable ({e})"})
        return []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            bad.append({'path': f'failures.jsonl line {n}', 'reason': f"unreadable ({e})"})
            continue
        out.append(rec)
    return out


def load_study(study_dir):
    """(trials, bad, failures): the usable trials sorted by model, activation and trial; the
    files that could not be used, with reasons; the failed trials from failures.jsonl."""
    if not os.path.isdir(study_dir):
        raise AnalysisError(f"results dir {study_dir!r} does not exist or is not a folder "
                            f"(give a study folder such as results/cpu)")
    trials, bad = [], []
    for path in sorted(glob.glob(os.path.join(study_dir, '*', '*', 'trial_*.json'))):
        try:
            trials.append(load_trial(path, study_dir))
        except BadFile as e:
            bad.append({'path': os.path.relpath(path, study_dir), 'reason': str(e)})
    # the trainer writes the .npz first and the .json last: an .npz alone is an unfinished trial
    for path in sorted(glob.glob(os.path.join(study_dir, '*', '*', 'trial_*.npz'))):
        if not os.path.exists(path[:-len('npz')] + 'json'):
            bad.append({'path': os.path.relpath(path, study_dir), 'reason': "no trial JSON beside it (unfinished trial)"})
    trials.sort(key=lambda t: (t['model'], t['activation'], t['trial']))
    return trials, bad, load_failures(study_dir, bad)


# ----------------------------------------------------------------------------- one model x activation

def summarize_group(model, activation, trials, warnings):
    """Summary entry of one model x activation: the original tool's fields, every pairwise
    metric with mean, std and bootstrap CI, and mean/std/CI of the per-trial metrics."""
    recs = [t['record'] for t in trials]
    n = len(trials)
    rows = []
    for t, r in zip(trials, recs):
        m = r['metrics']
        rows.append({'trial_id': t['trial'], **{k: m.get(k) for k in TRIAL_METRICS},
                     'n_params': m.get('n_params'), 'peak_memory_mb': m.get('peak_memory_mb'),
                     'seeds': r.get('seeds'), 'history': r.get('history')})
    moe = [k for k in MOE_METRICS if all(_finite(r['metrics'].get(k)) for r in recs)]
    for t, row in zip(trials, rows):
        row.update({k: t['record']['metrics'][k] for k in moe})
    stats = {}
    for k in TRIAL_METRICS + tuple(moe):
        values = [row[k] for row in rows]
        stats[k] = metrics.describe(values) if all(_finite(v) for v in values) else None
    entry = {
        'model_name': model, 'activation': activation, 'task': recs[0].get('task'), 'vary': recs[0].get('vary'),
        'n_trials': n, 'trial_ids': [t['trial'] for t in trials], 'config': recs[0].get('config'),
        'eval_hash': recs[0]['eval_hash'], 'n_eval': len(trials[0]['probs']),
        'trials': rows, 'reproducibility_metrics': [],
        'avg_val_loss': stats['val_loss']['mean'], 'std_val_loss': stats['val_loss']['std'],
        'avg_val_accuracy': stats['val_accuracy']['mean'], 'avg_relative_pd': None,
        'avg_training_time': stats['training_time']['mean'],
        'trial_stats': stats, 'pairwise': None, 'routing_agreement': None, 'error': None,
    }
    name = f"{model}/{activation}"
    for key in ('config', 'vary', 'task'):
        if any(r.get(key) != recs[0].get(key) for r in recs):
            warnings.append(f"{name}: trials have different {key} values: they are not repeats of one experiment")
    try:
        pairs, values = metrics.compare(trials)
    except metrics.EvalMismatch as e:
        entry['error'] = f"no PD computed: {e}"
        warnings.insert(0, f"ERROR {name}: {e}; no PD computed for this group")
        return entry
    ids = np.array(entry['trial_ids'])
    entry['pairwise'] = {'pairs': ids[pairs].tolist()}
    for metric, v in values.items():
        d = metrics.pair_matrix(n, pairs, v)
        ci = metrics.bootstrap_pairwise_ci(d)
        entry['pairwise'][metric] = {
            'values': v.tolist(), 'mean': float(v.mean()) if len(v) else None,
            'std': float(v.std(ddof=1)) if len(v) >= 2 else None,
            'ci': ci, 'ci_note': None if ci else metrics.no_interval(n)}
    entry['avg_relative_pd'] = entry['pairwise']['relative_pd']['mean']
    entry['routing_agreement'] = routing_agreement(name, trials, ids, warnings)
    entry['reproducibility_metrics'] = [
        {'model_pair': ids[p].tolist(), 'relative_pd': float(values['relative_pd'][k]),
         'prediction_differences': int(values['prediction_differences'][k]), 'total_predictions': entry['n_eval']}
        for k, p in enumerate(pairs)]
    # sanity: different seeds must give different predictions (vary=none keeps the seeds equal)
    for k, (a, b) in enumerate(pairs):
        sa, sb = (recs[a].get('seeds') or {}), (recs[b].get('seeds') or {})
        if values['max_abs_diff'][k] <= IDENTICAL_TOL and any(sa.get(s) != sb.get(s) for s in SEED_KEYS):
            warnings.append(f"{name}: trials {ids[a]} and {ids[b]} give identical predictions although their "
                            f"seeds differ ({sa} vs {sb}) — seeds not applied")
    return entry


def routing_agreement(name, trials, ids, warnings):
    """Routing agreement between every pair of a group's trials (routing_metrics.py: experts
    matched by a maximum-weight assignment on co-routing counts), with mean, std and bootstrap
    CI over trials like the PD; None for trials without routing (not mixture-of-experts)."""
    have = [t['routing'] is not None for t in trials]
    if not any(have):
        return None
    if not all(have):
        warnings.append(f"{name}: only {sum(have)} of {len(trials)} trials saved routing; no routing agreement")
        return None
    if len(trials) < 2:
        return None
    n_experts = (trials[0]['record'].get('config') or {}).get('n_experts')
    try:
        r = routing_metrics.pairwise_routing_agreement([t['routing'] for t in trials], n_experts)
    except ValueError as e:
        warnings.append(f"{name}: no routing agreement ({e})")
        return None
    pairs = np.array([(i, j) for i, j, _ in r['pairs']])
    v = np.array([a for _, _, a in r['pairs']])
    ci = metrics.bootstrap_pairwise_ci(metrics.pair_matrix(len(trials), pairs, v))
    return {'pairs': ids[pairs].tolist(), 'values': v.tolist(), 'mean': r['mean'],
            'std': float(v.std(ddof=1)) if len(v) >= 2 else None, 'ci': ci,
            'ci_note': None if ci else metrics.no_interval(len(trials)),
            'per_layer_mean': r['per_layer_mean'], 'chance_mean': r['chance_mean'],
            'method': 'fraction of evaluation tokens whose first-choice experts match after matching '
                      'experts by linear_sum_assignment on co-routing counts; mean over MoE layers'}


def sanity_trials(trials, warnings):
    """Per-trial checks: implausibly low val loss, and a saved accuracy its predictions deny."""
    for t in trials:
        r, m = t['record'], t['record']['metrics']
        why = []
        if m['val_loss'] < LEAK_RATIO * m['train_loss']:
            why.append(f"below {LEAK_RATIO} x train loss {m['train_loss']:.4f}")
        if r.get('task') == 'lm' and m['val_loss'] < LM_LOSS_FLOOR:
            why.append(f"below {LM_LOSS_FLOOR} nats, far under what character LMs reach")
        if why:
            warnings.append(f"{t['name']}: val loss {m['val_loss']:.4f} is {' and '.join(why)} — "
                            f"possible information leakage (non-causal model?)")
        if not t['history_ok']:
            warnings.append(f"{t['name']}: history missing or malformed: no training curve for this trial")
        acc = float((t['probs'].argmax(1) == t['targets']).mean())
        if abs(acc - m['val_accuracy']) > 1e-9:
            warnings.append(f"{t['name']}: val_accuracy {m['val_accuracy']:.6f} in the JSON differs from the "
                            f"accuracy of its saved predictions {acc:.6f}")


def sanity_across_activations(model, groups, warnings):
    """Two activations of one model giving identical predictions for the same trial means
    the activation was probably never applied (aliases like silu/swish excepted)."""
    acts = sorted(groups)
    for i, a in enumerate(acts):
        for b in acts[i + 1:]:
            if plot_utils.canonical_activation(a) == plot_utils.canonical_activation(b):
                continue  # one function under two names: identical by design
            tb = {t['trial']: t for t in groups[b]}
            same = [t['trial'] for t in groups[a] if t['trial'] in tb and t['eval_hash'] == tb[t['trial']]['eval_hash']
                    and t['probs'].shape == tb[t['trial']]['probs'].shape
                    and metrics.max_abs_diff(t['probs'], tb[t['trial']]['probs']) <= IDENTICAL_TOL]
            if same:
                warnings.append(f"{model}: activations {a} and {b} give identical predictions (trial(s) "
                                f"{', '.join(map(str, same))}) — activation probably not applied")
    configs = {a: groups[a][0]['record'].get('config') or {} for a in acts}
    keys = sorted({k for c in configs.values() for k in c if len({json.dumps(v.get(k)) for v in configs.values()}) > 1})
    if keys:
        warnings.append(f"{model}: activations were trained with different configs ({', '.join(keys)} differ); "
                        f"comparing them is not like for like")


def compare_to_baseline(model, act, base, ta, tb, warnings):
    """Difference in mean relative PD (act - baseline) with a bootstrap CI over trials and a
    permutation-test p-value over trial labels."""
    na, nb = len(ta), len(tb)
    out = {'model': model, 'activation': act, 'baseline': base, 'metric': 'relative_pd',
           'n_trials': na, 'n_trials_baseline': nb, 'mean': None, 'mean_baseline': None, 'difference': None,
           'ci': None, 'ci_note': None, 'p_value': None, 'p_note': None, 'exact': None, 'n_permutations': None,
           'error': None}
    try:
        pairs, values = metrics.compare(ta + tb, {'relative_pd': metrics.relative_pd})
    except metrics.EvalMismatch as e:
        out['error'] = str(e)
        warnings.insert(0, f"ERROR {model}: {act} vs {base}: {e}; no comparison")
        return out
    d = metrics.pair_matrix(na + nb, pairs, values['relative_pd'])
    ia, ib = np.arange(na), np.arange(na, na + nb)
    if min(na, nb) < 2:
        out['p_note'] = out['ci_note'] = "needs at least 2 trials on each side"
        return out
    out['mean'] = float(metrics.mean_over_distinct_pairs(d, ia))
    out['mean_baseline'] = float(metrics.mean_over_distinct_pairs(d, ib))
    out['difference'] = out['mean'] - out['mean_baseline']
    out['ci'] = metrics.bootstrap_difference_ci(d, ia, ib)
    out['ci_note'] = None if out['ci'] else metrics.no_interval(min(na, nb))
    out.update(metrics.permutation_test(d, ia, ib))
    return out


# ----------------------------------------------------------------------------- the whole study

def build_summary(study_dir, baseline=None, loaded=None):
    """The summary dict of a study, in memory (nothing written). baseline=None: relu where the
    study has it; a name the study does not have raises AnalysisError. loaded: what
    load_study(study_dir) returned, if the caller has it already."""
    trials, bad, failures = loaded or load_study(study_dir)
    if not trials:
        reasons = '; '.join(f"{b['path']}: {b['reason']}" for b in bad[:3])
        raise AnalysisError(f"no usable trial results under {study_dir!r} (looked for "
                            f"<model>/<activation>/trial_<k>.json)" + (f"; skipped: {reasons}" if bad else ''))
    groups = {}
    for t in trials:
        groups.setdefault(t['model'], {}).setdefault(t['activation'], []).append(t)
    activations = sorted({t['activation'] for t in trials})
    if baseline is not None and baseline not in activations:
        raise AnalysisError(f"baseline {baseline!r} is not an activation of this study; valid: {', '.join(activations)}")
    base = baseline or ('relu' if 'relu' in activations else None)

    warnings, results, comparisons = [], [], []
    for model, acts in groups.items():
        for act, ts in acts.items():
            results.append(summarize_group(model, act, ts, warnings))
        sanity_across_activations(model, acts, warnings)
        if base in acts:
            comparisons += [compare_to_baseline(model, a, base, ts, acts[base], warnings)
                            for a, ts in acts.items() if a != base]
    sanity_trials(trials, warnings)
    valid = {(t['model'], t['activation'], t['trial']) for t in trials}
    for f in failures:
        f['has_result'] = (f.get('model'), f.get('activation'), f.get('trial')) in valid
    if failures:
        warnings.append(f"{len(failures)} failed trial(s) in failures.jsonl: " +
                        ', '.join(f"{f.get('model')}/{f.get('activation')}/trial_{f.get('trial')}" for f in failures))
    warnings += [f"skipped {b['path']}: {b['reason']}" for b in bad]

    files = [f for t in trials for f in t['files']]
    seen = {}
    for t in trials:
        for k in PROVENANCE_KEYS:
            v = (t['record'].get('provenance') or {}).get(k)
            if v not in seen.setdefault(k, []):
                seen[k].append(v)
    return {
        'schema_version': SCHEMA_VERSION,
        'study': os.path.basename(os.path.normpath(study_dir)),
        'baseline': base,
        'statistics': {'confidence_level': metrics.CONFIDENCE, 'n_resamples': metrics.N_RESAMPLES,
                       'n_permutations': metrics.N_PERMUTATIONS, 'seed': metrics.SEED,
                       'min_trials_for_ci': metrics.MIN_TRIALS_FOR_CI,
                       'pairwise_ci': 'percentile bootstrap over trials; pairs of a trial with itself left out',
                       'trial_ci': 'percentile bootstrap of the mean (scipy.stats.bootstrap)',
                       'p_value': 'two-sided permutation test over trial labels (scipy.stats.permutation_test)',
                       'std': 'sample standard deviation (ddof=1)'},
        'sanity_rules': {'identical_tol': IDENTICAL_TOL, 'leak_ratio': LEAK_RATIO, 'lm_loss_floor': LM_LOSS_FLOOR},
        'warnings': warnings,
        'results': results,
        'comparisons': comparisons,
        'failures': failures,
        'bad_files': bad,
        'provenance': {'n_trials': len(trials), 'files': files,
                       **{k + 's': sorted(v, key=json.dumps) for k, v in seen.items()}},
    }


# ----------------------------------------------------------------------------- report

def _num(x, digits=4):
    if x is None:
        return '—'
    if x == 0:
        return '0'
    return f'{x:.{digits}f}' if abs(x) >= 10 ** -(digits - 1) else f'{x:.2e}'


def _ci(ci):
    return f"[{_num(ci[0])}, {_num(ci[1])}]" if ci else "no interval possible (< 3 trials)"


def _pm(stat):
    if not stat:
        return '—'
    return _num(stat['mean']) + (f" ± {_num(stat['std'])}" if stat['std'] is not None else '')


def _bold_best(results, key, best):
    vals = [key(r) for r in results]
    ok = [v for v in vals if v is not None]
    return {i for i, v in enumerate(vals) if ok and v == best(ok)}


def render_report(s):
    out = [f"# Reproducibility report: {s['study']}", "",
           "Every number below is computed from the trial files listed under Inputs. Relative PD = "
           "mean |p1 − p2| / (mean p1 + mean p2) between two trials' softmax outputs on the same "
           "evaluation set (= mean total-variation distance; 0 identical, 1 disjoint).", "", "## Warnings", ""]
    out += [f"- {w}" for w in s['warnings']] or ["None."]
    st = s['statistics']
    out += ["", f"Intervals: {int(st['confidence_level'] * 100)}% {st['pairwise_ci']} ({st['n_resamples']} resamples, "
            f"seed {st['seed']}); none with fewer than {st['min_trials_for_ci']} trials. Std: {st['std']}.", ""]
    if s['baseline'] is None:
        out += ["No relu runs in this study, so no comparisons against a baseline (choose one with --baseline).", ""]
    models = {}
    for r in s['results']:
        models.setdefault(r['model_name'], []).append(r)
    for model, results in models.items():
        pd = lambda r: (r['pairwise'] or {}).get('relative_pd', {}).get('mean')  # noqa: E731
        best_pd = _bold_best(results, pd, min)
        best_loss = _bold_best(results, lambda r: r['avg_val_loss'], min)
        best_acc = _bold_best(results, lambda r: r['avg_val_accuracy'], max)
        out += [f"## {model}", "", f"task {results[0]['task']}, vary {results[0]['vary']}, "
                f"{results[0]['n_eval']} evaluation examples", "",
                "| activation | trials | relative PD [95% CI] | top-1 disagreement | val loss (mean ± std) | "
                "val accuracy | training time (s) |", "|---|---|---|---|---|---|---|"]
        for i, r in enumerate(results):
            b = lambda text, best: f"**{text}**" if i in best else text  # noqa: E731
            if r['error']:
                pd_cell, top1 = f"ERROR: {r['error']}", '—'
            elif r['n_trials'] < 2:
                pd_cell, top1 = "— (1 trial: no pairs)", '—'
            else:
                p = r['pairwise']
                pd_cell = b(_num(p['relative_pd']['mean']), best_pd) + ' ' + _ci(p['relative_pd']['ci'])
                top1 = _num(p['top1_disagreement']['mean'])
            out.append(f"| {r['activation']} | {r['n_trials']} | {pd_cell} | {top1} | "
                       f"{b(_pm(r['trial_stats']['val_loss']), best_loss)} | "
                       f"{b(_num(r['avg_val_accuracy']), best_acc)} | {_pm(r['trial_stats']['training_time'])} |")
        others = [m for m in metrics.PAIR_METRICS if m not in ('relative_pd', 'top1_disagreement')]
        out += ["", "Bold: lowest relative PD (most reproducible), lowest val loss, highest val accuracy.", "",
                "Other pairwise metrics (mean over pairs; JS divergence in bits):", "",
                "| activation | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        for r in results:
            cells = [_num(r['pairwise'][m]['mean']) if r['pairwise'] and r['pairwise'][m]['mean'] is not None else '—'
                     for m in others]
            out.append(f"| {r['activation']} | " + " | ".join(cells) + " |")
        moe = [r for r in results if r.get('routing_agreement') or (r['trial_stats'] or {}).get('moe_dropped_fraction')]
        if moe:
            out += ["", "Mixture of experts: routing agreement between trials (fraction of evaluation tokens sent "
                    "to the same expert after matching experts across the two trials; 1 = identical routing; "
                    "'chance' = the same with one trial's tokens shuffled), next to the PD and the routing "
                    "statistics of the evaluation set (means over trials):", "",
                    "| activation | routing agreement [95% CI] | chance | relative PD | perplexity | "
                    "dropped tokens | router entropy (nats) |", "|---|---|---|---|---|---|---|"]
            for r in moe:
                ra, st = r.get('routing_agreement'), r['trial_stats']
                agree = f"{_num(ra['mean'])} {_ci(ra['ci'])}" if ra else '—'
                mean = lambda k: _num((st.get(k) or {}).get('mean'))  # noqa: E731
                out.append(f"| {r['activation']} | {agree} | {_num(ra['chance_mean']) if ra else '—'} | "
                           f"{_num(r['avg_relative_pd'])} | {mean('perplexity')} | {mean('moe_dropped_fraction')} | "
                           f"{mean('moe_router_entropy')} |")
        cmp = [c for c in s['comparisons'] if c['model'] == model]
        if cmp:
            out += ["", f"Against {s['baseline']}: difference in mean relative PD (activation − {s['baseline']}), "
                    "two-sided permutation test over trial labels (an exact test over n splits cannot give a "
                    "p below 2/n):", "",
                    "| activation | relative PD | " + s['baseline'] + " | difference [95% CI] | p-value |",
                    "|---|---|---|---|---|"]
            for c in cmp:
                if c['error']:
                    out.append(f"| {c['activation']} | ERROR: {c['error']} | | | |")
                    continue
                if c['p_value'] is None:
                    p = c['p_note']
                else:
                    p = f"{c['p_value']:.4g} ({'exact, ' if c['exact'] else ''}{c['n_permutations']} permutations)"
                diff = '—' if c['difference'] is None else f"{_num(c['difference'])} {_ci(c['ci'])}"
                out.append(f"| {c['activation']} | {_num(c['mean'])} | {_num(c['mean_baseline'])} | {diff} | {p} |")
        elif s['baseline']:
            out += ["", f"No {s['baseline']} runs for {model}: no comparisons."]
        out.append("")
    if s['failures']:
        out += ["## Failed trials", ""]
        out += [f"- {f.get('model')}/{f.get('activation')}/trial_{f.get('trial')}: {f.get('error')}"
                + (" (a later run of it succeeded)" if f.get('has_result') else '') for f in s['failures']]
        out.append("")
    if s['bad_files']:
        out += ["## Skipped files", ""] + [f"- `{b['path']}`: {b['reason']}" for b in s['bad_files']] + [""]
    p = s['provenance']
    out += ["## Inputs", "", f"{p['n_trials']} trials from {len(p['files'])} files; git commits: "
            f"{', '.join(map(str, p.get('git_commits', [])))}; git dirty: {', '.join(map(str, p.get('git_dirtys', [])))}; torch: "
            f"{', '.join(map(str, p.get('torch_versions', [])))}; devices: {', '.join(map(str, p.get('device_names', [])))}.",
            "SHA-256 of every input file: summary.json, provenance.files.", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- writing

def json_safe(obj):
    """obj with every non-finite float (an inf grad norm in a history, say) as the string
    'nan', 'inf' or '-inf': summary.json stays strict JSON and keeps what the files said."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode('utf-8')))


def write_json(path, obj):
    # allow_nan=False: summary.json is strict JSON; a NaN here would be a bug, not a value
    write_text(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def analyze(study_dir, plots_dir=None, baseline=None, plots=True, verbose=True):
    """Analyse a study folder: write summary.json and REPORT.md in it and the plots in
    plots_dir (default <study_dir>/plots); return the summary dict. Raises AnalysisError on
    input it cannot use, before writing anything."""
    if is_study_grid(study_dir):  # a grid design's root (mnist_ffn): the FFN study's report
        return analyze_ffn(study_dir, plots_dir, baseline, plots, verbose)
    summary = json_safe(build_summary(study_dir, baseline))
    report = render_report(summary)
    write_json(os.path.join(study_dir, 'summary.json'), summary)
    write_text(os.path.join(study_dir, 'REPORT.md'), report)
    written = plot_utils.make_plots(summary, plots_dir or os.path.join(study_dir, 'plots')) if plots else []
    if verbose:
        for w in summary['warnings']:
            print(f"warning: {w}", file=sys.stderr)
        print(f"{summary['provenance']['n_trials']} trials analysed; wrote {os.path.join(study_dir, 'summary.json')}, "
              f"{os.path.join(study_dir, 'REPORT.md')}" +
              (f" and {len(written)} plots in {os.path.dirname(written[0])}" if written else ''))
    return summary


def summary_figures(study_dir):
    """The plots of an existing summary.json, built in memory: a missing, corrupt or
    malformed summary is an AnalysisError before any plot file is touched."""
    path = os.path.join(study_dir, 'summary.json')
    try:
        with open(path, encoding='utf-8') as f:
            s = json.load(f)
        return plot_utils.ffn_figures(s) if s.get('kind') == FFN_KIND else plot_utils.figures(s)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise AnalysisError(f"cannot plot {path} ({type(e).__name__}: {e}); run without --plots-only to (re)create it")


# ----------------------------------------------------------------------------- two studies

COMPARED = ('relative_pd', 'val_loss', 'val_accuracy')


def compare_studies(dir_a, dir_b, out_dir=None, plots_dir=None, verbose=True):
    """Side-by-side table and plot of mean relative PD, val loss and val accuracy per model x
    activation of two studies, with the change (b - a). Writes compare.json and COMPARE.md to
    out_dir (default <parent of dir_a>/compare_<a>_vs_<b>) and compare.png to plots_dir
    (default out_dir). Returns the comparison dict."""
    sa, sb = json_safe(build_summary(dir_a)), json_safe(build_summary(dir_b))
    name_a, name_b = sa['study'], sb['study']
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.normpath(os.path.abspath(dir_a))),
                                      f'compare_{name_a}_vs_{name_b}')

    def side(r):
        return {'relative_pd': r['avg_relative_pd'] if r else None, 'val_loss': r['avg_val_loss'] if r else None,
                'val_accuracy': r['avg_val_accuracy'] if r else None, 'n_trials': r['n_trials'] if r else 0}
    index = [{(r['model_name'], r['activation']): r for r in s['results']} for s in (sa, sb)]
    rows = []
    for key in sorted(set(index[0]) | set(index[1])):
        a, b = side(index[0].get(key)), side(index[1].get(key))
        rows.append({'model': key[0], 'activation': key[1], 'a': a, 'b': b,
                     'change': {k: b[k] - a[k] if a[k] is not None and b[k] is not None else None for k in COMPARED}})
    comparison = {'schema_version': SCHEMA_VERSION, 'study_a': name_a, 'study_b': name_b, 'rows': rows,
                  'warnings': [f"{name_a}: {w}" for w in sa['warnings']] + [f"{name_b}: {w}" for w in sb['warnings']],
                  'provenance': {name_a + ' (a)': sa['provenance'], name_b + ' (b)': sb['provenance']}}
    md = [f"# {name_a} vs {name_b}", "", "Means over trials (relative PD: over pairs of trials); change = "
          f"{name_b} − {name_a}; — where a study has no value.", "", "## Warnings", ""]
    md += [f"- {w}" for w in comparison['warnings']] or ["None."]
    md += ["", "| model | activation | trials | " + " | ".join(f"{k} {name_a} | {k} {name_b} | change" for k in COMPARED) + " |",
           "|---|---|---|" + "---|---|---|" * len(COMPARED)]
    for r in rows:
        md.append(f"| {r['model']} | {r['activation']} | {r['a']['n_trials']} / {r['b']['n_trials']} | " +
                  " | ".join(f"{_num(r['a'][k])} | {_num(r['b'][k])} | {_num(r['change'][k])}" for k in COMPARED) + " |")
    fig = plot_utils.comparison_plot(rows, name_a, name_b)
    write_json(os.path.join(out_dir, 'compare.json'), comparison)
    write_text(os.path.join(out_dir, 'COMPARE.md'), "\n".join(md) + "\n")
    plot_utils.save_figure(fig, os.path.join(plots_dir or out_dir, 'compare.png'))
    if verbose:
        for w in comparison['warnings']:
            print(f"warning: {w}", file=sys.stderr)
        print(f"wrote {os.path.join(out_dir, 'compare.json')}, {os.path.join(out_dir, 'COMPARE.md')}, "
              f"{os.path.join(plots_dir or out_dir, 'compare.png')}")
    return comparison


# ============================================================================= the FFN study (mnist_ffn)
# The mnist_ffn design of run_all_experiments.py writes one ordinary study folder per cell of a
# (width x batch size x learning rate) grid, <root>/h<w>_b<b>_lr<lr>/ffn/<activation>/trial_<k>.json,
# every cell with the same trial seeds. analyze(<root>) builds the study's report from those
# folders; each cell is read (and can be analysed alone) like any other study. The cells'
# configs come from the trial files, never from the folder names.

FFN_KIND = 'ffn_study'
FFN_SWEPT = ('hidden', 'batch_size', 'learning_rate', 'max_iters')  # max_iters = epochs x batches: follows batch_size
FFN_TABLE_KS = (1, 2, 4, 8)
FFN_CURVE_KS = tuple(range(1, 33))


def is_study_grid(root):
    """True for a folder of study folders (a grid design's root) that is not a study itself."""
    return (not glob.glob(os.path.join(root, '*', '*', 'trial_*.json'))
            and bool(glob.glob(os.path.join(root, '*', '*', '*', 'trial_*.json'))))


def _ffn_cell(cell_dir, baseline):
    """One cell: its ordinary study summary (PD, CIs, warnings) and its runs by (activation, trial)."""
    loaded = load_study(cell_dir)
    trials = loaded[0]
    name = os.path.basename(os.path.normpath(cell_dir))
    if not trials:  # every run of the cell failed: its config is in failures.jsonl
        config = next((f['config'] for f in loaded[2] if isinstance(f.get('config'), dict)), None)
        return {'name': name, 'summary': None, 'runs': {}, 'bad': loaded[1], 'failures': loaded[2], 'config': config}
    not_ffn = sorted({t['model'] for t in trials} - {'ffn'})
    if not_ffn:
        raise AnalysisError(f"{cell_dir} holds {', '.join(not_ffn)} trials: an FFN study grid holds ffn trials only")
    acts = {t['activation'] for t in trials}
    summary = json_safe(build_summary(cell_dir, baseline if baseline in acts else None, loaded))
    runs = {(t['activation'], t['trial']): t['record'] for t in trials}
    configs = {json.dumps({k: r['config'].get(k) for k in FFN_SWEPT}, sort_keys=True) for r in runs.values()}
    if len(configs) != 1:
        raise AnalysisError(f"{cell_dir}: its trials have different widths, batch sizes or learning rates; "
                            f"a cell of the grid holds one configuration")
    return {'name': name, 'summary': summary, 'runs': runs, 'bad': loaded[1], 'failures': loaded[2],
            'config': next(iter(runs.values()))['config']}


def _interval(samples):
    lo, hi = metrics.percentile_interval(samples)
    return [float(lo), float(hi)] if np.isfinite(lo) and np.isfinite(hi) else None


def build_ffn_summary(root, baseline=None):
    """The FFN study's summary dict from the cell folders under root (nothing written)."""
    found = [_ffn_cell(d, baseline or 'relu') for d in sorted(glob.glob(os.path.join(root, '*', '')))
             if glob.glob(os.path.join(d, '*', '*', 'trial_*.json')) or os.path.exists(os.path.join(d, 'failures.jsonl'))]
    warnings = [f"{c['name']}: skipped {b['path']}: {b['reason']}" for c in found if not c['runs'] for b in c['bad']]
    cells = [c for c in found if c['runs']]
    if not cells:
        raise AnalysisError(f"no usable trials under {root!r} (looked for <cell>/ffn/<activation>/trial_<k>.json)")
    base_cfg = {k: v for k, v in cells[0]['config'].items() if k not in FFN_SWEPT}
    for c in cells:
        for r in c['runs'].values():
            diff = sorted(k for k in set(base_cfg) | set(r['config']) if k not in FFN_SWEPT
                          and base_cfg.get(k) != r['config'].get(k))
            if diff:
                raise AnalysisError(f"cell {c['name']} differs from cell {cells[0]['name']} in {', '.join(diff)}: "
                                    f"the cells of one study differ only in width, batch size and learning rate")
    acts = sorted({a for c in cells for a, _ in c['runs']})
    if baseline is not None and baseline not in acts:
        raise AnalysisError(f"baseline {baseline!r} is not an activation of this study; valid: {', '.join(acts)}")
    base = baseline or ('relu' if 'relu' in acts else acts[0])
    acts = [base] + [a for a in acts if a != base]
    by = {(c['config']['hidden'], c['config']['batch_size'], c['config']['learning_rate']): c
          for c in found if c['config']}  # with the cells whose every run failed
    widths, batches, lrs = (sorted({key[i] for key in by}) for i in range(3))
    seeds = sorted({k for c in cells for _, k in c['runs']})
    failed = {(f.get('activation'), f.get('trial'), c['name']): f.get('error') for c in found for f in c['failures']}
    out_widths = []
    for c in cells:
        warnings += [f"{c['name']}: {w}" for w in c['summary']['warnings']]
    for w in widths:
        grid = [(b, lr) for b in batches for lr in lrs]
        val = np.full((len(acts), len(grid), len(seeds)), np.nan)
        test = np.full_like(val, np.nan)
        params, missing = {}, []
        for j, key in enumerate(grid):
            cell = by.get((w, *key))
            if cell is None:
                missing.append(f"cell h{w} batch {key[0]} lr {key[1]:g} (all {len(acts) * len(seeds)} runs)")
                continue
            for i, a in enumerate(acts):
                for s, k in enumerate(seeds):
                    r = cell['runs'].get((a, k))
                    if r is None:
                        err = failed.get((a, k, cell['name']))
                        missing.append(f"{cell['name']} {a} trial {k}" + (f" (failed: {err})" if err else ' (no result)'))
                        continue
                    m = r['metrics']
                    val[i, j, s], test[i, j, s] = m['val_accuracy'], m.get('test_accuracy', np.nan)
                    params.setdefault(a, {'units': m.get('ffn_units'), 'n_params': m.get('n_params')})
        if missing:
            warnings.append(f"width {w}: {len(missing)} run(s) missing, counted as draws that are never selected: "
                            + '; '.join(missing[:5]) + (' ...' if len(missing) > 5 else ''))
        if np.isnan(test[~np.isnan(val)]).any():
            raise AnalysisError(f"width {w}: a trial without test_accuracy (not a classification trial?)")
        boot = metrics.best_of_k_bootstrap(val, test, FFN_CURVE_KS)
        curves = {a: {split: boot[split][i].tolist() for split in ('val', 'test')}
                  | {f'{split}_ci': [_interval(boot[f'{split}_boot'][i][:, q]) for q in range(len(FFN_CURVE_KS))]
                     for split in ('val', 'test')} for i, a in enumerate(acts)}
        comparisons = {a: {f'{split}_diff': (boot[split][i] - boot[split][0]).tolist()
                           for split in ('val', 'test')}
                       | {f'{split}_diff_ci': [_interval(boot[f'{split}_boot'][i][:, q] - boot[f'{split}_boot'][0][:, q])
                                               for q in range(len(FFN_CURVE_KS))] for split in ('val', 'test')}
                       for i, a in enumerate(acts) if i}
        # PD between seeds at one configuration shared by all activations: the cell best on
        # validation accuracy averaged over every activation and seed (chosen for neither model)
        means = np.array([np.nanmean(val[:, j]) if np.isfinite(val[:, j]).any() else -np.inf for j in range(len(grid))])
        shared = by.get((w, *grid[int(np.argmax(means))]))
        if shared is None or shared['summary'] is None:
            raise AnalysisError(f"width {w}: no finished run in any cell")
        pd = {'cell': shared['name'], 'batch_size': shared['config']['batch_size'],
              'learning_rate': shared['config']['learning_rate'], 'activations': {}, 'comparisons': {}}
        for r in shared['summary']['results']:
            p = r['pairwise'] or {}
            pd['activations'][r['activation']] = {
                'n_trials': r['n_trials'], 'relative_pd': (p.get('relative_pd') or {}).get('mean'),
                'ci': (p.get('relative_pd') or {}).get('ci'), 'top1_disagreement': (p.get('top1_disagreement') or {}).get('mean')}
        for cmp in shared['summary']['comparisons']:
            pd['comparisons'][cmp['activation']] = {k: cmp[k] for k in ('difference', 'ci', 'p_value', 'exact', 'n_permutations')}
        out_widths.append({'width': w, 'params': params, 'curves': curves, 'comparisons': comparisons, 'pd': pd,
                           'n_runs': int(np.isfinite(val).sum()), 'n_grid_runs': int(val.size)})
    cell_rows = []
    for key in sorted(by):
        c, row = by[key], {'cell': by[key]['name'], 'width': key[0], 'batch_size': key[1], 'learning_rate': key[2]}
        for r in (c['summary'] or {}).get('results', []):
            recs = [c['runs'][(r['activation'], k)] for k in r['trial_ids']]
            row[r['activation']] = {
                'n_trials': r['n_trials'], 'val_accuracy': r['avg_val_accuracy'],
                'test_accuracy': float(np.mean([x['metrics']['test_accuracy'] for x in recs])),
                'relative_pd': r['avg_relative_pd']}
        cell_rows.append(row)
    recs = [r for c in cells for r in c['runs'].values()]
    return {
        'schema_version': SCHEMA_VERSION, 'kind': FFN_KIND,
        'study': os.path.dirname(recs[0].get('study') or '') or os.path.basename(os.path.normpath(root)),
        'task': base_cfg.get('dataset'), 'gated_width': base_cfg.get('gated_width', 'same'), 'config': base_cfg,
        'activations': acts, 'baseline': base, 'widths': widths, 'batch_sizes': batches, 'learning_rates': lrs,
        'seeds': seeds, 'ks': list(FFN_TABLE_KS), 'curve_ks': list(FFN_CURVE_KS), 'vary': recs[0].get('vary'),
        'statistics': {'best_of_k': 'exact expectation over k draws with replacement from all runs of the grid '
                                    '(metrics.expected_best_of_k)',
                       'ci': f"{int(metrics.CONFIDENCE * 100)}% percentile bootstrap over seeds: the same resampled "
                             f"seeds in every cell and for every activation ({metrics.N_RESAMPLES} resamples, seed "
                             f"{metrics.SEED})",
                       'pd_ci': 'percentile bootstrap over trials; difference: permutation test over trial labels'},
        'results': out_widths, 'cells': cell_rows, 'warnings': warnings,
        'failures': [f | {'cell': c['name']} for c in found for f in c['failures']],
        'timing': {'n_trials': len(recs), 'trial_seconds': float(sum(r['metrics']['total_time'] for r in recs)),
                   'threads': sorted({str((r.get('provenance') or {}).get('threads')) for r in recs}),
                   'devices': sorted({str((r.get('provenance') or {}).get('device_name')) for r in recs})},
        'provenance': {'n_trials': len(recs), 'cells': [c['name'] for c in cells],
                       'files': [f for c in cells for f in c['summary']['provenance']['files']],
                       'git_commits': sorted({str((r.get('provenance') or {}).get('git_commit')) for r in recs}),
                       'torch_versions': sorted({str((r.get('provenance') or {}).get('torch_version')) for r in recs})},
    }


def _ci_cell(x, ci, digits=3):
    if not _finite(x):  # None, or 'nan' (json_safe): no finished run
        return '—'
    return f"{x:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else '')


def _ffn_verdict(ci, a, base):
    if not ci:
        return 'n/a'
    return f"{a} higher" if ci[0] > 0 else f"{base} higher" if ci[1] < 0 else 'no clear difference'


def render_ffn_report(s):
    acts, base, ks, cks = s['activations'], s['baseline'], s['ks'], s['curve_ks']
    cfg, n_cells = s['config'], len(s['cells'])
    out = [f"# FFN study: {' vs '.join(acts)} on {s['task']} (gated width: {s['gated_width']})", "",
           f"Measured: `ffn` classifiers (depth {cfg.get('depth')}, {cfg.get('epochs')} epoch(s), AdamW, weight decay "
           f"{cfg.get('weight_decay')}, dropout {cfg.get('dropout')}) on every cell of widths {s['widths']} x batch sizes "
           f"{s['batch_sizes']} x learning rates {s['learning_rates']} ({n_cells} cells), seeds {len(s['seeds'])} per "
           f"cell and activation (trial k has seed seed_base + k in every cell; vary {s['vary']}). Gated width "
           f"`same`: a gated activation has `width` gated units (the original FFN_GeGLU); `matched`: the unit count "
           f"whose parameter count is closest to the ungated model's at that width.", "", "## Warnings", ""]
    out += [f"- {w}" for w in s['warnings']] or ["None."]
    out += ["", "## Parameters", "", "| width | " + " | ".join(f"{a} units | {a} params" for a in acts) + " |",
            "|---:|" + "---:|---:|" * len(acts)]
    for r in s['results']:
        out.append(f"| {r['width']} | " + " | ".join(
            f"{(r['params'].get(a) or {}).get('units', '—')} | {(r['params'].get(a) or {}).get('n_params', '—')}"
            for a in acts) + " |")
    out += ["", "## Best-of-k random search", "",
            f"Expected best validation accuracy of k configurations drawn at random (with replacement) from "
            f"all {s['results'][0]['n_grid_runs'] // len(acts)} runs of a width (cells x seeds), exact from the order "
            f"statistics; \"test\" is the held-out test accuracy of the run each search selects, the number to "
            f"compare models by. [95% CI]: {s['statistics']['ci']}. Verdicts from the CI of the test-accuracy "
            f"difference; {len(s['results']) * len(ks)} intervals per activation, not adjusted for multiplicity.", ""]
    for a in acts[1:]:
        out += [f"| width | k | {base} best val | {a} best val | {base} test of selected | {a} test of selected | "
                f"{a} − {base} test [95% CI] | verdict (test) |", "|---:|---:|---|---|---|---|---|---|"]
        for r in s['results']:
            for k in ks:
                q = cks.index(k)
                cb, ca, cmp = r['curves'][base], r['curves'][a], r['comparisons'][a]
                out.append(f"| {r['width']} | {k} | {_ci_cell(cb['val'][q], cb['val_ci'][q])} | "
                           f"{_ci_cell(ca['val'][q], ca['val_ci'][q])} | {_ci_cell(cb['test'][q], cb['test_ci'][q])} | "
                           f"{_ci_cell(ca['test'][q], ca['test_ci'][q])} | "
                           f"{_ci_cell(cmp['test_diff'][q], cmp['test_diff_ci'][q])} | "
                           f"{_ffn_verdict(cmp['test_diff_ci'][q], a, base)} |")
        out.append("")
    out += ["## PD between seeds at one shared configuration", "",
            "Per width, the cell with the best validation accuracy averaged over every activation and seed "
            "(the same configuration for every model). Relative PD of the validation softmax between seeds, "
            "mean over pairs [95% bootstrap CI over trials]; the difference's p-value is a permutation test "
            "over trial labels.", "",
            "| width | cell (batch, lr) | " + " | ".join(f"{a} PD" for a in acts) + " | " +
            " | ".join(f"{a} − {base} [95% CI], p" for a in acts[1:]) + " |", "|---:|---|" + "---|" * (2 * len(acts) - 1)]
    for r in s['results']:
        pd = r['pd']
        cells = [_ci_cell((pd['activations'].get(a) or {}).get('relative_pd'), (pd['activations'].get(a) or {}).get('ci'))
                 for a in acts]
        for a in acts[1:]:
            c = pd['comparisons'].get(a) or {}
            p = '—' if c.get('p_value') is None else f"{c['p_value']:.3g}"
            cells.append(f"{_ci_cell(c.get('difference'), c.get('ci'))}, p {p}")
        out.append(f"| {r['width']} | {pd['batch_size']}, {pd['learning_rate']:g} | " + " | ".join(cells) + " |")
    out += ["", "## Every cell", "", "Means over seeds.", "",
            "| width | batch | lr | " + " | ".join(f"{a} val | {a} test | {a} PD" for a in acts) + " |",
            "|---:|---:|---:|" + "---:|---:|---:|" * len(acts)]
    for c in s['cells']:
        out.append(f"| {c['width']} | {c['batch_size']} | {c['learning_rate']:g} | " + " | ".join(
            f"{_ci_cell((c.get(a) or {}).get('val_accuracy'), None)} | {_ci_cell((c.get(a) or {}).get('test_accuracy'), None)} | "
            f"{_ci_cell((c.get(a) or {}).get('relative_pd'), None)}" for a in acts) + " |")
    t = s['timing']
    out += ["", "## Caveats", "",
            "- The intervals cover seed-to-seed variation on this grid and data split; they say nothing about "
            "other grids, epochs or datasets. For k approaching the number of runs, best-of-k tends to the single "
            "best run, where a bootstrap is unreliable: the table stops at k = 8.",
            "- Validation accuracy selects; it is optimistic for the selected run. Compare models by the test column.",
            "- Missing or failed runs count as draws that are never selected (see Warnings).", "",
            f"## Inputs", "", f"{t['n_trials']} trials in {n_cells} cells; sum of the trials' own all-in times "
            f"{t['trial_seconds']:.0f} s ({'/'.join(t['threads'])} thread(s) per trial; {', '.join(t['devices'])}); "
            f"git commits {', '.join(s['provenance']['git_commits'])}. SHA-256 of every input file: summary.json, "
            f"provenance.files. Each cell is an ordinary study: `python analyze_results.py --results-dir <cell>`.", ""]
    return "\n".join(out)


def analyze_ffn(root, plots_dir=None, baseline=None, plots=True, verbose=True):
    """The FFN study's summary.json, REPORT.md and plots (ffn_*.png) in root; returns the summary."""
    summary = json_safe(build_ffn_summary(root, baseline))
    report = render_ffn_report(summary)
    figs = plot_utils.ffn_figures(summary) if plots else {}
    write_json(os.path.join(root, 'summary.json'), summary)
    write_text(os.path.join(root, 'REPORT.md'), report)
    written = plot_utils.save_figures(figs, plots_dir or os.path.join(root, 'plots'))
    if verbose:
        for w in summary['warnings']:
            print(f"warning: {w}", file=sys.stderr)
        print(f"{summary['timing']['n_trials']} trials in {len(summary['cells'])} cells analysed; wrote "
              f"{os.path.join(root, 'summary.json')}, {os.path.join(root, 'REPORT.md')}"
              + (f" and {len(written)} plots in {os.path.dirname(written[0])}" if written else ''))
    return summary


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = Parser(description='Reproducibility analysis of saved trials (no training).')
    parser.add_argument('--results-dir', help='the study folder, e.g. results/cpu')
    parser.add_argument('--plots-dir', default=None, help='where PNGs go (default: <results-dir>/plots; '
                        'with --compare: the --out-dir)')
    parser.add_argument('--baseline', default=None, help='activation the others are compared with '
                        '(default: relu where the study has it)')
    parser.add_argument('--plots-only', action='store_true', help='redraw the plots from <results-dir>/summary.json')
    parser.add_argument('--no-plots', action='store_true', help='write summary.json and REPORT.md only')
    parser.add_argument('--compare', nargs=2, metavar=('DIR_A', 'DIR_B'), help='compare two study folders')
    parser.add_argument('--out-dir', default=None, help='--compare: where compare.json and COMPARE.md go '
                        '(default: <parent of DIR_A>/compare_<A>_vs_<B>)')
    args = parser.parse_args(argv)
    if bool(args.compare) == bool(args.results_dir):
        parser.error("give --results-dir STUDY_DIR, or --compare DIR_A DIR_B")
    if args.compare and (args.plots_only or args.baseline or args.no_plots):
        parser.error("--plots-only, --baseline and --no-plots go with --results-dir, not --compare")
    if args.out_dir and not args.compare:
        parser.error("--out-dir goes with --compare")
    if args.plots_only and (args.baseline or args.no_plots):
        parser.error("--plots-only redraws plots from summary.json: --baseline and --no-plots do not apply")
    try:
        if args.compare:
            compare_studies(*args.compare, out_dir=args.out_dir, plots_dir=args.plots_dir)
        elif args.plots_only:
            if not os.path.isdir(args.results_dir):
                raise AnalysisError(f"results dir {args.results_dir!r} does not exist")
            plots_dir = args.plots_dir or os.path.join(args.results_dir, 'plots')
            paths = plot_utils.save_figures(summary_figures(args.results_dir), plots_dir)
            print(f"wrote {len(paths)} plots in {plots_dir}")
        else:
            analyze(args.results_dir, args.plots_dir, args.baseline, plots=not args.no_plots)
    except AnalysisError as e:
        sys.exit(f"error: {e}")


if __name__ == '__main__':
    main()
