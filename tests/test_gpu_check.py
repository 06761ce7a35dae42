"""The one-command CUDA check (benchmarks/gpu_check.sh, issue 22) run on the CPU, so that it cannot
rot while no GPU is lent: every check of tests/test_cuda.py passes on the CPU and the report is
written; with no time left it still writes its report; the language-model path imports no
optional package (a GPU image may lack mnist1d)."""
import json
import os
import sys
import time

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import gpu_check as gc  # noqa: E402

SCRIPT = os.path.join(ROOT, 'benchmarks', 'gpu_check.sh')
TIMEOUT = 1800  # a busy 2-core machine; it takes ~100 s on one shared by four
ENV = {'PYTHON': sys.executable}  # the script's Python: this one, venv or not


def run(procs, argv, env=None):
    """gc.run's Result, the command run through `procs`: it ends with the test, with all it
    started (the inner pytest's fork server and commands lead sessions of their own)."""
    t0 = time.monotonic()
    p = procs.run(argv, TIMEOUT, env={**os.environ, **(env or {})})
    return gc.Result(argv, p.returncode, p.stdout, p.stderr, time.monotonic() - t0)


def report(out):
    with open(os.path.join(out, 'gpu_check.json')) as f:
        j = json.load(f)
    with open(os.path.join(out, 'gpu_check.md')) as f:
        return j, f.read()


def test_cpu_quick_run_passes_every_check_and_writes_its_report(tmp_path, procs):
    out = str(tmp_path / 'report')
    # a budget no machine reaches: every check must run and pass (the budget is tested below);
    # no corpus where it looks, as on a GPU machine: the stand-in is made and said
    env = {**ENV, 'REPRO_DATA_DIR': str(tmp_path / 'no_data')}
    r = run(procs, ['bash', SCRIPT, '--device', 'cpu', '--quick', '--out', out, '--budget', '7200'], env=env)
    assert r.rc == 0, r
    j, md = report(out)
    tests = {t['test']: t['outcome'] for t in j['tests']}
    assert len(tests) >= 20 and set(tests.values()) == {'passed'}, tests
    assert {'test_killed_and_resumed_deterministic_trial_is_bitwise_an_uninterrupted_one',
            'test_two_workers_on_one_device_finish_every_trial_exactly_once'} <= set(tests)
    assert j['device']['device'] == 'cpu' and j['device']['torch'] and j['notes'] == []
    assert j['corpus'].startswith('stand-in') and 'stand-in' in md
    assert any(f.get('resumed_from') == [4] for f in j['figures'])  # the figures came back from the tests
    rows = {r['what']: r for r in j['bench']['rows']}
    assert j['bench']['matmul']['tflops'] > 0
    for what in ('minigpt step, gpu preset', 'minigpt step, gpu_full preset', 'all-in gpu-preset trial (train.py)',
                 'sweep, 1 trial(s) at once (--workers 1)', 'sweep, 2 trial(s) at once (--workers 2)'):
        assert rows[what]['tokens_per_s'] > 0 and rows[what]['mfu'] > 0, rows[what]
    assert '## Checks (tests/test_cuda.py)' in md and '| minigpt step, gpu preset |' in md
    # what comes back from a GPU machine: at most 8 files, the reports among them
    assert {'gpu_check.md', 'gpu_check.json'} <= set(os.listdir(out)) and len(os.listdir(out)) <= 8


def test_with_no_time_left_it_stops_cleanly_and_still_reports(tmp_path, procs):
    out = str(tmp_path / 'report')
    r = run(procs, ['bash', SCRIPT, '--device', 'cpu', '--quick', '--out', out, '--budget', '1'], env=ENV)
    assert r.rc == 1, r  # not everything ran: not a pass
    j, md = report(out)
    assert j['tests'] and {t['outcome'] for t in j['tests']} == {'skipped'}
    assert all('time budget' in t['message'] for t in j['tests'])
    rows = j['bench']['rows']
    assert rows and all(row['note'].startswith('not run: the time budget has') for row in rows), rows
    assert 'not run: the time budget has' in md


def test_language_model_path_imports_no_optional_package(tmp_path, procs):
    """Without mnist1d (and ray): the trainer, the sweep and the analysis import, and asking
    for MNIST-1D says in one line what is missing."""
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); sys.modules['mnist1d'] = None; sys.modules['ray'] = None\n"
            "import train, run_all_experiments, analyze_results, sweep, model_factories, prepare_data, mnist\n"
            "from fileio import DataError\n"
            f"try:\n    mnist.load_mnist1d({str(tmp_path)!r})\nexcept DataError as e:\n    print('refused:', e)\n")
    r = run(procs, [sys.executable, '-c', code])
    assert r.rc == 0, r
    assert 'refused: dataset mnist1d needs the package mnist1d, which is not installed' in r.out, r.out
