"""
Every hyper-parameter in one dataclass (Config: what a trial trains), how trials run
(RunOptions), the named presets of the original study, which fields the data fixes, and the
command-line flags (one per field, same name) shared by train.py and run_all_experiments.py.
No torch.
"""
import argparse
import difflib
from dataclasses import asdict, dataclass, field, fields, replace


def _f(default, help):
    """A Config field with its one-line description (shown by --help)."""
    return field(default=default, metadata={'help': help})

from config_full_gpu import GPU_FULL


@dataclass
class Config:
    # model
    n_layer: int = _f(2, 'blocks: transformer / LSTM / convolution layers')
    n_embd: int = _f(128, 'embedding and hidden width')
    n_head: int = _f(4, 'attention heads (n_embd must be divisible by it)')
    block_size: int = _f(128, 'context length in characters (training windows and the evaluation windows)')
    dropout: float = _f(0.2, 'dropout on residual branches and feed-forwards, in [0, 1)')
    bias: bool = _f(True, 'biases in Linear, LayerNorm, LSTM and conv layers (GPT-2 has them)')
    vocab_size: int = _f(0, 'output classes; 0: taken from the data (65 for Tiny Shakespeare)')
    # mixture of experts (switchlm only; every other model ignores these; see moe.py)
    n_experts: int = _f(4, 'switchlm: experts per Switch layer')
    top_k: int = _f(1, 'switchlm: experts per token, 1 (Switch) or 2')
    capacity_factor: float = _f(1.25, 'switchlm: expert slots = ceil(cf * top_k * block_size / n_experts)')
    moe_every: int = _f(1, 'switchlm: every moe_every-th block is a Switch layer (1: all)')
    router_init_scale: float = _f(0.01, 'switchlm: router init std = router_init_scale * 0.02')
    router_jitter: float = _f(0.0, 'switchlm: training router input *= U(1-eps, 1+eps) from the dropout RNG')
    aux_loss_coef: float = _f(0.01, 'switchlm: load-balancing loss weight')
    z_loss_coef: float = _f(0.001, 'switchlm: router z-loss weight (ST-MoE)')
    # feed-forward classifier (ffn only; the language models ignore these; see model.FFN)
    hidden: int = _f(16, 'ffn: hidden units per layer (ungated; gated: see gated_width)')
    depth: int = _f(1, 'ffn: hidden layers')
    n_inputs: int = _f(0, 'ffn: input features; 0: taken from the data (784 mnist, 40 mnist1d)')
    gated_width: str = _f('same', "ffn: gated units: 'same' as hidden (the original), or 'matched' parameter count")
    # data
    dataset: str = _f('shakespeare_char', 'shakespeare_char, mnist, mnist1d, or the path of any UTF-8 text file')
    # optimisation (AdamW)
    batch_size: int = _f(32, 'sequences (examples) per micro-batch')
    max_iters: int = _f(200, 'optimizer steps per trial')
    epochs: int = _f(0, 'classification: passes over the training split, sets max_iters (0: off)')
    learning_rate: float = _f(3e-4, 'AdamW peak learning rate')
    lr_schedule: str = _f('constant', 'constant | cosine')
    warmup_iters: int = _f(0, 'cosine: linear warmup steps')
    lr_decay_iters: int = _f(0, 'cosine: steps to reach min_lr (0: max_iters)')
    min_lr: float = _f(0.0, 'cosine: floor of the schedule')
    weight_decay: float = _f(0.0, 'AdamW decoupled weight decay, on matrices only (not biases, norms, embeddings)')
    beta1: float = _f(0.9, 'AdamW beta1')
    beta2: float = _f(0.999, 'AdamW beta2')
    grad_clip: float = _f(0.0, 'clip the global gradient norm to this (0: off)')
    grad_accum_steps: int = _f(1, 'micro-batches of batch_size per optimizer step')
    early_stop_patience: int = _f(0, 'stop after this many evaluations without a better val loss (0: off)')
    # periodic loss estimates
    eval_interval: int = _f(50, 'steps between train/val loss estimates')
    eval_iters: int = _f(50, 'batches per split in each loss estimate')
    # reproducibility evaluation set and seeds
    n_eval: int = _f(1000, 'fixed validation windows whose predictions are saved and compared')
    eval_seed: int = _f(1234, 'picks those windows and the loss-estimate batches; independent of the trial seed')
    seed_base: int = _f(42, 'trial k uses seed seed_base + k')

    def validate(self):
        """Raise ValueError naming the problem; called before anything is allocated."""
        positive = ['n_layer', 'n_embd', 'n_head', 'block_size', 'batch_size', 'max_iters',
                    'eval_interval', 'eval_iters', 'n_eval', 'grad_accum_steps', 'hidden', 'depth']
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        nonneg = ['vocab_size', 'warmup_iters', 'lr_decay_iters', 'min_lr', 'weight_decay',
                  'grad_clip', 'early_stop_patience', 'n_inputs', 'epochs']
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.n_experts < 1 or self.moe_every < 1:
            raise ValueError(f"n_experts and moe_every must be >= 1, got {self.n_experts}, {self.moe_every}")
        if self.top_k not in (1, 2) or self.top_k > self.n_experts:
            raise ValueError(f"top_k must be 1 or 2 and <= n_experts ({self.n_experts}), got {self.top_k}")
        if not (self.capacity_factor > 0 and self.router_init_scale > 0):
            raise ValueError(f"capacity_factor and router_init_scale must be > 0, got "
                             f"{self.capacity_factor}, {self.router_init_scale}")
        if not 0.0 <= self.router_jitter < 1.0:
            raise ValueError(f"router_jitter must be in [0, 1), got {self.router_jitter}")
        if self.gated_width not in GATED_WIDTHS:
            raise ValueError(f"unknown gated_width {self.gated_width!r}; valid: {', '.join(GATED_WIDTHS)}")
        if not (self.aux_loss_coef >= 0 and self.z_loss_coef >= 0):
            raise ValueError(f"aux_loss_coef and z_loss_coef must be >= 0, got "
                             f"{self.aux_loss_coef}, {self.z_loss_coef}")
        return self

    def to_dict(self):
        return asdict(self)


LR_SCHEDULES = ('constant', 'cosine')
DTYPES = ('auto', 'float32', 'bfloat16', 'float16')  # autocast dtypes (device.autocast_dtype)
CLASSIFICATION_DATASETS = ('mnist', 'mnist1d')  # flat-input classification (mnist.py); any other: text


def task_kind(dataset):
    """'classification' or 'lm': the one place that decides it from the dataset name."""
    return 'classification' if dataset in CLASSIFICATION_DATASETS else 'lm'


def data_fields(kind, epochs=0):
    """The Config fields the data fixes (Task.config_updates fills them in): never a user's choice."""
    if kind == 'classification':
        return ('vocab_size', 'n_inputs', 'n_eval') + (('max_iters',) if epochs else ())
    return ('vocab_size',)


def n_evaluations(config):
    """Loss estimates in a trial that runs to max_iters: every eval_interval steps and at the end."""
    return config.max_iters // config.eval_interval + 1 + bool(config.max_iters % config.eval_interval)


def lower_bound_config(config):
    """config with the sizes the data fixes (vocab_size, n_inputs) at 1 where not yet known:
    for a memory estimate that can only grow once the data is read."""
    return replace(config, vocab_size=config.vocab_size or 1, n_inputs=config.n_inputs or 1)


@dataclass(frozen=True)
class RunOptions:
    """How trials run, as opposed to what they train (Config): the same for every trial of
    a sweep, except device and threads, which the sweep sets per worker slot."""
    results_dir: str = 'results'
    vary: str = 'all'              # which seeds follow the trial (store.VARY_MODES)
    device: str = 'auto'           # auto | cpu | cuda | cuda:N
    dtype: str = 'auto'            # autocast dtype (device.autocast_dtype)
    deterministic: bool = False    # PyTorch's deterministic algorithms
    compile: bool = False          # torch.compile the model
    data_dir: str | None = None    # None: $REPRO_DATA_DIR or ./data
    save_checkpoints: bool = False  # also save trial_<k>.pt
    force: bool = False            # rerun (overwrite) a trial whose result exists
    threads: int | None = None     # torch CPU threads (None: leave as is)
    progress: bool = True          # a progress bar on a terminal
    checkpoint_every: int | None = None  # iterations between mid-trial checkpoints (None: every
                                         # evaluation point; 0: none)
    preset: str | None = None      # the preset the config came from: recorded in each trial, for the report
    snapshots: str = 'auto'        # predictions at every evaluation point: on | off | auto (on while small)

    def __post_init__(self):
        if self.checkpoint_every is not None and self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0 (0: no checkpoints), got {self.checkpoint_every}")
        if self.snapshots not in SNAPSHOT_MODES:
            raise ValueError(f"unknown --snapshots {self.snapshots!r}; valid: {', '.join(SNAPSHOT_MODES)}")


SNAPSHOT_MODES = ('auto', 'on', 'off')
SNAPSHOT_AUTO_BYTES = 64 * 2 ** 20  # 'auto' takes snapshots while a trial's all fit in this


def snapshot_bytes(config):
    """What a trial's snapshots take: float32 predictions on the evaluation set at every evaluation point."""
    return n_evaluations(config) * config.n_eval * max(1, config.vocab_size) * 4


def takes_snapshots(mode, config):
    return mode == 'on' or (mode == 'auto' and snapshot_bytes(config) <= SNAPSHOT_AUTO_BYTES)
GATED_WIDTHS = ('same', 'matched')  # see model.ffn_units

# Presets of the original study (cpu, gpu_lite, gpu, and gpu_full from config_full_gpu.py),
# plus cpu_reference: the CPU example of a well-known reference trainer (nanoGPT's
# shakespeare_char on CPU), for quality parity.
PRESETS = {
    'cpu': dict(),
    'gpu_lite': dict(batch_size=64, eval_iters=200),
    'gpu': dict(n_embd=256, block_size=256, batch_size=64, max_iters=500, eval_interval=100,
                eval_iters=200),
    'gpu_full': GPU_FULL,
    'cpu_reference': dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                          max_iters=2000, eval_interval=250, eval_iters=20, dropout=0.0,
                          learning_rate=1e-3, lr_schedule='cosine', warmup_iters=100,
                          lr_decay_iters=2000, min_lr=1e-4, weight_decay=0.1, beta2=0.99,
                          grad_clip=1.0, bias=False),
    # feed-forward classifier on MNIST-1D (offline; --dataset mnist for MNIST), the preset of
    # the mnist_ffn design: one epoch, no dropout; eval set = the validation split
    'mnist_ffn': dict(dataset='mnist1d', hidden=16, depth=1, epochs=1, batch_size=64,
                      learning_rate=1e-3, dropout=0.0, eval_interval=100, eval_iters=20),
}


def preset_names():
    return list(PRESETS)


def get_config(name, **overrides):
    """Config of preset `name` with `overrides` applied and validated."""
    names = preset_names()
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; valid: {', '.join(names)}")
    unknown = sorted(set(overrides) - {f.name for f in fields(Config)})
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(f.name for f in fields(Config))}")
    return replace(Config(), **{**PRESETS[name], **overrides}).validate()


# ----------------------------------------------------------------------------- command line

def _bool(s):
    if s.lower() in ('1', 'true', 'yes'):
        return True
    if s.lower() in ('0', 'false', 'no'):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line and, for a mistyped flag, suggest the closest
    valid one (else list them all). Abbreviations are off: --max_iter must not silently mean
    --max_iters."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('allow_abbrev', False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        if message.startswith('unrecognized arguments: '):
            message += self._flag_hint(message.split(': ', 1)[1].split())
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _flag_hint(self, words):
        """'; did you mean --max_iters?' for the unknown flags among words, or the list of
        valid flags when none is close to any of them."""
        every = [o for a in self._actions for o in a.option_strings if o.startswith('--')]
        unknown = [w.split('=', 1)[0] for w in words if w.startswith('--')]
        close = {w: difflib.get_close_matches(w, every, n=1, cutoff=0.75) for w in unknown}
        pairs = [(w, m[0]) for w, m in close.items() if m]
        if not pairs:  # nothing close: the list, in the spellings --help shows
            shown = sorted(o for a in self._actions if a.help != argparse.SUPPRESS
                           for o in a.option_strings if o.startswith('--'))
            return f" (valid flags: {' '.join(shown)})"
        if len(pairs) == 1 and len(unknown) == 1:
            return f"; did you mean {pairs[0][1]}?"
        rest = '' if len(pairs) == len(unknown) else ' (--help lists every flag)'
        return f"; did you mean {', '.join(f'{m} for {w}' for w, m in pairs)}?{rest}"


def flag_spellings(name):
    """The flags of Config field `name`: --max_iters, and --max-iters with dashes."""
    return [f'--{name}'] + ([f"--{name.replace('_', '-')}"] if '_' in name else [])


def preset_defaults(name):
    """'default X' and the presets where it differs: 'default 128; gpu 256, gpu_full 384'."""
    base = getattr(Config, name)
    other = [f"{p} {v[name]}" for p, v in PRESETS.items() if name in v and v[name] != base]
    return f"default {base}" + (f"; {', '.join(other)}" if other else '')


def add_config_args(parser, only=None):
    """--config PRESET plus one flag per Config field (--n_embd 64, --max_iters 10, ...);
    `only`: just these fields (a tool that uses a few of them)."""
    parser.add_argument('--config', default=None, help="preset: " + ", ".join(preset_names()) + " (default: cpu)")
    group = parser.add_argument_group('config overrides (each defaults to the preset\'s value: the '
                                      'cpu preset\'s, and the other presets\' where they differ; '
                                      'each may also be spelled with dashes: --max-iters)')
    for f in fields(Config):
        if only is not None and f.name not in only:
            continue
        kind = _bool if f.type is bool else f.type  # int('1e3') fails: a clear type error
        flag, *dashed = flag_spellings(f.name)
        group.add_argument(flag, dest=f.name, type=kind, default=None, metavar=f.type.__name__.upper(),
                           help=f"{f.metadata['help']} ({preset_defaults(f.name)})")
        for alias in dashed:  # the same destination, left out of --help so it lists each field once
            group.add_argument(alias, dest=f.name, type=kind, default=None, help=argparse.SUPPRESS)


def config_from_args(args):
    overrides = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name, None) is not None}
    return get_config(args.config or 'cpu', **overrides)
