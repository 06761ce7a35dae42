"""
The plan of a run: which trials, the state of each (store.state), where and how they run,
and whether they fit in memory and on disk. Built once, before anything is trained, by both
command lines (train.py: one model/activation pair; run_all_experiments.py: a study); the
start-of-run description, the dry run and train.py's preflight are views of it. Module map:
docs/design.md.
"""
import difflib
import glob
import json
import os
import re
import resource
from dataclasses import dataclass, field, fields, replace
from types import SimpleNamespace

import torch

import cli
import store
from activation_names import ACTIVATION_NAMES, check_activation
from config import Config, RunOptions, data_fields, get_config, lower_bound_config, task_kind
from designs import DEFAULT_GRID, DESIGNS, GRID_FLAGS, cells as design_cells, study_names
from device import autocast_dtype, dtype_name, layout, run_settings
from fileio import data_dir as resolve_data_dir
from model_factories import CLASSIFIER_NAMES, MODEL_NAMES, build_model, check_memory, check_model, model_kind
from prepare_data import make_task
from time_estimate import estimate, show_path

STUDY_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*$')


@dataclass(frozen=True)
class Job:
    """One trial to plan and run; small and picklable (it travels to worker processes)."""
    model: str
    activation: str
    trial: int
    study: str                 # the study folder below results_dir (a grid design's cell: design/root/cell)
    config: Config
    state: store.State = store.State('new')
    vary: str | None = None    # None: the run's --vary; 'none' for a repeat (the same seeds as trial 0)

    def key(self, results_dir):
        return store.TrialKey(results_dir, self.study, self.model, self.activation, self.trial)

    @property
    def name(self):
        return self.key('').name


@dataclass(frozen=True)
class Plan:
    design: str | None
    preset: str
    overrides: tuple
    study: str
    study_dir: str
    results_dir: str
    config: Config             # the first cell's, with the data's fields
    models: tuple
    activations: tuple
    trial_ids: tuple
    jobs: tuple                # every Job, with its state
    opts: RunOptions
    slots: tuple               # RunOptions per worker (device, threads)
    workers: int | None
    threads: int
    execution: str             # a sentence: where the trials run
    executor: str              # local | ray
    ray: dict | None
    memory: str                # a sentence: the memory estimate
    cells: tuple = ()
    grid: dict | None = None
    data_note: str | None = None
    note: str | None = None
    full_configs: dict = field(default_factory=dict)  # config key -> config with the data's fields

    @property
    def to_run(self):
        return [j for j in self.jobs if j.state.kind != 'done' or self.opts.force]

    @property
    def done(self):
        return [j for j in self.jobs if j.state.kind == 'done' and not self.opts.force]

    @property
    def damaged(self):
        return [j for j in self.jobs if j.state.kind == 'damaged']

    def full_config(self, job):
        return self.full_configs[config_key(job.config)]


def config_key(config):
    return json.dumps(config.to_dict(), sort_keys=True)


# ----------------------------------------------------------------------------- names and checks

def pick_names(given, default, valid, check, what):
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


def check_buildable(models, activations, cells):
    """Every pair must be buildable at every config: cheap on the meta device."""
    for name, cfg in cells:
        for m in models:
            for a in activations:
                try:
                    with torch.device('meta'):
                        build_model(m, a, lower_bound_config(cfg), seed=0)
                except ValueError as e:
                    raise ValueError(f"{m}/{a} cannot be built with this config"
                                     f"{' (cell ' + name + ')' if name else ''}: {e}") from None
                except Exception:  # noqa: BLE001 -- a model the meta device can't build: the trial will tell
                    pass


def plan_memory(models, activations, configs, ray, devices):
    """Refuse (ValueError, one line with the estimate) a run whose trials cannot fit in
    memory: on CPU all workers at once in the machine's available memory, on CUDA the
    trials placed on each device in its free memory; `configs`: every config of the plan
    (a grid design's cells), the largest counts. Returns a line for the plan."""
    if ray is not None:
        return "memory: not checked here (Ray runs the trials on its nodes)"
    pairs = [(m, a) for m in models for a in activations]
    for device in sorted(set(devices)):
        n = devices.count(device)
        est, avail = max((check_memory(pairs, lower_bound_config(c), torch.device(device), concurrent=n)
                          for c in configs), key=lambda e: e[0]['total'])
    runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # this process: Python, torch, data
    return (f"memory: about {cli.fmt_bytes(est['total'])} per trial at most for its model, optimizer, activations "
            f"and evaluation set" + (" (a lower bound: vocab_size unknown)" if not all(c.vocab_size for c in configs)
                                     else '')
            + f", plus the process itself (Python, torch, the data: {cli.fmt_bytes(runtime)} in this one now); "
            + f"{n} at once per device; "
            + (f"{cli.fmt_bytes(avail)} available" if avail is not None else "available memory unknown here"))


def disk_need(n_trials, config):
    """Bytes n trials save: n_eval x classes float32 probabilities each, and a JSON of up to ~1 MB."""
    return n_trials * (4 * config.n_eval * max(1, config.vocab_size) + 2 ** 20)


def saved_data_fields(study_dir, kind, configs):
    """For each config, the fields the data fixes (config.data_fields), as a trial saved in
    this study (at any depth: a grid design's cells) on the same dataset recorded them: for a
    dry run, which reads no data. {} where there is no such trial."""
    out = [None] * len(configs)
    for path in sorted(glob.glob(os.path.join(study_dir, '**', 'trial_*.json'), recursive=True)):
        try:
            with open(path) as f:
                saved = json.load(f)['config']
            for i, c in enumerate(configs):
                same = [('dataset', c.dataset)] + ([(k, getattr(c, k)) for k in ('epochs', 'batch_size',
                                                    'grad_accum_steps')] if c.epochs else [])
                if out[i] is None and all(saved[k] == v for k, v in same):
                    out[i] = {k: saved[k] for k in data_fields(kind, c.epochs)}
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if all(o is not None for o in out):
            break
    return [o or {} for o in out]


def tasks_for(cells, kind, study_dir, data_dir, dry_run):
    """({config key: Task}, a note or None). A dry run reads no data: it takes the fields the
    data fixes from the study's saved trials, or says they are unknown."""
    if not dry_run:
        return {config_key(cfg): make_task(cfg, data_dir) for _, cfg in cells}, None
    saved = saved_data_fields(study_dir, kind, [cfg for _, cfg in cells])
    tasks = {config_key(cfg): SimpleNamespace(kind=kind, config_updates=lambda got=got: got)
             for (_, cfg), got in zip(cells, saved)}
    known = [got for got in saved if got]
    note = (f"data not read (dry run): {', '.join(f'{k} {v}' for k, v in known[0].items())} from the saved "
            f"trials" if known else "data not read (dry run) and no trial saved yet: vocab_size unknown")
    if known and len(known) < len(saved):
        note += f" ({len(saved) - len(known)} of {len(saved)} cells have none saved yet: sizes unknown)"
    return tasks, note


def check_one_config(jobs, fulls, results_dir):
    """A study holds one config (a grid design: one per cell): ValueError naming the first saved
    trial of another config that the plan would not overwrite anyway (those are job_states')."""
    planned = {job.key(results_dir).json for job in jobs}
    by_study = {}
    for job in jobs:
        by_study.setdefault(job.key(results_dir).study_dir, fulls[config_key(job.config)])
    for study_dir, full in by_study.items():
        want = {k: v for k, v in full.to_dict().items() if not (k in data_fields(task_kind(full.dataset), full.epochs)
                                                                and not v)}  # a dry run: not known yet
        for path, saved in store.saved_configs(study_dir):
            if path in planned:
                continue
            diffs = store.differences({'config': saved}, {'config': want})
            if diffs:
                raise ValueError(f"{study_dir} holds trials of another config (first: {show_path(path)}: "
                                 f"{'; '.join(diffs[:3])}); a study holds one config: use another --study")


def job_states(jobs, tasks, opts, device, force):
    """Each job with its store.State; ValueError naming the first result of another identity
    (never overwritten unless force). device: where the trials will run; None with Ray (the
    nodes decide: the dtype and run settings are then not compared here, the trainer does)."""
    run = dtype = None
    if device is not None:
        dev = torch.device(device)
        amp = autocast_dtype(opts.dtype, dev)
        run, dtype = run_settings(opts, dev, amp, opts.threads), dtype_name(amp)
    out, conflicts = [], []
    for job in jobs:
        task = tasks[config_key(job.config)]
        full = replace(job.config, **task.config_updates())
        key = job.key(opts.results_dir)
        ident = store.identity(task.kind, job.model, job.activation, job.trial, job.vary or opts.vary, full,
                               dtype, opts.deterministic, opts.compile, getattr(task, 'eval_hash', None))
        st = store.state(key, ident, run)
        if st.kind == 'different' and not force:
            conflicts.append((key, st))
        out.append(replace(job, state=st))
    if conflicts:
        key, st = conflicts[0]
        raise ValueError(f"{len(conflicts)} existing result(s) in {key.study_dir} belong to another config or seeds "
                         f"(first: {show_path(key.json)} is {st}); use another --study or --results-dir, "
                         f"or --force to overwrite them")
    return out


# ----------------------------------------------------------------------------- the plan

def _overrides(args, grid_flags):
    out = [f'--{k}' for k in ('config', 'models', 'activations', 'trials') if getattr(args, k, None) is not None]
    out += [f'--{f.name} {getattr(args, f.name)}' for f in fields(Config) if getattr(args, f.name) is not None]
    return out + [f"--{f.replace('_', '-')}" for f in grid_flags]


def _config_and_study(args, design, base):
    """(config, study name, overrides) from the flags, the design and its grid; ValueError for
    flags that do not go together. Mutates nothing in args."""
    grid_flags = [f for f in ('task',) + tuple(GRID_FLAGS.values()) if getattr(args, f, None) is not None]
    overrides = _overrides(args, grid_flags)
    grid = base.get('grid')
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    if args.data is not None:
        given['dataset'] = args.data
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
        if args.task is not None:
            given['dataset'] = args.task
    if given.get('dataset') and os.path.isfile(given['dataset']):
        given['dataset'] = os.path.abspath(given['dataset'])  # the same identity wherever the trial runs
    preset = args.config or base['config']
    config = get_config(preset, **given)
    study = args.study or default_study(preset, {k: v for k, v in given.items()})
    if not STUDY_NAME_RE.match(study):
        raise ValueError(f"invalid study name {study!r}: use letters, digits, '.', '_' and '-' "
                         f"(designs: {', '.join(study_names())})")
    return preset, config, study, overrides


def default_study(preset, given):
    """The preset's name; with config overrides, the preset's name and the overrides, so that
    a quick check with changed settings never lands in the main job's folder."""
    if not given:
        return preset
    parts = [f"{k}{os.path.basename(str(v)) if k == 'dataset' else v}" for k, v in sorted(given.items())]
    return re.sub(r'[^A-Za-z0-9._-]', '_', f"{preset}_" + '_'.join(parts))[:100]


def make_plan(args, one_pair=False):
    """Validate everything and work out the run; raises ValueError or DataError with a
    one-line message before anything is trained or written. `args`: run_all_experiments.py's
    flags, or train.py's (one_pair: --model, --activation, --trials from --first-trial)."""
    design = None if one_pair else DESIGNS.get(args.study)
    base = design or DEFAULT_GRID
    preset, config, study, overrides = _config_and_study(args, design, base)
    if one_pair:  # train.py's --model, --activation and --trials are what it runs, not overrides
        overrides = [o for o in overrides if o not in ('--models', '--activations', '--trials')]
    trials, first = base['trials'] if args.trials is None else args.trials, getattr(args, 'first_trial', 0)
    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    if first < 0:
        raise ValueError(f"--first-trial must be >= 0, got {first}")
    trial_ids = tuple(range(first, first + trials))
    for flag in ('workers', 'threads', 'trials_per_gpu'):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if getattr(args, 'repeats', 0) < 0:
        raise ValueError(f"--repeats must be >= 0, got {args.repeats}")
    activations = pick_names(args.activations, base['activations'], [a for a in ACTIVATION_NAMES if a != 'silu'],
                             check_activation, 'activations')  # silu: an alias of swish
    for m in args.models or []:
        if m != 'all':
            check_model(m)
    root, cells = design_cells(design, config, {k: getattr(args, flag, None) for k, flag in GRID_FLAGS.items()})
    devices, workers, threads, ray, execution = layout(
        args.executor, args.device, args.workers, args.threads, args.trials_per_gpu, args.ray_address,
        args.ray_num_cpus, args.ray_num_gpus, tiny_trials=base.get('tiny_trials', False))
    if ray is None:
        autocast_dtype(args.dtype, torch.device(devices[0]))  # float16 on CPU: refused now
    kind = task_kind(config.dataset)
    kind_models = MODEL_NAMES if kind == 'lm' else CLASSIFIER_NAMES
    models = pick_names(args.models, base['models'] if kind == 'lm' else CLASSIFIER_NAMES, kind_models,
                        check_model, 'models')
    for m in models:
        if model_kind(m) != kind:
            raise ValueError(f"model {m!r} trains on {model_kind(m)} data, but dataset {config.dataset!r} is a "
                             f"{kind} task; models for it: {', '.join(kind_models)}")
    check_buildable(models, activations, cells)
    results_dir = os.path.abspath(args.results_dir)
    study_dir = os.path.join(results_dir, study, *([root] if root else []))
    # memory before the data: an impossible block_size makes GBs of evaluation windows
    plan_memory(models, activations, [cfg for _, cfg in cells], ray, devices)
    data_dir = os.path.abspath(resolve_data_dir(args.data_dir))
    tasks, data_note = tasks_for(cells, kind, study_dir, data_dir, args.dry_run)
    fulls = {config_key(cfg): replace(cfg, **tasks[config_key(cfg)].config_updates()) for _, cfg in cells}
    memory = plan_memory(models, activations, list(fulls.values()), ray, devices)
    opts = cli.run_options(args, results_dir=results_dir, data_dir=data_dir, threads=threads, progress=one_pair,
                           preset=preset)
    jobs = [Job(m, a, k, '/'.join(p for p in (study, root, name) if p), cfg)
            for name, cfg in cells for m in models for a in activations for k in trial_ids]
    # repeats: trial 0 of each group run again with the same seeds, for the analysis's repeat noise
    jobs += [Job(m, a, k, '/'.join(p for p in (study, root, name, 'repeats') if p), cfg, vary='none')
             for name, cfg in cells for m in models for a in activations for k in range(getattr(args, 'repeats', 0))]
    check_one_config(jobs, fulls, results_dir)
    jobs = job_states(jobs, tasks, opts, devices[0] if ray is None else None, args.force)
    grid = base.get('grid')
    return Plan(design=args.study if design else None, preset=preset, overrides=tuple(overrides), study=study,
                study_dir=study_dir, results_dir=results_dir, config=fulls[config_key(cells[0][1])],
                models=tuple(models), activations=tuple(activations), trial_ids=trial_ids, jobs=tuple(jobs),
                opts=opts, slots=tuple(replace(opts, device=d) for d in devices), workers=workers, threads=threads,
                execution=execution, executor=args.executor, ray=ray, memory=memory,
                cells=tuple(n for n, _ in cells if n),
                grid={k: list(dict.fromkeys(getattr(c, k) for _, c in cells)) for k in grid} if grid else None,
                data_note=data_note, note=_design_note(args, design), full_configs=fulls)


def _design_note(args, design):
    if design is None and args.study:
        close = difflib.get_close_matches(args.study, study_names(), n=1, cutoff=0.8)
        if close:
            return f"note: {args.study!r} is not a study design (did you mean {close[0]}?); running it as a plain study"
    return None


def check_writable(plan, plots_dir=None):
    """A folder that cannot be written (or a disk too full) fails now, not after the first trial."""
    cli.check_writable(plan.study_dir, need_bytes=disk_need(len(plan.to_run), plan.config))
    if plots_dir:
        cli.check_writable(plots_dir, 'plots folder')


# ----------------------------------------------------------------------------- views

def describe(plan):
    """What will run, as printed at the start of every run and by the dry run."""
    n = len(plan.jobs)
    what = (f"design {plan.design}" if plan.design else f"study {plan.study}") + f": preset {plan.preset}"
    if plan.overrides:
        what += f" (overrides: {', '.join(plan.overrides)})"
    cells = f"{len(plan.cells)} cell(s) x " if plan.grid else ''
    resumable = [j for j in plan.to_run if j.state.kind == 'resumable']
    lines = [what,
             f"  {cells}{len(plan.models)} model(s) x {len(plan.activations)} activation(s) x {len(plan.trial_ids)} "
             f"trial(s) = {n}: {len(plan.done)} done, {len(plan.to_run)} to run"
             + (f" ({len(plan.damaged)} damaged, to train again)" if plan.damaged else '')
             + (f" ({len(resumable)} resume from a checkpoint)" if resumable else '')
             + (f"; {sum(1 for j in plan.jobs if j.vary)} of them repeats of trial 0 (same seeds)"
                if any(j.vary for j in plan.jobs) else '')
             + f"; vary {plan.opts.vary}" + ('; deterministic' if plan.opts.deterministic else ''),
             f"  models: {' '.join(plan.models)}; activations: {' '.join(plan.activations)}",
             *([f"  grid: {' x '.join(f'{k} ' + ' '.join(f'{v:g}' for v in vs) for k, vs in plan.grid.items())} "
                f"(one study folder per cell)"] if plan.grid else []),
             f"  {plan.execution}; results go to {plan.study_dir}",
             f"  {plan.memory}"]
    if plan.data_note:
        lines.append(f"  {plan.data_note}")
    if plan.note:
        lines.insert(0, plan.note)
    return '\n'.join(lines)


def _job_line(plan, job, est, width):
    est = f"~{cli.fmt_seconds(est)}" if est is not None else 'no estimate'
    st = job.state
    if st.kind == 'damaged':
        return (f"  damaged {job.name:{width}s}  {est}; {show_path(job.key(plan.results_dir).json)} is {st}: its "
                f"files would be moved to {show_path(os.path.join(plan.study_dir, 'damaged'))}/<time>/ and the trial "
                f"trained again")
    if st.kind == 'resumable':
        return f"  resume  {job.name:{width}s}  {est} for the whole trial; resumes at iteration {st.resume_at}"
    return f"  to run  {job.name:{width}s}  {est}"


def dry_run(plan):
    """Print what would run and what is done, with a time estimate (of time only)."""
    print(describe(plan))
    to_run = plan.to_run
    per, source, missing = estimate(plan)
    width = max([len(j.name) for j in plan.jobs] + [10])
    for job, s in zip(to_run, per):
        print(_job_line(plan, job, s, width))
    for job in plan.done:
        print(f"  done    {job.name:{width}s}  " + show_path(job.key(plan.results_dir).json))
    if not to_run:
        print("nothing to run: every trial is done (--force reruns them)")
        return 0
    known = [s for s in per if s is not None]
    if known:
        total = sum(known)
        line = f"estimated time (an estimate of time only, not of any result): ~{cli.fmt_seconds(total)} of trial time"
        if len(known) < len(per):  # a partial sum must not read as the whole run's time
            line += (f" for the {len(known)} of {len(per)} trials to run that have a figure "
                     f"({len(per) - len(known)} more without one)")
        if plan.workers and plan.workers > 1:
            line += (f", roughly {cli.fmt_seconds(total / plan.workers)} wall time with {plan.workers} "
                     f"workers if parallel trials do not slow each other down")
        print(line)
        print(f"  from: {source}")
    else:
        print("no time estimate for the trials to run")
    if missing:
        print(f"  missing: {missing}")
    return 0
