"""
Train one seeded trial and hand its result to the store: the objective half of the
objective/storage split (store.py keeps the records; the trainer never decides what a file
on disk means). How trials are seeded, resumed and recorded: docs/trials-and-resume.md; the
path of one trial through the modules: docs/design.md.

    python train.py --model minigpt --activation gelu --config cpu --trials 3

The trainer talks to the data only through a Task (prepare_data.py) and to the model only
through forward(x, targets) -> (logits, loss). Optional hooks: model.aux_loss (added to the
training loss only), model.trial_metrics(), model.eval_extras() (arrays saved beside the
predictions), task.trial_metrics(model, device, amp) (a classifier's test accuracy).
"""
import argparse
import datetime
import math
import resource
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import cli
import plan as planning
import store
from activations import ACTIVATION_NAMES
from config import Parser, RunOptions, n_evaluations, takes_snapshots
from device import (autocast_dtype, cublas_workspace, dtype_name, provenance, resolve_device, run_settings,
                    set_determinism)
from fileio import DataError, atomic_write
from model_factories import ALL_MODEL_NAMES, build_model, check_activation, check_model, count_parameters, model_kind
from prepare_data import make_task
from trial_checks import activation_calls, causality_probe, stream_fingerprints


class TrainingError(RuntimeError):
    """A trial that cannot produce a valid result (non-finite loss, ...)."""


def seed_dropout_stream(seed):
    """Seed the global RNG that dropout and router jitter draw from. torch.manual_seed seeds
    the CPU generator and every CUDA device's generator (manual_seed_all), so this is the
    dropout seed on whichever device the trial runs. run_trial calls it once, after the
    model is built and on its device, and nothing seeds the global RNG after it before the
    first step: no later seeding call (the init seed's, say) can take its place."""
    torch.manual_seed(seed)


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

@dataclass
class LoopState:
    """Everything the training loop carries from one step to the next beyond the model,
    optimizer and RNGs; a checkpoint saves and restores it as one thing (as_dict)."""
    it: int = 0
    history: dict = field(default_factory=lambda: {k: [] for k in ('iter', 'train_loss', 'val_loss', 'lr',
                                                                   'grad_norm')})
    best_val: float = math.inf
    best_state: dict | None = None   # early stopping: the best weights seen
    evals_since_best: int = 0
    stopped_early_at: int | None = None
    eval_time: float = 0.0
    training_time: float = 0.0
    total_time: float = 0.0          # all-in seconds of the earlier runs of a resumed trial
    started_at: str = ''
    resumed_from: list = field(default_factory=list)
    streams: dict | None = None      # stream fingerprints, taken at iteration 0 (trial_checks)
    snapshots: list = field(default_factory=list)       # predictions at each evaluation point (tensors)
    snapshot_iters: list = field(default_factory=list)  # ... and their iterations

    def as_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_checkpoint(cls, saved):
        names = {f.name for f in fields(cls)} - {'it'}
        state = cls(it=saved['iter'], **{k: v for k, v in saved.items() if k in names})
        state.resumed_from = state.resumed_from + [state.it]
        return state


@dataclass
class Run:
    """What one trial trains with: fixed from setup to the end."""
    name: str
    model: torch.nn.Module
    step_model: torch.nn.Module      # the model, or its torch.compile
    optimizer: torch.optim.Optimizer
    task: object
    config: object
    device: torch.device
    amp: object                      # autocast context, or nullcontext
    ckpt: checkpoint.TrialCheckpoints
    data_gen: torch.Generator
    progress: bool = True
    snapshots: bool = False          # predictions on the evaluation set at every evaluation point


def run_trial(model_name, activation, trial, config, study, opts=RunOptions()):
    """Train one trial and save it through the store under opts.results_dir/study; return
    its record. A trial already done (same identity) is not trained again unless opts.force;
    a result of another identity is never overwritten without force; a damaged one is set
    aside and the trial trained again; a usable checkpoint is resumed from."""
    t_start = time.time()
    check_model(model_name)
    check_activation(activation)
    key = store.TrialKey(opts.results_dir, study or 'default', model_name, activation, trial)
    dev = resolve_device(opts.device)
    amp_dtype = autocast_dtype(opts.dtype, dev)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    task = make_task(config, opts.data_dir)
    if model_kind(model_name) != task.kind:
        raise ValueError(f"model {model_name!r} trains on {model_kind(model_name)} data, but dataset "
                         f"{config.dataset!r} is a {task.kind} task")
    config = replace(config, **task.config_updates())
    ident = store.identity(task.kind, model_name, activation, trial, opts.vary, config, dtype_name(amp_dtype),
                           opts.deterministic, opts.compile, task.eval_hash)
    state = store.state(key, ident)
    if state.kind == 'done' and not opts.force:
        store.discard_checkpoint(key)  # a kill between the JSON and its removal
        return store.load_trial(key.json)['record']
    if state.kind == 'damaged':
        _note(store.set_aside_damaged(key, state.why))
    elif state.kind == 'different' and not opts.force:
        raise FileExistsError(f"{key.json} exists and is {state}; use another --study or "
                              f"--results-dir, or --force to overwrite it")

    set_determinism(opts.deterministic, dev)
    # three streams: data from its own generator, init from its own seeded fork inside
    # build_model, dropout (and router jitter) from the global RNG, seeded last of all
    seeds = ident['seeds']
    data_gen = torch.Generator().manual_seed(seeds['data'])
    model = build_model(model_name, activation, config, seed=seeds['init']).to(dev)
    optimizer = make_optimizer(model, config, dev)
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
    seed_dropout_stream(seeds['dropout'])  # after the model is on its device; no seeding after this
    # a checkpoint is resumed only by the same trial run the same way (bitwise continuation)
    ckpt = checkpoint.TrialCheckpoints(key, {**ident, 'run': run_settings(opts, dev, amp_dtype)},
                                       config.eval_interval if opts.checkpoint_every is None else opts.checkpoint_every,
                                       dev, data_gen)
    r = Run(key.name.split(' [')[0], model, torch.compile(model) if opts.compile else model, optimizer, task, config,
            dev, torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else nullcontext(), ckpt, data_gen,
            opts.progress, takes_snapshots(opts.snapshots, config))
    s = LoopState(started_at=datetime.datetime.now().astimezone().isoformat())
    saved = ckpt.resume(opts.force, model, optimizer, data_gen, lambda line: _note(f"{r.name}: {line}"))
    if saved:
        s = LoopState.from_checkpoint(saved)
        t_start -= s.total_time
    train(r, s, t_start)
    metrics, arrays, calls = evaluate_trained(r, s)
    record = {'schema_version': store.SCHEMA_VERSION, 'source': 'measured', 'study': key.study,
              'preset': opts.preset, **ident, 'data': task.data_info,
              'streams': s.streams, 'activation_calls': calls, 'metrics': metrics, 'history': s.history, 'resumed_from': s.resumed_from,
              'provenance': {**provenance(dev, opts.deterministic), 'started_at': s.started_at,
                             'finished_at': datetime.datetime.now().astimezone().isoformat()}}
    if opts.save_checkpoints:
        atomic_write(key.path('pt'), lambda f: torch.save(model.state_dict(), f))
    metrics['total_time'] = time.time() - t_start
    return store.save(key, arrays, record)


def train(r, s, t_start):
    """The training loop, from s.it to max_iters (or early stopping): evaluate at every
    eval_interval, checkpoint when due, one optimizer step. Updates s in place."""
    config, ckpt = r.config, r.ckpt
    train_stream = r.task.train_batches(config.batch_size, r.data_gen, start=s.it * config.grad_accum_steps)
    check_every = 10 if r.device.type == 'cuda' else 1  # reading the loss syncs CUDA: every 10 steps there
    bar = _progress(config.max_iters, r.name, r.progress)
    bar.update(s.it)
    log = cli.ProgressLog(r.name, config.max_iters, n_evaluations(config), start=s.it, start_eval_time=s.eval_time)
    kill_hook = checkpoint.step_kill_hook()  # None unless a kill test set it
    t_train, grad_norm, last_loss = time.time() - s.training_time, None, float('nan')
    while True:
        # a resumed trial's evaluation at the iteration it resumed at is in the checkpoint
        if (s.it % config.eval_interval == 0 or s.it == config.max_iters) and s.it != ckpt.resumed_at:
            if evaluate_and_maybe_stop(r, s, grad_norm):
                break
        if s.it == config.max_iters:
            break
        if ckpt.due(s.it):
            now = time.time()
            s.training_time, s.total_time = now - t_train, now - t_start
            ckpt.save(s.it, s.it * config.grad_accum_steps, r.model, r.optimizer, s.as_dict())
        if kill_hook:
            kill_hook()
        lr = lr_at(s.it, config)
        for group in r.optimizer.param_groups:
            group['lr'] = lr
        batches = [tuple(t.to(r.device, non_blocking=True) for t in next(train_stream))
                   for _ in range(config.grad_accum_steps)]
        # the gradient norm is logged at eval points: compute it on the step before one
        want_norm = (s.it + 1) % config.eval_interval == 0 or s.it + 1 == config.max_iters
        if s.it == 0:  # the streams as the first step finds them
            s.streams = stream_fingerprints(r.model, batches, r.device)
        loss, grad_norm = train_step(r.step_model, r.optimizer, batches, config, r.amp, want_norm)
        s.it += 1
        if s.it % check_every == 0 or s.it == config.max_iters:
            last_loss = loss.item()
            if not math.isfinite(last_loss):
                raise TrainingError(f"non-finite training loss {last_loss} at iteration {s.it}")
            bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
        bar.update(1)
        log.update(s.it, last_loss, s.eval_time, len(s.history['iter']))
    bar.close()
    s.training_time = time.time() - t_train


def evaluate_and_maybe_stop(r, s, grad_norm):
    """A loss estimate at s.it into the history; early stopping's bookkeeping. True: stop now
    (the best weights seen are loaded back)."""
    t0 = time.time()
    losses = estimate_loss(r.step_model, r.task, r.config, r.device, r.amp)
    if r.snapshots:  # eval mode, no random draws: the training is bitwise the same without them
        s.snapshots.append(torch.from_numpy(predict(r.step_model, r.task, r.device, r.amp)[0]))
        s.snapshot_iters.append(s.it)
    s.eval_time += time.time() - t0
    for k, v in (('iter', s.it), ('train_loss', losses['train']), ('val_loss', losses['val']),
                 ('lr', lr_at(min(s.it, r.config.max_iters - 1), r.config)),
                 ('grad_norm', None if grad_norm is None else float(grad_norm))):
        s.history[k].append(v)
    if not all(map(math.isfinite, losses.values())):
        raise TrainingError(f"non-finite loss estimate at iteration {s.it}: {losses}")
    if not r.config.early_stop_patience:
        return False
    if losses['val'] < s.best_val:
        s.best_val, s.evals_since_best = losses['val'], 0
        s.best_state = {k: v.detach().clone() for k, v in r.model.state_dict().items()}
        return False
    s.evals_since_best += 1
    if s.evals_since_best < r.config.early_stop_patience:
        return False
    s.stopped_early_at = s.it
    r.model.load_state_dict(s.best_state)  # keep the best weights seen
    return True


def evaluate_trained(r, s):
    """(metrics, arrays to save, activation calls) of the trained model: final losses,
    predictions on the evaluation set (and the snapshots taken on the way), the model's and
    task's own metrics, then the causality probe and the activation functions really called."""
    config, task, dev = r.config, r.task, r.device
    if s.stopped_early_at is not None or s.history['iter'][-1] != s.it:
        final = estimate_loss(r.step_model, task, config, dev, r.amp)
    else:  # the last periodic estimate was taken on the final weights
        final = {'train': s.history['train_loss'][-1], 'val': s.history['val_loss'][-1]}
    probs, val_acc, token_acc, extras = predict(r.step_model, task, dev, r.amp)
    metrics = {
        'train_loss': final['train'], 'val_loss': final['val'],
        'val_accuracy': val_acc, 'token_accuracy': token_acc,
        # exp(val loss in nats); a diverged trial's overflows to inf, saved as null (fileio.json_ready)
        'perplexity': (math.exp(final['val']) if final['val'] < 700 else math.inf) if task.kind == 'lm' else None,
        'training_time': s.training_time, 'eval_time': s.eval_time, 'checkpoint_time': r.ckpt.time,
        'tokens_per_sec': s.it * config.grad_accum_steps * task.tokens_per_batch(config.batch_size)
                          / max(1e-9, s.training_time - s.eval_time),
        'n_params': count_parameters(r.model), 'iters': s.it, 'stopped_early_at': s.stopped_early_at,
        'peak_memory_mb': (torch.cuda.max_memory_allocated(dev) if dev.type == 'cuda'
                           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
        'peak_memory_kind': 'cuda_max_allocated' if dev.type == 'cuda' else 'process_max_rss',
    }
    if hasattr(r.model, 'trial_metrics'):
        metrics.update(r.model.trial_metrics())
    if hasattr(task, 'trial_metrics'):
        metrics.update(task.trial_metrics(r.step_model, dev, r.amp))
    # last, after everything saved has been computed (None for classifiers: no time axis)
    metrics['causality_max_change'] = causality_probe(r.model, task, dev)
    arrays = {'probs': probs, 'eval_indices': task.eval_indices,
              'targets': (task.eval_y[:, -1] if task.eval_y.dim() == 2 else task.eval_y).numpy().astype(np.int64),
              **extras}
    if s.snapshots:
        arrays.update(snapshot_probs=torch.stack(s.snapshots).numpy(),
                      snapshot_iters=np.array(s.snapshot_iters, dtype=np.int64))
    return metrics, arrays, activation_calls(r.model, task, dev)


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

EPILOG = f"""Names: --model {', '.join(ALL_MODEL_NAMES)};
  --activation {', '.join(ACTIVATION_NAMES)}, or smelu_<beta> (e.g. smelu_0.25).
Results go to <results-dir>/<study>: --study defaults to the preset's name, or to the preset's
name plus the overrides when any config flag is given, so that a quick check never lands in
the main job's folder. A study holds one config; a run that would add another is refused.
Before the first trial, the data, device, dtype, results folder, memory (an estimate against
what the device has available) and any saved result of another config are checked.
{cli.exit_help()}"""


def make_parser():
    parser = Parser(description='Train seeded trials of one model/activation pair.', epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True, metavar='NAME', help=f"one of {', '.join(ALL_MODEL_NAMES)}")
    parser.add_argument('--activation', required=True, metavar='NAME',
                        help=f"one of {', '.join(ACTIVATION_NAMES)}, or smelu_<beta>")
    parser.add_argument('--trials', type=int, default=3, help='trials to train (default: 3)')
    parser.add_argument('--first-trial', type=int, default=0, help='train trials first..first+trials-1')
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (default: all cores)')
    cli.add_run_args(parser)
    # one pair, in this process: what the plan of run_all_experiments.py takes as a sweep's flags
    parser.set_defaults(executor='local', workers=1, trials_per_gpu=None, ray_address=None, ray_num_cpus=None,
                        ray_num_gpus=None, dry_run=False)
    return parser


def _report(job, r):
    m, skipped = r['metrics'], job.state.kind == 'done'
    return (f"{job.name}: " + ("already done (skipped): " if skipped else '') +
            f"val loss {m['val_loss']:.4f}  val acc {m['val_accuracy']:.4f}  train loss {m['train_loss']:.4f}  " +
            (f"(saved {r['provenance'].get('finished_at', '?')[:19]})" if skipped else
             f"{m['total_time']:.1f}s all-in ({m['tokens_per_sec']:,.0f} tok/s)") +
            (f"  resumed from iteration {', '.join(map(str, r['resumed_from']))}" if r.get('resumed_from') else ''))


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    args.models, args.activations = [args.model], [args.activation]
    cublas_workspace(args.deterministic)  # before the plan's first CUDA call
    try:
        p = planning.make_plan(args, one_pair=True)
        planning.check_writable(p)
        lock = store.StudyLock(p.study_dir)  # the same lock as a sweep's: one writer per study
    except (ValueError, DataError, OSError) as e:
        parser.exit(cli.exit_code(e), cli.error_line(e) + "\n")
    print(planning.describe(p), flush=True)
    rows = []
    with lock:
        for job in p.jobs:
            try:
                r = run_trial(job.model, job.activation, job.trial, job.config, job.study, p.opts)
            except KeyboardInterrupt:
                parser.exit(cli.EXIT_INTERRUPT, f"interrupted: {job.name} stopped and left no result"
                            f"{_checkpoint_note(job.key(p.results_dir))}; {len(rows)} trial(s) done before it. "
                            f"Run the same command again to resume.\n")
            except TrainingError as e:
                parser.exit(cli.EXIT_FAILURE, f"error: {job.name}: {e}\n")
            except (DataError, ValueError, OSError) as e:
                parser.exit(cli.exit_code(e), f"error: {job.name}: {cli.error_line(e)[len('error: '):]}\n")
            except Exception:  # noqa: BLE001 -- a bug: its traceback, then one line
                traceback.print_exc()
                parser.exit(cli.EXIT_FAILURE, f"error: {job.name} failed (traceback above)\n")
            rows.append(r['metrics'])
            print(_report(job, r), flush=True)
    vl = np.array([m['val_loss'] for m in rows])
    trained = sum(j.state.kind != 'done' or p.opts.force for j in p.jobs)
    print(f"{len(rows)} trial(s) ({trained} trained, {len(rows) - trained} already done) in "
          f"{p.study_dir}: val loss {vl.mean():.4f}" + (f" ± {vl.std(ddof=1):.4f} (std)" if len(vl) > 1 else ""))


def _checkpoint_note(key):
    it = store.checkpoint_iteration_any(key)
    return f" but its checkpoint at iteration {it}" if it is not None else " and no checkpoint"


if __name__ == '__main__':
    cli.stop_promptly_on_ctrl_c()
    main()
