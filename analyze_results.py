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

def build_summary(study_dir, baseline=None):
    """The summary dict of a study, in memory (nothing written). baseline=None: relu where the
    study has it; a name the study does not have raises AnalysisError."""
    trials, bad, failures = load_study(study_dir)
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
                       # trials that continued from a mid-trial checkpoint after a kill, and where
                       'resumed': [{'trial': t['name'], 'resumed_from': t['record']['resumed_from']}
                                   for t in trials if t['record'].get('resumed_from')],
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
    resumed = p.get('resumed') or []
    if resumed:
        out.insert(-1, f"Resumed from a mid-trial checkpoint after an interruption ({len(resumed)} trial(s)): "
                   + '; '.join(f"{r['trial']} at iteration {', '.join(map(str, r['resumed_from']))}" for r in resumed)
                   + ".")
    else:
        out.insert(-1, "No trial was resumed from a mid-trial checkpoint.")
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
            return plot_utils.figures(json.load(f))
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
