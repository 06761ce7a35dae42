"""
What run_all_experiments.py does once its flags are parsed: make the plan, hold the study's
lock, run the sweep, analyse, and say what happened. Its own module so that the command line
answers --help and usage errors before torch and scipy load (run_all_experiments.py imports
this only after parsing). The path of one trial: docs/design.md.
"""
import glob
import os
import sys
import time

import analyze_results
import cli
import plan as planning
import store
import sweep
from fileio import DataError


def check_baseline(args, p):
    if args.baseline is None:
        return
    cells = ['*'] if p.grid else []  # a grid design's cells are study folders inside it
    saved = {os.path.basename(q) for q in glob.glob(os.path.join(p.study_dir, *cells, '*', '*')) if os.path.isdir(q)}
    valid = sorted(set(p.activations) | saved)
    if args.baseline not in valid:
        raise ValueError(f"--baseline {args.baseline!r} is not an activation of this study; valid: {', '.join(valid)}")


def analyze_study(p, args):
    """Run the analysis quietly (its warnings go to stderr); returns (ok, a phrase for the
    sweep's closing line or None)."""
    kwargs = {'plots_dir': args.plots_dir}
    if args.baseline:
        kwargs['baseline'] = args.baseline
    try:
        summary = analyze_results.analyze(p.study_dir, verbose=False, margin=args.equivalence_margin,
                                          snapshots=args.compare_snapshots, **kwargs)
    except (ValueError, OSError) as e:  # AnalysisError is a ValueError
        print(f"error: analysis of {p.study_dir} failed: {cli.error_line(e)[len('error: '):]}", file=sys.stderr)
        return False, None
    for w in summary['warnings']:
        print(f"warning: {w}", file=sys.stderr)
    d = p.study_dir
    return True, (f"analysis of {summary['provenance']['n_trials']} trials"
                  + (f" ({len(summary['warnings'])} warning(s) above)" if summary['warnings'] else '')
                  + f": summary {os.path.join(d, 'summary.json')}, report {os.path.join(d, 'REPORT.md')}, "
                  f"plots in {args.plots_dir or os.path.join(d, 'plots')}")


def prepare(p):
    """Before the first trial, holding the lock: temp files a killed run left, damaged trials
    set aside (kept, never deleted; trained again), checkpoints of done trials dropped (a kill
    between a trial's JSON and its checkpoint's removal)."""
    strays = store.remove_stray_temp_files(p.study_dir)
    if strays:
        print(f"removed {strays} temp file(s) left by an interrupted run")
    for job in p.damaged:
        print(store.set_aside_damaged(job.key(p.results_dir), job.state.why), flush=True)
    for job in p.done:
        store.discard_checkpoint(job.key(p.results_dir))


def interrupted_line(p, finished, failed):
    left = [j for j in p.to_run if j not in finished + failed]
    kept = [(j, store.checkpoint_iteration_any(j.key(p.results_dir))) for j in left]
    kept = [f"{j.name} at iteration {it}" for j, it in kept if it is not None]
    return (f"interrupted: {len(finished)} trial(s) finished in this run"
            + (f" ({', '.join(j.name for j in finished)})" if finished else '')
            + f", {len(failed)} failed, {len(left)} not finished; running ones were stopped and left no result"
            + (f"; checkpoints kept for {', '.join(kept)}" if kept else "; no checkpoint kept")
            + f". {len(p.done) + len(finished)} of {len(p.jobs)} done in {p.study_dir}. "
            f"Run the same command again to resume.")


def run(args, parser):
    """run_all_experiments.py once its flags are parsed: plan, lock, sweep, analysis; returns
    the exit code."""
    try:
        p = planning.make_plan(args)
        if args.dry_run:
            return planning.dry_run(p)
        check_baseline(args, p)
        planning.check_writable(p, args.plots_dir)
        lock = store.StudyLock(p.study_dir)
    except (ValueError, DataError, OSError) as e:
        parser.exit(cli.exit_code(e), cli.error_line(e) + "\n")
    try:
        with lock:
            print(planning.describe(p), flush=True)
            prepare(p)
            t0 = time.time()
            finished, failed, interrupted = sweep.run_sweep(p, sweep.make_executor(p))
            wall = time.time() - t0
    except OSError as e:  # the study folder itself (failures.jsonl, a stray temp file) cannot be written
        parser.exit(cli.EXIT_FAILURE, cli.error_line(e) + "\n")
    if interrupted:
        print(interrupted_line(p, finished, failed), file=sys.stderr)
        return cli.EXIT_INTERRUPT
    ok, analysis = analyze_study(p, args) if not args.no_analyze else (True, None)
    # one closing summary: the trials, then the analysis
    print(f"{len(finished)} trial(s) trained, {len(p.done)} already done, {len(failed)} failed "
          f"in {cli.fmt_seconds(wall)}" + (f"; {analysis}" if analysis else ''))
    if failed:
        logs = sorted({store.failure_log(j.key(p.results_dir).study_dir) for j in failed})
        where = logs[0] if len(logs) == 1 else f"the failures.jsonl of {len(logs)} cells under {p.study_dir}"
        print(f"error: {len(failed)} trial(s) failed: {', '.join(j.name for j in failed)}; errors and tracebacks in "
              f"{where}", file=sys.stderr)
        return cli.EXIT_FAILURE
    return cli.EXIT_OK if ok else cli.EXIT_FAILURE


