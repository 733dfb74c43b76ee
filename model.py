"""The image GPT of LlamaGen: a plain Llama decoder over a raster of VQ codes, conditioned on a class.

Why this generates images (paper 2.3): the tokenizer turns an image into an h x w grid of discrete codes.
Read in raster order, the grid is a sentence of L = h*w words, so p(image | class) factorises exactly into
prod_t p(code_t | class, code_<t), each factor a softmax over the codebook. Training is next-token
prediction with cross-entropy; sampling draws one code at a time and the tokenizer decodes the grid.

Layout, bottom-up: RMSNorm, Linear, 2D rotary helpers, KV cache, Attention, FeedForward, Block, the class
embedding, GPTConfig, GPT (forward, generate, from_pretrained, optimiser, FLOPs/MFU), then the registry.
Weight key names and shapes follow the official release, so its checkpoints load unchanged.
"""
import inspect
import math
import os
import re
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, load_checkpoint, load_weights, unwrap_state_dict


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # float32 statistics even when the model runs in bf16
        return (xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Linear(nn.Linear):
    """A bias-free nn.Linear. A decode step multiplies only a few rows by each weight matrix; for such
    float32 rows on CPU, MKL runs x @ W^T far below memory speed, while the same product computed as
    (W @ x^T)^T streams W once (all GPT-B matmuls of one decode step, 2 threads: 2 rows 41 -> 11 ms,
    16 rows 48 -> 39 ms). Identical maths in another loop order; every other case is plain F.linear."""

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out, bias=False)

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if 1 < rows <= 16 and x.device.type == "cpu" and x.dtype == torch.float32:
            return (self.weight @ x.reshape(rows, -1).t()).t().reshape(*x.shape[:-1], -1)
        return F.linear(x, self.weight)


# ----------------------------------------------------------------------------------------------- 2D RoPE
# Position is not a learned table added to the input: each query/key pair is rotated by angles that
# depend on its grid cell, so the score q.k depends only on the OFFSET between two cells (paper 2.3).
# Half of each head encodes the row, half the column, so "the cell above" and "the cell to the left"
# are distinct relations; and no learned table ties the weights to one grid size.
def rope_2d_table(grid, head_dim, base=10000.0, n_cond=1):
    """(n_cond + grid^2, head_dim/2, 2) table of (cos, sin). Pair m < head_dim/4 turns by row * f_m, the
    rest by col * f_(m - head_dim/4), f_k = base^(-2k / (head_dim/2))."""
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2)[: half // 2].float() / half)
    angle = torch.outer(torch.arange(grid, dtype=torch.float32), freqs)  # (grid, head_dim/4)
    rows = angle[:, None, :].expand(grid, grid, -1)  # row axis first ...
    cols = angle[None, :, :].expand(grid, grid, -1)  # ... then the column axis
    cells = torch.cat([rows, cols], dim=-1).flatten(0, 1)  # raster order, (grid^2, head_dim/2)
    table = torch.stack([cells.cos(), cells.sin()], dim=-1)
    # Official quirk kept for weight compatibility: condition positions get all-ZERO rows, not the
    # identity rotation. The class token's q and k therefore vanish: every query scores exactly 0 against
    # the class key, and the class token itself attends uniformly (alone in its causal window, so its
    # output is its own value). The class still conditions everything through its value vector.
    return torch.cat([torch.zeros(n_cond, half, 2), table])


def apply_rope(x, rope):
    """Rotate adjacent pairs (x[2m], x[2m+1]) of x (B, T, heads, head_dim) by the rows of rope (T, D/2, 2)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = rope[:, None, :, 0], rope[:, None, :, 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).type_as(x)


class KVCache:
    """Keys and values of every position seen so far, for one layer (gpt-fast style: one static buffer
    written by position). Decoding code t then costs one token's worth of compute instead of re-running
    all t previous positions, O(L) instead of O(L^2) work per image. Not a module: never in a state dict."""

    def __init__(self, batch, length):
        self.batch, self.length, self.k, self.v = batch, length, None, None

    def update(self, pos, k, v):
        """Write k, v (b, heads, T, D) at positions pos..pos+T-1; return views of the filled prefix of the
        first b rows (b shrinks from 2B to B when classifier-free guidance stops)."""
        if self.k is None:  # allocated once, in the dtype the projections produce
            shape = (self.batch, k.shape[1], self.length, k.shape[3])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        b, end = k.shape[0], pos + k.shape[2]
        self.k[:b, :, pos:end] = k
        self.v[:b, :, pos:end] = v
        return self.k[:b, :, :end], self.v[:b, :, :end]


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head or c.n_head, c.dim // c.n_head
        self.wqkv = Linear(c.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim)
        self.wo = Linear(c.dim, c.dim)
        self.attn_dropout_p = c.attn_dropout_p
        self.resid_dropout = nn.Dropout(c.resid_dropout_p)
        self.kv_cache = None  # a KVCache while generate() runs

    def forward(self, x, rope, pos=0):
        B, T, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv, kv], dim=-1)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(k.view(B, T, self.n_kv_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.kv_cache is not None:  # one new token attends to the whole filled prefix: no mask needed
            k, v = self.kv_cache.update(pos, k, v)
        gqa = {"enable_gqa": True} if self.n_kv_head != self.n_head else {}  # shares k/v heads, no copies
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, **gqa,
                                           dropout_p=self.attn_dropout_p if self.training else 0.0)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, -1)))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, c):
        super().__init__()
        self.w1 = Linear(c.dim, c.ffn_dim)
        self.w3 = Linear(c.dim, c.ffn_dim)
        self.w2 = Linear(c.ffn_dim, c.dim)
        self.ffn_dropout = nn.Dropout(c.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def drop_path(x, p, training):
    """Stochastic depth: skip a residual branch for whole samples, scaling the survivors by 1/(1-p)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    def __init__(self, c, drop_path_p=0.0):
        super().__init__()
        self.attention, self.feed_forward = Attention(c), FeedForward(c)
        self.attention_norm = RMSNorm(c.dim, c.norm_eps)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)
        self.drop_path_p = drop_path_p

    def forward(self, x, rope, pos=0):
        x = x + drop_path(self.attention(self.attention_norm(x), rope, pos), self.drop_path_p, self.training)
        return x + drop_path(self.feed_forward(self.ffn_norm(x)), self.drop_path_p, self.training)


class ClassEmbedding(nn.Module):
    """The class is the first token of the sequence (paper 2.3): a prefix that every image token attends
    to, so conditioning needs no extra machinery (no cross-attention, no adaptive norms). Row num_classes
    is a learned "null class"; training swaps a label for it with probability class_dropout_prob, so one
    network learns both p(x | class) and p(x), which classifier-free guidance needs."""

    def __init__(self, num_classes, dim, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        self.null_class, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.null_class, labels)
        return self.embedding_table(labels).unsqueeze(1)  # (B, 1, dim)


@dataclass
class GPTConfig:
    vocab_size: int = 16384
    block_size: int = 256  # image tokens per sample, a perfect square (16 x 16 codes for 256 px)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # None: one k/v head per query head; fewer: grouped-query attention
    dim: int = 768
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    num_classes: int = 1000
    cls_token_num: int = 1
    class_dropout_prob: float = 0.1
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0

    def __post_init__(self):
        grid = math.isqrt(self.block_size)
        problems = [
            (grid * grid != self.block_size, f"block_size {self.block_size} is not a square number of tokens"),
            (self.dim % self.n_head != 0, f"dim {self.dim} is not divisible by n_head {self.n_head}"),
            (self.dim // self.n_head % 4 != 0, f"head_dim {self.dim // self.n_head} must be a multiple of 4 "
                                               "(2D RoPE splits it in row and column halves of pairs)"),
            (self.n_head % (self.n_kv_head or self.n_head) != 0, "n_head must be a multiple of n_kv_head"),
            (self.cls_token_num != 1, "class-conditional models use exactly one condition token"),
        ]
        for bad, message in problems:
            if bad:
                raise UserError(f"GPTConfig: {message}")

    @property
    def ffn_dim(self):  # Llama's SwiGLU width: 2/3 of 4*dim (same parameters as a GELU MLP), rounded up
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return -(-hidden // self.multiple_of) * self.multiple_of


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.cls_embedding = ClassEmbedding(c.num_classes, c.dim, c.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.tok_dropout = nn.Dropout(c.token_dropout_p)  # elementwise, on [class ; codes] embeddings
        rates = torch.linspace(0, c.drop_path_rate, c.n_layer, device="cpu").tolist()
        self.layers = nn.ModuleList(Block(c, p) for p in rates)
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.output = Linear(c.dim, c.vocab_size)
        # a plain float32 attribute, not a buffer: outside the state dict, and .to(bfloat16) cannot round it
        self.freqs_cis = rope_2d_table(math.isqrt(c.block_size), c.dim // c.n_head, c.rope_base, c.cls_token_num)
        self.meta = {}  # from_pretrained: train.py's receipt of the codes learned (tokenizer checksum, grid)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.output.weight)  # every code equally likely at step 0

    def _rope(self, device):
        if self.freqs_cis.device != device:
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis

    def forward(self, idx, cond, targets=None):
        """Training semantics in any mode: input [class ; idx[:, :-1]] -> T logits (float32), logit t
        predicting idx[:, t]; loss = mean cross-entropy against targets."""
        n, T = self.config.cls_token_num, idx.shape[1]
        assert T <= self.config.block_size, f"{T} codes, but block_size is {self.config.block_size}"
        x = torch.cat([self.cls_embedding(cond), self.tok_embeddings(idx[:, :-1])], dim=1)
        x = self.tok_dropout(x)
        rope = self._rope(x.device)[: x.shape[1]]
        for layer in self.layers:
            x = layer(x, rope)
        logits = self.output(self.norm(x[:, n - 1:])).float()
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def forward_cached(self, x, pos):
        """One step of generation: embeddings x (b, T, dim) at positions pos.. go through the layers,
        reading and extending the KV caches; returns the last position's logits (b, vocab) in float32."""
        rope = self._rope(x.device)[pos:pos + x.shape[1]]
        for layer in self.layers:
            x = layer(x, rope, pos)
        return self.output(self.norm(x[:, -1])).float()

    @torch.no_grad()
    def generate(self, cond, cfg_scale=1.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0,
                 greedy=False, generator=None, callback=None):
        """Sample codes int64 (B, block_size) for class labels cond (B,), one token at a time."""
        c, B, L = self.config, cond.shape[0], self.config.block_size
        # Classifier-free guidance (paper 2.3): run each sample twice, with its class and with the null
        # class, and extrapolate, logits = uncond + s * (cond - uncond). s > 1 pushes every step towards
        # what is specific to the class: higher fidelity and stronger class identity, less diversity.
        guided = cfg_scale != 1.0
        labels = torch.cat([cond, torch.full_like(cond, c.num_classes)]) if guided else cond
        was_training = self.training
        self.eval()
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(len(labels), c.cls_token_num + L - 1)  # exact length
        codes = torch.empty(B, L, dtype=torch.long, device=cond.device)
        self._rope(cond.device)  # moved here, so a compiled forward_cached never has to
        try:
            x, pos = self.cls_embedding(labels), 0  # prefill: the class token
            for t in range(L):
                logits = self.forward_cached(x, pos)
                pos += x.shape[1]
                if len(logits) > B:  # rows are [cond ; uncond]
                    cond_logits, uncond_logits = logits.split(B)
                    logits = uncond_logits + cfg_scale * (cond_logits - uncond_logits)
                codes[:, t] = sample_logits(logits, temperature, top_k, top_p, greedy, generator)
                if callback is not None:
                    callback(t + 1, codes[:, :t + 1])
                # official cfg_interval: tokens 0 .. cfg_interval+1 are guided; after that only the
                # conditional half runs (its cache rows come first, so it simply keeps going)
                still_guided = guided and (cfg_interval < 0 or t <= cfg_interval)
                x = self.tok_embeddings(codes[:, t:t + 1].repeat(2 if still_guided else 1, 1))
        finally:
            for layer in self.layers:
                layer.attention.kv_cache = None
            self.train(was_training)
        return codes

    @classmethod
    def from_pretrained(cls, path, block_size=None, **overrides):
        """Our checkpoints or the official c2i_*.pt releases (any container) -> model in eval mode on the
        CPU. The config comes from the checkpoint (ours) or its tensor shapes (official); block_size, when
        given, replaces the saved one (official files save none: GPTConfig's default then)."""
        ckpt = load_checkpoint(path)
        if ckpt.get("kind", "gpt") != "gpt":
            raise UserError(f"{path} is a {ckpt['kind']!r} checkpoint, not a GPT; pass a GPT checkpoint")
        sd = unwrap_state_dict(ckpt)
        found = config_from_state_dict(sd, overrides.get("n_head"))
        saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else None
        names = {f.name for f in fields(GPTConfig)}
        cfg = {k: v for k, v in saved.items() if k in names} if saved else dict(found)
        if block_size is not None:
            cfg["block_size"] = block_size
        cfg.update(overrides)
        model = cls(GPTConfig(**cfg))
        name = next((k for k, v in GPT_CONFIGS.items() if all(found.get(f) == v[f] for f in v)), None)
        fits = f"GPT-{name}" if name else ", ".join(f"{k}={v}" for k, v in found.items())
        load_weights(model, sd, f"GPT checkpoint {path!r}", ignore=("kv_cache", "freqs_cis"),
                     hint=f"its shapes fit {fits}")
        model.meta = ckpt["meta"] if isinstance(ckpt.get("meta"), dict) else {}
        return model.eval()

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on matrices and embeddings (>= 2-D) only, never on norm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self):
        """Training FLOPs per token, forward + backward (PaLM appendix B, as in nanoGPT): 6 per weight
        used in a matmul (embedding tables are lookups) plus 12 * n_layer * dim * sequence for attention."""
        c = self.config
        n = sum(p.numel() for p in self.parameters())
        n -= self.tok_embeddings.weight.numel() + self.cls_embedding.embedding_table.weight.numel()
        return 6 * n + 12 * c.n_layer * c.dim * (c.cls_token_num + c.block_size - 1)

    def estimate_mfu(self, tokens_per_second, device):
        """Model FLOPs utilisation: achieved training FLOP/s over the GPU's dense bf16 peak (None if unknown)."""
        if not str(device).startswith("cuda"):
            return None
        gpu = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
        return None if peak is None else self.flops_per_token() * tokens_per_second / peak


PEAK_BF16_FLOPS = {"A100": 312e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12}  # dense, SXM


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """logits / temperature, with everything outside the top_k largest (0 = off) and outside the top-p
    nucleus set to -inf. The nucleus keeps the most likely tokens up to and including the first one whose
    cumulative probability crosses top_p, so the top token always survives (REFERENCE 4)."""
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = torch.zeros_like(cumulative, dtype=torch.bool)
        drop[..., 1:] = cumulative[..., :-1] > top_p  # the mass before this token already exceeds p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_logits(logits, temperature=1.0, top_k=0, top_p=1.0, greedy=False, generator=None):
    """One token per row of logits (b, vocab): argmax if greedy, else a draw from the filtered softmax."""
    if greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def config_from_state_dict(sd, n_head=None):
    """The shape fields of a GPT state dict: dim, vocab, layers, classes, k/v heads. n_head is not stored
    in any shape: take it from the registry entry with this dim and depth, else the given one, else
    head_dim 64."""
    if "tok_embeddings.weight" not in sd or "cls_embedding.embedding_table.weight" not in sd:
        raise UserError("not a class-conditional LlamaGen GPT checkpoint (no tok_embeddings / "
                        "cls_embedding.embedding_table weights); text-conditional t2i models are not supported")
    vocab, dim = sd["tok_embeddings.weight"].shape
    n_layer = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("layers.")), default=-1)
    same = [v for v in GPT_CONFIGS.values() if v["dim"] == dim and v["n_layer"] == n_layer]
    n_head = same[0]["n_head"] if same else n_head or max(1, dim // 64)
    qkv = sd.get("layers.0.attention.wqkv.weight")
    n_kv = n_head if qkv is None else (qkv.shape[0] - dim) // (2 * (dim // n_head))
    return dict(vocab_size=vocab, dim=dim, n_layer=n_layer, n_head=n_head,
                n_kv_head=None if n_kv == n_head else n_kv,
                num_classes=sd["cls_embedding.embedding_table.weight"].shape[0] - 1)


# The model zoo (paper Table 1; XXXL, 1B and 7B exist only in the official code). Parameter counts at
# vocab 16384 / 1000 classes: B 111M, L 343M, XL 775M, XXL 1.4B, XXXL 3.9B, 1B 1.2B, 3B 3.1B (head_dim
# 100), 7B 6.6B. "nano" (5.4M) and "micro" (13.8M) are ours, for CPU tests and demos; most of their
# weights are the 16384-code embedding and output tables, so pair them with a small codebook.
GPT_CONFIGS = {
    "nano": dict(n_layer=4, n_head=4, dim=128),
    "micro": dict(n_layer=6, n_head=8, dim=256),
    "B": dict(n_layer=12, n_head=12, dim=768),
    "L": dict(n_layer=24, n_head=16, dim=1024),
    "XL": dict(n_layer=36, n_head=20, dim=1280),
    "XXL": dict(n_layer=48, n_head=24, dim=1536),
    "XXXL": dict(n_layer=48, n_head=40, dim=2560),
    "1B": dict(n_layer=22, n_head=32, dim=2048),
    "3B": dict(n_layer=24, n_head=32, dim=3200),
    "7B": dict(n_layer=32, n_head=32, dim=4096),
}


def gpt_config(name, **overrides):
    """GPTConfig of a registry entry ("B" or "GPT-B"), with any field overridden."""
    key = name.removeprefix("GPT-")
    if key not in GPT_CONFIGS:
        raise UserError(f"unknown GPT config {name!r}; choose one of {', '.join(GPT_CONFIGS)}")
    return GPTConfig(**{**GPT_CONFIGS[key], **overrides})
