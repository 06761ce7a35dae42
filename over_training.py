"""
Reproducibility over the course of training, and the ensemble yardstick, for the analysis
(no torch). From the snapshots a trial saves (its predictions on the evaluation set at every
evaluation point: snapshot_probs, snapshot_iters): per cell, the mean pairwise relative PD,
top-1 disagreement and validation loss at each snapshot with the same trial-level intervals as
the final figures, and a paired comparison of two snapshots of the same trials. From the final
predictions: the relative PD between averaged disjoint ensembles of m trials, the scale on which
an activation's effect is read. The statistics: intervals.py, stat_tests.py, snapshot_stats.py; docs/analysis.md.
"""
import numpy as np

import intervals
import pairwise
import snapshot_stats

TRACKED = ('relative_pd', 'top1_disagreement')


def snapshot_iters(trials):
    """The iterations every trial of a group has a snapshot at, or None with a reason."""
    iters = [None if t.get('snapshot_iters') is None else tuple(int(i) for i in t['snapshot_iters']) for t in trials]
    if any(i is None for i in iters):
        return None, (f"no snapshots: {sum(i is None for i in iters)} of {len(trials)} trial(s) saved none "
                      f"(results saved before snapshots existed, or --snapshots off)")
    common = sorted(set(iters[0]).intersection(*iters[1:]))
    if not common:
        return None, "no snapshots: the trials share no evaluation point"
    return common, None


def _pair_matrices(trials, it):
    stack = np.stack([t['snapshot_probs'][list(t['snapshot_iters']).index(it)] for t in trials])
    pairs, values = pairwise.pairwise(stack, {m: pairwise.PAIR_METRICS[m] for m in TRACKED})
    return {m: pairwise.pair_matrix(len(trials), pairs, values[m]) for m in TRACKED}


def over_training(trials):
    """{'iters', 'relative_pd': [interval per snapshot], 'top1_disagreement': [...], 'val_loss':
    [describe per snapshot], 'matrices'} for one group, or (None, note)."""
    if len(trials) < 2:
        return None, "no curve over training: one trial has no pairs"
    iters, why = snapshot_iters(trials)
    if iters is None:
        return None, why
    names = [f"trial {t['trial']}" for t in trials]
    out = {'iters': iters, 'relative_pd': [], 'top1_disagreement': [], 'val_loss': [], 'matrices': {}}
    for it in iters:
        mats = _pair_matrices(trials, it)
        out['matrices'][it] = mats
        for m in TRACKED:
            out[m].append(intervals.pairwise_interval(mats[m], scale=pairwise.PAIR_METRIC_SCALE[m], names=names))
        losses = [(t['record'].get('history') or {}) for t in trials]
        vals = [h['val_loss'][h['iter'].index(it)] for h in losses if it in (h.get('iter') or [])]
        out['val_loss'].append(intervals.describe(vals, bounds=(0, None)) if len(vals) == len(trials) else None)
    return out, None


def pick_snapshots(iters, wanted=None):
    """The two snapshots to compare: `wanted` (early, late) if both exist, else the first
    after iteration 0 and the last. ValueError naming the ones there are."""
    if wanted:
        missing = [w for w in wanted if w not in iters]
        if missing:
            raise ValueError(f"no snapshot at iteration {', '.join(map(str, missing))}; snapshots at "
                             f"{', '.join(map(str, iters))}")
        return wanted
    later = [i for i in iters if i > 0]
    return (later[0], iters[-1]) if len(later) >= 2 else None


def snapshot_change(curve, wanted=None, names=None):
    """The paired comparison of relative PD between two snapshots of the same trials, with its
    sentence (snapshot_stats.paired_snapshot_comparison, describe_change), or None."""
    picked = pick_snapshots(curve['iters'], wanted)
    if picked is None or len(next(iter(curve['matrices'].values()))['relative_pd']) < 3:
        return None
    early, late = picked
    res = snapshot_stats.paired_snapshot_comparison(curve['matrices'][early]['relative_pd'],
                                             curve['matrices'][late]['relative_pd'], names=names)
    return {**res, 'early_iter': early, 'late_iter': late, 'sentence': snapshot_stats.describe_change(res, at=(early, late))}


def yardstick(trials):
    """The ensemble yardstick of one group's final predictions (snapshot_stats.ensemble_yardstick), or
    None below 2 trials."""
    if len(trials) < 2:
        return None
    return snapshot_stats.ensemble_yardstick(np.stack([t['probs'] for t in trials]))


def place(comparison, base_yardstick):
    """An activation's difference from the baseline on the ensemble scale, as a sentence."""
    if not base_yardstick or comparison.get('difference') is None or not comparison.get('mean_baseline'):
        return None
    change = comparison['difference'] / comparison['mean_baseline']
    return snapshot_stats.place_on_yardstick(f"{comparison['activation']} vs {comparison['baseline']}", change,
                                      base_yardstick)


def summarize(groups, comparisons, wanted=None):
    """Per group (model, activation): the curve over training (without its pair matrices), the
    paired snapshot comparison and the yardstick; and each comparison's placement on the
    baseline's yardstick. Mutates the group entries and comparisons it is given:
    groups {(model, activation): (entry, trials)}."""
    sticks = {}
    for (model, act), (entry, trials) in groups.items():
        curve, note = over_training(trials)
        entry['snapshots'], entry['snapshots_note'] = None, note
        entry['snapshot_change'] = None
        if curve:
            entry['snapshot_change'] = snapshot_change(curve, wanted, [f"trial {t['trial']}" for t in trials])
            curve.pop('matrices')
            entry['snapshots'] = curve
        entry['ensemble_yardstick'] = sticks[(model, act)] = yardstick(trials)
    for c in comparisons:
        c['on_yardstick'] = place(c, sticks.get((c['model'], c['baseline'])))
