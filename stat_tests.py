"""
Tests between two groups of trials: the dispersion test (is one group's spread larger?), the
equivalence test (equally reproducible within a margin?), the exchangeability test (do the
groups predict differently?), the difference of two means with its interval, and Holm's
correction over a family. Permutation tests over trials, never over pairs. Pure numpy/scipy.
"""
import functools
import itertools
import math

import numpy as np
from scipy import stats

from intervals import check_pair_matrix, loo_means, mean_over_distinct_pairs, pseudo_values, t_interval, trial_diagnostics
from stat_settings import ALPHA, CONFIDENCE, EQUIVALENCE_MARGIN, MIN_TRIALS_FOR_CI, N_PERMUTATIONS, POWER, SEED


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
    d_a, d_b = check_pair_matrix(d_a, 'group a'), check_pair_matrix(d_b, 'group b')
    if min(len(d_a), len(d_b)) < 3:
        raise ValueError("a dispersion test needs at least 3 trials per group")
    pa, pb = pseudo_values(d_a), pseudo_values(d_b)
    va, vb = pa.var(ddof=1) / len(pa), pb.var(ddof=1) / len(pb)
    df, se = _welch_df(va, len(pa) - 1, vb, len(pb) - 1), math.sqrt(va + vb)
    diff = float(pa.mean() - pb.mean())
    out = {'difference': diff, 'ratio': float(pa.mean() / pb.mean()) if pb.mean() > 0 else None,
           'ci': t_interval(diff, se, df, confidence),
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
    d_a, d_b = check_pair_matrix(d_a, 'group a'), check_pair_matrix(d_b, 'group b')
    out = {'equivalent': None, 'margin': margin, 'ratio': None, 'ci': None, 'ci_ratio': None, 'p_value': None,
           'note': None, 'method': f"two one-sided tests on log(mean a / mean b), jackknife SEs, each at {alpha}"}
    if not 0 < margin < 1:
        raise ValueError(f"equivalence margin {margin!r}: must lie in (0, 1), relative to the baseline's mean")
    if min(len(d_a), len(d_b)) < 3:
        out['note'] = "no equivalence test: it needs at least 3 trials per group"
        return out
    (ua, la), (ub, lb) = loo_means(d_a), loo_means(d_b)
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
    ci_ratio = np.exp(t_interval(est, se, df, 1 - 2 * alpha)).tolist()
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
    out.update(ci=t_interval(out['difference'], math.sqrt(va + vb), df, confidence),
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
