"""
Train seeded trials of one model/activation pair and save what the analysis needs.

    python train.py --model minigpt --activation gelu --config cpu --trials 3

Trial k uses seed seed_base + k. Weight init, batch order and dropout draw from three
separate streams derived from it; --vary picks which of them change across trials.
Each trial writes <results-dir>/<study>/<model>/<activation>/trial_<k>.npz (softmax on the
fixed evaluation set) and then trial_<k>.json (metrics, history, provenance), both
atomically: a trial is done exactly when its JSON exists, records this trial's identity,
and its .npz matches the hash the JSON records. A damaged trial (JSON unreadable, .npz
missing or changed) is moved to <study>/damaged/<time>/ and trained again.

Every --checkpoint-every iterations (default: every evaluation point) the trial saves a
checkpoint beside its result (.trial_<k>.ckpt, checkpoint.py); a trial started again after
a kill continues from it, bitwise as if never interrupted, and records where it resumed
("resumed_from": [iterations]).

The trainer only talks to the data through a Task (prepare_data.py) and to the model
through forward(x, targets) -> (logits, loss). A model may also set `self.aux_loss`
(a scalar tensor) in forward; it is added to the training loss only, so reported losses
are the task loss alone. Optional model hooks: `trial_metrics()` -> dict merged into the
trial's metrics, and `eval_extras()` -> dict of arrays for the last forward pass, saved
in the .npz beside the predictions. Optional task hook: `trial_metrics(model, device, amp)`
-> dict merged into the metrics after training (a classifier's held-out test accuracy).
"""
import datetime
import json
import math
import os
import platform
import resource
import socket
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch

import checkpoint
from config import Config, Parser, add_config_args, config_from_args
from fileio import atomic_write, set_aside, write_json
from model_factories import build_model, check_activation, check_model, count_parameters, model_kind
from prepare_data import DataError, make_task, sha256_file

PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))
VARY_MODES = ('all', 'init', 'data', 'dropout', 'none')
SCHEMA_VERSION = 1


class TrainingError(RuntimeError):
    """A trial that cannot produce a valid result (non-finite loss, ...)."""


# ----------------------------------------------------------------------------- seeds, files

def trial_seeds(seed_base, trial, vary):
    """The three seeds of trial `trial`: those named by `vary` follow the trial, the rest
    stay at seed_base so that only the chosen source of randomness differs between trials."""
    if vary not in VARY_MODES:
        raise ValueError(f"unknown vary mode {vary!r}; valid: {', '.join(VARY_MODES)}")
    s = seed_base + trial
    return {'trial_seed': s,
            'init': s if vary in ('all', 'init') else seed_base,
            'data': s if vary in ('all', 'data') else seed_base,
            'dropout': s if vary in ('all', 'dropout') else seed_base}


def trial_path(results_dir, study, model, activation, trial, ext='json'):
    return os.path.join(results_dir, study, model, activation, f'trial_{trial}.{ext}')


def trial_identity(task, model_name, activation, trial, vary, config):
    """What a saved result must match to count as this trial (see existing_trial); `config`
    is the run's config with the task's config_updates() applied, as run_trial records it."""
    return {'task': task.kind, 'model': model_name, 'activation': activation, 'trial': trial,
            'vary': vary, 'seeds': trial_seeds(config.seed_base, trial, vary), 'config': config.to_dict()}


def existing_trial(path, identity):
    """'absent' if no result JSON; 'done' if it holds this trial (same identity: config,
    seeds, vary, task, model) and its .npz matches the predictions_sha256 it records;
    'damaged (why)' if the JSON does not parse or the .npz is missing or does not match;
    otherwise 'different (how)': a result of another config, never overwritten unasked."""
    if not os.path.exists(path):
        return 'absent'
    try:
        with open(path) as f:
            old = json.load(f)
        if not isinstance(old, dict):
            raise ValueError('not a JSON object')
    except (OSError, ValueError) as e:
        return f"damaged (unreadable JSON: {e})"
    diffs = []
    for key, value in identity.items():
        if key == 'config':
            old_cfg = old.get('config', {})
            # a field added to Config after the old run is no difference while at its default
            diffs += [f"{k}: {old_cfg.get(k)!r} -> {v!r}" for k, v in value.items() if old_cfg.get(k) != v
                      and (k in old_cfg or v != getattr(Config, k, None))]
        elif old.get(key) != value:
            diffs.append(f"{key}: {old.get(key)!r} -> {value!r}")
    if diffs:
        return 'different (' + '; '.join(diffs) + ')'
    npz = path[:-len('json')] + 'npz'
    if not os.path.exists(npz):
        return f"damaged ({os.path.basename(npz)} is missing)"
    if sha256_file(npz) != old.get('predictions_sha256'):
        return (f"damaged ({os.path.basename(npz)} does not match the predictions_sha256 in its JSON: "
                f"truncated or changed)")
    return 'done'


def set_aside_damaged(json_path, study_dir, state):
    """Move a damaged trial's files to <study>/damaged/<time>/ (kept, not deleted); returns
    the one line that says so."""
    moved = set_aside([json_path, json_path[:-len('json')] + 'npz'], study_dir)
    where = os.path.dirname(os.path.dirname(os.path.dirname(moved[0])))
    return (f"{os.path.relpath(json_path, study_dir)} is {state}: its files moved to {where}; "
            f"training it again")


def _git(*args):
    try:
        return subprocess.run(['git', *args], cwd=PROJECT_DIR, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ''


def provenance(device, deterministic):
    return {
        'git_commit': _git('rev-parse', 'HEAD') or None,
        'git_dirty': bool(_git('status', '--porcelain', '--untracked-files=no')),
        'torch_version': torch.__version__,
        'cuda_version': torch.version.cuda,
        'device': device.type,
        'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else (platform.processor() or platform.machine()),
        'threads': torch.get_num_threads(),
        'deterministic': deterministic,
        'python_version': platform.python_version(),
        'hostname': socket.gethostname(),
    }


# ----------------------------------------------------------------------------- device setup

def resolve_device(name):
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name not in ('cpu', 'cuda') and not name.startswith('cuda:'):
        raise ValueError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return torch.device(name)


def autocast_dtype(dtype, device):
    """bfloat16 autocast on CUDA where supported (dtype 'auto'); float32 on CPU, where
    bfloat16 autocast was measured not to help."""
    valid = ('auto', 'float32', 'bfloat16', 'float16')
    if dtype not in valid:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(valid)}")
    if dtype == 'auto':
        return torch.bfloat16 if device.type == 'cuda' and torch.cuda.is_bf16_supported() else None
    if dtype == 'float16' and device.type != 'cuda':
        raise ValueError("dtype float16 needs CUDA; use float32 or bfloat16 on CPU")
    return None if dtype == 'float32' else getattr(torch, dtype)


def set_determinism(deterministic, device):
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # cuBLAS needs it
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False
    if device.type == 'cuda':  # TF32 matmuls are fast but not bitwise reproducible
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic


# ----------------------------------------------------------------------------- optimisation

def lr_at(it, config):
    """Learning rate at step `it`: constant, or linear warmup then cosine decay to min_lr."""
    if config.lr_schedule == 'constant':
        return config.learning_rate
    decay_iters = config.lr_decay_iters or config.max_iters
    if it < config.warmup_iters:
        return config.learning_rate * (it + 1) / (config.warmup_iters + 1)
    if it >= decay_iters:
        return config.min_lr
    ratio = (it - config.warmup_iters) / max(1, decay_iters - config.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return config.min_lr + coeff * (config.learning_rate - config.min_lr)


def make_optimizer(model, config, device):
    """AdamW with decoupled weight decay on matrices only: biases, norm gains and
    embedding tables are not decayed."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in params if p.dim() < 2 or id(p) in embeddings]
    groups = [{'params': decay, 'weight_decay': config.weight_decay},
              {'params': no_decay, 'weight_decay': 0.0}]
    # the fused kernel exists on CPU and CUDA; measured fastest on both
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=True)


def train_step(model, optimizer, batches, config, amp, want_norm=False):
    """One optimizer step over micro-batches [(x, y), ...] (gradient accumulation).
    Returns (task loss, global gradient norm before clipping; None unless clipping or
    want_norm)."""
    total = 0.0
    for x, y in batches:
        with amp:
            _, loss = model(x, y)
            aux = getattr(model, 'aux_loss', None)
            objective = loss if aux is None else loss + aux
        (objective / len(batches)).backward()
        total = total + loss.detach() / len(batches)
    grad_norm = None
    if config.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    elif want_norm:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


# ----------------------------------------------------------------------------- evaluation

@torch.inference_mode()
def estimate_loss(model, task, config, device, amp):
    """Mean task loss over eval_iters batches per split. The batches come from a generator
    seeded by eval_seed, so every eval point and every trial sees the same batches."""
    model.eval()
    out = {}
    for i, split in enumerate(('train', 'val')):
        g = torch.Generator().manual_seed(config.eval_seed + 1 + i)
        x, y = task.get_batch(split, config.batch_size * config.eval_iters, g)
        total = 0.0
        # one training-sized batch at a time: measured faster on CPU than larger chunks
        for xb, yb in zip(x.split(config.batch_size), y.split(config.batch_size)):
            with amp:
                _, loss = model(xb.to(device), yb.to(device))
            total += loss.float() * len(xb)
        out[split] = (total / len(x)).item()
    model.train()
    return out


@torch.inference_mode()
def predict(model, task, device, amp, batch_size=256):
    """Softmax at the last position of every evaluation window (classification: of every
    example), accuracy there, and token accuracy over all positions."""
    model.eval()
    probs, correct, token_correct, extras = [], 0, 0, {}
    x_all, y_all = task.eval_x, task.eval_y
    for j in range(0, len(x_all), batch_size):
        x, y = x_all[j:j + batch_size].to(device), y_all[j:j + batch_size].to(device)
        with amp:
            logits, _ = model(x)
        logits = logits.float()
        if logits.dim() == 3:  # language model: [B, T, V]
            token_correct += (logits.argmax(-1) == y).sum().item()
            logits, y = logits[:, -1], y[:, -1]
        p = torch.softmax(logits, dim=-1)
        correct += (p.argmax(-1) == y).sum().item()
        probs.append(p.cpu())
        if hasattr(model, 'eval_extras'):
            for k, v in model.eval_extras().items():
                extras.setdefault(k, []).append(np.asarray(v))
    model.train()
    n = len(x_all)
    token_acc = token_correct / y_all.numel() if y_all.dim() == 2 else None
    extras = {k: np.concatenate(v) for k, v in extras.items()}
    return torch.cat(probs).numpy().astype(np.float32), correct / n, token_acc, extras


# ----------------------------------------------------------------------------- one trial

def run_trial(model_name, activation, trial, config, results_dir='results', study=None,
              vary='all', device='auto', dtype='auto', deterministic=False, compile=False,
              data_dir=None, save_checkpoints=False, progress=True, force=False, threads=None,
              checkpoint_every=None):
    """Train one trial and save its .npz and .json. Returns the result record.
    If the trial is already done (same identity) and not `force`, returns the saved record.
    A result with a different identity is never overwritten without `force`; a damaged one
    is set aside and the trial trained again. checkpoint_every: iterations between mid-trial
    checkpoints (None: every evaluation point; 0: none); a usable checkpoint of this trial
    is resumed from unless `force`."""
    t_start = time.time()
    started_at = datetime.datetime.now().astimezone().isoformat()
    check_model(model_name)
    check_activation(activation)
    seeds = trial_seeds(config.seed_base, trial, vary)
    study = study or 'default'
    study_dir = os.path.join(results_dir, study)
    json_path = trial_path(results_dir, study, model_name, activation, trial)
    npz_path = json_path[:-len('json')] + 'npz'
    dev = resolve_device(device)
    amp_dtype = autocast_dtype(dtype, dev)
    ckpt_every = config.eval_interval if checkpoint_every is None else checkpoint_every
    if ckpt_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 (0: no checkpoints), got {ckpt_every}")
    if threads:
        torch.set_num_threads(threads)

    task = make_task(config, data_dir)
    if model_kind(model_name) != task.kind:
        raise ValueError(f"model {model_name!r} trains on {model_kind(model_name)} data, but dataset "
                         f"{config.dataset!r} is a {task.kind} task")
    config = replace(config, **task.config_updates())
    identity = trial_identity(task, model_name, activation, trial, vary, config)
    state = existing_trial(json_path, identity)
    ckpt_path = checkpoint.checkpoint_path(json_path)
    if state == 'done' and not force:
        checkpoint.discard(ckpt_path)  # left by a kill between the JSON and its removal
        with open(json_path) as f:
            return json.load(f)
    if state.startswith('damaged'):
        _note(set_aside_damaged(json_path, study_dir, state))
    elif state != 'absent' and not force:
        raise FileExistsError(f"{json_path} exists and is {state}; use another --study or "
                              f"--results-dir, or --force to overwrite it")

    set_determinism(deterministic, dev)
    torch.manual_seed(seeds['dropout'])  # the global RNG drives dropout (and router noise)
    data_gen = torch.Generator().manual_seed(seeds['data'])
    data_state = data_gen.get_state()
    model = build_model(model_name, activation, config, seed=seeds['init']).to(dev)
    n_params = count_parameters(model)
    optimizer = make_optimizer(model, config, dev)
    step_model = torch.compile(model) if compile else model
    amp = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)

    history = {'iter': [], 'train_loss': [], 'val_loss': [], 'lr': [], 'grad_norm': []}
    best_val, best_state, evals_since_best, stopped_early_at = math.inf, None, 0, None
    eval_time, last_loss, grad_norm = 0.0, float('nan'), None
    it, position, train_elapsed, resumed_from, checkpoint_time = 0, 0, 0.0, [], 0.0
    # a checkpoint is resumed only by the same trial run the same way (bitwise continuation)
    ckpt_identity = {**identity, 'run': {'device': dev.type, 'dtype': str(amp_dtype), 'compile': compile,
                                         'deterministic': deterministic, 'threads': torch.get_num_threads()}}
    resume, note = (None, None) if force else checkpoint.find(ckpt_path, ckpt_identity, study_dir)
    if force:
        checkpoint.discard(ckpt_path)
    if note:
        _note(f"{model_name}/{activation} trial {trial}: {note}")
    if resume:
        loop = checkpoint.restore(resume, model, optimizer, data_gen, dev)
        (it, position, history, best_val, best_state, evals_since_best, eval_time, train_elapsed,
         checkpoint_time, started_at) = (loop[k] for k in (
            'iter', 'position', 'history', 'best_val', 'best_state', 'evals_since_best', 'eval_time',
            'training_time', 'checkpoint_time', 'started_at'))
        resumed_from = loop['resumed_from'] + [it]
        t_start -= loop['total_time']
    resumed_at = it  # the evaluation and checkpoint of this iteration are in the checkpoint
    train_stream = task.train_batches(config.batch_size, data_gen, start=position)
    # on CUDA, reading the loss forces a sync: read it every 10 steps there, every step on CPU
    check_every = 10 if dev.type == 'cuda' else 1
    bar = _progress(config.max_iters, f"{model_name}/{activation} trial {trial}", progress)
    bar.update(it)
    t_train = time.time() - train_elapsed
    while True:
        if (it % config.eval_interval == 0 or it == config.max_iters) and not (resume and it == resumed_at):
            t0 = time.time()
            losses = estimate_loss(step_model, task, config, dev, amp)
            eval_time += time.time() - t0
            for k, v in (('iter', it), ('train_loss', losses['train']), ('val_loss', losses['val']),
                         ('lr', lr_at(min(it, config.max_iters - 1), config)),
                         ('grad_norm', None if grad_norm is None else float(grad_norm))):
                history[k].append(v)
            if not all(map(math.isfinite, losses.values())):
                raise TrainingError(f"non-finite loss estimate at iteration {it}: {losses}")
            if config.early_stop_patience:
                if losses['val'] < best_val:
                    best_val, evals_since_best = losses['val'], 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    evals_since_best += 1
                    if evals_since_best >= config.early_stop_patience:
                        stopped_early_at = it
                        model.load_state_dict(best_state)  # keep the best weights seen
                        break
        if it == config.max_iters:
            break
        if ckpt_every and it % ckpt_every == 0 and it != resumed_at:
            t0 = time.time()
            loop = {'history': history, 'best_val': best_val, 'best_state': best_state,
                    'evals_since_best': evals_since_best, 'eval_time': eval_time,
                    'training_time': t0 - t_train, 'checkpoint_time': checkpoint_time,
                    'total_time': t0 - t_start, 'started_at': started_at, 'resumed_from': resumed_from}
            checkpoint.save(ckpt_path, checkpoint.make(ckpt_identity, it, model, optimizer, loop, dev, data_state,
                                                       it * config.grad_accum_steps))
            checkpoint_time += time.time() - t0
        checkpoint.before_step()  # a test hook: no-op unless REPRO_TEST_KILL_AT is set
        lr = lr_at(it, config)
        for group in optimizer.param_groups:
            group['lr'] = lr
        batches = [tuple(t.to(dev, non_blocking=True) for t in next(train_stream))
                   for _ in range(config.grad_accum_steps)]
        # the gradient norm is logged at eval points: compute it on the step before one
        want_norm = (it + 1) % config.eval_interval == 0 or it + 1 == config.max_iters
        loss, grad_norm = train_step(step_model, optimizer, batches, config, amp, want_norm)
        it += 1
        if it % check_every == 0 or it == config.max_iters:
            last_loss = loss.item()
            if not math.isfinite(last_loss):
                raise TrainingError(f"non-finite training loss {last_loss} at iteration {it}")
            bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
        bar.update(1)
    bar.close()
    training_time = time.time() - t_train
    iters_done = it

    if stopped_early_at is not None or history['iter'][-1] != iters_done:
        final = estimate_loss(step_model, task, config, dev, amp)
    else:  # the last periodic estimate was taken on the final weights
        final = {'train': history['train_loss'][-1], 'val': history['val_loss'][-1]}
    probs, val_acc, token_acc, extras = predict(step_model, task, dev, amp)

    metrics = {
        'train_loss': final['train'], 'val_loss': final['val'],
        'val_accuracy': val_acc, 'token_accuracy': token_acc,
        'perplexity': math.exp(final['val']) if task.kind == 'lm' else None,  # exp(val loss in nats)
        'training_time': training_time, 'eval_time': eval_time, 'checkpoint_time': checkpoint_time,
        'tokens_per_sec': iters_done * config.grad_accum_steps * task.tokens_per_batch(config.batch_size)
                          / max(1e-9, training_time - eval_time),
        'n_params': n_params, 'iters': iters_done, 'stopped_early_at': stopped_early_at,
        'peak_memory_mb': (torch.cuda.max_memory_allocated(dev) if dev.type == 'cuda'
                           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
        'peak_memory_kind': 'cuda_max_allocated' if dev.type == 'cuda' else 'process_max_rss',
    }
    if hasattr(model, 'trial_metrics'):
        metrics.update(model.trial_metrics())
    if hasattr(task, 'trial_metrics'):
        metrics.update(task.trial_metrics(step_model, dev, amp))

    # predictions first, then the JSON that marks the trial done
    arrays = {'probs': probs, 'eval_indices': task.eval_indices,
              'targets': (task.eval_y[:, -1] if task.eval_y.dim() == 2 else task.eval_y).numpy().astype(np.int64),
              **extras}
    atomic_write(npz_path, lambda f: np.savez(f, **arrays))
    if save_checkpoints:
        atomic_write(json_path[:-len('json')] + 'pt', lambda f: torch.save(model.state_dict(), f))
    metrics['total_time'] = time.time() - t_start
    record = {
        'schema_version': SCHEMA_VERSION, 'source': 'measured', 'study': study, **identity,
        'deterministic': deterministic, 'dtype': str(amp_dtype or torch.float32).replace('torch.', ''),
        'data': task.data_info, 'eval_hash': task.eval_hash,
        'predictions_file': os.path.basename(npz_path), 'predictions_sha256': sha256_file(npz_path),
        'metrics': metrics, 'history': history, 'resumed_from': resumed_from,
        'provenance': {**provenance(dev, deterministic), 'started_at': started_at,
                       'finished_at': datetime.datetime.now().astimezone().isoformat()},
    }
    write_json(json_path, record)
    checkpoint.discard(ckpt_path)  # the trial is done: its JSON holds everything
    return record


def _note(line):
    """A one-line report (damaged result set aside, checkpoint refused) while training goes on."""
    print(line, file=sys.stderr, flush=True)


class _NoBar:
    def set_postfix(self, *a, **k): pass
    def update(self, n): pass
    def close(self): pass


def _progress(total, desc, enabled):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    # disable=None: a live bar on a terminal, silence in logs and CI
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)


# ----------------------------------------------------------------------------- command line

def add_run_args(parser):
    """Flags shared with run_all_experiments.py that are not hyper-parameters."""
    parser.add_argument('--results-dir', default='results')
    parser.add_argument('--study', default=None, help="results sub-folder (default: the preset's name)")
    parser.add_argument('--vary', default='all', choices=VARY_MODES,
                        help='which randomness changes across trials (default: all)')
    parser.add_argument('--deterministic', action='store_true', help="PyTorch's deterministic algorithms")
    parser.add_argument('--device', default='auto', help='auto | cpu | cuda | cuda:N')
    parser.add_argument('--dtype', default='auto', choices=('auto', 'float32', 'bfloat16', 'float16'),
                        help='autocast dtype (auto: bfloat16 on CUDA where supported, else float32)')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model (opt-in)')
    parser.add_argument('--data', default=None, help='a UTF-8 text file to train on (sets --dataset)')
    parser.add_argument('--data-dir', default=None, help='where corpora live (default: $REPRO_DATA_DIR or ./data)')
    parser.add_argument('--save-checkpoints', action='store_true', help='also save trial_<k>.pt')
    parser.add_argument('--force', action='store_true',
                        help='rerun trials whose results exist, and start over those with a checkpoint')
    parser.add_argument('--checkpoint-every', type=int, default=None, metavar='N',
                        help='iterations between mid-trial checkpoints, which a killed trial resumes from '
                             '(default: every evaluation point; 0: none)')
    add_config_args(parser)


def config_and_study(args):
    if args.data is not None:
        args.dataset = args.data
    config = config_from_args(args)
    return config, args.study or args.config


def main(argv=None):
    parser = Parser(description='Train seeded trials of one model/activation pair.')
    parser.add_argument('--model', required=True)
    parser.add_argument('--activation', required=True)
    parser.add_argument('--trials', type=int, default=3)
    parser.add_argument('--first-trial', type=int, default=0, help='train trials first..first+trials-1')
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (default: all cores)')
    add_run_args(parser)
    args = parser.parse_args(argv)
    try:
        config, study = config_and_study(args)
        check_model(args.model)
        check_activation(args.activation)
        if args.trials < 1 or args.first_trial < 0:
            raise ValueError("--trials must be >= 1 and --first-trial >= 0")
        if args.checkpoint_every is not None and args.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0 (0: no checkpoints), got {args.checkpoint_every}")
        resolve_device(args.device)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")

    rows = []
    for k in range(args.first_trial, args.first_trial + args.trials):
        try:
            r = run_trial(args.model, args.activation, k, config, args.results_dir, study, args.vary,
                          args.device, args.dtype, args.deterministic, args.compile, args.data_dir,
                          args.save_checkpoints, progress=True, force=args.force, threads=args.threads,
                          checkpoint_every=args.checkpoint_every)
        except (DataError, ValueError, FileExistsError, TrainingError) as e:
            parser.exit(1, f"error: trial {k}: {e}\n")
        except Exception:
            traceback.print_exc()
            parser.exit(1, f"error: trial {k} failed (traceback above)\n")
        m = r['metrics']
        rows.append(m)
        print(f"{args.model}/{args.activation} trial {k}: val loss {m['val_loss']:.4f}  "
              f"val acc {m['val_accuracy']:.4f}  train loss {m['train_loss']:.4f}  "
              f"{m['total_time']:.1f}s all-in ({m['tokens_per_sec']:,.0f} tok/s)"
              + (f"  resumed from iteration {', '.join(map(str, r['resumed_from']))}" if r.get('resumed_from') else ''))
    vl = np.array([m['val_loss'] for m in rows])
    print(f"{len(rows)} trial(s) in {os.path.join(args.results_dir, study, args.model, args.activation)}: "
          f"val loss {vl.mean():.4f}" + (f" ± {vl.std(ddof=1):.4f} (std)" if len(vl) > 1 else ""))


if __name__ == '__main__':
    main()
