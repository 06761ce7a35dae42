"""
Mid-trial checkpoints: save, load and check everything the rest of a trial depends on, so
that a trial killed at any moment continues from its last checkpoint and ends bitwise
identical to an uninterrupted run on the same hardware at the same thread count. Where the
file lives and when it is dropped is the store's business (store.TrialKey.ckpt,
store.discard_checkpoint); what resume means: docs/trials-and-resume.md.

A checkpoint is torch.save of plain dicts and tensors (read back with weights_only=True),
written atomically every --checkpoint-every iterations, with a small JSON beside it
(store.write_checkpoint_meta: iteration, identity digest) that a dry run reads without torch:
    version, identity  the format, and the trial's identity plus how it runs (device type,
                       dtype, threads, ...): used only when both match
    iter               training steps done
    model, optimizer   state dicts
    model_extra        the model's checkpoint_state() hook, if it has one (switchlm: the
                       routing statistics of every training pass, which its metrics average)
    loop               the trainer's loop state (train.LoopState, as a dict): history,
                       early stopping, elapsed times, resumed_from, stream fingerprints, snapshots
    rng                the global CPU RNG (dropout, router jitter); the CUDA RNG of the
                       trial's device when it is one
    data               the data generator's state when the stream began and the stream's
                       position (batches drawn): Task.train_batches(..., start=position)
                       restarts there bitwise
A checkpoint that cannot be read, lacks a field or belongs to another identity is never
used: find() says why in one line, sets the file aside and the trial starts over.

Test hook (the kill tests; unset in normal use, read once per process, not per step):
REPRO_TEST_KILL_AT=step:N SIGKILLs the process when it has run N training steps (over all its
trials), where the next step would start; REPRO_TEST_KILL_AT=checkpoint-write:N half-way
through writing its N-th checkpoint.
"""
import io
import os
import signal
import time

import torch

import store
from fileio import atomic_write

VERSION = 3  # 3: the loop state is train.LoopState's fields (snapshots included)
FIELDS = ('version', 'identity', 'iter', 'model', 'optimizer', 'model_extra', 'loop', 'rng', 'data')
KILL_ENV = 'REPRO_TEST_KILL_AT'


class CheckpointError(Exception):
    """A checkpoint that must not be used; the message says why."""


# ----------------------------------------------------------------------------- random streams

def rng_state(device):
    state = {'cpu': torch.get_rng_state()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state['cpu'])
    if device.type == 'cuda':
        torch.cuda.set_rng_state(state['cuda'], device)


# ----------------------------------------------------------------------------- save, load

def make(identity, it, model, optimizer, loop, device, data_state, position):
    """The checkpoint of a trial at iteration `it`. `data_state`: the data generator's state
    when the training stream began; `position`: batches the stream has given since."""
    return {'version': VERSION, 'identity': identity, 'iter': it,
            'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
            'model_extra': model.checkpoint_state() if hasattr(model, 'checkpoint_state') else None,
            'loop': loop, 'rng': rng_state(device),
            'data': {'generator': data_state, 'position': position}}


def save(path, state):
    """Write `state` atomically to `path`; returns its size in bytes."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getbuffer()

    def write(f):
        if _kill_due('checkpoint-write'):  # test hook: die with half a file written
            f.write(data[:len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        f.write(data)
    atomic_write(path, write)
    return len(data)


def load(path, identity):
    """The checkpoint at `path` if it is whole and belongs to `identity`; else CheckpointError.
    Tensors load on the CPU (RNG states must be CPU tensors; load_state_dict moves the rest)."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a truncated or corrupt file fails in zipfile, pickle or torch
        why = (str(e).strip().splitlines() or [''])[0][:120] or 'no message'  # never an empty reason
        raise CheckpointError(f"is truncated or corrupt ({type(e).__name__}: {why})") from None
    missing = [f for f in FIELDS if not isinstance(state, dict) or f not in state]
    if missing:
        raise CheckpointError(f"is incomplete (no {', '.join(missing)})")
    if state['version'] != VERSION:
        raise CheckpointError(f"has format version {state['version']!r}, this trainer reads {VERSION}")
    diffs = differences(state['identity'], identity)
    if diffs:
        raise CheckpointError(f"belongs to another config or run ({'; '.join(diffs[:4])}"
                              + (f"; {len(diffs) - 4} more" if len(diffs) > 4 else '') + ')')
    return state


def differences(old, new, prefix=''):
    """'key: old -> new' for every entry where two identities differ (nested dicts by key)."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def find(key, identity):
    """(checkpoint or None, one-line note or None) for trial `key` starting: its checkpoint if
    there is a usable one; a refused one is moved aside (store.set_aside_checkpoint) and said so."""
    for tmp in store.checkpoint_temp_files(key):  # a write that was killed: the one before it is whole
        os.remove(tmp)
    if not os.path.exists(key.ckpt):
        return None, None
    try:
        return load(key.ckpt, identity), None
    except CheckpointError as e:
        return None, f"checkpoint {key.ckpt} {e}; kept as {store.set_aside_checkpoint(key)}; the trial starts over"


def restore(state, model, optimizer, data_generator, device):
    """Put a trial back where `state` left it: weights, optimizer, model extras, the data
    generator at the stream's start and the global (and CUDA) RNG. Returns the loop state,
    with 'iter' and 'position' (batches the stream had given) added."""
    model.load_state_dict(state['model'])
    optimizer.load_state_dict(state['optimizer'])
    if state['model_extra'] is not None:
        model.load_checkpoint_state(state['model_extra'])
    data_generator.set_state(state['data']['generator'])
    set_rng_state(state['rng'], device)  # last: nothing after this may draw from it
    return {**state['loop'], 'iter': state['iter'], 'position': state['data']['position']}


# ----------------------------------------------------------------------------- one trial's checkpoints

class TrialCheckpoints:
    """The checkpoints of one running trial, as train.run_trial uses them: resume() once
    before the loop, due(it) and save() before each step, discard() once the result is saved.
    `identity`: the trial's identity plus how it runs (device type, dtype, threads, ...), since
    a checkpoint continues bitwise only on the same; `every`: iterations between checkpoints
    (0: none); `data_generator`: the training stream's, not yet drawn from."""

    def __init__(self, key, identity, every, device, data_generator):
        self.key, self.identity, self.every, self.device = key, identity, every, device
        self.data_state = data_generator.get_state()  # where the stream begins
        self.resumed_at = None  # the iteration resumed at: its evaluation and checkpoint are in the checkpoint
        self.time = 0.0  # seconds spent writing checkpoints, over all the runs of the trial

    def resume(self, force, model, optimizer, data_generator, note):
        """The loop state of the trial's checkpoint (see restore), restored into the model,
        optimizer, data generator and RNGs; or None: there is none, `force` (which discards
        it), or it was refused (`note(line)` says why)."""
        if force:
            self.discard()
            return None
        state, why = find(self.key, self.identity)
        if why:
            note(why)
        if state is None:
            return None
        loop = restore(state, model, optimizer, data_generator, self.device)
        self.resumed_at, self.time = loop['iter'], loop['checkpoint_time']
        return loop

    def due(self, it):
        """A checkpoint before step `it`? Every `every` steps, never at 0 (nothing to keep) nor
        where the trial resumed (that checkpoint exists)."""
        return bool(self.every) and it % self.every == 0 and it not in (0, self.resumed_at)

    def save(self, it, position, model, optimizer, loop):
        """Save the trial at iteration `it`, its stream having given `position` batches;
        `loop`: the trainer's loop state as a dict."""
        t0 = time.time()
        save(self.key.ckpt, make(self.identity, it, model, optimizer, {**loop, 'checkpoint_time': self.time},
                                 self.device, self.data_state, position))
        store.write_checkpoint_meta(self.key, it, self.identity)
        self.time += time.time() - t0

    def discard(self):
        store.discard_checkpoint(self.key)


# ----------------------------------------------------------------------------- test hook

_counts = {'pid': None}


def _kill_due(event, offset=0):
    """Count `event` in this process; True when REPRO_TEST_KILL_AT is <event>:<count - offset>."""
    if _counts['pid'] != os.getpid():  # a forked child counts its own events from zero
        _counts.clear()
        _counts['pid'] = os.getpid()
    _counts[event] = _counts.get(event, 0) + 1
    kind, _, n = os.environ.get(KILL_ENV, '').partition(':')
    return kind == event and n.isdigit() and _counts[event] == int(n) + offset


def step_kill_hook():
    """None in normal use (REPRO_TEST_KILL_AT unset or not step:N), so the training loop pays
    one `if` per step; else a function to call before each step that kills the process when
    it has run N steps (at the N+1-th call)."""
    if not os.environ.get(KILL_ENV, '').startswith('step:'):
        return None

    def before_step():
        if _kill_due('step', offset=1):
            os.kill(os.getpid(), signal.SIGKILL)
    return before_step
