"""
Statistics over the trials of one group: the mean of a pairwise metric with its
leave-one-trial-out jackknife interval (on a scale that keeps it in the metric's bounds), the
jackknife pseudo-values the tests build on, per-trial diagnostics (outlier trials), and the
mean of per-trial values. Pure numpy/scipy.

The unit is the trial: pairs that share a trial are not independent, so nothing here treats
pairs as samples. Every interval comes with its method, and is None below MIN_TRIALS_FOR_CI.
"""
import math

import numpy as np
from scipy import special, stats

from stat_settings import CONFIDENCE, MIN_TRIALS_FOR_CI, OUTLIER_RATIO


def interval_note(n):
    return (f"no interval possible: {n} trial(s); a {CONFIDENCE:.0%} interval needs at least "
            f"{MIN_TRIALS_FOR_CI} trials per group")


def mean_over_distinct_pairs(d, idx):
    """Mean of d[a, b] over the position pairs of each row of idx [..., k] that hold two
    different trials; nan for a row holding one trial only."""
    a, b = idx[..., :, None], idx[..., None, :]
    distinct = a != b
    n = distinct.sum((-2, -1))
    total = (d[a, b] * distinct).sum((-2, -1))
    with np.errstate(divide='ignore', invalid='ignore'):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def pseudo_values(d):
    """Leave-one-trial-out jackknife pseudo-values of the mean of a pair matrix d [T, T] over
    its distinct pairs (a U-statistic of the trials), T >= 3: psi_i = T U - (T - 1) U_(-i),
    where U_(-i) leaves out trial i and all T - 1 of its pairs. Their mean is U exactly, their
    variance / T the jackknife variance of U. Each is trial i's own contribution to the spread
    (for d_ij = s_i + s_j it is exactly 2 s_i), so they are what the dispersion test compares."""
    t = len(d)
    if t < 3:
        raise ValueError(f"jackknife pseudo-values need at least 3 trials, got {t}")
    u, loo = loo_means(d)
    return t * u - (t - 1) * loo


def loo_means(d):
    """(mean over distinct pairs, [T] means with trial i and its pairs left out) of d [T, T]."""
    t = len(d)
    total, row = np.triu(d, 1).sum(), d.sum(1) - np.diag(d)
    return total / math.comb(t, 2), (total - row) / math.comb(t - 1, 2)


def check_pair_matrix(d, what='pair matrix'):
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"{what}: need a square [T, T] matrix of pair values, got shape {d.shape}")
    bad = np.argwhere(~np.isfinite(d))
    if len(bad):
        raise ValueError(f"{what}: pair value of trials {bad[0].tolist()} is {d[tuple(bad[0])]}; "
                         f"every pair value must be a finite number")
    return d


def t_interval(mean, se, df, confidence):
    h = stats.t.ppf(0.5 + confidence / 2, df) * se
    return [float(mean - h), float(mean + h)]


# scale of a jackknife interval -> (lower bound, upper bound) of the quantity it is for
SCALES = {'linear': (None, None), 'log': (0.0, None), 'logit': (0.0, 1.0)}


def _to_scale(x, scale):
    x = np.asarray(x, dtype=np.float64)
    if scale == 'log':
        return np.log(x)
    return np.log(x) - np.log1p(-x) if scale == 'logit' else x


def _from_scale(y, scale):
    y = np.asarray(y, dtype=np.float64)
    if scale == 'log':
        return np.exp(y)
    return special.expit(y) if scale == 'logit' else y


def _jackknife_interval(u, loo, scale, confidence):
    """Jackknife t-interval (n - 1 df) of an estimate u from its n leave-one-out values, computed
    on `scale` ('linear', 'log' or 'logit') and transformed back, so it stays inside the scale's
    bounds. Returns (ci, method). Where the transform is undefined (an estimate at a bound: all
    pairs equal 0, say) it says so and gives the linear interval clipped to the bounds."""
    if scale not in SCALES:
        raise ValueError(f"interval scale {scale!r}; valid: {', '.join(SCALES)}")
    n, (lo, hi) = len(loo), SCALES[scale]
    both = np.append(loo, u)
    inside = (lo is None or (both > lo).all()) and (hi is None or (both < hi).all())
    used = scale if inside else 'linear'
    f, floo = _to_scale(u, used), _to_scale(loo, used)
    psi = n * f - (n - 1) * floo
    ci = _from_scale(t_interval(float(f), psi.std(ddof=1) / math.sqrt(n), n - 1, confidence), used)
    ci = np.clip(ci, -np.inf if lo is None else lo, np.inf if hi is None else hi).tolist()
    method = f'leave-one-trial-out jackknife t-interval, {n - 1} df'
    if scale == 'linear':
        return ci, method
    if inside:
        return ci, f'{method}, on the {scale} scale (stays within [{lo:g}, {"inf" if hi is None else f"{hi:g}"}])'
    return ci, (f'{method}, on the linear scale clipped to the bounds: the {scale} scale is undefined '
                f'because an estimate lies at a bound')


def trial_diagnostics(d, names=None, ratio=OUTLIER_RATIO):
    """Per-trial outlyingness of a pair matrix d [T, T], T >= 3: trial i's mean pair value to the
    other trials divided by the mean pair value among the other trials (1 for exchangeable
    trials; a trial that trained into another basin scores well above). Flags trials at or
    above `ratio` (OUTLIER_RATIO). Returns {'outlyingness': [T floats; None where the other
    trials' pairs are all 0], 'outliers': [names of flagged trials], 'outlier_indices', 'rule',
    'note' (None when none flagged)}."""
    d = check_pair_matrix(d)
    t = len(d)
    if t < 3:
        raise ValueError(f"per-trial diagnostics need at least 3 trials, got {t}")
    names = list(range(t)) if names is None else list(names)
    _, loo = loo_means(d)
    own = (d.sum(1) - np.diag(d)) / (t - 1)
    with np.errstate(divide='ignore', invalid='ignore'):
        r = np.where(loo > 0, own / np.where(loo > 0, loo, 1.0), np.where(own > 0, np.inf, 1.0))
    flagged = [int(i) for i in np.flatnonzero(r >= ratio)]
    out = {'outlyingness': [float(x) if np.isfinite(x) else None for x in r],
           'outliers': [names[i] for i in flagged], 'outlier_indices': flagged,
           'rule': (f"outlier: mean pair value to the other trials >= {ratio:g}x the mean pair value among "
                    f"the other trials"), 'note': None}
    if flagged:
        out['note'] = "; ".join(
            f"trial {names[i]} is an outlier: its predictions differ from the other trials "
            + (f"{r[i]:.1f}x as much as they differ from each other" if np.isfinite(r[i])
               else "while the other trials are identical") for i in flagged)
    return out


def pairwise_interval(d, confidence=CONFIDENCE, scale='linear', names=None, outlier_ratio=OUTLIER_RATIO):
    """Mean of a pairwise metric over the distinct pairs of T trials with a leave-one-trial-out
    jackknife t-interval (T - 1 df) on `scale` (PAIR_METRIC_SCALE: 'logit' for metrics in
    [0, 1], 'log' for metrics >= 0, 'linear'), and per-trial diagnostics (trial_diagnostics).

    Why a transformed scale: a mean pair value is positive and right-skewed (a trial with more
    noise raises all its T - 1 pairs), and a symmetric interval over 3 trials can run below 0.
    In tests/test_calibration.py's simulations the log/logit interval held coverage >= 0.90 with
    heavy-tailed trial noise where the linear one fell to ~0.86, and equals it on well-behaved
    trials. A flagged outlier trial makes the interval unreliable (ci_reliable False, the
    trials named in ci_note): no interval over a handful of trials covers a mean that rare
    outlier seeds move (see undetected_outlier_fraction).
    The default 'linear' is the former interval, kept so callers change on purpose: pass
    scale=PAIR_METRIC_SCALE[metric].
    Returns {'mean', 'ci', 'ci_method', 'ci_note', 'ci_scale', 'ci_reliable', 'outliers',
    'outlyingness'}."""
    d = check_pair_matrix(d)
    t = len(d)
    out = {'mean': float(np.triu(d, 1).sum() / math.comb(t, 2)) if t >= 2 else None,
           'ci': None, 'ci_method': None, 'ci_note': None, 'ci_scale': scale, 'ci_reliable': None,
           'outliers': [], 'outlyingness': None}
    if t < MIN_TRIALS_FOR_CI:
        out['ci_note'] = interval_note(t)
        return out
    u, loo = loo_means(d)
    out['ci'], out['ci_method'] = _jackknife_interval(u, loo, scale, confidence)
    diag = trial_diagnostics(d, names, outlier_ratio)
    out.update(outliers=diag['outliers'], outlyingness=diag['outlyingness'], ci_reliable=not diag['outliers'])
    if diag['outliers']:
        out['ci_note'] = (f"interval unreliable: {diag['note']}; the interval treats the trials as exchangeable "
                          f"draws, and a few trials cannot say how often such outliers occur")
    return out


def undetected_outlier_fraction(n, confidence=CONFIDENCE):
    """The largest fraction of outlier seeds still consistent (at `confidence`) with seeing none
    among n trials: 1 - (1 - confidence)^(1/n) (0.45 at n = 5, 0.26 at n = 10). A mean over
    trials says nothing about failures rarer than this."""
    return float(1 - (1 - confidence) ** (1 / n))


def describe(values, confidence=CONFIDENCE, bounds=None):
    """n, mean, sample std (ddof=1; None below 2 values) and an interval of the mean over trials
    (None below MIN_TRIALS_FOR_CI, with ci_note saying why). bounds None: a t-interval; (0, 1)
    (accuracies, fractions): a jackknife t-interval on the logit scale; (0, None): on the log
    scale; either stays inside the bounds."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    out = {'n': n, 'mean': float(v.mean()) if n else None, 'std': float(v.std(ddof=1)) if n >= 2 else None,
           'ci': None, 'ci_method': None, 'ci_note': None}
    if n < MIN_TRIALS_FOR_CI:
        out['ci_note'] = interval_note(n)
        return out
    if bounds is None:
        out.update(ci=t_interval(out['mean'], out['std'] / math.sqrt(n), n - 1, confidence),
                   ci_method=f't-interval over trials, {n - 1} df')
        return out
    scale = {(0, 1): 'logit', (0, None): 'log'}.get(tuple(bounds))
    if scale is None:
        raise ValueError(f"bounds {bounds!r}; valid: None, (0, 1), (0, None)")
    loo = (v.sum() - v) / (n - 1)
    out['ci'], out['ci_method'] = _jackknife_interval(out['mean'], loo, scale, confidence)
    return out
