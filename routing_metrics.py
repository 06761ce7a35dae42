"""
Reproducibility of mixture-of-experts routing between trials (numpy/scipy only, no torch).

Expert indices are arbitrary: expert 3 of one trial may play the role of expert 0 of
another. So, per MoE layer, the experts of trial b are matched to those of trial a by a
maximum-weight assignment (scipy.optimize.linear_sum_assignment) on the co-routing counts
    C[i, j] = number of evaluation tokens routed to expert i in trial a and j in trial b,
and the routing agreement of the layer is the fraction of tokens routed to matched experts:
    agreement = max over permutations pi of sum_i C[i, pi(i)] / n_tokens.
It is 1 for a trial compared with itself, unchanged by any relabelling of either trial's
experts, and symmetric. Its floor is not 1/n_experts: with the marginals fixed, the best
matching of two independent routings already agrees on more than that; chance_agreement()
estimates that floor by shuffling tokens.

Input: the `routing` array a switchlm trial saves in its .npz (see moe.py):
    int [n_eval, n_moe_layers, block_size], the router's first-choice expert of every
    position of every evaluation window in every MoE layer.
Any array with the layer on axis 1 works ([n, L] for last positions only, say); every
other axis is flattened into tokens.

    from routing_metrics import pairwise_routing_agreement
    r = pairwise_routing_agreement([np.load(p)['routing'] for p in npz_paths])
    r['mean'], r['std'], r['per_layer_mean'], r['pairs']
"""
import itertools

import numpy as np
from scipy.optimize import linear_sum_assignment


def _layers(routing):
    r = np.asarray(routing)
    if r.ndim < 2:
        raise ValueError(f"routing must have a layer axis (axis 1), got shape {r.shape}")
    if not np.issubdtype(r.dtype, np.integer):
        raise ValueError(f"routing must hold integer expert indices, got {r.dtype}")
    return np.moveaxis(r, 1, 0).reshape(r.shape[1], -1)  # [L, tokens]


def co_routing_counts(a, b, n_experts=None):
    """C[i, j]: tokens routed to expert i in `a` and j in `b` (1-D int arrays, same length)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"routings cover different tokens: {a.shape} vs {b.shape}")
    if a.size and min(a.min(), b.min()) < 0:
        raise ValueError("expert indices must be >= 0")
    n = n_experts or (int(max(a.max(), b.max())) + 1 if a.size else 1)
    if a.size and max(a.max(), b.max()) >= n:
        raise ValueError(f"expert index {max(a.max(), b.max())} >= n_experts {n}")
    return np.bincount(a.astype(np.int64) * n + b, minlength=n * n).reshape(n, n)


def match_experts(counts):
    """perm with perm[i] = expert of trial b matched to expert i of trial a, maximising the
    number of co-routed tokens."""
    rows, cols = linear_sum_assignment(counts, maximize=True)
    perm = np.empty(counts.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def layer_agreement(a, b, n_experts=None):
    """Routing agreement of one layer: fraction of tokens routed to matched experts."""
    counts = co_routing_counts(a, b, n_experts)
    total = counts.sum()
    if total == 0:
        raise ValueError("no tokens to compare")
    return float(counts[np.arange(len(counts)), match_experts(counts)].sum() / total)


def routing_agreement_per_layer(routing_a, routing_b, n_experts=None):
    """Agreement of every MoE layer: float array [n_moe_layers]."""
    la, lb = _layers(routing_a), _layers(routing_b)
    if la.shape != lb.shape:
        raise ValueError(f"routings have different shapes: {np.shape(routing_a)} vs {np.shape(routing_b)}")
    return np.array([layer_agreement(x, y, n_experts) for x, y in zip(la, lb)])


def chance_agreement(routing_a, routing_b, n_experts=None, seed=0):
    """Agreement of `a` with `b`'s tokens shuffled (per layer, mean over layers): the level
    two routings with these expert loads reach by matching alone, to read agreement against."""
    rng = np.random.default_rng(seed)
    la, lb = _layers(routing_a), _layers(routing_b)
    return float(np.mean([layer_agreement(x, rng.permutation(y), n_experts) for x, y in zip(la, lb)]))


def pairwise_routing_agreement(routings, n_experts=None):
    """All pairs i < j of a list of trials' routing arrays (e.g. the 3 trials of one
    model/activation). Returns {'pairs': [(i, j, agreement)], 'mean', 'std' (over pairs;
    0 for one pair), 'per_layer_mean' [L], 'chance_mean'}."""
    if len(routings) < 2:
        raise ValueError(f"routing agreement needs at least two trials, got {len(routings)}")
    pairs, per_layer, chance = [], [], []
    for i, j in itertools.combinations(range(len(routings)), 2):
        pl = routing_agreement_per_layer(routings[i], routings[j], n_experts)
        pairs.append((i, j, float(pl.mean())))
        per_layer.append(pl)
        chance.append(chance_agreement(routings[i], routings[j], n_experts))
    values = np.array([p[2] for p in pairs])
    return {'pairs': pairs, 'mean': float(values.mean()), 'std': float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            'per_layer_mean': np.mean(per_layer, axis=0).tolist(), 'chance_mean': float(np.mean(chance))}
