"""
Each activation against the baseline, within one model, for the analysis (no torch): is it
more or less reproducible (the dispersion test, Holm over the study), is it equally
reproducible within a margin (equivalence), do the two predict differently at all (the
prediction-shift test), and does one trial decide the verdict. The statistics themselves live
in intervals.py and stat_tests.py; what they are and how they were calibrated: docs/analysis.md.
"""
import numpy as np

import intervals
import pairwise
import stat_settings
import stat_tests


def n_dispersion_tests(groups, base):
    """How many dispersion tests a study runs (the m of Holm's correction): one per activation
    and model with at least 3 trials on both sides, the baseline excluded."""
    return sum(1 for acts in groups.values() if base in acts and len(acts[base]) >= 3
               for a, ts in acts.items() if a != base and len(ts) >= 3)


def compare_to_baseline(model, act, base, ta, tb, warnings, m=1, margin=stat_settings.EQUIVALENCE_MARGIN):
    """One activation against the baseline on relative PD: the difference of the two mean
    pairwise PDs with the dispersion test (is one more reproducible?), the equivalence test
    (equally reproducible within +/- margin of the baseline's mean?), and the prediction-shift
    test (do they predict differently at all?). p_value_holm and the verdict come later, from
    holm_and_verdicts over the whole study; m: the study's number of dispersion tests."""
    na, nb = len(ta), len(tb)
    out = {'model': model, 'activation': act, 'baseline': base, 'metric': 'relative_pd',
           'n_trials': na, 'n_trials_baseline': nb, 'mean': None, 'mean_baseline': None, 'difference': None,
           'dispersion': None, 'equivalence': None, 'prediction_shift': None, 'note': None, 'error': None}
    try:
        pairs, values = pairwise.compare(ta + tb, {'relative_pd': pairwise.relative_pd})
    except pairwise.EvalMismatch as e:
        out['error'] = str(e)
        warnings.insert(0, f"ERROR {model}: {act} vs {base}: {e}; no comparison")
        return out
    d = pairwise.pair_matrix(na + nb, pairs, values['relative_pd'])
    ia, ib = np.arange(na), np.arange(na, na + nb)
    if min(na, nb) < 2:
        out['note'] = "needs at least 2 trials on each side"
        return out
    out['mean'] = float(intervals.mean_over_distinct_pairs(d, ia))
    out['mean_baseline'] = float(intervals.mean_over_distinct_pairs(d, ib))
    out['difference'] = out['mean'] - out['mean_baseline']
    out['prediction_shift'] = {**stat_tests.exchangeability_test(d, ia, ib), 'p_value_holm': None}
    if min(na, nb) < 3:
        out['note'] = "the dispersion and equivalence tests need at least 3 trials on each side"
        return out
    da, db = d[np.ix_(ia, ia)], d[np.ix_(ib, ib)]
    names_a = [f"trial {t['trial']} of {model}/{act}" for t in ta]
    names_b = [f"trial {t['trial']} of {model}/{base}" for t in tb]
    out['dispersion'] = {**stat_tests.dispersion_test(da, db, m=m, names_a=names_a, names_b=names_b),
                         'p_value_holm': None, 'verdict': None, 'decided_by': None}
    out['equivalence'] = stat_tests.equivalence_test(da, db, margin)
    out['_matrices'] = (da, db, names_a, names_b)  # for the leave-one-out check after Holm; not saved
    return out


def holm_and_verdicts(comparisons):
    """Holm over all comparisons of the study, separately for each test; then each dispersion
    test's verdict in words, with whether a single trial decides it."""
    for test in ('dispersion', 'prediction_shift'):
        stat_tests.holm_in_place([c[test] for c in comparisons])
    m = sum(1 for c in comparisons if c['dispersion'])
    for c in comparisons:
        mats = c.pop('_matrices', None)
        res = c['dispersion']
        if not res:
            continue
        if res['p_value_holm'] <= stat_settings.ALPHA and mats:
            # the p-value this comparison had to reach, given where Holm ranked it
            need = stat_settings.ALPHA * res['p_value'] / res['p_value_holm'] if res['p_value_holm'] > 0 else stat_settings.ALPHA
            loo = stat_tests.leave_one_out(mats[0], mats[1], alpha=need, names_a=mats[2], names_b=mats[3])
            res['decided_by'] = loo['note']
        res['verdict'] = verdict(res, c['n_trials'], c['n_trials_baseline'], m, c['equivalence'])


def verdict(res, na, nb, m, equivalence=None):
    """The dispersion test's answer in words: 'more reproducible' / 'less reproducible' /
    'equally reproducible within the margin' / 'no detectable difference ...', with what the
    design could have detected and the caveats that apply (outlier trials, one trial deciding)."""
    n = f"n = {na} + {nb} trials"
    caveats = [x for x in (res.get('outlier_note') and f"unreliable: {res['outlier_note']}", res.get('decided_by'))
               if x]
    if res['p_value_holm'] <= stat_settings.ALPHA:
        text = 'more reproducible' if res['difference'] < 0 else 'less reproducible'
    elif equivalence and equivalence.get('equivalent'):
        text = (f"equally reproducible within ±{equivalence['margin']:.0%} of the baseline's relative PD "
                f"({equivalence['note']})")
    elif res['min_p_value'] > stat_settings.ALPHA:
        text = (f"no detectable difference at {n}: the smallest p-value this test can give is "
                f"{res['min_p_value']:.3g} > {stat_settings.ALPHA}, so no difference of any size could be detected")
    elif m * res['min_p_value'] > stat_settings.ALPHA:
        text = (f"no detectable difference at {n}: after Holm over {m} comparisons the smallest attainable "
                f"adjusted p-value is {min(1, m * res['min_p_value']):.3g} > {stat_settings.ALPHA}")
    else:
        mdd = res.get('min_detectable_difference')
        text = (f"no detectable difference at {n}"
                + (f" (minimum detectable difference {mdd:.2g} in relative PD, "
                   f"{res['min_detectable_difference_method'].split(':')[0]} for the test as run after Holm)"
                   if mdd is not None else '')
                + "; no evidence of equality either" + (f" ({equivalence['note']})" if equivalence and
                                                          equivalence.get('note') else ''))
    return text + ''.join(f"; {c}" for c in caveats)
