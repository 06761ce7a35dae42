"""
The study designs: what a named study (run_all_experiments.py --study NAME) runs unless flags
say otherwise, and the cells of a grid. A design with a `grid` also sweeps config fields: every
combination of the grid's values is a cell, an ordinary study folder
<results-dir>/<study>/<root>/<cell> holding the models x activations x trials of that config
(root and cell are formats over the cell's config). plan.py turns the command line into a plan
with these; sweep.py runs its jobs.
"""
import itertools
from dataclasses import replace

ORIGINAL_MODELS = ('charlm', 'tinylstm', 'minigpt', 'convlm', 'hybridlm', 'nanotransformer')
PARTIAL_ACTIVATIONS = ('smelu_05', 'smelu_1', 'relu', 'gelu', 'swish')

# A design sets the grid and the preset of a named study; explicit flags override them.
# `tiny_trials`: a trial is far too small for several threads (device.layout: one thread per
# trial and one worker per core unless --workers / --threads say otherwise).
DESIGNS = {
    'seed_partial': dict(config='gpu', models=ORIGINAL_MODELS, activations=PARTIAL_ACTIVATIONS, trials=3,
                         about='the original partial study: 6 models x 5 activations x 3 trials, gpu preset'),
    'seed_full': dict(config='gpu_full', models=ORIGINAL_MODELS, activations=PARTIAL_ACTIVATIONS + ('swiglu',),
                      trials=3, about='the original full study: 6 models x 6 activations x 3 trials, gpu_full preset'),
    # 10 trials per group: enough for the dispersion test to detect a difference after Holm
    # over its 4 comparisons (3 trials cannot: docs/analysis.md); ~30 min on 2 CPU cores
    'cpu_power': dict(config='cpu', models=('minigpt', 'tinylstm'), activations=('relu', 'gelu', 'smelu_1'),
                      trials=10, about='2 models x relu/gelu/smelu_1 x 10 trials, cpu preset: a CPU study '
                                       'that can reach a verdict'),
    # models that have learned (cpu_reference: ~1.9 nats after 2,000 steps), with snapshots of the
    # predictions at every evaluation point (250 steps): how reproducibility evolves over training
    'cpu_converged': dict(config='cpu_reference', models=('minigpt', 'tinylstm'),
                          activations=('relu', 'gelu', 'smelu_1'), trials=8,
                          about='2 models x relu/gelu/smelu_1 x 8 trials, cpu_reference preset (2,000 steps), '
                                'snapshots every 250 steps: reproducibility over training'),
    'mnist_ffn': dict(config='mnist_ffn', models=('ffn',), activations=('relu', 'geglu'), trials=20,
                      grid={'hidden': (2, 4, 8, 16), 'batch_size': (8, 64), 'learning_rate': (1e-1, 1e-2, 1e-3, 1e-4)},
                      root='{dataset}/gated_{gated_width}', cell='h{hidden}_b{batch_size}_lr{learning_rate:g}',
                      tiny_trials=True,
                      about='FFN_ReLU vs FFN_GeGLU on MNIST-1D / MNIST (--task): every width x batch size x '
                            'learning rate, 20 seeds each; best-of-k report (--gated-width same|matched)'),
}
# the command-line flags that override a grid's values (a design's grid fields cannot be set otherwise)
GRID_FLAGS = {'hidden': 'widths', 'batch_size': 'batch_sizes', 'learning_rate': 'lrs'}
# Without a design: this grid on --config (default cpu).
DEFAULT_GRID = dict(config='cpu', models=ORIGINAL_MODELS, activations=PARTIAL_ACTIVATIONS, trials=3)


def study_names():
    return list(DESIGNS)


def cells(design, config, given=None):
    """(root, [(cell name, config)]) of a plan: without a grid one unnamed cell, the study
    itself; with one, every combination of the grid's values, `given` ({field: values or None})
    replacing the design's. A cell whose config is invalid (a width of 0) raises ValueError."""
    grid = (design or {}).get('grid')
    if not grid:
        return '', [('', config)]
    values = {k: list(dict.fromkeys((given or {}).get(k) or v)) for k, v in grid.items()}
    out = []
    for combo in itertools.product(*values.values()):
        cfg = replace(config, **dict(zip(values, combo))).validate()
        out.append((design['cell'].format(**cfg.to_dict()), cfg))
    return design['root'].format(**config.to_dict()), out
