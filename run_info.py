"""
What a study ran, for the analysis (no torch): the preset closest to the config its trials
recorded and every field that differs from it, the grid, the trial count, device and threads,
the tool's git commit (study_info, into summary.json); the report's opening block built from
it (study_header); the report's time column (timing_cell); and for --compare, labels that
tell two studies apart and the settings in which they differ.
"""
import json
import math
import os

import config as presets


def data_fields(record):
    """Config fields the data fixed for this trial (not the user's choice: never an override)."""
    cfg = record.get('config') or {}
    if record.get('task') == 'classification':
        return {'vocab_size', 'n_inputs', 'n_eval'} | ({'max_iters'} if cfg.get('epochs') else set())
    return {'vocab_size'}


def closest_preset(record):
    """(preset name, {field: value} where the trial's config differs from it): the preset
    from which the fewest fields differ (the trial files record the config, not the preset's
    name); fields the data fixes are left out."""
    cfg, skip = record.get('config') or {}, data_fields(record)
    best = None
    for name in presets.preset_names():
        p = presets.get_config(name).to_dict()
        diff = {k: cfg[k] for k in p if k in cfg and k not in skip and cfg[k] != p[k]}
        if best is None or len(diff) < len(best[1]):
            best = (name, diff)
    return best


def study_info(trials):
    """What was run, from the trials' own records: preset and overrides, the grid, trial
    count, device and threads, the tool's git commit(s)."""
    recs = [t['record'] for t in trials]
    prov = [r.get('provenance') or {} for r in recs]
    preset, overrides = closest_preset(recs[0])
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


def study_header(summary):
    """The report's opening: what was run (Markdown lines)."""
    info = summary.get('study_info')
    if not info:
        return []
    o = info['overrides']
    per = '/'.join(map(str, info['trials_per_group']))
    lines = ["## What was run", "",
             f"- Preset `{info['preset']}` (the preset closest to the config the trials recorded); "
             + (f"overrides: {', '.join(f'`{k} {v}`' for k, v in o.items())}" if o else "no overrides"),
             f"- {info['n_trials']} trials: {len(info['models'])} model(s) x {len(info['activations'])} activation(s) "
             f"x {per} trial(s); vary {', '.join(info['vary'])}; dtype {', '.join(info['dtypes'])}",
             f"- Device: {', '.join(info['devices'])}; threads per trial: {', '.join(info['threads'])}",
             f"- Tool: git commit {', '.join(f'`{c[:12]}`' for c in info['git_commits'])}"
             + (" with uncommitted changes" if info['git_dirty'] else '')
             + f"; torch {', '.join(info['torch_versions'])}"]
    if info['config_fields_varying']:
        lines.append(f"- **The trials do not share one config**: {', '.join(info['config_fields_varying'])} differ "
                     f"(the overrides above are the first trial's)")
    lines.append(f"- {timing_note(info)}")
    return lines + [""]


def timing_note(info):
    """What the report's time column is, and whether its rows can be compared."""
    note = ("Time per trial: all-in wall seconds (training, loss estimates, predictions, saving: what train.py "
            "prints per trial), mean ± std over trials")
    mixed = [f"{len(info[k])} {what} ({', '.join(info[k])})" for k, what in
             (('threads', 'thread counts'), ('devices', 'devices')) if len(info[k]) > 1]
    if mixed:
        note += (f". **The trials ran on {' and '.join(mixed)}**: times across them are not comparable"
                 + ("; rows marked † mix them within one model x activation" if info['groups_mixing_threads'] else ''))
    return note + "."


def timing_cell(r, info):
    """Mean ± std of a group's all-in seconds per trial to the std's two significant digits."""
    st = (r.get('trial_stats') or {}).get('total_time')
    if not st:
        return '—'
    mark = ' †' if info and f"{r['model_name']}/{r['activation']}" in info.get('groups_mixing_threads', []) else ''
    return mean_std(st['mean'], st['std']) + mark


def mean_std(mean, std):
    """Seconds as '95.5 ± 4.5' or '44.12 ± 0.31': the std to two significant digits and the mean
    to the same decimal (at most two decimals); with no std, the mean to three significant digits."""
    ref = std if std else abs(mean)
    if not ref:
        return '0'
    d = min(2, max(0, (1 if std else 2) - math.floor(math.log10(ref))))  # timings: never below 10 ms
    return f"{mean:.{d}f}" + (f" ± {std:.{d}f}" if std is not None else '')


def with_study_header(report, summary):
    """The report with the what-was-run block right under its title."""
    title, _, rest = report.partition("\n")
    return "\n".join([title, "", *study_header(summary)]) + rest


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


def differences_md(differences, name_a, name_b):
    if not differences:
        return ["The two studies ran the same config, vary mode, devices and threads per trial.", ""]
    return ([f"**Not like for like**: the two studies differ in {len(differences)} setting(s); a change below may "
             f"come from these and not only from what you meant to compare.", "",
             f"| setting | {name_a} | {name_b} |", "|---|---|---|"]
            + [f"| {k} | {a} | {b} |" for k, a, b in differences] + [""])
