"""
Sanity rules of the analysis: what in a study's files says that an experiment did not do what
it claims (an activation or a seed that was never applied, a model that sees the future, a
saved accuracy its predictions deny). Each rule appends one-line warnings; analyze_results.py
puts them first in the report. No torch.
"""
import json
import math

import numpy as np

import pairwise
from activation_names import applied_function, canonical_activation
from fileio import is_number

SEED_KEYS = ('init', 'data', 'dropout')  # the seeds that drive randomness; trial_seed is a label
# Sanity rules compare a suspicious distance with the relative PD between trials of different
# seeds of the same model. Activations and seeds change this project's predictions by 9-16%
# relative PD (docs/studies.md, the main job) and no two groups of a model differ in it by more than a factor
# of 2, while the same computation repeated (a GPU without deterministic kernels) moves
# probabilities by ~1e-4 relative, i.e. ~0.1% of that or less. 1% sits an order of magnitude
# above the second and below any real difference, so below it two trials are "the same model".
SANITY_RATIO = 0.01
# Where repeat noise is measured (run_all_experiments.py --repeats N: trial 0 of each group run
# again with identical seeds), the rules compare with it instead: two trials or two activations
# whose relative PD is within REPEAT_FACTOR x the repeat noise predict like two runs of one
# computation. The noise of one measured repeat pair varies by a factor of a few between pairs
# (float reductions land differently), so 10x keeps a real effect clear of it: a genuinely
# different activation was measured at 100x and more of GPU-like repeat noise.
REPEAT_FACTOR = 10
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
        n_classes = t['probs'].shape[1]
        if m['val_loss'] > 2 * math.log(n_classes):  # twice a uniform guess's loss: the run diverged
            warnings.append(f"{t['name']}: val loss {m['val_loss']:.4g} nats is over twice a uniform guess's "
                            f"{math.log(n_classes):.3g} — the trial diverged; its predictions are no trained model's")
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


def floor_of(model, activations, ref, noise):
    """(threshold below which a relative PD counts as 'the same computation', a function that
    words a PD against what the threshold is based on): REPEAT_FACTOR x the measured repeat
    noise of these groups where there is any, else SANITY_RATIO x the between-seed PD (a fixed
    threshold: repeat noise not measured), else (None, None)."""
    measured = [noise[(model, a)]['value'] for a in activations if (model, a) in (noise or {})]
    if measured:
        v = float(np.max(measured))
        return REPEAT_FACTOR * v, lambda pd: (f"{pd / v:.2g}x the measured repeat noise {v:.2e}" if v > 0 else
                                              "the measured repeat noise is 0 (bitwise repeats)")
    scales = [ref[a] for a in activations if a in ref]
    if scales:
        v = float(np.mean(scales))
        return SANITY_RATIO * v, lambda pd: f"{pd / v:.3%} of the between-seed {v:.4f}"
    return None, None


def sanity_seeds(model, entries, ref, warnings, noise=None):
    """Two trials of one group whose seeds differ must not predict alike: flagged when no
    probability differs by more than IDENTICAL_TOL, or when their relative PD is below the
    floor (floor_of: the measured repeat noise, else a fixed fraction of the between-seed PD).
    With repeat noise this works in a study of one activation too."""
    for e in entries:
        name = f"{model}/{e['activation']}"
        floor, basis = floor_of(model, [e['activation']] if (model, e['activation']) in (noise or {}) else list(ref),
                                ref, noise)
        seeds = {row['trial_id']: row.get('seeds') for row in e['trials']}
        for a, b, pd, mx in _seed_pairs(e):
            if mx <= IDENTICAL_TOL:
                warnings.append(f"{name}: trials {a} and {b} give {'bitwise ' if mx == 0 else ''}identical predictions "
                                f"although their seeds differ ({seeds[a]} vs {seeds[b]}) — seeds not applied")
            elif floor and pd < floor:
                warnings.append(f"{name}: trials {a} and {b} differ by relative PD {pd:.2e}, {basis(pd)}, although "
                                f"their seeds differ ({seeds[a]} vs {seeds[b]}) — seeds not applied")


def _called(trials, act):
    """True if every trial records that act's function ran, False if one records it did not,
    None if none recorded the calls."""
    want = applied_function(act)
    seen = [t['record']['activation_calls'].get(want, 0) > 0 for t in trials
            if isinstance(t['record'].get('activation_calls'), dict)]
    return None if not seen else all(seen)


def sanity_across_activations(model, groups, ref, warnings, noise=None):
    """Trial k of activation a against trial k of activation b (same seeds, other function):
    below the floor (floor_of) the two predict like one computation. If the trials record that
    both functions ran, that is a note (applied, but predicting almost alike: SmeLU with a
    small beta against ReLU); otherwise the activation was probably never applied. Also flags
    a model whose between-seed PD is below SANITY_RATIO of what its activations differ by:
    seeds ignored everywhere. And activations trained with different configs."""
    acts, cross = sorted(groups), []
    for i, a in enumerate(acts):
        for b in acts[i + 1:]:
            if canonical_activation(a) == canonical_activation(b):
                continue  # one function under two names: identical by design
            tb = {t['trial']: t for t in groups[b]}
            floor, basis = floor_of(model, [a, b], ref, noise)
            hits = []
            for ta in groups[a]:
                t2 = tb.get(ta['trial'])
                if t2 is None or t2['eval_hash'] != ta['eval_hash'] or t2['probs'].shape != ta['probs'].shape:
                    continue
                pd, mx = float(pairwise.relative_pd(ta['probs'], t2['probs'])), float(pairwise.max_abs_diff(ta['probs'], t2['probs']))
                cross.append(pd)
                if mx <= IDENTICAL_TOL:
                    hits.append(f"{ta['trial']} ({'bitwise ' if mx == 0 else ''}identical)")
                elif floor and pd < floor:
                    hits.append(f"{ta['trial']} (relative PD {pd:.2e}, {basis(pd)})")
            if not hits:
                continue
            if _called(groups[a], a) and _called(groups[b], b):
                warnings.append(f"note: {model}: {a} and {b} were both applied (the trials record both functions "
                                f"running) but predict almost alike for trial(s) {', '.join(hits)}")
            else:
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


def check_activation_calls(trials, warnings):
    """The original study's bug, caught with no comparison at all: a trial whose named
    activation's function never ran in a forward pass of the trained model is an error.
    Trials saved before the trainer counted the calls are said once."""
    unrecorded = []
    for t in trials:
        calls = t['record'].get('activation_calls')
        if not isinstance(calls, dict):
            unrecorded.append(t['name'])
            continue
        want = applied_function(t['activation'])
        if not calls.get(want):
            ran = ', '.join(f"{k} x{v}" for k, v in calls.items()) or 'no activation function'
            warnings.insert(0, f"ERROR {t['name']}: {t['activation']} ({want}) was never called in a forward pass of "
                               f"the trained model (called: {ran}) — the activation was not applied")
    if unrecorded:
        warnings.append(f"{len(unrecorded)} trial(s) record no activation calls (saved before the trainer counted "
                        f"them): whether their activation ran is not checked (first: {unrecorded[0]})")


MIXABLE = (('threads', 'threads'), ('device', 'device type'), ('device_name', 'device'),
           ('torch_version', 'torch version'), ('cuda_version', 'CUDA version'))


def check_mixed_settings(groups, warnings):
    """What may legitimately differ between the trials of one group (threads, device, library
    versions: not part of a trial's identity) changes float reductions, so a group that mixes
    them measures that too, not only its seeds: named, with the trials."""
    for model, acts in groups.items():
        for act, trials in acts.items():
            for key, what in MIXABLE:
                by = {}
                for t in trials:
                    by.setdefault(str((t['record'].get('provenance') or {}).get(key)), []).append(t['trial'])
                if len(by) > 1:
                    warnings.append(f"{model}/{act}: trials ran with different {what} ("
                                    + '; '.join(f"{v}: trial(s) {', '.join(map(str, ks))}" for v, ks in by.items())
                                    + ") — their PD includes what that changes, not only the seeds")


def check_trial_counts(groups, warnings):
    for model, acts in groups.items():
        ones = [a for a, ts in acts.items() if len(ts) < 2]
        if ones:
            warnings.append(f"{model}: {', '.join(ones)} ha{'s' if len(ones) == 1 else 've'} a single trial: no pair of "
                            f"trials, so no reproducibility figure for {'it' if len(ones) == 1 else 'them'} "
                            f"(train at least 2; intervals need 3)")


def repeat_noise(repeats, groups):
    """{(model, activation): {'value', 'n'}}: the mean relative PD between the group's trial 0
    and its repeats (the same seeds, run again: <study>/repeats), i.e. what the hardware at hand
    changes between two runs that should be identical (0 where it is bitwise deterministic)."""
    out = {}
    for r in repeats:
        base = {t['trial']: t for t in groups.get(r['model'], {}).get(r['activation'], [])}.get(0)
        if base is None or base['eval_hash'] != r['eval_hash']:
            continue
        out.setdefault((r['model'], r['activation']), []).append(float(pairwise.relative_pd(base['probs'], r['probs'])))
    return {k: {'value': float(np.mean(v)), 'n': len(v)} for k, v in out.items()}


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


def evidence(groups, noise):
    """{model/activation: which evidence the seed and activation rules used}, for the report."""
    return {f"{m}/{a}": (f"repeat noise measured ({noise[(m, a)]['n']} repeat(s)): {noise[(m, a)]['value']:.2e}"
                         if (m, a) in noise else f"repeat noise not measured: seeds checked by the stream digests "
                                                 f"and a fixed threshold of {SANITY_RATIO:.0%} of the between-seed PD")
            for m, acts in groups.items() for a in acts}
