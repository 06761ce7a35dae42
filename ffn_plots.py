"""
The FFN study's plots (the mnist_ffn design; ffn_report.py builds the summary they draw):
accuracy against width, best-of-k curves, PD against width. No torch.
"""
import numpy as np
from matplotlib.figure import Figure

from plot_utils import activation_colors


def _f(values):
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _ci_bars(values, cis):
    """Error-bar lengths [2, n] (below, above) from values and [lo, hi] intervals (None: none)."""
    v = _f(values)
    lo = _f([c[0] if c else None for c in cis])
    hi = _f([c[1] if c else None for c in cis])
    return np.nan_to_num(np.stack([v - lo, hi - v]), nan=0.0)


def _dodge(widths, i, n):
    """x positions of line i of n on a log2 width axis, shifted so their error bars do not overlap."""
    return np.array(widths, dtype=float) * 2 ** (0.06 * (i - (n - 1) / 2))


def ffn_accuracy_vs_width(s):
    """The original's plot: per k, expected best-of-k validation accuracy (solid) and the selected
    runs' test accuracy (dashed) against width, one colour per activation, 95% CI bars."""
    ks, cks, acts, widths = s['ks'], s['curve_ks'], s['activations'], s['widths']
    fig = Figure(figsize=(3.6 * len(ks), 3.6))
    axes = fig.subplots(1, len(ks), sharey=True, squeeze=False)[0]
    colors = activation_colors(acts)
    for ax, k in zip(axes, ks):
        q = cks.index(k)
        for i, a in enumerate(acts):
            x = _dodge(widths, i, len(acts))
            for split, style in (('val', '-'), ('test', '--')):
                c = [r['curves'][a] for r in s['results']]
                ax.errorbar(x, _f([cc[split][q] for cc in c]), yerr=_ci_bars([cc[split][q] for cc in c],
                            [cc[f'{split}_ci'][q] for cc in c]), fmt='o' + style, color=colors[a], capsize=3,
                            alpha=1.0 if split == 'val' else 0.6,
                            label=f"{a} ({'best val' if split == 'val' else 'test of selected'})")
        ax.set_xscale('log', base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_title(f'best-of-{k}', fontsize=10)
        ax.set_xlabel('hidden width')
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('accuracy')
    axes[-1].legend(fontsize=7, loc='lower right')
    fig.suptitle(f"{s['task']}, gated width {s['gated_width']}: expected best-of-k accuracy vs width (95% CI over seeds)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def ffn_best_of_k_curves(s):
    """Per width: expected best-of-k validation (solid) and test-of-selected (dashed) accuracy
    against k, with 95% CI bands."""
    acts, ks = s['activations'], np.array(s['curve_ks'])
    fig = Figure(figsize=(3.6 * len(s['results']), 3.4))
    axes = fig.subplots(1, len(s['results']), sharey=True, squeeze=False)[0]
    colors = activation_colors(acts)
    for ax, r in zip(axes, s['results']):
        for a in acts:
            c = r['curves'][a]
            for split, style in (('val', '-'), ('test', '--')):
                ax.plot(ks, _f(c[split]), style, color=colors[a], label=f"{a} {'best val' if split == 'val' else 'test'}")
                ci = c[f'{split}_ci']
                ax.fill_between(ks, _f([x[0] if x else None for x in ci]), _f([x[1] if x else None for x in ci]),
                                color=colors[a], alpha=0.15 if split == 'val' else 0.08, linewidth=0)
        params = ', '.join(f"{a} {(r['params'].get(a) or {}).get('n_params', '?')}" for a in acts)
        ax.set_title(f"width {r['width']} (params: {params})", fontsize=8)
        ax.set_xscale('log', base=2)
        ticks = [k for k in s['curve_ks'] if k & (k - 1) == 0]  # powers of two
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.set_xlabel('k (configurations searched)')
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('accuracy')
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{s['task']}, gated width {s['gated_width']}: best-of-k curves", fontsize=10)
    fig.tight_layout()
    return fig


def ffn_pd_vs_width(s):
    """Relative PD between seeds at each width's shared configuration, 95% CI bars."""
    acts, widths = s['activations'], s['widths']
    fig = Figure(figsize=(5, 3.6))
    ax = fig.subplots()
    colors = activation_colors(acts)
    for i, a in enumerate(acts):
        x = _dodge(widths, i, len(acts))
        p = [r['pd']['activations'].get(a) or {} for r in s['results']]
        ax.errorbar(x, _f([q.get('relative_pd') for q in p]), yerr=_ci_bars([q.get('relative_pd') for q in p],
                    [q.get('ci') for q in p]), fmt='o-', color=colors[a], capsize=3, label=a)
    ax.set_xscale('log', base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.set_xlabel('hidden width')
    ax.set_ylabel('relative PD between seeds')
    cells = sorted({(r['pd']['batch_size'], r['pd']['learning_rate']) for r in s['results']})
    where = f"batch {cells[0][0]}, lr {cells[0][1]:g}" if len(cells) == 1 else 'per-width cells: see REPORT.md'
    ax.set_title(f"{s['task']}, gated width {s['gated_width']}: PD between seeds\nat one config shared by the "
                 f"models ({where})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def ffn_figures(s):
    """Every plot of the FFN study as {file name: Figure}, nothing written yet."""
    if not isinstance(s, dict) or not s.get('results') or not s.get('activations'):
        raise ValueError("not an FFN study summary (no results or activations)")
    return {'ffn_accuracy_vs_width.png': ffn_accuracy_vs_width(s), 'ffn_best_of_k.png': ffn_best_of_k_curves(s),
            'ffn_pd_vs_width.png': ffn_pd_vs_width(s)}
