"""Calibration of metrics.py's statistics on simulated studies whose truth is known.

A simulated trial is softmax(consensus logits + s_t * noise): one consensus per evaluation row,
noise independent per trial, row and class, and a noise scale s_t = SIGMA * exp(tau * N(0, 1))
that varies from trial to trial (tau: how unequal trials are; the pair values of the README's
main job suggest tau ~0.05-0.2). An activation whose consensus is a relabelling of another's
classes is exactly as reproducible, but predicts differently.

    python tests/test_calibration.py [studies]   # the README's figures (more studies; minutes)
"""
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import metrics  # noqa: E402

N_ROWS, N_CLASSES, SIGMA, TAU = 48, 12, 0.5, 0.2
N_RESAMPLES = 199        # permutations per simulated test: enough for a rejection rate at 0.05


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


CONSENSUS = 2.0 * np.random.default_rng(0).normal(size=(N_ROWS, N_CLASSES))
RELABEL = np.random.default_rng(1).permutation(N_CLASSES)


def group(rng, n, scale=1.0, tau=TAU, relabel=False):
    """n trials [n, N_ROWS, N_CLASSES] of one activation; relabel: the consensus's classes permuted."""
    z = CONSENSUS[:, RELABEL] if relabel else CONSENSUS
    s = SIGMA * scale * np.exp(tau * rng.normal(size=(n, 1, 1)))
    return softmax(z[None] + s * rng.normal(size=(n, N_ROWS, N_CLASSES)))


def pd_matrix(stack):
    pairs, v = metrics.pairwise(stack, {'relative_pd': metrics.relative_pd})
    return metrics.pair_matrix(len(stack), pairs, v['relative_pd'])


def true_mean_pd(scale=1.0, tau=TAU, n_pairs=4000, seed=99):
    """The cell's mean relative PD between two independent trials, by Monte Carlo."""
    rng = np.random.default_rng(seed)
    a, b = group(rng, n_pairs, scale, tau), group(rng, n_pairs, scale, tau)
    return float(metrics.relative_pd(a, b).mean())


# ----------------------------------------------------------------------------- the simulations

def coverage(n, studies, tau=TAU, seed=2):
    """Fraction of simulated studies whose 95% interval of the cell's mean relative PD holds the truth."""
    truth, rng = true_mean_pd(tau=tau), np.random.default_rng(seed)
    hits = 0
    for _ in range(studies):
        lo, hi = metrics.pairwise_interval(pd_matrix(group(rng, n, tau=tau)))['ci']
        hits += lo <= truth <= hi
    return hits / studies


def rejection_rates(n, studies, scale=1.0, tau=TAU, seed=3, alpha=metrics.ALPHA):
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
        p = {'dispersion': metrics.dispersion_test(d[:n, :n], d[n:, n:], N_RESAMPLES, seed=k)['p_value'],
             'spread': metrics.exchangeability_test(d, idx_a, idx_b, 'spread', N_RESAMPLES, seed=k)['p_value'],
             'shift': metrics.exchangeability_test(d, idx_a, idx_b, 'shift', N_RESAMPLES, seed=k)['p_value'],
             'centroid': centroid_test(act, base, seed=k)}
        for key, v in p.items():
            out[key] += v <= alpha
    return {k: v / studies for k, v in out.items()}


def centroid_test(a, b, seed):
    """PERMDISP as published: each trial's relative PD to its group's mean prediction (x
    sqrt(n / (n - 1))), Welch t statistic permuted over labels."""
    z = [metrics.relative_pd(g, np.broadcast_to(g.mean(0), g.shape)) * math.sqrt(len(g) / (len(g) - 1)) for g in (a, b)]
    return metrics._permutation(z[0], z[1], metrics._welch_t, 'two-sided', N_RESAMPLES, seed)['p_value']


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
    res = metrics.dispersion_test(db, da)
    assert abs(res['difference']) < 1e-12 and res['p_value'] > 0.9
    # ... yet they predict differently: the prediction-shift test says so as strongly as 3 + 3 trials allow
    d = pd_matrix(np.concatenate([b, a]))
    shift = metrics.exchangeability_test(d, np.arange(6), np.arange(6, 12))
    assert shift['p_value'] == pytest.approx(shift['min_p_value'])


def test_interval_covers_the_truth_at_10_trials():
    assert coverage(10, 300) >= 0.90


def test_interval_covers_the_truth_from_min_trials_for_ci():
    # MIN_TRIALS_FOR_CI is where intervals start: they must be valid there already
    assert coverage(metrics.MIN_TRIALS_FOR_CI, 300) >= 0.90


def test_dispersion_test_false_positive_rate_under_equal_spread():
    # equally reproducible, different predictions: the dispersion test holds its level, while
    # every test of exchangeability rejects more often than alpha (the relabelling breaks it)
    r = rejection_rates(10, 600)
    assert r['dispersion'] <= 0.07
    assert r['spread'] >= 0.15 and r['shift'] >= 0.95


def test_dispersion_test_power_at_noise_ratio_1_6():
    assert rejection_rates(10, 200, scale=1.6, seed=4)['dispersion'] >= 0.8


# ----------------------------------------------------------------------------- README figures

def figures(studies=1000):
    """The Markdown block of README "The analysis": coverage, false positives, power."""
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
