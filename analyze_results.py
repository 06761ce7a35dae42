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

A trial counts only if the store's validator accepts it (store.load_trial, the same one resume
uses); any other file is listed with the reason and skipped. Inputs are checked before
anything is written, and every output is written atomically, so bad input overwrites nothing.
The statistics: docs/analysis.md; the files written: docs/results.md.

A folder of study folders (the mnist_ffn design's <results>/mnist_ffn/<task>/gated_<mode>/,
one study per grid cell) gets the FFN study's report instead: ffn_report.py.
"""
import argparse
import glob
import json
import os
import sys

import numpy as np

import cli
import ffn_plots
import ffn_report
import intervals
import pairwise
import stat_settings
import stat_tests
import over_training
import plot_utils
import routing_metrics
import sanity
import store
from cli import EXIT_INTERRUPT, check_writable, error_line, exit_code, exit_help
from comparisons import compare_to_baseline, holm_and_verdicts, n_dispersion_tests
from config import Parser
from fileio import AnalysisError, is_number, json_ready, write_json, write_text
from report import render_compare, render_report
from run_info import config_differences, study_info, study_labels

SCHEMA_VERSION = store.SCHEMA_VERSION
TRIAL_METRICS = ('train_loss', 'val_loss', 'perplexity', 'val_accuracy', 'token_accuracy', 'training_time',
                 'total_time', 'tokens_per_sec')
# mixture-of-experts trials (switchlm) also record these (see moe.py); summarised when present
MOE_METRICS = ('moe_dropped_fraction', 'moe_router_entropy', 'moe_aux_loss', 'moe_z_loss')
FRACTIONS = ('val_accuracy', 'token_accuracy', 'moe_dropped_fraction')
PROVENANCE_KEYS = ('git_commit', 'git_dirty', 'torch_version', 'cuda_version', 'device', 'device_name',
                   'deterministic', 'python_version', 'hostname')


def load_trial(path, study_dir):
    """One trial as the analysis uses it, through the store's one validator (store.load_trial);
    raises store.BadFile."""
    rel = os.path.relpath(path, study_dir)
    model, activation, _ = rel.split(os.sep)[-3:]
    t = store.load_trial(path)
    rec, pf = t['record'], t['record']['predictions_file']
    h = rec.get('history')
    curves_ok = isinstance(h, dict) and all(
        isinstance(h.get(k), list) and len(h[k]) == len(h.get('iter') or [None]) and all(map(is_number, h[k]))
        for k in ('iter', 'train_loss', 'val_loss'))
    if not curves_ok:  # the PD numbers do not need it: keep the trial, drop its curve
        rec['history'] = None
    return {**t, 'model': model, 'activation': activation, 'trial': rec['trial'], 'history_ok': curves_ok,
            'name': f"{model}/{activation}/trial_{rec['trial']}", 'eval_hash': rec['eval_hash'],
            'files': [{'path': rel, 'sha256': t['json_sha256']},
                      {'path': os.path.join(os.path.dirname(rel), pf), 'sha256': rec['predictions_sha256']}]}


def no_trials_message(study_dir, bad):
    """Why a folder has no usable trials: nothing there, damaged files, or a folder of studies
    (results/, say) rather than a study: then the studies it holds are named."""
    studies = sorted({os.path.relpath(os.path.dirname(os.path.dirname(os.path.dirname(p))), study_dir)
                      for p in glob.glob(os.path.join(study_dir, '**', 'trial_*.json'), recursive=True)})
    if studies:
        return (f"{study_dir!r} is not a study but holds {len(studies)} of them: "
                f"{', '.join(studies[:8])}{' ...' if len(studies) > 8 else ''}; give one of them to --results-dir")
    reasons = '; '.join(f"{b['path']}: {b['reason']}" for b in bad[:3])
    return (f"no usable trial results under {study_dir!r} (looked for <model>/<activation>/trial_<k>.json)"
            + (f"; skipped: {reasons}" if bad else ''))


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
        except store.BadFile as e:
            bad.append({'path': os.path.relpath(path, study_dir), 'reason': str(e)})
    # the trainer writes the .npz first and the .json last: an .npz alone is an unfinished trial
    for path in sorted(glob.glob(os.path.join(study_dir, '*', '*', 'trial_*.npz'))):
        if not os.path.exists(path[:-len('npz')] + 'json'):
            bad.append({'path': os.path.relpath(path, study_dir), 'reason': "no trial JSON beside it (unfinished trial)"})
    trials.sort(key=lambda t: (t['model'], t['activation'], t['trial']))
    return trials, bad, store.read_failures(study_dir, bad)


# ----------------------------------------------------------------------------- one model x activation

def summarize_group(model, activation, trials, warnings):
    """Summary entry of one model x activation: the original tool's fields, every pairwise
    metric with mean, std and jackknife CI over trials, and mean/std/CI of the per-trial metrics."""
    recs = [t['record'] for t in trials]
    n = len(trials)
    rows = []
    for t, r in zip(trials, recs):
        m = r['metrics']
        rows.append({'trial_id': t['trial'], **{k: m.get(k) for k in TRIAL_METRICS},
                     'n_params': m.get('n_params'), 'peak_memory_mb': m.get('peak_memory_mb'),
                     'seeds': r.get('seeds'), 'history': r.get('history')})
    moe = [k for k in MOE_METRICS if all(is_number(r['metrics'].get(k)) for r in recs)]
    for t, row in zip(trials, rows):
        row.update({k: t['record']['metrics'][k] for k in moe})
    stats = {}
    for k in TRIAL_METRICS + tuple(moe):
        values = [row[k] for row in rows]
        # intervals stay inside what the quantity can be: accuracies and fractions in [0, 1], the rest >= 0
        bounds = (0, 1) if k in FRACTIONS else (0, None)
        stats[k] = intervals.describe(values, bounds=bounds) if all(is_number(v) for v in values) else None
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
        pairs, values = pairwise.compare(trials)
    except pairwise.EvalMismatch as e:
        entry['error'] = f"no PD computed: {e}"
        warnings.insert(0, f"ERROR {name}: {e}; no PD computed for this group")
        return entry
    ids = np.array(entry['trial_ids'])
    entry['pairwise'] = {'pairs': ids[pairs].tolist()}
    names = [f"trial {k}" for k in entry['trial_ids']]
    for metric, v in values.items():
        entry['pairwise'][metric] = {'values': v.tolist(), 'std': float(v.std(ddof=1)) if len(v) >= 2 else None,
                                     **intervals.pairwise_interval(pairwise.pair_matrix(n, pairs, v),
                                                                 scale=pairwise.PAIR_METRIC_SCALE[metric], names=names)}
    entry['avg_relative_pd'] = entry['pairwise']['relative_pd']['mean']
    entry['routing_agreement'] = routing_agreement(name, trials, ids, warnings)
    entry['reproducibility_metrics'] = [
        {'model_pair': ids[p].tolist(), 'relative_pd': float(values['relative_pd'][k]),
         'prediction_differences': int(values['prediction_differences'][k]), 'total_predictions': entry['n_eval']}
        for k, p in enumerate(pairs)]
    return entry


def routing_agreement(name, trials, ids, warnings):
    """Routing agreement between every pair of a group's trials (routing_metrics.py: experts
    matched by a maximum-weight assignment on co-routing counts), with mean, std and jackknife
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
    return {'pairs': ids[pairs].tolist(), 'values': v.tolist(), 'std': float(v.std(ddof=1)) if len(v) >= 2 else None,
            **intervals.pairwise_interval(pairwise.pair_matrix(len(trials), pairs, v), scale='logit'),
            'per_layer_mean': r['per_layer_mean'], 'chance_mean': r['chance_mean'],
            'method': 'fraction of evaluation tokens whose first-choice experts match after matching '
                      'experts by linear_sum_assignment on co-routing counts; mean over MoE layers'}


# ----------------------------------------------------------------------------- the whole study

def statistics_block(margin):
    """What summary.json says its statistics are (the report's Statistics section reads it)."""
    return {'confidence_level': stat_settings.CONFIDENCE, 'alpha': stat_settings.ALPHA, 'power': stat_settings.POWER,
            'n_permutations': stat_settings.N_PERMUTATIONS, 'seed': stat_settings.SEED,
            'min_trials_for_ci': stat_settings.MIN_TRIALS_FOR_CI,
            'pairwise_ci': 'leave-one-trial-out jackknife t-interval of the mean over pairs (T - 1 df), '
                           'on the logit scale for metrics in [0, 1] and the log scale for metrics >= 0; '
                           'marked unreliable, with the trials named, when a trial is an outlier',
            'trial_ci': 'jackknife t-interval of the mean over trials (n - 1 df), on the logit scale for '
                        'accuracies and the log scale for losses and times',
            'dispersion': 'difference of mean pairwise relative PD; permutation test over group labels of '
                          'the Welch t statistic of jackknife pseudo-values of mean (-log(1 - PD))^2',
            'equivalence': f'two one-sided tests on the ratio of mean relative PDs, margin ±{margin:.0%} '
                           f'of the baseline\'s',
            'equivalence_margin': margin,
            'snapshots': 'paired leave-one-trial-out jackknife of late - early mean relative PD',
            'ensemble_yardstick': 'relative PD between averaged disjoint ensembles of m trials (descriptive '
                                      'for m > 1)',
            'prediction_shift': 'permutation test over trial labels of between- minus within-group '
                                    'relative PD (null: exchangeable trials)',
            'multiple_comparisons': 'Holm over all comparisons of the study, separately per test',
            'elementwise_floor': pairwise.ELEMENTWISE_FLOOR,
            'std': 'sample standard deviation (ddof=1)'}


def build_summary(study_dir, baseline=None, loaded=None, margin=None, snapshots=None):
    """The summary dict of a study, in memory (nothing written). baseline=None: relu where the
    study has it; a name the study does not have raises AnalysisError. loaded: what
    load_study(study_dir) returned, if the caller has it already. margin: of the equivalence
    test, relative to the baseline's mean PD; snapshots: (early, late) iterations to compare
    (default: the first after 0 and the last)."""
    trials, bad, failures = loaded or load_study(study_dir)
    margin = stat_settings.EQUIVALENCE_MARGIN if margin is None else margin
    if not trials:
        raise AnalysisError(no_trials_message(study_dir, bad))
    groups = {}
    for t in trials:
        groups.setdefault(t['model'], {}).setdefault(t['activation'], []).append(t)
    activations = sorted({t['activation'] for t in trials})
    if baseline is not None and baseline not in activations:
        raise AnalysisError(f"baseline {baseline!r} is not an activation of this study; valid: {', '.join(activations)}")
    base = baseline or ('relu' if 'relu' in activations else None)
    repeats_dir = os.path.join(study_dir, 'repeats')
    noise = sanity.repeat_noise(load_study(repeats_dir)[0] if os.path.isdir(repeats_dir) else [], groups)

    warnings, results, comparisons, entries_by = [], [], [], {}
    m = n_dispersion_tests(groups, base)
    for model, acts in groups.items():
        entries = [summarize_group(model, act, ts, warnings) for act, ts in acts.items()]
        results += entries
        entries_by.update({(model, e['activation']): (e, acts[e['activation']]) for e in entries})
        ref = sanity.between_seed_pd(entries)
        sanity.sanity_seeds(model, entries, ref, warnings, noise)
        sanity.sanity_across_activations(model, acts, ref, warnings, noise)
        if base in acts:
            comparisons += [compare_to_baseline(model, a, base, ts, acts[base], warnings, m, margin)
                            for a, ts in acts.items() if a != base]
    holm_and_verdicts(comparisons)
    try:
        over_training.summarize(entries_by, comparisons, snapshots)
    except ValueError as e:  # --snapshots naming an iteration the trials have no snapshot at
        raise AnalysisError(str(e)) from None
    sanity.check_activation_calls(trials, warnings)
    sanity.sanity_trials(trials, warnings)
    sanity.check_streams(groups, warnings)
    sanity.check_mixed_settings(groups, warnings)
    sanity.check_trial_counts(groups, warnings)
    valid = {(t['model'], t['activation'], t['trial']) for t in trials}
    for f in failures:
        f['has_result'] = (f.get('model'), f.get('activation'), f.get('trial')) in valid
    if failures:
        warnings.append(f"{len(failures)} failed trial(s) in failures.jsonl: " +
                        ', '.join(f"{f.get('model')}/{f.get('activation')}/trial_{f.get('trial')}" for f in failures))
    warnings += [f"skipped {b['path']}: {b['reason']}" for b in bad]
    evidence = sanity.evidence(groups, noise)

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
        'statistics': statistics_block(margin),
        'sanity_evidence': evidence,
        'sanity_rules': {'sanity_ratio': sanity.SANITY_RATIO, 'repeat_factor': sanity.REPEAT_FACTOR, 'identical_tol': sanity.IDENTICAL_TOL,
                         'causality_tol': sanity.CAUSALITY_TOL, 'leak_ratio': sanity.LEAK_RATIO,
                         'lm_loss_floor': sanity.LM_LOSS_FLOOR},
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
        'study_info': study_info(trials),
    }


# ----------------------------------------------------------------------------- writing

def analyze(study_dir, plots_dir=None, baseline=None, plots=True, verbose=True, margin=None, snapshots=None):
    """Analyse a study folder: write summary.json and REPORT.md in it and the plots in
    plots_dir (default <study_dir>/plots); return the summary dict. Raises AnalysisError on
    input it cannot use, before writing anything."""
    if ffn_report.is_study_grid(study_dir):  # a grid design's root (mnist_ffn): one study per cell
        return ffn_report.analyze_ffn(study_dir, load_study, build_summary, plots_dir, baseline, plots, verbose)
    # json_ready (fileio's one rule: a non-finite number is null) before the report and the
    # plots, so that they show exactly what summary.json holds
    summary = json_ready(build_summary(study_dir, baseline, margin=margin, snapshots=snapshots))
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
        return ffn_plots.ffn_figures(s) if s.get('kind') == ffn_report.FFN_KIND else plot_utils.figures(s)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise AnalysisError(f"cannot plot {path} ({type(e).__name__}: {e}); run without --plots-only to (re)create it")


# ----------------------------------------------------------------------------- two studies

COMPARED = ('relative_pd', 'val_loss', 'val_accuracy')


def _side(r):
    return {'relative_pd': r['avg_relative_pd'] if r else None, 'val_loss': r['avg_val_loss'] if r else None,
            'val_accuracy': r['avg_val_accuracy'] if r else None, 'n_trials': r['n_trials'] if r else 0}


def _change(ra, rb, metric):
    """The change b - a of one group's metric with its interval (stat_tests.difference_interval)
    from the trials themselves, or None where one study has no value."""
    if not ra or not rb:
        return None
    if metric == 'relative_pd':
        if not ra['pairwise'] or not rb['pairwise']:
            return None
        mats = []
        for r in (ra, rb):
            ids = {k: i for i, k in enumerate(r['trial_ids'])}
            pairs = np.array([[ids[x], ids[y]] for x, y in r['pairwise']['pairs']])
            mats.append(pairwise.pair_matrix(len(ids), pairs, np.array(r['pairwise']['relative_pd']['values'])))
        return stat_tests.difference_interval(*mats)
    values = [[t[metric] for t in r['trials']] for r in (ra, rb)]
    return stat_tests.difference_interval(*values) if all(is_number(v) for vs in values for v in vs) else None


def compare_studies(dir_a, dir_b, out_dir=None, plots_dir=None, verbose=True):
    """Side-by-side table and plot of mean relative PD, val loss and val accuracy per model x
    activation of two studies, with the change (b - a). Writes compare.json and COMPARE.md to
    out_dir (default <parent of dir_a>/compare_<a>_vs_<b>) and compare.png to plots_dir
    (default out_dir). Returns the comparison dict."""
    sa, sb = json_ready(build_summary(dir_a)), json_ready(build_summary(dir_b))
    name_a, name_b = study_labels(dir_a, dir_b)
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.normpath(os.path.abspath(dir_a))),
                                      f"compare_{name_a}_vs_{name_b}".replace(os.sep, '_'))
    differences = config_differences(sa, sb)

    index = [{(r['model_name'], r['activation']): r for r in s['results']} for s in (sa, sb)]
    rows = []
    for key in sorted(set(index[0]) | set(index[1])):
        ra, rb = index[0].get(key), index[1].get(key)
        a, b = _side(ra), _side(rb)
        rows.append({'model': key[0], 'activation': key[1], 'a': a, 'b': b,
                     'change': {k: b[k] - a[k] if a[k] is not None and b[k] is not None else None for k in COMPARED},
                     'change_interval': {k: _change(ra, rb, k) for k in COMPARED}})
    comparison = {'schema_version': SCHEMA_VERSION, 'study_a': name_a, 'study_b': name_b, 'rows': rows,
                  'compared': list(COMPARED),
                  'dir_a': os.path.abspath(dir_a), 'dir_b': os.path.abspath(dir_b), 'config_differences': differences,
                  'warnings': [f"{name_a}: {w}" for w in sa['warnings']] + [f"{name_b}: {w}" for w in sb['warnings']],
                  'provenance': {name_a + ' (a)': sa['provenance'], name_b + ' (b)': sb['provenance']}}
    fig = plot_utils.comparison_plot(rows, name_a, name_b, warning=(
        f"not like for like: the studies differ in {', '.join(k for k, _, _ in differences)}" if differences else None))
    write_json(os.path.join(out_dir, 'compare.json'), comparison)
    write_text(os.path.join(out_dir, 'COMPARE.md'), render_compare(comparison))
    plot_utils.save_figure(fig, os.path.join(plots_dir or out_dir, 'compare.png'))
    if verbose:
        if differences:
            print(f"warning: not like for like: {name_a} and {name_b} differ in "
                  f"{', '.join(k for k, _, _ in differences)} (listed in COMPARE.md)", file=sys.stderr)
        for w in comparison['warnings']:
            print(f"warning: {w}", file=sys.stderr)
        print(f"wrote {os.path.join(out_dir, 'compare.json')}, {os.path.join(out_dir, 'COMPARE.md')}, "
              f"{os.path.join(plots_dir or out_dir, 'compare.png')}")
    return comparison


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = Parser(description='Reproducibility analysis of saved trials (no training).', epilog=exit_help(),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--results-dir', help='the study folder, e.g. results/cpu')
    parser.add_argument('--plots-dir', default=None, help='where PNGs go (default: <results-dir>/plots; '
                        'with --compare: the --out-dir)')
    parser.add_argument('--baseline', default=None, help='activation the others are compared with '
                        '(default: relu where the study has it)')
    parser.add_argument('--plots-only', action='store_true', help='redraw the plots from <results-dir>/summary.json')
    parser.add_argument('--no-plots', action='store_true', help='write summary.json and REPORT.md only')
    cli.add_analysis_args(parser)
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
        # the output folders, before anything is read or computed (a missing study folder is
        # bad input, reported by the analysis)
        for folder, what in ((args.results_dir, 'results folder'), (args.plots_dir, 'plots folder'),
                             (args.out_dir, 'output folder')):
            if folder and (what != 'results folder' or (os.path.isdir(folder) and not args.plots_only)):
                check_writable(folder, what)
        if args.compare:
            compare_studies(*args.compare, out_dir=args.out_dir, plots_dir=args.plots_dir)
        elif args.plots_only:
            if not os.path.isdir(args.results_dir):
                raise AnalysisError(f"results dir {args.results_dir!r} does not exist")
            plots_dir = args.plots_dir or os.path.join(args.results_dir, 'plots')
            paths = plot_utils.save_figures(summary_figures(args.results_dir), plots_dir)
            print(f"wrote {len(paths)} plots in {plots_dir}")
        else:
            analyze(args.results_dir, args.plots_dir, args.baseline, plots=not args.no_plots,
                    margin=args.equivalence_margin, snapshots=args.compare_snapshots)
    except KeyboardInterrupt:
        parser.exit(EXIT_INTERRUPT, "interrupted: outputs are written whole or not at all\n")
    except (AnalysisError, OSError) as e:  # AnalysisError is a ValueError: a usage error
        parser.exit(exit_code(e), error_line(e) + "\n")


if __name__ == '__main__':
    main()
