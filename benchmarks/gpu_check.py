"""
The CUDA path, checked in one command (issue 22): tests/test_cuda.py, then bench_gpu.py, under
one time budget; writes <out>/gpu_check.md and <out>/gpu_check.json.

    bash benchmarks/gpu_check.sh [--device cuda|cpu] [--quick] [--out DIR] [--budget SECONDS]

--device cpu --quick runs the same tests and benchmark on the CPU at tiny sizes, so that this
cannot rot while no GPU is lent (tests/test_gpu_check.py runs it). Needs nothing beyond PyTorch,
numpy, scipy, matplotlib, tqdm and pytest; no network, no mnist1d.

This module is also the toolbox of tests/test_cuda.py and bench_gpu.py: processes that always
end (run), the trials' result files (trial), the corpus the checks train on (corpus_path), the
check sizes (check_args). Trials run through the command lines (train.py,
run_all_experiments.py, analyze_results.py) and are read back from their files, so this
depends on nothing inside the trainer.

Over 500 lines on purpose: the GPU session gets one file to read and run, and its CPU path
(a fork server that saves ~9 s of imports per tiny trial here) lives beside the checks it serves.
"""
import argparse
import datetime
import glob
import importlib
import json
import os
import platform
import re
import runpy
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))

# what test_cuda.py reads from its environment (set by main; all optional)
ENV_DEVICE, ENV_QUICK, ENV_DATA = 'REPRO_CHECK_DEVICE', 'REPRO_CHECK_QUICK', 'REPRO_CHECK_DATA'
ENV_FIGURES, ENV_DEADLINE = 'REPRO_CHECK_FIGURES', 'REPRO_CHECK_DEADLINE'
ENV_FORK = 'REPRO_CHECK_FORK'  # run the checks' commands through a ForkServer (the CPU run)

# trial sizes of the checks: test_resume's tiny trial on CPU; a little larger on a GPU, where
# it costs nothing and bf16 / fused kernels see more than one head of width 8. 12 steps with an
# evaluation (and a checkpoint) every 4.
QUICK = dict(n_layer=1, n_embd=16, n_head=2, block_size=16, batch_size=4, max_iters=12, eval_interval=4,
             eval_iters=2, n_eval=24, dropout=0.1)
FULL = dict(n_layer=2, n_embd=64, n_head=4, block_size=64, batch_size=16, max_iters=12, eval_interval=4,
            eval_iters=2, n_eval=64, dropout=0.1)
# the CPU-vs-CUDA comparison: the cpu preset's network, shortened (a figure worth quoting)
HARDWARE = dict(max_iters=100, eval_interval=50, eval_iters=10, n_eval=500)


def check_args(quick, sizes=None):
    """Config flags of the checks' trials: the cpu preset with the sizes above. Quick trials
    run on one thread: a tiny model's OpenMP threads mostly wait on each other (5x slower with
    two on a busy 2-core machine)."""
    sizes = sizes if sizes is not None else (QUICK if quick else FULL)
    return ['--config', 'cpu'] + [a for k, v in sizes.items() for a in (f'--{k}', str(v))] + \
        (['--threads', '1'] if quick else [])


# ----------------------------------------------------------------------------- processes

class Result:
    def __init__(self, argv, rc, out, err, seconds):
        self.argv, self.rc, self.out, self.err, self.seconds = argv, rc, out, err, seconds

    def tail(self, n=1500):
        return (self.out + self.err)[-n:]

    def __repr__(self):
        return f"exit {self.rc} after {self.seconds:.1f} s: {' '.join(self.argv)}\n{self.tail()}"


def run(argv, env=None, timeout=900, cwd=ROOT):
    """Run argv in a process group of its own and return its Result; the group is killed on
    the way out, whatever happens (timeout, an exception, Ctrl-C): nothing outlives the call.
    A timeout gives rc None. `env`: variables added to this process's environment."""
    t0 = time.time()
    p = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=max(1.0, timeout))
        rc = p.returncode
    except subprocess.TimeoutExpired:
        _kill_group(p)
        out, err = p.communicate()
        rc, err = None, err + f"\n[gpu_check: killed after {timeout:.0f} s]"
    finally:
        _kill_group(p)
    return Result([str(a) for a in argv], rc, out, err, time.time() - t0)


def _kill_group(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the group: workers a sweep spawned die too
    except (ProcessLookupError, PermissionError):
        pass
    if p.poll() is None:
        p.kill()
        p.wait()


def python(script, *args):
    return [sys.executable, os.path.join(ROOT, script), *map(str, args)]


# ----------------------------------------------------------------------------- a fork server (CPU runs)

PRELOAD = ('train', 'run_all_experiments', 'analyze_results', 'torch._dynamo')


class ForkServer:
    """run() for `python <script> ...` and `python -c CODE ...` command lines, each in a fresh
    process forked from a server that has imported torch and the project once. On a busy
    2-core machine a new interpreter spends ~9 s on imports before a tiny trial's second of
    work; forked, it starts at once, in the state a new process has after its imports (the
    server runs no torch op, starts no thread and never touches CUDA: forking stays safe).
    One command at a time; close() ends the server."""

    def __init__(self):
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--serve'], cwd=ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        self.buf, self.ready = b'', False  # it loads while the caller goes on: run() waits for it

    def _line(self, timeout):
        """The server's next JSON line, or None after `timeout` seconds."""
        end = time.time() + timeout
        while b'\n' not in self.buf:
            if not select.select([self.p.stdout], [], [], max(0.0, end - time.time()))[0]:
                return None
            chunk = os.read(self.p.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the fork server died (exit {self.p.wait()})")
            self.buf += chunk
        line, self.buf = self.buf.split(b'\n', 1)
        return json.loads(line)

    def run(self, argv, env=None, timeout=900, cwd=ROOT):
        t0 = time.time()
        if not self.ready:
            if self._line(600) != {'ready': True}:
                raise RuntimeError("the fork server did not start")
            self.ready = True
        with tempfile.TemporaryDirectory(prefix='gpu_check_') as d:
            out, err = os.path.join(d, 'out'), os.path.join(d, 'err')
            req = {'argv': [str(a) for a in argv], 'env': env or {}, 'cwd': str(cwd), 'out': out, 'err': err}
            self.p.stdin.write((json.dumps(req) + '\n').encode())
            self.p.stdin.flush()
            pid = self._line(60)['pid']
            try:
                reply, note = self._line(timeout), ''
                if reply is None:  # as Ctrl-C would: the trainer stops cleanly; then kill what is left
                    for sig, wait in ((signal.SIGINT, 15), (signal.SIGKILL, 60)):
                        _kill_session(pid, sig)
                        reply = self._line(wait)
                        if reply is not None:
                            break
                    note = f"\n[gpu_check: killed after {timeout:.0f} s]"
            except BaseException:  # Ctrl-C, a dead server: the command must not outlive this call
                _kill_session(pid, signal.SIGKILL)
                self.close()
                raise
            with open(out) as f, open(err) as g:
                o, e = f.read(), g.read() + note
        return Result(req['argv'], None if note else reply['rc'], o, e, time.time() - t0)

    def close(self):
        if self.p.poll() is None and not self.ready:
            _kill_group(self.p)  # still importing: nothing of value to wait for
        if self.p.poll() is None:
            self.p.stdin.close()
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                _kill_group(self.p)


def _kill_session(pid, sig):
    try:
        os.killpg(pid, sig)  # a forked command leads a session of its own: its group
    except ProcessLookupError:
        pass


def serve():
    """The fork server's loop (python gpu_check.py --serve): a JSON request per line on stdin,
    {'pid'} then {'rc'} per command on stdout."""
    sys.path.insert(0, ROOT)
    for name in PRELOAD:  # loaded to be inherited by the forks, not used here: no import cycle
        importlib.import_module(name)
    import torch
    with torch.device('meta'):  # the first meta-device build loads torch's reference ops (~3 s)
        torch.nn.Embedding(8, 8)
    proto = os.fdopen(os.dup(1), 'w', buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing else may write to the protocol
    proto.write(json.dumps({'ready': True}) + '\n')
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            proto.close()
            _child(req)  # never returns
        proto.write(json.dumps({'pid': pid}) + '\n')
        _, status = os.waitpid(pid, 0)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        proto.write(json.dumps({'rc': rc}) + '\n')


def _child(req):
    """A forked command: its own session (killed as a group), files for stdout and stderr, the
    script run as __main__ with its argv, as `python script ...` would."""
    code = 1
    try:
        os.setsid()
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, req['out']), (2, req['err'])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.environ.update(req['env'])
        os.chdir(req['cwd'])
        signal.signal(signal.SIGINT, signal.default_int_handler)
        argv = req['argv'][1:]  # without the interpreter
        if argv[0] == '-c':
            sys.argv = ['-c'] + argv[2:]
            exec(compile(argv[1], '<string>', 'exec'), {'__name__': '__main__'})
        else:
            sys.argv, sys.path[0] = argv, os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name='__main__')
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 -- a traceback, as the interpreter would print it
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# ----------------------------------------------------------------------------- result files

def trial(results, study, model, activation, k):
    """(record, probs) of a saved trial: <results>/<study>/<model>/<activation>/trial_<k>.json/.npz."""
    stem = os.path.join(str(results), study, model, activation, f'trial_{k}')
    with open(stem + '.json') as f:
        rec = json.load(f)
    with np.load(stem + '.npz') as z:
        return rec, z['probs']


def trial_jsons(study_dir):
    return sorted(glob.glob(os.path.join(str(study_dir), '*', '*', 'trial_*.json')))


def warnings_of(study_dir):
    with open(os.path.join(str(study_dir), 'summary.json')) as f:
        return json.load(f).get('warnings', [])


# ----------------------------------------------------------------------------- the corpus

def shakespeare(data_dir=None):
    """Tiny Shakespeare where train.py would look for it (--data-dir, $REPRO_DATA_DIR, ./data), or None."""
    d = data_dir or os.environ.get('REPRO_DATA_DIR') or os.path.join(ROOT, 'data')
    path = os.path.join(d, 'tinyshakespeare', 'input.txt')
    return path if os.path.isfile(path) else None


def stand_in_corpus(path, n=1_100_000, seed=0):
    """A text of Tiny Shakespeare's size and alphabet size (65 characters) from a fixed random
    first-order Markov chain: something to learn, made offline. Only where the real corpus is
    absent (a GPU machine has no network), and the report says so."""
    alphabet = np.array(list("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))
    rng = np.random.default_rng(seed)
    trans = rng.dirichlet(np.full(len(alphabet), 0.1), size=len(alphabet)).cumsum(1)
    chains, steps = 1000, -(-n // 1000)  # 1000 chains side by side, laid end to end: a vector per step
    out, c = np.empty((steps, chains), dtype=np.int64), rng.integers(len(alphabet), size=chains)
    for i in range(steps):
        c = np.minimum((trans[c] < rng.random((chains, 1))).sum(1), len(alphabet) - 1)
        out[i] = c
    text = ''.join(alphabet[out.T.reshape(-1)[:n]])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)
    return path


def corpus_path(work, data_dir=None):
    """(path, description): the real corpus if found, else a stand-in written under `work`."""
    real = shakespeare(data_dir)
    if real:
        return real, f"Tiny Shakespeare ({real})"
    path = stand_in_corpus(os.path.join(work, 'stand_in.txt'))
    return path, ("stand-in: 1.1 MB from a fixed random Markov chain over 65 characters (Tiny Shakespeare "
                  "not found under --data-dir, $REPRO_DATA_DIR or ./data)")


# ----------------------------------------------------------------------------- the driver

def device_info(device):
    import torch  # here, not at the top: the tests import this module's helpers without CUDA work
    info = {'device': device, 'torch': torch.__version__, 'cuda': torch.version.cuda,
            'python': platform.python_version(), 'cuda_available': torch.cuda.is_available(),
            'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count()}
    if device.startswith('cuda') and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.device(device))
        info.update(name=p.name, memory_gib=round(p.total_memory / 2 ** 30, 1),
                    capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                    cudnn=torch.backends.cudnn.version())
    else:
        info['name'] = info['cpu']
    return info


def junit_outcomes(path):
    """[{test, outcome, seconds, message}] from pytest's junit XML."""
    out = []
    for case in ET.parse(path).getroot().iter('testcase'):
        outcome, message = 'passed', ''
        for tag in ('failure', 'error', 'skipped'):
            el = case.find(tag)
            if el is not None:
                outcome = {'failure': 'failed', 'error': 'error', 'skipped': 'skipped'}[tag]
                message = (el.get('message') or el.text or '').strip()
                break
        out.append({'test': case.get('name'), 'outcome': outcome, 'seconds': float(case.get('time') or 0),
                    'message': ' '.join(message.split())[:600]})
    return out


def verbose_outcomes(log):
    """The same from `pytest -v` lines, for a run killed before it wrote its XML."""
    return [{'test': m.group(1), 'outcome': m.group(2).lower(), 'seconds': None, 'message': ''}
            for m in re.finditer(r'::(\S+) (PASSED|FAILED|SKIPPED|ERROR)', log)]


def run_tests(args, env, deadline, out):
    """pytest tests/test_cuda.py with the checks' environment; (outcomes, figures, note)."""
    xml, figures = os.path.join(out, 'pytest_junit.xml'), os.path.join(out, 'figures.jsonl')
    for p in (xml, figures):
        if os.path.exists(p):
            os.remove(p)
    env = {**env, ENV_FIGURES: figures, ENV_DEADLINE: str(deadline)}
    argv = [sys.executable, '-m', 'pytest', '-v', '-rA', '-p', 'no:cacheprovider', f'--junitxml={xml}',
            os.path.join(ROOT, 'tests', 'test_cuda.py')]
    r = run(argv, env=env, timeout=deadline - time.time() + 60)  # the tests stop starting at the deadline
    with open(os.path.join(out, 'pytest.log'), 'w') as f:
        f.write(r.out + r.err)
    note = None
    if r.rc is None:
        note = "pytest was stopped at the time budget; outcomes below are those it had printed"
    elif r.rc not in (0, 1):
        note = f"pytest exited {r.rc} (not a test failure: see pytest.log): {r.tail(300)}"
    outcomes = junit_outcomes(xml) if os.path.exists(xml) else verbose_outcomes(r.out)
    if not outcomes:
        note = f"no test outcomes (pytest exit {r.rc}; is pytest installed?): {r.tail(300)}"
    figs = []
    if os.path.exists(figures):  # into gpu_check.json, not a file of its own
        with open(figures) as f:
            figs = [json.loads(line) for line in f if line.strip()]
        os.remove(figures)
    return outcomes, figs, note


def run_bench(args, data, deadline, out):
    path = os.path.join(out, 'bench_gpu.json')
    argv = python('benchmarks/bench_gpu.py', '--device', args.device, '--data', data, '--out', path,
                  '--budget', f"{max(0.0, deadline - time.time()):.0f}", *(['--quick'] if args.quick else []))
    r = run(argv, timeout=deadline - time.time() + 60)
    with open(os.path.join(out, 'bench_gpu.log'), 'w') as f:
        f.write(r.out + r.err)
    bench = None
    if os.path.exists(path):
        with open(path) as f:
            bench = json.load(f)
    note = None if r.rc == 0 else f"bench_gpu.py exited {r.rc}: {r.tail(400)}"
    return bench, note


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0])
    parser.add_argument('--device', default='cuda', help='cuda (default) | cuda:N | cpu')
    parser.add_argument('--quick', action='store_true', help='tiny sizes (the CPU smoke run)')
    parser.add_argument('--out', default=os.path.join(ROOT, 'results', 'gpu_check'), help='report folder')
    parser.add_argument('--budget', type=float, default=480.0,
                        help='seconds for everything (default 480): tests first, then the benchmark')
    parser.add_argument('--data-dir', default=None, help='where Tiny Shakespeare is (else a stand-in is made)')
    args = parser.parse_args(argv)
    if args.device != 'cpu' and not args.device.startswith('cuda'):
        parser.error(f"unknown --device {args.device!r}; valid: cuda, cuda:N, cpu")
    t0 = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix='gpu_check_')  # a stand-in corpus, if one is needed: not a report
    try:
        return check(args, argv, out, work, t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check(args, argv, out, work, t0):
    """The tests, the benchmark, the report; the exit status."""
    data, data_note = corpus_path(work, args.data_dir)
    info = device_info(args.device)
    print(f"gpu_check: {info['name']} (torch {info['torch']}, CUDA {info['cuda']}); corpus: {data_note}; "
          f"budget {args.budget:.0f} s; report in {out}", flush=True)
    # on the CPU the commands fork from a pre-imported server (imports dwarf tiny trials there);
    # on a GPU each is a new interpreter, exactly as a user runs it
    env = {ENV_DEVICE: args.device, ENV_QUICK: '1' if args.quick else '', ENV_DATA: data, 'PYTHONUNBUFFERED': '1',
           ENV_FORK: '1' if args.device == 'cpu' else ''}
    notes = []
    if args.device.startswith('cuda') and not info['cuda_available']:
        notes.append("CUDA is not available here: every CUDA test is skipped and no benchmark runs")
    # the tests settle correctness: they get most of the budget; the benchmark what is left
    test_deadline = t0 + 0.6 * args.budget
    outcomes, figures, note = run_tests(args, env, test_deadline, out)
    notes += [note] if note else []
    t_tests = time.time() - t0
    if args.device == 'cpu' or info['cuda_available']:
        bench, note = run_bench(args, data, t0 + args.budget - 10, out)
    else:
        bench, note = None, "benchmark not run: CUDA is not available"
    notes += [note] if note else []
    report = {'source': 'measured', 'date': datetime.datetime.now().astimezone().isoformat(),
              'command': ' '.join(['bash benchmarks/gpu_check.sh'] + (argv if argv is not None else sys.argv[1:])),
              'device': info, 'corpus': data_note, 'budget_s': args.budget, 'tests_s': round(t_tests, 1),
              'total_s': round(time.time() - t0, 1), 'tests': outcomes, 'figures': figures, 'bench': bench,
              'notes': notes}
    with open(os.path.join(out, 'gpu_check.json'), 'w') as f:
        json.dump(report, f, indent=1, default=str)
    text = markdown(report)
    with open(os.path.join(out, 'gpu_check.md'), 'w') as f:
        f.write(text)
    print(text, flush=True)  # the report in the log too: a remote run's output alone settles it
    print(f"gpu_check: {len(outcomes)} checks ({', '.join(f'{n} {k}' for k, n in counts(outcomes).items())}), "
          f"{report['total_s']:.0f} s; report {os.path.join(out, 'gpu_check.md')}", flush=True)
    # settled only when every check passed and every benchmark item ran
    ran = bench is not None and not any(r.get('note', '').startswith(('not run', 'failed')) for r in bench['rows'])
    return 0 if outcomes and counts(outcomes) == {'passed': len(outcomes)} and ran and not notes else 1


def counts(outcomes):
    c = {}
    for t in outcomes:
        c[t['outcome']] = c.get(t['outcome'], 0) + 1
    return c


# ----------------------------------------------------------------------------- the report

def markdown(r):
    d = r['device']
    lines = [f"# gpu_check: {d['name']}", '',
             f"{r['date'][:19]}, `{r['command']}`: torch {d['torch']}, CUDA {d['cuda']}, Python {d['python']}"
             + (f", {d.get('memory_gib')} GiB, compute capability {d.get('capability')}" if 'memory_gib' in d else '')
             + f"; {d['cores']} CPU cores. Corpus: {r['corpus']}. Tests {r['tests_s']:.0f} s, all "
             f"{r['total_s']:.0f} s of a {r['budget_s']:.0f} s budget.", '']
    lines += [f"**Note:** {n}" for n in r['notes']] + ([''] if r['notes'] else [])
    lines += ['## Checks (tests/test_cuda.py)', '', '| check | outcome | s | message |', '|---|---|---|---|']
    for t in r['tests']:
        s = '' if t['seconds'] is None else f"{t['seconds']:.1f}"
        lines.append(f"| `{t['test']}` | {t['outcome']} | {s} | {t['message'].replace('|', '/')[:300]} |")
    if r['figures']:
        lines += ['', '## Figures the checks report (measured, not asserted unless the check says so)', '']
        for fig in r['figures']:
            name = fig['test'].split('::')[-1]
            rest = ', '.join(f"{k} {_fmt(v)}" for k, v in fig.items() if k != 'test')
            lines.append(f"- `{name}`: {rest}")
    lines += ['', '## Benchmark (benchmarks/bench_gpu.py)', '']
    lines += bench_markdown(r['bench']) if r['bench'] else ['not run (see the notes)']
    return '\n'.join(lines) + '\n'


def bench_markdown(b):
    lines = [f"Matrix rate of the device ({b['matmul']['dtype']}, {b['matmul']['n']}^3): "
             f"{b['matmul']['tflops']:.1f} TFLOP/s." if b.get('matmul') else 'Matrix rate: not measured.', '']
    lines += ['| what | ms/step | tokens/s | MFU | peak MB | note |', '|---|---|---|---|---|---|']
    for row in b.get('rows', []):
        mfu = '' if row.get('mfu') is None else f"{row['mfu']:.1%}"
        lines.append(f"| {row['what']} | {_fmt(row.get('ms_per_step'))} | {_fmt(row.get('tokens_per_s'))} | "
                     f"{mfu} | {_fmt(row.get('peak_mb'))} | {row.get('note', '')} |")
    return lines + [f"- {n}" for n in b.get('notes', [])]


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, dict):
        return '{' + ', '.join(f"{k}: {_fmt(x)}" for k, x in v.items()) + '}'
    return '' if v is None else str(v)


if __name__ == '__main__':
    if sys.argv[1:] == ['--serve']:
        serve()
    else:
        sys.exit(main())
