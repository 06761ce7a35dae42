"""
The FFN study's best-of-k: the exact expectation of best-of-k random search over finished runs,
its seed bootstrap (paired across models and cells), and percentile intervals. The mnist_ffn
design (designs.py) trains every cell of a (width x batch size x learning rate) grid with the
same seeds; ffn_report.build_ffn_summary feeds these. Pure numpy.
"""
import numpy as np

from stat_settings import CONFIDENCE, N_RESAMPLES, SEED


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
