"""
The FFN study's summary (the mnist_ffn design of designs.py), written with its REPORT.md (rendered by
report.py, like every report) and plots (ffn_plots.py)
of a grid design's root, <root>/h<w>_b<b>_lr<lr>/ffn/<activation>/trial_<k>.json, one ordinary
study folder per cell of a (width x batch size x learning rate) grid, every cell with the same
trial seeds. Best-of-k random search over the grid (best_of_k.expected_best_of_k, with a seed
bootstrap paired across models and cells) and PD between seeds at one configuration shared
by the models. Each cell is read, and can be analysed alone, like any other study: that
per-study analysis is analyze_results' (load_study, build_summary), which imports this module
and hands it those two functions. The cells' configs come from the trial files, never from
the folder names. No torch.
"""
import glob
import json
import os
import sys

import numpy as np

import ffn_plots
import best_of_k
import stat_settings
import stat_tests
import plot_utils
import report
from fileio import AnalysisError, json_ready, write_json, write_text

SCHEMA_VERSION = 1  # of the FFN study's summary.json (kind FFN_KIND)

FFN_KIND = 'ffn_study'
FFN_SWEPT = ('hidden', 'batch_size', 'learning_rate', 'max_iters')  # max_iters = epochs x batches: follows batch_size
FFN_TABLE_KS = (1, 2, 4, 8)
FFN_CURVE_KS = tuple(range(1, 33))
# best-of-k from n runs tends to the single best run as k nears n, where the seed bootstrap is
# unreliable: tables and curves stop at k <= runs per width and activation / RUNS_PER_K (k = 8
# at the design's 160 runs); at least k = 1, the mean run
RUNS_PER_K = 20
CHECKED_SEEDS = 20  # the seed count at which tests/test_ffn_study.py checked the bootstrap intervals


def k_limit(n_runs):
    return max(1, n_runs // RUNS_PER_K)


def is_study_grid(root):
    """True for a folder of study folders whose trials are all the FFN classifier's (a grid
    design's root), not a study itself. A folder of language-model studies (results/, say) is
    not one: the analysis then names the studies it holds (analyze_results.no_trials_message)."""
    if glob.glob(os.path.join(root, '*', '*', 'trial_*.json')):
        return False
    models = {os.path.basename(os.path.dirname(os.path.dirname(p)))
              for p in glob.glob(os.path.join(root, '*', '*', '*', 'trial_*.json'))}
    return models == {'ffn'}


def _ffn_cell(cell_dir, baseline, load_study, build_summary):
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
    summary = json_ready(build_summary(cell_dir, baseline if baseline in acts else None, loaded))
    runs = {(t['activation'], t['trial']): t['record'] for t in trials}
    configs = {json.dumps({k: r['config'].get(k) for k in FFN_SWEPT}, sort_keys=True) for r in runs.values()}
    if len(configs) != 1:
        raise AnalysisError(f"{cell_dir}: its trials have different widths, batch sizes or learning rates; "
                            f"a cell of the grid holds one configuration")
    return {'name': name, 'summary': summary, 'runs': runs, 'bad': loaded[1], 'failures': loaded[2],
            'config': next(iter(runs.values()))['config']}


def _interval(samples):
    lo, hi = best_of_k.percentile_interval(samples)
    return [float(lo), float(hi)] if np.isfinite(lo) and np.isfinite(hi) else None


def _check_cells(cells, baseline):
    """Every cell differs only in the swept fields; (baseline, activations with it first)."""
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
    return base_cfg, base, [base] + [a for a in acts if a != base]


def _width_runs(w, grid, by, acts, seeds, failed):
    """Validation and test accuracy [activation, (batch, lr), seed] of every run at width w
    (nan where missing), the parameter count per activation, and the missing runs named."""
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
    return val, test, params, missing


def _best_of_k(val, test, acts, ks):
    """Best-of-k curves per activation and their differences from the baseline (acts[0]),
    each with its seed-bootstrap interval, at k in ks."""
    boot = best_of_k.best_of_k_bootstrap(val, test, ks)
    curves = {a: {split: boot[split][i].tolist() for split in ('val', 'test')}
              | {f'{split}_ci': [_interval(boot[f'{split}_boot'][i][:, q]) for q in range(len(ks))]
                 for split in ('val', 'test')} for i, a in enumerate(acts)}
    comparisons = {a: {f'{split}_diff': (boot[split][i] - boot[split][0]).tolist() for split in ('val', 'test')}
                   | {f'{split}_diff_ci': [_interval(boot[f'{split}_boot'][i][:, q] - boot[f'{split}_boot'][0][:, q])
                                           for q in range(len(ks))] for split in ('val', 'test')}
                   for i, a in enumerate(acts) if i}
    return curves, comparisons


def _shared_pd(w, val, grid, by):
    """PD between seeds at one configuration shared by all activations: the cell best on
    validation accuracy averaged over every activation and seed (chosen for neither model)."""
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
    for cmp in shared['summary']['comparisons']:  # the cell's dispersion and prediction-shift tests
        disp, shift = cmp['dispersion'] or {}, cmp['prediction_shift'] or {}
        pd['comparisons'][cmp['activation']] = {
            'difference': cmp['difference'], 'ci': disp.get('ci'), 'p_value': disp.get('p_value'),
            'p_value_holm': None, 'min_p_value': disp.get('min_p_value'),
            'prediction_shift_p_value': shift.get('p_value'), 'note': cmp['note'] or cmp['error']}
    return pd


def _cell_rows(by):
    rows = []
    for key in sorted(by):
        c, row = by[key], {'cell': by[key]['name'], 'width': key[0], 'batch_size': key[1], 'learning_rate': key[2]}
        for r in (c['summary'] or {}).get('results', []):
            recs = [c['runs'][(r['activation'], k)] for k in r['trial_ids']]
            row[r['activation']] = {
                'n_trials': r['n_trials'], 'val_accuracy': r['avg_val_accuracy'],
                'test_accuracy': float(np.mean([x['metrics']['test_accuracy'] for x in recs])),
                'relative_pd': r['avg_relative_pd']}
        rows.append(row)
    return rows


STATISTICS = {
    'best_of_k': 'exact expectation over k draws with replacement from all runs of the grid (best_of_k.expected_best_of_k)',
    'ci': f"{int(stat_settings.CONFIDENCE * 100)}% percentile bootstrap over seeds: the same resampled seeds in every cell "
          f"and for every activation ({stat_settings.N_RESAMPLES} resamples, seed {stat_settings.SEED})",
    'pd_ci': 'leave-one-trial-out jackknife t-interval of the mean over pairs',
    'pd_difference': 'difference of mean pairwise relative PD, Welch t-interval from the jackknife; p: dispersion test '
                     '(stat_tests.dispersion_test), Holm over every width and activation'}


def build_ffn_summary(root, load_study, build_summary, baseline=None):
    """The FFN study's summary dict from the cell folders under root (nothing written);
    load_study and build_summary: analyze_results', the analysis of one study (a cell)."""
    found = [_ffn_cell(d, baseline or 'relu', load_study, build_summary)
             for d in sorted(glob.glob(os.path.join(root, '*', '')))
             if glob.glob(os.path.join(d, '*', '*', 'trial_*.json')) or os.path.exists(os.path.join(d, 'failures.jsonl'))]
    warnings = [f"{c['name']}: skipped {b['path']}: {b['reason']}" for c in found if not c['runs'] for b in c['bad']]
    cells = [c for c in found if c['runs']]
    if not cells:
        raise AnalysisError(f"no usable trials under {root!r} (looked for <cell>/ffn/<activation>/trial_<k>.json)")
    base_cfg, base, acts = _check_cells(cells, baseline)
    by = {(c['config']['hidden'], c['config']['batch_size'], c['config']['learning_rate']): c
          for c in found if c['config']}  # with the cells whose every run failed
    widths, batches, lrs = (sorted({key[i] for key in by}) for i in range(3))
    seeds = sorted({k for c in cells for _, k in c['runs']})
    failed = {(f.get('activation'), f.get('trial'), c['name']): f.get('error') for c in found for f in c['failures']}
    warnings += [f"{c['name']}: {w}" for c in cells for w in c['summary']['warnings']]
    out_widths, grid = [], [(b, lr) for b in batches for lr in lrs]
    limit = k_limit(len(grid) * len(seeds))
    curve_ks, table_ks = [k for k in FFN_CURVE_KS if k <= limit], [k for k in FFN_TABLE_KS if k <= limit]
    if len(seeds) != CHECKED_SEEDS:
        warnings.append(f"{len(seeds)} seeds per cell: the best-of-k bootstrap intervals were checked by simulation at "
                        f"{CHECKED_SEEDS} seeds (tests/test_ffn_study.py), not at {len(seeds)}")
    for w in widths:
        val, test, params, missing = _width_runs(w, grid, by, acts, seeds, failed)
        if missing:
            warnings.append(f"width {w}: {len(missing)} run(s) missing, counted as draws that are never selected: "
                            + '; '.join(missing[:5]) + (' ...' if len(missing) > 5 else ''))
        if np.isnan(test[~np.isnan(val)]).any():
            raise AnalysisError(f"width {w}: a trial without test_accuracy (not a classification trial?)")
        curves, comparisons = _best_of_k(val, test, acts, curve_ks)
        out_widths.append({'width': w, 'params': params, 'curves': curves, 'comparisons': comparisons,
                           'pd': _shared_pd(w, val, grid, by),
                           'n_runs': int(np.isfinite(val).sum()), 'n_grid_runs': int(val.size)})
    # Holm over every width and activation's dispersion test (the cells' own Holm saw one width)
    stat_tests.holm_in_place([c for r in out_widths for c in r['pd']['comparisons'].values()])
    recs = [r for c in cells for r in c['runs'].values()]
    prov = [r.get('provenance') or {} for r in recs]
    return {
        'schema_version': SCHEMA_VERSION, 'kind': FFN_KIND,
        'study': os.path.dirname(recs[0].get('study') or '') or os.path.basename(os.path.normpath(root)),
        'task': base_cfg.get('dataset'), 'gated_width': base_cfg.get('gated_width', 'same'), 'config': base_cfg,
        'activations': acts, 'baseline': base, 'widths': widths, 'batch_sizes': batches, 'learning_rates': lrs,
        'seeds': seeds, 'ks': table_ks, 'curve_ks': curve_ks, 'k_limit': limit, 'runs_per_k': RUNS_PER_K,
        'checked_seeds': CHECKED_SEEDS, 'vary': recs[0].get('vary'),
        'statistics': STATISTICS, 'results': out_widths, 'cells': _cell_rows(by), 'warnings': warnings,
        'failures': [f | {'cell': c['name']} for c in found for f in c['failures']],
        'timing': {'n_trials': len(recs), 'trial_seconds': float(sum(r['metrics']['total_time'] for r in recs)),
                   'threads': sorted({str(p.get('threads')) for p in prov}),
                   'devices': sorted({str(p.get('device_name')) for p in prov})},
        'provenance': {'n_trials': len(recs), 'cells': [c['name'] for c in cells],
                       'files': [f for c in cells for f in c['summary']['provenance']['files']],
                       'git_commits': sorted({str(p.get('git_commit')) for p in prov}),
                       'torch_versions': sorted({str(p.get('torch_version')) for p in prov})},
    }


def analyze_ffn(root, load_study, build_summary, plots_dir=None, baseline=None, plots=True, verbose=True):
    """The FFN study's summary.json, REPORT.md and plots (ffn_*.png) in root; returns the summary.
    Raises AnalysisError on input it cannot use, before writing anything."""
    summary = json_ready(build_ffn_summary(root, load_study, build_summary, baseline))
    text = report.render_ffn_report(summary)
    figs = ffn_plots.ffn_figures(summary) if plots else {}
    write_json(os.path.join(root, 'summary.json'), summary)
    write_text(os.path.join(root, 'REPORT.md'), text)
    written = plot_utils.save_figures(figs, plots_dir or os.path.join(root, 'plots'))
    if verbose:
        for w in summary['warnings']:
            print(f"warning: {w}", file=sys.stderr)
        print(f"{summary['timing']['n_trials']} trials in {len(summary['cells'])} cells analysed; wrote "
              f"{os.path.join(root, 'summary.json')}, {os.path.join(root, 'REPORT.md')}"
              + (f" and {len(written)} plots in {os.path.dirname(written[0])}" if written else ''))
    return summary
