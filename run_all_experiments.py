"""
Run a whole study from one command: every model x activation x trial through the trainer
(train.run_trial), then the analysis (analyze_results.analyze). This module is the command
line, the plan (which jobs, which are done), the dry run and its time estimate; designs.py
holds the study designs and makes their jobs; sweep.py is the engine that runs the jobs
(executors, lock, failure log).

    python run_all_experiments.py --config cpu                    # the default grid on the cpu preset
    python run_all_experiments.py --study seed_partial            # the original partial study (gpu preset)
    python run_all_experiments.py --study seed_full --dry-run     # what would run, what is done, how long
    python run_all_experiments.py --config cpu --workers 2 --models minigpt charlm --activations relu gelu
    python run_all_experiments.py --study seed_full --executor ray --ray-address auto --ray-num-gpus 0.25
    python run_all_experiments.py --study mnist_ffn --task mnist1d --gated-width matched  # the FFN study

Resume. A trial is done exactly when its result JSON exists, records the same identity
(task, model, activation, trial, vary, seeds, config: trial_files.existing_trial) and its .npz
matches the hash the JSON records; done trials are skipped, --force reruns them. A damaged
trial (unreadable JSON, .npz missing or changed) is reported, its files are moved to
<study>/damaged/<time>/ and it is trained again. train.py writes a trial's .npz and then its
JSON, each to a hidden temp file renamed into place, and a checkpoint (.trial_<k>.ckpt)
every --checkpoint-every iterations, so a sweep killed at any moment (Ctrl-C, SIGKILL, power)
leaves finished trials, checkpoints of running ones and nothing half-written; the next run
finishes the grid, each interrupted trial continuing from its checkpoint. One sweep at a time
per study: <study>/.sweep.lock is held while it runs, and on start the sweep removes temp
files (.trial_*.tmp, ..trial_*.ckpt*.tmp) that a killed run left behind.

Failures. A trial that raises (non-finite loss, out of memory, a bug), or whose worker
process dies, is appended to <study>/failures.jsonl (a grid design: the cell's folder; model,
activation, trial, config, error, traceback, time; one whole line per os.write, fsynced); the
sweep goes on with the rest and
exits 1 at the end naming the failed trials. Ctrl-C stops the running trials (they leave no
result, only their last checkpoint), says what finished, and exits 130; the same command
resumes. A worker that dies mid-trial leaves its checkpoint too: the retry continues from it.

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
import json
import os
import re
import sys
import time
from dataclasses import fields, replace
from types import SimpleNamespace

import torch

import analyze_results
import checkpoint
import cli
import sweep
import train
import trial_files
from activation_names import ACTIVATION_NAMES, check_activation
from config import Config, Parser
from designs import DEFAULT_GRID, DESIGNS, GRID_FLAGS, cells as plan_cells, jobs as plan_jobs, study_names
from fileio import DataError, data_dir as resolve_data_dir
from model_factories import CLASSIFIER_NAMES, MODEL_NAMES, build_model, check_memory, check_model, model_kind
from prepare_data import CLASSIFICATION, make_task
from sweep import RAY_INSTALL, job_name
from time_estimate import estimate, show_path as _show_path

STUDY_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*$')


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

resume: a trial is skipped when its JSON exists with the same config and seeds and its .npz
  is whole (--force reruns it); a damaged one is moved to <study>/damaged/ and trained again;
  a result with a different config stops the sweep before any training. A trial killed
  mid-way continues from its checkpoint (--checkpoint-every; --force starts it over).
failures go to <study>/failures.jsonl (a grid design: each cell's); the sweep goes on and exits 1 naming them.
before the first trial: names and values (the analysis's --baseline too), the device and
  dtype, the results folder, and memory (an estimate against what the device has available).
--dry-run reads no data (sizes the data fixes come from the study's saved trials).
Ray is optional: {RAY_INSTALL}
{cli.exit_help()}"""


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
                        help='torch CPU threads per trial (default: cores // workers; 1 for mnist_ffn). Results '
                             'are bitwise identical across different --workers only at the same --threads')
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
    # a grid design: one cell (its own study folder) per combination of the grid's values
    root, cells = plan_cells(design, config, {k: getattr(args, flag) for k, flag in GRID_FLAGS.items()})

    devices, workers, threads, ray, execution = sweep.layout(
        args.executor, args.device, args.workers, args.threads, args.trials_per_gpu,
        args.ray_address, args.ray_num_cpus, args.ray_num_gpus, tiny_trials=base.get('tiny_trials', False))
    if ray is None:
        train.autocast_dtype(args.dtype, torch.device(devices[0]))  # float16 on CPU: refused now

    kind = 'classification' if config.dataset in CLASSIFICATION else 'lm'  # as make_task decides
    kind_models = MODEL_NAMES if kind == 'lm' else CLASSIFIER_NAMES
    models = _pick_names(args.models, base['models'] if kind == 'lm' else CLASSIFIER_NAMES,
                         kind_models, check_model, 'models')
    for m in models:
        if model_kind(m) != kind:
            raise ValueError(f"model {m!r} trains on {model_kind(m)} data, but dataset {config.dataset!r} is a "
                             f"{kind} task; models for it: {', '.join(kind_models)}")
    for name, cfg in cells:  # every pair must be buildable at every config: cheap on the meta device
        for m in models:
            for a in activations:
                try:
                    with torch.device('meta'):
                        build_model(m, a, train.lower_bound_config(cfg), seed=0)
                except ValueError as e:
                    raise ValueError(f"{m}/{a} cannot be built with this config"
                                     f"{' (cell ' + name + ')' if name else ''}: {e}") from None
                except Exception:  # noqa: BLE001 -- a model the meta device can't build: the trial will tell
                    pass
    results_dir = os.path.abspath(args.results_dir)
    study_dir = os.path.join(results_dir, study, *([root] if root else []))
    check_analysis_args(args, activations, study_dir, grid=bool(grid))
    # memory before the data: an impossible block_size makes GBs of evaluation windows
    plan_memory(models, activations, [cfg for _, cfg in cells], ray, devices)

    # the data: fixes vocab_size etc., which are part of every trial's identity. A dry run reads
    # none: it takes those fields from the study's saved trials, or says they are unknown
    data_dir = os.path.abspath(resolve_data_dir(args.data_dir))
    tasks = {}  # a Task per config (a grid: per cell), made here: trial_state makes no other
    if args.dry_run:
        saved = saved_data_fields(study_dir, kind, [cfg for _, cfg in cells])
        for (_, cfg), got in zip(cells, saved):
            tasks[_config_key(cfg)] = SimpleNamespace(kind=kind, config_updates=lambda got=got: got)
        known = [got for got in saved if got]
        data_note = (f"data not read (dry run): {', '.join(f'{k} {v}' for k, v in known[0].items())} from the saved "
                     f"trials" if known else "data not read (dry run) and no trial saved yet: vocab_size unknown")
        if known and len(known) < len(saved):
            data_note += f" ({len(saved) - len(known)} of {len(saved)} cells have none saved yet: sizes unknown)"
    else:
        tasks = {_config_key(cfg): make_task(cfg, data_dir) for _, cfg in cells}
        data_note = None
    fulls = {_config_key(cfg): replace(cfg, **tasks[_config_key(cfg)].config_updates()) for _, cfg in cells}
    full = fulls[_config_key(cells[0][1])]
    memory = plan_memory(models, activations, list(fulls.values()), ray, devices)

    opts = train.run_options(args, results_dir=results_dir, data_dir=data_dir, threads=threads, progress=False)
    to_run, to_run_configs, done, conflicts, damaged = [], [], [], [], []
    for job in plan_jobs(study, root, cells, models, activations, trials):
        path, state = trial_state(job, opts, tasks)
        if state == 'done' and not args.force:
            done.append(job)
        else:
            to_run.append(job)
            to_run_configs.append(fulls[_config_key(job['config'])])
            if state.startswith('damaged'):  # set aside and trained again, also with --force
                damaged.append((job, path, state))
            elif state not in ('absent', 'done') and not args.force:
                conflicts.append((path, state))
    if conflicts:
        path, state = conflicts[0]
        raise ValueError(f"{len(conflicts)} existing result(s) in {study_dir} belong to another config or seeds "
                         f"(first: {_show_path(path)} is {state}); use another --study or --results-dir, "
                         f"or --force to overwrite them")
    if not args.dry_run:  # a folder that cannot be written fails now, not after the first trial
        cli.check_writable(study_dir, need_bytes=len(to_run) * (4 * full.n_eval * max(1, full.vocab_size) + 2 ** 20))
        if args.plots_dir:
            cli.check_writable(args.plots_dir, 'plots folder')
    note = None
    if design is None and args.study:
        close = difflib.get_close_matches(args.study, study_names(), n=1, cutoff=0.8)
        if close:
            note = f"note: {args.study!r} is not a study design (did you mean {close[0]}?); running it as a plain study"
    return {'design': args.study if design else None, 'overrides': overrides, 'note': note, 'study': study,
            'study_dir': study_dir, 'results_dir': results_dir, 'config': full, 'preset': args.config,
            'models': models, 'activations': activations, 'trials': trials, 'to_run': to_run, 'done': done,
            'to_run_configs': to_run_configs, 'cells': [n for n, _ in cells if n],
            'grid': {k: list(dict.fromkeys(getattr(c, k) for _, c in cells)) for k in grid} if grid else None,
            'damaged': damaged, 'opts': opts, 'slots': [replace(opts, device=d) for d in devices],
            'workers': workers, 'threads': threads, 'execution': execution, 'executor': args.executor, 'ray': ray,
            'vary': args.vary, 'memory': memory, 'data_note': data_note}


def saved_data_fields(study_dir, kind, configs):
    """For each config, the config fields the data fixes (vocab_size; for classification also
    n_inputs, n_eval and, with epochs, max_iters), as a trial saved in this study (at any
    depth: a grid design's cells) on the same dataset recorded them (with epochs, also at the
    same batch: max_iters follows it): for a dry run, which reads no data. {} where there is
    no such trial."""
    out = [None] * len(configs)
    for path in sorted(glob.glob(os.path.join(study_dir, '**', 'trial_*.json'), recursive=True)):
        try:
            with open(path) as f:
                saved = json.load(f)['config']
            for i, c in enumerate(configs):
                same = [('dataset', c.dataset)] + ([(k, getattr(c, k)) for k in ('epochs', 'batch_size',
                                                    'grad_accum_steps')] if c.epochs else [])
                if out[i] is None and all(saved[k] == v for k, v in same):
                    out[i] = {k: saved[k] for k in ['vocab_size'] + (['n_inputs', 'n_eval'] + (
                        ['max_iters'] if c.epochs else []) if kind == 'classification' else [])}
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if all(o is not None for o in out):
            break
    return [o or {} for o in out]


def check_analysis_args(args, activations, study_dir, grid=False):
    """The analysis's flags, checked before the first trial rather than after the last."""
    if args.no_analyze and (args.baseline or args.plots_dir):
        raise ValueError("--baseline and --plots-dir are for the analysis, which --no-analyze turns off")
    if args.baseline is None:
        return
    cells = ['*'] if grid else []  # a grid design's cells are study folders inside it
    saved = {os.path.basename(p) for p in glob.glob(os.path.join(study_dir, *cells, '*', '*')) if os.path.isdir(p)}
    valid = sorted(set(activations) | saved)
    if args.baseline not in valid:
        raise ValueError(f"--baseline {args.baseline!r} is not an activation of this study; valid: {', '.join(valid)}")


def plan_memory(models, activations, configs, ray, devices):
    """Refuse (ValueError, one line with the estimate) a sweep whose trials cannot fit in
    memory: on CPU all workers at once in the machine's available memory, on CUDA the
    trials placed on each device in its free memory; `configs`: every config of the plan
    (a grid design's cells), the largest counts. Where the data has not fixed vocab_size
    yet the estimate is a lower bound. Returns a line for the plan."""
    if ray is not None:
        return "memory: not checked here (Ray runs the trials on its nodes)"
    pairs = [(m, a) for m in models for a in activations]
    for device in sorted(set(devices)):
        n = devices.count(device)
        est, avail = max((check_memory(pairs, train.lower_bound_config(c), torch.device(device), concurrent=n)
                          for c in configs), key=lambda e: e[0]['total'])
    return (f"memory: about {cli.fmt_bytes(est['total'])} per trial at most"
            + (" (a lower bound: vocab_size unknown)" if not all(c.vocab_size for c in configs) else '')
            + f", {n} at once per device; "
            + (f"{cli.fmt_bytes(avail)} available" if avail is not None else "available memory unknown here"))


def _config_key(config):
    return json.dumps(config.to_dict(), sort_keys=True)


def trial_state(job, opts, tasks):
    """(result path, trial_files.existing_trial state) of a job, checked against the job's own
    config and study; `tasks` caches the Task of each config."""
    key = _config_key(job['config'])
    if key not in tasks:
        tasks[key] = make_task(job['config'], opts.data_dir)
    task = tasks[key]
    full = replace(job['config'], **task.config_updates())
    path = trial_files.trial_path(opts.results_dir, job['study'], job['model'], job['activation'], job['trial'])
    return path, trial_files.existing_trial(path, trial_files.trial_identity(task, job['model'], job['activation'],
                                                                             job['trial'], opts.vary, full))


def describe(plan):
    n = len(plan['to_run']) + len(plan['done'])
    what = (f"design {plan['design']}" if plan['design'] else f"study {plan['study']}") + f": preset {plan['preset']}"
    if plan['overrides']:
        what += f" (overrides: {', '.join(plan['overrides'])})"
    cells = f"{len(plan['cells'])} cell(s) x " if plan['grid'] else ''
    lines = [what,
             f"  {cells}{len(plan['models'])} model(s) x {len(plan['activations'])} activation(s) x {plan['trials']} "
             f"trial(s) = {n}: {len(plan['done'])} done, {len(plan['to_run'])} to run"
             + (f" ({len(plan['damaged'])} damaged, to train again)" if plan['damaged'] else '')
             + f"; vary {plan['vary']}" + ('; deterministic' if plan['opts'].deterministic else ''),
             f"  models: {' '.join(plan['models'])}; activations: {' '.join(plan['activations'])}",
             *([f"  grid: {' x '.join(f'{k} ' + ' '.join(f'{v:g}' for v in vs) for k, vs in plan['grid'].items())} "
                f"(one study folder per cell)"] if plan['grid'] else []),
             f"  {plan['execution']}; results in {plan['study_dir']}",
             f"  {plan['memory']}"]
    if plan['data_note']:
        lines.append(f"  {plan['data_note']}")
    if plan['note']:
        lines.insert(0, plan['note'])
    return '\n'.join(lines)


def dry_run(plan):
    print(describe(plan))
    per, source, missing = estimate(plan)
    width = max([len(job_name(j)) for j in plan['to_run'] + plan['done']] + [10])
    damaged = {id(job): (path, state) for job, path, state in plan['damaged']}
    for job, s in zip(plan['to_run'], per):
        est = f"~{cli.fmt_seconds(s)}" if s is not None else 'no estimate'
        if id(job) in damaged:
            path, state = damaged[id(job)]
            print(f"  damaged {job_name(job):{width}s}  {est}; {_show_path(path)} is {state}: its files would be "
                  f"moved to {_show_path(os.path.join(plan['study_dir'], 'damaged'))}/<time>/ and the trial "
                  f"trained again")
        else:
            print(f"  to run  {job_name(job):{width}s}  {est}")
    for job in plan['done']:
        print(f"  done    {job_name(job):{width}s}  " +
              _show_path(trial_files.trial_path(plan['results_dir'], job['study'], job['model'],
                                               job['activation'], job['trial'])))
    known = [s for s in per if s is not None]
    if not plan['to_run']:
        print("nothing to run: every trial is done (--force reruns them)")
        return 0
    if known:
        total = sum(known)
        line = f"estimated time (an estimate of time only, not of any result): ~{cli.fmt_seconds(total)} of trial time"
        if len(known) < len(per):  # a partial sum must not read as the whole sweep's time
            line += (f" for the {len(known)} of {len(per)} trials to run that have a figure "
                     f"({len(per) - len(known)} more without one)")
        if plan['workers'] and plan['workers'] > 1:
            line += (f", roughly {cli.fmt_seconds(total / plan['workers'])} wall time with {plan['workers']} "
                     f"workers if parallel trials do not slow each other down")
        print(line)
        print(f"  from: {source}")
    else:
        print("no time estimate for the trials to run")
    if missing:
        print(f"  missing: {missing}")
    return 0


def analyze_study(plan, args):
    """Run the analysis quietly (its warnings go to stderr); returns (ok, a phrase for the
    sweep's closing line or None)."""
    kwargs = {'plots_dir': args.plots_dir}
    if args.baseline:
        kwargs['baseline'] = args.baseline
    try:
        summary = analyze_results.analyze(plan['study_dir'], verbose=False, **kwargs)
    except ValueError as e:  # AnalysisError is a ValueError
        print(f"error: analysis of {plan['study_dir']} failed: {e}", file=sys.stderr)
        return False, None
    except OSError as e:
        print(f"error: analysis of {plan['study_dir']} failed: {cli.os_error_message(e)}", file=sys.stderr)
        return False, None
    for w in summary['warnings']:
        print(f"warning: {w}", file=sys.stderr)
    d = plan['study_dir']
    return True, (f"analysis of {summary['provenance']['n_trials']} trials"
                  + (f" ({len(summary['warnings'])} warning(s) above)" if summary['warnings'] else '')
                  + f": summary {os.path.join(d, 'summary.json')}, report {os.path.join(d, 'REPORT.md')}, "
                  f"plots in {args.plots_dir or os.path.join(d, 'plots')}")


def _main(argv):
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        plan = make_plan(args)
    except (ValueError, DataError) as e:
        parser.exit(cli.EXIT_USAGE, f"error: {' '.join(str(e).split())}\n")
    except OSError as e:
        parser.exit(cli.EXIT_FAILURE, f"error: {cli.os_error_message(e)}\n")
    if args.dry_run:
        return dry_run(plan)

    try:
        lock = sweep.StudyLock(plan['study_dir'])
    except ValueError as e:
        parser.exit(cli.EXIT_USAGE, f"error: {e}\n")
    except OSError as e:
        parser.exit(cli.EXIT_FAILURE, f"error: {cli.os_error_message(e)}\n")
    try:
        print(describe(plan), flush=True)
        strays = sweep.remove_stray_temp_files(plan['study_dir'])  # we hold the lock
        if strays:
            print(f"removed {strays} temp file(s) left by an interrupted run")
        for job, path, state in plan['damaged']:  # kept aside, never deleted; trained again below
            print(trial_files.set_aside_damaged(path, plan['study_dir'], state), flush=True)
        for job in plan['done']:  # a kill between a trial's JSON and its checkpoint's removal
            checkpoint.discard(checkpoint.checkpoint_path(trial_files.trial_path(
                plan['results_dir'], job['study'], job['model'], job['activation'], job['trial'])))
        t0 = time.time()
        finished, failed, interrupted = sweep.run_sweep(plan, sweep.make_executor(plan))
        wall = time.time() - t0
    except OSError as e:  # the study folder itself (failures.jsonl, a stray temp file) cannot be written
        parser.exit(cli.EXIT_FAILURE, f"error: {cli.os_error_message(e)}\n")
    finally:
        lock.release()

    if interrupted:
        left = len(plan['to_run']) - len(finished) - len(failed)
        print(f"interrupted: {len(finished)} trial(s) finished in this run"
              + (f" ({', '.join(map(job_name, finished))})" if finished else '')
              + f", {len(failed)} failed, {left} not finished (running ones were stopped and left no result, "
              f"only their last checkpoint if any); "
              f"{len(plan['done']) + len(finished)} of {len(plan['done']) + len(plan['to_run'])} done in "
              f"{plan['study_dir']}. Run the same command again to resume.", file=sys.stderr)
        return cli.EXIT_INTERRUPT
    ok, analysis = analyze_study(plan, args) if not args.no_analyze else (True, None)
    # one closing summary: the trials, then the analysis
    print(f"{len(finished)} trial(s) trained, {len(plan['done'])} already done, {len(failed)} failed "
          f"in {cli.fmt_seconds(wall)}" + (f"; {analysis}" if analysis else ''))
    if failed:
        logs = sorted({sweep.failure_log(plan, j) for j in failed})
        where = logs[0] if len(logs) == 1 else f"the failures.jsonl of {len(logs)} cells under {plan['study_dir']}"
        print(f"error: {len(failed)} trial(s) failed: {', '.join(map(job_name, failed))}; errors and tracebacks in "
              f"{where}", file=sys.stderr)
        return cli.EXIT_FAILURE
    return cli.EXIT_OK if ok else cli.EXIT_FAILURE


def main(argv=None):
    """The command line; returns the exit code (cli.py: 0 ok, 1 failed trials or analysis or
    an unwritable file, 2 invalid input, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


if __name__ == '__main__':
    cli.stop_promptly_on_ctrl_c()
    sys.exit(main())
