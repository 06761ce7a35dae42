"""The CUDA path (issue 22), on one GPU: random streams, a planted CUDA leak, determinism,
kill-and-resume, bfloat16 autocast on every language model, the memory check, a sweep of two
workers on one GPU, and CPU against CUDA. Every trial runs through the command lines in a
process of its own and is read back from its files (benchmarks/gpu_check.py's helpers).

Where CUDA is not available every test is skipped with the reason. The same tests run on the
CPU with REPRO_CHECK_DEVICE=cpu, which `bash benchmarks/gpu_check.sh --device cpu --quick` sets
(tests/test_gpu_check.py runs it), so none of this is dead code while no GPU is lent. There, the
checks that are about CUDA (bfloat16, CPU against CUDA) run their CPU counterpart: float32,
CPU against CPU. Settings (gpu_check.py sets them): REPRO_CHECK_DEVICE (cuda), REPRO_CHECK_QUICK
(tiny trials), REPRO_CHECK_DATA (the corpus; default: the tests' tiny text), REPRO_CHECK_FIGURES
(a file for the figures each check reports), REPRO_CHECK_DEADLINE (no check starts after it).
"""
import json
import math
import os
import re
import sys
import time
from dataclasses import fields
from datetime import datetime

import numpy as np
import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import gpu_check as gc  # noqa: E402
import pairwise  # noqa: E402
from config import Config, get_config  # noqa: E402
from model_factories import MODEL_NAMES, check_memory, estimate_memory  # noqa: E402

DEVICE = os.environ.get(gc.ENV_DEVICE) or 'cuda'
ON_CUDA = DEVICE.startswith('cuda')
QUICK = bool(os.environ.get(gc.ENV_QUICK))
SIZES = gc.check_args(QUICK)
STREAMS = ('init', 'data', 'dropout')
EXPECTED = {'all': set(STREAMS), 'init': {'init'}, 'data': {'data'}, 'dropout': {'dropout'}, 'none': set()}
KILL_ENV = 'REPRO_TEST_KILL_AT'  # the trainer's kill hook (checkpoint.py): SIGKILL after N steps
CAUSALITY_TOL = 1e-3             # sanity.py's: above it a trial "sees the future"
TIMEOUT = 900                    # per process: generous for a busy machine; the deadline cuts it

pytestmark = pytest.mark.skipif(
    ON_CUDA and not torch.cuda.is_available(),
    reason=f"CUDA is not available (torch {torch.__version__}, CUDA build {torch.version.cuda}): these checks "
           f"need a GPU; `bash benchmarks/gpu_check.sh --device cpu --quick` runs them on the CPU")


# ----------------------------------------------------------------------------- fixtures and helpers

def deadline():
    d = os.environ.get(gc.ENV_DEADLINE)
    return float(d) if d else None


@pytest.fixture(autouse=True)
def within_budget():
    if deadline() is not None and time.time() > deadline():
        pytest.skip("not run: gpu_check's time budget for the tests was spent before this check started")


@pytest.fixture
def figures(request):
    """record(**figures): what a check measured, into the report (and the test's output)."""
    def record(**kw):
        print(json.dumps(kw, default=str))
        path = os.environ.get(gc.ENV_FIGURES)
        if path:
            with open(path, 'a') as f:
                f.write(json.dumps({'test': request.node.nodeid, **kw}, default=str) + '\n')
    return record


@pytest.fixture(scope='module')
def data(corpus):
    return os.environ.get(gc.ENV_DATA) or corpus


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    return tmp_path_factory.mktemp('cuda_checks')


_server = {}


@pytest.fixture(scope='module', autouse=True)
def fork_server():
    """REPRO_CHECK_FORK (gpu_check's CPU run): the commands fork from a pre-imported server."""
    if os.environ.get(gc.ENV_FORK):
        _server['s'] = gc.ForkServer()
    yield
    if 's' in _server:
        _server.pop('s').close()


def sh(argv, env=None):
    """Run a command in a process of its own that ends however this ends (gc.run, or the fork
    server's). One that the deadline cut short skips the check rather than failing it."""
    d = deadline()
    run = _server['s'].run if 's' in _server else gc.run
    r = run(argv, env=env, timeout=TIMEOUT if d is None else max(30.0, min(TIMEOUT, d + 30 - time.time())))
    if r.rc is None and d is not None and time.time() > d:
        pytest.skip("stopped: gpu_check's time budget for the tests ran out during this check")
    return r


def ok(r):
    assert r.rc == 0, r
    return r


def train(data, results, study, *extra, model='minigpt', activation='gelu', trials=2, device=DEVICE, sizes=SIZES):
    return gc.python('train.py', '--model', model, '--activation', activation, '--trials', trials, '--study', study,
                     '--results-dir', results, '--device', device, '--data', data, *sizes, *extra)


def analyze(study_dir):
    """The analysis (no plots) of a study folder: its sanity warnings."""
    ok(sh(gc.python('analyze_results.py', '--results-dir', study_dir, '--no-plots')))
    return gc.warnings_of(study_dir)


def dev_type(device=DEVICE):
    return 'cuda' if device.startswith('cuda') else 'cpu'


# ----------------------------------------------------------------------------- streams

@pytest.fixture(scope='module')
def vary_run(data, work):
    """Two trials per --vary mode (study = the mode), each mode in its own train.py, run once."""
    done = {}

    def get(mode):
        if mode not in done:
            done[mode] = ok(sh(train(data, work / 'vary', mode, '--vary', mode)))
        return work / 'vary'
    return get


@pytest.mark.parametrize('mode', list(EXPECTED))
def test_vary_mode_changes_exactly_its_streams(mode, vary_run, figures):
    results = vary_run(mode)
    (r0, _), (r1, _) = gc.trial(results, mode, 'minigpt', 'gelu', 0), gc.trial(results, mode, 'minigpt', 'gelu', 1)
    assert r0['provenance']['device'] == r1['provenance']['device'] == dev_type()
    differ = {s for s in STREAMS if r0['streams'][s] != r1['streams'][s]}
    figures(vary=mode, streams_that_differ=sorted(differ), device=r0['provenance'].get('device_name'))
    assert differ == EXPECTED[mode], f"--vary {mode}: {sorted(differ)} differ, expected {sorted(EXPECTED[mode])}"


# the CUDA bug, planted: after the trainer seeds the dropout stream, the trial device's generator
# is reseeded with the trial's init seed (on the CPU, where dropout draws from the CPU generator,
# that one). Mirrors tests/test_streams.py; the hook is train.seed_dropout_stream.
LEAK = """
import sys, torch
sys.path.insert(0, {root!r})
import train
real = getattr(train, 'seed_dropout_stream', None)
if real is None:
    sys.exit('planted leak: train.seed_dropout_stream is gone; update tests/test_cuda.py to the new hook')
for k in (0, 1):
    def leak(seed, init={base} + k):  # --vary init: trial k's init seed is seed_base + k
        real(seed)
        (torch.cuda.manual_seed_all if {cuda} else torch.manual_seed)(init)
    train.seed_dropout_stream = leak
    train.main(sys.argv[1:] + ['--first-trial', str(k), '--trials', '1'])
"""


def test_planted_cuda_dropout_leak_is_flagged_under_vary_init(data, work, vary_run, figures):
    clean = [w for w in analyze(vary_run('init') / 'init') if 'stream' in w]
    assert clean == [], clean
    argv = train(data, work / 'leak', 'leak', '--vary', 'init', '--seed_base', 42)
    argv = [argv[0], '-c', LEAK.format(root=ROOT, base=42, cuda=ON_CUDA)] + argv[2:]  # the same flags
    ok(sh(argv))
    (r0, _), (r1, _) = (gc.trial(work / 'leak', 'leak', 'minigpt', 'gelu', k) for k in (0, 1))
    assert r0['streams']['dropout'] != r1['streams']['dropout']
    flagged = [w for w in analyze(work / 'leak' / 'leak') if 'stream' in w]
    figures(warnings=flagged)
    assert len(flagged) == 1 and 'dropout stream differs across trials although --vary init' in flagged[0], flagged


# ----------------------------------------------------------------------------- determinism, bfloat16

@pytest.fixture(scope='module')
def lm_sweep(data, work):
    """Every language model x gelu, the same trial twice (--vary none): study 'det' with
    --deterministic, 'auto' without (the default dtype: bfloat16 autocast on CUDA). One sweep
    each, run once; a model that fails is in the study's failures.jsonl."""
    done = {}

    def get(study):
        if study not in done:
            done[study] = sh(gc.python('run_all_experiments.py', '--study', study, '--results-dir', work / 'lm',
                                       '--models', *MODEL_NAMES, '--activations', 'gelu', '--trials', 2,
                                       '--vary', 'none', '--device', DEVICE, '--data', data, '--no-analyze',
                                       *SIZES, *(['--deterministic'] if study == 'det' else [])))
        return done[study]
    return get


def two_trials(work, sweep_result, study, model):
    """((record, probs) of trials 0 and 1 of model/gelu, or a failure naming the trainer's error."""
    try:
        return [gc.trial(work / 'lm', study, model, 'gelu', k) for k in (0, 1)]
    except FileNotFoundError:
        log = work / 'lm' / study / 'failures.jsonl'
        errors = [json.loads(line)['error'] for line in open(log)] if log.exists() else []
        errors = [e for e in errors if e] or [sweep_result.tail(800)]
        pytest.fail(f"{model}: no result ({errors[0]})")


@pytest.mark.parametrize('model', MODEL_NAMES)
def test_deterministic_repeat_is_bitwise_identical(model, lm_sweep, work, figures):
    (r0, p0), (r1, p1) = two_trials(work, lm_sweep('det'), 'det', model)
    assert r0['deterministic'] and all(r0['seeds'][s] == r1['seeds'][s] for s in STREAMS)
    figures(model=model, max_abs_diff=float(np.abs(p0 - p1).max()), dtype=r0['dtype'])
    assert np.array_equal(p0, p1), f"{model}: max |p0 - p1| = {np.abs(p0 - p1).max():.3g} under --deterministic"
    assert r0['history']['train_loss'] == r1['history']['train_loss']


@pytest.mark.parametrize('model', MODEL_NAMES)
def test_default_dtype_trains_every_language_model(model, lm_sweep, work, figures):
    """bfloat16 autocast on CUDA (float32 on CPU): finite losses, float32 predictions whose rows
    sum to 1, the causality probe within the analysis's tolerance. The same trial twice without
    --deterministic: how far apart they end is reported, not asserted."""
    (r0, p0), (r1, p1) = two_trials(work, lm_sweep('auto'), 'auto', model)
    m = r0['metrics']
    rows = float(np.abs(p0.astype(np.float64).sum(1) - 1).max())
    # the memory check's estimate (float32) beside the peak measured (CUDA: allocated; CPU: the process's RSS)
    config = get_config('cpu', **{k: v for k, v in r0['config'].items() if k in {f.name for f in fields(Config)}})
    figures(model=model, dtype=r0['dtype'], val_loss=m['val_loss'], causality_max_change=m['causality_max_change'],
            row_sum_max_error=rows, peak_memory_mb=m['peak_memory_mb'], peak_memory_kind=m.get('peak_memory_kind'),
            memory_estimate_mb=estimate_memory(model, 'gelu', config)['total'] / 2 ** 20,
            repeat_max_abs_diff=float(np.abs(p0 - p1).max()), repeat_relative_pd=float(pairwise.relative_pd(p0, p1)))
    assert r0['dtype'] == ('bfloat16' if ON_CUDA and torch.cuda.is_bf16_supported() else 'float32')
    losses = [m['train_loss'], m['val_loss']] + r0['history']['train_loss'] + r0['history']['val_loss']
    assert all(math.isfinite(v) for v in losses), losses
    assert p0.dtype == np.float32 and np.isfinite(p0).all() and (p0 >= 0).all() and rows < 1e-5
    assert m['causality_max_change'] is not None and m['causality_max_change'] <= CAUSALITY_TOL


def test_sanity_rules_do_not_call_nondeterministic_seeds_unapplied(vary_run, lm_sweep, work, figures):
    """Trials of different seeds without --deterministic (study 'all' of the stream checks), and
    the same trial repeated (every model, 'auto'): the analysis finds no seed unapplied and no
    model that sees the future."""
    lm_sweep('auto')
    w_all, w_auto = analyze(vary_run('all') / 'all'), analyze(work / 'lm' / 'auto')
    figures(warnings_vary_all=w_all, warnings_repeat=w_auto)
    bad = [w for w in w_all + w_auto if 'seeds not applied' in w or 'ignor' in w or 'sees the future' in w]
    assert bad == []


# ----------------------------------------------------------------------------- kill and resume

def test_killed_and_resumed_deterministic_trial_is_bitwise_an_uninterrupted_one(data, work, figures):
    """SIGKILL after 6 steps (checkpoints at 4 and 8), the same command again: it resumes at 4
    and ends bitwise equal to a run without checkpoints. Dropout draws from the device's
    generator after step 4, so this needs its RNG state restored."""
    ok(sh(train(data, work / 'resume', 'ref', '--deterministic', '--checkpoint-every', 0, trials=1)))
    argv = train(data, work / 'resume', 'res', '--deterministic', trials=1)
    killed = sh(argv, env={KILL_ENV: 'step:6'})
    assert killed.rc == -9, f"expected a SIGKILL at step 6: {killed}"
    folder = work / 'resume' / 'res' / 'minigpt' / 'gelu'
    assert (folder / '.trial_0.ckpt').exists() and not (folder / 'trial_0.json').exists()
    ok(sh(argv))
    (ref, pr), (res, ps) = gc.trial(work / 'resume', 'ref', 'minigpt', 'gelu', 0), \
        gc.trial(work / 'resume', 'res', 'minigpt', 'gelu', 0)
    figures(resumed_from=res['resumed_from'], max_abs_diff=float(np.abs(pr - ps).max()))
    assert res['resumed_from'] == [4] and res['provenance']['device'] == dev_type()
    assert np.array_equal(pr, ps), f"resumed trial differs: max {np.abs(pr - ps).max():.3g}"
    assert ref['streams'] == res['streams']
    for k in ('iter', 'train_loss', 'val_loss', 'lr', 'grad_norm'):
        assert ref['history'][k] == res['history'][k], k
    assert ref['metrics']['val_loss'] == res['metrics']['val_loss']


# ----------------------------------------------------------------------------- memory

def test_impossible_size_is_refused_before_anything_is_allocated(data, work, figures):
    huge = ('--n_layer', 64, '--n_embd', 65536, '--n_head', 64)  # ~3e12 parameters: ~50 TB with AdamW
    r = sh(train(data, work / 'memory', 'huge', *huge, trials=1))
    assert r.rc == 2 and 'not enough memory' in r.err, r
    assert gc.trial_jsons(work / 'memory' / 'huge') == []
    dev = torch.device(DEVICE)
    before = torch.cuda.memory_allocated(dev) if ON_CUDA else None
    config = get_config('cpu', n_layer=64, n_embd=65536, n_head=64, vocab_size=65)
    with pytest.raises(ValueError, match='not enough memory') as e:
        check_memory([('minigpt', 'gelu')], config, dev)
    if ON_CUDA:  # the estimate is made on the meta device: not a byte on the GPU
        assert torch.cuda.memory_allocated(dev) == before
    figures(refused_after_s=round(r.seconds, 1), message=r.err.strip().splitlines()[-1][:300],
            in_process=str(e.value)[:200])


# ----------------------------------------------------------------------------- a sweep of two workers

def test_two_workers_on_one_device_finish_every_trial_exactly_once(data, work, figures):
    per_gpu = ['--trials-per-gpu', 2] if ON_CUDA else []  # the flag is for CUDA devices only
    argv = gc.python('run_all_experiments.py', '--study', 'sweep', '--results-dir', work / 'sweep',
                     '--models', 'minigpt', '--activations', 'gelu', 'relu', '--trials', 2, '--workers', 2,
                     *per_gpu, '--device', DEVICE, '--data', data, '--no-analyze', *SIZES)
    r = ok(sh(argv))
    finished = re.findall(r'^\[\d+/4\] (\S+ trial \d+):', r.out, flags=re.M)
    assert sorted(finished) == sorted(f"minigpt/{a} trial {k}" for a in ('gelu', 'relu') for k in (0, 1)), r.out
    paths = gc.trial_jsons(work / 'sweep' / 'sweep')
    records = [json.load(open(p)) for p in paths]
    assert len(records) == 4 and not (work / 'sweep' / 'sweep' / 'failures.jsonl').exists()
    assert all(rec['resumed_from'] == [] and rec['provenance']['device'] == dev_type() for rec in records)
    again = ok(sh(argv + ['--dry-run']))  # the same command would train nothing again
    assert '= 4: 4 done, 0 to run' in again.out, again.out
    layout = next((ln.strip() for ln in r.out.splitlines() if 'worker process' in ln), None)
    figures(layout=layout, most_trials_at_once=most_at_once(records),
            seconds=[round(rec['metrics']['total_time'], 1) for rec in records])


def most_at_once(records):
    """The largest number of trials whose [started_at, finished_at] overlap (reported only)."""
    events = sorted((datetime.fromisoformat(rec['provenance'][k]).timestamp(), d)
                    for rec in records for k, d in (('started_at', 1), ('finished_at', -1)))
    n = best = 0
    for _, d in events:
        n += d
        best = max(best, n)
    return best


# ----------------------------------------------------------------------------- CPU against CUDA

def test_same_trial_on_cpu_and_on_the_device_hardware_contribution(data, work, figures):
    """The same trial (--deterministic, float32: TF32 off) on the CPU and on the device; their
    relative PD is the hardware's contribution, reported beside the between-seed PD of the same
    config (trials 0 and 1 on the device), the PD of the default dtype (bfloat16 on CUDA) from
    the CPU trial, and on the device float32 without --deterministic (TF32 on, non-deterministic
    kernels) against with it. On the CPU run of these checks the device is the CPU: those three
    runs are the device run itself, and their figures 0."""
    sizes = SIZES if QUICK else gc.check_args(False, gc.HARDWARE)
    R = work / 'hardware'
    ok(sh(train(data, R, 'device', '--deterministic', '--dtype', 'float32', sizes=sizes)))
    if ON_CUDA:
        ok(sh(train(data, R, 'cpu', '--deterministic', '--dtype', 'float32', trials=1, device='cpu', sizes=sizes)))
        ok(sh(train(data, R, 'default', trials=1, sizes=sizes)))
        ok(sh(train(data, R, 'tf32', '--dtype', 'float32', trials=1, sizes=sizes)))  # TF32 on: not deterministic
    (d0, p0), (_, p1) = (gc.trial(R, 'device', 'minigpt', 'gelu', k) for k in (0, 1))
    (c0, pc), (_, pa), (_, pt) = (gc.trial(R, s if ON_CUDA else 'device', 'minigpt', 'gelu', 0)
                                  for s in ('cpu', 'default', 'tf32'))
    assert c0['eval_hash'] == d0['eval_hash'] and pc.shape == p0.shape  # comparable: the same inputs
    hw, seeds, default, tf32 = (float(pairwise.relative_pd(a, b)) for a, b in ((pc, p0), (p0, p1), (pc, pa), (p0, pt)))
    figures(config=' '.join(map(str, sizes)), relative_pd_cpu_vs_device=hw,
            max_abs_diff_cpu_vs_device=float(np.abs(pc - p0).max()), relative_pd_between_seeds=seeds,
            hardware_share_of_seed_pd=hw / seeds if seeds else None, relative_pd_cpu_vs_device_default_dtype=default,
            relative_pd_device_float32_without_vs_with_deterministic=tf32,
            val_loss_cpu=c0['metrics']['val_loss'], val_loss_device=d0['metrics']['val_loss'],
            device_name=d0['provenance'].get('device_name'))
    assert np.isfinite([hw, seeds, default, tf32]).all() and seeds > 0
