"""Shared test fixtures: the project root on sys.path, a tiny corpus, tiny configs, MNIST-1D
and tiny MNIST data folders; `procs`, for the processes a test starts (see below)."""
import atexit
import gzip
import hashlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import traceback

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# a small text the tests own: ~12 kB, 30-odd distinct characters
TINY_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
             "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 60

TINY_OVERRIDES = dict(n_layer=1, n_embd=16, n_head=2, block_size=16, batch_size=4, max_iters=6,
                      eval_interval=3, eval_iters=2, n_eval=24, dropout=0.1)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    """The tiny corpus once per test module, for module-scoped studies."""
    path = tmp_path_factory.mktemp('corpus') / 'tiny.txt'
    path.write_text(TINY_TEXT, encoding='utf-8')
    return str(path)


@pytest.fixture
def tiny_corpus(tmp_path):
    path = tmp_path / 'tiny.txt'
    path.write_text(TINY_TEXT, encoding='utf-8')
    return str(path)


@pytest.fixture
def tiny_config(tiny_corpus):
    from config import get_config
    return get_config('cpu', dataset=tiny_corpus, **TINY_OVERRIDES)


@pytest.fixture(scope='session')
def mnist1d_dir(tmp_path_factory):
    """A data folder whose MNIST-1D cache is made once for the whole session (~1.5 s)."""
    import mnist
    d = str(tmp_path_factory.mktemp('data'))
    mnist.load_mnist1d(d)
    return d


def idx_bytes(array, code=0x08):
    """The bytes of an IDX file holding `array` (type code 0x08: unsigned bytes)."""
    import mnist
    a = np.asarray(array)
    header = bytes([0, 0, code, a.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in a.shape)
    return header + a.astype(np.dtype(mnist.IDX_DTYPES[code])).tobytes()


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch):
    """Four tiny MNIST-format files with their md5s patched in: the real loading path, offline."""
    import mnist
    rng = np.random.default_rng(0)
    folder = tmp_path / 'mnist'
    folder.mkdir()
    files = {}
    for key, n in (('train', 60), ('test', 20)):
        y = rng.integers(10, size=n).astype(np.uint8)
        x = (rng.random((n, 28, 28)) * 40 + y[:, None, None] * 20).astype(np.uint8)  # learnable
        for kind, arr in (('images', x), ('labels', y)):
            fname, _, _ = mnist.MNIST_FILES[f'{key}_{kind}']
            data = gzip.compress(idx_bytes(arr))
            (folder / fname).write_bytes(data)
            files[f'{key}_{kind}'] = (fname, hashlib.md5(data).hexdigest(), arr.shape)
    monkeypatch.setattr(mnist, 'MNIST_FILES', files)
    monkeypatch.setitem(mnist.VAL_SIZE, 'mnist', 20)
    mnist._splits.cache_clear()
    yield str(tmp_path)
    mnist._splits.cache_clear()


def trial_path(results_dir, study, model, activation, trial, ext='json'):
    """A trial's file, as the store names it (store.TrialKey)."""
    import store
    return store.TrialKey(str(results_dir), study, model, activation, trial).path(ext)


# ----------------------------------------------------------------------------- processes a test starts
# A test waits on events (a file appearing, a line on a pipe, a process ending), never on the
# clock: a busy machine makes it slower, not wrong. The limits below only turn a hang into a
# failure. Each is ~100x what it takes on a machine at load 4 on 2 cores (a new Python process
# importing torch and the project: ~5 s; a tiny trial of up to 300 steps: ~1 s, measured), and
# a test's limit adds them up over what it starts.
START_LIMIT = 600.0  # seconds: a new process, to its first trial
TRIAL_LIMIT = 120.0  # seconds: one tiny trial


def limit(trials=0, processes=1):
    """A hang backstop in seconds for `processes` new processes that train `trials` tiny trials."""
    return processes * START_LIMIT + trials * TRIAL_LIMIT


_open_groups = {}  # pgid -> its record (Processes): groups started by tests, not yet seen gone


def _stat(pid):
    """The fields of /proc/<pid>/stat after the command name: [0] state, [1] ppid, [2] pgrp,
    [11] utime, [12] stime (clock ticks); None once the process is gone (Linux)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(')') + 2:].split()


def _live():
    """(pid, stat fields) of every live process: a zombie is dead (it waits for its parent,
    or init, to reap it) and is not listed. None without /proc."""
    for name in os.listdir('/proc') if os.path.isdir('/proc/self') else ():
        fields = _stat(name) if name.isdigit() else None
        if fields and fields[0] not in 'ZX':
            yield int(name), fields


def live_members(pgid):
    """Pids of the live processes of group `pgid`. Linux reads /proc; elsewhere the kernel's
    answer (zombies included)."""
    if not os.path.isdir('/proc/self'):
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except ProcessLookupError:
            return []
    return [pid for pid, fields in _live() if int(fields[2]) == pgid]


def descendants(pid=None):
    """Pids of the live descendants of process `pid` (default: this one), Linux."""
    children = {}
    for child, fields in _live():
        children.setdefault(int(fields[1]), []).append(child)
    found, todo = set(), [pid or os.getpid()]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def wait_for(condition, limit, what, proc=None, poll=0.05):
    """Wait until condition() holds. Fails if `proc` (a Popen) ends first, or after `limit`
    seconds: a backstop against a hang, not an expectation of speed."""
    end = time.monotonic() + limit
    while not condition():
        if proc is not None and proc.poll() is not None and not condition():
            pytest.fail(f"{what}: the process ended first (exit {proc.returncode})")
        if time.monotonic() > end:
            pytest.fail(f"{what}: not so after {limit:.0f} s (a hang backstop)")
        time.sleep(poll)


def wait_gone(pgid, limit=START_LIMIT):
    """True once process group `pgid` has no live process; False after `limit` seconds."""
    end = time.monotonic() + limit
    while live_members(pgid):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def cpu_seconds(pid):
    """CPU time (user + system) that process `pid` has used so far (Linux); NaN once reaped."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK') if fields else float('nan')


MARK = 'REPRO_TEST_PROCESS'  # in the environment of each process a test starts: its tag
_tags = itertools.count()


def marked(tag):
    """{pid: pgid} of the live processes whose environment carries MARK=tag: a command and its
    descendants, those too that left its group for a session of their own (Linux)."""
    entry, found = f'{MARK}={tag}'.encode(), {}
    for pid, fields in _live():
        try:
            with open(f'/proc/{pid}/environ', 'rb') as f:
                if entry in f.read().split(b'\0'):
                    found[pid] = int(fields[2])
        except OSError:  # ended meanwhile, or not ours
            pass
    return found


def _kill_group(pgid, tag=None):
    """SIGKILL group `pgid` (None: none), and the groups of the processes that carry `tag`."""
    groups = {pgid} - {None} | set(marked(tag).values() if tag is not None else ())
    for g in groups - {os.getpgrp()}:
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Processes:
    """The processes of one test. Each command (or forked function) runs in a process group
    of its own, so that it and everything it starts end together: at the end of the test,
    however it ends (pass, failure, KeyboardInterrupt), every group is killed with SIGKILL, its
    leader reaped and the group seen gone. A watchdog kills a group that outlives its `limit`
    (a hang); the test then fails, saying so."""

    def __init__(self):
        self.groups = {}  # pgid -> {'proc': its Popen (None: forked), 'timer', 'hung', ...}

    def _watch(self, pgid, tag, what, limit, proc):
        g = {'proc': proc, 'tag': tag, 'what': what, 'limit': limit, 'hung': False, 'reported': False,
             'reaped': False}

        def hung():
            g['hung'] = True
            _kill_group(pgid, tag)
        g['timer'] = threading.Timer(limit, hung)
        g['timer'].daemon = True
        g['timer'].start()
        self.groups[pgid] = _open_groups[pgid] = g

    def _gone(self, pgid):
        return not live_members(pgid) and not marked(self.groups[pgid]['tag'])

    def _check(self, pgid):
        g = self.groups[pgid]
        if g['hung']:
            g['reported'] = True
            pytest.fail(f"{g['what']}: still running after {g['limit']:.0f} s (a hang backstop): killed")

    def start(self, argv, limit, **popen_kw):
        """subprocess.Popen(argv) in a new session (its own process group), from the project
        root, with this test's mark in its environment."""
        popen_kw.setdefault('cwd', ROOT)
        tag = f'{os.getpid()}.{next(_tags)}'
        popen_kw['env'] = {**(popen_kw.get('env') or os.environ), MARK: tag}
        p = subprocess.Popen(argv, start_new_session=True, **popen_kw)
        self._watch(p.pid, tag, ' '.join(map(str, argv))[:200], limit, p)
        return p

    def communicate(self, p, input=None):
        """p.communicate(), bounded by p's watchdog: (stdout, stderr)."""
        out = p.communicate(input)
        self._check(p.pid)
        return out

    def run(self, argv, limit, **popen_kw):
        """Like subprocess.run(argv, capture_output=True, text=True), in a group of its own."""
        p = self.start(argv, limit, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kw)
        out, err = self.communicate(p)
        return subprocess.CompletedProcess(argv, p.returncode, out, err)

    def fork(self, fn, limit):
        """Run fn() in a forked child in a group of its own; the child never returns into
        pytest (exit 0 after fn, 1 on an exception). Its status: wait(pid)."""
        tag = f'{os.getpid()}.{next(_tags)}'
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setpgid(0, 0)
                os.environ[MARK] = tag  # for the processes it starts
                fn()
                code = 0
            except Exception:  # said; the exit code tells
                traceback.print_exc()
            finally:
                os._exit(code)
        try:
            os.setpgid(pid, pid)  # as the child does: whichever runs first
        except (PermissionError, ProcessLookupError):
            pass
        self._watch(pid, tag, f"forked {getattr(fn, '__name__', fn)}", limit, None)
        return pid

    def wait(self, pid):
        """A forked child's exit status (os.waitpid's), once it has ended."""
        _, status = os.waitpid(pid, 0)
        self.groups[pid]['reaped'] = True
        self._check(pid)
        return status

    def end(self, pgid):
        """Kill group `pgid` and every process with its mark (SIGKILL), while its leader is
        unreaped (its number cannot be reused); reap the leader; wait until all are gone."""
        g = self.groups[pgid]
        g['timer'].cancel()
        _kill_group(pgid, g['tag'])
        if g['proc'] is not None:
            g['proc'].kill()  # a leader that left its group
            g['proc'].wait()
            for f in (g['proc'].stdin, g['proc'].stdout, g['proc'].stderr):
                if f is not None:
                    f.close()
        elif not g['reaped']:
            os.waitpid(pgid, 0)
            g['reaped'] = True
        end = time.monotonic() + START_LIMIT
        while not self._gone(pgid) and time.monotonic() < end:
            _kill_group(pgid if live_members(pgid) else None, g['tag'])  # one started meanwhile
            time.sleep(0.05)
        if self._gone(pgid):
            _open_groups.pop(pgid, None)
            return True
        return False

    def end_all(self):
        stuck = [self.groups[pgid]['what'] for pgid in list(self.groups) if not self.end(pgid)]
        assert not stuck, f"process groups not gone {START_LIMIT:.0f} s after SIGKILL: {stuck}"
        hung = [g['what'] for g in self.groups.values() if g['hung'] and not g['reported']]
        assert not hung, f"killed by their hang backstop: {hung}"


@pytest.fixture
def procs():
    """Start processes through this (start / run / fork); all of them end with the test."""
    p = Processes()
    try:
        yield p
    finally:
        p.end_all()


@pytest.fixture(scope='session', autouse=True)
def no_process_left_behind():
    """SIGTERM (a CI job's time limit) stops pytest as Ctrl-C does, with every test's
    teardown; at the end of the session, every process group a test started is gone."""
    def terminated(signum, frame):
        raise KeyboardInterrupt(f"pytest got signal {signum}")
    previous = signal.signal(signal.SIGTERM, terminated)
    yield
    signal.signal(signal.SIGTERM, previous)
    left = {pgid: (g['what'], live_members(pgid), marked(g['tag'])) for pgid, g in _open_groups.items()
            if live_members(pgid) or marked(g['tag'])}
    for pgid, g in list(_open_groups.items()):
        _kill_group(pgid if live_members(pgid) else None, g['tag'])
    assert not left, f"processes left running (now killed): {left}"


@atexit.register
def _kill_open_groups():
    """The last resort (pytest itself failing): no group a test started outlives pytest."""
    for pgid, g in list(_open_groups.items()):
        _kill_group(pgid if live_members(pgid) else None, g['tag'])
