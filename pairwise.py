"""
How much two trials' predictions on the same evaluation set disagree: the per-pair metrics, and
all pairs of a stack of trials. Pure numpy: no torch.

Every metric takes two arrays of probability rows [..., n, C] (softmax outputs) and reduces
the last two axes, so one function serves a single pair ([n, C] each) and all pairs of a
stack at once ([n_pairs, n, C] each). Arithmetic is float64: float32 sums over ~65k
elements lose the digits that small disagreements live in.

To add a per-pair metric, write f(p1, p2) below and add it to PAIR_METRICS: the analysis,
summary.json and the report take their list of metrics from there. What each statistic is and
how it was calibrated: docs/analysis.md.
"""
import numpy as np

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
