"""
switchlm: a minigpt-style causal transformer whose feed-forward, in every `moe_every`-th
block, is a Switch (mixture-of-experts) layer (Fedus et al. 2021), with the router
stabilisation of ST-MoE (Zoph et al. 2022).

The Switch layer
  - `n_experts` experts, each a FeedForward(n_embd, 4 * n_embd, activation): as large as
    the dense feed-forward it replaces (gated activations get the 2/3 width rule of
    activations.py, like every other feed-forward here);
  - router: a bias-free Linear(n_embd, n_experts) computed in float32 (autocast off),
    initialised N(0, (0.02 * router_init_scale)^2), i.e. `router_init_scale` times the
    model's usual init std (default 0.01: 100x smaller, as the original work did);
  - optional jitter (training only): the router input is multiplied by U(1-eps, 1+eps)
    noise, eps = `router_jitter`, drawn from torch's global RNG, which the trainer seeds
    with the trial's dropout seed (so `--vary dropout/all` covers it);
  - top-1 routing (`top_k` 2 allowed). Top-1: output = p_e(x) * E_e(x) (Switch). Top-2:
    the two gates are the router probabilities renormalised over the chosen pair (GShard);
  - a token over capacity gets no expert output: the layer returns 0 for it, so the block's
    residual passes it on unchanged. Dropped assignments are counted.

Capacity and causality
  Capacity is counted per sequence, in position order, and is a constant:
      capacity = min(block_size, ceil(capacity_factor * top_k * block_size / n_experts))
  slots per expert per sequence. An assignment of the token at position t to expert e is
  kept iff fewer than `capacity` assignments of positions < t *in the same sequence* went
  to e (earlier tokens win; a token's two top-2 choices are distinct experts, so the order
  inside one position does not matter). Hence whether a token is dropped depends only on
  the routing of tokens <= t of its own sequence, and routing depends only on the hidden
  state at t, which the causal attention computes from tokens <= t. Consequences:
    * causality: a later token can never displace an earlier one (capacity computed over
      the whole sequence, as in the Switch paper, would let it);
    * no coupling across the batch: a sequence's logits do not depend on the other
      sequences it is batched with (the prediction set is evaluated in batches);
    * prefix consistency: the capacity does not depend on the actual length T (it is
      computed from block_size), so the logits at t are the same for any T > t.
  Training and evaluation use the same capacity factor.

Auxiliary losses (training only, in `self.aux_loss`, which the trainer adds to the task
loss; reported losses stay the task loss alone). Per MoE layer, over the N = B*T tokens
of the batch, with router probabilities p (softmax of the float32 router logits z):
    load balancing (Switch):  L_aux = E * sum_e f_e * P_e,
        f_e = fraction of the N*top_k router assignments that chose e (before capacity),
        P_e = mean over tokens of p_e;   = 1 for a perfectly balanced router
    router z-loss (ST-MoE):   L_z = mean over tokens of (logsumexp_e z)^2
    aux_loss = sum over MoE layers of (aux_loss_coef * L_aux + z_loss_coef * L_z).

Per-trial metrics (`trial_metrics()`, merged into the trial JSON by train.py): routing
statistics on the reproducibility evaluation set (accumulated over the predict() pass,
i.e. over the batches whose `eval_extras()` the trainer collected) and the auxiliary
losses over the last 10% of training forward passes. See trial_metrics for the keys.

Routing saved per trial (`eval_extras()`, concatenated by train.predict into the .npz):
    routing          int16 [n_eval, n_moe_layers, block_size]  the router's first choice
                     (argmax expert) of every position of every evaluation window, in
                     every MoE layer (ordered by depth), whether or not it was dropped
    routing_dropped  bool  [n_eval, n_moe_layers, block_size]  that first-choice
                     assignment was over capacity
routing_metrics.py compares these arrays between trials.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from activations import FeedForward
from model import GPT, Block, CausalSelfAttention

# fraction of the training forward passes, from the end, over which train metrics are averaged
TRAIN_METRICS_TAIL = 0.1


# ----------------------------------------------------------------------------- pure routing maths

def expert_capacity(block_size, n_experts, top_k, capacity_factor):
    """Slots per expert per sequence (see the module docstring)."""
    return max(1, min(block_size, math.ceil(capacity_factor * top_k * block_size / n_experts)))


def capacity_keep(choices, n_experts, capacity):
    """choices [B, T, k]: expert indices (distinct within a position). Returns keep
    [B, T, k] bool: the assignment (b, t, j) is kept iff fewer than `capacity` assignments
    at positions < t of sequence b chose the same expert. Causal and per sequence."""
    per_pos = F.one_hot(choices, n_experts).sum(2)           # [B, T, E], entries 0/1
    before = per_pos.cumsum(1) - per_pos                      # assignments at positions < t
    return before.gather(2, choices) < capacity


def load_balancing_loss(probs, choices, n_experts):
    """Switch load-balancing loss E * sum_e f_e P_e. probs [N, E] router probabilities,
    choices [N, k] chosen experts (before capacity)."""
    f = F.one_hot(choices, n_experts).sum((0, 1)).to(probs.dtype) / choices.numel()
    return n_experts * (f * probs.mean(0)).sum()


def router_z_loss(logits):
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. logits [N, E]."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


# ----------------------------------------------------------------------------- the layer

class SwitchFeedForward(nn.Module):
    """Router + experts. forward(x [B, T, C]) -> (y [B, T, C], info dict)."""

    def __init__(self, n_embd, hidden, activation, n_experts, top_k, capacity_factor, block_size,
                 router_jitter=0.0, bias=True, dropout=0.0):
        super().__init__()
        self.n_experts, self.top_k, self.jitter = n_experts, top_k, router_jitter
        self.capacity = expert_capacity(block_size, n_experts, top_k, capacity_factor)
        self.router = nn.Linear(n_embd, n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(n_embd, hidden, activation, bias=bias, dropout=dropout)
                                     for _ in range(n_experts))

    def route(self, x):
        """float32 router: logits [B, T, E], probabilities, chosen experts [B, T, k] and
        their gates [B, T, k]."""
        with torch.autocast(x.device.type, enabled=False):
            h = x.float()
            if self.training and self.jitter > 0:
                h = h * torch.empty_like(h).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            logits = F.linear(h, self.router.weight.float())
            probs = logits.softmax(-1)
            gates, choices = probs.topk(self.top_k, dim=-1)
            if self.top_k > 1:
                gates = gates / gates.sum(-1, keepdim=True)
        return logits, probs, choices, gates

    def forward(self, x):
        B, T, C = x.shape
        E, k = self.n_experts, self.top_k
        logits, probs, choices, gates = self.route(x)
        keep = capacity_keep(choices, E, self.capacity)                  # [B, T, k]
        xf = x.reshape(B * T, C)
        flat_choice, flat_keep, flat_gate = choices.reshape(-1), keep.reshape(-1), gates.reshape(-1)
        out = x.new_zeros(B * T * k, C)                                   # one row per assignment
        for e, expert in enumerate(self.experts):
            # an expert with no token still runs (on 0 rows): its parameters get a zero gradient
            a = torch.nonzero((flat_choice == e) & flat_keep, as_tuple=True)[0]
            y = expert(xf[a // k]) * flat_gate[a, None]
            out.index_put_((a,), y.to(out.dtype))  # each row written at most once: deterministic
        y = out.view(B * T, k, C).sum(1) if k > 1 else out
        info = self._info(logits, probs, choices, keep)
        return y.view(B, T, C), info

    def _info(self, logits, probs, choices, keep):
        E = self.n_experts
        logits2, probs2, choices2 = logits.reshape(-1, E), probs.reshape(-1, E), choices.reshape(-1, self.top_k)
        aux = load_balancing_loss(probs2, choices2, E)
        z = router_z_loss(logits2)
        with torch.no_grad():
            chosen = F.one_hot(choices2, E).sum((0, 1))
            kept = (F.one_hot(choices2, E) * keep.reshape(-1, self.top_k, 1)).sum((0, 1))
            entropy = -(probs2 * torch.log_softmax(logits2, -1)).sum(-1).mean()
            # stats row: chosen[E], kept[E], then entropy, aux, z weighted by the token
            # count n, then n: summing rows over batches gives token-weighted means
            n = probs2.shape[0]
            stats = torch.cat([chosen.double(), kept.double(),
                               torch.stack([entropy, aux.detach(), z.detach()]).double() * n,
                               probs2.new_tensor([n], dtype=torch.float64)])
        return {'aux_loss': aux, 'z_loss': z, 'stats': stats,
                'first_choice': choices[..., 0], 'first_dropped': ~keep[..., 0]}


class SwitchBlock(nn.Module):
    """Pre-norm block whose feed-forward is a SwitchFeedForward: x + attn(ln(x)), then
    x + moe(ln(x)); dropped tokens get 0 from the moe branch (residual only)."""

    def __init__(self, c, activation):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.attn = CausalSelfAttention(c.n_embd, c.n_head, c.dropout, c.bias)
        self.ln_2 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.moe = SwitchFeedForward(c.n_embd, 4 * c.n_embd, activation, c.n_experts, c.top_k,
                                     c.capacity_factor, c.block_size, c.router_jitter, c.bias, c.dropout)
        self.info = None

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        y, self.info = self.moe(self.ln_2(x))
        return x + y


def moe_layer_indices(n_layer, moe_every):
    """Blocks with a Switch feed-forward: the last of every group of `moe_every`
    (moe_every=1: all; 2: blocks 1, 3, ...)."""
    return [i for i in range(n_layer) if i % moe_every == moe_every - 1]


class SwitchLM(GPT):
    """minigpt (GPT-2: pre-LayerNorm, fused QKV, learned positions, weight tying, GPT-2 init
    with scaled residual projections) with Switch feed-forwards; see the module docstring."""

    def __init__(self, config, activation):
        c = config
        # checked before anything is allocated
        if c.moe_every > c.n_layer:
            raise ValueError(f"switchlm: moe_every ({c.moe_every}) > n_layer ({c.n_layer}) leaves no "
                             f"mixture-of-experts layer")
        moe_layers = moe_layer_indices(c.n_layer, c.moe_every)
        super().__init__(config, lambda i: SwitchBlock(c, activation) if i in moe_layers
                         else Block(c.n_embd, c.n_head, activation, c.dropout, c.bias), tied=True, gpt2_init=True)
        self.n_experts, self.top_k = c.n_experts, c.top_k
        self.aux_loss_coef, self.z_loss_coef = c.aux_loss_coef, c.z_loss_coef
        self.moe_layers = moe_layers
        for i in self.moe_layers:
            nn.init.normal_(self.blocks[i].moe.router.weight, mean=0.0, std=0.02 * c.router_init_scale)
        self.aux_loss = None
        self._last = None          # (stats [L, 2E+4], first choice [B, L, T], dropped [B, L, T])
        self._train_stats = []     # stats of every training forward pass
        self._eval_stats = None    # sum of stats over the batches eval_extras() was asked for

    @staticmethod
    def residual_projection(name):  # the experts' down projections too
        return GPT.residual_projection(name) or ('.experts.' in name and name.endswith('.proj.weight'))

    def forward(self, idx, targets=None):
        x = self.trunk(idx)
        infos = [self.blocks[i].info for i in self.moe_layers]
        stats = torch.stack([i['stats'] for i in infos])
        self._last = (stats, torch.stack([i['first_choice'] for i in infos], 1),
                      torch.stack([i['first_dropped'] for i in infos], 1))
        if self.training:
            self.aux_loss = sum(self.aux_loss_coef * i['aux_loss'] + self.z_loss_coef * i['z_loss']
                                for i in infos)
            self._train_stats.append(stats)
            self._eval_stats = None  # the weights change: evaluation statistics start over
        else:
            self.aux_loss = None
        for block in self.blocks:
            if isinstance(block, SwitchBlock):
                block.info = None  # hold no graph beyond this call
        return self.head(x, targets)

    # ------------------------------------------------------------------ trainer hooks

    def eval_extras(self):
        """Routing of the last forward pass (see the module docstring); also adds its
        routing statistics to those trial_metrics() reports for the evaluation set."""
        if self._last is None:
            return {}
        stats, choice, dropped = self._last
        s = stats.detach().cpu().numpy()
        self._eval_stats = s if self._eval_stats is None else self._eval_stats + s
        return {'routing': choice.detach().cpu().numpy().astype(np.int16),
                'routing_dropped': dropped.detach().cpu().numpy().astype(bool)}

    def checkpoint_state(self):
        """What a mid-trial checkpoint carries besides the weights: the training passes'
        statistics that trial_metrics() averages (checkpoint.py)."""
        return {'train_stats': list(self._train_stats)}

    def load_checkpoint_state(self, state):
        device = self.lm_head.weight.device
        self._train_stats = [s.to(device) for s in state['train_stats']]

    def trial_metrics(self):
        """JSON-ready routing statistics. On the evaluation set (the batches passed through
        eval_extras, i.e. the trainer's predict pass):
            moe_layers                    block index of each MoE layer
            moe_capacity                  slots per expert per sequence
            moe_expert_utilisation        [layer][expert] fraction of router assignments
                                          (before capacity) that chose the expert
            moe_dropped_fraction          fraction of assignments over capacity, all layers
            moe_dropped_fraction_per_layer
            moe_router_entropy            mean router entropy (nats; ln n_experts = uniform),
                                          mean over layers; and _per_layer
            moe_aux_loss, moe_z_loss      unweighted losses summed over layers (per-batch
                                          values, token-weighted mean over batches)
        Over the last 10% of training forward passes (at least one):
            moe_train_aux_loss, moe_train_z_loss, moe_train_dropped_fraction,
            moe_train_router_entropy, moe_train_expert_utilisation
        """
        E = self.n_experts
        out = {'moe_layers': list(self.moe_layers), 'moe_capacity': self.blocks[self.moe_layers[0]].moe.capacity}

        def summarise(s, prefix):  # s: summed stats rows [L, 2E+4]
            chosen, kept = s[:, :E], s[:, E:2 * E]
            ent, aux, z, n = (s[:, 2 * E + j] for j in range(4))
            total = chosen.sum(1)
            return {f'{prefix}expert_utilisation': (chosen / total[:, None]).tolist(),
                    f'{prefix}dropped_fraction': float(1.0 - kept.sum() / total.sum()),
                    f'{prefix}dropped_fraction_per_layer': (1.0 - kept.sum(1) / total).tolist(),
                    f'{prefix}router_entropy': float((ent / n).mean()),
                    f'{prefix}router_entropy_per_layer': (ent / n).tolist(),
                    f'{prefix}aux_loss': float((aux / n).sum()),
                    f'{prefix}z_loss': float((z / n).sum())}

        if self._eval_stats is not None:
            out.update(summarise(self._eval_stats, 'moe_'))
        if self._train_stats:
            tail = self._train_stats[-max(1, math.ceil(TRAIN_METRICS_TAIL * len(self._train_stats))):]
            t = summarise(torch.stack(tail).sum(0).cpu().numpy(), 'moe_train_')
            out.update({k: v for k, v in t.items() if not k.endswith('per_layer')})
        return out
