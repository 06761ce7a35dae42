"""
What a study ran, from its trials' own records, for summary.json (no torch): the preset and
every field that differs from it, the grid, the trial count, device and threads, the tool's
git commit (study_info); and for --compare, labels that tell two studies apart and the
settings in which they differ. report.py renders all of it.
"""
import json
import os

import config as presets


def preset_and_overrides(record):
    """(preset name, {field: value} where the trial's config differs from it). Trials record
    their preset; for older ones without it, the preset from which the fewest fields differ
    ('<name>?' marks the guess). Fields the data fixes are never overrides."""
    cfg = record.get('config') or {}
    skip = set(presets.data_fields(record.get('task'), cfg.get('epochs')))
    names = [record['preset']] if record.get('preset') in presets.PRESETS else presets.preset_names()
    best = None
    for name in names:
        p = presets.get_config(name).to_dict()
        diff = {k: cfg[k] for k in p if k in cfg and k not in skip and cfg[k] != p[k]}
        if best is None or len(diff) < len(best[1]):
            best = (name if len(names) == 1 else f"{name}?", diff)
    return best


def study_info(trials):
    """What was run, from the trials' own records: preset and overrides, the grid, trial
    count, device and threads, the tool's git commit(s)."""
    recs = [t['record'] for t in trials]
    prov = [r.get('provenance') or {} for r in recs]
    preset, overrides = preset_and_overrides(recs[0])
    configs = [r.get('config') or {} for r in recs]
    varying = sorted({k for c in configs for k in c if any(c2.get(k) != c.get(k) for c2 in configs)})
    groups = {}
    for t, p in zip(trials, prov):
        groups.setdefault(f"{t['model']}/{t['activation']}", set()).add(p.get('threads'))

    def values(key, source=prov):
        return sorted({str(p.get(key)) for p in source})
    return {
        'preset': preset, 'overrides': overrides, 'config_fields_varying': varying, 'n_trials': len(trials),
        'models': sorted({t['model'] for t in trials}), 'activations': sorted({t['activation'] for t in trials}),
        'trials_per_group': sorted({len([t for t in trials if (t['model'], t['activation']) == g])
                                    for g in {(t['model'], t['activation']) for t in trials}}),
        'vary': values('vary', recs), 'devices': sorted({f"{p.get('device')} ({p.get('device_name')})" for p in prov}),
        'threads': values('threads'), 'groups_mixing_threads': sorted(g for g, th in groups.items() if len(th) > 1),
        'git_commits': values('git_commit'), 'git_dirty': any(p.get('git_dirty') for p in prov),
        'torch_versions': values('torch_version'), 'dtypes': values('dtype', recs),
    }


# ----------------------------------------------------------------------------- two studies

def study_labels(dir_a, dir_b):
    """Names for two study folders that tell them apart: their names, or as many trailing parts
    of their paths as it takes (results/x/cpu and results/y/cpu: x/cpu and y/cpu)."""
    pa = os.path.normpath(os.path.abspath(dir_a)).split(os.sep)
    pb = os.path.normpath(os.path.abspath(dir_b)).split(os.sep)
    for n in range(1, max(len(pa), len(pb)) + 1):
        a, b = os.path.join(*pa[-n:]), os.path.join(*pb[-n:])
        if a != b:
            return a, b
    return f"{pa[-1]} (a)", f"{pb[-1]} (b)"  # one folder given twice


def config_differences(sa, sb):
    """[(field, values in a, values in b)] for every config field (and vary mode, device,
    threads per trial) whose values differ between the two studies' trials."""
    def values(s):
        out = {}
        for r in s['results']:
            for k, v in {**(r.get('config') or {}), 'vary': r.get('vary')}.items():
                out.setdefault(k, set()).add(json.dumps(v))
        info = s.get('study_info') or {}
        for k in ('devices', 'threads'):
            out[k] = {json.dumps(v) for v in info.get(k, [])}
        return out
    va, vb = values(sa), values(sb)
    show = lambda vs: ', '.join(sorted(str(json.loads(v)) for v in vs)) or '—'  # noqa: E731
    return [(k, show(va.get(k, set())), show(vb.get(k, set()))) for k in list(va) + [k for k in vb if k not in va]
            if va.get(k) != vb.get(k)]


