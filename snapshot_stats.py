"""
Reproducibility over training and against the ensemble yardstick: the paired comparison of two
snapshots of the same trials, and how much averaging m models changes a pairwise metric.
Pure numpy/scipy.
"""
import itertools
import math

import numpy as np
from scipy import stats

from intervals import check_pair_matrix, pairwise_interval, pseudo_values, t_interval
from pairwise import pair_matrix, pairwise, relative_pd
from stat_settings import ALPHA, CONFIDENCE, MIN_TRIALS_FOR_CI, SEED


def paired_snapshot_comparison(d_early, d_late, confidence=CONFIDENCE, scale='logit', names=None):
    """Change of a mean pairwise metric between two snapshots of the same T >= 3 trials (pair
    matrices d_early, d_late [T, T], trials in one order): late - early, with a paired
    leave-one-trial-out jackknife. The same trials appear at both points, so the jackknife runs
    on the difference (its pseudo-values are the differences of the two snapshots'), which
    keeps what the trials share out of the error; a t-interval and a two-sided t-test with
    T - 1 df. Why t and not a sign-flip permutation of the pseudo-value differences: that needs
    them symmetric about 0 under no change and cannot go below 2 / 2^T (0.25 at 3 trials);
    the t-test's level and coverage are checked by simulation (tests/test_calibration.py).
    Returns {'early', 'late' (pairwise_interval of each, on `scale`), 'difference', 'ci',
    'ci_method', 'p_value', 'n_trials', 'method'}."""
    d_early, d_late = check_pair_matrix(d_early, 'early snapshot'), check_pair_matrix(d_late, 'late snapshot')
    t = len(d_early)
    if d_late.shape != d_early.shape or t < 3:
        raise ValueError(f"need two pair matrices of the same >= 3 trials, got {d_early.shape} and {d_late.shape}")
    delta = pseudo_values(d_late) - pseudo_values(d_early)
    diff, se = float(delta.mean()), float(delta.std(ddof=1) / math.sqrt(t))
    if se > 0:
        p = float(2 * stats.t.sf(abs(diff) / se, t - 1))
    else:
        p = 1.0 if diff == 0 else 0.0
    return {'early': pairwise_interval(d_early, confidence, scale, names),
            'late': pairwise_interval(d_late, confidence, scale, names),
            'difference': diff, 'ci': t_interval(diff, se, t - 1, confidence),
            'ci_method': f'paired leave-one-trial-out jackknife t-interval of late - early, {t - 1} df',
            'p_value': p, 'n_trials': t,
            'method': 'paired jackknife over trials: t-test of the pseudo-value differences (late - early)'}


def describe_change(res, at=('early', 'late'), metric='relative PD', alpha=ALPHA):
    """One sentence for paired_snapshot_comparison's result, e.g. "relative PD rose from 0.071
    [0.065, 0.078] at 500 to 0.094 [0.088, 0.101] at 5000: more divergent (p 0.002)"."""
    def fmt(r):
        return f"{r['mean']:.3g}" + (f" [{r['ci'][0]:.3g}, {r['ci'][1]:.3g}]" if r['ci'] else "")
    e, l, p = res['early'], res['late'], res['p_value']
    if p <= alpha and res['difference'] != 0:
        rose = res['difference'] > 0
        return (f"{metric} {'rose' if rose else 'fell'} from {fmt(e)} at {at[0]} to {fmt(l)} at {at[1]}: "
                f"{'more' if rose else 'less'} divergent (p {p:.2g})")
    return (f"{metric} {fmt(e)} at {at[0]}, {fmt(l)} at {at[1]}: no detectable change "
            f"(difference {res['difference']:+.2g}, {CONFIDENCE:.0%} interval [{res['ci'][0]:+.2g}, "
            f"{res['ci'][1]:+.2g}], p {p:.2g})")


def _disjoint_splits(t, m, n_splits, rng):
    """Pairs of disjoint m-trial index sets out of t: all of them (each unordered pair once)
    when there are at most n_splits, else n_splits random ones. Returns (list, exhaustive)."""
    total = math.comb(t, m) * math.comb(t - m, m) // 2
    if total <= n_splits:
        out = []
        for a in itertools.combinations(range(t), m):
            for b in itertools.combinations([i for i in range(t) if i not in a], m):
                if a < b:
                    out.append((list(a), list(b)))
        return out, True
    return [(list(p[:m]), list(p[m:2 * m])) for p in (rng.permutation(t) for _ in range(n_splits))], False


def ensemble_yardstick(probs, metric=None, n_splits=200, seed=SEED):
    """How much averaging models changes the metric: for m = 1 .. T // 2, the metric (default
    relative_pd) between the averaged predictions of two disjoint ensembles of m trials,
    averaged over disjoint splits (all of them when there are at most n_splits, else n_splits
    seeded random ones). probs: [T, n, C].

    Uncertainty: m = 1 is the mean pairwise metric with pairwise_interval's jackknife interval.
    For m > 1 the figure is descriptive: splits reuse the same trials, so the spread over splits
    ('split_sd') is no standard error, and a leave-one-trial-out jackknife needs T - 1 >= 2m,
    which fails at the largest m. Returns [{'m', 'value', 'relative_to_single' (value / value at
    m = 1), 'n_splits', 'exhaustive', 'split_sd', 'ci' (m = 1 only), 'method'}]."""
    metric = relative_pd if metric is None else metric
    probs = np.asarray(probs)
    if probs.ndim != 3 or len(probs) < 2:
        raise ValueError(f"need predictions [trials >= 2, n, C], got shape {probs.shape}")
    t, rng, out = len(probs), np.random.default_rng(seed), []
    for m in range(1, t // 2 + 1):
        splits, exhaustive = _disjoint_splits(t, m, n_splits, rng)
        v = np.array([float(metric(probs[a].mean(0, dtype=np.float64), probs[b].mean(0, dtype=np.float64)))
                      for a, b in splits])
        row = {'m': m, 'value': float(v.mean()), 'relative_to_single': None, 'n_splits': len(splits),
               'exhaustive': exhaustive, 'split_sd': float(v.std(ddof=1)) if len(v) > 1 else None, 'ci': None,
               'method': 'descriptive: mean over disjoint splits of the trials (no interval: the splits share trials)'}
        if m == 1 and t >= MIN_TRIALS_FOR_CI:
            pairs, vals = pairwise(probs, {'v': metric})
            r = pairwise_interval(pair_matrix(t, pairs, vals['v']), scale='log')
            row.update(ci=r['ci'], method='mean over all pairs; ' + r['ci_method'])
        out.append(row)
    for row in out:
        row['relative_to_single'] = row['value'] / out[0]['value'] if out[0]['value'] > 0 else None
    return out


def place_on_yardstick(label, relative_change, yardstick, metric='relative PD'):
    """One sentence placing a relative change of the metric (e.g. (act - base) / base = -0.06)
    against averaging models: "smelu_1 vs relu: -6% relative PD; averaging 2 models gives -29%"."""
    if len(yardstick) < 2 or yardstick[1]['relative_to_single'] is None:
        return f"{label}: {relative_change:+.0%} {metric}; no ensemble yardstick (needs >= 4 trials)"
    gains = [(r['m'], r['relative_to_single'] - 1) for r in yardstick[1:]]
    text = f"{label}: {relative_change:+.0%} {metric}; averaging {gains[0][0]} models gives {gains[0][1]:+.0%}"
    if len(gains) > 1:
        text += f" ({gains[-1][0]} models: {gains[-1][1]:+.0%})"
    return text
