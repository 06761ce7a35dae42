"""Every disagreement metric on hand-made predictions with known answers, the TV identity,
symmetry, all-pairs = pair by pair, the evaluation-set check, and the statistics over trials."""
import math

import numpy as np
import pytest
from scipy import stats

import intervals
import pairwise
import snapshot_stats
import stat_settings
import stat_tests
from pairwise import PAIR_METRICS, EvalMismatch, js_divergence, l2_distance, prediction_differences, relative_pd, relative_pd_elementwise, top1_disagreement


def total_variation(p1, p2):
    """Mean over rows of 0.5 * sum_c |p1 - p2|: the reference relative_pd must equal."""
    return 0.5 * np.abs(np.asarray(p1) - np.asarray(p2)).sum(-1).mean(-1)


def dirichlet(shape, seed=0):
    return np.random.default_rng(seed).dirichlet(np.ones(shape[-1]), size=shape[:-1])


def trial(name, probs, eval_hash='a' * 64):
    n = len(probs)
    return {'name': name, 'probs': probs, 'eval_hash': eval_hash,
            'eval_indices': np.arange(n), 'targets': np.zeros(n, dtype=np.int64)}


def test_identical_predictions_give_zero_for_every_metric():
    p = dirichlet((20, 5))
    for name, f in PAIR_METRICS.items():
        assert f(p, p.copy()) == 0, name


def test_disjoint_one_hot_predictions():
    n, c = 6, 4
    p1 = np.eye(c)[np.zeros(n, dtype=int)]      # every row says class 0
    p2 = np.eye(c)[np.full(n, 2)]               # every row says class 2
    assert relative_pd(p1, p2) == pytest.approx(1.0)
    assert total_variation(p1, p2) == pytest.approx(1.0)
    assert top1_disagreement(p1, p2) == 1.0
    assert prediction_differences(p1, p2) == n
    assert js_divergence(p1, p2) == pytest.approx(1.0)      # bits: the maximum
    f = pairwise.ELEMENTWISE_FLOOR  # ~2 on the 2 classes used (the 0 counts as the floor), 0 on the rest
    assert relative_pd_elementwise(p1, p2) == pytest.approx(2 * (2 * (1 - f) / (1 + f)) / c, rel=1e-12)
    assert l2_distance(p1, p2) == pytest.approx(math.sqrt(2))


def test_hand_computed_values():
    p1 = np.array([[0.5, 0.5], [0.2, 0.8]])
    p2 = np.array([[1.0, 0.0], [0.2, 0.8]])
    # row 0: |d| = (0.5, 0.5); row 1: identical
    assert relative_pd(p1, p2) == pytest.approx((1.0 / 4) / (0.5 + 0.5))
    f = pairwise.ELEMENTWISE_FLOOR  # the 0 of p2 counts as the floor
    assert relative_pd_elementwise(p1, p2) == pytest.approx((2 * 0.5 / 1.5 + 2 * (0.5 - f) / (0.5 + f)) / 4, rel=1e-12)
    js0 = 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)) + 0.5 * math.log2(1 / 0.75)
    assert js_divergence(p1, p2) == pytest.approx(js0 / 2)
    assert l2_distance(p1, p2) == pytest.approx(math.sqrt(0.5) / 2)
    # argmax ties go to the first class (as in torch.argmax): row 0 is class 0 in both
    assert top1_disagreement(p1, p2) == 0 and prediction_differences(p1, p2) == 0
    p3 = np.array([[0.4, 0.6], [0.1, 0.9]])
    assert top1_disagreement(p1, p3) == 0.5 and prediction_differences(p1, p3) == 1


def test_relative_pd_is_mean_total_variation_for_probability_rows():
    for seed in range(5):
        p1, p2 = dirichlet((300, 65), seed), dirichlet((300, 65), seed + 100)
        assert relative_pd(p1, p2) == pytest.approx(total_variation(p1, p2), rel=1e-12)
        assert 0 < relative_pd(p1, p2) < 1


def test_symmetry_and_bounds():
    p1, p2 = dirichlet((50, 10), 1), dirichlet((50, 10), 2)
    p1[:5] = np.eye(10)[np.arange(5)]  # some exact zeros: 0 log 0 and 0/0 must be handled
    for name, f in PAIR_METRICS.items():
        assert f(p1, p2) == pytest.approx(f(p2, p1), rel=1e-12), name
        assert f(p1, p2) >= 0, name
    assert 0 < js_divergence(p1, p2) <= 1
    assert relative_pd_elementwise(p1, p2) <= 2
    assert np.isfinite([f(p1, p2) for f in PAIR_METRICS.values()]).all()


def test_all_pairs_at_once_equal_pair_by_pair():
    stack = dirichlet((5, 40, 7), 3).astype(np.float32)
    pairs, values = pairwise.pairwise(stack)
    assert pairs.tolist() == [[i, j] for i in range(5) for j in range(i + 1, 5)]
    assert set(values) == set(PAIR_METRICS)
    for k, (i, j) in enumerate(pairs):
        for name, f in PAIR_METRICS.items():
            assert values[name][k] == pytest.approx(f(stack[i], stack[j]), rel=1e-12), name
    # processing pairs in small blocks changes nothing
    _, blocked = pairwise.pairwise(stack, max_elements=1)
    for name in PAIR_METRICS:
        np.testing.assert_array_equal(blocked[name], values[name])
    # fewer than two trials: no pairs, no numbers
    pairs1, values1 = pairwise.pairwise(stack[:1])
    assert len(pairs1) == 0 and all(len(v) == 0 for v in values1.values())


def test_pair_matrix_is_symmetric_with_zero_diagonal():
    pairs, values = pairwise.pairwise(dirichlet((4, 30, 5), 4))
    d = pairwise.pair_matrix(4, pairs, values['relative_pd'])
    np.testing.assert_array_equal(d, d.T)
    assert (np.diag(d) == 0).all() and d[1, 3] == values['relative_pd'][4]


def test_comparing_different_evaluation_sets_is_an_error():
    p = dirichlet((10, 4))
    a, b = trial('a', p), trial('b', p, eval_hash='b' * 64)
    with pytest.raises(EvalMismatch, match='different inputs'):
        pairwise.compare([a, b])
    c = trial('c', p)
    c['eval_indices'] = c['eval_indices'][::-1].copy()
    with pytest.raises(EvalMismatch, match='eval_indices'):
        pairwise.compare([a, c])
    d = trial('d', p[:5])
    with pytest.raises(EvalMismatch):
        pairwise.compare([a, d])
    with pytest.raises(ValueError, match='one shape'):
        relative_pd(p, p[:5])
    pairs, values = pairwise.compare([a, trial('e', p)])  # same inputs: a number
    assert values['relative_pd'][0] == 0


def test_mean_over_distinct_pairs_leaves_self_pairs_out():
    d = np.array([[0, 1, 2], [1, 0, 3], [2, 3, 0]], dtype=float)
    idx = np.array([[0, 1, 2], [0, 0, 1], [2, 2, 2]])
    got = intervals.mean_over_distinct_pairs(d, idx)
    assert got[0] == pytest.approx(2.0)       # (1 + 2 + 3) / 3
    assert got[1] == pytest.approx(1.0)       # only trials 0 and 1: d[0, 1]
    assert np.isnan(got[2])                   # one trial: no pair


def test_elementwise_pd_is_bounded_on_rows_differing_below_the_floor():
    # two softmax rows that differ only in logits near -100 (probabilities ~1e-44 and ~1e-40):
    # without a floor every such class counts ~2, so the mean over classes is large (~0.67 here)
    z1 = np.array([[5.0, 3.0, 1.0, -100.0, -100.0, -100.0]] * 4)
    z2 = z1.copy()
    z2[:, 3:] = [-90.0, -110.0, -95.0]
    p1, p2 = (np.exp(z) / np.exp(z).sum(1, keepdims=True) for z in (z1, z2))
    assert np.abs(p1 - p2).max() < 1e-38 and relative_pd_elementwise(p1, p2, floor=0) > 0.6
    assert relative_pd_elementwise(p1, p2) == 0
    # and the floor leaves disagreement on plausible classes counted in full
    p3 = p1[:, [1, 0, 2, 3, 4, 5]]
    assert relative_pd_elementwise(p1, p3) > 0.3


def loo_means(d):
    """The mean over pairs with trial i left out, for every i, the long way."""
    t = len(d)
    return np.array([np.delete(np.delete(d, i, 0), i, 1)[np.triu_indices(t - 1, 1)].mean() for i in range(t)])


def test_jackknife_pseudo_values_and_interval():
    pairs, values = pairwise.pairwise(dirichlet((6, 30, 6), 5))
    d = pairwise.pair_matrix(6, pairs, values['relative_pd'])
    u, loo = values['relative_pd'].mean(), loo_means(d)
    psi = intervals.pseudo_values(d)
    np.testing.assert_allclose(psi, 6 * u - 5 * loo, rtol=1e-12)
    assert psi.mean() == pytest.approx(u, rel=1e-12)
    se = np.sqrt(5 / 6 * ((loo - loo.mean()) ** 2).sum())          # the textbook jackknife
    r = intervals.pairwise_interval(d, scale='linear')
    assert r['mean'] == pytest.approx(u, rel=1e-12) and r['ci_note'] is None and '5 df' in r['ci_method']
    assert r['ci'] == pytest.approx([u - stats.t.ppf(0.975, 5) * se, u + stats.t.ppf(0.975, 5) * se], rel=1e-10)
    # the log scale: the same jackknife on log U, transformed back
    lse = np.sqrt(5 / 6 * ((np.log(loo) - np.log(loo).mean()) ** 2).sum())
    r = intervals.pairwise_interval(d, scale='log')
    h = stats.t.ppf(0.975, 5) * lse
    assert r['ci'] == pytest.approx([u * np.exp(-h), u * np.exp(h)], rel=1e-10) and 'log scale' in r['ci_method']
    assert r['ci_reliable'] and r['outliers'] == [] and len(r['outlyingness']) == 6
    # additive spreads: each pseudo-value is exactly the trial's own part, 2 s_i
    s = np.array([0.1, 0.3, 0.2, 0.5])
    d2 = s[:, None] + s[None]
    np.fill_diagonal(d2, 0)
    np.testing.assert_allclose(intervals.pseudo_values(d2), 2 * s, rtol=1e-12)
    # equal pair values: a zero-width interval; two trials: none, with the reason
    d3 = np.full((4, 4), 0.3)
    np.fill_diagonal(d3, 0)
    assert intervals.pairwise_interval(d3)['ci'] == pytest.approx([0.3, 0.3])
    assert intervals.pairwise_interval(d3, scale='logit')['ci'] == pytest.approx([0.3, 0.3])
    r2 = intervals.pairwise_interval(d[:2, :2])
    assert r2['ci'] is None and r2['mean'] == d[0, 1] and 'no interval possible' in r2['ci_note']
    with pytest.raises(ValueError, match='at least 3'):
        intervals.pseudo_values(d[:2, :2])


def test_exchangeability_test_known_p_values():
    # trials 0-2 disagree a lot (1.0), trials 3-5 not at all (0.0), across groups 0.5:
    # of the 20 splits only the observed one reaches a difference of +1 (its mirror gives -1)
    d = np.full((6, 6), 0.5)
    d[:3, :3], d[3:, 3:] = 1.0, 0.0
    np.fill_diagonal(d, 0)
    res = stat_tests.exchangeability_test(d, [0, 1, 2], [3, 4, 5], contrast='spread')
    assert res['exact'] and res['n_permutations'] == 20 and res['min_p_value'] == pytest.approx(0.1)
    assert res['p_value'] == pytest.approx(2 / 20)
    # two tight groups far apart: only the observed split and its mirror put them apart
    d2 = np.full((6, 6), 0.9)
    d2[:3, :3], d2[3:, 3:] = 0.1, 0.1
    np.fill_diagonal(d2, 0)
    shift = stat_tests.exchangeability_test(d2, [0, 1, 2], [3, 4, 5])
    assert shift['p_value'] == pytest.approx(2 / 20) and shift['min_p_value'] == pytest.approx(0.1)
    assert stat_tests.exchangeability_test(d2, [0], [3, 4, 5]) is None     # one trial: no within-group pair
    with pytest.raises(ValueError, match='contrast'):
        stat_tests.exchangeability_test(d2, [0, 1, 2], [3, 4, 5], contrast='both')


def test_dispersion_test_on_known_spreads():
    def additive(s):
        d = np.add.outer(s, s)
        np.fill_diagonal(d, 0)
        return d
    sa, sb = np.array([0.30, 0.31, 0.32, 0.33]), np.array([0.10, 0.11, 0.12, 0.13])
    res = stat_tests.dispersion_test(additive(sa), additive(sb))
    # the difference of the mean pairwise distances: 2 (mean sa - mean sb)
    assert res['difference'] == pytest.approx(2 * (sa.mean() - sb.mean()))
    assert res['exact'] and res['n_permutations'] == 70 and res['p_value'] == pytest.approx(2 / 70)
    assert res['min_p_value'] == pytest.approx(2 / 70) and res['ci'][0] > 0
    se = np.sqrt(2 * (2 * sa).var(ddof=1) / 4)
    df = stat_tests._welch_df(se ** 2 / 2, 3, se ** 2 / 2, 3)
    assert df == pytest.approx(6)
    assert res['ci'] == pytest.approx([res['difference'] - stats.t.ppf(0.975, 6) * se,
                                       res['difference'] + stats.t.ppf(0.975, 6) * se])
    # the minimum detectable difference: the simulated relative increase times the baseline's mean
    cv = float(f"{np.std(2 * sb, ddof=1) / np.mean(2 * sb):.2g}")
    assert res['min_detectable_difference'] == pytest.approx(stat_tests.detectable_shift(4, 4, stat_settings.ALPHA, cv=cv)
                                                             * 2 * sb.mean())
    assert 'simulated' in res['min_detectable_difference_method']
    # swapped groups: the mirror image
    back = stat_tests.dispersion_test(additive(sb), additive(sa))
    assert back['difference'] == pytest.approx(-res['difference']) and back['p_value'] == res['p_value']
    # 3 + 3 trials: an exact test cannot go below 0.1, so there is no detectable difference at all
    small = stat_tests.dispersion_test(additive(sa[:3]), additive(sb[:3]))
    assert small['min_p_value'] == pytest.approx(0.1) and small['min_detectable_difference'] is None
    with pytest.raises(ValueError, match='3 trials'):
        stat_tests.dispersion_test(additive(sa[:2]), additive(sb))


def test_smallest_p_and_trials_needed():
    assert stat_tests.smallest_p(3, 3) == pytest.approx(2 / 20)
    assert stat_tests.smallest_p(3, 3, sides=1) == pytest.approx(2 / 20)   # symmetric statistic: the mirror ties
    assert stat_tests.smallest_p(3, 4, sides=1) == pytest.approx(1 / 35)
    assert stat_tests.smallest_p(10, 10) == pytest.approx(2 / (stat_settings.N_PERMUTATIONS + 1))
    assert stat_tests.trials_to_detect(1) == 4        # 2 / C(8, 4) = 0.029 <= 0.05
    assert stat_tests.trials_to_detect(24) == 7       # 2 / C(14, 7) = 5.8e-4 <= 0.05 / 24; 2 / C(12, 6) is not


def test_holm():
    assert stat_tests.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stat_tests.holm([0.5, None, 0.01]) == [pytest.approx(0.5), None, pytest.approx(0.02)]
    assert stat_tests.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])    # capped at 1, order kept
    assert stat_tests.holm([]) == []


def test_describe():
    s = intervals.describe([1.0, 2.0, 4.0])
    assert s['n'] == 3 and s['mean'] == pytest.approx(7 / 3)
    assert s['std'] == pytest.approx(np.std([1, 2, 4], ddof=1))
    half = stats.t.ppf(0.975, 2) * s['std'] / np.sqrt(3)
    assert s['ci'] == pytest.approx([7 / 3 - half, 7 / 3 + half]) and s['ci_note'] is None
    assert s['ci_method'] == 't-interval over trials, 2 df'
    s2 = intervals.describe([1.0, 2.0])
    assert s2['ci'] is None and s2['ci_method'] is None and 'no interval possible' in s2['ci_note']
    assert intervals.describe([1.0])['std'] is None


def additive(s):
    d = np.add.outer(np.asarray(s, dtype=float), np.asarray(s, dtype=float))
    np.fill_diagonal(d, 0)
    return d


def test_dispersion_test_on_equal_pair_values_and_nan():
    # every pair value equal within each group, groups different: the Welch t is infinite; p is
    # the smallest attainable (observed split and its mirror), never 0
    da, db = np.full((4, 4), 0.3), np.full((4, 4), 0.1)
    np.fill_diagonal(da, 0)
    np.fill_diagonal(db, 0)
    res = stat_tests.dispersion_test(da, db)
    assert res['p_value'] == pytest.approx(2 / 70) == res['min_p_value']
    big = stat_tests.dispersion_test(additive(np.full(10, 0.15)), additive(np.full(10, 0.05)))
    assert big['p_value'] >= big['min_p_value'] > 0 and not big['exact']
    # identical groups: p = 1
    assert stat_tests.dispersion_test(da, da)['p_value'] == 1.0
    bad = da.copy()
    bad[0, 1] = bad[1, 0] = np.nan
    with pytest.raises(ValueError, match=r'group a: pair value of trials \[0, 1\] is nan'):
        stat_tests.dispersion_test(bad, db)
    with pytest.raises(ValueError, match='finite'):
        intervals.pairwise_interval(bad)


def test_own_permutation_matches_scipy():
    rng = np.random.default_rng(0)
    for na, nb, n_res in ((4, 4, 9999), (3, 5, 9999), (6, 7, 500)):
        x, y = rng.normal(size=na) + 0.8, rng.normal(size=nb)
        ours = stat_tests._welch_permutation(x, y, n_res, seed=1)
        ref = stat_tests._permutation(x, y, stat_tests._welch_t, 'two-sided', n_res, 1)
        assert ours['exact'] == ref['exact'] and ours['min_p_value'] == ref['min_p_value']
        if ours['exact']:    # the same enumeration: the same p-value
            assert float(ours['p_value']) == pytest.approx(ref['p_value'])
        else:                # different random splits: close
            assert abs(float(ours['p_value']) - ref['p_value']) < 0.05


def test_trial_diagnostics_names_the_outlier():
    s = np.array([0.1, 0.1, 0.1, 0.1, 0.4])
    d = additive(s)
    diag = intervals.trial_diagnostics(d, names=['t0', 't1', 't2', 't3', 't4'])
    # trial 4: mean to the others 0.5, mean among the others 0.2
    assert diag['outlyingness'][4] == pytest.approx(2.5)
    assert diag['outlyingness'][0] == pytest.approx((0.2 * 3 + 0.5) / 4 / ((0.2 * 3 + 0.5 * 3) / 6))
    assert diag['outliers'] == ['t4'] and diag['outlier_indices'] == [4]
    assert 'trial t4 is an outlier: its predictions differ from the other trials 2.5x' in diag['note']
    r = intervals.pairwise_interval(d, names=diag['outliers'] and ['t0', 't1', 't2', 't3', 't4'])
    assert r['ci_reliable'] is False and r['outliers'] == ['t4'] and 'unreliable' in r['ci_note']
    clean = intervals.trial_diagnostics(additive([0.1, 0.11, 0.12, 0.1]))
    assert clean['outliers'] == [] and clean['note'] is None
    # identical other trials: outlyingness undefined (None), still flagged
    z = np.zeros((3, 3))
    z[0, 1:] = z[1:, 0] = 0.2
    assert intervals.trial_diagnostics(z)['outlyingness'][0] is None and intervals.trial_diagnostics(z)['outliers'] == [0]
    assert intervals.undetected_outlier_fraction(5) == pytest.approx(1 - 0.05 ** 0.2)


def test_leave_one_out_finds_the_deciding_trial():
    rng = np.random.default_rng(3)
    sa, sb = 0.1 + 0.01 * rng.random(6), 0.1 + 0.01 * rng.random(6)
    sa[2] = 0.6                          # one trial carries the whole (positive) difference
    res = stat_tests.leave_one_out(additive(sa), additive(sb), names_a=list('abcdef'))
    assert len(res['checked']) == 12 and not res['significant']
    # without it the sign of the difference flips: the only trial that decides the verdict
    assert res['decided_by'] == [('a', 'c')] and 'without trial c of group a' in res['note']
    # a clear, broad difference: no single trial decides it
    firm = stat_tests.leave_one_out(additive(0.3 + 0.01 * rng.random(6)), additive(0.1 + 0.01 * rng.random(6)))
    assert firm['significant'] and firm['decided_by'] == [] and firm['note'] is None
    small = stat_tests.leave_one_out(additive([0.3, 0.3, 0.31]), additive([0.1, 0.1, 0.11]))
    assert small['checked'] == [] and 'not checked' in small['note']


def test_bounded_intervals_stay_inside_their_bounds():
    # 3 trials with a large spread of top-1 disagreement: the linear interval leaves [0, 1]
    d = np.array([[0, 0.05, 0.9], [0.05, 0, 0.85], [0.9, 0.85, 0]])
    lin = intervals.pairwise_interval(d, scale='linear')['ci']
    assert lin[0] < 0 or lin[1] > 1
    for scale in ('logit', 'log'):
        lo, hi = intervals.pairwise_interval(d, scale=scale)['ci']
        assert 0 < lo < d[np.triu_indices(3, 1)].mean() < hi
    assert intervals.pairwise_interval(d, scale='logit')['ci'][1] < 1
    # all pairs 0: log undefined, the clipped linear interval, and the method says so
    r = intervals.pairwise_interval(np.zeros((4, 4)), scale='logit')
    assert r['ci'] == [0.0, 0.0] and 'undefined' in r['ci_method']
    with pytest.raises(ValueError, match='valid: linear, log, logit'):
        intervals.pairwise_interval(d, scale='probit')
    # per-trial means of bounded quantities: accuracies near 1
    acc = [0.99, 0.5, 0.98]
    assert intervals.describe(acc)['ci'][1] > 1
    lo, hi = intervals.describe(acc, bounds=(0, 1))['ci']
    assert 0 < lo < np.mean(acc) < hi < 1
    assert intervals.describe([1.0, 2.0, 4.0], bounds=(0, None))['ci'][0] > 0
    with pytest.raises(ValueError, match='bounds'):
        intervals.describe(acc, bounds=(0, 2))


def test_equivalence_test():
    rng = np.random.default_rng(0)
    same = stat_tests.equivalence_test(additive(0.1 + 0.001 * rng.random(8)), additive(0.1 + 0.001 * rng.random(8)))
    assert same['equivalent'] and same['p_value'] < 0.05 and same['ci_ratio'][0] > 0.9 and same['ci_ratio'][1] < 1.1
    assert same['ci'][0] < 0 < same['ci'][1] and same['margin'] == stat_settings.EQUIVALENCE_MARGIN
    far = stat_tests.equivalence_test(additive(0.13 + 0.001 * rng.random(8)), additive(0.1 + 0.001 * rng.random(8)))
    assert far['equivalent'] is False and far['ratio'] == pytest.approx(1.3, rel=0.02)
    assert stat_tests.equivalence_test(additive(0.13 + 0.001 * rng.random(8)), additive(0.1 + 0.001 * rng.random(8)),
                                    margin=0.5)['equivalent']
    few = stat_tests.equivalence_test(additive([0.1, 0.1]), additive([0.1, 0.1, 0.1]))
    assert few['equivalent'] is None and '3 trials' in few['note']
    with pytest.raises(ValueError, match='margin'):
        stat_tests.equivalence_test(additive([0.1] * 3), additive([0.1] * 3), margin=10)


def test_paired_snapshot_comparison_known_answer():
    s_early = np.array([0.05, 0.06, 0.04, 0.05, 0.055])
    res = snapshot_stats.paired_snapshot_comparison(additive(s_early), additive(s_early + 0.02))
    assert res['difference'] == pytest.approx(0.04)       # every pair rose by 2 x 0.02
    assert res['ci'] == pytest.approx([0.04, 0.04]) and res['p_value'] == 0.0
    text = snapshot_stats.describe_change(res, at=(500, 5000))
    assert text.startswith('relative PD rose from 0.102') and 'at 500 to 0.142' in text and 'more divergent' in text
    down = snapshot_stats.paired_snapshot_comparison(additive(s_early + 0.02), additive(s_early + [0.001, -0.001, 0, 0.002, 0]))
    assert down['difference'] < 0 and 'less divergent' in snapshot_stats.describe_change(down)
    flat = snapshot_stats.paired_snapshot_comparison(additive(s_early), additive(s_early + [0.001, -0.001, 0, 0.001, -0.001]))
    assert flat['p_value'] > 0.05 and 'no detectable change' in snapshot_stats.describe_change(flat)
    with pytest.raises(ValueError, match='same >= 3 trials'):
        snapshot_stats.paired_snapshot_comparison(additive(s_early), additive(s_early[:4]))


def test_ensemble_yardstick_falls_like_one_over_sqrt_m():
    # trials = truth + independent zero-sum noise (no clipping): the difference of two m-averages
    # is normal with variance 2 sigma^2 / m, so E|.| and relative PD fall exactly like 1 / sqrt(m)
    rng = np.random.default_rng(0)
    t, n, c = 8, 400, 10
    noise = 0.01 * rng.normal(size=(t, n, c))
    probs = 1 / c + noise - noise.mean(-1, keepdims=True)
    assert probs.min() > 0
    ys = snapshot_stats.ensemble_yardstick(probs, n_splits=400)
    assert [r['m'] for r in ys] == [1, 2, 3, 4]
    assert ys[0]['exhaustive'] and ys[0]['n_splits'] == 28 and ys[0]['ci'] is not None
    assert ys[0]['value'] == pytest.approx(np.mean([relative_pd(probs[i], probs[j]) for i in range(t) for j in range(i)]))
    assert ys[3]['n_splits'] == 35 and ys[3]['exhaustive'] and ys[3]['ci'] is None
    for r in ys:
        assert r['relative_to_single'] == pytest.approx(1 / np.sqrt(r['m']), rel=0.03)
    text = snapshot_stats.place_on_yardstick('smelu_1 vs relu', -0.06, ys)
    assert text == 'smelu_1 vs relu: -6% relative PD; averaging 2 models gives -29% (4 models: -50%)'
    assert 'no ensemble yardstick' in snapshot_stats.place_on_yardstick('x', 0.1, ys[:1])


def test_difference_interval_is_welchs_and_says_when_none_is_possible():
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.0, 0.2, 5), rng.normal(1.3, 0.4, 7)
    r = stat_tests.difference_interval(a, b)
    ref = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert r['difference'] == pytest.approx(b.mean() - a.mean()) and r['ci'] == pytest.approx([ref.low, ref.high])
    two = stat_tests.difference_interval(a[:2], b)
    assert two['ci'] is None and 'no interval possible: 2 trial(s)' in two['ci_note']
    # pair matrices: the difference of the two means over pairs, jackknife standard errors
    d = pairwise.pair_matrix(4, np.array([(i, j) for i in range(4) for j in range(i + 1, 4)]), rng.uniform(0.1, 0.2, 6))
    e = d * 1.5
    r = stat_tests.difference_interval(d, e)
    assert r['difference'] == pytest.approx(0.5 * np.triu(d, 1).sum() / 6) and r['ci'][0] < r['difference'] < r['ci'][1]
