"""
What a trial records to prove itself, beside its results (train.run_trial calls them):

    stream_fingerprints(model, first_batch, device)  digests of the random streams the
                                                     first step really finds
    causality_probe(model, task, device)             does the trained model see the future?
    activation_calls(model, task, device)            which activation functions one forward
                                                     pass really calls, and how often

None draws a random number, so none can change a result.
"""
import hashlib
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode


def _digest(chunks):
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()[:16]


def _tensor_bytes(t):
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()  # the raw bytes, any dtype (bfloat16 too)


def stream_fingerprints(model, first_batch, device):
    """Short digests of the three random streams as they really are when training starts
    (call it just before the first optimizer step; it consumes no randomness):
        init     the initial weights and buffers (state_dict, sorted by name)
        data     the first step's batch: every micro-batch's inputs and targets
        dropout  the global RNG state dropout will draw from: the CPU generator and, on
                 CUDA, the trial device's generator too
    Digests of the state, not of the seed numbers: a seed that never reached its stream
    shows up as equal digests where the seeds differ, and the reverse."""
    state = model.state_dict()
    init = [c for k in sorted(state) for c in (k.encode(), str(tuple(state[k].shape)).encode(),
                                                str(state[k].dtype).encode(), _tensor_bytes(state[k]))]
    data = [_tensor_bytes(t) for xy in first_batch for t in xy]
    dropout = [torch.get_rng_state().numpy().tobytes()]
    if device.type == 'cuda':
        dropout.append(torch.cuda.get_rng_state(device).numpy().tobytes())
    return {'init': _digest(init), 'data': _digest(data), 'dropout': _digest(dropout)}


@torch.inference_mode()
def causality_probe(model, task, device, n_windows=8):
    """The largest change of any earlier position's logits when the last quarter of the
    tokens of n_windows evaluation windows is changed: 0 for a causal language model (up to
    kernel noise on GPUs), large for one that sees the future. In float32 (no autocast),
    eval mode, on the trained weights. It draws no random numbers, and the RNG states of the
    CPU and the trial's device are restored anyway, so it cannot change anything saved.
    None for classification tasks: a classifier's input has no time axis."""
    if task.kind != 'lm':
        return None
    x = task.eval_x[:n_windows].to(device)
    T = x.shape[1]
    m = max(1, T // 4)  # positions T-m.. are changed; positions < T-m must not move
    if T - m < 1:
        return None  # a window of one token has no earlier position
    changed = x.clone()
    changed[:, -m:] = (x[:, -m:] + 1) % task.n_classes  # every changed token really differs
    cuda = [device] if device.type == 'cuda' else []
    with torch.random.fork_rng(devices=cuda, device_type='cuda'):
        model.eval()
        a, _ = model(x)
        b, _ = model(changed)
        model.train()
    return (a[:, :T - m].float() - b[:, :T - m].float()).abs().max().item()


# torch builtins by __name__ -> the name activation_names.applied_function gives their function
_BUILTIN_ACTIVATIONS = {'relu': 'relu', 'relu_': 'relu', 'gelu': 'gelu', 'silu': 'swish', 'silu_': 'swish',
                        'mish': 'mish', 'elu': 'elu', 'elu_': 'elu', 'selu': 'selu', 'selu_': 'selu',
                        'leaky_relu': 'leaky_relu', 'leaky_relu_': 'leaky_relu', 'tanh': 'tanh',
                        'sigmoid': 'sigmoid', 'softplus': 'softplus'}


class _CountCalls(TorchFunctionMode):
    """Counts the activation builtins called in its scope, whoever calls them (a module, a
    functional call in a forward, a planted bug). Nested calls are not seen twice: torch
    runs __torch_function__ with the mode switched off."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = _BUILTIN_ACTIVATIONS.get(getattr(func, '__name__', ''))
        if name:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@torch.inference_mode()
def activation_calls(model, task, device, n_windows=8):
    """{function: calls} in one forward pass of the trained model over n_windows evaluation
    inputs: what really ran, not the configured name (the original study's bug: an activation
    name silently replaced by ReLU). Builtins are counted by a TorchFunctionMode; functions that
    are no builtin (SmeLU) by the modules that call them. In eval mode; RNG states untouched."""
    x = task.eval_x[:n_windows].to(device)
    counter = _CountCalls()
    hooks = [m.register_forward_pre_hook(lambda mod, inp: counter.counts.update([mod.fn.activation_name]))
             for m in model.modules() if hasattr(getattr(m, 'fn', None), 'activation_name')]
    cuda = [device] if device.type == 'cuda' else []
    try:
        with torch.random.fork_rng(devices=cuda, device_type='cuda'):
            model.eval()
            with counter:
                model(x)
            model.train()
    finally:
        for h in hooks:
            h.remove()
    return dict(sorted(counter.counts.items()))
