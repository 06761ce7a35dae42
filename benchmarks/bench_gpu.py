"""
GPU throughput (issue 22): the device's own bf16 matrix rate; minigpt at the `gpu` and
`gpu_full` presets: ms per training step, tokens/s and model FLOP utilisation (MFU) against
that rate; one all-in `gpu`-preset trial (train.py); and the throughput of a `gpu`-preset sweep
(run_all_experiments.py) at --trials-per-gpu 1, 2, 4 and 8: small models leave most of a large
GPU idle, and this measures how much running trials side by side recovers.

    python benchmarks/bench_gpu.py [--device cuda] [--quick] [--out FILE.json] [--budget S] [--data FILE]

--quick: tiny sizes, float32 on CPU (seconds): the smoke run of gpu_check.sh --device cpu --quick.
Prints a table and writes JSON. An item that would not fit in --budget is listed as not run.

Step timing builds minigpt with model_factories.build_model and runs the trainer's step
(forward under bfloat16 autocast on CUDA, backward, fused AdamW; dropout on; TF32 allowed, as a
trial without --deterministic) on random tokens of a 65-character vocabulary. Model FLOPs per
token: 6 x (weights of every Linear, the tied head included) + 12 x n_layer x n_embd x block_size
(attention's two matrix products, forward and backward, causal masking not discounted): the
PaLM / nanoGPT estimate. MFU = those FLOPs x tokens/s / the measured matrix rate.
"""
import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

import gpu_check as gc  # benchmarks/ is this script's folder: sys.path[0]

sys.path.insert(0, gc.ROOT)
from config import get_config  # noqa: E402
from model_factories import build_model  # noqa: E402

VOCAB = 65  # Tiny Shakespeare's
QUICK_MODEL = dict(n_layer=1, n_embd=32, n_head=2, block_size=32, batch_size=4)
QUICK_TRIAL = dict(QUICK_MODEL, max_iters=20, eval_interval=10, eval_iters=2, n_eval=32)
LEVELS = (1, 8, 4, 2)      # --trials-per-gpu, in the order run: the extremes first if time runs short
QUICK_LEVELS = (1, 2)      # CPU: --workers


def sync(dev):
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)


def matmul_rate(dev, quick):
    """TFLOP/s of square matrix products on `dev` (bf16 on CUDA, float32 on CPU): the best of
    three timings of `reps` products after warm-up."""
    dtype = torch.bfloat16 if dev.type == 'cuda' else torch.float32
    n = (2048 if quick else 8192) if dev.type == 'cuda' else (256 if quick else 2048)
    reps = 10 if dev.type == 'cuda' else 3
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float('inf')
    for _ in range(3):
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return {'dtype': str(dtype).replace('torch.', ''), 'n': n, 'tflops': 2 * n ** 3 * reps / best / 1e12}


def flops_per_token(model, config):
    linear = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return 6 * sum(linear.values()) + 12 * config.n_layer * config.n_embd * config.block_size


def step_timing(preset, dev, quick, rate):
    """ms per training step of minigpt/gelu at `preset`, its tokens/s, MFU and peak memory."""
    config = get_config(preset, vocab_size=VOCAB, **(QUICK_MODEL if quick else {}))
    model = build_model('minigpt', 'gelu', config, seed=0).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, fused=True)
    amp = torch.autocast('cuda', dtype=torch.bfloat16) if dev.type == 'cuda' else nullcontext()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(VOCAB, (config.batch_size, config.block_size), generator=g).to(dev)
    y = torch.randint(VOCAB, (config.batch_size, config.block_size), generator=g).to(dev)

    def step():
        with amp:
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    warmup, steps = (2, 3) if quick else (10, 50)
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(warmup):
        step()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    dt = (time.perf_counter() - t0) / steps
    tokens = config.batch_size * config.block_size / dt
    fpt = flops_per_token(model, config)
    return {'what': f"minigpt step, {preset} preset", 'ms_per_step': dt * 1e3, 'tokens_per_s': tokens,
            'mfu': fpt * tokens / (rate * 1e12) if rate else None,
            'peak_mb': torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == 'cuda' else None,
            'flops_per_token': fpt, 'note': f"{config.n_layer} layers, n_embd {config.n_embd}, block "
                                           f"{config.block_size}, batch {config.batch_size}"}


def trial_flags(args):
    sizes = gc.check_args(True, QUICK_TRIAL)[2:] if args.quick else []  # [2:]: no --config cpu
    return ['--config', 'gpu', '--device', args.device, '--data', args.data, *sizes]


def all_in_trial(args, runner, fpt, rate, work):
    r = runner(gc.python('train.py', '--model', 'minigpt', '--activation', 'gelu', '--trials', 1, '--study', 'allin',
                         '--results-dir', work, *trial_flags(args)), timeout=args.left())
    if r.rc != 0:
        return {'what': 'all-in gpu-preset trial (train.py)', 'note': f"failed: {r.tail(300)}"}
    rec, _ = gc.trial(work, 'allin', 'minigpt', 'gelu', 0)
    m = rec['metrics']
    train_s = m['training_time'] - m['eval_time']
    return {'what': 'all-in gpu-preset trial (train.py)', 'ms_per_step': train_s / m['iters'] * 1e3,
            'tokens_per_s': m['tokens_per_sec'], 'mfu': fpt * m['tokens_per_sec'] / (rate * 1e12) if rate else None,
            'peak_mb': m['peak_memory_mb'] if rec['provenance']['device'] == 'cuda' else None,
            'wall_s': r.seconds, 'total_s': m['total_time'], 'eval_s': m['eval_time'], 'val_loss': m['val_loss'],
            'note': f"{m['iters']} steps; trial {m['total_time']:.1f} s all-in (eval {m['eval_time']:.1f} s), "
                    f"process {r.seconds:.1f} s; val loss {m['val_loss']:.3f}"}


def sweep_level(k, args, runner, fpt, rate, work):
    """k trials at once (k workers; on CUDA --trials-per-gpu k on one device): throughput over
    the trials' own busy window (first start to last finish) and over the whole command."""
    per_gpu = ['--trials-per-gpu', k] if args.device.startswith('cuda') else []
    r = runner(gc.python('run_all_experiments.py', '--study', f'k{k}', '--results-dir', work, '--models', 'minigpt',
                         '--activations', 'gelu', '--trials', k, '--workers', k, *per_gpu, '--no-analyze',
                         *trial_flags(args)), timeout=args.left())
    what = f"sweep, {k} trial(s) at once" + (f" (--trials-per-gpu {k})" if per_gpu else f" (--workers {k})")
    recs = [json.load(open(p)) for p in gc.trial_jsons(os.path.join(work, f'k{k}'))]
    if r.rc != 0 or len(recs) != k:
        return {'what': what, 'note': f"failed ({len(recs)} of {k} trials): {r.tail(300)}"}
    stamp = datetime.datetime.fromisoformat
    busy = max(stamp(x['provenance']['finished_at']) for x in recs) - min(stamp(x['provenance']['started_at'])
                                                                         for x in recs)
    busy = busy.total_seconds()
    train_s = [x['metrics']['training_time'] - x['metrics']['eval_time'] for x in recs]
    # training tokens, by tokens_per_sec's own definition (steps x tokens / training time without evaluation)
    tokens = sum(x['metrics']['tokens_per_sec'] * t for x, t in zip(recs, train_s))
    rate_busy = tokens / busy
    return {'what': what, 'k': k, 'tokens_per_s': rate_busy, 'mfu': fpt * rate_busy / (rate * 1e12) if rate else None,
            'ms_per_step': 1e3 * sum(t / x['metrics']['iters'] for x, t in zip(recs, train_s)) / k,
            'sum_of_trial_tokens_per_s': sum(x['metrics']['tokens_per_sec'] for x in recs),
            'trials_per_min': 60 * k / busy, 'busy_s': busy, 'wall_s': r.seconds,
            'note': f"{60 * k / busy:.2f} trials/min over the trials' {busy:.1f} s ({60 * k / r.seconds:.2f} "
                    f"counting the command's {r.seconds:.1f} s)"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--out', default=None, help='JSON file (default: none)')
    parser.add_argument('--budget', type=float, default=300.0, help='seconds (default 300)')
    parser.add_argument('--data', default=None, help='corpus for the trials (default: Tiny Shakespeare or a stand-in)')
    args = parser.parse_args(argv)
    t0 = time.time()
    args.left = lambda: max(1.0, t0 + args.budget - time.time())
    dev = torch.device(args.device)
    if dev.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True  # as a trial without --deterministic sets it
        torch.backends.cudnn.allow_tf32 = True
    elif args.quick:
        torch.set_num_threads(1)  # as the quick trials run (gpu_check.check_args)
    work = tempfile.mkdtemp(prefix='bench_gpu_')
    if args.data is None:
        args.data, _ = gc.corpus_path(work)
    server = gc.ForkServer() if dev.type == 'cpu' else None  # as gpu_check's tests: imports dwarf CPU trials
    runner = server.run if server else gc.run
    out = {'source': 'measured', 'benchmark': 'bench_gpu', 'date': datetime.datetime.now().astimezone().isoformat(),
           'device': gc.device_info(args.device), 'quick': args.quick, 'data': args.data, 'rows': [], 'notes': []}

    def save():  # after every item: a run stopped at its time limit still leaves its figures
        out['seconds'] = time.time() - t0
        if args.out:
            with open(args.out + '.tmp', 'w') as f:
                json.dump(out, f, indent=1, default=str)
            os.replace(args.out + '.tmp', args.out)
    try:
        run_all(args, dev, runner, work, out, t0, save)
    finally:
        if server:
            server.close()
        save()
    print_table(out)
    return 0 if all('failed' not in r.get('note', '') for r in out['rows']) else 1


def run_all(args, dev, runner, work, out, t0, save):
    """The items in order, each only if the budget still holds the time it is expected to need;
    one that raises is recorded as failed and the next one runs."""
    def item(need, what, fn):
        left = t0 + args.budget - time.time()
        if left < need:
            row = {'what': what, 'note': f"not run: the time budget has {max(0, left):.0f} s left, this needs "
                                         f"about {need:.0f} s"}
        else:
            try:
                row = fn()
            except Exception as e:  # noqa: BLE001 -- one broken item must not cost the others' figures
                row = {'what': what, 'note': f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"}
        out['rows'].append(row)
        print(f"  {row['what']}: " + (f"{row['ms_per_step']:.2f} ms/step; " if row.get('ms_per_step') else '')
              + row.get('note', ''), flush=True)
        save()
        return row
    try:
        m = out['matmul'] = matmul_rate(dev, args.quick)
        rate = m['tflops']
        print(f"  {m['dtype']} {m['n']}^3 matrix products: {rate:.1f} TFLOP/s", flush=True)
    except Exception as e:  # noqa: BLE001 -- then no MFU, but every other figure
        rate = None
        out['notes'].append(f"matrix rate failed ({type(e).__name__}: {e}): no MFU figures")
    save()
    for preset in ('gpu', 'gpu_full'):
        item(5 if args.quick else 30, f"minigpt step, {preset} preset",
             lambda p=preset: step_timing(p, dev, args.quick, rate))
    config = get_config('gpu', vocab_size=VOCAB, **(QUICK_MODEL if args.quick else {}))
    with torch.device('meta'):  # the trials' model FLOPs per token, without allocating it
        fpt = flops_per_token(build_model('minigpt', 'gelu', config), config)
    item(10 if args.quick else 60, 'all-in gpu-preset trial (train.py)',
         lambda: all_in_trial(args, runner, fpt, rate, work))
    base = None
    for k in (QUICK_LEVELS if dev.type == 'cpu' else LEVELS):
        need = (base or 60) * (0.5 + 0.5 * k)  # each trial of a busier GPU slower: a generous guess
        row = item(need, f"sweep, {k} trial(s) at once", lambda k=k: sweep_level(k, args, runner, fpt, rate, work))
        base = base or row.get('wall_s')
    levels = {r['k']: r for r in out['rows'] if r.get('k')}
    if 1 in levels:
        for r in levels.values():
            r['speedup_vs_1'] = r['tokens_per_s'] / levels[1]['tokens_per_s']
            r['note'] += f"; {r['speedup_vs_1']:.2f}x the throughput of one at a time"


def print_table(out):
    d, m = out['device'], out.get('matmul')
    print(f"bench_gpu on {d['name']} (torch {d['torch']}, CUDA {d['cuda']})" +
          (f": {m['dtype']} {m['n']}^3 matrix products {m['tflops']:.1f} TFLOP/s" if m else ''))
    print(f"{'what':52s} {'ms/step':>9s} {'tokens/s':>12s} {'MFU':>7s} {'peak MB':>9s}  note")
    for r in out['rows']:
        def f(k, spec):
            return format(r[k], spec) if r.get(k) is not None else ''
        print(f"{r['what']:52s} {f('ms_per_step', '9.2f'):>9s} {f('tokens_per_s', '12,.0f'):>12s} "
              f"{f('mfu', '7.2%'):>7s} {f('peak_mb', '9.0f'):>9s}  {r.get('note', '')}")
    print(f"{out['seconds']:.0f} s")
    for n in out['notes']:
        print(n)


if __name__ == '__main__':
    sys.exit(main())
