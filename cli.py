"""
What the command lines (train.py, run_all_experiments.py, analyze_results.py,
model_factories.py) share: the run flags and RunOptions built from them, one exit-code
convention mapped from exceptions in one place, one-line messages for operating-system
errors, a check that a results folder can be written before anything runs, progress lines
for logs, and a Ctrl-C that stops promptly. No torch: the analysis side imports it too.
"""
import argparse
import os
import signal
import sys
import textwrap
import threading
import time
from dataclasses import replace

from config import DTYPES, SNAPSHOT_MODES, RunOptions, add_config_args
from fileio import DataError
from store import VARY_MODES

# The exit status of every script (documented in each --help).
EXIT_OK = 0
EXIT_FAILURE = 1     # a failure while running: a trial, the analysis, a file that cannot be written
EXIT_USAGE = 2       # a bad flag, name or value, or a conflict with saved results; nothing was run
EXIT_INTERRUPT = 130  # Ctrl-C (128 + SIGINT, what shells report)

RAY_INSTALL = 'pip install "ray[default]"'  # Ray is optional (--executor ray)

EXIT_HELP = ("exit status: 0 done; 1 a failure while running (a trial or the analysis failed, or a file "
             "or folder could not be read or written: the message names the path); 2 a usage error "
             "(a bad flag, name or value, or a conflict with saved results), found before anything "
             "runs; 130 interrupted (Ctrl-C).")


def exit_code(e):
    """The exit status for an exception that ends a command (the one ladder, for every main):
    usage errors (bad names, values, files, conflicts with saved results) 2, interrupts 130,
    anything else 1."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPT
    if isinstance(e, (ValueError, DataError, FileExistsError)):
        return EXIT_USAGE
    return EXIT_FAILURE


def error_line(e):
    """The one line an exception that ends a command prints."""
    text = os_error_message(e) if isinstance(e, OSError) and not isinstance(e, FileExistsError) else str(e)
    return f"error: {' '.join(text.split())}"


def exit_help(width=88):
    """EXIT_HELP wrapped for a RawDescriptionHelpFormatter epilog."""
    return textwrap.fill(EXIT_HELP, width, subsequent_indent='  ')


def fmt_seconds(s):
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def fmt_bytes(n):
    for unit, size in (('TB', 2 ** 40), ('GB', 2 ** 30), ('MB', 2 ** 20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2 ** 10:.0f} kB"


# ----------------------------------------------------------------------------- OS errors

def os_error_message(e):
    """One line for an OSError: the path and what the system said (Not a directory,
    Permission denied, Read-only file system, No space left on device, ...)."""
    if e.filename is None or e.strerror is None:
        return str(e)
    return f"{e.filename}: {e.strerror}" + (f" (-> {e.filename2})" if e.filename2 else '')


def check_writable(folder, what='results folder', need_bytes=0):
    """Raise OSError with a one-line message if `folder` cannot be created and written, or
    its file system has less than `need_bytes` free. Creates nothing: it looks at the
    nearest part of the path that exists."""
    folder = os.path.abspath(folder)
    p = folder
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise OSError(f"cannot create the {what} {folder}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        why = 'read-only file system' if _read_only(p) else 'permission denied'
        raise OSError(f"cannot write the {what} {folder}: {p} is not writable ({why})")
    if need_bytes:
        st = os.statvfs(p)
        free = st.f_bavail * st.f_frsize
        if free < need_bytes:
            raise OSError(f"cannot write the {what} {folder}: {fmt_bytes(free)} free on its disk, "
                          f"about {fmt_bytes(need_bytes)} needed")


def _read_only(path):
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


# ----------------------------------------------------------------------------- progress in logs

class ProgressLog:
    """Progress lines for a trial whose output is not a terminal (a log file, CI, a cluster
    job), where a live progress bar prints nothing: after the first few steps, the projected
    time of the trial (if it is 30 s or more), then a line at least every `every` seconds
    (trial, iteration, loss, time left) for as long as a step takes less than that.
    Time per step and per evaluation are measured separately: the first evaluation would
    otherwise weigh on the first steps' rate. A trial resumed from a checkpoint at iteration
    `start`, with `start_eval_time` seconds of evaluation behind it, measures its steps from there."""

    def __init__(self, name, total, evals_total, every=30.0, warmup=5, enabled=None, stream=None,
                 start=0, start_eval_time=0.0):
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = not (hasattr(self.stream, 'isatty') and self.stream.isatty())
        self.name, self.total, self.evals_total = name, total, evals_total
        self.every, self.warmup, self.enabled = every, warmup, enabled
        self.start, self.start_eval_time = start, start_eval_time
        self.t0 = self.last = time.time()
        self.projected = False

    def step_time(self, it, eval_time):
        """Seconds per training step in this run, evaluations excluded."""
        return max(0.0, time.time() - self.t0 - (eval_time - self.start_eval_time)) / max(1, it - self.start)

    def left(self, it, eval_time, evals_done):
        """Seconds left: steps at the measured time per step, evaluations at the measured
        time per evaluation."""
        per_eval = eval_time / evals_done if evals_done else 0.0
        return self.step_time(it, eval_time) * (self.total - it) + per_eval * max(0, self.evals_total - evals_done)

    def update(self, it, loss, eval_time, evals_done):
        if not self.enabled or it == self.start:
            return
        now = time.time()
        if not self.projected and it - self.start >= min(self.warmup, self.total - self.start):
            self.projected = True
            left = self.left(it, eval_time, evals_done)
            if now - self.t0 + left >= self.every:
                self._say((f"resumed at iteration {self.start}: projected time of the rest " if self.start else
                           "projected trial time ") + f"~{fmt_seconds(now - self.t0 + left)} "
                          f"({self.step_time(it, eval_time) * 1000:.0f} ms per step, "
                          f"{self.total} steps, {self.evals_total} evaluations)")
        elif now - self.last >= self.every:
            self._say(f"iteration {it}/{self.total}, loss {loss:.4f}, "
                      f"~{fmt_seconds(self.left(it, eval_time, evals_done))} left")

    def _say(self, text):
        self.last = time.time()
        print(f"{self.name}: {text}", file=self.stream, flush=True)


# ----------------------------------------------------------------------------- Ctrl-C

_interrupt = {'installed': False, 'seen': threading.Event()}


def stop_promptly_on_ctrl_c(grace=5.0):
    """Ctrl-C raises KeyboardInterrupt only when the main thread is back in Python: one long
    torch operation (a step of a model too big for the machine) can hold it off for many
    seconds. Here the main thread's SIGINT handler marks that it got the interrupt, and a
    watcher thread, woken by the signal itself (signal.set_wakeup_fd), exits the process
    with 130 if the main thread has not got it within `grace` seconds. A main thread that
    has it (and is stopping its trials, saying what finished) is left to finish.
    For a script's __main__ only: it sets process-wide signal state."""
    if _interrupt['installed'] or threading.current_thread() is not threading.main_thread():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    seen = _interrupt['seen']

    def on_sigint(signum, frame):
        seen.set()
        raise KeyboardInterrupt

    def watch():
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if signal.SIGINT not in data:
                continue
            if not seen.wait(grace):
                os.write(2, b"interrupted: the running step did not stop within "
                            + f"{grace:g} s; exiting now (the running trial left no result)\n".encode())
                os._exit(EXIT_INTERRUPT)
            seen.clear()  # a second Ctrl-C gets the same treatment

    signal.signal(signal.SIGINT, on_sigint)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=watch, daemon=True, name='ctrl-c-watch').start()
    _interrupt['installed'] = True


# ----------------------------------------------------------------------------- run flags

def add_run_args(parser, study_help="results sub-folder (default: the preset's name, plus the overrides if any)"):
    """Flags of train.py and run_all_experiments.py that are not hyper-parameters, then one
    flag per Config field (config.add_config_args)."""
    parser.add_argument('--results-dir', default='results')
    parser.add_argument('--study', default=None, help=study_help)
    parser.add_argument('--vary', default='all', choices=VARY_MODES,
                        help='which randomness changes across trials (default: all)')
    parser.add_argument('--deterministic', action='store_true', help="PyTorch's deterministic algorithms")
    parser.add_argument('--device', default='auto', help='auto | cpu | cuda | cuda:N')
    parser.add_argument('--dtype', default='auto', choices=DTYPES,
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
    parser.add_argument('--snapshots', default='auto', choices=SNAPSHOT_MODES,
                        help='save the predictions at every evaluation point too (auto: while they take at '
                             'most 64 MiB per trial)')
    add_config_args(parser)


def run_options(args, **changes):
    """RunOptions from the flags of add_run_args plus --threads (both command lines have it)."""
    return replace(RunOptions(results_dir=args.results_dir, vary=args.vary, device=args.device, dtype=args.dtype,
                              deterministic=args.deterministic, compile=args.compile, data_dir=args.data_dir,
                              save_checkpoints=args.save_checkpoints, force=args.force,
                              threads=args.threads, checkpoint_every=args.checkpoint_every,
                              snapshots=args.snapshots), **changes)


# ----------------------------------------------------------------------------- analysis flags

def _fraction(text):
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) such as 0.25, got {text!r}")
    return v


def _snapshot_pair(text):
    """'500,5000' -> (500, 5000)."""
    try:
        early, late = (int(x) for x in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two iterations as EARLY,LATE (e.g. 250,2000), got {text!r}")
    if not 0 <= early < late:
        raise argparse.ArgumentTypeError(f"expected EARLY < LATE, got {text!r}")
    return early, late


def add_analysis_args(parser):
    """The analysis's own flags (analyze_results.py and run_all_experiments.py)."""
    parser.add_argument('--equivalence-margin', type=_fraction, default=None, metavar='F',
                        help="equivalence test: 'equally reproducible' within ±F of the baseline's mean relative PD "
                             "(default: stat_settings.EQUIVALENCE_MARGIN, 0.25; docs/analysis.md says why)")
    parser.add_argument('--compare-snapshots', type=_snapshot_pair, default=None,
                        metavar='EARLY,LATE', help='the two snapshot iterations whose relative PD is compared '
                                                   '(default: the first after 0 and the last)')
