"""
A trial's identity and its files, shared by the trainer (train.run_trial) and the sweep's
plan (run_all_experiments.make_plan); no torch:

    trial_seeds, VARY_MODES     the three seeds of a trial under each --vary mode
    trial_path                  <results>/<study>/<model>/<activation>/trial_<k>.<ext>
    trial_identity              what a saved result must match to count as the trial
    existing_trial              the state of a saved result: absent, done, damaged or different
    set_aside_damaged           a damaged trial's files moved to <study>/damaged/<time>/

A trial is done only when its JSON parses, records the trial's identity, and its .npz
matches the predictions_sha256 the JSON records. A damaged one (JSON unreadable, .npz
missing or changed) is set aside, never deleted, and trained again; a result of another
config is never overwritten unasked.
"""
import json
import os

from config import Config
from fileio import set_aside, sha256_file

VARY_MODES = ('all', 'init', 'data', 'dropout', 'none')


def trial_seeds(seed_base, trial, vary):
    """The three seeds of trial `trial`: those named by `vary` follow the trial, the rest
    stay at seed_base so that only the chosen source of randomness differs between trials."""
    if vary not in VARY_MODES:
        raise ValueError(f"unknown vary mode {vary!r}; valid: {', '.join(VARY_MODES)}")
    s = seed_base + trial
    return {'trial_seed': s,
            'init': s if vary in ('all', 'init') else seed_base,
            'data': s if vary in ('all', 'data') else seed_base,
            'dropout': s if vary in ('all', 'dropout') else seed_base}


def trial_path(results_dir, study, model, activation, trial, ext='json'):
    return os.path.join(results_dir, study, model, activation, f'trial_{trial}.{ext}')


def trial_identity(task, model_name, activation, trial, vary, config):
    """What a saved result must match to count as this trial (see existing_trial); `config`
    is the run's config with the task's config_updates() applied, as run_trial records it."""
    return {'task': task.kind, 'model': model_name, 'activation': activation, 'trial': trial,
            'vary': vary, 'seeds': trial_seeds(config.seed_base, trial, vary), 'config': config.to_dict()}


def existing_trial(path, identity):
    """'absent' if no result JSON; 'done' if it holds this trial (same identity: config,
    seeds, vary, task, model) and its .npz matches the predictions_sha256 it records;
    'damaged (why)' if the JSON does not parse or the .npz is missing or does not match;
    otherwise 'different (how)': a result of another config, never overwritten unasked."""
    if not os.path.exists(path):
        return 'absent'
    try:
        with open(path) as f:
            old = json.load(f)
        if not isinstance(old, dict):
            raise ValueError('not a JSON object')
    except (OSError, ValueError) as e:
        return f"damaged (unreadable JSON: {e})"
    diffs = []
    for key, value in identity.items():
        if key == 'config':
            old_cfg = old.get('config', {})
            # a field added to Config after the old run is no difference while at its default
            diffs += [f"{k}: {old_cfg.get(k)!r} -> {v!r}" for k, v in value.items() if old_cfg.get(k) != v
                      and (k in old_cfg or v != getattr(Config, k, None))]
        elif old.get(key) != value:
            diffs.append(f"{key}: {old.get(key)!r} -> {value!r}")
    if diffs:
        return 'different (' + '; '.join(diffs) + ')'
    npz = path[:-len('json')] + 'npz'
    if not os.path.exists(npz):
        return f"damaged ({os.path.basename(npz)} is missing)"
    if sha256_file(npz) != old.get('predictions_sha256'):
        return (f"damaged ({os.path.basename(npz)} does not match the predictions_sha256 in its JSON: "
                f"truncated or changed)")
    return 'done'


def set_aside_damaged(json_path, study_dir, state):
    """Move a damaged trial's files to <study>/damaged/<time>/ (kept, not deleted); returns
    the one line that says so."""
    moved = set_aside([json_path, json_path[:-len('json')] + 'npz'], study_dir)
    where = os.path.dirname(os.path.dirname(os.path.dirname(moved[0])))
    return (f"{os.path.relpath(json_path, study_dir)} is {state}: its files moved to {where}; "
            f"training it again")
