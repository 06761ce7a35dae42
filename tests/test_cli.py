"""The command lines tell the truth at a glance (issue 16): every name and value checked before
the first trial, OS errors as one line, a memory estimate that refuses what cannot fit,
--compare of same-named studies, the report's opening block, one exit-code convention,
--help, --dry-run without data, progress lines for logs, a prompt Ctrl-C."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

import analyze_results
import cli
import plot_utils
import plan as planning
import run_info
import store
import run_all_experiments as sweep
import train
from config import Config, get_config
from conftest import ROOT, cpu_seconds, limit, trial_path, wait_for
from model_factories import MODEL_NAMES, check_memory, estimate_memory
from report import mean_std, timing_cell, timing_note

TINY = ['--n_layer', '1', '--n_embd', '16', '--n_head', '2', '--block_size', '16', '--batch_size', '4',
        '--max_iters', '4', '--eval_interval', '2', '--eval_iters', '2', '--n_eval', '20', '--threads', '1']
GRID = ['--models', 'minigpt', '--activations', 'relu', 'gelu', '--trials', '2', '--study', 'cpu']


@pytest.fixture(scope='module')
def studies(corpus, tmp_path_factory):
    """Two studies named cpu in two folders: a (max_iters 4) and b (max_iters 6, learning_rate
    1e-3); 1 model x 2 activations x 2 trials each, not analysed."""
    root = tmp_path_factory.mktemp('studies')
    assert sweep.main([*GRID, *TINY, '--data', corpus, '--results-dir', str(root / 'a'), '--no-analyze']) == 0
    assert sweep.main([*GRID, *TINY, '--max_iters', '6', '--learning_rate', '0.001', '--data', corpus,
                       '--results-dir', str(root / 'b'), '--no-analyze']) == 0
    return root


def one_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in text, text
    return lines[0]


# ----------------------------------------------------------------------------- item 1: checked before the first trial

def test_unknown_baseline_fails_before_any_trial(corpus, tmp_path, capsys):
    results = tmp_path / 'r'
    assert sweep.main([*GRID, *TINY, '--data', corpus, '--results-dir', str(results), '--baseline', 'foo']) == 2
    err = one_line(capsys.readouterr().err)
    assert "--baseline 'foo' is not an activation of this study; valid: gelu, relu" in err
    assert not results.exists()  # nothing trained, nothing written
    assert sweep.main([*GRID, *TINY, '--data', corpus, '--results-dir', str(results), '--baseline', 'gelu',
                       '--no-analyze']) == 2
    assert '--no-analyze turns off' in one_line(capsys.readouterr().err) and not results.exists()


def test_a_baseline_among_the_saved_trials_is_accepted(studies, corpus, capsys):
    # the analysis reads every trial of the folder: a baseline saved there but not in this grid is valid
    args = ['--models', 'minigpt', '--activations', 'relu', '--trials', '2', *TINY, '--data', corpus,
            '--results-dir', str(studies / 'a'), '--baseline', 'gelu', '--dry-run']
    assert sweep.main(args) == 0


# ----------------------------------------------------------------------------- item 2: OS errors

@pytest.mark.parametrize('script', ['train.py', 'run_all_experiments.py', 'analyze_results.py'])
def test_a_results_path_under_a_regular_file_is_one_line(script, studies, corpus, tmp_path, procs):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    under = str(blocker / 'results')
    args = {'train.py': ['--model', 'minigpt', '--activation', 'relu', '--trials', '1', *TINY, '--data', corpus,
                         '--results-dir', under],
            'run_all_experiments.py': [*GRID, *TINY, '--data', corpus, '--results-dir', under],
            'analyze_results.py': ['--results-dir', str(studies / 'a' / 'cpu'), '--plots-dir', under]}[script]
    p = procs.run([sys.executable, script, *args], limit())
    line = one_line(p.stderr)
    assert p.returncode == cli.EXIT_FAILURE
    assert line.startswith('error: ') and f"{blocker} is a file, not a folder" in line
    assert blocker.read_text() == 'not a folder'


def test_a_sweep_records_an_os_error_on_a_trial_and_goes_on(corpus, tmp_path, monkeypatch, capsys):
    real = store.atomic_write

    def full_disk(path, write, check=None):
        if os.sep + 'gelu' + os.sep in path:
            raise OSError(28, 'No space left on device', path)
        return real(path, write, check)
    monkeypatch.setattr(store, 'atomic_write', full_disk)
    results = tmp_path / 'r'
    assert sweep.main([*GRID, *TINY, '--data', corpus, '--results-dir', str(results), '--no-analyze']) == 1
    captured = capsys.readouterr()
    assert 'Traceback' not in captured.out + captured.err
    with open(results / 'cpu' / 'failures.jsonl') as f:
        failed = [json.loads(line) for line in f]
    assert sorted((r['activation'], r['trial']) for r in failed) == [('gelu', 0), ('gelu', 1)]
    assert all('No space left on device' in r['error'] for r in failed)
    assert all(os.path.exists(trial_path(str(results), 'cpu', 'minigpt', 'relu', k)) for k in (0, 1))


# ----------------------------------------------------------------------------- item 3: memory, progress, Ctrl-C

def test_a_run_that_cannot_fit_in_memory_is_refused(corpus, tmp_path, capsys):
    results = tmp_path / 'r'
    with pytest.raises(SystemExit) as e:
        train.main(['--model', 'minigpt', '--activation', 'relu', '--block_size', '100000', '--data', corpus,
                    '--results-dir', str(results)])
    err = one_line(capsys.readouterr().err)
    assert e.value.code == cli.EXIT_USAGE and 'not enough memory' in err and 'block_size 100000' in err
    assert ' GB' in err and 'available' in err
    assert sweep.main([*GRID, '--block_size', '100000', '--data', corpus, '--results-dir', str(results)]) == 2
    assert 'not enough memory' in one_line(capsys.readouterr().err)
    assert not results.exists()


def test_the_presets_main_job_is_not_refused():
    config = get_config('cpu', vocab_size=65)
    est, avail = check_memory([(m, 'swiglu') for m in MODEL_NAMES], config, torch.device('cpu'))
    assert 50 * 2 ** 20 < est['total'] < 2 ** 30
    # attention scores grow with the square of the block, activations linearly
    e1, e2 = (estimate_memory('minigpt', 'relu', get_config('cpu', vocab_size=65, block_size=t)) for t in (128, 256))
    assert e2['parts']['attention scores'] == 4 * e1['parts']['attention scores']
    assert e2['parts']['activations'] == 2 * e1['parts']['activations']


class Clock:
    """A stand-in for cli's `time`: the seconds a test says have passed, at any machine speed."""
    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


def test_progress_lines_for_logs(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(cli, 'time', clock)
    out = io.StringIO()
    log = cli.ProgressLog('m/a trial 0', total=10 ** 6, evals_total=11, every=30.0, warmup=2, stream=out)
    assert log.enabled  # a StringIO is not a terminal
    log.update(1, 2.5, 0.0, 1)
    assert out.getvalue() == ''
    clock.now += 0.01
    log.update(2, 2.4, 0.0, 1)
    assert 'm/a trial 0: projected trial time ~' in out.getvalue() and '1000000 steps' in out.getvalue()
    assert '(5 ms per step' in out.getvalue()  # 10 ms over 2 steps
    clock.now += 29
    log.update(3, 2.3, 0.0, 1)
    assert out.getvalue().count('\n') == 1  # not again before 30 s
    clock.now += 2
    log.update(4, 2.25, 0.0, 1)
    assert 'iteration 4/1000000, loss 2.2500, ~' in out.getvalue().splitlines()[-1]
    quiet = io.StringIO()  # a trial that ends within 30 s prints no projection
    short = cli.ProgressLog('m/a trial 1', total=10, evals_total=2, warmup=2, stream=quiet)
    for it in range(1, 11):
        clock.now += 2.9  # 29 s in all
        short.update(it, 2.0, 0.0, 1)
    assert quiet.getvalue() == ''


def test_progress_lines_of_a_resumed_trial_measure_from_the_resume(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(cli, 'time', clock)
    out = io.StringIO()  # resumed at iteration 500000 with 100 s of evaluation behind it
    log = cli.ProgressLog('m/a trial 0', total=10 ** 6, evals_total=11, every=30.0, warmup=2, stream=out,
                          start=500_000, start_eval_time=100.0)
    log.update(500_001, 2.5, 100.0, 6)
    clock.now += 0.01
    log.update(500_002, 2.4, 100.0, 6)
    text = out.getvalue()
    assert 'm/a trial 0: resumed at iteration 500000: projected time of the rest ~' in text, text
    # 10 ms over the 2 steps of this run (not over 500002 steps, nor less the earlier evaluations)
    assert float(text.split('(')[1].split(' ms per step')[0]) == 5


def test_ctrl_c_stops_even_inside_a_long_torch_operation(tmp_path, procs):
    script = tmp_path / 'stuck.py'
    script.write_text(f"import sys, torch\nsys.path.insert(0, {ROOT!r})\nimport cli\ntorch.set_num_threads(1)\n"
                      "cli.stop_promptly_on_ctrl_c(grace=1.0)\na = torch.rand(2000, 2000)\nprint('ready', flush=True)\n"
                      "torch.linalg.matrix_power(a, 2 ** 40)  # one call: ~40 matmuls, many seconds\n"
                      "print('finished', flush=True)\n")
    p = procs.start([sys.executable, str(script)], limit(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True)
    assert p.stdout.readline().strip() == 'ready'
    # inside the call once it has used CPU time after 'ready' (nothing else runs): an event
    # of the process itself, whatever the machine's load
    used = cpu_seconds(p.pid)
    wait_for(lambda: cpu_seconds(p.pid) > used + 0.5, limit(), 'the long operation under way', proc=p)
    p.send_signal(signal.SIGINT)
    out, err = procs.communicate(p)
    assert p.returncode == cli.EXIT_INTERRUPT and 'finished' not in out
    assert 'did not stop within 1 s' in one_line(err)


def test_ctrl_c_during_a_trial_exits_130_and_leaves_no_result(corpus, tmp_path, procs):
    p = procs.start([sys.executable, 'train.py', '--model', 'minigpt', '--activation', 'relu', '--trials', '1',
                     *TINY, '--max_iters', '1000000', '--data', corpus, '--results-dir', str(tmp_path)],
                    limit(trials=1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()  # not a terminal: the projected time comes after the first steps
    assert 'minigpt/relu trial 0: projected trial time' in line, line
    p.send_signal(signal.SIGINT)
    _, err = procs.communicate(p)
    assert p.returncode == cli.EXIT_INTERRUPT
    assert 'interrupted: minigpt/relu trial 0 stopped and left no result' in one_line(err)
    # only the mid-trial checkpoint (one every 2 steps) that the same command resumes from
    assert sorted(f for _, _, fs in os.walk(tmp_path) for f in fs) == ['.sweep.lock', '.trial_0.ckpt', '.trial_0.ckpt.json']


# ----------------------------------------------------------------------------- items 4, 5, 6: compare, report, timing

def test_compare_of_two_same_named_studies(studies, tmp_path, capsys):
    c = analyze_results.compare_studies(str(studies / 'a' / 'cpu'), str(studies / 'b' / 'cpu'),
                                        out_dir=str(tmp_path / 'cmp'))
    assert (c['study_a'], c['study_b']) == (os.path.join('a', 'cpu'), os.path.join('b', 'cpu'))
    diffs = {k: (a, b) for k, a, b in c['config_differences']}
    assert diffs == {'max_iters': ('4', '6'), 'learning_rate': ('0.0003', '0.001')}
    md = (tmp_path / 'cmp' / 'COMPARE.md').read_text()
    assert md.startswith(f"# a{os.sep}cpu vs b{os.sep}cpu")
    assert md.index('Not like for like') < md.index('| model | activation |')
    assert '| max_iters | 4 | 6 |' in md and '| learning_rate | 0.0003 | 0.001 |' in md
    assert 'not like for like' in capsys.readouterr().err
    assert run_info.study_labels('x/cpu', 'y/gpu') == ('cpu', 'gpu')


def test_the_report_opens_with_what_was_run(studies, tmp_path):
    study = tmp_path / 'cpu'
    shutil.copytree(studies / 'b' / 'cpu', study)
    summary = analyze_results.analyze(str(study), verbose=False)
    report = (study / 'REPORT.md').read_text()
    head = report[:report.index('## Warnings')]
    assert report.startswith('# Reproducibility report: cpu\n\n## What was run')
    assert "Preset `cpu`" in head and '`max_iters 6`' in head and '`learning_rate 0.001`' in head
    for field in ('n_layer 1', 'n_embd 16', 'block_size 16', 'batch_size 4', 'eval_iters 2', 'n_eval 20'):
        assert f'`{field}`' in head
    assert 'vocab_size' not in head  # fixed by the data, not an override
    assert '4 trials: 1 model(s) x 2 activation(s) x 2 trial(s)' in head and 'threads per trial: 1' in head
    assert 'git commit' in head and 'Time per trial: all-in' in head
    info = summary['study_info']
    assert info['preset'] == 'cpu' and info['overrides']['max_iters'] == 6
    title = plot_utils.study_title(summary)
    assert title.startswith('study cpu, preset cpu (overrides: ') and 'max_iters 6' in title
    for fig in plot_utils.figures(summary).values():
        assert any('max_iters 6' in t.get_text() for t in fig.texts)
    # the time column: labelled, all-in seconds, two significant digits of the std
    assert 'time per trial, all-in (s)' in report
    assert mean_std(95.5072, 4.4577) == '95.5 ± 4.5'
    assert mean_std(44.1234, 0.3123) == '44.12 ± 0.31'
    assert mean_std(122.3333, None) == '122'


def test_the_timing_note_says_when_threads_differ():
    info = {'threads': ['1', '2'], 'devices': ['cpu (x86_64)'], 'groups_mixing_threads': ['minigpt/relu']}
    note = timing_note(info)
    assert '2 thread counts (1, 2)' in note and 'not comparable' in note and '†' in note
    row = {'model_name': 'minigpt', 'activation': 'relu', 'trial_stats': {'total_time': {'mean': 3.0, 'std': 0.5}}}
    assert timing_cell(row, info) == '3.00 ± 0.50 †'


# ----------------------------------------------------------------------------- items 7, 8, 9, 10

def test_exit_codes_match_across_scripts_for_a_config_conflict(studies, corpus, capsys):
    results = str(studies / 'a')
    with pytest.raises(SystemExit) as e:
        train.main(['--model', 'minigpt', '--activation', 'relu', '--trials', '2', *TINY, '--max_iters', '5',
                    '--data', corpus, '--results-dir', results, '--study', 'cpu'])
    train_err = one_line(capsys.readouterr().err)
    code = sweep.main([*GRID, *TINY, '--max_iters', '5', '--data', corpus, '--results-dir', results])
    sweep_err = one_line(capsys.readouterr().err)
    assert e.value.code == code == cli.EXIT_USAGE
    assert 'max_iters: 4 -> 5' in train_err and 'max_iters: 4 -> 5' in sweep_err


def test_a_rerun_of_finished_trials_says_skipped(studies, corpus, capsys):
    before = {p: os.path.getmtime(p) for p in (trial_path(str(studies / 'a'), 'cpu', 'minigpt', 'relu', k)
                                               for k in (0, 1))}
    train.main(['--model', 'minigpt', '--activation', 'relu', '--trials', '2', *TINY, '--data', corpus,
                '--results-dir', str(studies / 'a'), '--study', 'cpu'])
    out = capsys.readouterr().out
    assert out.count('already done (skipped)') == 2 and '(0 trained, 2 already done)' in out
    assert 's all-in' not in out  # not the line of a trial that trained
    assert {p: os.path.getmtime(p) for p in before} == before


def test_dry_run_reads_no_data(studies, corpus, tmp_path, monkeypatch, capsys):
    def no_data(*a, **k):
        raise AssertionError('a dry run read the data')
    monkeypatch.setattr(planning, 'make_task', no_data)
    base = [*GRID, *TINY, '--data', corpus, '--dry-run']
    assert sweep.main([*base, '--results-dir', str(studies / 'a')]) == 0
    out = capsys.readouterr().out
    assert '4: 4 done, 0 to run' in out and 'from the saved trials' in out
    # another iteration count: the time comes from the measured time per step and per evaluation
    assert sweep.main([*base, '--max_iters', '8', '--study', 'longer', '--results-dir', str(studies / 'a')]) == 0
    out = capsys.readouterr().out
    to_run = [ln for ln in out.splitlines() if ln.startswith('  to run ')]
    assert len(to_run) == 4 and all('~' in ln for ln in to_run)
    assert 'scaled by their measured time per step and per evaluation' in out
    # no saved trial, no corpus (an empty data folder): the sizes are unknown and said to be
    empty = tmp_path / 'data'
    empty.mkdir()
    assert sweep.main(['--models', 'minigpt', '--activations', 'relu', '--data-dir', str(empty),
                       '--results-dir', str(tmp_path / 'r'), '--dry-run']) == 0
    out = capsys.readouterr().out
    assert 'vocab_size unknown' in out and not os.listdir(empty) and not (tmp_path / 'r').exists()
    for line in out.splitlines():  # never an "estimated time" without a number
        assert not line.startswith('estimated time') or '~' in line


def test_help_describes_every_config_field_and_lists_names(capsys, procs):
    with pytest.raises(SystemExit):
        train.main(['--help'])
    out = ' '.join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in fields(Config):
        assert ' '.join(f.metadata['help'].split()) in out, f.name
    assert '(default 128; gpu 256, gpu_full 384)' in out  # n_embd in every preset that changes it
    assert 'one of charlm, tinylstm, minigpt' in out and 'smelu_<beta>' in out
    assert 'exit status: 0 done; 1 a failure while running' in out
    p = procs.run([sys.executable, 'model_factories.py', '--help'], limit())
    assert p.returncode == 0 and '--n_embd' in p.stdout and '--max_iters' not in p.stdout
    assert '--learning_rate' not in p.stdout


def test_a_sweep_prints_one_closing_summary(studies, tmp_path, corpus, capsys):
    results = tmp_path / 'r'
    shutil.copytree(studies / 'a', results)
    assert sweep.main([*GRID, *TINY, '--data', corpus, '--results-dir', str(results)]) == 0
    out = capsys.readouterr().out
    closing = [ln for ln in out.splitlines() if 'trial(s) trained' in ln or 'analys' in ln]
    assert len(closing) == 1, out
    assert closing[0].startswith('0 trial(s) trained, 4 already done, 0 failed') and 'REPORT.md' in closing[0]


def test_help_and_usage_errors_load_no_torch(procs):
    """--help and a usage error answer before torch (or scipy) is imported (issue 20)."""
    for argv in (['--help'], ['--max-iter', '3'], ['--models', 'nosuch']):
        p = procs.run([sys.executable, '-X', 'importtime', 'run_all_experiments.py', *argv], limit())
        imported = [ln.split('|')[-1].strip() for ln in p.stderr.splitlines() if ln.startswith('import time:')]
        assert imported and not [m for m in imported if m.split('.')[0] in ('torch', 'scipy')], argv
        assert p.returncode == (0 if argv == ['--help'] else 2), (argv, p.stderr[-300:])
