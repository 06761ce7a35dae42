"""
Cost of mid-trial checkpoints (checkpoint.py) at a preset: the size of one checkpoint, the
time to write one (atomically, fsynced) and to load one, and whole trials with
--checkpoint-every 0 against the default (every evaluation point), run alternately.

    python benchmarks/bench_checkpoint.py --config cpu                      # minigpt
    python benchmarks/bench_checkpoint.py --config cpu --models minigpt tinylstm --repeats 2

Prints a table; the figures quoted in docs/performance.md come from here. On a shared machine the
whole-trial times carry the noise of everything else running; "saving" is the time the
trials themselves measured inside checkpoint writes (metrics.checkpoint_time), which does not.
"""
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import checkpoint  # noqa: E402
import train  # noqa: E402
from config import Parser, RunOptions, add_config_args, config_from_args  # noqa: E402
from model_factories import build_model  # noqa: E402
from prepare_data import make_task  # noqa: E402


def save_and_load(name, activation, config, task, folder, repeats=5):
    """(bytes, seconds per save, seconds per load) of a checkpoint after one training step,
    with a full-length history."""
    model = build_model(name, activation, config, seed=0)
    opt = train.make_optimizer(model, config, torch.device('cpu'))
    stream = task.train_batches(config.batch_size, torch.Generator().manual_seed(0))
    train.train_step(model, opt, [next(stream)], config, nullcontext())  # the optimizer's state exists
    n = config.max_iters // config.eval_interval + 1
    loop = {'history': {k: [1.0] * n for k in ('iter', 'train_loss', 'val_loss', 'lr', 'grad_norm')},
            'best_val': float('inf'), 'best_state': None, 'evals_since_best': 0, 'eval_time': 0.0,
            'training_time': 0.0, 'checkpoint_time': 0.0, 'total_time': 0.0, 'started_at': '', 'resumed_from': [],
            'streams': {'init': '0' * 16, 'data': '0' * 16, 'dropout': '0' * 16}}
    identity = {'model': name, 'config': config.to_dict()}
    path = os.path.join(folder, '.trial_0.ckpt')
    saves, loads, size = [], [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        size = checkpoint.save(path, checkpoint.make(identity, 1, model, opt, loop, torch.device('cpu'),
                                                     torch.Generator().get_state(), 1))
        saves.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        checkpoint.load(path, identity)
        loads.append(time.perf_counter() - t0)
    return size, statistics.median(saves), statistics.median(loads)


def main():
    parser = Parser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=['minigpt'])
    parser.add_argument('--activation', default='gelu')
    parser.add_argument('--repeats', type=int, default=1, help='trials per model and setting (alternating)')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: all cores)')
    parser.add_argument('--data-dir', default=None)
    add_config_args(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    task = make_task(config, args.data_dir)
    config = replace(config, **task.config_updates())
    every = config.eval_interval
    n_saves = len(range(every, config.max_iters, every))
    print(f"preset {args.config or 'cpu'}: {config.max_iters} iters, checkpoint every {every} (the default) = {n_saves} "
          f"saves per trial; activation {args.activation}; {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'model':10s} {'ckpt MB':>8s} {'save ms':>8s} {'load ms':>8s} {'trial s, every 0':>17s} "
          f"{'trial s, default':>17s} {'difference':>11s} {'saving (in trial)':>18s}")
    for name in args.models:
        with tempfile.TemporaryDirectory() as d:
            size, save_s, load_s = save_and_load(name, args.activation, config, task, d)
            times, saving = {0: [], every: []}, []
            for r in range(args.repeats):
                for ce in ((0, every) if r % 2 == 0 else (every, 0)):  # alternate: drift hits both alike
                    rec = train.run_trial(name, args.activation, r, config, f'bench{ce}', RunOptions(
                        results_dir=d, data_dir=args.data_dir, progress=False, checkpoint_every=ce,
                        threads=args.threads))
                    times[ce].append(rec['metrics']['total_time'])
                    if ce:
                        saving.append(rec['metrics']['checkpoint_time'])
        t0, t1 = statistics.mean(times[0]), statistics.mean(times[every])
        s = statistics.mean(saving)
        print(f"{name:10s} {size / 2**20:8.2f} {save_s * 1000:8.1f} {load_s * 1000:8.1f} {t0:17.1f} {t1:17.1f} "
              f"{(t1 - t0) / t0 * 100:+10.1f}% {s:9.2f} s ({s / t1 * 100:.1f}%)", flush=True)


if __name__ == '__main__':
    main()
