"""
build_model(model_name, activation_name, config, seed=None) -> nn.Module

The one place models are made: names are checked (an unknown one is an error listing the
valid names: never a default), sizes are validated before any tensor is allocated, and
weights are initialised from `seed` without touching the caller's random state.

`python model_factories.py --config cpu` prints parameter counts for every model x activation.
"""
from dataclasses import replace

import torch

import model_names
from activations import ACTIVATION_NAMES, check_activation
from cli import EXIT_HELP, EXIT_USAGE
from config import Parser, add_config_args, config_from_args
from model import FFN, MODELS as _BASE_MODELS
from moe import SwitchLM

# switchlm lives in moe.py (it builds on model.py's blocks, so model.py cannot import it)
MODELS = {**_BASE_MODELS, 'switchlm': SwitchLM}
MODEL_NAMES = list(MODELS)  # the language models (tests iterate over these)
# classifiers of flat inputs (mnist / mnist1d tasks): not language models
CLASSIFIERS = {'ffn': FFN}
CLASSIFIER_NAMES = list(CLASSIFIERS)
ALL_MODEL_NAMES = MODEL_NAMES + CLASSIFIER_NAMES
if tuple(ALL_MODEL_NAMES) != model_names.ALL_MODELS:  # a model added here must be named there (for --help)
    raise ImportError(f"model_names.py lists {model_names.ALL_MODELS}, the registry has {tuple(ALL_MODEL_NAMES)}")
_BUILDERS = {**MODELS, **CLASSIFIERS}


def check_model(name):
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(ALL_MODEL_NAMES)}")
    return name


def model_kind(name):
    """The Task kind a model trains on: 'lm' or 'classification'."""
    return 'classification' if check_model(name) in CLASSIFIERS else 'lm'


def build_model(model_name, activation_name, config, seed=None):
    check_model(model_name)
    check_activation(activation_name)
    config.validate()
    if model_name in MODELS and config.vocab_size <= 0:  # FFN says what it needs itself
        raise ValueError("config.vocab_size must be set (> 0) before building a model")
    if model_name == 'nanotransformer' and (config.n_embd // config.n_head) % 2:
        raise ValueError(f"nanotransformer: head size n_embd/n_head = {config.n_embd // config.n_head} "
                         f"must be even (rotary embeddings rotate pairs of dimensions)")
    cls = _BUILDERS[model_name]
    if seed is None:
        return cls(config, activation_name)
    # Initialisation draws from its own stream: the CPU generator (models are built on the
    # CPU, or on meta), seeded alone and restored afterwards, so the global RNG that drives
    # dropout is left exactly as the caller set it, on every device. Not torch.manual_seed:
    # it also seeds every CUDA generator (or, before CUDA is initialised, queues that seed
    # for the moment it is), and that once left CUDA's dropout drawing from the init seed.
    # The fork also restores every CUDA generator that exists, in case a model draws there.
    with torch.random.fork_rng(devices=rng_devices(), device_type='cuda'):
        torch.default_generator.manual_seed(seed)
        return cls(config, activation_name)


def rng_devices():
    """The CUDA devices whose generators exist: every device once CUDA is initialised, none
    before (forking them would initialise CUDA just for that, in processes that never use it)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


# ----------------------------------------------------------------------------- memory

ACTIVATION_FLOATS = 34  # floats autograd keeps per token, per block, per unit of width (measured: 30-33)
EVAL_BATCH = 256        # train.predict's batch


def estimate_memory(model_name, activation, config):
    """Rough peak bytes of one float32 trial, before anything is allocated: weights, gradients
    and AdamW's two moments (16 bytes a parameter); what autograd keeps for one micro-batch
    of batch_size x block_size (ACTIVATION_FLOATS x width per token per block, measured on
    CPU for every model), with the logits and their gradient; one layer's attention scores
    and probabilities as if materialised (fused kernels never do: an upper bound); the
    evaluation pass (EVAL_BATCH windows, no autograd) where it needs more; the evaluation set.
    To refuse a run that cannot fit, not to size one tightly."""
    with torch.device('meta'):  # parameter count without allocating a byte
        n_params = count_parameters(build_model(model_name, activation, config))
    f, c = 4, config
    if model_kind(model_name) == 'classification':  # flat inputs: one "token" per example
        tokens, width, blocks, seq, scores = c.batch_size, max(c.hidden, c.n_inputs), c.depth, 1, 0
    else:
        tokens, width, seq = c.batch_size * c.block_size, c.n_embd, c.block_size
        blocks = c.n_layer + (model_name == 'convlm')  # convlm: its attention block comes on top
        scores = 0 if model_name == 'tinylstm' else 2 * c.batch_size * c.n_head * c.block_size ** 2 * f
    activations = tokens * (ACTIVATION_FLOATS * width * blocks + 3 * c.vocab_size) * f
    eval_pass = EVAL_BATCH * seq * (2 * c.vocab_size + 8 * width) * f
    parts = {'parameters and optimizer': 16 * n_params, 'activations': activations, 'attention scores': scores,
             'evaluation pass': eval_pass if eval_pass > activations + scores else 0,
             'evaluation set': 2 * 8 * c.n_eval * seq}
    total = parts['parameters and optimizer'] + max(activations + scores, eval_pass) + parts['evaluation set']
    return {'n_params': n_params, 'parts': parts, 'total': total}


def available_memory(device):
    """Bytes this process can still use on `device`: CUDA's free memory; on CPU MemAvailable
    (/proc/meminfo), capped by the cgroup's limit where one is set (containers, cluster
    jobs). None where this system does not say."""
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open('/proc/meminfo') as fh:
            avail = next(int(line.split()[1]) * 1024 for line in fh if line.startswith('MemAvailable:'))
    except (OSError, StopIteration, ValueError):
        return None
    for limit, usage in (('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory.current'),
                         ('/sys/fs/cgroup/memory/memory.limit_in_bytes', '/sys/fs/cgroup/memory/memory.usage_in_bytes')):
        try:
            with open(limit) as a, open(usage) as b:
                avail = min(avail, int(a.read()) - int(b.read()))
            break
        except (OSError, ValueError):  # no such cgroup file, or 'max' (no limit)
            continue
    return avail


def check_memory(pairs, config, device, concurrent=1):
    """Raise ValueError (one line, with the estimate) if `concurrent` trials of the largest
    (model, activation) of `pairs` would not fit in `device`'s available memory. Returns
    (estimate of that trial, available bytes or None where unknown)."""
    estimates = {pair: estimate_memory(*pair, config) for pair in pairs}
    (model, act), est = max(estimates.items(), key=lambda kv: kv[1]['total'])
    avail = available_memory(device)
    if avail is not None and concurrent * est['total'] > avail:
        parts = ', '.join(f"{k} {_gb(v)}" for k, v in est['parts'].items() if v)
        many = f"; {concurrent} at once: {_gb(concurrent * est['total'])}" if concurrent > 1 else ''
        raise ValueError(f"not enough memory: a {model}/{act} trial needs about {_gb(est['total'])} ({parts}) at "
                         f"batch_size {config.batch_size} x block_size {config.block_size}{many}; {device} has "
                         f"{_gb(avail)} available. Lower block_size, batch_size or n_embd" +
                         (", or --workers" if concurrent > 1 else ''))
    return est, avail


def _gb(n):
    return f"{n / 2 ** 30:.1f} GB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MB"


# the config fields that change a language model's parameter count: all this CLI takes
COUNT_FIELDS = ('n_layer', 'n_embd', 'n_head', 'block_size', 'bias', 'vocab_size', 'n_experts', 'moe_every')

if __name__ == '__main__':
    parser = Parser(description='Parameter counts of every language model x activation under a preset.',
                    epilog=EXIT_HELP)
    add_config_args(parser, only=COUNT_FIELDS)
    args = parser.parse_args()
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.exit(EXIT_USAGE, f"error: {e}\n")
    config = replace(config, vocab_size=config.vocab_size or 65)  # Tiny Shakespeare's vocabulary
    names = [a for a in ACTIVATION_NAMES if a != 'silu']  # silu is an alias of swish
    print(f"parameters under preset {args.config or 'cpu'!r} (vocab {config.vocab_size}, "
          f"{config.n_layer} layers, n_embd {config.n_embd})")
    print(f"{'model':16s}" + ''.join(f"{a:>11s}" for a in names))
    for m in MODEL_NAMES:
        try:
            counts = ''.join(f"{count_parameters(build_model(m, a, config)):>11,d}" for a in names)
        except ValueError as e:  # e.g. an odd head size for the rotary model
            counts = f"  not buildable: {e}"
        print(f"{m:16s}" + counts)
