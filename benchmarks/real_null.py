"""
The dispersion test's level on real trials: split T >= 16 trials of one cell (one model and
activation, so no real difference exists) every way into two halves, run the test on each
split as if the halves were two activations, and count the rejections at alpha 0.05. On
simulated trials tests/test_calibration.py shows the level; this is the same on real ones,
with whatever real seeds do (an outlier basin, heavy tails). Figures: docs/analysis.md.

    python benchmarks/real_null.py --study-dir results/cpu_power --model minigpt --activation relu
"""
import argparse
import glob
import itertools
import json
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pairwise  # noqa: E402
import stat_tests  # noqa: E402
import store  # noqa: E402


def load_cell(study_dir, model, activation):
    paths = sorted(glob.glob(os.path.join(study_dir, model, activation, 'trial_*.json')),
                   key=lambda p: int(os.path.basename(p)[len('trial_'):-len('.json')]))
    trials = [store.load_trial(p) for p in paths]
    pairwise.check_same_eval([{'name': os.path.basename(p), 'eval_hash': t['record']['eval_hash'], **t}
                             for p, t in zip(paths, trials)])
    return [t['record']['trial'] for t in trials], np.stack([t['probs'] for t in trials])


def splits(t, max_splits, seed=0):
    """Every split of t trials into two halves (trial 0 in the first: each split once), or
    max_splits of them drawn at random."""
    half = t // 2
    all_splits = [a for a in itertools.combinations(range(t), half) if 0 in a]
    if max_splits and len(all_splits) > max_splits:
        rng = np.random.default_rng(seed)
        all_splits = [all_splits[i] for i in rng.choice(len(all_splits), max_splits, replace=False)]
    return [(list(a), [i for i in range(t) if i not in a]) for a in all_splits]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--study-dir', required=True)
    p.add_argument('--model', required=True)
    p.add_argument('--activation', required=True)
    p.add_argument('--max-splits', type=int, default=0, help='at most this many splits, drawn at random (0: all)')
    p.add_argument('--out', default=None, help='JSON of the figures (default: print only)')
    p.add_argument('--min-trials', type=int, default=16,
                   help='refuse fewer trials than this (default 16: 12,870 splits; 10 gives only 126)')
    args = p.parse_args(argv)
    ids, probs = load_cell(args.study_dir, args.model, args.activation)
    if len(ids) < args.min_trials:
        sys.exit(f"error: {len(ids)} trials of {args.model}/{args.activation}; the real-data null needs at least "
                 f"{args.min_trials} (--min-trials)")
    pairs, values = pairwise.pairwise(probs, {'relative_pd': pairwise.relative_pd})
    d = pairwise.pair_matrix(len(ids), pairs, values['relative_pd'])
    t0, ps = time.time(), []
    todo = splits(len(ids), args.max_splits)
    for a, b in todo:
        ps.append(stat_tests.dispersion_test(d[np.ix_(a, a)], d[np.ix_(b, b)], detectable=False)['p_value'])
    ps = np.array(ps)
    out = {'study_dir': os.path.abspath(args.study_dir), 'model': args.model, 'activation': args.activation,
           'trials': ids, 'splits': len(todo), 'all_splits': math.comb(len(ids), len(ids) // 2) // 2,
           'rejection_rate_0.05': float((ps <= 0.05).mean()), 'rejection_rate_0.01': float((ps <= 0.01).mean()),
           'mean_relative_pd': float(values['relative_pd'].mean()), 'seconds': time.time() - t0}
    print(f"{args.model}/{args.activation}: {len(ids)} trials, {len(todo)} of {out['all_splits']} splits into "
          f"{len(ids) // 2} + {len(ids) - len(ids) // 2}: the dispersion test rejects {out['rejection_rate_0.05']:.3f} "
          f"at alpha 0.05 ({out['rejection_rate_0.01']:.3f} at 0.01); {out['seconds']:.0f} s")
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(out, f, indent=1)


if __name__ == '__main__':
    main()
