"""
switchlm step time against minigpt at equal ACTIVE parameters (the parameters one token
goes through), per activation, printed as a table.

    python benchmarks/bench_moe.py --config cpu                      # relu, gelu, swiglu
    python benchmarks/bench_moe.py --config cpu --n_experts 8 --top_k 2

How the dense model is matched: a switchlm expert is as large as the dense feed-forward it
replaces (FeedForward(n_embd, 4 n_embd, act)), so a token goes through top_k experts per
MoE layer. The matched minigpt has the same n_layer, n_embd, n_head and block_size, and in
the blocks that are MoE layers in switchlm a feed-forward of hidden width top_k * 4 n_embd
(top_k = 1: exactly the stock minigpt). Its parameters then equal switchlm's active
parameters except for the routers (n_embd * n_experts weights per MoE layer), which the
table shows in the 'active' columns.

Timed: a full training step (forward, auxiliary losses, backward, fused AdamW; dropout on,
as in a trial) and an evaluation forward of one batch, after warm-up steps.
"""
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from activations import FeedForward  # noqa: E402
from bench_train import time_model  # noqa: E402
from config import Parser, add_config_args, config_from_args  # noqa: E402
from model import _gpt2_init  # noqa: E402
from model_factories import build_model, count_parameters  # noqa: E402
from moe import moe_layer_indices  # noqa: E402
from prepare_data import make_task  # noqa: E402


def active_parameters(model):
    """Parameters a token goes through: all but the (n_experts - top_k) unused experts of
    every MoE layer (the model's own parameter count for a dense model)."""
    total = count_parameters(model)
    for i in getattr(model, 'moe_layers', []):
        layer = model.blocks[i].moe
        per_expert = sum(p.numel() for p in layer.experts[0].parameters())
        total -= (layer.n_experts - layer.top_k) * per_expert
    return total


def matched_minigpt(activation, config, seed=0):
    """minigpt whose feed-forward in switchlm's MoE blocks is top_k times wider."""
    model = build_model('minigpt', activation, config, seed=seed)
    if config.top_k > 1:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            for i in moe_layer_indices(config.n_layer, config.moe_every):
                mlp = FeedForward(config.n_embd, config.top_k * 4 * config.n_embd, activation,
                                  bias=config.bias, dropout=config.dropout)
                mlp.apply(_gpt2_init)
                model.blocks[i].mlp = mlp
    return model


def main():
    parser = Parser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--activations', nargs='+', default=['relu', 'gelu', 'swiglu'])
    parser.add_argument('--steps', type=int, default=20, help='timed training steps per model')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--data-dir', default=None)
    add_config_args(parser)
    args = parser.parse_args()
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    task = make_task(config, args.data_dir)
    config = replace(config, **task.config_updates())
    tokens = config.batch_size * config.block_size
    print(f"preset {args.config or 'cpu'}: {config.n_layer} layers, n_embd {config.n_embd}, block {config.block_size}, "
          f"batch {config.batch_size}; switchlm: {config.n_experts} experts, top-{config.top_k}, capacity "
          f"factor {config.capacity_factor}, MoE every {config.moe_every} block(s); "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'model':10s} {'activation':10s} {'params':>10s} {'active':>10s} {'ms/iter':>9s} {'tokens/s':>10s} "
          f"{'eval ms/batch':>14s} {'x minigpt':>10s}")
    for act in args.activations:
        rows = []
        for name, model in (('minigpt', matched_minigpt(act, config)),
                            ('switchlm', build_model('switchlm', act, config, seed=0))):
            step, fwd = time_model(model, config, task, args.steps, args.warmup)
            rows.append((name, count_parameters(model), active_parameters(model), step, fwd))
        base = rows[0][3]
        for name, total, active, step, fwd in rows:
            print(f"{name:10s} {act:10s} {total:10,d} {active:10,d} {step * 1000:9.1f} {tokens / step:10,.0f} "
                  f"{fwd * 1000:14.1f} {step / base:10.2f}", flush=True)


if __name__ == '__main__':
    main()
