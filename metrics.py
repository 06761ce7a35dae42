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

MIN_TRIALS_FOR_CI = 3    # with fewer trials a bootstrap over trials has (almost) nothing to resample
N_RESAMPLES = 2000       # bootstrap resamples
N_PERMUTATIONS = 9999    # permutation test: exact enumeration when there are fewer distinct splits
CONFIDENCE = 0.95
SEED = 0                 # fixed, so the same files give the same intervals and p-values


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


def relative_pd_elementwise(p1, p2):
    """Mean over examples and classes of 2|p1 - p2| / (p1 + p2), 0 where both are 0: the
    per-element relative PD of Shamir et al. Weighs disagreement on unlikely classes as much
    as on likely ones; in [0, 2]."""
    p1, p2 = _rows(p1, p2)
    s = p1 + p2
    with np.errstate(divide='ignore', invalid='ignore'):
        r = np.where(s > 0, 2 * np.abs(p1 - p2) / s, 0.0)
    return r.mean((-2, -1))


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

def mean_over_distinct_pairs(d, idx):
    """Mean of d[a, b] over the position pairs of each row of idx [..., k] that hold two
    different trials; nan for a row holding one trial only.

    A bootstrap resample draws trials with replacement, so it can hold the same trial twice.
    Such a pair compares a trial with itself and would add a 0 that no real pair of trials
    produces, biasing the mean down; it is left out, and the rest of the resample counts."""
    a, b = idx[..., :, None], idx[..., None, :]
    distinct = a != b
    n = distinct.sum((-2, -1))
    total = (d[a, b] * distinct).sum((-2, -1))
    with np.errstate(divide='ignore', invalid='ignore'):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def _percentile_ci(samples, confidence):
    samples = samples[~np.isnan(samples)]  # resamples that drew a single trial have no pair
    lo, hi = np.percentile(samples, [50 * (1 - confidence), 50 * (1 + confidence)])
    return [float(lo), float(hi)]


def no_interval(n):
    return f"no interval possible: {n} trial(s), need at least {MIN_TRIALS_FOR_CI}"


def bootstrap_pairwise_ci(d, n_resamples=N_RESAMPLES, confidence=CONFIDENCE, seed=SEED):
    """Percentile interval of the mean pairwise metric from a bootstrap over trials: resample
    trial indices with replacement, recompute the mean over pairs of distinct trials (see
    mean_over_distinct_pairs). d: [T, T] pair matrix. None with fewer than 3 trials.
    (Own loop, not scipy.stats.bootstrap: scipy cannot drop the resamples that hold no pair.)"""
    t = len(d)
    if t < MIN_TRIALS_FOR_CI:
        return None
    idx = np.random.default_rng(seed).integers(0, t, size=(n_resamples, t))
    return _percentile_ci(mean_over_distinct_pairs(d, idx), confidence)


def bootstrap_difference_ci(d, ia, ib, n_resamples=N_RESAMPLES, confidence=CONFIDENCE, seed=SEED):
    """Interval of (mean pairwise metric within group a) - (within group b), resampling each
    group's trials independently. d: pair matrix over the pooled trials; ia, ib: their indices.
    None unless both groups have at least 3 trials."""
    ia, ib = np.asarray(ia), np.asarray(ib)
    if min(len(ia), len(ib)) < MIN_TRIALS_FOR_CI:
        return None
    rng = np.random.default_rng(seed)
    ra = ia[rng.integers(0, len(ia), size=(n_resamples, len(ia)))]
    rb = ib[rng.integers(0, len(ib), size=(n_resamples, len(ib)))]
    return _percentile_ci(mean_over_distinct_pairs(d, ra) - mean_over_distinct_pairs(d, rb), confidence)


def permutation_test(d, ia, ib, n_resamples=N_PERMUTATIONS, seed=SEED):
    """Two-sided p-value for (mean pairwise metric within a) - (within b) from permuting trial
    labels between the groups (scipy.stats.permutation_test; exact enumeration of all splits
    when there are at most n_resamples). Null hypothesis: the trials of the two groups are
    exchangeable. Needs at least 2 trials per group (else there is no within-group pair)."""
    ia, ib = np.asarray(ia), np.asarray(ib)
    if min(len(ia), len(ib)) < 2:
        return None

    def statistic(x, y, axis=-1):
        x = np.moveaxis(np.asarray(x), axis, -1).astype(np.intp)
        y = np.moveaxis(np.asarray(y), axis, -1).astype(np.intp)
        return mean_over_distinct_pairs(d, x) - mean_over_distinct_pairs(d, y)

    res = stats.permutation_test((ia, ib), statistic, permutation_type='independent', vectorized=True,
                                 n_resamples=n_resamples, alternative='two-sided',
                                 random_state=np.random.default_rng(seed))
    n_splits = math.comb(len(ia) + len(ib), len(ia))
    exact = n_splits <= n_resamples
    return {'p_value': float(res.pvalue), 'exact': exact,
            'n_permutations': n_splits if exact else n_resamples}


def describe(values, n_resamples=N_RESAMPLES, confidence=CONFIDENCE, seed=SEED):
    """n, mean, sample std (ddof=1; None below 2 values) and a percentile bootstrap interval of
    the mean (scipy.stats.bootstrap; None below 3 values, with ci_note saying why)."""
    v = np.asarray(values, dtype=np.float64)
    out = {'n': len(v), 'mean': float(v.mean()) if len(v) else None,
           'std': float(v.std(ddof=1)) if len(v) >= 2 else None, 'ci': None, 'ci_note': None}
    if len(v) < MIN_TRIALS_FOR_CI:
        out['ci_note'] = no_interval(len(v))
        return out
    res = stats.bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                          method='percentile', vectorized=True, random_state=np.random.default_rng(seed))
    out['ci'] = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
    return out


# ============================================================================= FFN study: best-of-k
# The mnist_ffn design (run_all_experiments.py) trains every cell of a (width x batch size x
# learning rate) grid with the same seeds; analyze_results.build_ffn_summary feeds these.

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
