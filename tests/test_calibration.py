"""Calibration of the statistics (intervals.py, stat_tests.py, snapshot_stats.py) on simulated studies whose truth is known.

A simulated trial is softmax(consensus logits + s_t * noise): one consensus per evaluation row,
noise independent per trial, row and class, and a noise scale s_t = SIGMA * exp(tau * N(0, 1))
that varies from trial to trial (tau: how unequal trials are; the pair values of the README's
main job suggest tau ~0.05-0.2). An activation whose consensus is a relabelling of another's
classes is exactly as reproducible, but predicts differently. Two harder kinds of trial noise
(issue 23): 't3', a heavy-tailed noise scale SIGMA exp(TAU_T3 t_3) (t with 3 df), and
'outliers', where each trial independently has 4x the noise scale with probability 0.1 (a seed
that trains into another basin).

    python tests/test_calibration.py [studies]   # the figures in docs/analysis.md (more studies; minutes)
    python benchmarks/calibration.py             # before / after table of issue 23's scenarios
"""
import functools
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import intervals  # noqa: E402
import pairwise  # noqa: E402
import snapshot_stats  # noqa: E402
import stat_settings  # noqa: E402
import stat_tests  # noqa: E402

N_ROWS, N_CLASSES, SIGMA, TAU = 48, 12, 0.5, 0.2
N_RESAMPLES = 199        # permutations per simulated test: enough for a rejection rate at 0.05
TAU_T3 = 0.4             # 't3' noise: at 0.2 the old linear interval already held 0.92
OUTLIER_P, OUTLIER_SCALE = 0.1, 4.0
NOISES = ('normal', 't3', 'outliers')


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


CONSENSUS = 2.0 * np.random.default_rng(0).normal(size=(N_ROWS, N_CLASSES))
RELABEL = np.random.default_rng(1).permutation(N_CLASSES)


def noise_scales(rng, shape, scale=1.0, tau=TAU, noise='normal'):
    """Per-trial noise scales [*shape, 1, 1] of one of NOISES, and which trials are outliers [*shape]."""
    if noise not in NOISES:
        raise ValueError(f"noise {noise!r}; valid: {', '.join(NOISES)}")
    shape = tuple(np.atleast_1d(shape)) + (1, 1)
    if noise == 't3':
        return SIGMA * scale * np.exp(TAU_T3 * rng.standard_t(3, size=shape)), np.zeros(shape[:-2], bool)
    s = SIGMA * scale * np.exp(tau * rng.normal(size=shape))
    out = rng.random(shape) < OUTLIER_P if noise == 'outliers' else np.zeros(shape, bool)
    return s * np.where(out, OUTLIER_SCALE, 1.0), out[..., 0, 0]


def group(rng, n, scale=1.0, tau=TAU, relabel=False, noise='normal', outliers=False):
    """Trials [*n, N_ROWS, N_CLASSES] of one activation (n: a count, or a shape such as
    (studies, trials)); relabel: the consensus's classes permuted. outliers: also return which
    trials are outliers [*n]."""
    z = CONSENSUS[:, RELABEL] if relabel else CONSENSUS
    s, out = noise_scales(rng, n, scale, tau, noise)
    p = softmax(z + s * rng.normal(size=s.shape[:-2] + (N_ROWS, N_CLASSES)))
    return (p, out) if outliers else p


def pd_matrix(stack):
    pairs, v = pairwise.pairwise(stack, {'relative_pd': pairwise.relative_pd})
    return pairwise.pair_matrix(len(stack), pairs, v['relative_pd'])


def pd_matrices(stacks, metric=pairwise.relative_pd):
    """Pair matrices [S, T, T] of S studies of T trials each ([S, T, n, C]), vectorised over studies."""
    s, t = stacks.shape[:2]
    d = np.zeros((s, t, t))
    for i in range(t - 1):
        v = metric(np.broadcast_to(stacks[:, i:i + 1], stacks[:, i + 1:].shape), stacks[:, i + 1:])
        d[:, i, i + 1:], d[:, i + 1:, i] = v, v
    return d


@functools.lru_cache(maxsize=None)
def true_mean_pd(scale=1.0, tau=TAU, n_pairs=4000, seed=99, noise='normal', metric='relative_pd'):
    """The cell's mean pair value between two independent trials, by Monte Carlo (outliers:
    more pairs, since 1 pair in 5 holds one)."""
    rng = np.random.default_rng(seed)
    n_pairs = n_pairs * (5 if noise != 'normal' else 1)
    a, b = group(rng, n_pairs, scale, tau, noise=noise), group(rng, n_pairs, scale, tau, noise=noise)
    return float(pairwise.PAIR_METRICS[metric](a, b).mean())


# ----------------------------------------------------------------------------- the simulations

def coverage(n, studies, tau=TAU, seed=2, noise='normal', scale='logit', metric='relative_pd'):
    """Fraction of simulated studies whose 95% interval of the cell's mean pair value holds the truth."""
    return coverage_stats(n, studies, tau, seed, noise, (scale,), metric)[scale]['coverage']


def coverage_stats(n, studies, tau=TAU, seed=2, noise='normal', scales=('linear', 'log'), metric='relative_pd'):
    """Per interval scale: 'coverage' of the truth; 'flagged', the fraction of studies whose
    interval is marked unreliable (an outlier trial named); 'covered_or_flagged'; and, for
    noise 'outliers': 'with_outlier' (studies holding >= 1 outlier trial), 'flagged_given_outlier',
    'coverage_clean' (of the truth without outliers, in studies holding none), 'outside_bounds'
    (intervals leaving [0, 1]). The studies are the same for every scale."""
    truth, rng = true_mean_pd(tau=tau, noise=noise, metric=metric), np.random.default_rng(seed)
    probs, out = group(rng, (studies, n), tau=tau, noise=noise, outliers=True)
    d = pd_matrices(probs, pairwise.PAIR_METRICS[metric])
    has = out.any(1)
    clean = true_mean_pd(tau=tau, metric=metric)
    res = {}
    for scale in scales:
        r = [intervals.pairwise_interval(x, scale=scale) for x in d]
        lo, hi = np.array([x['ci'] for x in r]).T
        hit, flag = (lo <= truth) & (truth <= hi), np.array([not x['ci_reliable'] for x in r])
        res[scale] = {'coverage': hit.mean(), 'flagged': flag.mean(), 'covered_or_flagged': (hit | flag).mean(),
                      'outside_bounds': ((lo < 0) | (hi > 1)).mean(), 'with_outlier': has.mean(),
                      'flagged_given_outlier': flag[has].mean() if has.any() else None,
                      'coverage_clean': ((lo <= clean) & (clean <= hi))[~has].mean()
                      if noise == 'outliers' and (~has).any() else None}
    return res


def rejection_rates(n, studies, scale=1.0, tau=TAU, seed=3, alpha=stat_settings.ALPHA):
    """Fraction of simulated studies (baseline: n trials; activation: n trials, noise x scale,
    consensus relabelled) in which each test rejects at alpha: dispersion, exchangeability with
    the 'spread' contrast (the old reproducibility test), prediction shift, and PERMDISP's
    distances to the group centroid (the design dispersion_test improves on)."""
    rng = np.random.default_rng(seed)
    idx_a, idx_b = np.arange(n), np.arange(n, 2 * n)
    out = dict.fromkeys(('dispersion', 'spread', 'shift', 'centroid'), 0)
    for k in range(studies):
        base, act = group(rng, n), group(rng, n, scale, tau, relabel=True)
        d = pd_matrix(np.concatenate([act, base]))
        p = {'dispersion': stat_tests.dispersion_test(d[:n, :n], d[n:, n:], N_RESAMPLES, seed=k)['p_value'],
             'spread': stat_tests.exchangeability_test(d, idx_a, idx_b, 'spread', N_RESAMPLES, seed=k)['p_value'],
             'shift': stat_tests.exchangeability_test(d, idx_a, idx_b, 'shift', N_RESAMPLES, seed=k)['p_value'],
             'centroid': centroid_test(act, base, seed=k)}
        for key, v in p.items():
            out[key] += v <= alpha
    return {k: v / studies for k, v in out.items()}


def dispersion_rates(n, studies, scale=1.0, noise='normal', seed=3, m=1, alpha=stat_settings.ALPHA, n_resamples=N_RESAMPLES):
    """Rejection rates at alpha / m of the dispersion test as it was ('before': Welch t of the
    pseudo-values of the mean PD) and as it is ('after': of the mean squared PD), baseline n
    trials against an activation of n trials with noise x scale and relabelled consensus."""
    rng = np.random.default_rng(seed)
    da = pd_matrices(group(rng, (studies, n), scale, relabel=True, noise=noise))
    db = pd_matrices(group(rng, (studies, n), noise=noise))
    before = [stat_tests._welch_permutation(intervals.pseudo_values(a), intervals.pseudo_values(b), n_resamples, k)['p_value']
              for k, (a, b) in enumerate(zip(da, db))]
    after = [stat_tests.dispersion_test(a, b, n_resamples, seed=k, detectable=False)['p_value']
             for k, (a, b) in enumerate(zip(da, db))]
    return {'before': float(np.mean(np.array(before) <= alpha / m)), 'after': float(np.mean(np.array(after) <= alpha / m))}


def old_min_detectable(d_a, d_b):
    """The former figure: the normal approximation (t quantiles) at ALPHA and POWER, before Holm."""
    pa, pb = intervals.pseudo_values(d_a), intervals.pseudo_values(d_b)
    va, vb = pa.var(ddof=1) / len(pa), pb.var(ddof=1) / len(pb)
    df = stat_tests._welch_df(va, len(pa) - 1, vb, len(pb) - 1)
    return (stat_tests.stats.t.ppf(1 - stat_settings.ALPHA / 2, df) + stat_tests.stats.t.ppf(stat_settings.POWER, df)) * math.sqrt(va + vb)


def scale_for(target, ratio=False, tau=TAU):
    """Noise scale of the activation at which its true mean PD is baseline + target (ratio:
    baseline x target), by interpolation on a grid of Monte Carlo truths."""
    grid = np.linspace(0.5, 3.0, 26)
    truths = np.array([true_mean_pd(g, tau, n_pairs=1500) for g in grid])
    base = true_mean_pd(1.0, tau, n_pairs=1500)
    want = base * target if ratio else base + target
    return float(np.interp(want, truths, grid))


def mdd_power(n, studies, m=1, seed=6):
    """Real power of the dispersion test at the minimum detectable difference it quotes: the
    median figure quoted over equal-spread studies becomes the true difference of a second set
    of studies. Returns {'before': (figure, power at alpha / m), 'after': (figure, power at
    alpha / m)}: the former figure was quoted at alpha, before Holm. Permutations: enough for
    p-values down to alpha / m."""
    n_res = max(N_RESAMPLES, int(20 * m / stat_settings.ALPHA) - 1)
    rng = np.random.default_rng(seed)
    null = [pd_matrices(group(rng, (studies, n), relabel=r)) for r in (True, False)]
    quoted = {'before': np.median([old_min_detectable(a, b) for a, b in zip(*null)])}
    if stat_tests.smallest_p(n, n, 2, n_res) > stat_settings.ALPHA / m:   # nothing detectable after Holm
        return {'before': (float(quoted['before']), 0.0), 'after': (None, None)}
    quoted['after'] = np.median([stat_tests.dispersion_test(a, b, n_res, m=m)['min_detectable_difference']
                                 for a, b in zip(null[0][:50], null[1][:50])])   # 50: each figure is a simulation
    out = {}
    for key in ('before', 'after'):
        r = dispersion_rates(n, studies, scale_for(quoted[key]), seed=seed + 1, m=m, n_resamples=n_res)
        out[key] = (float(quoted[key]), r[key])
    return out


def equivalence_rate(n, studies, ratio, margin=stat_settings.EQUIVALENCE_MARGIN, seed=7):
    """Fraction of studies declared equivalent when the activation's true mean PD is ratio x the baseline's."""
    rng = np.random.default_rng(seed)
    da = pd_matrices(group(rng, (studies, n), scale_for(ratio, ratio=True), relabel=True))
    db = pd_matrices(group(rng, (studies, n)))
    return float(np.mean([stat_tests.equivalence_test(a, b, margin)['equivalent'] for a, b in zip(da, db)]))


def snapshot_rates(n, studies, late_scale, rho=0.7, seed=9):
    """Paired snapshots of the same trials: early noise e, late noise rho e + sqrt(1 - rho^2) e'
    with the trial's noise scale x late_scale. Returns the fraction of studies whose interval
    holds the true change, that reject at ALPHA, and that reject with the right sign."""
    rng = np.random.default_rng(seed)
    s, _ = noise_scales(rng, (studies, n))
    e1 = rng.normal(size=(studies, n, N_ROWS, N_CLASSES))
    e2 = rho * e1 + math.sqrt(1 - rho ** 2) * rng.normal(size=e1.shape)
    d1, d2 = pd_matrices(softmax(CONSENSUS + s * e1)), pd_matrices(softmax(CONSENSUS + late_scale * s * e2))
    truth = true_mean_pd(late_scale) - true_mean_pd(1.0)
    res = [snapshot_stats.paired_snapshot_comparison(a, b) for a, b in zip(d1, d2)]
    hit = np.mean([r['ci'][0] <= truth <= r['ci'][1] for r in res])
    rej = np.array([r['p_value'] <= stat_settings.ALPHA for r in res])
    right = np.mean(rej & (np.sign([r['difference'] for r in res]) == np.sign(truth)))
    return {'coverage': float(hit), 'rejections': float(rej.mean()), 'right_sign': float(right), 'truth': truth}


def accuracy_coverage(n, studies, seed=10, bounds=(0, 1)):
    """Coverage of describe()'s interval of the mean per-trial accuracy (top-1 = the consensus's
    top-1 on a noisy 'label'), and the fraction of intervals leaving [0, 1]; describe as it was
    (bounds None) or bounded."""
    rng = np.random.default_rng(seed)
    label = np.argmax(CONSENSUS + 1.5 * np.random.default_rng(11).normal(size=CONSENSUS.shape), -1)
    acc = (np.argmax(group(rng, (studies, n), 2.0), -1) == label).mean(-1)
    truth = (np.argmax(group(np.random.default_rng(12), 20000, 2.0), -1) == label).mean()
    cis = np.array([intervals.describe(a, bounds=bounds)['ci'] for a in acc])
    return {'coverage': float(np.mean((cis[:, 0] <= truth) & (truth <= cis[:, 1]))),
            'outside_bounds': float(np.mean((cis[:, 0] < 0) | (cis[:, 1] > 1))), 'truth': float(truth)}


def centroid_test(a, b, seed):
    """PERMDISP as published: each trial's relative PD to its group's mean prediction (x
    sqrt(n / (n - 1))), Welch t statistic permuted over labels."""
    z = [pairwise.relative_pd(g, np.broadcast_to(g.mean(0), g.shape)) * math.sqrt(len(g) / (len(g) - 1)) for g in (a, b)]
    return stat_tests._permutation(z[0], z[1], stat_tests._welch_t, 'two-sided', N_RESAMPLES, seed)['p_value']


def old_bootstrap_rates(studies, tau=TAU, seed=8):
    """What the former percentile bootstrap over 3 trials gave: its interval is [min pair, max
    pair] of the three pair values, and the difference's is [min a - max b, max a - min b].
    Returns (coverage of the truth, fraction of equal-spread studies whose difference excludes 0)."""
    truth, rng, iu = true_mean_pd(tau=tau), np.random.default_rng(seed), np.triu_indices(3, 1)
    cover = excl = 0
    for _ in range(studies):
        va = pd_matrix(group(rng, 3, tau=tau))[iu]
        vb = pd_matrix(group(rng, 3, tau=tau, relabel=True))[iu]
        cover += va.min() <= truth <= va.max()
        excl += va.min() > vb.max() or va.max() < vb.min()
    return cover / studies, excl / studies


# ----------------------------------------------------------------------------- tests

def test_relabelled_consensus_is_exactly_equally_reproducible():
    rng = np.random.default_rng(5)
    noise, s = rng.normal(size=(6, N_ROWS, N_CLASSES)), SIGMA * np.exp(TAU * rng.normal(size=(6, 1, 1)))
    a = softmax(CONSENSUS[None] + s * noise)
    b = softmax(CONSENSUS[:, RELABEL][None] + s * noise[..., RELABEL])   # the same trials, classes renamed
    np.testing.assert_allclose(b, a[..., RELABEL], rtol=1e-12)
    da, db = pd_matrix(a), pd_matrix(b)
    np.testing.assert_allclose(db, da, rtol=1e-12)
    res = stat_tests.dispersion_test(db, da)
    assert abs(res['difference']) < 1e-12 and res['p_value'] > 0.9
    # ... yet they predict differently: the prediction-shift test says so as strongly as 3 + 3 trials allow
    d = pd_matrix(np.concatenate([b, a]))
    shift = stat_tests.exchangeability_test(d, np.arange(6), np.arange(6, 12))
    assert shift['p_value'] == pytest.approx(shift['min_p_value'])


def test_interval_covers_the_truth_at_10_trials():
    assert coverage(10, 300) >= 0.90


def test_interval_covers_the_truth_from_min_trials_for_ci():
    # MIN_TRIALS_FOR_CI is where intervals start: they must be valid there already
    assert coverage(stat_settings.MIN_TRIALS_FOR_CI, 300) >= 0.90


def test_dispersion_test_false_positive_rate_under_equal_spread():
    # equally reproducible, different predictions: the dispersion test holds its level, while
    # every test of exchangeability rejects more often than alpha (the relabelling breaks it)
    r = rejection_rates(10, 600)
    assert r['dispersion'] <= 0.07
    assert r['spread'] >= 0.15 and r['shift'] >= 0.95


def test_dispersion_test_power_at_noise_ratio_1_6():
    assert rejection_rates(10, 200, scale=1.6, seed=4)['dispersion'] >= 0.8


# issue 23: heavy tails, rare outlier trials, bounds, minimum detectable difference, equivalence

@pytest.mark.parametrize('n', [3, 5, 10])
def test_interval_covers_the_truth_with_heavy_tailed_trial_noise(n):
    r = coverage_stats(n, 300, noise='t3', scales=('logit',))['logit']
    assert r['coverage'] >= 0.90 and r['outside_bounds'] == 0


def test_well_behaved_trials_keep_their_coverage_and_are_rarely_flagged():
    for n in (3, 10):
        r = coverage_stats(n, 300, scales=('logit',))['logit']
        assert 0.92 <= r['coverage'] <= 0.98 and r['flagged'] <= 0.05


@pytest.mark.parametrize('n', [3, 5, 10])
def test_outlier_trials_are_named_and_clean_studies_keep_coverage(n):
    # No interval covers a mean that rare outliers move when the study holds none of them (0.9^n
    # of studies); what can hold: a study holding an outlier gets its interval marked unreliable
    # with the trial named, and a study holding none covers the mean among non-outlier seeds
    r = coverage_stats(n, 300, noise='outliers', scales=('logit',))['logit']
    assert r['flagged_given_outlier'] >= (0.8 if n == 3 else 0.95)
    assert r['coverage_clean'] >= 0.90 and r['outside_bounds'] == 0
    assert r['with_outlier'] == pytest.approx(1 - 0.9 ** n, abs=0.06)


@pytest.mark.parametrize('noise', ['t3', 'outliers'])
def test_dispersion_test_level_with_heavy_tails_and_outliers(noise):
    # both groups from one distribution (the activation's consensus relabelled): level <= 0.07
    for n in (5, 10):
        assert dispersion_rates(n, 600, noise=noise)['after'] <= 0.07


def test_top1_disagreement_interval_stays_in_bounds_and_covers():
    r = coverage_stats(3, 300, noise='outliers', scales=('linear', 'logit'), metric='top1_disagreement')
    assert r['logit']['outside_bounds'] == 0 and r['linear']['outside_bounds'] > 0
    assert coverage_stats(5, 300, scales=('logit',), metric='top1_disagreement')['logit']['coverage'] >= 0.90


def test_bounded_mean_accuracy_covers():
    r = accuracy_coverage(3, 300)
    assert r['coverage'] >= 0.90 and r['outside_bounds'] == 0


def test_equivalence_level_at_the_margin():
    # a true ratio exactly at the margin (1.1) is declared equivalent in <= 5% of studies
    for n in (3, 10):
        assert equivalence_rate(n, 300, 1 + stat_settings.EQUIVALENCE_MARGIN) <= 0.05


def test_paired_snapshots_level_coverage_and_sign():
    for n in (3, 10):
        flat = snapshot_rates(n, 200, 1.0)
        assert flat['rejections'] <= 0.07 and flat['coverage'] >= 0.90
    up, down = snapshot_rates(10, 200, 1.2), snapshot_rates(10, 200, 0.8)
    assert up['coverage'] >= 0.90 and up['right_sign'] >= 0.9 and down['right_sign'] >= 0.9 and down['truth'] < 0


def test_min_detectable_difference_power_after_holm_step():
    # the figure now quoted is larger than the old normal approximation's, and the test's real
    # power at it is closer to the claimed 0.8 (benchmarks/calibration.py: 0.71 at 5 + 5; the old figure's 0.62)
    r = mdd_power(5, 150)
    assert r['after'][0] > r['before'][0] and r['after'][1] >= 0.7 and r['after'][1] > r['before'][1]


# ----------------------------------------------------------------------------- docs/analysis.md figures

def figures(studies=1000):
    """The Markdown block of docs/analysis.md: coverage, false positives, power."""
    ns = (3, 5, 10, 20)
    lines = [f"Simulated studies ({N_ROWS} evaluation rows x {N_CLASSES} classes; {studies} studies per cell; "
             f"`python tests/test_calibration.py {studies}`):", "",
             "| | " + " | ".join(f"n = {n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for tau in (0.0, 0.15, 0.3):
        lines.append(f"| 95% interval of a cell's mean relative PD covers the truth, tau = {tau:g} | "
                     + " | ".join(f"{coverage(n, studies, tau):.3f}" for n in ns) + " |")
    null = {n: rejection_rates(n, studies) for n in ns}
    power = {s: {n: rejection_rates(n, studies, scale=s, seed=4) for n in ns} for s in (1.15, 1.6)}
    ratio = {s: true_mean_pd(s) / true_mean_pd() for s in power}
    rows = [('dispersion test, false-positive rate (equal spread, different predictions)', null, 'dispersion'),
            *[(f'dispersion test, power (noise {s:g}x: mean relative PD {ratio[s]:.2f}x)', power[s], 'dispersion')
              for s in power],
            ("PERMDISP's centroid distances, false-positive rate (not used)", null, 'centroid'),
            ("exchangeability test ('spread', the old test), rejections under equal spread", null, 'spread'),
            ('prediction-shift test, rejections under equal spread (predictions differ)', null, 'shift')]
    for label, res, key in rows:
        lines.append(f"| {label}, tau = {TAU:g} | " + " | ".join(f"{res[n][key]:.3f}" for n in ns) + " |")
    old = {tau: old_bootstrap_rates(studies, tau) for tau in (0.0, 0.15, 0.3)}
    lines += ["", "The former bootstrap at n = 3 (tau = 0, 0.15, 0.3): its 'interval' [min pair, max pair] covered the "
              f"truth in {', '.join(f'{c:.3f}' for c, _ in old.values())} of studies; its difference interval excluded "
              f"0 in {', '.join(f'{e:.3f}' for _, e in old.values())} of equal-spread studies."]
    return "\n".join(lines)


if __name__ == '__main__':
    print(figures(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
