"""
Run a whole study from one command: every model x activation x trial through the trainer
(train.run_trial), then the analysis (analyze_results.analyze). This module is the command
line, the study designs, the plan (which jobs, which are done), the dry run and its time
estimate; sweep.py is the engine that runs the jobs (executors, lock, failure log).

    python run_all_experiments.py --config cpu                    # the default grid on the cpu preset
    python run_all_experiments.py --study seed_partial            # the original partial study (gpu preset)
    python run_all_experiments.py --study seed_full --dry-run     # what would run, what is done, how long
    python run_all_experiments.py --config cpu --workers 2 --models minigpt charlm --activations relu gelu
    python run_all_experiments.py --study seed_full --executor ray --ray-address auto --ray-num-gpus 0.25

Resume. A trial is done exactly when its result JSON exists and records the same identity
(task, model, activation, trial, vary, seeds, config: train.existing_trial); done trials are
skipped, --force reruns them. train.py writes a trial's .npz and then its JSON, each to a
hidden temp file renamed into place, so a sweep killed at any moment (Ctrl-C, SIGKILL, power)
leaves finished trials and nothing half-written; the next run finishes the grid. One sweep
at a time per study: <study>/.sweep.lock is held while it runs, and on start the sweep
removes temp files (.trial_*.tmp) that a killed run left behind.

Failures. A trial that raises (non-finite loss, out of memory, a bug), or whose worker
process dies, is appended to <study>/failures.jsonl (model, activation, trial, error,
traceback, time; one whole line per os.write, fsynced); the sweep goes on with the rest and
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
import difflib
import glob
import importlib
import json
import math
import os
import re
import sys
import time
from dataclasses import fields, replace

import torch

import analyze_results
import sweep
import train
from activation_names import ACTIVATION_NAMES, check_activation
from config import Config, Parser
from fileio import DataError, data_dir as resolve_data_dir
from model_factories import CLASSIFIER_NAMES, MODEL_NAMES, build_model, check_model, model_kind
from prepare_data import make_task
from sweep import RAY_INSTALL, job_name

PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))
BENCH_FIGURES = os.path.join(PROJECT_DIR, 'benchmarks', 'bench_sweep.json')

# ----------------------------------------------------------------------------- study designs

ORIGINAL_MODELS = ('charlm', 'tinylstm', 'minigpt', 'convlm', 'hybridlm', 'nanotransformer')
PARTIAL_ACTIVATIONS = ('smelu_05', 'smelu_1', 'relu', 'gelu', 'swish')

# A design sets the grid and the preset of a named study; explicit flags override them.
DESIGNS = {
    'seed_partial': dict(config='gpu', models=ORIGINAL_MODELS, activations=PARTIAL_ACTIVATIONS, trials=3,
                         about='the original partial study: 6 models x 5 activations x 3 trials, gpu preset'),
    'seed_full': dict(config='gpu_full', models=ORIGINAL_MODELS, activations=PARTIAL_ACTIVATIONS + ('swiglu',),
                      trials=3, about='the original full study: 6 models x 6 activations x 3 trials, gpu_full preset'),
    # 10 trials per group: enough for the dispersion test to detect a difference after Holm
    # over its 4 comparisons (3 trials cannot: README, "The analysis"); ~30 min on 2 CPU cores
    'cpu_power': dict(config='cpu', models=('minigpt', 'tinylstm'), activations=('relu', 'gelu', 'smelu_1'),
                      trials=10, about='2 models x relu/gelu/smelu_1 x 10 trials, cpu preset: a CPU study '
                                       'that can reach a verdict'),
}
# Without a design: this grid on --config (default cpu).
DEFAULT_GRID = dict(config='cpu', models=ORIGINAL_MODELS, activations=PARTIAL_ACTIVATIONS, trials=3)
# Studies with a runner of their own: `--study NAME` hands the whole command line to MODULE.main(argv).
DISPATCHED = {
    'mnist_ffn': dict(module='mnist', about='FFN GeGLU vs ReLU on MNIST / MNIST-1D with best-of-k search '
                                            '(issue 7; flags: python mnist.py --help)'),
}
STUDY_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*$')


def study_names():
    return list(DESIGNS) + list(DISPATCHED)


# ----------------------------------------------------------------------------- time estimate

_NOT_TIMING = ('seed_base', 'eval_seed', 'dataset')  # do not change how long a trial takes


def _timing_key(config_dict):
    return json.dumps({k: v for k, v in sorted(config_dict.items()) if k not in _NOT_TIMING})


def _earlier_times(results_dir, key):
    """[(model, activation, seconds, threads, where)] of earlier measured trials with this
    config, from every study under results_dir and from the benchmark figures file."""
    found = []
    for path in glob.glob(os.path.join(results_dir, '*', '*', '*', 'trial_*.json')):
        try:
            with open(path) as f:
                rec = json.load(f)
            t = rec['metrics']['total_time']
            if rec.get('source') == 'measured' and _timing_key(rec['config']) == key and math.isfinite(t):
                found.append((rec['model'], rec['activation'], float(t),
                              rec.get('provenance', {}).get('threads'), os.path.dirname(os.path.dirname(
                                  os.path.dirname(path)))))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    try:
        with open(BENCH_FIGURES) as f:
            for t in json.load(f).get('trials', []):
                if _timing_key(t['config']) == key and math.isfinite(t['total_time']):
                    found.append((t['model'], t['activation'], float(t['total_time']), t.get('threads'),
                                  _show_path(BENCH_FIGURES)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return found


def estimate(plan):
    """(per-trial seconds or None for each trial to run, a sentence saying where they come
    from). Times only: measured wall times of earlier trials, never a result."""
    found = _earlier_times(plan['results_dir'], _timing_key(plan['config'].to_dict()))
    same_threads = [f for f in found if f[3] == plan['threads']]
    used = same_threads or found
    by_pair, by_model = {}, {}
    for m, a, t, _, _ in used:
        by_pair.setdefault((m, a), []).append(t)
        by_model.setdefault(m, []).append(t)
    per, n_pair, n_model = [], 0, 0
    for j in plan['to_run']:
        ts = by_pair.get((j['model'], j['activation']))
        if ts:
            n_pair += 1
        else:
            ts = by_model.get(j['model'])
            n_model += bool(ts)
        per.append(sum(ts) / len(ts) if ts else None)
    if not used:
        return per, (f"no estimate: no earlier trial with this config in {plan['results_dir']} or "
                     f"{_show_path(BENCH_FIGURES)} (train one trial, or run benchmarks/bench_sweep.py)")
    wheres = sorted({w for *_, w in used})
    threads = sorted({str(f[3]) for f in used})
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
{chr(10).join(f'  {k:13s} {v["about"]}' for k, v in DISPATCHED.items())}
  any other name is a plain results folder for the grid given by the flags (default:
  {len(DEFAULT_GRID['models'])} models {' '.join(DEFAULT_GRID['models'])}
  x {len(DEFAULT_GRID['activations'])} activations {' '.join(DEFAULT_GRID['activations'])} x {DEFAULT_GRID['trials']} trials
  on --config, default cpu; results go to <results-dir>/<study>, --study defaulting to the preset's name).
  A design only sets defaults: flags given explicitly (--config, --models, --activations,
  --trials, any config override such as --max_iters) override the design's values; the sweep
  prints the overrides, and every trial JSON records its full config.

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
    parser.add_argument('--trials', type=int, default=None, help='trials per pair (default: 3)')
    parser.add_argument('--workers', type=int, default=None,
                        help='trials at once, in separate processes (default: 1 on CPU; on CUDA, '
                             'visible devices x --trials-per-gpu)')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads per trial (default: cores // workers). Results are bitwise '
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


def make_plan(args):
    """Validate everything and work out the sweep; raises ValueError or DataError with a
    one-line message before anything is trained or written."""
    design = DESIGNS.get(args.study)
    base = design or DEFAULT_GRID
    overrides = [f'--{k}' for k in ('config', 'models', 'activations', 'trials') if getattr(args, k) is not None]
    overrides += [f'--{f.name} {getattr(args, f.name)}' for f in fields(Config) if getattr(args, f.name) is not None]
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

    devices, workers, threads, ray, execution = sweep.layout(
        args.executor, args.device, args.workers, args.threads, args.trials_per_gpu,
        args.ray_address, args.ray_num_cpus, args.ray_num_gpus)

    # the data: fixes vocab_size etc., which are part of every trial's identity
    data_dir = os.path.abspath(resolve_data_dir(args.data_dir))
    task = make_task(config, data_dir)
    full = replace(config, **task.config_updates())
    kind_models = MODEL_NAMES if task.kind == 'lm' else CLASSIFIER_NAMES
    models = _pick_names(args.models, base['models'] if task.kind == 'lm' else CLASSIFIER_NAMES,
                         kind_models, check_model, 'models')
    for m in models:
        if model_kind(m) != task.kind:
            raise ValueError(f"model {m!r} trains on {model_kind(m)} data, but dataset {config.dataset!r} is a "
                             f"{task.kind} task; models for it: {', '.join(kind_models)}")
    for m in models:  # every pair must be buildable at this config: cheap on the meta device
        for a in activations:
            try:
                with torch.device('meta'):
                    build_model(m, a, full, seed=0)
            except ValueError as e:
                raise ValueError(f"{m}/{a} cannot be built with this config: {e}") from None
            except Exception:  # noqa: BLE001 -- a model the meta device can't build: the trial will tell
                pass

    results_dir = os.path.abspath(args.results_dir)
    study_dir = os.path.join(results_dir, study)
    opts = train.run_options(args, results_dir=results_dir, data_dir=data_dir, threads=threads, progress=False)
    jobs = [{'model': m, 'activation': a, 'trial': k, 'study': study, 'config': config}
            for m in models for a in activations for k in range(trials)]
    to_run, done, conflicts = [], [], []
    tasks = {_config_key(config): task}
    for job in jobs:
        path, state = trial_state(job, opts, tasks)
        if state == 'done' and not args.force:
            done.append(job)
        else:
            to_run.append(job)
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
    return {'design': args.study if design else None, 'overrides': overrides, 'note': note, 'study': study,
            'study_dir': study_dir, 'results_dir': results_dir, 'config': full, 'preset': args.config,
            'models': models, 'activations': activations, 'trials': trials, 'to_run': to_run, 'done': done,
            'opts': opts, 'slots': [replace(opts, device=d) for d in devices], 'workers': workers,
            'threads': threads, 'execution': execution, 'executor': args.executor, 'ray': ray, 'vary': args.vary}


def _config_key(config):
    return json.dumps(config.to_dict(), sort_keys=True)


def trial_state(job, opts, tasks):
    """(result path, train.existing_trial state) of a job, checked against the job's own
    config and study; `tasks` caches the Task of each config."""
    key = _config_key(job['config'])
    if key not in tasks:
        tasks[key] = make_task(job['config'], opts.data_dir)
    task = tasks[key]
    full = replace(job['config'], **task.config_updates())
    path = train.trial_path(opts.results_dir, job['study'], job['model'], job['activation'], job['trial'])
    return path, train.existing_trial(path, train.trial_identity(task, job['model'], job['activation'],
                                                                 job['trial'], opts.vary, full))


def describe(plan):
    n = len(plan['to_run']) + len(plan['done'])
    what = (f"design {plan['design']}" if plan['design'] else f"study {plan['study']}") + f": preset {plan['preset']}"
    if plan['overrides']:
        what += f" (overrides: {', '.join(plan['overrides'])})"
    lines = [what,
             f"  {len(plan['models'])} model(s) x {len(plan['activations'])} activation(s) x {plan['trials']} "
             f"trial(s) = {n}: {len(plan['done'])} done, {len(plan['to_run'])} to run; vary {plan['vary']}"
             + ('; deterministic' if plan['opts'].deterministic else ''),
             f"  models: {' '.join(plan['models'])}; activations: {' '.join(plan['activations'])}",
             f"  {plan['execution']}; results in {plan['study_dir']}"]
    if plan['note']:
        lines.insert(0, plan['note'])
    return '\n'.join(lines)


def dry_run(plan):
    print(describe(plan))
    per, source = estimate(plan)
    width = max([len(job_name(j)) for j in plan['to_run'] + plan['done']] + [10])
    for job, s in zip(plan['to_run'], per):
        print(f"  to run  {job_name(job):{width}s}  " + (f"~{_fmt_seconds(s)}" if s is not None else 'no estimate'))
    for job in plan['done']:
        print(f"  done    {job_name(job):{width}s}  " +
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


def analyze_study(plan, args):
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
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument('--study')
    known, _ = pre.parse_known_args(argv)
    if known.study in DISPATCHED:  # a study with its own runner gets the whole command line
        module = importlib.import_module(DISPATCHED[known.study]['module'])
        module.main(argv)
        return 0

    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        plan = make_plan(args)
    except (ValueError, DataError) as e:
        parser.exit(2, f"error: {' '.join(str(e).split())}\n")
    if args.dry_run:
        return dry_run(plan)

    try:
        lock = sweep.StudyLock(plan['study_dir'])
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    try:
        print(describe(plan), flush=True)
        strays = sweep.remove_stray_temp_files(plan['study_dir'])  # we hold the lock
        if strays:
            print(f"removed {strays} temp file(s) left by an interrupted run")
        t0 = time.time()
        finished, failed, interrupted = sweep.run_sweep(plan, sweep.make_executor(plan))
        wall = time.time() - t0
    finally:
        lock.release()

    if interrupted:
        left = len(plan['to_run']) - len(finished) - len(failed)
        print(f"interrupted: {len(finished)} trial(s) finished in this run"
              + (f" ({', '.join(map(job_name, finished))})" if finished else '')
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
        print(f"error: {len(failed)} trial(s) failed: {', '.join(map(job_name, failed))}; errors and tracebacks in "
              f"{os.path.join(plan['study_dir'], 'failures.jsonl')}", file=sys.stderr)
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
    sys.exit(main())
