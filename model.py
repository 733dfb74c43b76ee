"""The image GPT of LlamaGen: a plain Llama decoder over a raster of VQ codes, conditioned on a
class or a caption.

Why this generates images (paper 2.3): the tokenizer turns an image into an h x w grid of discrete
codes. Read in raster order, the grid is a sentence of L = h*w words, so p(image | class) factorises
exactly into prod_t p(code_t | class, code_<t), each factor a softmax over the codebook. Training is
next-token prediction with cross-entropy; sampling draws one code at a time and the tokenizer
decodes the grid. Nothing in the network is image-specific except where positions come from (2D
RoPE): it is the text LLM with image codes as its vocabulary and the condition as its prompt.

Read top to bottom: RMSNorm, 2D rotary positions, the KV cache, Attention, FeedForward, Block, the
condition prefix (class embedding, caption embedding, the caption's attention mask), GPTConfig, the
sampling helpers, faster sampling (the fixed-shape decode step, speculative Jacobi decoding), the
loading helpers, GPT (forward, generate, decode_step, from_pretrained), the registry, and last a
CPU speed detail of the linear layers. Key names and shapes follow the official release (LlamaGen
autoregressive/models/gpt.py), so its c2i and t2i checkpoints load unchanged."""
import math
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, attention, load_checkpoint, load_weights, unwrap_state_dict


class RMSNorm(nn.Module):
    """Llama's norm: x / rms(x) * gain, no mean subtraction and no bias (cheaper than LayerNorm and
    as good in practice). The statistics are taken in float32 even when the model runs in bf16, as
    the official code does: a bf16 mean of squares over 768+ channels loses too many digits."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        rms = torch.rsqrt((xf * xf).mean(-1, keepdim=True) + self.eps)
        return (xf * rms).type_as(x) * self.weight


# ------------------------------------------------------------------------------------------ 2D RoPE
# Position is not a learned table added to the input: each query/key pair is rotated by angles that
# depend on its grid cell, so the score q.k depends only on the OFFSET between two cells (paper
# 2.3). Half of each head encodes the row, half the column, so "the cell above" and "the cell to the
# left" are distinct relations rather than 16 and 1 steps of a flat sequence; and with no learned
# table the same weights run on 16x16 and 24x24 grids.
def rope_2d_table(grid, head_dim, base=10000.0, n_cond=1):
    """(n_cond + grid^2, head_dim/2, 2) table of (cos, sin). Pair m < head_dim/4 turns by row * f_m,
    the rest by col * f_(m - head_dim/4), f_k = base^(-2k / (head_dim/2))."""
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2)[: half // 2].float() / half)
    angle = torch.outer(torch.arange(grid, dtype=torch.float32), freqs)  # (grid, head_dim/4)
    rows = angle[:, None, :].expand(grid, grid, -1)  # row axis first ...
    cols = angle[None, :, :].expand(grid, grid, -1)  # ... then the column axis
    cells = torch.cat([rows, cols], dim=-1).flatten(0, 1)  # raster order, (grid^2, head_dim/2)
    table = torch.stack([cells.cos(), cells.sin()], dim=-1)
    # Official quirk kept for weight compatibility: condition positions get all-ZERO rows, not the
    # identity rotation. Their q and k therefore vanish: every query scores exactly 0 against a
    # condition key, and a condition query attends uniformly to what it sees (a single class token
    # sees only itself, so its output is its own value). The condition still reaches every image
    # token, through the value vectors, which are not rotated.
    return torch.cat([torch.zeros(n_cond, half, 2), table])


def apply_rope(x, rope):
    """Rotate adjacent pairs (x[2m], x[2m+1]) of x (B, T, heads, head_dim) by the rows of rope
    (T, head_dim/2, 2), in float32 as the official code, then back to x's dtype."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = rope[..., None, :, 0], rope[..., None, :, 1]  # or per row: rope (B, T, D/2, 2)
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).type_as(x)


class KVCache:
    """Keys and values of every position seen so far, for one layer (gpt-fast style: one static
    buffer written by position). Decoding code t then costs one token's worth of compute instead of
    re-running all t previous positions, O(L) instead of O(L^2) work per image. Not a module: never
    in a state dict (the official cache buffers are, and loading drops them). On a CPU it holds
    float32 even for a bf16 model, in twice the memory: why is common.attention's second quirk."""

    def __init__(self, batch, length):
        self.batch, self.length, self.k, self.v = batch, length, None, None

    def update(self, pos, k, v):
        """Write k, v (b, heads, T, D) at positions pos..pos+T-1; return views of the filled prefix
        of the first b rows (b shrinks from 2B to B when classifier-free guidance stops)."""
        if self.k is None:  # allocated once, in the dtype the projections produce (CPU: float32)
            shape = (self.batch, k.shape[1], self.length, k.shape[3])
            dtype = torch.float32 if k.device.type == "cpu" else k.dtype
            self.k, self.v = k.new_zeros(shape, dtype=dtype), v.new_zeros(shape, dtype=dtype)
        b = k.shape[0]
        if torch.is_tensor(pos):  # positions (b, T): the fixed-shape step, see GPT.decode_step
            index = pos[:, None, :, None].expand_as(k)
            self.k[:b].scatter_(2, index, k.to(self.k.dtype))
            self.v[:b].scatter_(2, index, v.to(self.v.dtype))
            return self.k[:b], self.v[:b]
        end = pos + k.shape[2]
        self.k[:b, :, pos:end] = k
        self.v[:b, :, pos:end] = v
        return self.k[:b, :, :end], self.v[:b, :, :end]


class Attention(nn.Module):
    """Causal multi-head self-attention with 2D RoPE on q and k. One fused `wqkv` projection split
    as [q | k | v] (the official layout); fewer k/v heads than query heads (n_kv_head) is
    grouped-query attention, which no released config uses."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.dim // cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.wqkv = Linear(cfg.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim)
        self.wo = Linear(cfg.dim, cfg.dim)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.kv_cache = None  # a KVCache while generate() runs

    def forward(self, x, rope, pos=0, mask=None):
        """mask: None (plain causal) or bool, broadcastable to (B, heads, T, keys), True = may
        attend; only a caption with padding (prefix_mask) and GPT.decode_step need one."""
        B, T, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv, kv], dim=-1)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(k.view(B, T, self.n_kv_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.kv_cache is not None:  # new tokens attend to the filled part of the cache
            k, v = self.kv_cache.update(pos, k, v)
        gqa = {"enable_gqa": True} if self.n_kv_head != self.n_head else {}  # shared k/v, no copies
        # is_causal is TOP-LEFT aligned (query i sees keys 0..i): right for training and for a
        # prefill at position 0 only; queries later in the sequence bring a mask (decode_step)
        y = attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, **gqa,
                      dropout_p=self.attn_dropout_p if self.training else 0.0)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, -1)))


class FeedForward(nn.Module):
    """SwiGLU, Llama's MLP: w2(silu(w1 x) * w3 x). The gate w1 decides, per hidden unit, how much of
    w3's value passes; at 2/3 of the usual 4x width it has the parameters of a GELU MLP."""

    def __init__(self, cfg):
        super().__init__()
        self.w1 = Linear(cfg.dim, cfg.ffn_dim)
        self.w3 = Linear(cfg.dim, cfg.ffn_dim)
        self.w2 = Linear(cfg.ffn_dim, cfg.dim)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def drop_path(x, p, training):
    """Stochastic depth: skip a residual branch for whole samples, scaling the survivors by 1/(1-p).
    Off in every released recipe (rate 0); kept because the official ModelArgs offer it."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(norm(x)), then + FFN(norm(x)). Normalising each branch's
    input, not the residual stream, is what lets deep stacks train without warm-up tricks."""

    def __init__(self, cfg, drop_path_p=0.0):
        super().__init__()
        self.attention, self.feed_forward = Attention(cfg), FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.drop_path_p = drop_path_p

    def forward(self, x, rope, pos=0, mask=None):
        h = self.attention(self.attention_norm(x), rope, pos, mask)
        x = x + drop_path(h, self.drop_path_p, self.training)
        return x + drop_path(self.feed_forward(self.ffn_norm(x)), self.drop_path_p, self.training)


# ----------------------------------------------------------------------------- the condition prefix
# The condition is not a side input: it is the first N positions of the sequence, a prefix of N
# vectors that every image token attends to (paper 2.3), so conditioning needs no extra machinery
# (no cross-attention, no adaptive norms). A class is a prefix of one learned vector (N = 1); a
# caption is N = 120 projected text-encoder features, one per text token (paper 3.3). The prefix
# predicts nothing but code 0, from its last position, and its N RoPE rows are zero (rope_2d_table).
class ClassEmbedding(nn.Module):
    """One learned vector per class. Row num_classes is a learned "null class"; training swaps a
    label for it with probability class_dropout_prob, so one network learns both p(x | class) and
    p(x), which classifier-free guidance (GPT.generate) needs."""

    def __init__(self, num_classes, dim, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        self.null_class, self.dropout_prob = num_classes, dropout_prob

    def null(self, labels):
        """The null condition for every sample of labels (B,)."""
        return torch.full_like(labels, self.null_class)

    def forward(self, labels):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.null_class, labels)
        return self.embedding_table(labels).unsqueeze(1)  # (B, 1, dim): a prefix of one token


class CaptionEmbedding(nn.Module):
    """Caption features (B, N, caption_dim) from a frozen text encoder (FLAN-T5-XL's 2048 for the
    released models) -> the prefix (B, N, dim), by a per-token MLP `cap_proj` (fc1, tanh-GELU, fc2,
    no biases; the official CaptionEmbedder).

    The null caption `uncond_embedding` (N, caption_dim) = randn / sqrt(caption_dim) is drawn once
    and never trained: a buffer, so it is in the state dict (sampling must use the draw training
    saw) but not among the parameters. The null only has to be one input the network learns to read
    as "no caption", and cap_proj and the layers after it are learned already, so a learned input
    would add little; a zero tensor would do less, as the bias-free cap_proj maps it to an all-zero
    prefix, the state of padding. With probability class_dropout_prob training swaps the WHOLE
    caption of a sample for it (its padding rows too; the attention mask stays the caption's)."""

    def __init__(self, caption_dim, dim, n_tokens, dropout_prob):
        super().__init__()
        self.cap_proj = nn.Sequential(OrderedDict(
            fc1=Linear(caption_dim, dim), act=nn.GELU(approximate="tanh"), fc2=Linear(dim, dim)))
        self.register_buffer("uncond_embedding",
                             torch.randn(n_tokens, caption_dim) / caption_dim ** 0.5)
        self.dropout_prob = dropout_prob

    def null(self, caption):
        """The null caption for every sample of caption (B, N, caption_dim)."""
        return self.uncond_embedding.to(caption.dtype).expand_as(caption)

    def forward(self, caption):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.dropout_prob
            caption = torch.where(drop[:, None, None], self.uncond_embedding, caption)
        return self.cap_proj(caption.to(self.cap_proj.fc1.weight.dtype))


def prefix_mask(key_ok, pos, T):
    """The official t2i attention mask (LlamaGen dataset/t2i.py, generate.py), rows pos..pos+T-1:
    bool (B, 1, T, pos+T), True = may attend. key_ok (B, S >= pos+T) is False at padded caption
    positions, True elsewhere; it is a key-padding mask, so generation never builds the whole
    (B, S, S) mask: a decode step takes one row over its cached keys.

    A padded caption key is hidden from every query, image tokens included. That alone would leave
    a padded query with no key at all, and a softmax over nothing but -inf is 0/0 = NaN, which
    would spread to every later query through 0 * NaN. So each position still attends to
    itself: a pad sees only itself, nobody sees a pad, and whatever a padded feature holds changes
    nothing (the official loader zeroes them, the sampler's null half does not)."""
    q = torch.arange(pos, pos + T, device=key_ok.device)[:, None]
    k = torch.arange(pos + T, device=key_ok.device)
    return (key_ok[:, None, None, :pos + T] & (k <= q)) | (k == q)


def left_pad_caption(features, mask):
    """A right-padded text-encoder output (T5's layout: valid tokens first) -> the left-padded
    prefix the model takes: features (B, N, d) and mask (B, N) with the valid tokens moved to the
    end in their order, padded features zeroed, and the mask as bool (the official sample_t2i.py).

    Why the left: the caption's positions carry no position (zero RoPE rows), but its LAST
    position is the one that predicts code 0. Left padding puts a real token there, one that has
    seen the whole caption; right padding would put a pad there, which sees only itself, and code
    0 would be drawn without the caption."""
    mask, order = torch.sort(mask.bool().long(), dim=1, stable=True)  # pads first, order kept
    features = features.gather(1, order[..., None].expand_as(features))
    return features * mask[..., None].to(features.dtype), mask.bool()


@dataclass
class GPTConfig:
    """The official ModelArgs fields that shape a model (LlamaGen autoregressive/models/gpt.py)."""
    vocab_size: int = 16384  # = the tokenizer's codebook size
    block_size: int = 256  # image tokens per sample, a square (16 x 16 codes for 256 px)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # None: one k/v head per query head; fewer: grouped-query
    dim: int = 768
    multiple_of: int = 256  # the SwiGLU width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    num_classes: int = 1000  # class condition only
    caption_dim: int = 0  # 0: a class condition; > 0: caption features of this width (T5-XL 2048)
    cls_token_num: int = 1  # N, the length of the condition prefix: 1 for a class, 120 officially
    class_dropout_prob: float = 0.1
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0

    def __post_init__(self):
        grid, head_dim = math.isqrt(self.block_size), self.dim // self.n_head
        problems = [
            (grid * grid != self.block_size,
             f"block_size {self.block_size} is not a square number of tokens"),
            (self.dim % self.n_head != 0,
             f"dim {self.dim} is not divisible by n_head {self.n_head}"),
            (head_dim % 4 != 0, f"head_dim {head_dim} must be a multiple of 4 "
                                "(2D RoPE splits it in row and column halves of pairs)"),
            (self.n_head % (self.n_kv_head or self.n_head) != 0,
             "n_head must be a multiple of n_kv_head"),
            (self.caption_dim < 0, f"caption_dim {self.caption_dim} is negative"),
            (self.caption_dim == 0 and self.cls_token_num != 1,
             "a class condition is a prefix of exactly one token "
             "(cls_token_num 1; set caption_dim for a caption prefix)"),
            (self.cls_token_num < 1, "the condition prefix needs at least one token"),
        ]
        for bad, message in problems:
            if bad:
                raise UserError(f"GPTConfig: {message}")

    @property
    def ffn_dim(self):
        """Llama's SwiGLU width: 2/3 of 4 * dim (the parameters of a GELU MLP), rounded up."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return -(-hidden // self.multiple_of) * self.multiple_of


# ----------------------------------------------------------------------------------------- sampling
def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """logits / temperature, with everything outside the top_k largest (0 = off) and outside the
    top-p nucleus set to -inf. The nucleus keeps the most likely tokens up to and including the
    first one whose cumulative probability crosses top_p, so the top token always survives (the
    official top_k_top_p_filtering in LlamaGen autoregressive/models/generate.py)."""
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
    """One token per row of logits (b, vocab): argmax if greedy, else a draw from the filtered
    softmax. The paper's FIDs use the whole codebook (top-k 0, top-p 1, temperature 1)."""
    if greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -------------------------------------------------------------------------------- Faster sampling
# Sequential sampling pays one forward pass per code, 256 for a 256 px image, and at batch 1 each
# pass is a few small matrix-vector products that leave an accelerator idle between kernel launches
# (LlamaGen's own baseline runs at ~0.6 s per layer for 8 images on an A100: launch-bound, not
# compute-bound). Two remedies, neither of which changes what is sampled:
# 1. GPT.decode_step keeps every shape fixed for the whole image, so a compiled step is captured
#    once as a CUDA graph and replayed per token (gpt-fast's recipe: static cache, compile).
# 2. Speculative Jacobi decoding (Teng et al. 2024, arXiv 2410.01699, training-free) guesses the
#    next codes, scores a whole window of guesses in ONE forward, and keeps the longest run of
#    guesses that survives the speculative-sampling test below: fewer forward passes than codes.
#
# Why the test keeps the distribution (speculative sampling, Leviathan et al. 2023; Chen et al.
# 2023). A draft x was drawn from a distribution q; the model says the code should come from p.
# Keep x with probability min(1, p(x)/q(x)); otherwise draw from the residual
# r = max(0, p - q) / Z. Then
#   P(out = y) = q(y) min(1, p(y)/q(y)) + P(reject) r(y) = min(q(y), p(y)) + max(0, p(y) - q(y))
#              = p(y),
# because P(reject) = 1 - sum_x min(p(x), q(x)) = sum_x max(0, p(x) - q(x)) = Z. This holds for ANY
# q, provided the draft really was drawn from q and the coin is fresh: q may be a stale prediction,
# or a one-hot "copy the code to the left" guess (q(x) = 1: keep with probability p(x), else draw
# from p without x). Inside a window, position i's p is the true conditional only while every draft
# before it was kept (its input prefix is then the real one), hence the left-to-right walk that
# stops at the first rejection; everything behind it was computed on a discarded prefix and is only
# good as the next drafts.
#
# Why images, unlike text, accept several drafts per pass. The chance of keeping a draft drawn from
# q is sum_x min(p(x), q(x)) = 1 - TV(p, q): how little the prediction moved since the draft was
# made. The draft for a code was predicted from a prefix that was still partly guessed; an image
# code depends mostly on its neighbours (2D RoPE makes "left" and "above" the strong relations), so
# a wrong guess some places back barely moves its distribution, and that distribution is broad (FID
# sampling draws from all 16384 codes, the demos from the top 2000), so the stale and the fresh
# prediction overlap widely. The next word of a text hinges on the exact previous words and is
# often nearly deterministic: a prediction made from a wrong prefix rarely overlaps the right one.
# (Plain Jacobi decoding, which keeps a draft only if it EQUALS the fresh choice, is fine for
# greedy text and useless for sampled images, where two draws from a broad distribution almost
# never coincide; the probabilistic test is what makes it work here.) SJD reports ~2x fewer passes
# on LlamaGen and Lumina-mGPT at unchanged FID.
def acceptance_probability(p_draft, q_draft):
    """The speculative test: keep a draft x drawn from q with probability min(1, p(x) / q(x))."""
    return (p_draft / q_draft).clamp(max=1.0)


def static_caches(model, rows, length):
    """An empty full-length KVCache of `rows` rows for every layer (allocated on first write)."""
    for layer in model.layers:
        layer.attention.kv_cache = KVCache(rows, length)


def target_distributions(logits, n_images, codes, cfg_scale=1.0, cfg_interval=-1, temperature=1.0,
                         top_k=0, top_p=1.0, greedy=False):
    """logits (rows, T, vocab) predicting code indices `codes` (B, T) -> what the sequential sampler
    draws those codes from: guided where the code lies inside cfg_interval (rows [cond ; uncond], as
    in generate), then filtered and normalised, (B, T, vocab); greedy: the guided logits."""
    if len(logits) > n_images:
        cond, uncond = logits.split(n_images)
        logits = uncond + cfg_scale * (cond - uncond)
        if cfg_interval >= 0:  # generate's rule: codes 0 .. cfg_interval+1 guided, later ones not
            logits = torch.where((codes <= cfg_interval + 1)[..., None], logits, cond)
    return logits if greedy else filter_logits(logits, temperature, top_k, top_p).softmax(-1)


@torch.no_grad()
def jacobi_generate(model, cond, n_images, sampler="jacobi", window=16, cfg_scale=1.0,
                    cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0, greedy=False,
                    generator=None, callback=None, return_passes=False, cond_mask=None):
    """GPT.generate's sampler="jacobi" and static=True: codes int64 (n_images, block_size) through
    the fixed-shape GPT.decode_step, `window` codes scored per forward (sampler "sequential": 1,
    which is exactly the sequential sampler). cond: labels (rows,), caption features (rows, N,
    caption_dim) without padding, or for a class model condition embeddings (rows, N, dim), with
    N = cls_token_num; rows = n_images, or 2 n_images as [cond ; uncond] under guidance.
    cond_mask (n_images, N) bool: a left-padded caption's valid tokens (GPT.generate checks it),
    shared by the null half as in generate. return_passes: (codes, passes).

    A pass feeds, per row, its newest accepted code and the W-1 drafts after it and scores W codes;
    1 to W of them are accepted (all W-1 drafts kept: the last score gives a free exact draw). Each
    row accepts its OWN number: the rows share a pass but sit at their own positions (per-row RoPE
    rows, cache writes and masks cost no more than shared ones), so no row waits for the slowest
    one, and a row's test involves only its own p, q and coins: every row is exactly distributed.
    Rows that finish early idle, writing only to slots past the image, until the last is done."""
    if sampler not in ("sequential", "jacobi"):
        raise UserError(f"unknown sampler {sampler!r}; choose 'sequential' or 'jacobi'")
    W = window if sampler == "jacobi" else 1
    if not isinstance(W, int) or W < 1:
        raise UserError(f"window {window!r} is not a whole number >= 1 (codes scored per pass)")
    c, B = model.config, n_images
    L, V = c.block_size, c.vocab_size
    was_training = model.training
    model.eval()
    # embedded after eval(): no condition dropout
    prefix = model.cls_embedding(cond) if cond.dim() == 1 or c.caption_dim else cond
    (rows, N), device = prefix.shape[:2], prefix.device
    guided = rows > B
    if rows != (2 * B if cfg_scale != 1.0 else B) or N != c.cls_token_num:
        raise UserError(f"condition of {rows} rows x {N} tokens; expected {B} rows (x2 under "
                        f"guidance, [cond ; uncond]) of cls_token_num = {c.cls_token_num} tokens")
    ar, every = torch.arange(W, device=device), torch.arange(B, device=device)
    tokens = torch.zeros(B, L + W, dtype=torch.long, device=device)  # accepted codes, then drafts
    q = torch.zeros(B, W - 1, V, device=device)  # the distribution each draft was drawn from
    kw = dict(cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature,
              top_k=top_k, top_p=top_p, greedy=greedy)
    # k/v of accepted codes stay where they were written; a rejected draft's slot is overwritten by
    # the next pass and masked until then. W-1 slots of slack let every window fit.
    static_caches(model, rows, N + L + W - 1)
    onednn_weights(model, True)
    key_ok = None  # a padded caption: which cache slots are keys (prefix_mask's semantics)
    if cond_mask is not None:
        key_ok = F.pad(cond_mask.bool(), (0, L + W - 1), value=True).repeat(rows // B, 1)
    try:
        # prefill: the condition at positions 0..N-1 (top-left causal is right at 0) gives code 0;
        # a padded caption's prefill takes the official mask, each pad seeing only itself
        mask = None if key_ok is None else prefix_mask(key_ok, 0, N)
        logits = model.forward_cached(prefix, 0, mask)[:, None]
        p = target_distributions(logits, B, ar[None, :1], **kw)[:, 0]
        first = p.argmax(-1) if greedy else torch.multinomial(p, 1, generator=generator)[:, 0]
        tokens[:, :W] = first[:, None]  # first drafts: copies of the code to their left, q one-hot
        q[:] = F.one_hot(first, V)[:, None].float()
        if prefix.is_cuda and hasattr(torch._dynamo, "mark_static_address"):
            for layer in model.layers:  # CUDA graphs may then write these buffers in place
                torch._dynamo.mark_static_address(layer.attention.kv_cache.k)
                torch._dynamo.mark_static_address(layer.attention.kv_cache.v)
        n, passes = torch.ones(B, dtype=torch.long, device=device), 1  # codes accepted per row
        if callback is not None:
            callback(1, tokens[:, :1])
        while bool((n < L).any()):
            index = (n - 1)[:, None] + ar  # window inputs: newest accepted code, then W-1 drafts
            inputs, positions = tokens.gather(1, index), N + index
            x = model.tok_embeddings(inputs)
            if guided and (cfg_interval < 0 or int(n.min()) <= cfg_interval + 1):
                x, positions = x.repeat(2, 1, 1), positions.repeat(2, 1)  # cond and uncond rows
            if key_ok is None:
                logits = model.decode_step(x, positions)
            else:  # the first len(x) rows: the unconditional half drops out after cfg_interval
                logits = model.decode_step(x, positions, key_ok[:len(x)])
            p = target_distributions(logits, B, index + 1, **kw)  # of codes n .. n+W-1
            passes += 1
            drafts = inputs[:, 1:]  # drafts of codes n .. n+W-2, scored by outputs 0 .. W-2
            if greedy:  # keep a draft while it equals the argmax: exactly the greedy sequence
                fresh = p.argmax(-1)
                kept = (drafts == fresh[:, :-1]).long().cumprod(1).sum(1)
                new = fresh[every, kept]
            else:
                kept = torch.zeros_like(n)
                if W > 1:
                    coins = torch.rand(drafts.shape, generator=generator, device=device)
                    p_d = p[:, :-1].gather(-1, drafts[..., None])[..., 0]
                    q_d = q.gather(-1, drafts[..., None])[..., 0]
                    kept = (coins < acceptance_probability(p_d, q_d)).long().cumprod(1).sum(1)
                # the first rejected code from the residual; if all W-1 drafts were kept, output
                # W-1 has no draft (q = 0) and its residual is its exact p
                p_j = p[every, kept]
                q_j = torch.cat([q, q.new_zeros(B, 1, V)], 1)[every, kept]
                residual = (p_j - q_j).clamp(min=0)
                residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_j)
                new = torch.multinomial(residual, 1, generator=generator)[:, 0]
                if W > 1:
                    fresh = torch.multinomial(p.flatten(0, 1), 1, generator=generator).view(B, W)
            tokens[every, n + kept] = new  # rows already done write past the image: unused slots
            n_next = torch.where(n < L, (n + kept + 1).clamp(max=L), n)
            if W > 1:  # next drafts: re-drawn from this pass's p where it reaches, then copies
                source = kept[:, None] + 1 + ar[:-1]  # the output that predicted code n+kept+1+k
                reach = source < W
                last = torch.where(kept < W - 1, fresh[:, -1], new)  # newest guess, copied on
                source = source.clamp(max=W - 1)
                guess = torch.where(reach, fresh.gather(1, source), last[:, None])
                tokens.scatter_(1, n_next[:, None] + ar[:-1], guess)
                if not greedy:
                    redrawn = p.gather(1, source[..., None].expand(-1, -1, V))
                    q = torch.where(reach[..., None], redrawn, F.one_hot(last, V)[:, None].float())
            n = n_next
            if callback is not None:
                callback(int(n.min()), tokens[:, :int(n.min())])
    finally:
        for layer in model.layers:
            layer.attention.kv_cache = None
        onednn_weights(model, False)
        model.train(was_training)
    codes = tokens[:, :L].clone()
    return (codes, passes) if return_passes else codes


# ------------------------------------------------------------------------------------------ loading
def config_from_state_dict(sd, n_head=None):
    """The shape fields of a GPT state dict: dim, vocab, layers, k/v heads, and the condition: the
    classes, or the caption width and prefix length N (the null caption's rows). n_head is in no
    shape: take it from the registry entry with this dim and depth, else the given one, else
    head_dim 64 (every official config but 3B and 7B)."""
    classes, caption = "cls_embedding.embedding_table.weight", "cls_embedding.cap_proj.fc1.weight"
    if "tok_embeddings.weight" not in sd or (classes not in sd and caption not in sd):
        raise UserError("not a class-conditional or text-conditional LlamaGen GPT checkpoint (no "
                        "tok_embeddings weight, or neither cls_embedding.embedding_table nor "
                        "cls_embedding.cap_proj weights); pass a GPT checkpoint")
    vocab, dim = sd["tok_embeddings.weight"].shape
    n_layer = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("layers.")), default=-1)
    same = [v for v in GPT_CONFIGS.values() if v["dim"] == dim and v["n_layer"] == n_layer]
    n_head = same[0]["n_head"] if same else n_head or max(1, dim // 64)
    qkv = sd.get("layers.0.attention.wqkv.weight")
    n_kv = n_head if qkv is None else (qkv.shape[0] - dim) // (2 * (dim // n_head))
    found = dict(vocab_size=vocab, dim=dim, n_layer=n_layer, n_head=n_head,
                 n_kv_head=None if n_kv == n_head else n_kv)
    if classes in sd:
        return dict(found, num_classes=sd[classes].shape[0] - 1)
    null = sd.get("cls_embedding.uncond_embedding")
    if null is None:  # the official sampler loads non-strictly and would draw a fresh one
        raise UserError("text-conditional GPT checkpoint without its null caption "
                        "cls_embedding.uncond_embedding; pass the complete checkpoint")
    return dict(found, caption_dim=null.shape[1], cls_token_num=null.shape[0])


# Tensors some official files save beside the weights (the RoPE table, an inference KV cache):
# this model rebuilds both from its config, so loaders drop them
RUNTIME_BUFFERS = ("kv_cache", "freqs_cis")


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        cfg = self.config = config
        if cfg.caption_dim:
            self.cls_embedding = CaptionEmbedding(cfg.caption_dim, cfg.dim, cfg.cls_token_num,
                                                  cfg.class_dropout_prob)
        else:
            self.cls_embedding = ClassEmbedding(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)  # elementwise, on [prefix ; codes]
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.n_layer, device="cpu").tolist()
        self.layers = nn.ModuleList(Block(cfg, p) for p in rates)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size)
        # a plain float32 attribute, not a buffer: outside the state dict (as officially), and
        # .to(bfloat16) cannot round its angles
        self.freqs_cis = rope_2d_table(math.isqrt(cfg.block_size), cfg.dim // cfg.n_head,
                                       cfg.rope_base, cfg.cls_token_num)
        self.meta = {}  # from_pretrained: the receipt of the codes it learned (data.CodesReceipt)
        # the official init: N(0, 0.02) everywhere, no depth scaling ...
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        # ... except a zero output layer: every code equally likely at step 0, loss exactly
        # ln(vocab)
        nn.init.zeros_(self.output.weight)

    def _rope(self, device):
        if self.freqs_cis.device != device:
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis

    def _check_condition(self, cond, cond_mask):
        """One clear line when the condition does not fit the model: labels (B,) for a class model,
        features (B, N, caption_dim) and an optional mask (B, N) for a caption model."""
        cfg, B = self.config, cond.shape[0]
        if not cfg.caption_dim:
            if cond.dim() != 1 or cond.is_floating_point() or cond_mask is not None:
                raise UserError(f"this GPT is class-conditional: pass class labels (B,) as "
                                f"integers and no caption mask, not a {tuple(cond.shape)} tensor")
            return
        want = (B, cfg.cls_token_num, cfg.caption_dim)
        if tuple(cond.shape) != want or not cond.is_floating_point():
            raise UserError(f"this GPT is text-conditional: pass caption features of shape {want} "
                            f"(left padded to N = {cfg.cls_token_num} tokens), not a "
                            f"{tuple(cond.shape)} {cond.dtype} tensor")
        if cond_mask is not None and tuple(cond_mask.shape) != want[:2]:
            raise UserError(f"caption mask of shape {tuple(cond_mask.shape)}, expected {want[:2]}")

    def forward(self, idx, cond, targets=None, cond_mask=None, valid=None):
        """Training semantics in any mode: input [prefix ; idx[:, :-1]] -> T logits (float32), logit
        t predicting idx[:, t]; loss = mean cross-entropy against targets. (The official forward
        gives these logits only in train mode; in eval mode it needs explicit positions.)

        cond: class labels (B,) or caption features (B, N, caption_dim), left padded, with
        cond_mask (B, N) True/1 at the valid tokens (None: all valid). valid (B,): per-sample loss
        weights as the official t2i trainer's (0 for an unreadable image), loss = sum(CE * valid)
        / max(sum(valid) * T, 1)."""
        self._check_condition(cond, cond_mask)
        n, T = self.config.cls_token_num, idx.shape[1]
        assert T <= self.config.block_size, f"{T} codes, but block_size is {self.config.block_size}"
        x = torch.cat([self.cls_embedding(cond), self.tok_embeddings(idx[:, :-1])], dim=1)
        x = self.tok_dropout(x)
        rope = self._rope(x.device)[: x.shape[1]]
        mask = None  # plain causal unless the caption has padding
        if cond_mask is not None:
            key_ok = F.pad(cond_mask.bool(), (0, x.shape[1] - n), value=True)
            mask = prefix_mask(key_ok, 0, x.shape[1])
        for layer in self.layers:
            x = layer(x, rope, 0, mask)
        # the last prefix position predicts code 0, so the logits start at index n - 1
        logits = self.output(self.norm(x[:, n - 1:])).float()
        if targets is None:
            return logits, None
        if valid is None:
            return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        weight = valid.to(ce.dtype)[:, None].expand_as(targets).flatten()
        return logits, (ce * weight).sum() / weight.sum().clamp(min=1)

    def forward_cached(self, x, pos, mask=None):
        """One step of generation: embeddings x (b, T, dim) at positions pos.. go through the
        layers, reading and extending the KV caches, under mask (prefix_mask; None: causal);
        returns the last position's logits (b, vocab), float32."""
        rope = self._rope(x.device)[pos:pos + x.shape[1]]
        for layer in self.layers:
            x = layer(x, rope, pos, mask)
        return self.output(self.norm(x[:, -1])).float()

    def decode_step(self, x, positions, key_ok=None):
        """The fixed-shape step: embeddings x (b, T, dim) at sequence positions (b, T) int64, one
        row each, against caches of full length (static_caches) -> logits (b, T, vocab) float32.
        k/v are written BY POSITION and every query attends to the whole cache under the mask
        key <= query: causal inside the block, full over the cached prefix (bottom-right aligned),
        blind to stale keys further on. No shape depends on how far generation has got, so a
        compiled step is captured once (one CUDA graph under torch.compile(mode="reduce-overhead"))
        and replayed for every token. key_ok (b, cache length) bool, for a left-padded caption:
        False at its padded slots, which no image query may see (prefix_mask's rule; a query is
        never a pad here, so nobody is left with no key at all)."""
        table = self._rope(x.device)
        rope = table[positions.clamp(max=len(table) - 1)]  # past the last image token: unused slots
        keys = torch.arange(self.layers[0].attention.kv_cache.length, device=x.device)
        mask = keys <= positions[..., None]  # (b, T, cache length)
        if key_ok is not None:
            mask = mask & key_ok[:, None, :]
        mask = mask[:, None]  # (b, 1, T, cache length), for all heads
        for layer in self.layers:
            x = layer(x, rope, positions, mask)
        return self.output(self.norm(x)).float()

    @torch.no_grad()
    def generate(self, cond, cfg_scale=1.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0,
                 greedy=False, generator=None, callback=None, cond_mask=None,
                 sampler="sequential", window=16, static=False, return_passes=False):
        """Sample codes int64 (B, block_size) one token at a time, for class labels cond (B,) or
        caption features cond (B, N, caption_dim) left padded as cond_mask (B, N) says
        (left_pad_caption; None: no padding). The prefill runs the prefix, then each step feeds the
        last code back in. callback(t, codes[:, :t]) is called after each token (progress bars,
        the drawing animation). sampler="jacobi": speculative Jacobi decoding, `window` codes scored
        per forward; static: sequential sampling through the fixed-shape decode_step (both:
        "Faster sampling" above; padded captions too). return_passes: return (codes, forward
        passes) instead.

        Classifier-free guidance (paper 2.3): each sample runs twice, with its condition and with
        the null one (class or caption), and the logits are extrapolated, uncond + s * (cond -
        uncond). s > 1 moves every step further in the direction the condition pushes: higher
        fidelity and class identity or prompt alignment, less diversity. s = 1 is off (one pass),
        s = 0 the null condition alone; the official generate() guides only when s > 1 (an s below
        1 acts as 1 there), we take every s != 1 at its word, for classes and captions alike. The
        null caption's half keeps the caption's mask, as officially: it sees the null caption's
        last n_valid rows, as in training. cfg_interval k >= 0 (the official semantics): tokens
        0 .. k+1 are guided, then only the conditional half runs. Official t2i picture settings:
        cfg 7.5, top-k 1000."""
        self._check_condition(cond, cond_mask)
        cfg, B, L = self.config, cond.shape[0], self.config.block_size
        guided = cfg_scale != 1.0
        prefix = torch.cat([cond, self.cls_embedding.null(cond)]) if guided else cond
        if cond_mask is not None:
            cond_mask = cond_mask.bool()
            if not (cond_mask[:, 1:] >= cond_mask[:, :-1]).all():
                raise UserError("caption mask is not left padded (valid tokens last); convert a "
                                "text encoder's right-padded output with left_pad_caption")
        if sampler != "sequential" or static:
            return jacobi_generate(self, prefix, B, sampler, window, cfg_scale, cfg_interval,
                                   temperature, top_k, top_p, greedy, generator, callback,
                                   return_passes, cond_mask)
        key_ok = None  # no mask at all unless a caption has padding
        if cond_mask is not None:
            key_ok = F.pad(cond_mask, (0, L - 1), value=True).repeat(len(prefix) // B, 1)
        was_training = self.training
        self.eval()
        onednn_weights(self, True)
        for layer in self.layers:  # exact length: the prefix and every code but the last one
            layer.attention.kv_cache = KVCache(len(prefix), cfg.cls_token_num + L - 1)
        codes = torch.empty(B, L, dtype=torch.long, device=cond.device)
        self._rope(cond.device)  # moved here, so a compiled forward_cached never has to
        try:
            x, pos = self.cls_embedding(prefix), 0  # prefill: the condition prefix
            for t in range(L):
                if key_ok is None:
                    logits = self.forward_cached(x, pos)
                else:  # the prefill's rows of the mask, then one row per decode step
                    mask = prefix_mask(key_ok[:len(x)], pos, x.shape[1])
                    logits = self.forward_cached(x, pos, mask)
                pos += x.shape[1]
                if len(logits) > B:  # rows are [cond ; uncond]
                    cond_logits, uncond_logits = logits.split(B)
                    logits = uncond_logits + cfg_scale * (cond_logits - uncond_logits)
                codes[:, t] = sample_logits(logits, temperature, top_k, top_p, greedy, generator)
                if callback is not None:
                    callback(t + 1, codes[:, :t + 1])
                # the conditional half's cache rows come first, so after cfg_interval it simply
                # keeps going alone
                still_guided = guided and (cfg_interval < 0 or t <= cfg_interval)
                x = self.tok_embeddings(codes[:, t:t + 1].repeat(2 if still_guided else 1, 1))
        finally:
            for layer in self.layers:
                layer.attention.kv_cache = None
            onednn_weights(self, False)
            self.train(was_training)
        return (codes, L) if return_passes else codes

    @classmethod
    def from_pretrained(cls, path, block_size=None, **overrides):
        """Our checkpoints or the official c2i_*.pt and t2i_*.pt releases (any container) -> model
        in eval mode on the CPU. The config comes from the checkpoint (ours) or its tensor shapes
        (official files carry none; class or caption, caption_dim and N show in them). block_size
        (image tokens) overrides the stored one; official files need it from the caller, who knows
        the image size (sample.py reads it from the file name), else 256: t2i_XL_stage1_256.pt
        makes 16x16 codes, t2i_XL_stage2_512.pt 32x32 (block_size 1024)."""
        ckpt = load_checkpoint(path)
        if ckpt.get("kind", "gpt") != "gpt":
            raise UserError(f"{path} is a {ckpt['kind']!r} checkpoint, not a GPT; "
                            "pass a GPT checkpoint")
        sd = unwrap_state_dict(ckpt)
        found = config_from_state_dict(sd, overrides.get("n_head"))
        saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else None
        names = {f.name for f in fields(GPTConfig)}
        cfg = {k: v for k, v in saved.items() if k in names} if saved else dict(found)
        if block_size is not None:
            cfg["block_size"] = block_size
        cfg.update(overrides)
        model = cls(GPTConfig(**cfg))
        name = next((k for k, v in GPT_CONFIGS.items()
                     if all(found.get(f) == v[f] for f in v)), None)
        fits = f"GPT-{name}" if name else ", ".join(f"{k}={v}" for k, v in found.items())
        # text_encoder.*: the T5 of a GPT trained with its encoder (train.py JointT2I), which
        # the caller loads itself (sample.py); the GPT reads the encoder's features
        load_weights(model, sd, f"GPT checkpoint {path!r}",
                     ignore=(*RUNTIME_BUFFERS, "text_encoder."),
                     hint=f"its shapes fit {fits}")
        model.meta = ckpt["meta"] if isinstance(ckpt.get("meta"), dict) else {}
        # known: given by the caller or saved with the config; else GPTConfig's default, a guess
        # the caller must not pass off as the trained grid (a bare state dict has no size in it)
        model.block_size_known = block_size is not None or "block_size" in (saved or {})
        return model.eval()

    def flops_per_token(self):
        """Training FLOPs per token, forward + backward (PaLM appendix B, as in nanoGPT): 6 per
        weight used in a matmul at every position (not the embedding tables, lookups, nor a
        caption's cap_proj, run on the prefix only) plus 12 * n_layer * dim * sequence for the
        attention scores and their weighted sums."""
        cfg = self.config
        n = sum(p.numel() for p in self.parameters()) - self.tok_embeddings.weight.numel()
        n -= sum(p.numel() for p in self.cls_embedding.parameters())
        return 6 * n + 12 * cfg.n_layer * cfg.dim * (cfg.cls_token_num + cfg.block_size - 1)

    def estimate_mfu(self, tokens_per_second, device):
        """Model FLOPs utilisation: achieved training FLOP/s over the GPU's dense bf16 peak (None if
        the GPU is not in PEAK_BF16_FLOPS, or not a GPU)."""
        if not str(device).startswith("cuda"):
            return None
        gpu = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
        return None if peak is None else self.flops_per_token() * tokens_per_second / peak


PEAK_BF16_FLOPS = {"A100": 312e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12}  # dense


# The model zoo (paper Table 1; XXXL, 1B and 7B exist only in the official code). Parameter counts
# at vocab 16384 / 1000 classes: B 111M, L 343M, XL 775M, XXL 1.4B, XXXL 3.9B, 1B 1.2B, 3B 3.1B
# (head_dim 100), 7B 6.6B. "nano" (5.4M) and "micro" (13.8M) are ours, for CPU tests and demos; most
# of their weights would be the 16384-code embedding and output tables, so pair them with a small
# codebook (the demo's has 512 codes).
GPT_CONFIGS = {
    "pico": dict(n_layer=2, n_head=2, dim=64),
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


# --------------------------------------------------------------------------- CPU decoding speed
class Linear(nn.Linear):
    """A bias-free nn.Linear (Llama has no biases), with one speed detail for CPU sampling, where a
    decode step multiplies only a few rows by each weight matrix and the time is the streaming of
    the weights: while GPT.generate runs, float32 and bf16 products go through a copy of W that
    oneDNN has reordered into its blocked layout, which streams W faster than the plain layout
    (all GPT-B matmuls of one step, 2 cores: float32 2 rows 63 -> 22 ms, 16 rows 64 -> 26, 128 rows
    1.2x; bf16 9.4 -> 13.7 GB/s at 2 rows, 7.0 -> 11.9 at 16, 1.9x at 128, a Jacobi window). bf16
    results are bit-identical to F.linear's, float32 ones equal to rounding (another summation
    order). The copies, a second set of weights in memory, live only as long as one generate()
    call, which also makes them safe from every way a weight can change between calls; everything
    else is plain F.linear."""

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out, bias=False)
        self._packed = None  # the oneDNN copy of weight, during generation on a CPU

    def forward(self, x):
        # is_compiling first: a traced step never looks at the opaque copy
        if not torch.compiler.is_compiling() and self._packed is not None \
                and x.dtype == self.weight.dtype:
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self._packed,
                                                   None, "none", [], "")
            return y.reshape(*x.shape[:-1], -1)
        return F.linear(x, self.weight)

    def __getstate__(self):  # deepcopy, pickle: the opaque oneDNN copy is never copied
        return {**self.__dict__, "_packed": None}


def onednn_weights(model, on):
    """Make (on) or drop the oneDNN copies of model's Linear weights (see Linear), for a CPU model
    in float32 or bf16; a no-op elsewhere."""
    for m in model.modules():
        if isinstance(m, Linear):
            w = m.weight
            # float32 matrices under 2^17 weights (GPT-nano's) are bound by a call's fixed cost,
            # where F.linear's is lower (2 rows of a 384 x 128 matrix: 12-26 against 23-40 us)
            small = w.dtype == torch.float32 and w.numel() < 2 ** 17
            ok = (on and _ONEDNN and w.device.type == "cpu" and not small
                  and w.dtype in (torch.float32, torch.bfloat16)
                  and not torch.is_autocast_enabled("cpu"))  # autocast: F.linear's dtype rules
            m._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16) if ok else None


# oneDNN's packed linear: in PyTorch's CPU builds with mkldnn; torch.compile's CPU backend packs
# weights this way itself, so a compiled step leaves it to that. Absent, F.linear.
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_reorder_linear_weight")
