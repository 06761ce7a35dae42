"""
Every Markdown report of an analysed study, rendered from its summary dict alone
(analyze_results.py builds the dicts): REPORT.md (render_report) and COMPARE.md
(render_compare). One job: say in words what the numbers support, and what they cannot
support at the number of trials the study has. No torch.
"""
import math

import pairwise
import stat_tests


def study_header(summary):
    """The report's opening: what was run (Markdown lines)."""
    info = summary.get('study_info')
    if not info:
        return []
    o = info['overrides']
    per = '/'.join(map(str, info['trials_per_group']))
    lines = ["## What was run", "",
             f"- Preset `{info['preset'].rstrip('?')}`" + (" (not recorded by these trials: the preset closest to their "
                                                           "config)" if info['preset'].endswith('?') else '') + "; "
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


def differences_md(differences, name_a, name_b):
    if not differences:
        return ["The two studies ran the same config, vary mode, devices and threads per trial.", ""]
    return ([f"**Not like for like**: the two studies differ in {len(differences)} setting(s); a change below may "
             f"come from these and not only from what you meant to compare.", "",
             f"| setting | {name_a} | {name_b} |", "|---|---|---|"]
            + [f"| {k} | {a} | {b} |" for k, a, b in differences] + [""])


def num(x, digits=4):
    if x is None:
        return '—'
    if x == 0:
        return '0'
    return f'{x:.{digits}f}' if abs(x) >= 10 ** -(digits - 1) else f'{x:.2e}'


def interval(stat, values=None):
    """'[lo, hi]' for a valid interval (marked † where an outlier trial makes it unreliable);
    otherwise the pair values' range, labelled as such."""
    if stat and stat.get('ci'):
        return f"[{num(stat['ci'][0])}, {num(stat['ci'][1])}]" + (' †' if stat.get('ci_reliable') is False else '')
    if values is not None and len(values) >= 2:
        return f"(range of {len(values)} pair values [{num(min(values))}, {num(max(values))}]; no interval possible)"
    if values is not None and len(values) == 1:
        return "(a single pair; no interval possible)"
    return "(no interval possible)"


def _mean_ci(stat):
    return '—' if not stat else f"{num(stat['mean'])} {interval(stat)}"


def _bold_best(results, key, best):
    vals = [key(r) for r in results]
    ok = [v for v in vals if v is not None]
    return {i for i, v in enumerate(vals) if ok and v == best(ok)}


def _p(res):
    if not res:
        return '—'
    how = f"exact, {res['n_permutations']} splits" if res['exact'] else f"{res['n_permutations']} permutations"
    return f"{res['p_value']:.3g} (Holm {res['p_value_holm']:.3g}; {how})"


def statistics_section(s):
    """What the intervals and tests are, and what this study's trial counts allow."""
    st, cmp = s['statistics'], [c for c in s['comparisons'] if c['dispersion']]
    ns = sorted({r['n_trials'] for r in s['results']})
    out = ["## Statistics", "",
           f"Intervals are {st['confidence_level']:.0%} intervals over *trials* (pairs that share a trial are not "
           f"independent). For means over pairs of trials: {st['pairwise_ci']}. For per-trial metrics: "
           f"{st['trial_ci']}. In simulated studies with a known truth these covered it in at least 90% of studies from "
           f"{st['min_trials_for_ci']} trials per group on (docs/analysis.md); with fewer trials no interval "
           f"is given and the range of the pair values is shown instead, labelled as such. "
           f"A {st['confidence_level']:.0%} interval needs at least {st['min_trials_for_ci']} trials per group.", "",
           "Against the baseline, two tests, each Holm-corrected over all comparisons of the study: the "
           "**dispersion test** (is the activation's relative PD between trials higher or lower than the "
           f"baseline's? {st['dispersion']}), which gives the verdict, and the **prediction-shift test** (do the "
           f"two predict differently at all? {st['prediction_shift']}). Two equally reproducible activations that "
           "predict differently fail the second, not the first. 'No detectable difference' is no evidence of "
           f"equality: that takes the **equivalence test** ({st.get('equivalence', 'not run')}), whose verdict "
           "appears only where it is shown.", ""]
    if cmp:
        m = len(cmp)
        need = stat_tests.trials_to_detect(m, st['alpha'])
        least = min(stat_tests.smallest_p(c['n_trials'], c['n_trials_baseline']) for c in cmp)
        out.append(f"This study makes {m} dispersion comparisons with {', '.join(map(str, ns))} trials per group. "
                   f"The smallest p-value its permutation tests can give is {least:.3g}; after Holm over {m} "
                   f"comparisons a result needs p ≤ {st['alpha'] / m:.2g}, which takes at least {need} trials per "
                   "group." + (" **With these trials no reproducibility difference of any size can be detected**: "
                               "every verdict below is 'no detectable difference', which is not evidence that the "
                               "activations are equally reproducible." if least * m > st['alpha'] else ""))
        out.append("")
    elif s['baseline']:
        out += ["No dispersion test: it needs at least 3 trials per group on both sides.", ""]
    return out


def model_section(s, model, results):
    pd = lambda r: (r['pairwise'] or {}).get('relative_pd', {}).get('mean')  # noqa: E731
    best_pd = _bold_best(results, pd, min)
    best_loss = _bold_best(results, lambda r: r['avg_val_loss'], min)
    best_acc = _bold_best(results, lambda r: r['avg_val_accuracy'], max)
    out = [f"## {model}", "", f"task {results[0]['task']}, vary {results[0]['vary']}, "
           f"{results[0]['n_eval']} evaluation examples", "",
           "| activation | trials | relative PD [95% CI] | top-1 disagreement | val loss [95% CI] | "
           "val accuracy [95% CI] | time per trial, all-in (s) |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(results):
        b = lambda text, best: f"**{text}**" if i in best else text  # noqa: E731
        if r['error']:
            pd_cell, top1 = f"ERROR: {r['error']}", '—'
        elif r['n_trials'] < 2:
            pd_cell, top1 = "— (1 trial: no pairs)", '—'
        else:
            p = r['pairwise']['relative_pd']
            pd_cell = b(num(p['mean']), best_pd) + ' ' + interval(p, p['values'])
            top1 = num(r['pairwise']['top1_disagreement']['mean'])
        st = r['trial_stats']
        out.append(f"| {r['activation']} | {r['n_trials']} | {pd_cell} | {top1} | "
                   f"{b(_mean_ci(st['val_loss']), best_loss)} | {b(_mean_ci(st['val_accuracy']), best_acc)} | "
                   f"{timing_cell(r, s.get('study_info'))} |")
    notes = [f"† {r['activation']}: {r['pairwise']['relative_pd']['ci_note']}" for r in results
             if r['pairwise'] and r['pairwise']['relative_pd'].get('ci_reliable') is False]
    out += [""] + notes if notes else []
    others = [m for m in pairwise.PAIR_METRICS if m not in ('relative_pd', 'top1_disagreement')]
    out += ["", "Bold: lowest mean relative PD, lowest val loss, highest val accuracy (means; the intervals say "
            "whether the differences are more than noise).", "",
            f"Other pairwise metrics (mean over pairs; JS divergence in bits; relative_pd_elementwise counts "
            f"probabilities below {s['statistics']['elementwise_floor']:g} as {s['statistics']['elementwise_floor']:g}, "
            "so it measures relative disagreement on every class at least one trial finds plausible, weighing "
            "unlikely classes as much as likely ones, and ignores classes both trials rule out):", "",
            "| activation | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
    for r in results:
        cells = [(f"{r['pairwise'][m]['mean']:.1f}" if m == 'prediction_differences'  # a count
                  else num(r['pairwise'][m]['mean']))
                 if r['pairwise'] and r['pairwise'][m]['mean'] is not None else '—' for m in others]
        out.append(f"| {r['activation']} | " + " | ".join(cells) + " |")
    moe = [r for r in results if r.get('routing_agreement') or (r['trial_stats'] or {}).get('moe_dropped_fraction')]
    if moe:
        out += ["", "Mixture of experts: routing agreement between trials (fraction of evaluation tokens sent "
                "to the same expert after matching experts across the two trials; 1 = identical routing; "
                "'chance' = the same with one trial's tokens shuffled), next to the PD and the routing "
                "statistics of the evaluation set (means over trials):", "",
                "| activation | routing agreement [95% CI] | chance | relative PD | perplexity | "
                "dropped tokens | router entropy (nats) |", "|---|---|---|---|---|---|---|"]
        for r in moe:
            ra, st = r.get('routing_agreement'), r['trial_stats']
            agree = f"{num(ra['mean'])} {interval(ra, ra['values'])}" if ra else '—'
            mean = lambda k: num((st.get(k) or {}).get('mean'))  # noqa: E731
            out.append(f"| {r['activation']} | {agree} | {num(ra['chance_mean']) if ra else '—'} | "
                       f"{num(r['avg_relative_pd'])} | {mean('perplexity')} | {mean('moe_dropped_fraction')} | "
                       f"{mean('moe_router_entropy')} |")
    out += comparison_section(s, model)
    out += over_training_section(model, results)
    out.append("")
    return out


def comparison_section(s, model):
    cmp = [c for c in s['comparisons'] if c['model'] == model]
    base = s['baseline']
    if not cmp:
        return ["", f"No {base} runs for {model}: no comparisons."] if base else []
    out = ["", f"Against {base}: difference in mean relative PD (activation − {base}; negative = more "
           "reproducible), dispersion test p-value (Holm-adjusted), verdict, and the prediction-shift p-value "
           "(Holm-adjusted):", "",
           f"| activation | relative PD | {base} | difference [95% CI] | dispersion p-value | verdict | "
           "prediction shift p-value |", "|---|---|---|---|---|---|---|"]
    for c in cmp:
        if c['error']:
            out.append(f"| {c['activation']} | ERROR: {c['error']} | | | | | |")
            continue
        disp = c['dispersion']
        diff = '—' if c['difference'] is None else num(c['difference']) + ' ' + interval(disp)
        what = disp['verdict'] if disp else c['note']
        out.append(f"| {c['activation']} | {num(c['mean'])} | {num(c['mean_baseline'])} | {diff} | {_p(disp)} | "
                   f"{what} | {_p(c['prediction_shift'])} |")
    placed = [c['on_yardstick'] for c in cmp if c.get('on_yardstick')]
    if placed:
        out += ["", "On the scale of the standard remedy, averaging models (the baseline's ensemble yardstick: "
                "relative PD between the averaged predictions of two disjoint sets of m trials; descriptive for "
                "m > 1):", ""] + [f"- {p}" for p in placed]
    return out


def over_training_section(model, results):
    """Relative PD at each snapshot with its interval, and the paired change between two snapshots."""
    curves = [r for r in results if r.get('snapshots')]
    if not curves:
        notes = sorted({r.get('snapshots_note') for r in results if r.get('snapshots_note')})
        return ["", f"Over training: {'; '.join(notes)}."] if notes else []
    iters = curves[0]['snapshots']['iters']
    out = ["", "Over training: mean relative PD between trials at each evaluation point [95% CI] "
           "(the same trials at every point):", "",
           "| activation | " + " | ".join(str(i) for i in iters) + " |", "|---|" + "---|" * len(iters)]
    for r in curves:
        by_it = dict(zip(r['snapshots']['iters'], r['snapshots']['relative_pd']))
        out.append(f"| {r['activation']} | " + " | ".join(
            f"{num(by_it[i]['mean'], 3)} {interval(by_it[i])}" if i in by_it else '—' for i in iters) + " |")
    out.append("")
    out += [f"- {r['activation']}: {r['snapshot_change']['sentence']}" for r in curves if r.get('snapshot_change')]
    return out


def render_report(s):
    out = [f"# Reproducibility report: {s['study']}", "", *study_header(s),
           "Every number below is computed from the trial files listed under Inputs. Relative PD = "
           "mean |p1 − p2| / (mean p1 + mean p2) between two trials' softmax outputs on the same "
           "evaluation set (= mean total-variation distance; 0 identical, 1 disjoint).", "", "## Warnings", ""]
    out += [f"- {w}" for w in s['warnings']] or ["None."]
    ev = s.get('sanity_evidence') or {}
    if ev:
        out += ["", "Evidence the seed and activation checks used: " + "; ".join(f"{k}: {v}" for k, v in ev.items())
                + "."]
    out += [""] + statistics_section(s)
    if s['baseline'] is None:
        out += ["No relu runs in this study, so no comparisons against a baseline (choose one with --baseline).", ""]
    models = {}
    for r in s['results']:
        models.setdefault(r['model_name'], []).append(r)
    for model, results in models.items():
        out += model_section(s, model, results)
    if s['failures']:
        out += ["## Failed trials", ""]
        out += [f"- {f.get('model')}/{f.get('activation')}/trial_{f.get('trial')}: {f.get('error')}"
                + (" (a later run of it succeeded)" if f.get('has_result') else '') for f in s['failures']]
        out.append("")
    if s['bad_files']:
        out += ["## Skipped files", ""] + [f"- `{b['path']}`: {b['reason']}" for b in s['bad_files']] + [""]
    p = s['provenance']
    out += ["## Inputs", "", f"{p['n_trials']} trials from {len(p['files'])} files; git commits: "
            f"{', '.join(map(str, p.get('git_commits', [])))}; git dirty: {', '.join(map(str, p.get('git_dirtys', [])))}; torch: "
            f"{', '.join(map(str, p.get('torch_versions', [])))}; devices: {', '.join(map(str, p.get('device_names', [])))}.",
            "SHA-256 of every input file: summary.json, provenance.files."]
    resumed = p.get('resumed') or []
    out += [f"Resumed from a mid-trial checkpoint after an interruption ({len(resumed)} trial(s)): "
            + '; '.join(f"{r['trial']} at iteration {', '.join(map(str, r['resumed_from']))}" for r in resumed) + "."
            if resumed else "No trial was resumed from a mid-trial checkpoint.", ""]
    return "\n".join(out)


def render_compare(c):
    """COMPARE.md: two studies side by side (analyze_results.compare_studies builds c)."""
    name_a, name_b, compared = c['study_a'], c['study_b'], c['compared']
    md = [f"# {name_a} vs {name_b}", "", f"a: `{c['dir_a']}`, b: `{c['dir_b']}`", "",
          *differences_md(c['config_differences'], name_a, name_b),
          "Means over trials (relative PD: over pairs of trials); change = "
          f"{name_b} − {name_a}; — where a study has no value.", "", "## Warnings", ""]
    md += [f"- {w}" for w in c['warnings']] or ["None."]
    md += ["", "| model | activation | trials | " + " | ".join(f"{k} {name_a} | {k} {name_b} | change"
                                                            for k in compared) + " |",
           "|---|---|---|" + "---|---|---|" * len(compared)]
    for r in c['rows']:
        md.append(f"| {r['model']} | {r['activation']} | {r['a']['n_trials']} / {r['b']['n_trials']} | " +
                  " | ".join(f"{num(r['a'][k])} | {num(r['b'][k])} | {_change_cell(r, k)}" for k in compared) + " |")
    md += ["", "Changes carry a 95% Welch interval over the two studies' trials (relative PD: from jackknife "
           "standard errors); † none possible: fewer than 3 trials on a side. Two studies are two experiments: "
           "a change is no effect of the setting that differs unless the studies differ in nothing else."]
    return "\n".join(md) + "\n"


def _change_cell(row, k):
    iv = (row.get('change_interval') or {}).get(k)
    if row['change'][k] is None:
        return '—'
    if iv and iv.get('ci'):
        return f"{num(row['change'][k])} [{num(iv['ci'][0])}, {num(iv['ci'][1])}]"
    return f"{num(row['change'][k])} †"


# ----------------------------------------------------------------------------- the FFN study (mnist_ffn)

def _ci_cell(x, ci, digits=3):
    if x is None or not math.isfinite(x):  # no finished run (json_ready: null)
        return '—'
    return f"{x:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else '')


def _ffn_verdict(ci, a, base):
    if not ci:
        return 'n/a'
    return f"{a} higher" if ci[0] > 0 else f"{base} higher" if ci[1] < 0 else 'no clear difference'


def render_ffn_report(s):
    acts, base, ks, cks = s['activations'], s['baseline'], s['ks'], s['curve_ks']
    cfg, n_cells = s['config'], len(s['cells'])
    out = [f"# FFN study: {' vs '.join(acts)} on {s['task']} (gated width: {s['gated_width']})", "",
           f"Measured: `ffn` classifiers (depth {cfg.get('depth')}, {cfg.get('epochs')} epoch(s), AdamW, weight decay "
           f"{cfg.get('weight_decay')}, dropout {cfg.get('dropout')}) on every cell of widths {s['widths']} x batch sizes "
           f"{s['batch_sizes']} x learning rates {s['learning_rates']} ({n_cells} cells), seeds {len(s['seeds'])} per "
           f"cell and activation (trial k has seed seed_base + k in every cell; vary {s['vary']}; the bootstrap "
           f"intervals below were checked by simulation at {s['checked_seeds']} seeds). Tables and curves stop at k = "
           f"{s.get('k_limit', max(s['ks']))}: best-of-k is read only up to k = runs / {s['runs_per_k']}, beyond which it "
           f"tends to the single best run and the bootstrap is unreliable. Gated width "
           f"`same`: a gated activation has `width` gated units (the original FFN_GeGLU); `matched`: the unit count "
           f"whose parameter count is closest to the ungated model's at that width.", "", "## Warnings", ""]
    out += [f"- {w}" for w in s['warnings']] or ["None."]
    out += ["", "## Parameters", "", "| width | " + " | ".join(f"{a} units | {a} params" for a in acts) + " |",
            "|---:|" + "---:|---:|" * len(acts)]
    for r in s['results']:
        out.append(f"| {r['width']} | " + " | ".join(
            f"{(r['params'].get(a) or {}).get('units', '—')} | {(r['params'].get(a) or {}).get('n_params', '—')}"
            for a in acts) + " |")
    out += ["", "## Best-of-k random search", "",
            f"Expected best validation accuracy of k configurations drawn at random (with replacement) from "
            f"all {s['results'][0]['n_grid_runs'] // len(acts)} runs of a width (cells x seeds), exact from the order "
            f"statistics; \"test\" is the held-out test accuracy of the run each search selects, the number to "
            f"compare models by. [95% CI]: {s['statistics']['ci']}. Verdicts from the CI of the test-accuracy "
            f"difference; {len(s['results']) * len(ks)} intervals per activation, not adjusted for multiplicity.", ""]
    for a in acts[1:]:
        out += [f"| width | k | {base} best val | {a} best val | {base} test of selected | {a} test of selected | "
                f"{a} − {base} test [95% CI] | verdict (test) |", "|---:|---:|---|---|---|---|---|---|"]
        for r in s['results']:
            for k in ks:
                q = cks.index(k)
                cb, ca, cmp = r['curves'][base], r['curves'][a], r['comparisons'][a]
                out.append(f"| {r['width']} | {k} | {_ci_cell(cb['val'][q], cb['val_ci'][q])} | "
                           f"{_ci_cell(ca['val'][q], ca['val_ci'][q])} | {_ci_cell(cb['test'][q], cb['test_ci'][q])} | "
                           f"{_ci_cell(ca['test'][q], ca['test_ci'][q])} | "
                           f"{_ci_cell(cmp['test_diff'][q], cmp['test_diff_ci'][q])} | "
                           f"{_ffn_verdict(cmp['test_diff_ci'][q], a, base)} |")
        out.append("")
    out += ["## PD between seeds at one shared configuration", "",
            "Per width, the cell with the best validation accuracy averaged over every activation and seed "
            "(the same configuration for every model). Relative PD of the validation softmax between seeds, "
            "mean over pairs [95% jackknife CI over trials]; the difference [95% CI] and its p-value are the "
            "dispersion test's (is one model's spread between seeds larger?), Holm-adjusted over every width "
            "and activation; shift p: the prediction-shift test (do the models predict differently at all?).", "",
            "| width | cell (batch, lr) | " + " | ".join(f"{a} PD" for a in acts) + " | " +
            " | ".join(f"{a} − {base} [95% CI], p (Holm) | shift p" for a in acts[1:]) + " |",
            "|---:|---|" + "---|" * len(acts) + "---|---|" * (len(acts) - 1)]
    for r in s['results']:
        pd = r['pd']
        cells = [_ci_cell((pd['activations'].get(a) or {}).get('relative_pd'), (pd['activations'].get(a) or {}).get('ci'))
                 for a in acts]
        for a in acts[1:]:
            c = pd['comparisons'].get(a) or {}
            p = '—' if c.get('p_value_holm') is None else f"{c['p_value_holm']:.3g}"
            shift = '—' if c.get('prediction_shift_p_value') is None else f"{c['prediction_shift_p_value']:.3g}"
            cells += [f"{_ci_cell(c.get('difference'), c.get('ci'))}, p {p}" + (f" ({c['note']})" if c.get('note') else ''),
                      shift]
        out.append(f"| {r['width']} | {pd['batch_size']}, {pd['learning_rate']:g} | " + " | ".join(cells) + " |")
    out += ["", "## Every cell", "", "Means over seeds.", "",
            "| width | batch | lr | " + " | ".join(f"{a} val | {a} test | {a} PD" for a in acts) + " |",
            "|---:|---:|---:|" + "---:|---:|---:|" * len(acts)]
    for c in s['cells']:
        out.append(f"| {c['width']} | {c['batch_size']} | {c['learning_rate']:g} | " + " | ".join(
            f"{_ci_cell((c.get(a) or {}).get('val_accuracy'), None)} | {_ci_cell((c.get(a) or {}).get('test_accuracy'), None)} | "
            f"{_ci_cell((c.get(a) or {}).get('relative_pd'), None)}" for a in acts) + " |")
    t = s['timing']
    out += ["", "## Caveats", "",
            "- The intervals cover seed-to-seed variation on this grid and data split; they say nothing about "
            "other grids, epochs or datasets. For k approaching the number of runs, best-of-k tends to the single "
            "best run, where a bootstrap is unreliable: the table stops at k = 8.",
            "- Validation accuracy selects; it is optimistic for the selected run. Compare models by the test column.",
            "- Missing or failed runs count as draws that are never selected (see Warnings).", "",
            "## Inputs", "", f"{t['n_trials']} trials in {n_cells} cells; sum of the trials' own all-in times "
            f"{t['trial_seconds']:.0f} s ({'/'.join(t['threads'])} thread(s) per trial; {', '.join(t['devices'])}); "
            f"git commits {', '.join(s['provenance']['git_commits'])}. SHA-256 of every input file: summary.json, "
            f"provenance.files. Each cell is an ordinary study: `python analyze_results.py --results-dir <cell>`.", ""]
    return "\n".join(out)
