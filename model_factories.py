"""
build_model(model_name, activation_name, config, seed=None) -> nn.Module

The one place models are made: names are checked (an unknown one is an error listing the
valid names: never a default), sizes are validated before any tensor is allocated, and
weights are initialised from `seed` without touching the caller's random state.

`python model_factories.py --config cpu` prints parameter counts for every model x activation.
"""
import sys

import torch

from activations import ACTIVATION_NAMES, check_activation
from model import FFN, MODELS as _BASE_MODELS
from moe import SwitchLM

# switchlm lives in moe.py (it builds on model.py's blocks, so model.py cannot import it)
MODELS = {**_BASE_MODELS, 'switchlm': SwitchLM}
MODEL_NAMES = list(MODELS)  # the language models (tests iterate over these)
# classifiers of flat inputs (mnist / mnist1d tasks): not language models
CLASSIFIERS = {'ffn': FFN}
CLASSIFIER_NAMES = list(CLASSIFIERS)
ALL_MODEL_NAMES = MODEL_NAMES + CLASSIFIER_NAMES
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
    # fork_rng: initialisation draws from its own seeded stream and leaves the global RNG
    # (which drives dropout) exactly as the caller set it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config, activation_name)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


if __name__ == '__main__':
    from dataclasses import replace

    from config import Parser, add_config_args, config_from_args
    parser = Parser(description='Parameter counts of every model x activation under a preset.')
    add_config_args(parser)
    args = parser.parse_args()
    try:
        config = config_from_args(args)
    except ValueError as e:
        sys.exit(f"error: {e}")
    config = replace(config, vocab_size=config.vocab_size or 65)  # Tiny Shakespeare's vocabulary
    names = [a for a in ACTIVATION_NAMES if a != 'silu']  # silu is an alias of swish
    print(f"parameters under preset {args.config!r} (vocab {config.vocab_size}, "
          f"{config.n_layer} layers, n_embd {config.n_embd})")
    print(f"{'model':16s}" + ''.join(f"{a:>11s}" for a in names))
    for m in MODEL_NAMES:
        try:
            counts = ''.join(f"{count_parameters(build_model(m, a, config)):>11,d}" for a in names)
        except ValueError as e:  # e.g. an odd head size for the rotary model
            counts = f"  not buildable: {e}"
        print(f"{m:16s}" + counts)
