"""
How much trials' predictions on the same evaluation set disagree, and the statistics over
trials that go with it. Pure numpy/scipy: no torch.

Every metric takes two arrays of probability rows [..., n, C] (softmax outputs) and reduces
the last two axes, so one function serves a single pair ([n, C] each) and all pairs of a
stack at once ([n_pairs, n, C] each). Arithmetic is float64: float32 sums over ~65k
elements lose the digits that small disagreements live in.

To add a per-pair metric, write f(p1, p2) below and add it to PAIR_METRICS: the analysis,
summary.json and the report take their list of metrics from there. What each statistic is and
how it was calibrated: docs/analysis.md.

Over 500 lines on purpose: every statistic of the project lives here, pure and testable, with
its calibration tests beside it (tests/test_calibration.py); the sections below are independent.
"""
import functools
import itertools
import math

import numpy as np
from scipy import special, stats

CONFIDENCE = 0.95
ALPHA = 0.05             # level of the tests, after the Holm correction
POWER = 0.8              # power at which the minimum detectable difference is quoted
N_PERMUTATIONS = 9999    # permutation tests: exact enumeration when there are fewer distinct splits
SEED = 0                 # fixed, so the same files give the same p-values
N_RESAMPLES = 2000       # seed bootstrap of the FFN study's best-of-k (best_of_k_bootstrap)
# Fewest trials from which an interval is given (below: ci None and a note saying why). The
# jackknife needs 3; tests/test_calibration.py's simulations (figures in docs/analysis.md) show its 95% intervals covering the truth in >= 90% of studies from 3 trials on.
MIN_TRIALS_FOR_CI = 3
# relative_pd_elementwise counts probabilities below this as this (see there)
ELEMENTWISE_FLOOR = 1e-3
# A trial is flagged as an outlier when its mean pair value to the other trials is at least this
# many times the mean pair value among the other trials (trial_diagnostics). Of simulated studies
# whose trials' noise scale varies by exp(0.2 N(0, 1)), 1-3% get a trial flagged; a trial with 4x
# the noise scores ~2.3 and is flagged in >= 86% of studies holding one (benchmarks/calibration.py).
OUTLIER_RATIO = 1.5
# Default equivalence margin, relative to the baseline's mean pair value (equivalence_test). 25%:
# the smallest margin at which the test can conclude anything at this project's trial counts
# (power 0.74 at 10 + 10 trials with equal spreads, level <= 0.057; at 10% its power stays
# <= 0.05 even at 20 + 20: benchmarks/calibration.py), and still below what averaging two
# models buys (about -30%: the ensemble yardstick), so "equally reproducible" means closer
# than the cheapest remedy moves it.
EQUIVALENCE_MARGIN = 0.25


class EvalMismatch(ValueError):
    """Two trials were evaluated on different inputs: there is no disagreement number."""


def _rows(p1, p2):
    p1, p2 = np.asarray(p1, dtype=np.float64), np.asarray(p2, dtype=np.float64)
    if p1.shape != p2.shape or p1.ndim < 2:
        raise ValueError(f"need two arrays of probability rows [..., n, C] of one shape, got {p1.shape} and {p2.shape}")
    return p1, p2


# ----------------------------------------------------------------------------- per-pair metrics

def relative_pd(p1, p2):
    """mean|p1 - p2| / (mean p1 + mean p2) over all examples and classes: the original study's
    Relative PD. For probability rows mean p = 1/C, so this is sum_c |p1 - p2| / 2 averaged
    over rows, the mean total-variation distance; 0 = identical, 1 = disjoint supports."""
    p1, p2 = _rows(p1, p2)
    ax = (-2, -1)
    return np.abs(p1 - p2).mean(ax) / (p1.mean(ax) + p2.mean(ax))


def relative_pd_elementwise(p1, p2, floor=ELEMENTWISE_FLOOR):
    """Mean over examples and classes of 2|q1 - q2| / (q1 + q2) with q = max(p, floor): the
    per-element relative PD of Shamir et al. with a probability floor; in [0, 2).

    Without the floor the ratio is ~2 for any two tiny probabilities (1e-12 vs 1e-10), so
    classes no trial considers possible dominate the mean (in this project's LMs most of it
    came from entries where both are below 1e-3, largely float32 softmax tails). Clipping both
    at 1e-3 (a class drawn once in 1000 samples) makes entries where both are below the floor
    count 0 and keeps the value continuous in p; the mean stays over all n x C entries, so
    values of different pairs remain comparable. What it measures: relative disagreement on
    every class at least one trial gives >= 0.1%, weighing unlikely classes like likely ones."""
    p1, p2 = _rows(p1, p2)
    q1, q2 = np.maximum(p1, floor), np.maximum(p2, floor)
    s = q1 + q2
    with np.errstate(divide='ignore', invalid='ignore'):  # floor 0 and two zeros: 0
        return np.where(s > 0, 2 * np.abs(q1 - q2) / s, 0.0).mean((-2, -1))


def prediction_differences(p1, p2):
    """Number of examples whose top-1 class differs."""
    return (np.argmax(p1, -1) != np.argmax(p2, -1)).sum(-1)


def top1_disagreement(p1, p2):
    """Fraction of examples whose top-1 class differs."""
    return (np.argmax(p1, -1) != np.argmax(p2, -1)).mean(-1)


def js_divergence(p1, p2):
    """Jensen-Shannon divergence in bits (base-2 logs, so within [0, 1]), mean over rows."""
    p1, p2 = _rows(p1, p2)
    m = 0.5 * (p1 + p2)

    def kl_to_m(p):  # 0 log 0 = 0; wherever p > 0, m > 0 too
        with np.errstate(divide='ignore', invalid='ignore'):
            return np.where(p > 0, p * np.log2(p / m), 0.0).sum(-1)
    return (0.5 * kl_to_m(p1) + 0.5 * kl_to_m(p2)).mean(-1)


def l2_distance(p1, p2):
    """Mean Euclidean distance between corresponding rows."""
    p1, p2 = _rows(p1, p2)
    return np.sqrt(((p1 - p2) ** 2).sum(-1)).mean(-1)


def max_abs_diff(p1, p2):
    """Largest |p1 - p2| anywhere: 0 exactly when the predictions are identical (used by the
    sanity checks: identical predictions from different seeds or activations are a bug)."""
    p1, p2 = _rows(p1, p2)
    return np.abs(p1 - p2).max((-2, -1))


# name -> f(p1, p2); the one place a per-pair metric is registered
PAIR_METRICS = {
    'relative_pd': relative_pd,
    'relative_pd_elementwise': relative_pd_elementwise,
    'top1_disagreement': top1_disagreement,
    'prediction_differences': prediction_differences,
    'js_divergence': js_divergence,
    'l2_distance': l2_distance,
    'max_abs_diff': max_abs_diff,
}
# name -> scale of its jackknife interval (pairwise_interval): 'logit' for metrics in [0, 1]
# (relative PD is in [0, 1] for probability rows), 'log' for metrics that are only >= 0
PAIR_METRIC_SCALE = {
    'relative_pd': 'logit',
    'relative_pd_elementwise': 'log',
    'top1_disagreement': 'logit',
    'prediction_differences': 'log',
    'js_divergence': 'logit',
    'l2_distance': 'log',
    'max_abs_diff': 'logit',
}


# ----------------------------------------------------------------------------- all pairs

def pairwise(stack, metrics=None, max_elements=1 << 23):
    """Every metric for every pair i < j of a stack of predictions [T, n, C].
    Returns (pairs [P, 2] int array, {name: values [P]}). Pairs are processed in blocks of
    at most max_elements probabilities so memory stays bounded for many trials."""
    metrics = PAIR_METRICS if metrics is None else metrics
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise ValueError(f"need a stack of predictions [trials, n, C], got shape {stack.shape}")
    i, j = np.triu_indices(len(stack), k=1)
    block = max(1, max_elements // max(1, stack[0].size))
    out = {name: [] for name in metrics}
    for s in range(0, len(i), block):
        a, b = stack[i[s:s + block]], stack[j[s:s + block]]
        for name, f in metrics.items():
            out[name].append(np.asarray(f(a, b)))
    values = {name: np.concatenate(v) if v else np.zeros(0) for name, v in out.items()}
    return np.stack([i, j], axis=1), values


def check_same_eval(trials):
    """Raise EvalMismatch unless all trials were evaluated on the same inputs. `trials` are
    dicts with name, eval_hash, eval_indices, targets and probs."""
    ref = trials[0]
    for t in trials[1:]:
        if t['eval_hash'] != ref['eval_hash']:
            raise EvalMismatch(f"{t['name']} and {ref['name']} were evaluated on different inputs "
                               f"(eval_hash {t['eval_hash'][:12]}... vs {ref['eval_hash'][:12]}...)")
        for key in ('eval_indices', 'targets'):
            if not np.array_equal(t[key], ref[key]):
                raise EvalMismatch(f"{t['name']} and {ref['name']} have different {key}: "
                                   f"evaluated on different inputs")
        if t['probs'].shape != ref['probs'].shape:
            raise EvalMismatch(f"{t['name']} and {ref['name']} have predictions of different shapes "
                               f"{t['probs'].shape} and {ref['probs'].shape}")


def compare(trials, metrics=None):
    """pairwise() over trials (dicts as in check_same_eval), after checking they share an
    evaluation set; comparing different evaluation sets raises EvalMismatch."""
    check_same_eval(trials)
    return pairwise(np.stack([t['probs'] for t in trials]), metrics)


def pair_matrix(n_trials, pairs, values):
    """Symmetric [T, T] matrix of a pairwise metric with a zero diagonal."""
    d = np.zeros((n_trials, n_trials))
    d[pairs[:, 0], pairs[:, 1]] = values
    d[pairs[:, 1], pairs[:, 0]] = values
    return d


# ----------------------------------------------------------------------------- statistics over trials
#
# The unit is the trial: pairs that share a trial are not independent, so nothing below treats
# pairs as samples. Every interval comes with its method, and is None below MIN_TRIALS_FOR_CI.

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
    u, loo = _loo_means(d)
    return t * u - (t - 1) * loo


def _loo_means(d):
    """(mean over distinct pairs, [T] means with trial i and its pairs left out) of d [T, T]."""
    t = len(d)
    total, row = np.triu(d, 1).sum(), d.sum(1) - np.diag(d)
    return total / math.comb(t, 2), (total - row) / math.comb(t - 1, 2)


def _check_pair_matrix(d, what='pair matrix'):
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"{what}: need a square [T, T] matrix of pair values, got shape {d.shape}")
    bad = np.argwhere(~np.isfinite(d))
    if len(bad):
        raise ValueError(f"{what}: pair value of trials {bad[0].tolist()} is {d[tuple(bad[0])]}; "
                         f"every pair value must be a finite number")
    return d


def _t_interval(mean, se, df, confidence):
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
    ci = _from_scale(_t_interval(float(f), psi.std(ddof=1) / math.sqrt(n), n - 1, confidence), used)
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
    d = _check_pair_matrix(d)
    t = len(d)
    if t < 3:
        raise ValueError(f"per-trial diagnostics need at least 3 trials, got {t}")
    names = list(range(t)) if names is None else list(names)
    _, loo = _loo_means(d)
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
    d = _check_pair_matrix(d)
    t = len(d)
    out = {'mean': float(np.triu(d, 1).sum() / math.comb(t, 2)) if t >= 2 else None,
           'ci': None, 'ci_method': None, 'ci_note': None, 'ci_scale': scale, 'ci_reliable': None,
           'outliers': [], 'outlyingness': None}
    if t < MIN_TRIALS_FOR_CI:
        out['ci_note'] = interval_note(t)
        return out
    u, loo = _loo_means(d)
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
        out.update(ci=_t_interval(out['mean'], out['std'] / math.sqrt(n), n - 1, confidence),
                   ci_method=f't-interval over trials, {n - 1} df')
        return out
    scale = {(0, 1): 'logit', (0, None): 'log'}.get(tuple(bounds))
    if scale is None:
        raise ValueError(f"bounds {bounds!r}; valid: None, (0, 1), (0, None)")
    loo = (v.sum() - v) / (n - 1)
    out['ci'], out['ci_method'] = _jackknife_interval(out['mean'], loo, scale, confidence)
    return out


# ----------------------------------------------------------------------------- two groups of trials

def _welch_t(x, y, axis=-1):
    mx, my = x.mean(axis), y.mean(axis)
    se = np.sqrt(x.var(axis, ddof=1) / x.shape[axis] + y.var(axis, ddof=1) / y.shape[axis])
    with np.errstate(divide='ignore', invalid='ignore'):
        return np.where(se > 0, (mx - my) / se, np.where(mx == my, 0.0, np.sign(mx - my) * np.inf))


def _permutation(x, y, statistic, alternative, n_resamples, seed):
    """Permutation test over group labels (scipy; exact enumeration of all splits when there
    are at most n_resamples): p-value, whether exact, number of permutations, and the smallest
    p-value this test can give with these group sizes at all."""
    res = stats.permutation_test((x, y), statistic, permutation_type='independent', vectorized=True,
                                 n_resamples=n_resamples, alternative=alternative,
                                 random_state=np.random.default_rng(seed))
    n_splits = math.comb(len(x) + len(y), len(x))
    exact = n_splits <= n_resamples
    least = smallest_p(len(x), len(y), 2 if alternative == 'two-sided' else 1, n_resamples)
    return {'p_value': float(res.pvalue), 'exact': exact, 'n_permutations': n_splits if exact else n_resamples,
            'min_p_value': float(min(1.0, least))}


def _split_masks(na, nb, n_resamples, rng):
    """[K, na + nb] bool masks of group a: every split when there are at most n_resamples,
    else n_resamples random ones. Returns (masks, exact)."""
    n = na + nb
    if math.comb(n, na) <= n_resamples:
        masks = np.zeros((math.comb(n, na), n), bool)
        for k, c in enumerate(itertools.combinations(range(n), na)):
            masks[k, list(c)] = True
        return masks, True
    return np.argsort(rng.random((n_resamples, n)), 1) < na, False


def _welch_permutation(x, y, n_resamples=N_PERMUTATIONS, seed=SEED):
    """Two-sided permutation test of the Welch t statistic of x against y over group labels,
    p = 2 min(p_greater, p_less) as scipy counts it. Unlike scipy's, an infinite statistic
    (zero spread within each group) compares equal to itself, so p never drops below the
    smallest attainable value (smallest_p). x, y: [..., n] (batched over leading axes)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    na, nb = x.shape[-1], y.shape[-1]
    masks, exact = _split_masks(na, nb, n_resamples, np.random.default_rng(seed))
    pool = np.concatenate([x, y], -1)
    order = np.argsort(~masks, axis=1, kind='stable')          # group a's positions first
    perm = pool[..., order]                                     # [..., K, n]
    t = _welch_t(perm[..., :na], perm[..., na:])
    t0 = _welch_t(x, y)[..., None]
    tol = np.where(np.isfinite(t0), 1e-9 * np.abs(t0), 0.0)
    ge, le = (t >= t0 - tol).sum(-1), (t <= t0 + tol).sum(-1)
    if exact:
        p = 2 * np.minimum(ge, le) / len(masks)
    else:
        p = 2 * (np.minimum(ge, le) + 1) / (n_resamples + 1)
    least = smallest_p(na, nb, 2, n_resamples)
    return {'p_value': np.clip(p, least, 1.0), 'exact': exact, 'n_permutations': len(masks),
            'min_p_value': float(least)}


def smallest_p(na, nb, sides=2, n_resamples=N_PERMUTATIONS):
    """The smallest p-value a permutation test over na + nb trials can give at all. An exact
    test can do no better than the observed split alone (two-sided: and its mirror, counted on
    both sides; a symmetric statistic: and its mirror, when the groups are of one size); a
    random one than (0 + 1) / (n_resamples + 1), per side."""
    n_splits = math.comb(na + nb, na)
    if n_splits <= n_resamples:
        return min(1.0, max(sides, 2 if na == nb else 1) / n_splits)
    return min(1.0, sides / (n_resamples + 1))


def trials_to_detect(m, alpha=ALPHA):
    """Fewest trials per group (both groups alike) with which a two-sided permutation test can
    give p <= alpha / m, the first step of Holm over m comparisons: below it no difference of
    any size can be detected."""
    n = 2
    while smallest_p(n, n) > alpha / max(1, m):
        n += 1
    return n


def _welch_df(va, dfa, vb, dfb):
    """Welch-Satterthwaite degrees of freedom of va + vb (two variances of means)."""
    if va + vb == 0:
        return float(dfa + dfb)
    return float((va + vb) ** 2 / (va ** 2 / dfa + vb ** 2 / dfb))


@functools.lru_cache(maxsize=1024)
def detectable_shift(na, nb, threshold, power=POWER, n_resamples=N_PERMUTATIONS, cv=0.0, studies=1000, seed=SEED):
    """The increase r of group a's mean, relative to group b's, that dispersion_test's
    permutation test detects (p <= threshold) in a fraction `power` of studies, by simulation:
    pseudo-values normal, group b's with coefficient of variation cv (SD / mean), group a's
    SD grown in proportion to its mean (x (1 + r)), as it does when trials get noisier (in
    tests/test_calibration.py's trials the SD rose 1.23x for 1.27x the mean PD). The test as
    run: every split enumerated where dispersion_test enumerates them, up to 300 splits; beyond
    that the permutation p of the Welch t is taken as the t distribution's, which it approaches
    on normal data. cv = 0 is the limit of equal SDs: r is then in units of that SD. None where
    no p-value can reach the threshold. Cached: call with cv rounded."""
    if smallest_p(na, nb, 2, n_resamples) > threshold:
        return None
    rng = np.random.default_rng(seed)
    za, zb = rng.normal(size=(studies, na)), rng.normal(size=(studies, nb))
    enumerate_splits = math.comb(na + nb, na) <= min(n_resamples, 300)

    def reaches(r):
        x = (za * (1 + r) + r / cv) if cv > 0 else za + r
        if enumerate_splits:
            p = _welch_permutation(x, zb, n_resamples)['p_value']
        else:
            va, vb = x.var(1, ddof=1) / na, zb.var(1, ddof=1) / nb
            df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
            p = 2 * stats.t.sf(np.abs(x.mean(1) - zb.mean(1)) / np.sqrt(va + vb), df)
        return np.mean(p <= threshold) >= power

    lo, hi = 0.0, 1.0 if cv == 0 else cv
    while not reaches(hi):
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            return None
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return hi


def dispersion_test(d_a, d_b, n_resamples=N_PERMUTATIONS, confidence=CONFIDENCE, seed=SEED, m=1,
                    names_a=None, names_b=None, detectable=True):
    """Are group a's trials more or less spread than group b's? d_a, d_b: each group's *own*
    pair matrix (e.g. relative PD), so it stays valid when the two groups predict differently.

    A dispersion test in the manner of PERMDISP (Anderson 2006): every trial gets a dispersion
    value and a permutation test compares those values between the groups. PERMDISP's value
    (distance to the group's mean prediction) shares the mean's noise among a group's trials,
    which made its permutation test reject 7-14% of equal-spread cases at alpha 0.05 in
    tests/test_calibration.py's simulations; jackknife pseudo-values (pseudo_values) carry no
    such shared term when pair values add up from the two trials' parts. PD does not quite:
    independent noises add in quadrature, and relative PD (a total-variation distance, <= 1)
    saturates, so an outlier trial's pairs are less than additive and shift its group-mates'
    pseudo-values too; the test on PD's pseudo-values rejected 8% of equal cases with rare
    outlier trials. The test therefore permutes the pseudo-values of the mean of
    (-log(1 - d))^2: -log(1 - d) undoes the saturation (= d for small d) and the square makes
    independent noises add. In the simulations this held the level (<= 0.05) with outliers and
    heavy tails, at a small cost in power (0.80 instead of 0.84 at 5 + 5 trials and 1.6x the
    noise; benchmarks/calibration.py). Pair values >= 1 (not a relative PD): d^2, and the
    method says so. Reported: the difference of the two mean pair values with a Welch
    t-interval from the pseudo-values (jackknife standard errors), the two-sided permutation
    p-value of the Welch t statistic, per-trial diagnostics of each group ('reliable' False
    when a trial is flagged, named in outlier_note), and the minimum detectable difference: the
    difference the test as run detects at p <= ALPHA / m (Holm's first, strictest step over m
    comparisons) with power POWER, by simulation (detectable_shift; None where no p-value can
    reach it, or detectable False). Needs 3 trials per group."""
    d_a, d_b = _check_pair_matrix(d_a, 'group a'), _check_pair_matrix(d_b, 'group b')
    if min(len(d_a), len(d_b)) < 3:
        raise ValueError("a dispersion test needs at least 3 trials per group")
    pa, pb = pseudo_values(d_a), pseudo_values(d_b)
    va, vb = pa.var(ddof=1) / len(pa), pb.var(ddof=1) / len(pb)
    df, se = _welch_df(va, len(pa) - 1, vb, len(pb) - 1), math.sqrt(va + vb)
    diff = float(pa.mean() - pb.mean())
    out = {'difference': diff, 'ratio': float(pa.mean() / pb.mean()) if pb.mean() > 0 else None,
           'ci': _t_interval(diff, se, df, confidence),
           'ci_method': f'jackknife standard errors of both groups, Welch t-interval, {df:.1f} df'}
    unsaturated = max(d_a.max(), d_b.max()) < 1
    g = (lambda d: np.log1p(-d) ** 2) if unsaturated else (lambda d: d ** 2)
    res = _welch_permutation(pseudo_values(g(d_a)), pseudo_values(g(d_b)), n_resamples, seed)
    out.update(p_value=float(res['p_value']), exact=res['exact'], n_permutations=res['n_permutations'],
               min_p_value=res['min_p_value'])
    threshold = ALPHA / max(1, m)
    # the baseline's spread of trial contributions: CV of b's pseudo-values, to 2 digits (cache)
    cv = float(f"{pb.std(ddof=1) / pb.mean():.2g}") if pb.mean() > 0 else 0.0
    r = detectable_shift(len(pa), len(pb), threshold, POWER, n_resamples, cv) if detectable else None
    out['min_detectable_difference'] = None if r is None else float(r * (pb.mean() if cv > 0 else pb.std(ddof=1)))
    out['min_detectable_difference_method'] = (
        f"simulated: the increase over the baseline's mean that the permutation test as run detects at p <= "
        f"{threshold:.3g} (alpha {ALPHA} / {max(1, m)} comparisons, Holm's strictest step) in {POWER:.0%} of "
        f"studies if pseudo-values were normal (the baseline's with its observed coefficient of variation "
        f"{cv:.2g}, the other's SD growing with its mean); on simulated trials the real power at this figure "
        f"was 0.65-0.8 (benchmarks/calibration.py)")
    da, db = trial_diagnostics(d_a, names_a), trial_diagnostics(d_b, names_b)
    out.update(outliers_a=da['outliers'], outliers_b=db['outliers'], outlyingness_a=da['outlyingness'],
               outlyingness_b=db['outlyingness'], outlier_note="; ".join(n for n in (da['note'], db['note']) if n) or None)
    out['reliable'] = not (da['outliers'] or db['outliers'])
    out['method'] = ("dispersion test: leave-one-trial-out jackknife pseudo-values of each group's mean "
                     + ("(-log(1 - relative PD))^2" if unsaturated else "squared pair value (a pair value >= 1, so not "
                                                                         "-log(1 - d))")
                     + ", two-sided permutation test of their Welch t statistic over group labels")
    return out


def leave_one_out(d_a, d_b, alpha=ALPHA, n_resamples=N_PERMUTATIONS, seed=SEED, names_a=None, names_b=None):
    """Does one trial decide dispersion_test's verdict? Reruns the test with each trial of a
    group of >= 4 left out and reports those whose removal flips significance (p <= alpha, the
    threshold this comparison must reach: ALPHA, or its Holm step) or the sign of the
    difference. Returns {'alpha', 'significant', 'checked': [{'group', 'trial', 'p_value',
    'difference'}], 'decided_by': [(group, trial)], 'note'}."""
    base = dispersion_test(d_a, d_b, n_resamples, seed=seed, detectable=False)
    sig, sign = base['p_value'] <= alpha, np.sign(base['difference'])
    out = {'alpha': alpha, 'significant': bool(sig), 'checked': [], 'decided_by': [], 'note': None}
    for g, d, other, names in (('a', d_a, d_b, names_a), ('b', d_b, d_a, names_b)):
        d = np.asarray(d)
        if len(d) < 4:
            continue
        names = list(range(len(d))) if names is None else list(names)
        for i in range(len(d)):
            keep = np.delete(np.arange(len(d)), i)
            dd = d[np.ix_(keep, keep)]
            r = dispersion_test(dd, other, n_resamples, seed=seed, detectable=False) if g == 'a' else \
                dispersion_test(other, dd, n_resamples, seed=seed, detectable=False)
            out['checked'].append({'group': g, 'trial': names[i], 'p_value': r['p_value'], 'difference': r['difference']})
            if (r['p_value'] <= alpha) != sig or np.sign(r['difference']) != sign:
                out['decided_by'].append((g, names[i]))
    if not out['checked']:
        out['note'] = "not checked: leaving a trial out needs >= 4 trials in a group"
    elif out['decided_by']:
        worst = [c for c in out['checked'] if (c['group'], c['trial']) in out['decided_by']]
        out['note'] = "the verdict rests on single trials: " + "; ".join(
            f"without trial {c['trial']} of group {c['group']}, p = {c['p_value']:.3g} and difference "
            f"{c['difference']:+.3g}" for c in worst)
    return out


def equivalence_test(d_a, d_b, margin=EQUIVALENCE_MARGIN, alpha=ALPHA):
    """Are groups a and b equally reproducible, within +/- margin x the baseline (b)'s mean pair
    value? Two one-sided tests (TOST) on the log of the ratio of the two mean pair values, each
    at alpha, with jackknife standard errors on the log scale and Welch degrees of freedom;
    equivalently, the (1 - 2 alpha) interval of the ratio lies inside [1 - margin, 1 + margin].

    Default margin (EQUIVALENCE_MARGIN, 25%; the reason is there): a narrower one can never be
    shown with the trial counts this project affords. A study sets its own with the analysis's
    --equivalence-margin.
    Returns {'equivalent': bool, or None with a note when no test is possible, 'margin',
    'ratio', 'ci' (of the difference a - b, [1 - 2 alpha] level, in units of the metric),
    'ci_ratio', 'p_value' (the larger one-sided p), 'note'}."""
    d_a, d_b = _check_pair_matrix(d_a, 'group a'), _check_pair_matrix(d_b, 'group b')
    out = {'equivalent': None, 'margin': margin, 'ratio': None, 'ci': None, 'ci_ratio': None, 'p_value': None,
           'note': None, 'method': f"two one-sided tests on log(mean a / mean b), jackknife SEs, each at {alpha}"}
    if not 0 < margin < 1:
        raise ValueError(f"equivalence margin {margin!r}: must lie in (0, 1), relative to the baseline's mean")
    if min(len(d_a), len(d_b)) < 3:
        out['note'] = "no equivalence test: it needs at least 3 trials per group"
        return out
    (ua, la), (ub, lb) = _loo_means(d_a), _loo_means(d_b)
    if min(ua, ub, la.min(), lb.min()) <= 0:
        out['note'] = "no equivalence test: a mean pair value is 0, so their ratio is undefined"
        return out
    na, nb = len(la), len(lb)
    pa, pb = na * np.log(ua) - (na - 1) * np.log(la), nb * np.log(ub) - (nb - 1) * np.log(lb)
    va, vb = pa.var(ddof=1) / na, pb.var(ddof=1) / nb
    df, se, est = _welch_df(va, na - 1, vb, nb - 1), math.sqrt(va + vb), math.log(ua / ub)
    lo_b, hi_b = math.log(1 - margin), math.log(1 + margin)
    if se == 0:
        p = 0.0 if lo_b < est < hi_b else 1.0
    else:
        p = float(max(stats.t.sf((est - lo_b) / se, df), stats.t.cdf((est - hi_b) / se, df)))
    ci_ratio = np.exp(_t_interval(est, se, df, 1 - 2 * alpha)).tolist()
    out.update(equivalent=bool(p <= alpha), ratio=float(ua / ub), ci_ratio=ci_ratio,
               ci=[float((r - 1) * ub) for r in ci_ratio], p_value=p)
    out['note'] = (f"{'equivalent' if out['equivalent'] else 'equivalence not shown'}: the {1 - 2 * alpha:.0%} "
                   f"interval of the ratio is [{ci_ratio[0]:.3g}, {ci_ratio[1]:.3g}], margin "
                   f"[{1 - margin:.3g}, {1 + margin:.3g}]")
    return out


def exchangeability_test(d, ia, ib, contrast='shift', n_resamples=N_PERMUTATIONS, seed=SEED):
    """Permutation test over trial labels; d: pair matrix over the pooled trials, ia, ib: the
    two groups' indices (>= 2 each). Null hypothesis: the two groups' trials are exchangeable,
    i.e. come from one distribution, in location and in spread alike.

    contrast 'shift' (the prediction-shift test): mean PD between the groups minus the mean of
    the two within-group means, one-sided: do the two groups predict differently at all?
    contrast 'spread' (what this project used to call its reproducibility test): within a minus
    within b, two-sided. Both reject when two equally reproducible groups predict differently,
    since that breaks exchangeability; neither is a test of reproducibility (dispersion_test is)."""
    ia, ib = np.asarray(ia), np.asarray(ib)
    if min(len(ia), len(ib)) < 2:
        return None

    def statistic(x, y, axis=-1):
        x = np.moveaxis(np.asarray(x), axis, -1).astype(np.intp)
        y = np.moveaxis(np.asarray(y), axis, -1).astype(np.intp)
        wa, wb = mean_over_distinct_pairs(d, x), mean_over_distinct_pairs(d, y)
        if contrast == 'spread':
            return wa - wb
        return d[x[..., :, None], y[..., None, :]].mean((-2, -1)) - (wa + wb) / 2

    if contrast not in ('shift', 'spread'):
        raise ValueError(f"contrast {contrast!r}; valid: shift, spread")
    out = _permutation(ia, ib, statistic, 'greater' if contrast == 'shift' else 'two-sided', n_resamples, seed)
    out['method'] = ("permutation test over trial labels (null: the two groups' trials are exchangeable) of "
                     + ("mean relative PD between the groups minus within them, one-sided" if contrast == 'shift'
                        else "the difference in mean within-group relative PD, two-sided"))
    return out


def difference_interval(a, b, confidence=CONFIDENCE):
    """b - a for two independent groups of trials, with a Welch t-interval: a and b are either
    per-trial values (a mean over trials) or [T, T] pair matrices (a mean over pairs: jackknife
    standard errors from pseudo_values). {'difference', 'ci', 'ci_method', 'ci_note'}; no
    interval below MIN_TRIALS_FOR_CI trials on a side, and the note says so."""
    out = {'difference': None, 'ci': None, 'ci_method': None, 'ci_note': None}
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    pairs = a.ndim == 2
    if pairs:  # the mean over distinct pairs (any T >= 2)
        ua, ub = (float(np.triu(d, 1).sum() / math.comb(len(d), 2)) for d in (a, b))
        out['difference'] = ub - ua
    else:
        out['difference'] = float(b.mean() - a.mean())
    n = min(len(a), len(b))
    if n < MIN_TRIALS_FOR_CI:
        out['ci_note'] = f"no interval possible: {n} trial(s) on one side; an interval needs at least {MIN_TRIALS_FOR_CI}"
        return out
    pa, pb = (pseudo_values(a), pseudo_values(b)) if pairs else (a, b)
    va, vb = pa.var(ddof=1) / len(pa), pb.var(ddof=1) / len(pb)
    df = _welch_df(va, len(pa) - 1, vb, len(pb) - 1)
    out.update(ci=_t_interval(out['difference'], math.sqrt(va + vb), df, confidence),
               ci_method=f"Welch t-interval ({df:.1f} df) from " + ("jackknife standard errors over trials"
                                                                    if pairs else "the trials' values"))
    return out


def holm(p_values):
    """Holm's step-down adjustment of a list of p-values (None entries are skipped and stay
    None): controls the family-wise error rate over the list's tests."""
    idx = sorted((i for i, p in enumerate(p_values) if p is not None), key=lambda i: p_values[i])
    out, running = list(p_values), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (len(idx) - rank) * p_values[i]))
        out[i] = running
    return out


def holm_in_place(results):
    """Holm over a list of test results (dicts with 'p_value'; None entries and p None are
    skipped): sets each one's 'p_value_holm'. The one place the correction is applied."""
    tested = [r for r in results if r and r.get('p_value') is not None]
    for r, p in zip(tested, holm([r['p_value'] for r in tested])):
        r['p_value_holm'] = p


# ----------------------------------------------------------------------------- over training, and a yardstick

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
    d_early, d_late = _check_pair_matrix(d_early, 'early snapshot'), _check_pair_matrix(d_late, 'late snapshot')
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
            'difference': diff, 'ci': _t_interval(diff, se, t - 1, confidence),
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


# ============================================================================= FFN study: best-of-k
# The mnist_ffn design (designs.py) trains every cell of a (width x batch size x learning rate)
# grid with the same seeds; ffn_report.build_ffn_summary feeds these.

def expected_best_of_k(val, test, ks):
    """Exact expectation of best-of-k random search over a set of finished runs.

    val, test: [..., N] validation and test accuracy of N runs (NaN val: a run that failed).
    A search draws k runs independently and uniformly, with replacement (a random search
    over a grid draws its configurations independently), and keeps the one with the best
    validation accuracy; tied runs are kept with equal probability, and a failed run is
    never kept. Returns (E[val of the kept run], E[test of the kept run]), each [..., len(ks)],
    from the order statistics of the runs: a tie group [lo, hi] of the ascending sort holds
    the best draw with probability ((hi+1)/N)^k - (lo/N)^k, shared equally by its runs.
    Both are conditional on at least one of the k draws having finished (probability
    1 - (failed/N)^k); NaN if no run finished."""
    val, test = np.asarray(val, dtype=np.float64), np.asarray(test, dtype=np.float64)
    ks = np.asarray(ks, dtype=np.float64)
    if val.shape != test.shape or val.ndim < 1 or val.shape[-1] == 0:
        raise ValueError(f"need val and test of one shape [..., runs], got {val.shape} and {test.shape}")
    if ks.ndim != 1 or not len(ks) or (ks < 1).any() or (ks != np.round(ks)).any():
        raise ValueError(f"ks must be integers >= 1, got {ks.tolist()}")
    if np.isnan(test[~np.isnan(val)]).any():
        raise ValueError("a finished run (finite val) has no test accuracy")
    n = val.shape[-1]
    key = np.where(np.isnan(val), -np.inf, val)
    order = np.argsort(key, axis=-1, kind='stable')
    s, t = np.take_along_axis(key, order, -1), np.take_along_axis(test, order, -1)
    idx = np.arange(n)
    new = np.ones(s.shape, bool)
    new[..., 1:] = s[..., 1:] != s[..., :-1]           # first run of a tie group
    last = np.ones(s.shape, bool)
    last[..., :-1] = new[..., 1:]                       # last run of a tie group
    lo = np.maximum.accumulate(np.where(new, idx, 0), axis=-1)
    hi = np.flip(np.minimum.accumulate(np.flip(np.where(last, idx, n - 1), -1), axis=-1), -1)
    kk = ks[:, None]
    w = (((hi + 1) / n)[..., None, :] ** kk - (lo / n)[..., None, :] ** kk) / (hi - lo + 1)[..., None, :]
    failed = np.isinf(s)[..., None, :]
    w = np.where(failed, 0.0, w)
    norm = w.sum(-1)
    with np.errstate(invalid='ignore', divide='ignore'):
        ev = (w * np.where(failed, 0.0, s[..., None, :])).sum(-1) / norm
        et = (w * np.where(failed, 0.0, t[..., None, :])).sum(-1) / norm
    return np.where(norm > 0, ev, np.nan), np.where(norm > 0, et, np.nan)


def best_of_k_bootstrap(val, test, ks, n_resamples=N_RESAMPLES, seed=SEED, block=250):
    """expected_best_of_k for M models on a grid of C cells x S seeds, and its bootstrap.

    val, test: [M, C, S]; seed s of every cell and every model is the same trial seed, so the
    seed is the unit that varies independently: a resample draws S seed indices with
    replacement and uses them in every cell and for every model (paired across models and
    cells). Returns {'val', 'test': [M, K] on the data; 'val_boot', 'test_boot': [M, B, K]}."""
    val, test = np.asarray(val, dtype=np.float64), np.asarray(test, dtype=np.float64)
    if val.ndim != 3 or val.shape != test.shape:
        raise ValueError(f"need val and test of shape [models, cells, seeds], got {val.shape} and {test.shape}")
    m, c, s = val.shape
    ev, et = expected_best_of_k(val.reshape(m, c * s), test.reshape(m, c * s), ks)
    idx = np.random.default_rng(seed).integers(0, s, size=(n_resamples, s))
    vb, tb = [], []
    for b in range(0, n_resamples, block):  # bounded memory: [M, block, K, C*S] weights at a time
        i = idx[b:b + block]
        rv = val[:, :, i].transpose(0, 2, 1, 3).reshape(m, len(i), c * s)
        rt = test[:, :, i].transpose(0, 2, 1, 3).reshape(m, len(i), c * s)
        v, t = expected_best_of_k(rv, rt, ks)
        vb.append(v)
        tb.append(t)
    return {'val': ev, 'test': et, 'val_boot': np.concatenate(vb, 1), 'test_boot': np.concatenate(tb, 1)}


def percentile_interval(samples, confidence=CONFIDENCE, axis=0):
    """Percentile interval [lo, hi] of bootstrap samples along `axis` (NaN samples left out)."""
    q = [50 * (1 - confidence), 50 * (1 + confidence)]
    return np.nanpercentile(np.asarray(samples, dtype=np.float64), q, axis=axis)
