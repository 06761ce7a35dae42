"""
Sanity rules of the analysis: what in a study's files says that an experiment did not do what
it claims (an activation or a seed that was never applied, a model that sees the future, a
saved accuracy its predictions deny). Each rule appends one-line warnings; analyze_results.py
puts them first in the report. No torch.
"""
import json
import math

import numpy as np

import metrics
from activation_names import canonical_activation
from fileio import is_number

SEED_KEYS = ('init', 'data', 'dropout')  # the seeds that drive randomness; trial_seed is a label
# Sanity rules compare a suspicious distance with the relative PD between trials of different
# seeds of the same model. Activations and seeds change this project's predictions by 9-16%
# relative PD (README, main job) and no two groups of a model differ in it by more than a factor
# of 2, while the same computation repeated (a GPU without deterministic kernels) moves
# probabilities by ~1e-4 relative, i.e. ~0.1% of that or less. 1% sits an order of magnitude
# above the second and below any real difference, so below it two trials are "the same model".
SANITY_RATIO = 0.01
# Without a between-seed reference (vary none, single trials), only predictions that agree to
# this are flagged: float32 softmax of the same computation agrees to ~1e-7.
IDENTICAL_TOL = 1e-6
# Causality probe (train.py records metrics.causality_max_change: the largest change of an
# earlier position's logit when the last tokens of a window change). A causal model's earlier
# logits are recomputed from identical inputs: 0, or float noise far below this; a model that
# sees the future moves them by O(0.01-1).
CAUSALITY_TOL = 1e-3
# Information-leakage rule (kept, but blind to most leaks: a non-causal model lowers train and
# val loss together, which is why the causality probe exists). A model that cannot see the
# token it predicts does not score far better on unseen text than on its training text, and a
# character LM on Tiny Shakespeare reaches ~1.4-1.5 nats at best (nanoGPT's 10M-parameter
# model: 1.47). So flag a trial when val_loss < LEAK_RATIO * train_loss (any task), or, for
# character LMs (task 'lm'), val_loss < LM_LOSS_FLOOR nats.
LEAK_RATIO = 0.5
LM_LOSS_FLOOR = 0.5

# The random streams each --vary mode changes across trials (store.trial_seeds); the others
# must stay identical. Checked against the digests of the real streams the trainer records
# ('streams' in the trial JSON), which works on any device: it needs no bitwise-equal predictions.
STREAMS = ('init', 'data', 'dropout')
VARY_STREAMS = {'all': STREAMS, 'init': ('init',), 'data': ('data',), 'dropout': ('dropout',), 'none': ()}



def sanity_trials(trials, warnings):
    """Per-trial checks: the causality probe, implausibly low val loss, and a saved accuracy
    its predictions deny."""
    unprobed = []
    for t in trials:
        r, m = t['record'], t['record']['metrics']
        change = m.get('causality_max_change')
        if change is None:
            if r.get('task') == 'lm':
                unprobed.append(t['name'])
        elif not is_number(change):
            warnings.append(f"{t['name']}: causality_max_change is {change!r}, not a number: causality unknown")
        elif change > CAUSALITY_TOL:
            warnings.append(f"{t['name']}: changing the last tokens of a window moved earlier positions' logits by "
                            f"up to {change:.3g} (tolerance {CAUSALITY_TOL:g}) — model sees the future")
        why = []
        if m['val_loss'] < LEAK_RATIO * m['train_loss']:
            why.append(f"below {LEAK_RATIO} x train loss {m['train_loss']:.4f}")
        if r.get('task') == 'lm' and m['val_loss'] < LM_LOSS_FLOOR:
            why.append(f"below {LM_LOSS_FLOOR} nats, far under what character LMs reach")
        if why:
            warnings.append(f"{t['name']}: val loss {m['val_loss']:.4f} is {' and '.join(why)} — "
                            f"possible information leakage (non-causal model?)")
        if not t['history_ok']:
            warnings.append(f"{t['name']}: history missing or malformed: no training curve for this trial")
        acc = float((t['probs'].argmax(1) == t['targets']).mean())
        if abs(acc - m['val_accuracy']) > 1e-9:
            warnings.append(f"{t['name']}: val_accuracy {m['val_accuracy']:.6f} in the JSON differs from the "
                            f"accuracy of its saved predictions {acc:.6f}")
    if unprobed:
        warnings.append(f"{len(unprobed)} language-model trial(s) record no causality_max_change (written before "
                        f"the trainer ran the causality probe): causality could not be checked for them "
                        f"(first: {unprobed[0]})")


def _seed_pairs(entry):
    """[(trial a, trial b, relative PD, max |p_a - p_b|)] for the pairs of a group's trials
    whose seeds differ."""
    p = entry.get('pairwise')
    if not p:
        return []
    seeds = {row['trial_id']: row.get('seeds') or {} for row in entry['trials']}
    return [(a, b, pd, mx) for (a, b), pd, mx in zip(p['pairs'], p['relative_pd']['values'], p['max_abs_diff']['values'])
            if any(seeds[a].get(s) != seeds[b].get(s) for s in SEED_KEYS)]


def between_seed_pd(entries):
    """{activation: mean relative PD over its pairs of trials with different seeds}, for the
    groups of one model that have such pairs: the scale the sanity rules measure against."""
    out = {}
    for e in entries:
        v = [pd for _, _, pd, _ in _seed_pairs(e)]
        if v:
            out[e['activation']] = float(np.mean(v))
    return out


def sanity_seeds(model, entries, ref, warnings):
    """Two trials of one group whose seeds differ must not predict alike: flagged when no
    probability differs by more than IDENTICAL_TOL, or when their relative PD is below
    SANITY_RATIO of the model's between-seed relative PD (median over its activations)."""
    scale = float(np.median(list(ref.values()))) if ref else None
    for e in entries:
        name = f"{model}/{e['activation']}"
        seeds = {row['trial_id']: row.get('seeds') for row in e['trials']}
        for a, b, pd, mx in _seed_pairs(e):
            if mx <= IDENTICAL_TOL:
                warnings.append(f"{name}: trials {a} and {b} give {'bitwise ' if mx == 0 else ''}identical predictions "
                                f"although their seeds differ ({seeds[a]} vs {seeds[b]}) — seeds not applied")
            elif scale and pd < SANITY_RATIO * scale:
                warnings.append(f"{name}: trials {a} and {b} differ by relative PD {pd:.2e}, {pd / scale:.3%} of "
                                f"{model}'s between-seed relative PD {scale:.4f}, although their seeds differ "
                                f"({seeds[a]} vs {seeds[b]}) — seeds not applied")


def sanity_across_activations(model, groups, ref, warnings):
    """Trial k of activation a against trial k of activation b (same seeds, other function):
    flagged when no probability differs by more than IDENTICAL_TOL, or when their relative PD
    is below SANITY_RATIO of the two groups' between-seed relative PD — the activation was
    probably never applied (aliases like silu/swish excepted). Also flags a model whose
    between-seed PD is below SANITY_RATIO of what its activations differ by: seeds ignored
    everywhere. And activations trained with different configs."""
    acts, cross = sorted(groups), []
    for i, a in enumerate(acts):
        for b in acts[i + 1:]:
            if canonical_activation(a) == canonical_activation(b):
                continue  # one function under two names: identical by design
            tb = {t['trial']: t for t in groups[b]}
            scales = [ref[x] for x in (a, b) if x in ref]
            scale = float(np.mean(scales)) if scales else None
            hits = []
            for ta in groups[a]:
                t2 = tb.get(ta['trial'])
                if t2 is None or t2['eval_hash'] != ta['eval_hash'] or t2['probs'].shape != ta['probs'].shape:
                    continue
                pd, mx = float(metrics.relative_pd(ta['probs'], t2['probs'])), float(metrics.max_abs_diff(ta['probs'], t2['probs']))
                cross.append(pd)
                if mx <= IDENTICAL_TOL:
                    hits.append(f"{ta['trial']} ({'bitwise ' if mx == 0 else ''}identical)")
                elif scale and pd < SANITY_RATIO * scale:
                    hits.append(f"{ta['trial']} (relative PD {pd:.2e}, {pd / scale:.3%} of the between-seed {scale:.4f})")
            if hits:
                warnings.append(f"{model}: activations {a} and {b} give (nearly) identical predictions for trial(s) "
                                f"{', '.join(hits)} — activation probably not applied")
    seed_scale = float(np.median(list(ref.values()))) if ref else None
    act_scale = float(np.median(cross)) if cross else 0.0
    if seed_scale is not None and act_scale > 0 and seed_scale < SANITY_RATIO * act_scale:
        warnings.append(f"{model}: trials with different seeds differ by relative PD {seed_scale:.2e}, "
                        f"{seed_scale / act_scale:.3%} of what its activations differ by with the same seeds "
                        f"({act_scale:.4f}) — seeds not applied")
    configs = {a: groups[a][0]['record'].get('config') or {} for a in acts}
    keys = sorted({k for c in configs.values() for k in c if len({json.dumps(v.get(k)) for v in configs.values()}) > 1})
    if keys:
        warnings.append(f"{model}: activations were trained with different configs ({', '.join(keys)} differ); "
                        f"comparing them is not like for like")


def check_streams(groups, warnings):
    """Within each model x activation group, the streams its --vary mode names must differ
    between every two trials and the others must be identical across all of them, judged on
    the digests of the streams the trials really used. A trial saved without them (before
    they were recorded) cannot be verified: said once per group."""
    for model, acts in groups.items():
        for act, trials in acts.items():
            name = f"{model}/{act}"
            vary = trials[0]['record'].get('vary')
            if any(t['record'].get('vary') != vary for t in trials):
                continue  # summarize_group already says these are not repeats of one experiment
            have = [t for t in trials if isinstance(t['record'].get('streams'), dict)
                    and all(isinstance(t['record']['streams'].get(k), str) for k in STREAMS)]
            missing = [t['trial'] for t in trials if t not in have]
            if missing:
                warnings.append(f"{name}: trial(s) {', '.join(map(str, missing))} saved no stream fingerprints "
                                f"(older results): cannot verify that --vary {vary} changed only its streams")
            if vary not in VARY_STREAMS:
                warnings.append(f"{name}: unknown vary mode {vary!r}: streams not checked "
                                f"(valid: {', '.join(VARY_STREAMS)})")
                continue
            if len(have) < 2:
                continue
            for k in STREAMS:
                digests = [t['record']['streams'][k] for t in have]
                if k in VARY_STREAMS[vary]:
                    same = [f"{a['trial']} and {b['trial']}" for i, a in enumerate(have) for b in have[i + 1:]
                            if a['record']['streams'][k] == b['record']['streams'][k]]
                    if same:
                        warnings.append(f"{name}: {k} stream identical across trials {', '.join(same)} "
                                        f"although --vary {vary}")
                elif len(set(digests)) > 1:
                    warnings.append(f"{name}: {k} stream differs across trials although --vary {vary} "
                                    f"(trials {', '.join(str(t['trial']) for t in have)}: {', '.join(digests)})")
