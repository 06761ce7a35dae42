"""Every disagreement metric on hand-made predictions with known answers, the TV identity,
symmetry, all-pairs = pair by pair, the evaluation-set check, and the statistics over trials."""
import math

import numpy as np
import pytest

import metrics
from metrics import (PAIR_METRICS, EvalMismatch, js_divergence, l2_distance, prediction_differences,
                     relative_pd, relative_pd_elementwise, top1_disagreement, total_variation)


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
    assert relative_pd_elementwise(p1, p2) == pytest.approx(2 * 2 / c)  # 2 on the 2 classes used, 0 on the rest
    assert l2_distance(p1, p2) == pytest.approx(math.sqrt(2))


def test_hand_computed_values():
    p1 = np.array([[0.5, 0.5], [0.2, 0.8]])
    p2 = np.array([[1.0, 0.0], [0.2, 0.8]])
    # row 0: |d| = (0.5, 0.5); row 1: identical
    assert relative_pd(p1, p2) == pytest.approx((1.0 / 4) / (0.5 + 0.5))
    assert relative_pd_elementwise(p1, p2) == pytest.approx((2 * 0.5 / 1.5 + 2 * 0.5 / 0.5) / 4)
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
    pairs, values = metrics.pairwise(stack)
    assert pairs.tolist() == [[i, j] for i in range(5) for j in range(i + 1, 5)]
    assert set(values) == set(PAIR_METRICS)
    for k, (i, j) in enumerate(pairs):
        for name, f in PAIR_METRICS.items():
            assert values[name][k] == pytest.approx(f(stack[i], stack[j]), rel=1e-12), name
    # processing pairs in small blocks changes nothing
    _, blocked = metrics.pairwise(stack, max_elements=1)
    for name in PAIR_METRICS:
        np.testing.assert_array_equal(blocked[name], values[name])
    # fewer than two trials: no pairs, no numbers
    pairs1, values1 = metrics.pairwise(stack[:1])
    assert len(pairs1) == 0 and all(len(v) == 0 for v in values1.values())


def test_pair_matrix_is_symmetric_with_zero_diagonal():
    pairs, values = metrics.pairwise(dirichlet((4, 30, 5), 4))
    d = metrics.pair_matrix(4, pairs, values['relative_pd'])
    np.testing.assert_array_equal(d, d.T)
    assert (np.diag(d) == 0).all() and d[1, 3] == values['relative_pd'][4]


def test_comparing_different_evaluation_sets_is_an_error():
    p = dirichlet((10, 4))
    a, b = trial('a', p), trial('b', p, eval_hash='b' * 64)
    with pytest.raises(EvalMismatch, match='different inputs'):
        metrics.compare([a, b])
    c = trial('c', p)
    c['eval_indices'] = c['eval_indices'][::-1].copy()
    with pytest.raises(EvalMismatch, match='eval_indices'):
        metrics.compare([a, c])
    d = trial('d', p[:5])
    with pytest.raises(EvalMismatch):
        metrics.compare([a, d])
    with pytest.raises(ValueError, match='one shape'):
        relative_pd(p, p[:5])
    pairs, values = metrics.compare([a, trial('e', p)])  # same inputs: a number
    assert values['relative_pd'][0] == 0


def test_mean_over_distinct_pairs_leaves_self_pairs_out():
    d = np.array([[0, 1, 2], [1, 0, 3], [2, 3, 0]], dtype=float)
    idx = np.array([[0, 1, 2], [0, 0, 1], [2, 2, 2]])
    got = metrics.mean_over_distinct_pairs(d, idx)
    assert got[0] == pytest.approx(2.0)       # (1 + 2 + 3) / 3
    assert got[1] == pytest.approx(1.0)       # only trials 0 and 1: d[0, 1]
    assert np.isnan(got[2])                   # one trial: no pair


def test_bootstrap_intervals():
    d = np.full((4, 4), 0.3)
    np.fill_diagonal(d, 0)
    assert metrics.bootstrap_pairwise_ci(d) == pytest.approx([0.3, 0.3])
    pairs, values = metrics.pairwise(dirichlet((5, 30, 6), 5))
    d2 = metrics.pair_matrix(5, pairs, values['relative_pd'])
    lo, hi = metrics.bootstrap_pairwise_ci(d2)
    assert values['relative_pd'].min() <= lo <= hi <= values['relative_pd'].max()
    assert metrics.bootstrap_pairwise_ci(d2) == [lo, hi]           # fixed seed: reproducible
    assert metrics.bootstrap_pairwise_ci(d2[:2, :2]) is None       # two trials: no interval
    assert metrics.bootstrap_difference_ci(d2, [0, 1], [2, 3, 4]) is None


def test_permutation_test_known_p_value():
    # trials 0-2 disagree a lot (1.0), trials 3-5 not at all (0.0), across groups 0.5:
    # of the 20 splits only the observed one reaches a difference of +1 (its mirror gives -1)
    d = np.full((6, 6), 0.5)
    d[:3, :3], d[3:, 3:] = 1.0, 0.0
    np.fill_diagonal(d, 0)
    res = metrics.permutation_test(d, [0, 1, 2], [3, 4, 5])
    assert res['exact'] and res['n_permutations'] == 20
    assert res['p_value'] == pytest.approx(2 / 20)
    assert metrics.bootstrap_difference_ci(d, [0, 1, 2], [3, 4, 5]) == pytest.approx([1.0, 1.0])
    assert metrics.permutation_test(d, [0], [3, 4, 5]) is None     # one trial: no within-group pair


def test_describe():
    s = metrics.describe([1.0, 2.0, 4.0])
    assert s['n'] == 3 and s['mean'] == pytest.approx(7 / 3)
    assert s['std'] == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert 1.0 <= s['ci'][0] <= s['ci'][1] <= 4.0 and s['ci_note'] is None
    s2 = metrics.describe([1.0, 2.0])
    assert s2['ci'] is None and 'no interval possible' in s2['ci_note']
    assert metrics.describe([1.0])['std'] is None
