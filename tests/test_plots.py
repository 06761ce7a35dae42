"""plot_utils on summaries written here by hand: no empty plot for groups of one trial (and
no stale one left from an earlier analysis), a legible relative-PD heatmap, labels inside
their axes, and compare.png's legend off the bars with the caller's warning drawn in."""
import re

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg

import plot_utils

ACTS = ('relu', 'gelu', 'swish', 'swiglu')


def summary(models=('minigpt', 'charlm'), acts=ACTS, trials=3, single=()):
    """Groups of `trials` trials; the (model, activation) pairs in `single` have one trial."""
    rng = np.random.default_rng(0)
    results = []
    for m in models:
        for a in acts:
            n = 1 if (m, a) in single else trials
            hist = {'iter': [0, 5, 10], 'train_loss': [4.0, 3.0, 2.5], 'val_loss': [4.1, 3.1, 2.6]}
            pd, t1 = float(10 ** rng.uniform(-3, -0.5)), float(rng.uniform(0.01, 0.2))
            pairwise = None if n < 2 else {'relative_pd': {'mean': pd, 'ci': [pd * .8, pd * 1.2]},
                                           'top1_disagreement': {'mean': t1, 'ci': [t1 * .8, t1 * 1.2]}}
            results.append({'model_name': m, 'activation': a, 'n_trials': n, 'trials': [{'history': hist}] * n,
                            'pairwise': pairwise, 'avg_val_accuracy': float(rng.uniform(.3, .5))})
    return {'study': 'quick', 'results': results,
            'study_info': {'preset': 'cpu', 'overrides': {'max_iters': 60, 'n_embd': 64, 'block_size': 64,
                                                          'n_eval': 200, 'learning_rate': 0.001}}}


def drawn(fig):
    FigureCanvasAgg(fig).draw()
    return fig.canvas.get_renderer()


def inside(inner, outer, slack=1.0):
    return (inner.x0 >= outer.x0 - slack and inner.x1 <= outer.x1 + slack and
            inner.y0 >= outer.y0 - slack and inner.y1 <= outer.y1 + slack)


# ----------------------------------------------------------------------------- nothing to show

def test_one_trial_per_group_draws_no_comparison_plots(tmp_path):
    s = summary(trials=1)
    figs = plot_utils.figures(s)
    assert set(figs) == {'training_curves_minigpt.png', 'training_curves_charlm.png', 'activation_functions.png'}
    assert all(f is not None for f in figs.values())
    # an earlier analysis with pairs left its plots: they no longer describe this study
    plots = tmp_path / 'plots'
    earlier = plot_utils.make_plots(summary(), str(plots))
    assert (plots / 'relative_pd.png').exists() and (plots / 'relative_pd_heatmap.png').exists()
    written = plot_utils.make_plots(s, str(plots))
    assert sorted(p.name for p in plots.iterdir()) == sorted(figs) == sorted(w.rsplit('/', 1)[1] for w in written)
    assert len(earlier) == 7


def test_a_model_without_pairs_gets_no_panel_and_a_lone_group_is_labelled_inside(tmp_path):
    single = {('charlm', a) for a in ACTS} | {('minigpt', 'relu'), ('minigpt', 'swiglu')}
    figs = plot_utils.figures(summary(single=single))
    for name in ('relative_pd.png', 'top1_disagreement.png'):
        fig = figs[name]
        renderer = drawn(fig)
        assert [ax.get_title() for ax in fig.axes] == ['minigpt'], "charlm has no pairs: no panel"
        ax = fig.axes[0]
        labels = [t for t in ax.texts if t.get_text().startswith('no pairs')]
        assert [t.get_text() for t in labels] == ['no pairs (1 trial)'] * 2
        for t in labels:  # the last slot included: nothing clipped at the edge
            assert inside(t.get_window_extent(renderer), ax.get_window_extent(renderer))


# ----------------------------------------------------------------------------- the heatmap

def test_the_heatmap_is_sized_by_its_cells_and_labelled_alike():
    small = plot_utils.pd_heatmap(summary(models=('minigpt',), acts=('relu', 'gelu')))
    big = plot_utils.pd_heatmap(summary(acts=ACTS + ('geglu', 'mish', 'elu', 'selu')))
    assert small.get_figwidth() >= 6 and big.get_figwidth() > small.get_figwidth()
    tall = plot_utils.pd_heatmap(summary(models=('minigpt', 'charlm', 'convlm', 'hybridlm', 'nanotransformer')))
    assert tall.get_figheight() > small.get_figheight()
    cells = [t.get_text() for t in big.axes[0].texts]
    assert len(cells) == 16
    for c in cells:  # two significant digits each, trailing zeros kept
        digits = re.sub(r'e-?\d+$', '', c).replace('.', '').lstrip('0')
        assert len(digits) == 2, c
    assert plot_utils.sig(0.05) == '0.050' and plot_utils.sig(0.00592) == '0.0059' and plot_utils.sig(1e-5) == '1.0e-5'


def test_the_heatmap_title_is_short_and_the_study_line_small():
    fig = plot_utils.figures(summary(models=('minigpt',), acts=('relu', 'gelu')))['relative_pd_heatmap.png']
    renderer = drawn(fig)
    title = fig.axes[0].get_title()
    assert '\n' not in title and len(title) < 60
    # the study and its overrides: above the plot, at most two lines of small text each
    stamps = sorted(fig.texts, key=lambda t: t.get_fontsize())
    assert any('max_iters 60' in t.get_text() for t in stamps) and max(t.get_fontsize() for t in stamps) <= 9
    assert sum(t.get_text().count('\n') + 1 for t in stamps) <= 3
    height = sum(t.get_window_extent(renderer).height for t in stamps)
    assert height < 0.2 * fig.bbox.height


def test_no_cell_with_a_value_draws_no_heatmap():
    assert plot_utils.pd_heatmap(summary(trials=1)) is None
    assert plot_utils.pd_heatmap(summary(single={('minigpt', 'relu')})) is not None


# ----------------------------------------------------------------------------- compare.png

def rows():
    return [{'model': m, 'activation': a, 'a': {'relative_pd': .05, 'val_loss': 1.7, 'val_accuracy': .45},
             'b': {'relative_pd': .06, 'val_loss': 1.6, 'val_accuracy': .47}}
            for m in ('minigpt', 'charlm') for a in ACTS]


def test_the_comparison_legend_covers_no_bar_and_the_warning_is_drawn():
    warning = 'not like for like: a and b differ in max_iters (200 vs 2000)'
    fig = plot_utils.comparison_plot(rows(), 'a', 'b', warning=warning)
    renderer = drawn(fig)
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent(renderer)), "the legend lies outside every plot"
    texts = [t.get_text() for t in fig.texts] + [fig.get_suptitle()]
    assert any(warning in t.replace('\n', ' ') for t in texts)
    plain = plot_utils.comparison_plot(rows(), 'a', 'b')
    assert not plain.get_suptitle() and not any('like for like' in t.get_text() for t in plain.texts)
