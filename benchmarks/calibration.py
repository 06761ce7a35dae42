"""Issue 23's calibration table: the intervals and tests (intervals.py, stat_tests.py) on simulated studies whose truth
is known (the trial model of tests/test_calibration.py: well-behaved, heavy-tailed 't3' and rare
'outliers' trial noise), before (the former method) and after (the current one).

    nice -n 10 python benchmarks/calibration.py [studies]    # default 300 per cell; writes calibration.json

Rows: coverage of 95% intervals of a cell's mean relative PD (linear jackknife before, logit
jackknife after) and of top-1 disagreement; the dispersion test's level with both groups from
one distribution, and its power; the real power of the test at the minimum detectable
difference it quotes; the equivalence test's level at the margin; paired snapshots.
"""
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), 'tests'))
import stat_settings  # noqa: E402
import test_calibration as tc  # noqa: E402

NS = (3, 5, 10)


def f(x):
    return '-' if x is None else f"{x:.3f}"


def coverage_rows(studies):
    rows = []
    for metric in ('relative_pd', 'top1_disagreement'):
        for noise in tc.NOISES:
            if metric == 'top1_disagreement' and noise == 't3':
                continue
            r = {n: tc.coverage_stats(n, studies, noise=noise, scales=('linear', 'logit'), metric=metric) for n in NS}
            rows.append({'what': f'coverage of 95% interval, {metric}', 'scenario': noise,
                         'before': {n: r[n]['linear']['coverage'] for n in NS},
                         'after': {n: r[n]['logit']['coverage'] for n in NS},
                         'outside_bounds_before': {n: r[n]['linear']['outside_bounds'] for n in NS},
                         'outside_bounds_after': {n: r[n]['logit']['outside_bounds'] for n in NS},
                         'flagged': {n: r[n]['logit']['flagged'] for n in NS},
                         'flagged_given_outlier': {n: r[n]['logit']['flagged_given_outlier'] for n in NS},
                         'coverage_clean': {n: r[n]['logit']['coverage_clean'] for n in NS}})
    return rows


def test_rows(studies):
    rows = []
    for noise in tc.NOISES:
        r = {n: tc.dispersion_rates(n, studies, noise=noise) for n in (5, 10)}
        rows.append({'what': 'dispersion test level (alpha 0.05, equal spread)', 'scenario': noise,
                     'before': {n: r[n]['before'] for n in r}, 'after': {n: r[n]['after'] for n in r}})
    for scale in (1.15, 1.6):
        r = {n: tc.dispersion_rates(n, studies, scale=scale, seed=4) for n in (5, 10)}
        rows.append({'what': f'dispersion test power, noise {scale:g}x', 'scenario': 'normal',
                     'before': {n: r[n]['before'] for n in r}, 'after': {n: r[n]['after'] for n in r}})
    for m in (1, 24):
        r = {n: tc.mdd_power(n, studies, m=m) for n in (4, 5, 10)}
        rows.append({'what': f'real power at the quoted min. detectable difference (Holm step alpha/{m})',
                     'scenario': 'normal', 'before': {n: r[n]['before'][1] for n in r},
                     'after': {n: r[n]['after'][1] for n in r},
                     'quoted_before': {n: r[n]['before'][0] for n in r}, 'quoted_after': {n: r[n]['after'][0] for n in r}})
    return rows


def other_rows(studies):
    margin = stat_settings.EQUIVALENCE_MARGIN
    ns = NS + (20,)
    rows = [{'what': f'equivalence declared, true ratio {1 + margin:g} (at the margin: level)', 'scenario': 'normal',
             'before': None, 'after': {n: tc.equivalence_rate(n, studies, 1 + margin) for n in ns}},
            {'what': f'equivalence declared (margin {margin:g}), true ratio 1 (power)', 'scenario': 'normal',
             'before': None, 'after': {n: tc.equivalence_rate(n, studies, 1.0) for n in ns}},
            {'what': 'equivalence declared (margin 0.25), true ratio 1.25 (level)', 'scenario': 'normal',
             'before': None, 'after': {n: tc.equivalence_rate(n, studies, 1.25, 0.25) for n in ns}},
            {'what': 'equivalence declared (margin 0.25), true ratio 1 (power)', 'scenario': 'normal',
             'before': None, 'after': {n: tc.equivalence_rate(n, studies, 1.0, 0.25) for n in ns}}]
    for late in (1.0, 1.2):
        r = {n: tc.snapshot_rates(n, studies, late) for n in NS}
        rows.append({'what': f'paired snapshots, late noise {late:g}x: coverage', 'scenario': 'normal',
                     'before': None, 'after': {n: r[n]['coverage'] for n in NS}})
        rows.append({'what': f'paired snapshots, late noise {late:g}x: rejections with the right sign'
                     if late != 1 else 'paired snapshots, no change: rejections (level)', 'scenario': 'normal',
                     'before': None, 'after': {n: r[n]['right_sign' if late != 1 else 'rejections'] for n in NS}})
    r = {n: (tc.accuracy_coverage(n, studies, bounds=None), tc.accuracy_coverage(n, studies)) for n in NS}
    rows.append({'what': 'coverage of mean accuracy (describe)', 'scenario': 'normal',
                 'before': {n: r[n][0]['coverage'] for n in NS}, 'after': {n: r[n][1]['coverage'] for n in NS}})
    return rows


def table(rows, studies):
    cols = sorted({n for r in rows for k in ('before', 'after') if r[k] for n in r[k]})
    lines = [f"Simulated studies ({tc.N_ROWS} rows x {tc.N_CLASSES} classes, {studies} studies per cell; "
             f"`python benchmarks/calibration.py {studies}`); before -> after:", "",
             "| | scenario | " + " | ".join(f"n = {n}" for n in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for n in cols:
            b = r['before'].get(n) if r['before'] else None
            a = r['after'].get(n) if r['after'] else None
            cells.append(f"{f(b)} -> {f(a)}" if r['before'] else f(a))
        lines.append(f"| {r['what']} | {r['scenario']} | " + " | ".join(cells) + " |")
    extra = [r for r in rows if 'flagged' in r]
    lines += ["", "Outlier diagnostics (logit interval): | scenario, metric | n | flagged | flagged given an outlier "
              "in the study | coverage of the non-outlier truth in studies without one |"]
    for r in extra:
        for n in NS:
            lines.append(f"| {r['scenario']}, {r['what'].split(', ')[-1]} | {n} | {f(r['flagged'][n])} | "
                         f"{f(r['flagged_given_outlier'][n])} | {f(r['coverage_clean'][n])} |")
    return "\n".join(lines)


def main():
    studies = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    t0 = time.time()
    rows = coverage_rows(studies) + test_rows(studies) + other_rows(studies)
    text = table(rows, studies)
    print(text)
    print(f"\n{time.time() - t0:.0f} s")

    def clean(x):
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        return None if x is None else (float(x) if not isinstance(x, str) else x)
    with open(os.path.join(HERE, 'calibration.json'), 'w') as fh:
        json.dump({'studies_per_cell': studies, 'seconds': time.time() - t0, 'rows': [clean(r) for r in rows]},
                  fh, indent=1)


if __name__ == '__main__':
    main()
