"""
How much trials' predictions on the same evaluation set disagree, and the statistics over
trials that go with it. Pure numpy/scipy: no torch.

Every metric takes two arrays of probability rows [..., n, C] (softmax outputs) and reduces
the last two axes, so one function serves a single pair ([n, C] each) and all pairs of a
stack at once ([n_pairs, n, C] each). Arithmetic is float64: float32 sums over ~65k
elements lose the digits that small disagreements live in.

To add a per-pair metric, write f(p1, p2) below and add it to PAIR_METRICS: the analysis,
summary.json and the report take their list of metrics from there.
"""
import math

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05             # level of the tests, after the Holm correction
POWER = 0.8              # power at which the minimum detectable difference is quoted
N_PERMUTATIONS = 9999    # permutation tests: exact enumeration when there are fewer distinct splits
SEED = 0                 # fixed, so the same files give the same p-values
N_RESAMPLES = 2000       # seed bootstrap of the FFN study's best-of-k (best_of_k_bootstrap)
# Fewest trials from which an interval is given (below: ci None and a note saying why). The
# jackknife needs 3; tests/test_calibration.py's simulations (figures in the README, "The
# analysis") show its 95% intervals covering the truth in >= 90% of studies from 3 trials on.
MIN_TRIALS_FOR_CI = 3
# relative_pd_elementwise counts probabilities below this as this (see there)
ELEMENTWISE_FLOOR = 1e-3


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


def total_variation(p1, p2):
    """Mean over rows of 0.5 * sum_c |p1 - p2| (equal to relative_pd for probability rows)."""
    p1, p2 = _rows(p1, p2)
    return 0.5 * np.abs(p1 - p2).sum(-1).mean(-1)


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
    total, row = np.triu(d, 1).sum(), d.sum(1) - np.diag(d)
    return 2 * row / (t - 2) - 2 * total / ((t - 1) * (t - 2))


def _t_interval(mean, se, df, confidence):
    h = stats.t.ppf(0.5 + confidence / 2, df) * se
    return [float(mean - h), float(mean + h)]


def pairwise_interval(d, confidence=CONFIDENCE):
    """Mean of a pairwise metric over the distinct pairs of T trials with a leave-one-trial-out
    jackknife t-interval (T - 1 df): {'mean', 'ci', 'ci_method', 'ci_note'}."""
    t = len(d)
    out = {'mean': float(np.triu(d, 1).sum() / math.comb(t, 2)) if t >= 2 else None,
           'ci': None, 'ci_method': None, 'ci_note': None}
    if t < MIN_TRIALS_FOR_CI:
        out['ci_note'] = interval_note(t)
        return out
    psi = pseudo_values(d)
    out.update(ci=_t_interval(out['mean'], psi.std(ddof=1) / math.sqrt(t), t - 1, confidence),
               ci_method=f'leave-one-trial-out jackknife t-interval, {t - 1} df')
    return out


def describe(values, confidence=CONFIDENCE):
    """n, mean, sample std (ddof=1; None below 2 values) and a t-interval of the mean over
    trials (None below MIN_TRIALS_FOR_CI, with ci_note saying why)."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    out = {'n': n, 'mean': float(v.mean()) if n else None, 'std': float(v.std(ddof=1)) if n >= 2 else None,
           'ci': None, 'ci_method': None, 'ci_note': None}
    if n < MIN_TRIALS_FOR_CI:
        out['ci_note'] = interval_note(n)
        return out
    out.update(ci=_t_interval(out['mean'], out['std'] / math.sqrt(n), n - 1, confidence),
               ci_method=f't-interval over trials, {n - 1} df')
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


def dispersion_test(d_a, d_b, n_resamples=N_PERMUTATIONS, confidence=CONFIDENCE, seed=SEED):
    """Are group a's trials more or less spread than group b's? d_a, d_b: each group's *own*
    pair matrix (e.g. relative PD), so it stays valid when the two groups predict differently.

    A dispersion test in the manner of PERMDISP (Anderson 2006): every trial gets a dispersion
    value and a permutation test compares those values between the groups. PERMDISP's value
    (distance to the group's mean prediction) shares the mean's noise among a group's trials,
    which made its permutation test reject 7-14% of equal-spread cases at alpha 0.05 in
    tests/test_calibration.py's simulations; the jackknife pseudo-values of the mean pairwise
    distance (pseudo_values) carry no such shared term and held the level. So: the difference
    of the two mean pairwise distances (= of the pseudo-values' means), a Welch t-interval from
    the pseudo-values (= jackknife standard errors), a two-sided permutation test of the Welch
    t statistic of the pseudo-values over group labels, and the minimum detectable difference
    (at ALPHA, power POWER; None where no p-value can reach ALPHA). Needs 3 trials per group."""
    if min(len(d_a), len(d_b)) < 3:
        raise ValueError("a dispersion test needs at least 3 trials per group")
    pa, pb = pseudo_values(d_a), pseudo_values(d_b)
    va, vb = pa.var(ddof=1) / len(pa), pb.var(ddof=1) / len(pb)
    df, se = _welch_df(va, len(pa) - 1, vb, len(pb) - 1), math.sqrt(va + vb)
    diff = float(pa.mean() - pb.mean())
    out = {'difference': diff, 'ci': _t_interval(diff, se, df, confidence),
           'ci_method': f'jackknife standard errors of both groups, Welch t-interval, {df:.1f} df'}
    out.update(_permutation(pa, pb, _welch_t, 'two-sided', n_resamples, seed))
    out['min_detectable_difference'] = None if out['min_p_value'] > ALPHA else float(
        (stats.t.ppf(1 - ALPHA / 2, df) + stats.t.ppf(POWER, df)) * se)
    out['method'] = ("dispersion test: leave-one-trial-out jackknife pseudo-values of each group's mean pairwise "
                     "relative PD, two-sided permutation test of their Welch t statistic over group labels")
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
