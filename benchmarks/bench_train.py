"""
Training speed per model at a preset: ms per iteration and tokens/s of the training step
(dropout on, as in a trial), ms per batch of a loss estimate, and the all-in wall time of
one real trial (data, model, training with periodic evaluation, predictions, files).

    python benchmarks/bench_train.py --config cpu                 # all models, all-in for minigpt
    python benchmarks/bench_train.py --config cpu --all-in all    # all-in time of every model

Prints a table; the figures quoted in docs/performance.md come from here.
"""
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import train  # noqa: E402
from config import Parser, RunOptions, add_config_args, config_from_args  # noqa: E402
from model_factories import MODEL_NAMES, build_model  # noqa: E402
from prepare_data import make_task  # noqa: E402


def time_model(model, config, task, steps, warmup=3):
    """(seconds per training step, seconds per evaluation forward of one batch) of `model`
    after `warmup` steps: a full step (forward, backward, fused AdamW; dropout on)."""
    opt = train.make_optimizer(model, config, torch.device('cpu'))
    stream = task.train_batches(config.batch_size, torch.Generator().manual_seed(0))
    model.train()
    for _ in range(warmup):
        train.train_step(model, opt, [next(stream)], config, nullcontext())
    t0 = time.perf_counter()
    for _ in range(steps):
        train.train_step(model, opt, [next(stream)], config, nullcontext())
    step = (time.perf_counter() - t0) / steps
    x, y = task.get_batch('val', config.batch_size, torch.Generator().manual_seed(1))
    model.eval()
    with torch.inference_mode():
        model(x, y)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x, y)
    return step, (time.perf_counter() - t0) / steps


def main():
    parser = Parser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=MODEL_NAMES)
    parser.add_argument('--activation', default='gelu')
    parser.add_argument('--steps', type=int, default=20, help='timed training steps per model')
    parser.add_argument('--all-in', nargs='*', default=['minigpt'],
                        help="models whose full trial is timed ('all' for every one; none for none)")
    parser.add_argument('--data-dir', default=None)
    add_config_args(parser)
    args = parser.parse_args()
    config = config_from_args(args)
    task = make_task(config, args.data_dir)
    config = replace(config, **task.config_updates())
    all_in = args.models if args.all_in == ['all'] else args.all_in
    print(f"preset {args.config or 'cpu'}: {config.n_layer} layers, n_embd {config.n_embd}, block {config.block_size}, "
          f"batch {config.batch_size}, {config.max_iters} iters, eval every {config.eval_interval} x "
          f"{config.eval_iters} batches; activation {args.activation}; {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'model':16s} {'ms/iter':>9s} {'tokens/s':>10s} {'eval ms/batch':>14s} {'trial all-in s':>15s} {'val loss':>9s}")
    for name in args.models:
        step, fwd = time_model(build_model(name, args.activation, config, seed=0), config, task, args.steps)
        tokens = config.batch_size * config.block_size
        trial = ''
        if name in all_in:
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                r = train.run_trial(name, args.activation, 0, config, 'bench',
                                    RunOptions(d, data_dir=args.data_dir, progress=False))
                trial = f"{time.perf_counter() - t0:15.1f} {r['metrics']['val_loss']:9.4f}"
        print(f"{name:16s} {step * 1000:9.1f} {tokens / step:10,.0f} {fwd * 1000:14.1f} {trial}", flush=True)


if __name__ == '__main__':
    main()
