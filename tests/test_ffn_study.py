"""The FFN study (the mnist_ffn design of designs.py): exact best-of-k against brute
force, the seed bootstrap's pairing and calibration, the full factorial plan, and small studies
end to end through the sweep engine (resume, dry-run, failures, report and plots from the
cell folders, MNIST from generated IDX files)."""
import glob
import itertools
import json
import os

import numpy as np
import pytest

import analyze_results
import best_of_k
import mnist
import run_all_experiments as rae
import plan as planning
from device import cores

FAST = ['--widths', '2', '--batch-sizes', '64', '--lrs', '0.01', '0.001', '--trials', '3',
        '--workers', '1', '--threads', '1']


# ----------------------------------------------------------------------------- best-of-k statistics

def brute_force_best_of_k(val, test, k):
    """Every ordered k-tuple of draws (with replacement); the first drawn of the best is kept."""
    kept_val, kept_test = [], []
    for tup in itertools.product(range(len(val)), repeat=k):
        ok = [i for i in tup if not np.isnan(val[i])]
        if not ok:
            continue  # no finished draw: excluded (the exact value is conditional on one)
        best = max(val[i] for i in ok)
        first = next(i for i in ok if val[i] == best)
        kept_val.append(best)
        kept_test.append(test[first])
    return np.mean(kept_val), np.mean(kept_test)


@pytest.mark.parametrize('case', range(6))
def test_expected_best_of_k_equals_brute_force(case):
    rng = np.random.default_rng(case)
    n = 5 + case % 2
    val = rng.integers(0, 4, n) / 4.0  # few values: many ties between runs with different test values
    test = rng.random(n)
    if case >= 3:
        val[rng.integers(n)] = np.nan  # a failed run: drawn, never kept
    for k in (1, 2, 3, 4):
        ev, et = best_of_k.expected_best_of_k(val, test, [k])
        bv, bt = brute_force_best_of_k(val, test, k)
        assert ev[0] == pytest.approx(bv, abs=1e-12) and et[0] == pytest.approx(bt, abs=1e-12), k


def test_expected_best_of_k_properties():
    val, test = np.array([0.1, 0.5, 0.3, 0.9]), np.array([0.2, 0.4, 0.6, 0.8])
    ev, et = best_of_k.expected_best_of_k(val, test, [1, 2, 50, 10 ** 4])
    assert ev[0] == pytest.approx(val.mean()) and et[0] == pytest.approx(test.mean())
    # k=2 from 4 runs with replacement: P(max = 0.9) = 1 - (3/4)^2 = 7/16, 0.5: (9 - 4)/16, 0.3: 3/16, 0.1: 1/16
    assert ev[1] == pytest.approx((0.9 * 7 + 0.5 * 5 + 0.3 * 3 + 0.1 * 1) / 16)
    assert et[1] == pytest.approx((0.8 * 7 + 0.4 * 5 + 0.6 * 3 + 0.2 * 1) / 16)
    assert np.all(np.diff(ev) > 0) and ev[-1] == pytest.approx(0.9)  # increasing in k, towards the best run
    batch = best_of_k.expected_best_of_k(np.stack([val, val[::-1]]), np.stack([test, test[::-1]]), [3])
    assert batch[0][0, 0] == batch[0][1, 0] and batch[1][0, 0] == batch[1][1, 0]  # order of runs is irrelevant
    nan = best_of_k.expected_best_of_k([np.nan, np.nan], [np.nan, np.nan], [2])
    assert np.isnan(nan[0]).all() and np.isnan(nan[1]).all()
    with pytest.raises(ValueError, match='ks must be integers >= 1'):
        best_of_k.expected_best_of_k(val, test, [0])
    with pytest.raises(ValueError, match='has no test accuracy'):
        best_of_k.expected_best_of_k(val, [0.1, np.nan, 0.2, 0.3], [1])


def test_seed_bootstrap_is_paired_across_models_and_cells():
    rng = np.random.default_rng(0)
    val = rng.random((1, 4, 6))
    both = np.concatenate([val, val + 0.01])  # the second model: the first plus a constant
    out = best_of_k.best_of_k_bootstrap(both, both, [1, 2, 4], n_resamples=300, seed=1)
    assert out['val_boot'].shape == (2, 300, 3)
    # paired resampling: the same seeds for both models, so every resample differs by the constant
    np.testing.assert_allclose(out['val_boot'][1] - out['val_boot'][0], 0.01, atol=1e-12)
    np.testing.assert_allclose(out['val'][1] - out['val'][0], 0.01, atol=1e-12)
    again = best_of_k.best_of_k_bootstrap(both, both, [1, 2, 4], n_resamples=300, seed=1, block=7)
    np.testing.assert_array_equal(again['val_boot'], out['val_boot'])  # blocks change nothing
    # a resample that repeats one seed in every cell is the expectation over that seed's runs
    one = best_of_k.best_of_k_bootstrap(val[:, :, :1], val[:, :, :1], [2], n_resamples=5)
    assert np.allclose(one['val_boot'][0, :, 0], one['val'][0, 0])


def test_seed_bootstrap_interval_calibration():
    """Simulated grids with a known truth: cell means, a seed effect shared by every cell and
    model (seeds are shared), run noise. The 95% interval of the paired difference of expected
    best-of-k must cover the population value in most simulated studies (20 seeds per cell,
    the design's default; measured coverage ~0.93-0.95)."""
    rng = np.random.default_rng(3)
    cells, seeds, ks = 8, 20, np.array([2, 8])
    mu = np.stack([np.linspace(0.10, 0.30, cells), np.linspace(0.08, 0.32, cells)])
    sd_seed, sd_run = 0.01, 0.02
    draws = 200000
    truth = []
    for m in range(2):  # population: k draws of (a cell at random, a fresh seed)
        d = (mu[m][rng.integers(0, cells, (draws, 8))] + rng.normal(0, sd_seed, (draws, 8))
             + rng.normal(0, sd_run, (draws, 8)))
        truth.append([d[:, :k].max(1).mean() for k in ks])
    truth = np.subtract(*truth[::-1])
    covered, reps = np.zeros(len(ks)), 150
    for r in range(reps):
        v = mu[:, :, None] + rng.normal(0, sd_seed, (1, 1, seeds)) + rng.normal(0, sd_run, (2, cells, seeds))
        out = best_of_k.best_of_k_bootstrap(v, v, ks, n_resamples=400, seed=r)
        lo, hi = best_of_k.percentile_interval(out['val_boot'][1] - out['val_boot'][0])
        covered += (lo <= truth) & (truth <= hi)
    coverage = covered / reps
    assert np.all(coverage >= 0.85) and np.all(coverage <= 0.995), coverage


# ----------------------------------------------------------------------------- the plan

def plan_of(*args):
    return planning.make_plan(rae.make_parser().parse_args(list(args)))


def test_plan_is_the_full_factorial_grid(mnist1d_dir, tmp_path):
    plan = plan_of('--study', 'mnist_ffn', '--data-dir', mnist1d_dir, '--results-dir', str(tmp_path))
    jobs = plan.to_run
    seen = [(j.config.hidden, j.config.batch_size, j.config.learning_rate, j.activation, j.trial)
            for j in jobs]
    expected = list(itertools.product((2, 4, 8, 16), (8, 64), (1e-1, 1e-2, 1e-3, 1e-4), ('relu', 'geglu'), range(20)))
    assert len(seen) == len(set(seen)) == 1280 and set(seen) == set(expected)
    assert len(plan.cells) == 32 and not plan.done
    for j in jobs:  # one study folder per cell, named from its config; every job carries its cell's config
        c = j.config
        assert j.study == f"mnist_ffn/mnist1d/gated_same/h{c.hidden}_b{c.batch_size}_lr{c.learning_rate:g}"
        assert j.model == 'ffn' and c.dataset == 'mnist1d' and c.gated_width == 'same'
    assert plan.study_dir == os.path.join(str(tmp_path), 'mnist_ffn', 'mnist1d', 'gated_same')
    # tiny trials: one thread each and one worker per core, said in the plan
    assert plan.threads == 1 and plan.workers == cores()
    assert 'one thread each, one worker per core' in planning.describe(plan)
    assert '32 cell(s) x 1 model(s) x 2 activation(s) x 20 trial(s) = 1280' in planning.describe(plan)
    # flags narrow the grid; the matched arm goes to its own folder
    small = plan_of('--study', 'mnist_ffn', '--data-dir', mnist1d_dir, '--results-dir', str(tmp_path), '--widths', '4',
                    '--lrs', '0.01', '--gated-width', 'matched', '--trials', '2', '--workers', '1', '--threads', '2')
    assert list(small.cells) == ['h4_b8_lr0.01', 'h4_b64_lr0.01'] and len(small.to_run) == 8
    assert small.study_dir.endswith(os.path.join('mnist1d', 'gated_matched')) and small.threads == 2


@pytest.mark.parametrize('args, message', [
    (['--study', 'mnist_ffn', '--hidden', '4'], '--hidden: set by design mnist_ffn (use --task, --widths'),
    (['--study', 'mnist_ffn', '--dataset', 'mnist'], '--dataset: set by design mnist_ffn'),
    (['--study', 'mnist_ffn', '--widths', '0'], 'hidden must be > 0, got 0'),
    (['--study', 'mnist_ffn', '--gated-width', 'half'], "unknown gated_width 'half'; valid: same, matched"),
    (['--config', 'cpu', '--widths', '2'], '--widths go with a grid design (mnist_ffn), not a plain study'),
    (['--study', 'mnist_ffn', '--task', 'cifar'], None),
])
def test_grid_flags_are_checked(args, message, tmp_path, capsys):
    assert rae.main([*args, '--dry-run', '--results-dir', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and (message is None or message in err), err
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------- the study end to end

def run(tmp_path, data_dir, *extra):
    return rae.main(['--study', 'mnist_ffn', '--task', 'mnist1d', *FAST, '--data-dir', data_dir,
                       '--results-dir', str(tmp_path), *extra])


def test_study_end_to_end_resume_dry_run_report(mnist1d_dir, tmp_path, capsys):
    assert run(tmp_path, mnist1d_dir) == 0
    out = capsys.readouterr().out
    assert '12 trial(s) trained, 0 already done, 0 failed' in out
    root = tmp_path / 'mnist_ffn' / 'mnist1d' / 'gated_same'
    cells = sorted(os.listdir(root))
    assert cells == ['.sweep.lock', 'REPORT.md', 'h2_b64_lr0.001', 'h2_b64_lr0.01', 'plots', 'summary.json']
    for cell in ('h2_b64_lr0.001', 'h2_b64_lr0.01'):
        for act in ('relu', 'geglu'):
            assert sorted(os.listdir(root / cell / 'ffn' / act)) == [f'trial_{k}.{e}' for k in range(3) for e in ('json', 'npz')]
    s = json.loads((root / 'summary.json').read_text())
    assert s['kind'] == 'ffn_study' and s['activations'] == ['relu', 'geglu'] and s['seeds'] == [0, 1, 2]
    r = s['results'][0]
    assert r['width'] == 2 and r['params'] == {'relu': {'units': 2, 'n_params': 112},
                                                'geglu': {'units': 2, 'n_params': 194}}
    assert r['n_runs'] == r['n_grid_runs'] == 2 * 2 * 3
    # the numbers are the exact expectation over the runs in the files: recompute best-of-2 here
    runs = [json.load(open(p)) for p in sorted(glob.glob(str(root / '*' / 'ffn' / 'relu' / 'trial_*.json')))]
    val = np.array([x['metrics']['val_accuracy'] for x in runs])
    test = np.array([x['metrics']['test_accuracy'] for x in runs])
    # 6 runs per width: best-of-k is read only up to k = runs / 20, i.e. k = 1 (the mean run), and
    # the report says the intervals were checked at 20 seeds, not 3 (issue 23)
    assert s['k_limit'] == 1 and s['curve_ks'] == [1] and s['ks'] == [1]
    assert [w for w in s['warnings'] if w.startswith('3 seeds per cell') and 'checked by simulation at 20' in w]
    ev, et = best_of_k.expected_best_of_k(val, test, [1])
    q = s['curve_ks'].index(1)
    assert r['curves']['relu']['val'][q] == pytest.approx(ev[0]) and r['curves']['relu']['test'][q] == pytest.approx(et[0])
    assert ev[0] == pytest.approx(val.mean())
    lo, hi = r['curves']['relu']['val_ci'][q]
    assert lo <= hi and r['comparisons']['geglu']['test_diff'][q] == pytest.approx(
        r['curves']['geglu']['test'][q] - r['curves']['relu']['test'][q])
    assert r['pd']['cell'] in ('h2_b64_lr0.001', 'h2_b64_lr0.01') and r['pd']['activations']['relu']['relative_pd'] > 0
    report = (root / 'REPORT.md').read_text()
    assert '| 2 | 2 | 112 | 2 | 194 |' in report and '| 2 | 1 |' in report and '| 2 | 2 |' not in report.split('## Best-of-k')[1]
    assert 'test of selected' in report and 'stop at k = 1' in report
    for png in ('ffn_accuracy_vs_width.png', 'ffn_best_of_k.png', 'ffn_pd_vs_width.png'):
        assert (root / 'plots' / png).read_bytes()[:4] == b'\x89PNG'
    # every cell is an ordinary study folder for the analysis
    cell = analyze_results.analyze(str(root / 'h2_b64_lr0.01'), plots=False, verbose=False)
    assert [x['activation'] for x in cell['results']] == ['geglu', 'relu'] and cell['comparisons']
    # resume: nothing is trained again; the dry run lists every trial as done
    assert run(tmp_path, mnist1d_dir, '--no-analyze') == 0
    assert '0 trial(s) trained, 12 already done' in capsys.readouterr().out
    assert run(tmp_path, mnist1d_dir, '--dry-run') == 0
    assert capsys.readouterr().out.count('  done    ffn/') == 12
    # the dry run of more cells estimates them from the trials done (learning rate does not change time)
    assert run(tmp_path, mnist1d_dir, '--dry-run', '--lrs', '0.01', '0.001', '0.1') == 0
    out = capsys.readouterr().out
    assert out.count('  to run  ffn/') == 6 and 'no estimate' not in out
    assert 'estimated time (an estimate of time only, not of any result)' in out
    # the report and plots come from the folders alone: redo them through analyze_results' command line
    (root / 'summary.json').unlink()
    analyze_results.main(['--results-dir', str(root)])
    assert json.loads((root / 'summary.json').read_text())['results'] == s['results']
    analyze_results.main(['--results-dir', str(root), '--plots-only'])
    assert 'wrote 3 plots' in capsys.readouterr().out


def test_matched_arm_and_a_failed_trial(mnist1d_dir, tmp_path, capsys):
    # lr 1e30 makes every trial of that cell non-finite: failures are recorded in the cell's folder,
    # the other cells run, and the report counts the failed runs as draws that are never selected
    code = rae.main(['--study', 'mnist_ffn', '--task', 'mnist1d', '--widths', '2', '--batch-sizes', '64',
                       '--lrs', '0.01', '1e30', '--trials', '2', '--workers', '1', '--threads', '1',
                       '--gated-width', 'matched', '--data-dir', mnist1d_dir, '--results-dir', str(tmp_path)])
    assert code == 1
    root = tmp_path / 'mnist_ffn' / 'mnist1d' / 'gated_matched'
    with open(root / 'h2_b64_lr1e+30' / 'failures.jsonl') as f:
        fails = [json.loads(line) for line in f]
    assert len(fails) == 4 and all('non-finite' in x['error'] for x in fails)
    assert fails[0]['config']['learning_rate'] == 1e30 and fails[0]['study'].endswith('h2_b64_lr1e+30')
    s = json.loads((root / 'summary.json').read_text())
    assert s['gated_width'] == 'matched'
    assert s['results'][0]['params'] == {'relu': {'units': 2, 'n_params': 112}, 'geglu': {'units': 1, 'n_params': 102}}
    assert any('4 run(s) missing, counted as draws that are never selected' in w and 'failed: TrainingError' in w
               for w in s['warnings'])
    # half of the runs failed: best-of-1 is the mean of the finished runs, conditional on one finishing
    relu = [json.load(open(p))['metrics']['val_accuracy'] for p in glob.glob(str(root / '*' / 'ffn' / 'relu' / '*.json'))]
    assert len(relu) == 2 and s['results'][0]['curves']['relu']['val'][0] == pytest.approx(np.mean(relu))
    assert capsys.readouterr().err.count('error: 4 trial(s) failed') == 1


def test_mnist_task_through_the_engine_on_generated_idx_files(tiny_mnist, tmp_path):
    assert rae.main(['--study', 'mnist_ffn', '--task', 'mnist', '--widths', '2', '--batch-sizes', '8',
                       '--lrs', '0.01', '--trials', '2', '--workers', '1', '--threads', '1',
                       '--data-dir', tiny_mnist, '--results-dir', str(tmp_path)]) == 0
    root = tmp_path / 'mnist_ffn' / 'mnist' / 'gated_same'
    rec = json.loads((root / 'h2_b8_lr0.01' / 'ffn' / 'geglu' / 'trial_1.json').read_text())
    assert rec['config']['n_inputs'] == 784 and rec['metrics']['n_params'] == 784 * 4 + 4 + 2 * 10 + 10
    assert rec['data']['md5']['train-images-idx3-ubyte.gz'] == mnist.MNIST_FILES['train_images'][1]
    s = json.loads((root / 'summary.json').read_text())
    assert s['task'] == 'mnist' and s['results'][0]['params']['geglu']['n_params'] == 3170
