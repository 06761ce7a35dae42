"""
The six character-level language models, and (at the end) the `ffn` classifier of flat
inputs. The language models are causal (the logits at position t depend only on tokens
<= t: tests/test_models.py checks it for every model and activation) and share one
interface:

    logits, loss = model(idx, targets=None)    # idx [B, T] int64 -> logits [B, T, V]

Attention always goes through F.scaled_dot_product_attention(is_causal=True), so GPUs
get fused kernels and no mask is built per step. Dropout draws from torch's global RNG,
which the trainer seeds with the trial's dropout seed; weights are initialised under
the init seed by model_factories.build_model.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from activations import Activation, FeedForward, gated_hidden, is_gated


class Rotary(nn.Module):
    """Rotary position embedding (Su et al.), applied to queries and keys."""

    def __init__(self, head_dim, block_size, base=10000.0):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(block_size).float(), inv_freq)  # [T, hd/2]
        angles = torch.cat([angles, angles], dim=-1)                      # [T, hd]
        self.register_buffer('cos', angles.cos(), persistent=False)
        self.register_buffer('sin', angles.sin(), persistent=False)

    def forward(self, x):  # x [B, nh, T, hd]
        T = x.size(-2)
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return x * self.cos[:T].to(x.dtype) + rotated * self.sin[:T].to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, dropout=0.0, bias=True, fused_qkv=True,
                 rotary=False, block_size=None):
        super().__init__()
        assert n_embd % n_head == 0
        self.n_head = n_head
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        else:
            self.query = nn.Linear(n_embd, n_embd, bias=bias)
            self.key = nn.Linear(n_embd, n_embd, bias=bias)
            self.value = nn.Linear(n_embd, n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.rotary = Rotary(n_embd // n_head, block_size) if rotary else None
        self.resid_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        B, T, C = x.size()
        if self.fused_qkv:
            q, k, v = self.c_attn(x).split(C, dim=2)
        else:
            q, k, v = self.query(x), self.key(x), self.value(x)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        # no dropout on the attention probabilities: on CPU it forces SDPA's unfused path
        # (measured 12x slower forward); dropout acts on every residual branch instead
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def make_norm(kind, n_embd, bias=True):
    if kind == 'layer':
        return nn.LayerNorm(n_embd, bias=bias)
    if kind == 'rms':
        return nn.RMSNorm(n_embd, eps=1e-6)
    raise ValueError(f"unknown norm {kind!r}; valid: layer, rms")


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, n_embd, n_head, activation, dropout=0.0, bias=True, norm='layer',
                 fused_qkv=True, rotary=False, block_size=None, ffn_mult=4):
        super().__init__()
        self.ln_1 = make_norm(norm, n_embd, bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias, fused_qkv, rotary, block_size)
        self.ln_2 = make_norm(norm, n_embd, bias)
        self.mlp = FeedForward(n_embd, ffn_mult * n_embd, activation, bias=bias, dropout=dropout)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class LanguageModel(nn.Module):
    """What every model shares: the length check, the output head (ln_f, lm_head) and the loss."""

    def __init__(self, config):
        super().__init__()
        self.block_size = config.block_size
        self.vocab_size = config.vocab_size

    def check_length(self, idx):
        if idx.dim() != 2:
            raise ValueError(f"expected token indices of shape [batch, time], got {tuple(idx.shape)}")
        if idx.size(1) > self.block_size:
            raise ValueError(f"sequence length {idx.size(1)} exceeds block_size {self.block_size}")

    def head(self, x, targets):
        """(logits, loss) from the last hidden states: every model ends in ln_f and lm_head."""
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def positions(self, idx):
        return torch.arange(idx.size(1), device=idx.device)


class GPT(LanguageModel):
    """The GPT skeleton of charlm, minigpt and switchlm: token + learned position embeddings,
    dropout, n_layer blocks, a final LayerNorm and the head. `make_block(i)` makes block i
    (built after the embeddings: modules are created, and so initialised under the seed, in
    this order). tied: the head shares the token embedding (and has no bias); gpt2_init:
    N(0, 0.02) weights, zero biases, and residual_projection weights scaled by
    1/sqrt(2 n_layer)."""

    def __init__(self, config, make_block, tied=False, gpt2_init=False):
        super().__init__(config)
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(make_block(i) for i in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=c.bias and not tied)
        if tied:
            self.lm_head.weight = self.wte.weight
        if gpt2_init:
            self.apply(_gpt2_init)
            for name, p in self.named_parameters():
                if self.residual_projection(name):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def residual_projection(name):
        """The weights that write into the residual stream (GPT-2 scales their init down)."""
        return name.endswith('c_proj.weight') or name.endswith('mlp.proj.weight')

    def trunk(self, idx):
        """Hidden states [B, T, C] after the last block."""
        self.check_length(idx)
        x = self.drop(self.wte(idx) + self.wpe(self.positions(idx)))
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, idx, targets=None):
        return self.head(self.trunk(idx), targets)


class CharLM(GPT):
    """Pre-LayerNorm transformer, separate query/key/value projections, learned positions."""

    def __init__(self, config, activation):
        c = config
        super().__init__(config, lambda i: Block(c.n_embd, c.n_head, activation, c.dropout, c.bias,
                                                 fused_qkv=False))


class MiniGPT(GPT):
    """GPT-2: pre-LayerNorm, fused QKV, learned positions, 4x MLP, weight tying, GPT-2 init."""

    def __init__(self, config, activation):
        c = config
        super().__init__(config, lambda i: Block(c.n_embd, c.n_head, activation, c.dropout, c.bias),
                         tied=True, gpt2_init=True)


class NanoTransformer(LanguageModel):
    """Minimal modern transformer: RMSNorm, no biases, rotary positions, no dropout (by
    design this architecture ignores config.dropout and config.bias)."""

    def __init__(self, config, activation):
        super().__init__(config)
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, activation, 0.0, bias=False, norm='rms', rotary=True,
                  block_size=c.block_size) for _ in range(c.n_layer))
        self.ln_f = nn.RMSNorm(c.n_embd, eps=1e-6)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.apply(_gpt2_init)

    def forward(self, idx, targets=None):
        self.check_length(idx)
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x, targets)


class RecurrentLM(LanguageModel):
    """What tinylstm and hybridlm share: token embedding, dropout, then a unidirectional
    multi-layer LSTM (a bidirectional one would see the future). Subclasses add their layers
    after these, so modules are created (and initialised) in this order."""

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.lstm = nn.LSTM(c.n_embd, c.n_embd, num_layers=c.n_layer, batch_first=True, bias=c.bias,
                            dropout=c.dropout if c.n_layer > 1 else 0.0)

    def recur(self, idx):
        """The LSTM's outputs [B, T, C]."""
        self.check_length(idx)
        h, _ = self.lstm(self.drop(self.wte(idx)))
        return h


class TinyLSTM(RecurrentLM):
    """The LSTM, then a residual feed-forward with the activation."""

    def __init__(self, config, activation):
        super().__init__(config)
        c = config
        self.ln = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.mlp = FeedForward(c.n_embd, 4 * c.n_embd, activation, bias=c.bias, dropout=c.dropout)
        self.ln_f = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=c.bias)

    def forward(self, idx, targets=None):
        h = self.recur(idx)
        return self.head(h + self.mlp(self.ln(h)), targets)


class CausalConvBlock(nn.Module):
    """x + Linear(act(dilated causal conv(norm(x)))). Padding on the left only, so the
    output at t sees inputs t - (k-1)*dilation .. t and never the future."""

    def __init__(self, n_embd, activation, dilation, kernel_size=3, dropout=0.0, bias=True):
        super().__init__()
        self.ln = nn.LayerNorm(n_embd, bias=bias)
        self.act = Activation(activation)
        hidden = 2 * n_embd
        hidden = gated_hidden(hidden) if self.act.gated else hidden
        self.left_pad = (kernel_size - 1) * dilation
        self.conv = nn.Conv1d(n_embd, hidden * self.act.in_mult, kernel_size, dilation=dilation, bias=bias)
        self.proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):  # x [B, T, C]
        h = F.pad(self.ln(x).transpose(1, 2), (self.left_pad, 0))
        h = self.conv(h).transpose(1, 2)
        return x + self.dropout(self.proj(self.act(h)))


class ConvLM(LanguageModel):
    """Residual causal dilated convolutions (dilation 1, 2, 4, ...), then a causal
    self-attention block over the conv features."""

    def __init__(self, config, activation):
        super().__init__(config)
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.convs = nn.ModuleList(CausalConvBlock(c.n_embd, activation, 2 ** i, dropout=c.dropout, bias=c.bias)
                                   for i in range(c.n_layer))
        self.attn_block = Block(c.n_embd, c.n_head, activation, c.dropout, c.bias)
        self.ln_f = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=c.bias)

    def forward(self, idx, targets=None):
        self.check_length(idx)
        x = self.drop(self.wte(idx))
        for conv in self.convs:
            x = conv(x)
        x = self.attn_block(x)
        return self.head(x, targets)


class HybridLM(RecurrentLM):
    """LSTM, then causal multi-head self-attention over its outputs, then a feed-forward
    with the activation (one pre-norm transformer block)."""

    def __init__(self, config, activation):
        super().__init__(config)
        c = config
        self.attn_block = Block(c.n_embd, c.n_head, activation, c.dropout, c.bias)
        self.ln_f = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=c.bias)

    def forward(self, idx, targets=None):
        return self.head(self.attn_block(self.recur(idx)), targets)


def _gpt2_init(module):
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


MODELS = {
    'charlm': CharLM,
    'tinylstm': TinyLSTM,
    'minigpt': MiniGPT,
    'convlm': ConvLM,
    'hybridlm': HybridLM,
    'nanotransformer': NanoTransformer,
}


# ----------------------------------------------------------------------------- classifier of flat inputs

def ffn_units(config, activation):
    """Hidden units per layer of `ffn` with this activation. Ungated: config.hidden. Gated,
    gated_width 'same' (the original FFN_GeGLU): config.hidden gated units, i.e. hidden units
    on both input matrices (gate and value). Gated, 'matched': the unit count whose real
    parameter count is closest to the ungated model's at config.hidden (ties: fewer units).
    (The LMs' 2/3 rule matches counts only when input and output sizes are equal; here they
    are 40 or 784 in and 10 out.)"""
    if not is_gated(activation) or config.gated_width == 'same':
        return config.hidden
    target = ffn_param_count(config, 'relu', config.hidden)
    return min(range(1, 2 * config.hidden + 1),
               key=lambda u: (abs(ffn_param_count(config, activation, u) - target), u))


def ffn_param_count(config, activation, units):
    """Parameters of an ffn with `units` per layer, counted on a model built on the meta
    device (no memory, no random numbers drawn)."""
    with torch.device('meta'):
        return sum(p.numel() for p in FFN(config, activation, units).parameters())


class FFN(nn.Module):
    """flatten -> [Linear(d, units x in_mult) -> activation (-> dropout)] x depth -> Linear(units, classes).
    Input size config.n_inputs and classes config.vocab_size, both set by the task
    (prepare_data.make_task(...).config_updates()). forward(x, targets=None) ->
    (logits [B, classes], cross-entropy or None)."""

    def __init__(self, config, activation, units=None):
        super().__init__()
        if config.n_inputs <= 0 or config.vocab_size <= 0:
            raise ValueError(f"ffn needs n_inputs and vocab_size (classes) > 0, got {config.n_inputs} and "
                             f"{config.vocab_size}; a classification task sets them (784 / 40 inputs, 10 classes)")
        self.units = units or ffn_units(config, activation)
        d, layers = config.n_inputs, []
        for _ in range(config.depth):
            act = Activation(activation)
            layers += [nn.Linear(d, self.units * act.in_mult, bias=config.bias), act]
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            d = self.units
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, config.vocab_size, bias=config.bias)

    def forward(self, x, targets=None):
        logits = self.head(self.body(x.flatten(1)))
        return logits, None if targets is None else F.cross_entropy(logits, targets)

    def trial_metrics(self):
        return {'ffn_units': self.units}  # the report shows both arms' widths and counts
