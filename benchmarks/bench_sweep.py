"""
Wall time of a whole sweep with --workers 1 and --workers 2: by default the `cpu`-preset
sweep of 2 models x 2 activations x 3 trials (minigpt, tinylstm x relu, gelu), each run a
fresh `python run_all_experiments.py ...` process into an empty results folder, timed all-in
(interpreter start, imports, data, training, files; no analysis).

    python benchmarks/bench_sweep.py                           # the figures quoted in docs/performance.md
    python benchmarks/bench_sweep.py --workers 1 2 4           # other worker counts
    python benchmarks/bench_sweep.py --max_iters 4 --n_eval 20 --out none   # a smoke test

Any flag it does not know goes to run_all_experiments.py (config overrides, --data,
--data-dir, --deterministic, ...). Prints a table. Unless --out none (or config overrides
are given without --out), writes the measured figures to benchmarks/bench_sweep.json, where
`run_all_experiments.py --dry-run` finds per-trial times for its estimate.
"""
import datetime
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import device  # noqa: E402
import time_estimate  # noqa: E402
from config import Config, Parser  # noqa: E402
from fileio import write_json  # noqa: E402


def run_once(workers, args, passthrough):
    with tempfile.TemporaryDirectory(prefix='bench_sweep_') as results:
        cmd = [sys.executable, os.path.join(ROOT, 'run_all_experiments.py'), '--config', args.config,
               '--models', *args.models, '--activations', *args.activations, '--trials', str(args.trials),
               '--workers', str(workers), '--results-dir', results, '--study', 'bench', '--no-analyze',
               *passthrough]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)  # cwd: relative --data paths stay valid
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"error: the sweep with --workers {workers} failed (exit {p.returncode}):\n{p.stderr.strip()}")
        trials = []
        for path in sorted(glob.glob(os.path.join(results, 'bench', '*', '*', 'trial_*.json'))):
            with open(path) as f:
                r = json.load(f)
            m = r['metrics']
            trials.append({'model': r['model'], 'activation': r['activation'], 'trial': r['trial'],
                           'config': r['config'], 'total_time': m['total_time'],
                           'val_loss': m['val_loss'], 'threads': r['provenance']['threads'],
                           'workers': workers,
                           # the split the dry run scales to other iteration counts (time_estimate)
                           'training_time': m['training_time'], 'eval_time': m['eval_time'], 'iters': m['iters'],
                           'evals': len(r['history']['iter'])})
    expected = len(args.models) * len(args.activations) * args.trials
    if len(trials) != expected:
        sys.exit(f"error: --workers {workers} left {len(trials)} trial results, expected {expected}")
    return wall, trials


def main(argv=None):
    parser = Parser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default='cpu', help='preset (default: cpu)')
    parser.add_argument('--models', nargs='+', default=['minigpt', 'tinylstm'])
    parser.add_argument('--activations', nargs='+', default=['relu', 'gelu'])
    parser.add_argument('--trials', type=int, default=3)
    parser.add_argument('--workers', nargs='+', type=int, default=[1, 2], help='worker counts to time')
    parser.add_argument('--out', default=None, help=f"figures JSON (default: {os.path.relpath(time_estimate.BENCH_FIGURES)} "
                        "unless config overrides are given); 'none' to write nothing")
    args, passthrough = parser.parse_known_args(argv)
    overrides = [a for a in passthrough if a.startswith('--') and a[2:].split('=')[0] in
                 set(Config.__dataclass_fields__)]
    out = args.out if args.out is not None else (None if overrides else time_estimate.BENCH_FIGURES)
    if out == 'none':
        out = None

    cores = device.cores()
    print(f"sweep of {len(args.models)} models ({' '.join(args.models)}) x {len(args.activations)} activations "
          f"({' '.join(args.activations)}) x {args.trials} trials, preset {args.config}"
          + (f" with {' '.join(passthrough)}" if passthrough else '')
          + f"; {cores} cores, {socket.gethostname()}", flush=True)
    rows, all_trials = [], []
    for w in args.workers:
        wall, trials = run_once(w, args, passthrough)
        rows.append({'workers': w, 'threads': trials[0]['threads'], 'wall_seconds': wall,
                     'trial_seconds_sum': sum(t['total_time'] for t in trials), 'trials': len(trials),
                     'mean_val_loss': sum(t['val_loss'] for t in trials) / len(trials)})
        all_trials += trials
        print(f"  --workers {w}: {wall:.1f} s", flush=True)

    base = rows[0]['wall_seconds']
    print()
    print(f"{'workers':>7s} {'threads/trial':>13s} {'wall s':>8s} {'trials':>6s} {'sum trial s':>11s} "
          f"{'s/trial (wall)':>14s} {'speed-up':>8s} {'mean val loss':>13s}")
    for r in rows:
        print(f"{r['workers']:7d} {r['threads']:13d} {r['wall_seconds']:8.1f} {r['trials']:6d} "
              f"{r['trial_seconds_sum']:11.1f} {r['wall_seconds'] / r['trials']:14.1f} "
              f"{base / r['wall_seconds']:7.2f}x {r['mean_val_loss']:13.4f}")
    print("wall s: the whole command, all-in; sum trial s: the trials' own all-in times (metrics.total_time); "
          "speed-up relative to the first row")
    if out:
        write_json(out, {
            'source': 'measured', 'benchmark': 'bench_sweep', 'date': datetime.datetime.now().astimezone().isoformat(),
            'hostname': socket.gethostname(), 'cores': cores, 'preset': args.config, 'passthrough': passthrough,
            'git_commit': device._git('rev-parse', 'HEAD') or None, 'runs': rows, 'trials': all_trials})
        print(f"figures written to {out}")


if __name__ == '__main__':
    main()
