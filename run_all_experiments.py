"""
Run a whole study from one command: every model x activation x trial through the trainer
(train.run_trial), then the analysis (analyze_results.analyze).

    python run_all_experiments.py --config cpu                    # the default grid on the cpu preset
    python run_all_experiments.py --study seed_partial            # the original partial study (gpu preset)
    python run_all_experiments.py --study seed_full --dry-run     # what would run, what is done, how long
    python run_all_experiments.py --config cpu --workers 2 --models minigpt charlm --activations relu gelu
    python run_all_experiments.py --study seed_full --executor ray --ray-address auto --ray-num-gpus 0.25
    python run_all_experiments.py --study mnist_ffn --task mnist1d --gated-width matched  # the FFN study

Resume. A trial is done exactly when its result JSON exists and records the same identity
(task, model, activation, trial, vary, seeds, config: train.existing_trial); done trials are
skipped, --force reruns them. train.py writes a trial's .npz and then its JSON, each to a
hidden temp file renamed into place, so a sweep killed at any moment (Ctrl-C, SIGKILL, power)
leaves finished trials and nothing half-written; the next run finishes the grid. One sweep
at a time per study: <study>/.sweep.lock is held while it runs, and on start the sweep
removes temp files (.trial_*.tmp) that a killed run left behind.

Failures. A trial that raises (non-finite loss, out of memory, a bug), or whose worker
process dies, is appended to <study>/failures.jsonl (a grid design: the cell's folder; model,
activation, trial, config, error, traceback, time; one whole line per os.write, fsynced); the sweep goes on with the rest and
exits 1 at the end naming the failed trials. Ctrl-C stops the running trials (they leave no
result), says what finished, and exits 130; the same command resumes.

Parallel. --workers N runs N trials at once in spawned processes. On CPU each trial gets
--threads torch threads (default: cores // N). Float reductions depend on the thread count,
so predictions are bitwise identical between runs with different --workers only at the same
--threads (every trial records its thread count in provenance.threads). On CUDA the workers
are placed round-robin over the visible devices, --trials-per-gpu per device.

Ray (optional: pip install "ray[default]"; imported only with --executor ray). Each trial is a
Ray task (--ray-num-cpus, --ray-num-gpus per trial, fractional allowed) calling
train.run_trial; the driver shows the same progress and does the same resume and failure
bookkeeping. --results-dir (and the data) must be on storage that every node sees, and this
project importable at the same path on every node (the driver puts it on the tasks'
PYTHONPATH). Results are identical to local execution at the same --threads on the same
hardware.
"""
import argparse
import datetime
import difflib
import glob
import importlib.util
import itertools
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import fields, replace

import torch

import train
from activations import ACTIVATION_NAMES, check_activation
from config import Config, Parser
from model_factories import CLASSIFIER_NAMES, MODEL_NAMES, build_model, check_model, model_kind
from prepare_data import DATA_DIR_ENV, DataError, data_dir as resolve_data_dir, make_task

PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))
BENCH_FIGURES = os.path.join(PROJECT_DIR, 'benchmarks', 'bench_sweep.json')
RAY_INSTALL = 'pip install "ray[default]"'

# ----------------------------------------------------------------------------- study designs

ORIGINAL_MODELS = ('charlm', 'tinylstm', 'minigpt', 'convlm', 'hybridlm', 'nanotransformer')
PARTIAL_ACTIVATIONS = ('smelu_05', 'smelu_1', 'relu', 'gelu', 'swish')

# A design sets the grid and the preset of a named study; explicit flags override them.
# A design with a `grid` also sweeps config fields: every combination of the grid's values is
# a cell, an ordinary study folder <results-dir>/<study>/<root>/<cell> holding the models x
# activations x trials of that config (root and cell are formats over the cell's config).
# `tiny_trials`: a trial is far too small for several threads (OpenMP threads of a
# 100-parameter model spend their time waiting on each other, worse on a busy machine), so
# the default is one thread per trial and one worker per core.
DESIGNS = {
    'seed_partial': dict(config='gpu', models=ORIGINAL_MODELS, activations=PARTIAL_ACTIVATIONS, trials=3,
                         about='the original partial study: 6 models x 5 activations x 3 trials, gpu preset'),
    'seed_full': dict(config='gpu_full', models=ORIGINAL_MODELS, activations=PARTIAL_ACTIVATIONS + ('swiglu',),
                      trials=3, about='the original full study: 6 models x 6 activations x 3 trials, gpu_full preset'),
    'mnist_ffn': dict(config='mnist_ffn', models=('ffn',), activations=('relu', 'geglu'), trials=20,
                      grid={'hidden': (2, 4, 8, 16), 'batch_size': (8, 64), 'learning_rate': (1e-1, 1e-2, 1e-3, 1e-4)},
                      root='{dataset}/gated_{gated_width}', cell='h{hidden}_b{batch_size}_lr{learning_rate:g}',
                      tiny_trials=True,
                      about='FFN_ReLU vs FFN_GeGLU on MNIST-1D / MNIST (--task): every width x batch size x '
                            'learning rate, 20 seeds each; best-of-k report (--gated-width same|matched)'),
}
# the flags that override a grid's values (a design's grid fields cannot be set otherwise)
GRID_FLAGS = {'hidden': 'widths', 'batch_size': 'batch_sizes', 'learning_rate': 'lrs'}
# Without a design: this grid on --config (default cpu).
DEFAULT_GRID = dict(config='cpu', models=ORIGINAL_MODELS, activations=PARTIAL_ACTIVATIONS, trials=3)
STUDY_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*$')


def study_names():
    return list(DESIGNS)


# ----------------------------------------------------------------------------- one trial (any process)

def _run_job(job, common, slot):
    """Run one trial through train.run_trial; return a small picklable outcome, never raise
    an Exception (KeyboardInterrupt and SystemExit pass: they stop the sweep)."""
    t0 = time.time()
    try:
        r = train.run_trial(job['model'], job['activation'], job['trial'], job['config'],
                            results_dir=common['results_dir'], study=job['study'], vary=common['vary'],
                            device=slot['device'], dtype=common['dtype'], deterministic=common['deterministic'],
                            compile=common['compile'], data_dir=common['data_dir'],
                            save_checkpoints=common['save_checkpoints'], progress=False,
                            force=common['force'], threads=slot['threads'])
        m = r['metrics']
        return {'ok': True, 'val_loss': m['val_loss'], 'val_accuracy': m['val_accuracy'],
                'seconds': m['total_time']}
    except Exception as e:  # noqa: BLE001 -- a trial's failure of any kind is recorded, not fatal
        tb = traceback.format_exc()
        if slot['device'].startswith('cuda'):
            torch.cuda.empty_cache()  # after an out-of-memory error, give the next trial a clean slate
        return {'ok': False, 'error': f"{type(e).__name__}: {e}", 'traceback': tb,
                'seconds': time.time() - t0, 'host': socket.gethostname()}


# ----------------------------------------------------------------------------- executors

class InlineExecutor:
    """--workers 1 on one device: trials run one after another in this process."""

    def __init__(self, common, slot):
        self.common, self.slot = common, slot
        self._threads = torch.get_num_threads()

    def run(self, jobs):
        for job in jobs:
            yield job, _run_job(job, self.common, self.slot)

    def close(self, abort=False):
        torch.set_num_threads(self._threads)  # run_trial set it for the trials; give it back


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds the trial: atomic_write removes its temp file


def _die_with_parent(parent_pid):
    """A worker must not outlive its sweep (a SIGKILLed driver would leave it training and
    writing trials that the restarted sweep also trains)."""
    try:  # Linux: the kernel kills us the moment the parent dies
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch():  # elsewhere (and as a backstop): notice within a second
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(1.0)
    threading.Thread(target=watch, daemon=True, name='parent-watch').start()


def _worker_main(conn, common, slot, parent_pid):
    # Ctrl-C in a terminal reaches every process of the group: the driver alone decides
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _die_with_parent(parent_pid)
    if slot['device'].startswith('cuda'):
        torch.cuda.set_device(slot['device'])
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        conn.send(_run_job(job, common, slot))


class PoolExecutor:
    """N spawned worker processes, one slot (device, threads) each; the driver hands each
    worker one trial at a time over its own pipe, so it always knows which trial a worker
    holds: a worker that dies (killed, out of host memory) fails that trial and is replaced."""

    def __init__(self, common, slots):
        import multiprocessing
        self.ctx = multiprocessing.get_context('spawn')  # no fork: torch threads and CUDA don't survive it
        self.common, self.slots = common, slots
        self.workers = [self._start(i) for i in range(len(slots))]

    def _start(self, i):
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=_worker_main, args=(child, self.common, self.slots[i], os.getpid()),
                             daemon=True, name=f'sweep-worker-{i}')
        p.start()
        child.close()
        return {'i': i, 'proc': p, 'conn': parent, 'job': None}

    def _replace(self, w):
        w['conn'].close()
        w['proc'].join(5)
        self.workers[w['i']] = self._start(w['i'])

    def run(self, jobs):
        from multiprocessing.connection import wait
        pending = deque(jobs)
        while pending or any(w['job'] for w in self.workers):
            for w in self.workers:
                if w['job'] is None and pending:
                    w['job'] = pending.popleft()
                    try:
                        w['conn'].send(w['job'])
                    except OSError:  # a dead worker: noticed below, where its trial fails
                        pass
            busy = [w for w in self.workers if w['job'] is not None]
            ready = set(wait([w['conn'] for w in busy] + [w['proc'].sentinel for w in busy], timeout=1.0))
            for w in busy:
                if w['conn'] not in ready and w['proc'].sentinel not in ready:
                    continue
                outcome = None
                try:
                    if w['conn'].poll():
                        outcome = w['conn'].recv()
                except (EOFError, OSError):
                    pass
                if outcome is None:
                    if w['proc'].is_alive():
                        continue
                    w['proc'].join()
                    code = w['proc'].exitcode
                    why = f"exit code {code}"
                    if code is not None and code < 0:
                        try:
                            why = f"killed by {signal.Signals(-code).name}"
                        except ValueError:
                            pass
                    outcome = {'ok': False, 'error': f"worker process died ({why}) while running this trial",
                               'traceback': None, 'seconds': None, 'host': socket.gethostname()}
                    job = w['job']
                    self._replace(w)
                else:
                    job, w['job'] = w['job'], None
                yield job, outcome

    def close(self, abort=False):
        for w in self.workers:
            if abort and w['job'] is not None:
                w['proc'].terminate()  # SIGTERM: the trial unwinds and leaves no result
            else:
                try:
                    w['conn'].send(None)
                except OSError:
                    pass
        deadline = time.time() + 15
        for w in self.workers:
            w['proc'].join(max(0.1, deadline - time.time()))
            if w['proc'].is_alive():
                w['proc'].kill()
                w['proc'].join()
            w['conn'].close()


class RayExecutor:
    """Each trial a Ray task calling train.run_trial. Starts a local Ray instance unless
    --ray-address is given or Ray is already initialised in this process."""

    def __init__(self, common, slot, address, num_cpus, num_gpus, max_in_flight):
        import ray
        self.ray, self.common, self.slot = ray, common, slot
        self.started = False
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=True,
                     **({'include_dashboard': False} if address is None else {}))
            self.started = True
        # the tasks import this project (train, config, ...) from the same path as here
        path = [PROJECT_DIR] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])
        env = {'PYTHONPATH': os.pathsep.join(path)}
        if os.environ.get(DATA_DIR_ENV):
            env[DATA_DIR_ENV] = os.environ[DATA_DIR_ENV]
        self.remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0,
                                 runtime_env={'env_vars': env})(_run_job)
        self.max_in_flight = max_in_flight
        self.in_flight = {}

    def run(self, jobs):
        ray, pending, in_flight = self.ray, deque(jobs), self.in_flight
        common = ray.put(self.common)
        while pending or in_flight:
            while pending and len(in_flight) < self.max_in_flight:
                job = pending.popleft()
                in_flight[self.remote.remote(job, common, self.slot)] = job
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in done:
                job = in_flight.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as e:  # noqa: BLE001 -- the task's worker died, the node was lost, ...
                    text = re.sub(r'\x1b\[[0-9;]*m', '', str(e))
                    last = ([ln.strip() for ln in text.splitlines() if ln.strip()] or [''])[-1]
                    outcome = {'ok': False, 'error': f"{type(e).__name__}: {last}", 'traceback': text,
                               'seconds': None, 'host': None}
                yield job, outcome

    def close(self, abort=False):
        if abort:
            for ref in self.in_flight:
                self.ray.cancel(ref, force=True)
        if self.started:
            self.ray.shutdown()


# ----------------------------------------------------------------------------- files

def append_failure(path, record):
    """Append one JSON line with a single os.write, then fsync: a kill leaves either the
    whole line or none of it (a line cut short by an older crash gets a newline first)."""
    line = (json.dumps(record, default=str) + '\n').encode()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b'\n':
            line = b'\n' + line
        while line:  # one write for any line of sane size; loop only on a short write
            line = line[os.write(fd, line):]
        os.fsync(fd)
    finally:
        os.close(fd)


def stray_temp_files(study_dir):
    """Temp files of fileio.atomic_write (.trial_<k>.<ext>XXXX.tmp) left by a killed run
    (at any depth: a grid design's cells are study folders inside study_dir)."""
    return sorted(glob.glob(os.path.join(study_dir, '**', '.trial_*.tmp'), recursive=True))


class StudyLock:
    """<study>/.sweep.lock, held (flock) while a sweep runs; the kernel drops it when the
    process dies, however it dies."""

    def __init__(self, study_dir):
        self.path, self.fd = os.path.join(study_dir, '.sweep.lock'), None
        os.makedirs(study_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # no flock here: no protection against two sweeps, no harm either
            self.fd = fd
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors='replace').strip() or '?'
            os.close(fd)
            raise ValueError(f"another sweep (pid {holder}) is running on {study_dir}; wait for it "
                             f"or use another --study / --results-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------- time estimate

_NOT_TIMING = ('seed_base', 'eval_seed', 'dataset', 'learning_rate')  # do not change how long a trial takes


def _timing_key(config_dict):
    return json.dumps({k: v for k, v in sorted(config_dict.items()) if k not in _NOT_TIMING})


def _earlier_times(results_dir, keys):
    """[(model, activation, timing key, seconds, threads, where)] of earlier measured trials
    with one of these timing keys, from every study under results_dir (at any depth) and from
    the benchmark figures file."""
    found = []
    for path in glob.glob(os.path.join(results_dir, '**', 'trial_*.json'), recursive=True):
        try:
            with open(path) as f:
                rec = json.load(f)
            t = rec['metrics']['total_time']
            key = _timing_key(rec['config'])
            if rec.get('source') == 'measured' and key in keys and math.isfinite(t):
                found.append((rec['model'], rec['activation'], key, float(t),
                              rec.get('provenance', {}).get('threads'), os.path.dirname(os.path.dirname(
                                  os.path.dirname(path)))))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    try:
        with open(BENCH_FIGURES) as f:
            for t in json.load(f).get('trials', []):
                key = _timing_key(t['config'])
                if key in keys and math.isfinite(t['total_time']):
                    found.append((t['model'], t['activation'], key, float(t['total_time']), t.get('threads'),
                                  _show_path(BENCH_FIGURES)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return found


def estimate(plan):
    """(per-trial seconds or None for each trial to run, a sentence saying where they come
    from). Times only: measured wall times of earlier trials, never a result."""
    keys = [_timing_key(c.to_dict()) for c in plan['to_run_configs']]  # each trial's full config
    found = _earlier_times(plan['results_dir'], set(keys))
    same_threads = [f for f in found if f[4] == plan['threads']]
    used = same_threads or found
    by_pair, by_model = {}, {}
    for m, a, key, t, _, _ in used:
        by_pair.setdefault((m, a, key), []).append(t)
        by_model.setdefault((m, key), []).append(t)
    per, n_pair, n_model = [], 0, 0
    for j, key in zip(plan['to_run'], keys):
        ts = by_pair.get((j['model'], j['activation'], key))
        if ts:
            n_pair += 1
        else:
            ts = by_model.get((j['model'], key))
            n_model += bool(ts)
        per.append(sum(ts) / len(ts) if ts else None)
    if not used:
        return per, (f"no estimate: no earlier trial with this config in {plan['results_dir']} or "
                     f"{_show_path(BENCH_FIGURES)} (train one trial, or run benchmarks/bench_sweep.py)")
    wheres = sorted({w for *_, w in used})
    if len(wheres) > 3:  # a grid design's cells: name their common folder
        try:
            wheres = [f"{len(wheres)} folders under {os.path.commonpath(wheres)}"]
        except ValueError:  # relative and absolute paths mixed
            wheres = [f"{len(wheres)} folders"]
    threads = sorted({str(f[4]) for f in used})
    src = (f"mean all-in time of {len(used)} earlier trial(s) with the same config in {', '.join(wheres)}, "
           f"measured with {'/'.join(threads)} thread(s) per trial"
           + ('' if same_threads else f" (this sweep: {plan['threads']})"))
    missing = sum(p is None for p in per)
    return per, (f"{src}; {n_pair} trial(s) from the same model and activation, {n_model} from the same "
                 f"model only" + (f", {missing} with no figure (not counted)" if missing else ''))


def _show_path(path):
    rel = os.path.relpath(path)
    return path if rel.startswith('..') else rel


def _fmt_seconds(s):
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


# ----------------------------------------------------------------------------- command line

EPILOG = f"""study designs (--study NAME):
{chr(10).join(f'  {k:13s} {v["about"]}' for k, v in DESIGNS.items())}
  any other name is a plain results folder for the grid given by the flags (default:
  {len(DEFAULT_GRID['models'])} models {' '.join(DEFAULT_GRID['models'])}
  x {len(DEFAULT_GRID['activations'])} activations {' '.join(DEFAULT_GRID['activations'])} x {DEFAULT_GRID['trials']} trials
  on --config, default cpu; results go to <results-dir>/<study>, --study defaulting to the preset's name).
  A design only sets defaults: flags given explicitly (--config, --models, --activations,
  --trials, any config override such as --max_iters) override the design's values; the sweep
  prints the overrides, and every trial JSON records its full config.

mnist_ffn: python run_all_experiments.py --study mnist_ffn --task mnist1d [--gated-width matched]
  trains every (--widths x --batch-sizes x --lrs) cell with --trials seeds, one study folder per
  cell under <results-dir>/mnist_ffn/<task>/gated_<same|matched>/h<width>_b<batch>_lr<lr>/, then
  writes the best-of-k report (summary.json, REPORT.md, plots/) in <task>/gated_<...>/.

resume: a trial is skipped when its JSON exists with the same config and seeds (--force
  reruns it); a result with a different config stops the sweep before any training.
failures go to <study>/failures.jsonl; the sweep goes on and exits 1 naming them.
Ray is optional: {RAY_INSTALL}"""


def make_parser():
    parser = Parser(description='Run a study: models x activations x seeded trials, then the analysis.',
                    epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', metavar='NAME',
                        help=f"'all' or model names (valid: {', '.join(MODEL_NAMES + CLASSIFIER_NAMES)}; "
                             f"default: the design's, else {' '.join(DEFAULT_GRID['models'])})")
    parser.add_argument('--activations', nargs='+', metavar='NAME',
                        help=f"'all' or activation names (valid: {', '.join(ACTIVATION_NAMES)}, smelu_<beta>; "
                             f"default: the design's, else {' '.join(DEFAULT_GRID['activations'])})")
    parser.add_argument('--trials', type=int, default=None,
                        help="trials (seeds) per pair, and per cell of a grid design (default: the design's, else 3)")
    parser.add_argument('--workers', type=int, default=None,
                        help='trials at once, in separate processes (default: 1 on CPU, one per core for '
                             'mnist_ffn; on CUDA, visible devices x --trials-per-gpu)')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads per trial (default: cores // workers; 1 for mnist_ffn). Results are bitwise '
                             'identical across different --workers only at the same --threads')
    parser.add_argument('--trials-per-gpu', type=int, default=None,
                        help='CUDA: workers per device, placed round-robin (default: 1)')
    parser.add_argument('--executor', default='local', choices=('local', 'ray'),
                        help=f'local processes, or Ray tasks (optional: {RAY_INSTALL})')
    parser.add_argument('--ray-address', default=None, help="Ray cluster to join (e.g. 'auto'; default: "
                        "start a local Ray instance)")
    parser.add_argument('--ray-num-cpus', type=float, default=None, help='Ray: CPUs per trial (default: 1)')
    parser.add_argument('--ray-num-gpus', type=float, default=None,
                        help='Ray: GPUs per trial, fractional allowed (default: 0; > 0 trains on CUDA)')
    parser.add_argument('--dry-run', action='store_true',
                        help='list the trials to run and those done, with an estimated time; train nothing')
    parser.add_argument('--no-analyze', action='store_true', help='do not run the analysis at the end')
    parser.add_argument('--baseline', default=None, help='analysis: activation compared against (default: relu)')
    parser.add_argument('--plots-dir', default=None, help='analysis: where plots go (default: <study>/plots)')
    grid = parser.add_argument_group('grid designs (mnist_ffn)')
    grid.add_argument('--task', default=None, choices=('mnist1d', 'mnist'),
                      help="the dataset of the mnist_ffn design (default: the preset's, mnist1d; mnist is "
                           "downloaded once)")
    grid.add_argument('--widths', nargs='+', type=int, default=None, help='hidden widths (default: 2 4 8 16)')
    grid.add_argument('--batch-sizes', nargs='+', type=int, default=None, help='batch sizes (default: 8 64)')
    grid.add_argument('--lrs', nargs='+', type=float, default=None,
                      help='learning rates (default: 0.1 0.01 0.001 0.0001)')
    train.add_run_args(parser)
    parser.set_defaults(config=None)  # so that a design's preset applies unless --config is given
    for a in parser._actions:
        if a.dest == 'config':
            a.help += f" (default: the design's, else {DEFAULT_GRID['config']})"
        elif a.dest == 'study':
            a.help = (f"a study design ({', '.join(study_names())}) or any results folder name "
                      f"(default: the preset's name)")
    return parser


def _pick_names(given, default, valid, check, what):
    if given is None:
        names = list(default)
    elif 'all' in given:
        if len(given) > 1:
            raise ValueError(f"--{what}: give 'all' alone or a list of names, not both")
        names = list(valid)
    else:
        names = given
    for n in names:
        check(n)
    return list(dict.fromkeys(names))


def _cores():
    try:
        n = int(os.environ.get('OMP_NUM_THREADS', ''))
        if n > 0:
            return n
    except ValueError:
        pass
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def make_plan(args):
    """Validate everything and work out the sweep; raises ValueError or DataError with a
    one-line message before anything is trained or written."""
    design = DESIGNS.get(args.study)
    base = design or DEFAULT_GRID
    overrides = [f'--{k}' for k in ('config', 'models', 'activations', 'trials') if getattr(args, k) is not None]
    overrides += [f'--{f.name} {getattr(args, f.name)}' for f in fields(Config) if getattr(args, f.name) is not None]
    grid_flags = [f for f in ('task',) + tuple(GRID_FLAGS.values()) if getattr(args, f) is not None]
    overrides += [f"--{f.replace('_', '-')}" for f in grid_flags]
    grid = base.get('grid')
    if not grid and grid_flags:
        raise ValueError(f"{', '.join('--' + f.replace('_', '-') for f in grid_flags)} go with a grid design "
                         f"({', '.join(k for k, d in DESIGNS.items() if d.get('grid'))}), not "
                         f"{'--study ' + args.study if args.study else 'a plain study'}")
    if grid:
        swept = [f'--{k}' for k in grid if getattr(args, k) is not None]
        swept += [f'--{k}' for k in ('dataset', 'data') if getattr(args, k) is not None]
        if swept:
            raise ValueError(f"{', '.join(swept)}: set by design {args.study} (use --task, "
                             f"{', '.join('--' + f.replace('_', '-') for f in GRID_FLAGS.values())})")
        args.dataset = args.task
    args.config = args.config or base['config']
    if args.data is not None and os.path.isfile(args.data):
        args.data = os.path.abspath(args.data)  # the same identity wherever the trial runs
    elif getattr(args, 'dataset', None) and os.path.isfile(args.dataset):
        args.dataset = os.path.abspath(args.dataset)
    config, study = train.config_and_study(args)
    if not STUDY_NAME_RE.match(study):
        raise ValueError(f"invalid study name {study!r}: use letters, digits, '.', '_' and '-' "
                         f"(designs: {', '.join(study_names())})")
    trials = base['trials'] if args.trials is None else args.trials
    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    for flag in ('workers', 'threads', 'trials_per_gpu'):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    activations = _pick_names(args.activations, base['activations'],
                              [a for a in ACTIVATION_NAMES if a != 'silu'],  # silu: an alias of swish
                              check_activation, 'activations')
    for m in args.models or []:
        if m != 'all':
            check_model(m)
    cells, root = [('', config)], ''
    if grid:  # every combination of the grid's values is a cell: its own study folder
        values = {k: list(dict.fromkeys(getattr(args, GRID_FLAGS[k]) or v)) for k, v in grid.items()}
        cells = []
        for combo in itertools.product(*values.values()):
            cfg = replace(config, **dict(zip(values, combo))).validate()  # a width of 0: a one-line error
            cells.append((base['cell'].format(**cfg.to_dict()), cfg))
        root = base['root'].format(**config.to_dict())

    # execution: slots of (device, threads)
    ray_flags = [f for f in ('ray_address', 'ray_num_cpus', 'ray_num_gpus') if getattr(args, f) is not None]
    if args.executor == 'ray':
        if importlib.util.find_spec('ray') is None:
            raise ValueError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}")
        if args.trials_per_gpu is not None:
            raise ValueError("--trials-per-gpu is for local workers; with Ray use --ray-num-gpus (e.g. 0.5)")
        ncpus = 1.0 if args.ray_num_cpus is None else args.ray_num_cpus
        ngpus = 0.0 if args.ray_num_gpus is None else args.ray_num_gpus
        if ncpus < 0 or ngpus < 0 or ncpus + ngpus == 0:
            raise ValueError("--ray-num-cpus and --ray-num-gpus must be >= 0, not both 0")
        # the device is the task's, on whichever node runs it: not checked against this machine
        if args.device not in ('auto', 'cpu', 'cuda'):
            raise ValueError(f"--device {args.device} with Ray: use auto, cpu or cuda (Ray picks the GPU)")
        if args.device == 'cuda' and ngpus == 0:
            raise ValueError("--device cuda with Ray needs --ray-num-gpus > 0 (GPUs per trial)")
        if args.device == 'cpu' and ngpus > 0:
            raise ValueError("--ray-num-gpus > 0 reserves GPUs that --device cpu would not use")
        threads = args.threads or max(1, int(ncpus))
        slots = [{'device': 'cuda' if ngpus > 0 else 'cpu', 'threads': threads}]
        workers = args.workers  # with Ray: at most this many trials in flight (default: all)
        execution = (f"Ray tasks ({ncpus:g} CPU, {ngpus:g} GPU, {threads} thread(s) per trial"
                     + (f", at most {workers} at once" if workers else '') + ')')
    else:
        if ray_flags:
            raise ValueError(f"{', '.join('--' + f.replace('_', '-') for f in ray_flags)} go with --executor ray")
        dev = train.resolve_device(args.device)
        if dev.type == 'cuda':
            devices = ([f'cuda:{i}' for i in range(torch.cuda.device_count())] if dev.index is None
                       else [str(dev)])
            per_gpu = args.trials_per_gpu or 1
            workers = args.workers or len(devices) * per_gpu
            if workers > len(devices) * per_gpu:
                raise ValueError(f"--workers {workers} would put more than --trials-per-gpu {per_gpu} on one of "
                                 f"the {len(devices)} device(s); raise --trials-per-gpu")
        else:
            if args.trials_per_gpu is not None:
                raise ValueError(f"--trials-per-gpu is for CUDA devices; this sweep runs on {dev}")
            devices, workers = ['cpu'], args.workers or (_cores() if base.get('tiny_trials') else 1)
        tiny = base.get('tiny_trials') and dev.type == 'cpu'
        threads = args.threads or (1 if tiny else max(1, _cores() // workers))
        slots = [{'device': devices[i % len(devices)], 'threads': threads} for i in range(workers)]
        execution = (f"{workers} worker process(es)" if workers > 1 else "in this process") + \
            f" on {', '.join(sorted(set(s['device'] for s in slots)))}, {threads} thread(s) per trial"
        if tiny and not (args.workers and args.threads):
            execution += (" (tiny trials: one thread each, one worker per core, so no trial's threads wait "
                          "on each other; --workers / --threads override)")

    # the data: fixes vocab_size etc., which are part of every trial's identity
    data_dir = os.path.abspath(resolve_data_dir(args.data_dir))
    tasks = [make_task(cfg, data_dir) for _, cfg in cells]
    fulls = [replace(cfg, **task.config_updates()) for (_, cfg), task in zip(cells, tasks)]
    task, full = tasks[0], fulls[0]
    kind_models = MODEL_NAMES if task.kind == 'lm' else CLASSIFIER_NAMES
    models = _pick_names(args.models, base['models'] if task.kind == 'lm' else CLASSIFIER_NAMES,
                         kind_models, check_model, 'models')
    for m in models:
        if model_kind(m) != task.kind:
            raise ValueError(f"model {m!r} trains on {model_kind(m)} data, but dataset {config.dataset!r} is a "
                             f"{task.kind} task; models for it: {', '.join(kind_models)}")
    for (name, _), cfg_full in zip(cells, fulls):
        for m in models:  # every pair must be buildable at this config: cheap on the meta device
            for a in activations:
                try:
                    with torch.device('meta'):
                        build_model(m, a, cfg_full, seed=0)
                except ValueError as e:
                    raise ValueError(f"{m}/{a} cannot be built with this config{' (cell ' + name + ')' if name else ''}: "
                                     f"{e}") from None
                except Exception:  # noqa: BLE001 -- a model the meta device can't build: the trial will tell
                    pass

    results_dir = os.path.abspath(args.results_dir)
    study_dir = os.path.join(results_dir, study, *([root] if root else []))
    to_run, to_run_configs, done, conflicts = [], [], [], []
    for (name, cfg), cell_task, cfg_full in zip(cells, tasks, fulls):
        job_study = '/'.join(p for p in (study, root, name) if p)  # a grid cell: its own study folder
        for m in models:
            for a in activations:
                for k in range(trials):
                    job = {'model': m, 'activation': a, 'trial': k, 'study': job_study, 'config': cfg}
                    path = train.trial_path(results_dir, job_study, m, a, k)
                    state = train.existing_trial(path, train.trial_identity(cell_task, m, a, k, args.vary, cfg_full))
                    if state == 'done' and not args.force:
                        done.append(job)
                    else:
                        to_run.append(job)
                        to_run_configs.append(cfg_full)
                        if state not in ('absent', 'done') and not args.force:
                            conflicts.append((path, state))
    if conflicts:
        path, state = conflicts[0]
        raise ValueError(f"{len(conflicts)} existing result(s) in {study_dir} belong to another config or seeds "
                         f"(first: {_show_path(path)} is {state}); use another --study or --results-dir, "
                         f"or --force to overwrite them")
    note = None
    if design is None and args.study:
        close = difflib.get_close_matches(args.study, study_names(), n=1, cutoff=0.8)
        if close:
            note = f"note: {args.study!r} is not a study design (did you mean {close[0]}?); running it as a plain study"
    common = {'results_dir': results_dir, 'vary': args.vary,
              'dtype': args.dtype, 'deterministic': args.deterministic, 'compile': args.compile,
              'data_dir': data_dir, 'save_checkpoints': args.save_checkpoints, 'force': args.force}
    return {'design': args.study if design else None, 'overrides': overrides, 'note': note, 'study': study,
            'study_dir': study_dir, 'results_dir': results_dir, 'config': full, 'preset': args.config,
            'models': models, 'activations': activations, 'trials': trials, 'to_run': to_run, 'done': done,
            'to_run_configs': to_run_configs, 'grid': values if grid else None, 'cells': [n for n, _ in cells if n],
            'common': common, 'slots': slots, 'workers': workers, 'threads': threads, 'execution': execution,
            'executor': args.executor, 'vary': args.vary}


def _name(job):
    cell = f" [{os.path.basename(job['study'])}]" if '/' in job['study'] else ''  # a grid design's cell
    return f"{job['model']}/{job['activation']} trial {job['trial']}{cell}"


def describe(plan):
    n = len(plan['to_run']) + len(plan['done'])
    what = (f"design {plan['design']}" if plan['design'] else f"study {plan['study']}") + f": preset {plan['preset']}"
    if plan['overrides']:
        what += f" (overrides: {', '.join(plan['overrides'])})"
    cells = f"{len(plan['cells'])} cell(s) x " if plan['grid'] else ''
    lines = [what,
             f"  {cells}{len(plan['models'])} model(s) x {len(plan['activations'])} activation(s) x {plan['trials']} "
             f"trial(s) = {n}: {len(plan['done'])} done, {len(plan['to_run'])} to run; vary {plan['vary']}"
             + ('; deterministic' if plan['common']['deterministic'] else ''),
             f"  models: {' '.join(plan['models'])}; activations: {' '.join(plan['activations'])}",
             *([f"  grid: {' x '.join(f'{k} ' + ' '.join(f'{v:g}' for v in vs) for k, vs in plan['grid'].items())} "
                f"(one study folder per cell)"] if plan['grid'] else []),
             f"  {plan['execution']}; results in {plan['study_dir']}"]
    if plan['note']:
        lines.insert(0, plan['note'])
    return '\n'.join(lines)


def dry_run(plan):
    print(describe(plan))
    per, source = estimate(plan)
    width = max([len(_name(j)) for j in plan['to_run'] + plan['done']] + [10])
    for job, s in zip(plan['to_run'], per):
        print(f"  to run  {_name(job):{width}s}  " + (f"~{_fmt_seconds(s)}" if s is not None else 'no estimate'))
    for job in plan['done']:
        print(f"  done    {_name(job):{width}s}  " +
              _show_path(train.trial_path(plan['results_dir'], job['study'], job['model'],
                                               job['activation'], job['trial'])))
    known = [s for s in per if s is not None]
    if not plan['to_run']:
        print("nothing to run: every trial is done (--force reruns them)")
    elif known:
        total = sum(known)
        line = f"estimated time (an estimate of time only, not of any result): ~{_fmt_seconds(total)} of trial time"
        if len(known) < len(per):  # a partial sum must not read as the whole sweep's time
            line += (f" for the {len(known)} of {len(per)} trials to run that have a figure "
                     f"({len(per) - len(known)} more without one)")
        if plan['workers'] and plan['workers'] > 1:
            line += (f", roughly {_fmt_seconds(total / plan['workers'])} wall time with {plan['workers']} "
                     f"workers if parallel trials do not slow each other down")
        print(line)
        print(f"  from: {source}")
    else:
        print(f"estimated time: {source}")
    return 0


def run_sweep(plan, executor_factory):
    """Run the plan's trials; returns (finished, failed, interrupted)."""
    from tqdm import tqdm
    to_run, done = plan['to_run'], plan['done']
    total = len(to_run) + len(done)
    finished, failed, interrupted = [], [], False
    executor = None
    # disable=None: a live bar on a terminal, silence in logs and CI
    bar = tqdm(total=total, initial=len(done), unit='trial', desc=plan['study'], dynamic_ncols=True, disable=None)
    try:
        executor = executor_factory() if to_run else None
        for job, out in (executor.run(to_run) if executor else ()):
            count = f"[{len(done) + len(finished) + len(failed) + 1}/{total}]"
            if out['ok']:
                finished.append(job)
                bar.write(f"{count} {_name(job)}: val loss {out['val_loss']:.4f}  accuracy "
                          f"{out['val_accuracy']:.4f}  {out['seconds']:.1f} s", file=sys.stdout)
            else:
                failed.append(job)
                append_failure(os.path.join(plan['results_dir'], job['study'], 'failures.jsonl'), {
                    **job, 'config': job['config'].to_dict(), 'error': out['error'], 'traceback': out['traceback'],
                    'time': datetime.datetime.now().astimezone().isoformat(), 'seconds': out['seconds'],
                    'host': out.get('host'), 'executor': plan['executor']})
                bar.write(f"{count} FAILED {_name(job)}: {out['error']}", file=sys.stdout)
                bar.set_postfix(failed=len(failed), refresh=False)
            bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        if executor is not None:
            try:
                executor.close(abort=interrupted)
            except KeyboardInterrupt:  # a second Ctrl-C: do not wait for anything
                interrupted = True
    return finished, failed, interrupted


def make_executor(plan, args):
    if plan['executor'] == 'ray':
        s = plan['slots'][0]
        return lambda: RayExecutor(plan['common'], s, args.ray_address,
                                   1.0 if args.ray_num_cpus is None else args.ray_num_cpus,
                                   0.0 if args.ray_num_gpus is None else args.ray_num_gpus,
                                   plan['workers'] or max(1, len(plan['to_run'])))
    if len(plan['slots']) == 1:
        return lambda: InlineExecutor(plan['common'], plan['slots'][0])
    return lambda: PoolExecutor(plan['common'], plan['slots'][:max(1, len(plan['to_run']))])


def analyze_study(plan, args):
    try:
        import analyze_results
    except ImportError as e:
        print(f"error: cannot run the analysis ({e}); the trials are saved: rerun with --no-analyze, or "
              f"analyse later with analyze_results.py --results-dir {plan['study_dir']}", file=sys.stderr)
        return False
    kwargs = {'plots_dir': args.plots_dir}
    if args.baseline:
        kwargs['baseline'] = args.baseline
    try:
        analyze_results.analyze(plan['study_dir'], **kwargs)
    except ValueError as e:  # AnalysisError is a ValueError
        print(f"error: analysis of {plan['study_dir']} failed: {e}", file=sys.stderr)
        return False
    d = plan['study_dir']
    print(f"analysis: summary {os.path.join(d, 'summary.json')}, report {os.path.join(d, 'REPORT.md')}, "
          f"plots in {args.plots_dir or os.path.join(d, 'plots')}")
    return True


def _main(argv):
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        plan = make_plan(args)
    except (ValueError, DataError) as e:
        parser.exit(2, f"error: {' '.join(str(e).split())}\n")
    if args.dry_run:
        return dry_run(plan)

    try:
        lock = StudyLock(plan['study_dir'])
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    try:
        print(describe(plan), flush=True)
        strays = stray_temp_files(plan['study_dir'])
        for path in strays:  # we hold the lock: no sweep of ours is writing them
            os.remove(path)
        if strays:
            print(f"removed {len(strays)} temp file(s) left by an interrupted run")
        t0 = time.time()
        finished, failed, interrupted = run_sweep(plan, make_executor(plan, args))
        wall = time.time() - t0
    finally:
        lock.release()

    if interrupted:
        left = len(plan['to_run']) - len(finished) - len(failed)
        print(f"interrupted: {len(finished)} trial(s) finished in this run"
              + (f" ({', '.join(map(_name, finished))})" if finished else '')
              + f", {len(failed)} failed, {left} not finished (running ones were stopped and left no result); "
              f"{len(plan['done']) + len(finished)} of {len(plan['done']) + len(plan['to_run'])} done in "
              f"{plan['study_dir']}. Run the same command again to resume.", file=sys.stderr)
        return 130
    print(f"{len(finished)} trial(s) trained, {len(plan['done'])} already done, {len(failed)} failed "
          f"in {_fmt_seconds(wall)}")
    ok = True
    if not args.no_analyze:
        ok = analyze_study(plan, args)
    if failed:
        logs = sorted({os.path.join(plan['results_dir'], j['study'], 'failures.jsonl') for j in failed})
        where = logs[0] if len(logs) == 1 else f"the failures.jsonl of {len(logs)} cells under {plan['study_dir']}"
        print(f"error: {len(failed)} trial(s) failed: {', '.join(map(_name, failed))}; errors and tracebacks in "
              f"{where}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def main(argv=None):
    """The command line; returns the exit code (0 ok, 1 failed trials or analysis, 2 invalid
    input, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


if __name__ == '__main__':
    import run_all_experiments  # one module object: workers and Ray tasks import it by this name
    sys.exit(run_all_experiments.main())
