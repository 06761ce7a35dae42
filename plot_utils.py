"""
Plots of an analysed study, drawn from its summary.json alone (so --plots-only can redraw
them), plus the activation functions in numpy. No torch; no pyplot: figures are plain
matplotlib Figures rendered by the Agg canvas, so nothing needs a display and no global
backend state is touched.

Every PNG is written to a temp file beside its path and renamed into place; all figures of
a call are built before the first one is written, so a summary that cannot be plotted
replaces no existing plot.
"""
import math
import os
import textwrap

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import offset_copy
from scipy.special import erf

from activation_names import GATE_OF, base_activation, canonical_activation, smelu_beta
from fileio import atomic_write

# ----------------------------------------------------------------------------- files

def save_figure(fig, path):
    FigureCanvasAgg(fig)  # the Agg canvas: headless rendering
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=120, bbox_inches='tight'))


# ----------------------------------------------------------------------------- activations in numpy

SELU_ALPHA, SELU_SCALE = 1.6732632423543772, 1.0507009873554805


def _sigmoid(x):
    return 0.5 * (1 + np.tanh(0.5 * x))  # no overflow warnings for large |x|


def _softplus(x):
    return np.logaddexp(0, x)


def _smelu(b):
    return (lambda x: np.where(x <= -b, 0.0, np.where(x >= b, x, (x + b) ** 2 / (4 * b))),
            lambda x: np.where(x <= -b, 0.0, np.where(x >= b, 1.0, (x + b) / (2 * b))))


_phi = lambda x: np.exp(-x ** 2 / 2) / math.sqrt(2 * math.pi)  # noqa: E731  standard normal pdf
_Phi = lambda x: 0.5 * (1 + erf(x / math.sqrt(2)))  # noqa: E731  exact normal cdf (exact GELU)

# name -> (f, f'), written from the definitions
ACTIVATIONS = {
    'relu': (lambda x: np.maximum(x, 0.0), lambda x: (x > 0).astype(float)),
    'gelu': (lambda x: x * _Phi(x), lambda x: _Phi(x) + x * _phi(x)),
    'swish': (lambda x: x * _sigmoid(x), lambda x: _sigmoid(x) * (1 + x * (1 - _sigmoid(x)))),
    'mish': (lambda x: x * np.tanh(_softplus(x)),
             lambda x: np.tanh(_softplus(x)) + x * _sigmoid(x) * (1 - np.tanh(_softplus(x)) ** 2)),
    'elu': (lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))), lambda x: np.where(x > 0, 1.0, np.exp(np.minimum(x, 0)))),
    'selu': (lambda x: SELU_SCALE * np.where(x > 0, x, SELU_ALPHA * np.expm1(np.minimum(x, 0))),
             lambda x: SELU_SCALE * np.where(x > 0, 1.0, SELU_ALPHA * np.exp(np.minimum(x, 0)))),
    'leaky_relu': (lambda x: np.where(x > 0, x, 0.01 * x), lambda x: np.where(x > 0, 1.0, 0.01)),
}


def activation_fn(name):
    """(f, f', label) in numpy for an activation name; gated names give their gate's function.
    Unknown names raise activation_names' ValueError listing the valid ones."""
    base = base_activation(name)
    beta = smelu_beta(base)
    if beta is not None:
        return (*_smelu(beta), f'{name} (beta={beta:g})')
    label = f'{name} (gate: {base})' if name in GATE_OF else name
    return (*ACTIVATIONS[base], label)


# ----------------------------------------------------------------------------- figures

def activation_colors(names):
    """A fixed colour per activation (sorted order), shared by every plot of a study."""
    names = sorted(set(names))
    cmap = 'tab10' if len(names) <= 10 else 'tab20'
    cm = colormaps[cmap]
    return {n: cm(i % cm.N) for i, n in enumerate(names)}


def _grid(n, width=5.0, height=3.6):
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows))
    axes = [fig.add_subplot(rows, cols, k + 1) for k in range(n)]
    return fig, axes


def _by_model(summary):
    models = {}
    for r in summary['results']:
        models.setdefault(r['model_name'], []).append(r)
    return models


def _metric(r, name):
    """(mean, ci or None) of a pairwise metric of a result entry; (None, None) if it has none."""
    m = (r.get('pairwise') or {}).get(name)
    if not m or m.get('mean') is None:
        return None, None
    return m['mean'], m.get('ci')


def training_curves(results, colors, model):
    """Train and val loss against iteration: mean over trials with a min-max band, one colour
    per activation. Only iterations every trial of the group logged are drawn. None when no
    trial logged a history."""
    if not any(t.get('history') and t['history'].get('iter') for r in results for t in r['trials']):
        return None
    fig = Figure(figsize=(11, 4))
    axes = [fig.add_subplot(1, 2, k + 1) for k in range(2)]
    for r in results:
        hists = [t.get('history') for t in r['trials']]
        hists = [h for h in hists if h and h.get('iter')]
        if not hists:
            continue
        common = sorted(set.intersection(*(set(h['iter']) for h in hists)))
        for ax, key in zip(axes, ('train_loss', 'val_loss')):
            ys = np.array([[dict(zip(h['iter'], h[key]))[i] for i in common] for h in hists], dtype=float)
            c = colors[r['activation']]
            ax.plot(common, ys.mean(0), color=c, label=f"{r['activation']} ({len(hists)})")
            if len(hists) > 1:
                ax.fill_between(common, ys.min(0), ys.max(0), color=c, alpha=0.2, linewidth=0)
    for ax, title in zip(axes, ('train loss', 'val loss')):
        ax.set_title(f'{model}: {title} (mean, band = min-max over trials)', fontsize=9)
        ax.set_xlabel('iteration')
        ax.set_ylabel('loss (nats)')
    axes[1].legend(fontsize=7, title='activation (trials)', title_fontsize=7)
    return fig


def _no_pairs(r):
    n = r.get('n_trials')
    return 'no pairs' + ('' if n is None else f" ({n} trial{'' if n == 1 else 's'})")


def metric_bars(summary, colors, metric, ylabel):
    """Per model, one bar per activation (mean over pairs) with its 95% interval over trials
    drawn as a line; groups whose interval is withheld (too few trials) get no line and a
    label saying so. Models without a single pair of trials get no panel; None when no model
    has one (one trial per group: nothing to compare)."""
    models = {m: rs for m, rs in _by_model(summary).items() if any(_metric(r, metric)[0] is not None for r in rs)}
    if not models:
        return None
    fig, axes = _grid(len(models))
    for ax, (model, results) in zip(axes, models.items()):
        names = [r['activation'] for r in results]
        x = np.arange(len(results))
        for k, r in enumerate(results):
            mean, ci = _metric(r, metric)
            if mean is None:  # inside the axes whatever their scale: x in data, y in axes units
                ax.text(k, 0.02, _no_pairs(r), ha='center', va='bottom', fontsize=7, rotation=90,
                        transform=ax.get_xaxis_transform())
                continue
            ax.bar(k, mean, color=colors[r['activation']])
            if ci:
                ax.vlines(k, ci[0], ci[1], color='black', linewidth=1.2)
                ax.plot([k, k], ci, color='black', marker='_', markersize=8, linestyle='none')
            else:
                ax.text(k, mean, f"no CI\n({r.get('n_trials')} trials)", ha='center', va='bottom', fontsize=6)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=45, ha='right', fontsize=8)
        ax.set_xlim(-0.6, len(results) - 0.4)  # every group's slot, bar or not
        ax.set_title(model, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=8)
    fig.suptitle(f'{ylabel} between trials (bars: mean over pairs; lines: 95% jackknife CI over trials, '
                 f'none where too few trials)', fontsize=10)
    return fig


def accuracy_vs_pd(summary, colors):
    """Mean val accuracy against mean relative PD, one point per model x activation
    (colour: activation, marker: model); None when no group has both."""
    fig = Figure(figsize=(7.5, 5.5))
    ax = fig.add_subplot(1, 1, 1)
    markers = 'osD^v<>pPhX*'
    models = list(_by_model(summary))
    left_out = 0
    for r in summary['results']:
        pd, _ = _metric(r, 'relative_pd')
        acc = r.get('avg_val_accuracy')
        if pd is None or acc is None:
            left_out += 1
            continue
        ax.scatter(pd, acc, color=colors[r['activation']], marker=markers[models.index(r['model_name']) % len(markers)],
                   s=45, edgecolors='black', linewidths=0.4)
    # two legends: colours for activations, markers for models
    act = [Line2D([], [], color=c, marker='o', linestyle='none', label=n) for n, c in colors.items()]
    mod = [Line2D([], [], color='grey', marker=markers[k % len(markers)], linestyle='none', label=m)
           for k, m in enumerate(models)]
    first = ax.legend(handles=act, fontsize=7, title='activation', title_fontsize=7, loc='upper left',
                      bbox_to_anchor=(1.01, 1))
    ax.add_artist(first)
    ax.legend(handles=mod, fontsize=7, title='model', title_fontsize=7, loc='lower left', bbox_to_anchor=(1.01, 0))
    ax.set_xlabel('mean relative PD between trials')
    ax.set_ylabel('mean val accuracy')
    note = f' ({left_out} without PD not shown)' if left_out else ''
    ax.set_title('accuracy vs reproducibility, per model x activation' + note, fontsize=10)
    return fig if left_out < len(summary['results']) else None


def sig(v, digits=2):
    """v with `digits` significant digits, trailing zeros kept, so that the cells of one
    plot read alike: 0.28, 0.053, 0.0059, 1.0e-5."""
    return f'{v:#.{digits}g}'.replace('e-0', 'e-')


def pd_heatmap(summary):
    """Model x activation matrix of mean relative PD, each cell labelled with two significant
    digits; grey where a group has no value. Sized by its cells; None when no cell has a value."""
    models = list(_by_model(summary))
    acts = sorted({r['activation'] for r in summary['results']})
    grid = np.full((len(models), len(acts)), np.nan)
    for r in summary['results']:
        pd, _ = _metric(r, 'relative_pd')
        if pd is not None:
            grid[models.index(r['model_name']), acts.index(r['activation'])] = pd
    if np.isnan(grid).all():
        return None
    # ~0.9 in per column and 0.55 in per row, with room for the labels, the colour bar and
    # the study's title (wide enough that it wraps to a line or two, not five)
    fig = Figure(figsize=(max(6.0, 2.5 + 0.9 * len(acts)), max(3.0, 1.6 + 0.55 * len(models))))
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps['viridis'].with_extremes(bad='lightgrey')
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect='auto')
    mid = np.nanmean(grid)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, '—' if np.isnan(v) else sig(v), ha='center', va='center', fontsize=8,
                color='black' if np.isnan(v) or v > mid else 'white')
    ax.set_xticks(range(len(acts)))
    ax.set_xticklabels(acts, rotation=45 if len(acts) > 4 else 0, ha='right' if len(acts) > 4 else 'center',
                       fontsize=8)
    ax.set_yticks(range(len(models)))
    ax.set_yticklabels(models, fontsize=8)
    bar = fig.colorbar(im, ax=ax)
    bar.set_label('mean relative PD', fontsize=8)
    bar.ax.tick_params(labelsize=8)
    ax.set_title('mean relative PD between trials' + (' (grey: no pairs)' if np.isnan(grid).any() else ''),
                 fontsize=10)
    return fig


def routing_agreement(summary, colors):
    """Mixture-of-experts groups: routing agreement between trials (bars, 95% CI lines, chance
    level as a dashed tick) and, beside it, routing agreement against relative PD per group.
    None when no group has a routing agreement (no mixture of experts, or no pairs)."""
    rows = [r for r in summary['results'] if (r.get('routing_agreement') or {}).get('mean') is not None]
    if not rows:
        return None
    fig = Figure(figsize=(12, 4.5))
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for k, r in enumerate(rows):
        ra, c = r['routing_agreement'], colors[r['activation']]
        ax.bar(k, ra['mean'], color=c)
        if ra.get('ci'):
            ax.plot([k, k], ra['ci'], color='black', marker='_', markersize=8, linewidth=1.2)
        ax.plot([k - 0.4, k + 0.4], [ra['chance_mean']] * 2, color='black', linestyle='--', linewidth=1)
        pd, ci = _metric(r, 'relative_pd')
        if pd is not None:
            rci = ra.get('ci')
            ax2.errorbar(ra['mean'], pd, yerr=None if not ci else [[pd - ci[0]], [ci[1] - pd]],
                         xerr=None if not rci else [[ra['mean'] - rci[0]], [rci[1] - ra['mean']]], color=c,
                         marker='o', markeredgecolor='black', capsize=3)
            ax2.annotate(f"{r['model_name']}/{r['activation']}", (ra['mean'], pd), fontsize=7,
                         xytext=(4, 4), textcoords='offset points')
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['model_name']}/{r['activation']}" for r in rows], rotation=45, ha='right', fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel('routing agreement between trials')
    ax.set_title('routing agreement (lines: 95% CI; dashed: chance)', fontsize=10)
    ax2.set_xlabel('routing agreement')
    ax2.set_ylabel('mean relative PD')
    ax2.set_title('relative PD vs routing agreement (bars: 95% CIs)', fontsize=10)
    return fig


def activation_functions(names):
    """Each activation and its derivative on [-3, 3]; gated ones show their gate function.
    Names without a numpy formula are listed in the title rather than guessed; None when
    no name has one."""
    x = np.linspace(-3, 3, 601)
    fig = Figure(figsize=(11, 4.2))
    ax_f, ax_d = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colors = activation_colors(names)
    seen, unknown = set(), []
    for name in sorted(set(names)):
        try:
            f, df, label = activation_fn(name)
        except ValueError:
            unknown.append(name)
            continue
        key = (canonical_activation(GATE_OF.get(name, name)), name in GATE_OF)
        if key in seen:  # an alias of one already drawn (silu = swish)
            continue
        seen.add(key)
        style = '--' if name in GATE_OF else '-'
        ax_f.plot(x, f(x), style, color=colors[name], label=label)
        ax_d.plot(x, df(x), style, color=colors[name], label=label)
    if not seen:
        return None
    ax_f.set_title('activation f(x)', fontsize=10)
    ax_d.set_title("derivative f'(x)", fontsize=10)
    for ax in (ax_f, ax_d):
        ax.axhline(0, color='grey', linewidth=0.5)
        ax.axvline(0, color='grey', linewidth=0.5)
        ax.set_xlabel('x')
    ax_f.set_ylim(-2, 3)
    ax_d.legend(fontsize=7, loc='upper left')
    if unknown:
        fig.suptitle(f"no formula for: {', '.join(unknown)}", fontsize=8)
    return fig


def pd_over_training(summary, colors):
    """Relative PD between trials at every snapshot (evaluation point), one panel per model, one
    curve per activation with its 95% band (the same jackknife interval as the final figures).
    None when no group saved snapshots."""
    models = {m: [r for r in rs if r.get('snapshots')] for m, rs in _by_model(summary).items()}
    models = {m: rs for m, rs in models.items() if rs}
    if not models:
        return None
    fig, axes = _grid(len(models))
    for ax, (model, results) in zip(axes, models.items()):
        for r in results:
            sn = r['snapshots']
            mean = [x['mean'] for x in sn['relative_pd']]
            ax.plot(sn['iters'], mean, marker='o', markersize=3, color=colors[r['activation']],
                    label=f"{r['activation']} ({r['n_trials']})")
            cis = [x['ci'] for x in sn['relative_pd']]
            if all(cis):
                ax.fill_between(sn['iters'], [c[0] for c in cis], [c[1] for c in cis], color=colors[r['activation']],
                                alpha=0.15, linewidth=0)
        ax.set_title(f"{model}: relative PD between trials over training", fontsize=9)
        ax.set_xlabel('iteration')
        ax.set_ylabel('relative PD (band: 95% CI)')
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, title='activation (trials)', title_fontsize=7)
    return fig


def check_summary(summary):
    """Raise ValueError naming the first thing make_plots would need and not find."""
    if not isinstance(summary, dict) or not isinstance(summary.get('results'), list) or not summary['results']:
        raise ValueError("no 'results' list of model x activation entries")
    for k, r in enumerate(summary['results']):
        if not isinstance(r, dict):
            raise ValueError(f"results[{k}] is not an object")
        for key, kind in (('model_name', str), ('activation', str), ('trials', list)):
            if not isinstance(r.get(key), kind):
                raise ValueError(f"results[{k}] has no {key} ({kind.__name__})")
        if not isinstance(r.get('pairwise'), (dict, type(None))):
            raise ValueError(f"results[{k}].pairwise is not an object")
        for t in r['trials']:
            h = t.get('history') if isinstance(t, dict) else None
            if h is not None and not (isinstance(h, dict) and
                                      all(len(h.get(k2) or []) == len(h.get('iter') or []) for k2 in ('train_loss', 'val_loss'))):
                raise ValueError(f"results[{k}] ({r['model_name']}/{r['activation']}) has a malformed history")


def study_title(summary):
    """'study cpu, preset cpu (overrides: max_iters 60, ...)': on every plot, so a shortened run
    never looks like the preset."""
    info = summary.get('study_info') or {}
    title = f"study {summary.get('study')}" + (f", preset {info['preset']}" if info.get('preset') else '')
    o = info.get('overrides') or {}
    return title + (f" (overrides: {', '.join(f'{k} {v}' for k, v in o.items())})" if o else '')


def _stamp(fig, title):
    """The study's title above everything else of a figure (its own suptitle included): the
    study in 9 points, its overrides below in 7.5, wrapped to the figure's width so that a long
    list of overrides neither widens the plot nor buries it."""
    head, _, rest = title.partition(' (overrides: ')
    top = 0.995 if fig.get_suptitle() else 0.96  # a suptitle hangs from 0.98; axes titles end below
    lift = 0
    if rest:
        width = max(40, int(fig.get_figwidth() * 17))  # characters of 7.5-point text per line
        note = textwrap.fill('overrides: ' + rest[:-1], width)
        fig.text(0.5, top, note, ha='center', va='bottom', fontsize=7.5, color='dimgrey')
        lift = 7.5 * 1.25 * (note.count('\n') + 1) + 2  # its height in points
    fig.text(0.5, top, head, ha='center', va='bottom', fontsize=9,
             transform=offset_copy(fig.transFigure, fig=fig, y=lift, units='points'))


def figures(summary, keep_omitted=False):
    """Every plot of a study as {file name: Figure}, nothing written yet; each is titled
    with the study (study_title). A plot with nothing to show (no pairs of trials: one trial
    per group) is left out, or with keep_omitted kept as None, for save_figures to remove
    an earlier analysis' copy."""
    figs = _figures(summary)
    title = study_title(summary)
    for fig in figs.values():
        if fig is not None:
            _stamp(fig, title)
    return figs if keep_omitted else {name: fig for name, fig in figs.items() if fig is not None}


def _figures(summary):
    check_summary(summary)
    colors = activation_colors(r['activation'] for r in summary['results'])
    figs = {f'training_curves_{model}.png': training_curves(results, colors, model)
            for model, results in _by_model(summary).items()}
    figs['relative_pd.png'] = metric_bars(summary, colors, 'relative_pd', 'relative PD')
    figs['top1_disagreement.png'] = metric_bars(summary, colors, 'top1_disagreement', 'top-1 disagreement')
    figs['accuracy_vs_relative_pd.png'] = accuracy_vs_pd(summary, colors)
    figs['relative_pd_heatmap.png'] = pd_heatmap(summary)
    figs['activation_functions.png'] = activation_functions([r['activation'] for r in summary['results']])
    figs['routing_agreement.png'] = routing_agreement(summary, colors)
    figs['relative_pd_over_training.png'] = pd_over_training(summary, colors)
    return figs


def save_figures(figs, plots_dir):
    """Write each Figure of {file name: Figure} into plots_dir; a None (a plot with nothing
    to show) removes that file, if there, so that no plot of an earlier analysis is taken
    for this one. Returns the paths written."""
    paths = []
    for name, fig in figs.items():
        path = os.path.join(plots_dir, name)
        if fig is None:
            if os.path.isfile(path):
                os.remove(path)
            continue
        save_figure(fig, path)
        paths.append(path)
    return paths


def make_plots(summary, plots_dir):
    """Every plot of a study into plots_dir (all built before the first is written; those
    with nothing to show are not drawn); returns the paths written."""
    return save_figures(figures(summary, keep_omitted=True), plots_dir)


def comparison_plot(rows, label_a, label_b, warning=None):
    """Side-by-side bars of relative PD, val loss and val accuracy of two studies, per
    model x activation (rows as in analyze_results.compare), the legend outside the bars.
    `warning` (e.g. that the two studies are not like for like) is written above the plots."""
    keys = [('relative_pd', 'mean relative PD'), ('val_loss', 'mean val loss'), ('val_accuracy', 'mean val accuracy')]
    labels = [f"{r['model']}/{r['activation']}" for r in rows]
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(8, 0.45 * len(rows) + 2), 10))
    for k, (key, title) in enumerate(keys):
        ax = fig.add_subplot(3, 1, k + 1)
        for side, label, shift in (('a', label_a, -0.2), ('b', label_b, 0.2)):
            v = np.array([np.nan if r[side][key] is None else r[side][key] for r in rows], dtype=float)
            ax.bar(x + shift, v, width=0.4, label=label)  # nan: no bar
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x)
        ax.set_xticklabels(labels if k == 2 else [], rotation=60, ha='right', fontsize=7)
        if k == 0:  # one legend, right of the top plot: never over a bar
            ax.legend(title='study', fontsize=8, title_fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0))
    if warning:
        width = max(60, int(fig.get_figwidth() * 14))
        fig.suptitle(textwrap.fill(f"warning: {warning}", width), fontsize=9, color='firebrick',
                     ha='center', va='bottom', y=0.92)  # above the top plot's title
    return fig


# ============================================================================= the FFN study (mnist_ffn)
# From the FFN study's summary.json (ffn_report.build_ffn_summary); nulls there (fileio.json_ready:
# no finished run) become NaN here, i.e. no point.
