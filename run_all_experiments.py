"""
Run a whole study from one command: every model x activation x trial through the trainer,
then the analysis. This module is the command line only: plan.py makes the plan (which
trials, their state, where they run), sweep.py runs it, store.py keeps the records,
analyze_results.py analyses them. Resume, failures and parallel runs: docs/usage.md and
docs/trials-and-resume.md.

    python run_all_experiments.py --config cpu                    # the default grid on the cpu preset
    python run_all_experiments.py --study seed_partial            # the original partial study (gpu preset)
    python run_all_experiments.py --study seed_full --dry-run     # what would run, what is done, how long
    python run_all_experiments.py --config cpu --workers 2 --models minigpt charlm --activations relu gelu
    python run_all_experiments.py --study seed_full --executor ray --ray-address auto --ray-num-gpus 0.25
    python run_all_experiments.py --study mnist_ffn --task mnist1d --gated-width matched  # the FFN study
"""
import argparse
import sys

import cli
from activation_names import ACTIVATION_NAMES, check_activation
from config import Parser
from designs import DEFAULT_GRID, DESIGNS, study_names
from model_names import ALL_MODELS

RAY_INSTALL = cli.RAY_INSTALL


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
                        help=f"'all' or model names (valid: {', '.join(ALL_MODELS)}; "
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
    parser.add_argument('--repeats', type=int, default=0, metavar='N',
                        help='also run trial 0 of every pair N more times with the same seeds (in <study>/repeats): '
                             'the repeat noise of this hardware, which the sanity rules then measure against')
    parser.add_argument('--no-analyze', action='store_true', help='do not run the analysis at the end')
    parser.add_argument('--baseline', default=None, help='analysis: activation compared against (default: relu)')
    parser.add_argument('--plots-dir', default=None, help='analysis: where plots go (default: <study>/plots)')
    cli.add_analysis_args(parser)
    grid = parser.add_argument_group('grid designs (mnist_ffn)')
    grid.add_argument('--task', default=None, choices=('mnist1d', 'mnist'),
                      help="the dataset of the mnist_ffn design (default: the preset's, mnist1d; mnist is "
                           "downloaded once)")
    grid.add_argument('--widths', nargs='+', type=int, default=None, help='hidden widths (default: 2 4 8 16)')
    grid.add_argument('--batch-sizes', nargs='+', type=int, default=None, help='batch sizes (default: 8 64)')
    grid.add_argument('--lrs', nargs='+', type=float, default=None,
                      help='learning rates (default: 0.1 0.01 0.001 0.0001)')
    cli.add_run_args(parser, study_help=f"a study design ({', '.join(study_names())}) or any results folder name "
                                         f"(default: the preset's name, plus the overrides if any)")
    return parser


def check_analysis_args(args):
    """The analysis's flags, checked before the first trial rather than after the last."""
    if args.no_analyze and (args.baseline or args.plots_dir or args.equivalence_margin or args.compare_snapshots):
        raise ValueError("--baseline, --plots-dir, --equivalence-margin and --compare-snapshots are for the "
                         "analysis, which --no-analyze turns off")


def _main(argv):
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        check_analysis_args(args)
        for m in args.models or []:  # names, before torch loads (plan.py checks everything else)
            if m != 'all' and m not in ALL_MODELS:
                raise ValueError(f"unknown model {m!r}; valid names: {', '.join(ALL_MODELS)}")
        for a in args.activations or []:
            if a != 'all':
                check_activation(a)
    except ValueError as e:
        parser.exit(cli.exit_code(e), cli.error_line(e) + "\n")
    # torch and scipy load only now: --help and usage errors answer without them. One import,
    # deferred for start-up time, not to dodge a cycle (tests/test_imports.py checks that edge too)
    import run_study  # noqa: PLC0415
    return run_study.run(args, parser)


def main(argv=None):
    """The command line; returns the exit code (cli.exit_code)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


if __name__ == '__main__':
    cli.stop_promptly_on_ctrl_c()
    sys.exit(main())
