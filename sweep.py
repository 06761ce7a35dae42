"""
The sweep engine: run a plan's jobs (plan.Job) through train.run_trial, in this process, in
spawned worker processes or as Ray tasks, and record each failure in the store. plan.py
decides what runs and where; run_all_experiments.py holds the lock and the command line.

run_job(job, opts) is train.run_trial(job.model, job.activation, job.trial, job.config,
job.study, opts). The plan holds one RunOptions per worker slot (its device and threads).
Executors share one interface: run(jobs, started) calls started(job) as each trial starts
and yields (job, outcome) as trials finish, and
close(abort) stops them (abort: running trials are stopped and leave no result but their
last checkpoint). An outcome is {'ok': True, 'val_loss', 'val_accuracy', 'seconds',
'resumed_from'} or {'ok': False, 'error', 'traceback', 'seconds', 'host'}.
"""
import datetime
import multiprocessing
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import replace
from multiprocessing.connection import wait

import torch
from tqdm import tqdm

import store
import train
from cli import fmt_seconds
from device import cublas_workspace
from fileio import DATA_DIR_ENV, PROJECT_DIR


# ----------------------------------------------------------------------------- one trial (any process)

def run_job(job, opts):
    """Run one trial through train.run_trial; return a small picklable outcome, never raise
    an Exception (KeyboardInterrupt and SystemExit pass: they stop the sweep)."""
    t0 = time.time()
    try:
        if job.vary:  # a repeat: the same seeds as trial 0
            opts = replace(opts, vary=job.vary)
        r = train.run_trial(job.model, job.activation, job.trial, job.config, job.study, opts)
        m = r['metrics']
        return {'ok': True, 'val_loss': m['val_loss'], 'val_accuracy': m['val_accuracy'],
                'seconds': m['total_time'], 'resumed_from': r.get('resumed_from') or []}
    except Exception as e:  # noqa: BLE001 -- a trial's failure of any kind is recorded, not fatal
        tb = traceback.format_exc()
        if opts.device.startswith('cuda'):
            torch.cuda.empty_cache()  # after an out-of-memory error, give the next trial a clean slate
        return {'ok': False, 'error': f"{type(e).__name__}: {e}", 'traceback': tb,
                'seconds': time.time() - t0, 'host': socket.gethostname()}


# ----------------------------------------------------------------------------- executors

class InlineExecutor:
    """--workers 1 on one device: trials run one after another in this process."""

    def __init__(self, opts):
        self.opts = opts
        self._threads = torch.get_num_threads()

    def run(self, jobs, started=lambda job: None):
        for job in jobs:
            started(job)
            yield job, run_job(job, self.opts)

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


def _worker_main(conn, opts, parent_pid):
    # Ctrl-C in a terminal reaches every process of the group: the driver alone decides
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _die_with_parent(parent_pid)
    cublas_workspace(opts.deterministic)  # before this process's first CUDA work
    if opts.device.startswith('cuda'):
        torch.cuda.set_device(opts.device)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        conn.send(run_job(job, opts))


class PoolExecutor:
    """N spawned worker processes, one slot (RunOptions: device, threads) each; the driver
    hands each worker one trial at a time over its own pipe, so it always knows which trial
    a worker holds: a worker that dies (killed, out of host memory) fails that trial and is
    replaced."""

    def __init__(self, slots):
        self.ctx = multiprocessing.get_context('spawn')  # no fork: torch threads and CUDA don't survive it
        self.slots = slots
        self.workers = [self._start(i) for i in range(len(slots))]

    def _start(self, i):
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=_worker_main, args=(child, self.slots[i], os.getpid()),
                             daemon=True, name=f'sweep-worker-{i}')
        p.start()
        child.close()
        return {'i': i, 'proc': p, 'conn': parent, 'job': None}

    def _replace(self, w):
        w['conn'].close()
        w['proc'].join(5)
        self.workers[w['i']] = self._start(w['i'])

    def run(self, jobs, started=lambda job: None):
        pending = deque(jobs)
        while pending or any(w['job'] for w in self.workers):
            for w in self.workers:
                if w['job'] is None and pending:
                    w['job'] = pending.popleft()
                    try:
                        w['conn'].send(w['job'])
                        started(w['job'])
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

    def __init__(self, opts, address, num_cpus, num_gpus, max_in_flight):
        import ray  # optional: imported only for this executor
        self.ray, self.opts = ray, opts
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
                                 runtime_env={'env_vars': env})(run_job)
        self.max_in_flight = max_in_flight
        self.in_flight = {}

    def run(self, jobs, started=lambda job: None):
        ray, pending, in_flight = self.ray, deque(jobs), self.in_flight
        opts = ray.put(self.opts)
        while pending or in_flight:
            while pending and len(in_flight) < self.max_in_flight:
                job = pending.popleft()
                in_flight[self.remote.remote(job, opts)] = job
                started(job)
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


# ----------------------------------------------------------------------------- the sweep

def projection(plan, seconds, left):
    """The projected time of the rest of a sweep, from its first finished trial."""
    at_once = min(left, len(plan.slots) if plan.executor == 'local' else plan.workers or left)
    return (f"projected: ~{fmt_seconds(left * seconds / at_once)} more for the {left} trial(s) left "
            f"({seconds:.1f} s for this one, {at_once} at once; an estimate of time only)")


def record_failure(plan, job, out):
    """A failed trial into the failures.jsonl of its job's study folder (a grid design's cell)."""
    store.append_failure(job.key(plan.results_dir).study_dir, {
        'model': job.model, 'activation': job.activation, 'trial': job.trial, 'study': job.study,
        'config': job.config.to_dict(), 'error': out['error'], 'traceback': out['traceback'],
        'time': datetime.datetime.now().astimezone().isoformat(), 'seconds': out['seconds'],
        'host': out.get('host'), 'executor': plan.executor})


def run_sweep(plan, executor_factory):
    """Run plan.to_run (plan.done counts toward the progress) through the executor that
    executor_factory() makes; a failure goes to its study folder's failures.jsonl. Returns
    (finished, failed, interrupted); after an interrupt, finished also holds the trials whose
    JSON was written in this run."""
    t_start = time.time()
    to_run, done = plan.to_run, plan.done
    total = len(to_run) + len(done)
    finished, failed, interrupted = [], [], False
    executor = None
    # disable=None: a live bar on a terminal, silence in logs and CI
    bar = tqdm(total=total, initial=len(done), unit='trial', desc=plan.study, dynamic_ncols=True, disable=None)
    try:
        executor = executor_factory() if to_run else None
        # a line as each trial starts: a log shows progress long before the first one finishes
        def started(job):
            st = job.state
            bar.write(f"start {job.name}" + (f" (resumes at iteration {st.resume_at})" if st.resume_at else ''),
                      file=sys.stdout)
        for job, out in (executor.run(to_run, started) if executor else ()):
            count = f"[{len(done) + len(finished) + len(failed) + 1}/{total}]"
            if out['ok']:
                finished.append(job)
                resumed = out.get('resumed_from')
                bar.write(f"{count} {job.name}: val loss {out['val_loss']:.4f}  accuracy "
                          f"{out['val_accuracy']:.4f}  {out['seconds']:.1f} s"
                          + (f"  (resumed from iteration {', '.join(map(str, resumed))})" if resumed else ''),
                          file=sys.stdout)
                if len(finished) == 1 and len(to_run) > 1 + len(failed):
                    bar.write(projection(plan, out['seconds'], len(to_run) - 1 - len(failed)), file=sys.stdout)
            else:
                failed.append(job)
                record_failure(plan, job, out)
                bar.write(f"{count} FAILED {job.name}: {out['error']}", file=sys.stdout)
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
    if interrupted:  # a trial that wrote its JSON just before the stop, but never reported back
        finished += [j for j in to_run if j not in finished + failed and written_since(j, plan.results_dir, t_start)]
    return finished, failed, interrupted


def written_since(job, results_dir, since):
    """Whether the job's result JSON was written after `since` (a time.time())."""
    try:
        return os.path.getmtime(job.key(results_dir).json) >= since
    except OSError:
        return False


def make_executor(plan):
    """A factory of the executor for plan.executor ('ray' or 'local') and plan.slots
    (RunOptions per worker; with Ray, one for every task and plan.ray = {'address',
    'num_cpus', 'num_gpus'} per trial, at most plan.workers trials in flight)."""
    if plan.executor == 'ray':
        r = plan.ray
        return lambda: RayExecutor(plan.slots[0], r['address'], r['num_cpus'], r['num_gpus'],
                                   plan.workers or max(1, len(plan.to_run)))
    if len(plan.slots) == 1:
        return lambda: InlineExecutor(plan.slots[0])
    return lambda: PoolExecutor(list(plan.slots[:max(1, len(plan.to_run))]))
