"""
Train seeded trials of one model/activation pair and save what the analysis needs.

    python train.py --model minigpt --activation gelu --config cpu --trials 3

Trial k uses seed seed_base + k. Weight init, batch order and dropout draw from three
separate streams derived from it; --vary picks which of them change across trials. The
trial JSON records digests of the three streams as the first step finds them ("streams"),
so the analysis can check that exactly the varied ones differ, and, for language models,
whether the trained model sees the future (metrics.causality_max_change).
Each trial writes <results-dir>/<study>/<model>/<activation>/trial_<k>.npz (softmax on the
fixed evaluation set) and then trial_<k>.json (metrics, history, provenance), both
atomically: a trial is done exactly when its JSON is whole and its own and its .npz matches
the JSON (trial_files.py); a damaged one is set aside and trained again.

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
import argparse
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
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
from activations import ACTIVATION_NAMES
from cli import (EXIT_FAILURE, EXIT_INTERRUPT, EXIT_USAGE, ProgressLog, check_writable, exit_help,
                 os_error_message, stop_promptly_on_ctrl_c)
from config import Parser, add_config_args, config_from_args
from fileio import DataError, atomic_write, sha256_file, write_json
from model_factories import (ALL_MODEL_NAMES, build_model, check_activation, check_memory, check_model,
                             count_parameters, model_kind)
from prepare_data import make_task
from trial_checks import causality_probe, stream_fingerprints
from trial_files import VARY_MODES, existing_trial, set_aside_damaged, trial_identity, trial_path, trial_seeds

PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))
SCHEMA_VERSION = 1


class TrainingError(RuntimeError):
    """A trial that cannot produce a valid result (non-finite loss, ...)."""


@dataclass(frozen=True)
class RunOptions:
    """How trials run, as opposed to what they train (Config): the same for every trial of
    a sweep, except device and threads, which the sweep sets per worker slot."""
    results_dir: str = 'results'
    vary: str = 'all'              # which seeds follow the trial (VARY_MODES)
    device: str = 'auto'           # auto | cpu | cuda | cuda:N
    dtype: str = 'auto'            # autocast dtype (autocast_dtype)
    deterministic: bool = False    # PyTorch's deterministic algorithms
    compile: bool = False          # torch.compile the model
    data_dir: str | None = None    # None: $REPRO_DATA_DIR or ./data
    save_checkpoints: bool = False  # also save trial_<k>.pt
    force: bool = False            # rerun (overwrite) a trial whose result exists
    threads: int | None = None     # torch CPU threads (None: leave as is)
    progress: bool = True          # a progress bar on a terminal
    checkpoint_every: int | None = None  # iterations between mid-trial checkpoints (None: every
                                         # evaluation point; 0: none)

    def __post_init__(self):
        if self.checkpoint_every is not None and self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0 (0: no checkpoints), got {self.checkpoint_every}")


# ----------------------------------------------------------------------------- seeds, provenance

def seed_dropout_stream(seed):
    """Seed the global RNG that dropout and router jitter draw from. torch.manual_seed seeds
    the CPU generator and every CUDA device's generator (manual_seed_all), so this is the
    dropout seed on whichever device the trial runs. run_trial calls it once, after the
    model is built and on its device, and nothing seeds the global RNG after it before the
    first step: no later seeding call (the init seed's, say) can take its place."""
    torch.manual_seed(seed)


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

def run_trial(model_name, activation, trial, config, study, opts=RunOptions()):
    """Train one trial and save its .npz and .json under opts.results_dir/study. Returns the
    result record. If the trial is already done (same identity) and not opts.force, returns
    the saved record. A result with a different identity is never overwritten without force;
    a damaged one is set aside and the trial trained again. A usable mid-trial checkpoint of
    the trial is resumed from unless opts.force (checkpoint.py)."""
    t_start = time.time()
    started_at = datetime.datetime.now().astimezone().isoformat()
    check_model(model_name)
    check_activation(activation)
    vary = opts.vary
    seeds = trial_seeds(config.seed_base, trial, vary)
    study = study or 'default'
    study_dir = os.path.join(opts.results_dir, study)
    json_path = trial_path(opts.results_dir, study, model_name, activation, trial)
    npz_path = json_path[:-len('json')] + 'npz'
    dev = resolve_device(opts.device)
    amp_dtype = autocast_dtype(opts.dtype, dev)
    if opts.threads:
        torch.set_num_threads(opts.threads)

    task = make_task(config, opts.data_dir)
    if model_kind(model_name) != task.kind:
        raise ValueError(f"model {model_name!r} trains on {model_kind(model_name)} data, but dataset "
                         f"{config.dataset!r} is a {task.kind} task")
    config = replace(config, **task.config_updates())
    identity = trial_identity(task, model_name, activation, trial, vary, config)
    state = existing_trial(json_path, identity)
    if state == 'done' and not opts.force:
        checkpoint.discard(checkpoint.checkpoint_path(json_path))  # a kill between the JSON and its removal
        with open(json_path) as f:
            return json.load(f)
    if state.startswith('damaged'):
        _note(set_aside_damaged(json_path, study_dir, state))
    elif state != 'absent' and not opts.force:
        raise FileExistsError(f"{json_path} exists and is {state}; use another --study or "
                              f"--results-dir, or --force to overwrite it")

    set_determinism(opts.deterministic, dev)
    # three streams: data from its own generator, init from its own seeded fork inside
    # build_model, dropout (and router jitter) from the global RNG, seeded last of all
    data_gen = torch.Generator().manual_seed(seeds['data'])
    model = build_model(model_name, activation, config, seed=seeds['init']).to(dev)
    n_params = count_parameters(model)
    optimizer = make_optimizer(model, config, dev)
    step_model = torch.compile(model) if opts.compile else model
    amp = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
    # after the model is built and on its device, on every device; no seeding after this
    seed_dropout_stream(seeds['dropout'])
    streams = None

    history = {'iter': [], 'train_loss': [], 'val_loss': [], 'lr': [], 'grad_norm': []}
    best_val, best_state, evals_since_best, stopped_early_at = math.inf, None, 0, None
    eval_time, last_loss, grad_norm = 0.0, float('nan'), None
    it, train_elapsed, resumed_from = 0, 0.0, []
    # a checkpoint is resumed only by the same trial run the same way (bitwise continuation)
    ckpt = checkpoint.TrialCheckpoints(
        json_path, {**identity, 'run': {'device': dev.type, 'dtype': str(amp_dtype), 'compile': opts.compile,
                                        'deterministic': opts.deterministic, 'threads': torch.get_num_threads()}},
        config.eval_interval if opts.checkpoint_every is None else opts.checkpoint_every, study_dir, dev, data_gen)
    loop = ckpt.resume(opts.force, model, optimizer, data_gen, lambda line: _note(f"{model_name}/{activation} "
                                                                                  f"trial {trial}: {line}"))
    if loop:  # streams too: they were taken at iteration 0, which a resumed trial never reaches
        (it, history, best_val, best_state, evals_since_best, eval_time, train_elapsed, started_at, streams) = (
            loop[k] for k in ('iter', 'history', 'best_val', 'best_state', 'evals_since_best', 'eval_time',
                              'training_time', 'started_at', 'streams'))
        resumed_from = loop['resumed_from'] + [it]
        t_start -= loop['total_time']
    train_stream = task.train_batches(config.batch_size, data_gen, start=it * config.grad_accum_steps)
    # on CUDA, reading the loss forces a sync: read it every 10 steps there, every step on CPU
    check_every = 10 if dev.type == 'cuda' else 1
    bar = _progress(config.max_iters, f"{model_name}/{activation} trial {trial}", opts.progress)
    bar.update(it)
    log = ProgressLog(f"{model_name}/{activation} trial {trial}", config.max_iters, n_evaluations(config),
                      start=it, start_eval_time=eval_time)
    t_train = time.time() - train_elapsed
    while True:
        # a resumed trial's evaluation at the iteration it resumed at is in the checkpoint
        if (it % config.eval_interval == 0 or it == config.max_iters) and it != ckpt.resumed_at:
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
        if ckpt.due(it):
            now = time.time()
            ckpt.save(it, it * config.grad_accum_steps, model, optimizer, {
                'history': history, 'best_val': best_val, 'best_state': best_state,
                'evals_since_best': evals_since_best, 'eval_time': eval_time, 'training_time': now - t_train,
                'total_time': now - t_start, 'started_at': started_at, 'resumed_from': resumed_from,
                'streams': streams})
        checkpoint.before_step()  # a test hook: no-op unless REPRO_TEST_KILL_AT is set
        lr = lr_at(it, config)
        for group in optimizer.param_groups:
            group['lr'] = lr
        batches = [tuple(t.to(dev, non_blocking=True) for t in next(train_stream))
                   for _ in range(config.grad_accum_steps)]
        # the gradient norm is logged at eval points: compute it on the step before one
        want_norm = (it + 1) % config.eval_interval == 0 or it + 1 == config.max_iters
        if it == 0:  # the streams as the first step finds them
            streams = stream_fingerprints(model, batches, dev)
        loss, grad_norm = train_step(step_model, optimizer, batches, config, amp, want_norm)
        it += 1
        if it % check_every == 0 or it == config.max_iters:
            last_loss = loss.item()
            if not math.isfinite(last_loss):
                raise TrainingError(f"non-finite training loss {last_loss} at iteration {it}")
            bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
        bar.update(1)
        log.update(it, last_loss, eval_time, len(history['iter']))
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
        'training_time': training_time, 'eval_time': eval_time, 'checkpoint_time': ckpt.time,
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
    # last, after everything saved has been computed (None for classifiers: no time axis)
    metrics['causality_max_change'] = causality_probe(model, task, dev)

    # predictions first, then the JSON that marks the trial done
    arrays = {'probs': probs, 'eval_indices': task.eval_indices,
              'targets': (task.eval_y[:, -1] if task.eval_y.dim() == 2 else task.eval_y).numpy().astype(np.int64),
              **extras}
    atomic_write(npz_path, lambda f: np.savez(f, **arrays))
    if opts.save_checkpoints:
        atomic_write(json_path[:-len('json')] + 'pt', lambda f: torch.save(model.state_dict(), f))
    metrics['total_time'] = time.time() - t_start
    record = {
        'schema_version': SCHEMA_VERSION, 'source': 'measured', 'study': study, **identity,
        'deterministic': opts.deterministic, 'dtype': str(amp_dtype or torch.float32).replace('torch.', ''),
        'data': task.data_info, 'eval_hash': task.eval_hash,
        'predictions_file': os.path.basename(npz_path), 'predictions_sha256': sha256_file(npz_path),
        'streams': streams, 'metrics': metrics, 'history': history, 'resumed_from': resumed_from,
        'provenance': {**provenance(dev, opts.deterministic), 'started_at': started_at,
                       'finished_at': datetime.datetime.now().astimezone().isoformat()},
    }
    write_json(json_path, record)
    ckpt.discard()  # the trial is done: its JSON holds everything
    return record


def n_evaluations(config):
    """Loss estimates in a trial that runs to max_iters: every eval_interval steps and at the end."""
    return config.max_iters // config.eval_interval + 1 + bool(config.max_iters % config.eval_interval)


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


def run_options(args, **changes):
    """RunOptions from the flags of add_run_args plus --threads (both command lines have it)."""
    return replace(RunOptions(results_dir=args.results_dir, vary=args.vary, device=args.device, dtype=args.dtype,
                              deterministic=args.deterministic, compile=args.compile, data_dir=args.data_dir,
                              save_checkpoints=args.save_checkpoints, force=args.force,
                              threads=args.threads, checkpoint_every=args.checkpoint_every), **changes)


def preflight(args, config, study):
    """Everything a train.py run can be refused for, checked before its first trial: the
    data, device and dtype, results of another config, the results folder, memory.
    Raises ValueError or DataError (usage errors) or OSError; returns the state of each
    trial ('absent', 'done': skipped unless --force, or 'damaged (why)': set aside and retrained)."""
    dev = resolve_device(args.device)
    autocast_dtype(args.dtype, dev)
    # memory before the data: an impossible block_size makes GBs of evaluation windows. Without
    # the data's class count this is a lower bound (the data only adds output classes)
    check_memory([(args.model, args.activation)], lower_bound_config(config), dev)
    task = make_task(config, args.data_dir)
    if model_kind(args.model) != task.kind:
        raise ValueError(f"model {args.model!r} trains on {model_kind(args.model)} data, but dataset "
                         f"{config.dataset!r} is a {task.kind} task")
    full = replace(config, **task.config_updates())
    ks = range(args.first_trial, args.first_trial + args.trials)
    states = [existing_trial(trial_path(args.results_dir, study, args.model, args.activation, k),
                             trial_identity(task, args.model, args.activation, k, args.vary, full)) for k in ks]
    if not args.force:
        for k, state in zip(ks, states):
            if state not in ('absent', 'done') and not state.startswith('damaged'):
                raise ValueError(f"{trial_path(args.results_dir, study, args.model, args.activation, k)} exists "
                                 f"and is {state}; use another --study or --results-dir, or --force to "
                                 f"overwrite it")
    to_run = sum(args.force or s != 'done' for s in states)
    # each trial saves n_eval x classes float32 probabilities (and a JSON of a few 100 kB)
    check_writable(os.path.join(args.results_dir, study, args.model, args.activation),
                   need_bytes=to_run * (4 * full.n_eval * full.vocab_size + 2 ** 20))
    if to_run:
        check_memory([(args.model, args.activation)], full, dev)
    return states


def lower_bound_config(config):
    """config with the sizes the data fixes (vocab_size, n_inputs) at 1 where not yet known:
    for a memory estimate that can only grow once the data is read."""
    return replace(config, vocab_size=config.vocab_size or 1, n_inputs=config.n_inputs or 1)


EPILOG = f"""Names: --model {', '.join(ALL_MODEL_NAMES)};
  --activation {', '.join(ACTIVATION_NAMES)}, or smelu_<beta> (e.g. smelu_0.25).
Before the first trial, the data, device, dtype, results folder, memory (an estimate against
what the device has available) and any saved result of another config are checked.
{exit_help()}"""


def main(argv=None):
    parser = Parser(description='Train seeded trials of one model/activation pair.', epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True, metavar='NAME', help=f"one of {', '.join(ALL_MODEL_NAMES)}")
    parser.add_argument('--activation', required=True, metavar='NAME',
                        help=f"one of {', '.join(ACTIVATION_NAMES)}, or smelu_<beta>")
    parser.add_argument('--trials', type=int, default=3, help='trials to train (default: 3)')
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
        states = preflight(args, config, study)
        opts = run_options(args)  # checks --checkpoint-every
    except (ValueError, DataError) as e:
        parser.exit(EXIT_USAGE, f"error: {' '.join(str(e).split())}\n")
    except OSError as e:
        parser.exit(EXIT_FAILURE, f"error: {os_error_message(e)}\n")

    rows, trained = [], 0
    for k, state in zip(range(args.first_trial, args.first_trial + args.trials), states):
        name = f"{args.model}/{args.activation} trial {k}"
        try:
            r = run_trial(args.model, args.activation, k, config, study, opts)
        except KeyboardInterrupt:
            parser.exit(EXIT_INTERRUPT, f"interrupted: {name} stopped and left no result (only its last checkpoint, "
                                        f"if it reached one); {len(rows)} trial(s) done before it. Run the same "
                                        f"command again to resume.\n")
        except (DataError, ValueError, FileExistsError) as e:
            parser.exit(EXIT_USAGE, f"error: {name}: {e}\n")
        except TrainingError as e:
            parser.exit(EXIT_FAILURE, f"error: {name}: {e}\n")
        except OSError as e:
            parser.exit(EXIT_FAILURE, f"error: {name}: {os_error_message(e)}\n")
        except Exception:
            traceback.print_exc()
            parser.exit(EXIT_FAILURE, f"error: {name} failed (traceback above)\n")
        m = r['metrics']
        rows.append(m)
        skipped = state == 'done' and not args.force
        trained += not skipped
        print(f"{name}: " + ("already done (skipped): " if skipped else '') +
              f"val loss {m['val_loss']:.4f}  val acc {m['val_accuracy']:.4f}  train loss {m['train_loss']:.4f}  " +
              (f"(saved {r['provenance'].get('finished_at', '?')[:19]})" if skipped else
               f"{m['total_time']:.1f}s all-in ({m['tokens_per_sec']:,.0f} tok/s)") +
              (f"  resumed from iteration {', '.join(map(str, r['resumed_from']))}" if r.get('resumed_from') else ''))
    vl = np.array([m['val_loss'] for m in rows])
    print(f"{len(rows)} trial(s) ({trained} trained, {len(rows) - trained} already done) in "
          f"{os.path.join(args.results_dir, study, args.model, args.activation)}: "
          f"val loss {vl.mean():.4f}" + (f" ± {vl.std(ddof=1):.4f} (std)" if len(vl) > 1 else ""))


if __name__ == '__main__':
    stop_promptly_on_ctrl_c()
    main()
