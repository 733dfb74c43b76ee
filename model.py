"""The image GPT of LlamaGen (official autoregressive/models/gpt.py, whose checkpoints load): a
plain Llama decoder over a raster of VQ codes, conditioned on a class or a caption. An image is a
grid of codes, in raster order a sentence, so p(image | class) = prod_t p(code_t | class, code_<t),
each a softmax over the codebook (paper 2.3): training is next-token prediction, sampling draws a
code at a time (faster: decoding.py). Only the positions (2D RoPE) are image-specific."""
import math
from collections import OrderedDict
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, attention, load_checkpoint, load_weights, unwrap_state_dict


class RMSNorm(nn.Module):
    """Llama's norm: x / rms(x) * gain (no mean, no bias), its statistics in float32."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        rms = torch.rsqrt((xf * xf).mean(-1, keepdim=True) + self.eps)
        return (xf * rms).type_as(x) * self.weight


Linear = partial(nn.Linear, bias=False)  # Llama's layers have no biases


# ------------------------------------------------------------------------------------------ 2D RoPE
# Position is not a learned table added to the input: each query/key pair is rotated by angles of
# its grid cell, so the score q.k depends only on the OFFSET between two cells (paper 2.3). Half of
# each head encodes the row, half the column: "the cell above" and "the cell to the left" are
# distinct relations, and with no learned table the same weights run on 16x16 and 24x24 grids.
def rope_2d_table(grid, head_dim, base=10000.0, n_cond=1):
    """(n_cond + grid^2, head_dim/2, 2) table of (cos, sin), the prefix's rows zero. Pair m < D/4
    turns by row * f_m, the rest by col * f_(m - D/4), f_k = base^(-4k/D), D = head_dim."""
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2)[: half // 2].float() / half)
    angle = torch.outer(torch.arange(grid, dtype=torch.float32), freqs)  # (grid, head_dim/4)
    rows = angle[:, None, :].expand(grid, grid, -1)  # row axis first ...
    cols = angle[None, :, :].expand(grid, grid, -1)  # ... then the column axis
    cells = torch.cat([rows, cols], dim=-1).flatten(0, 1)  # raster order, (grid^2, head_dim/2)
    table = torch.stack([cells.cos(), cells.sin()], dim=-1)
    return torch.cat([torch.zeros(n_cond, half, 2), table])


def apply_rope(x, rope):
    """Rotate pairs (x[2m], x[2m+1]) of x (B, T, heads, D) by rope ([B,] T, D/2, 2), in float32."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = rope[..., None, :, 0], rope[..., None, :, 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).type_as(x)


class KVCache:
    """One layer's keys and values so far, in a static buffer written by position (gpt-fast), so
    that code t costs one token's work; on a CPU in float32 (common.attention says why)."""

    def __init__(self, batch, length):
        self.batch, self.length, self.k, self.v = batch, length, None, None

    def update(self, pos, k, v):
        """Write k, v (b, heads, T, D) at pos..pos+T-1 (or per row at pos (b, T)); b <= batch."""
        if self.k is None:  # allocated at the first write
            shape = (self.batch, k.shape[1], self.length, k.shape[3])
            dtype = torch.float32 if k.device.type == "cpu" else k.dtype
            self.k, self.v = k.new_zeros(shape, dtype=dtype), v.new_zeros(shape, dtype=dtype)
        b = k.shape[0]
        if torch.is_tensor(pos):
            index = pos[:, None, :, None].expand_as(k)
            self.k[:b].scatter_(2, index, k.to(self.k.dtype))
            self.v[:b].scatter_(2, index, v.to(self.v.dtype))
            return self.k[:b], self.v[:b]
        end = pos + k.shape[2]
        self.k[:b, :, pos:end], self.v[:b, :, pos:end] = k, v
        return self.k[:b, :, :end], self.v[:b, :, :end]


class Attention(nn.Module):
    """Causal self-attention, 2D RoPE on q and k, one fused `wqkv` [q | k | v]; n_kv_head < n_head
    is grouped-query attention (no released config uses it)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.dim // cfg.n_head
        self.wqkv = Linear(cfg.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim)
        self.wo = Linear(cfg.dim, cfg.dim)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.kv_cache = None  # a KVCache while sampling

    def forward(self, x, rope, pos=0, mask=None):  # mask: None (causal) or bool, True = may attend
        B, T, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv, kv], dim=-1)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(k.view(B, T, self.n_kv_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.kv_cache is not None:  # new tokens attend to the filled part of the cache
            k, v = self.kv_cache.update(pos, k, v)
        gqa = {"enable_gqa": True} if self.n_kv_head != self.n_head else {}
        # is_causal is TOP-LEFT aligned (query i sees keys 0..i): right for training and a prefill
        # at position 0 only; later queries bring a mask
        y = attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, **gqa,
                      dropout_p=self.attn_dropout_p if self.training else 0.0)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, -1)))


class FeedForward(nn.Module):
    """SwiGLU, Llama's MLP: w2(silu(w1 x) * w3 x), the gate w1 deciding how much of w3 x passes."""

    def __init__(self, cfg):
        super().__init__()
        self.w1, self.w3 = Linear(cfg.dim, cfg.ffn_dim), Linear(cfg.dim, cfg.ffn_dim)
        self.w2, self.ffn_dropout = Linear(cfg.ffn_dim, cfg.dim), nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def drop_path(x, p, training):
    """Stochastic depth (in the official ModelArgs, unused): drop a branch for whole samples."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(norm(x)), then + FFN(norm(x))."""

    def __init__(self, cfg, drop_path_p=0.0):
        super().__init__()
        self.attention, self.feed_forward = Attention(cfg), FeedForward(cfg)
        self.attention_norm, self.ffn_norm = (RMSNorm(cfg.dim, cfg.norm_eps) for _ in range(2))
        self.drop_path_p = drop_path_p

    def forward(self, x, rope, pos=0, mask=None):
        h = self.attention(self.attention_norm(x), rope, pos, mask)
        x = x + drop_path(h, self.drop_path_p, self.training)
        return x + drop_path(self.feed_forward(self.ffn_norm(x)), self.drop_path_p, self.training)


# ----------------------------------------------------------------------------- the condition prefix
# The condition is the first N positions of the sequence, a prefix every image token attends to
# (paper 2.3; no cross-attention): a class is one learned vector, a caption N = 120 projected text
# features (paper 3.3). Its last position predicts code 0. Why zero RoPE rows for the prefix, not
# the identity: the official weights were trained so. A prefix q and k vanish (every query scores
# 0 against a prefix key); the condition reaches the image tokens through the unrotated values.
class ClassEmbedding(nn.Module):
    """One learned vector per class, and a learned "null class" (row num_classes) that training
    swaps in with probability class_dropout_prob: one network learns p(x | class) and p(x)."""

    def __init__(self, num_classes, dim, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        self.null_class, self.dropout_prob = num_classes, dropout_prob

    def null(self, labels):
        return torch.full_like(labels, self.null_class)

    def forward(self, labels):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.null_class, labels)
        return self.embedding_table(labels).unsqueeze(1)  # (B, 1, dim)


class CaptionEmbedding(nn.Module):
    """Caption features (B, N, caption_dim) of a text encoder -> the prefix (B, N, dim) by a
    per-token MLP `cap_proj` (fc1, tanh-GELU, fc2, no biases; the official CaptionEmbedder). The
    null caption `uncond_embedding` is a random draw, never trained (a buffer: sampling uses the
    draw training saw), which the network learns to read as "no caption"; zeros would map to
    padding's zero prefix. Training swaps a sample's WHOLE caption for it, keeping its mask."""

    def __init__(self, caption_dim, dim, n_tokens, dropout_prob):
        super().__init__()
        self.cap_proj = nn.Sequential(OrderedDict(
            fc1=Linear(caption_dim, dim), act=nn.GELU(approximate="tanh"), fc2=Linear(dim, dim)))
        self.register_buffer("uncond_embedding",
                             torch.randn(n_tokens, caption_dim) / caption_dim ** 0.5)
        self.dropout_prob = dropout_prob

    def null(self, caption):
        return self.uncond_embedding.to(caption.dtype).expand_as(caption)

    def forward(self, caption):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.dropout_prob
            caption = torch.where(drop[:, None, None], self.uncond_embedding, caption)
        return self.cap_proj(caption.to(self.cap_proj.fc1.weight.dtype))


def prefix_mask(key_ok, pos, T):
    """The official t2i attention mask (dataset/t2i.py, generate.py), rows pos..pos+T-1: bool
    (B, 1, T, pos+T), True = may attend; key_ok (B, S >= pos+T) is False at padded caption slots.
    A padded key is hidden from every query; a padded query would then see no key at all (a
    softmax over only -inf is NaN, which spreads), so each position still sees itself."""
    q = torch.arange(pos, pos + T, device=key_ok.device)[:, None]
    k = torch.arange(pos + T, device=key_ok.device)
    return (key_ok[:, None, None, :pos + T] & (k <= q)) | (k == q)


@dataclass
class GPTConfig:
    """The official ModelArgs fields that shape a model."""
    vocab_size: int = 16384  # = the tokenizer's codebook size
    block_size: int = 256  # image tokens per sample, a square (16 x 16 codes for 256 px)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: one k/v head per query head; fewer: grouped-query
    dim: int = 768
    multiple_of: int = 256  # the SwiGLU width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    num_classes: int = 1000  # class condition only
    caption_dim: int = 0  # 0: a class condition; > 0: caption features of this width
    cls_token_num: int = 1  # N, the length of the condition prefix: 1 for a class, 120 officially
    stream_words: int = 0  # > 0: DALL-E's one stream of N caption tokens (t2i.StreamT2I)
    class_dropout_prob: float = 0.1
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0

    def __post_init__(self):
        head_dim = self.dim // self.n_head
        problems = [
            (math.isqrt(self.block_size) ** 2 != self.block_size,
             f"block_size {self.block_size} is not a square number of tokens"),
            (self.dim % self.n_head, f"dim {self.dim} is not divisible by n_head {self.n_head}"),
            (head_dim % 4, f"head_dim {head_dim} must be a multiple of 4 "
                           "(2D RoPE splits it in row and column halves of pairs)"),
            (self.n_head % (self.n_kv_head or self.n_head), "n_head is no multiple of n_kv_head"),
            (self.caption_dim < 0, f"caption_dim {self.caption_dim} is negative"),
            (self.cls_token_num != 1 and not (self.caption_dim or self.stream_words), "a class "
             "condition is a prefix of exactly one token (cls_token_num 1), unless caption_dim"),
            (self.cls_token_num < 1, "the condition prefix needs at least one token")]
        for bad, why in problems:
            if bad:
                raise UserError(f"GPTConfig: {why}")

    @property
    def ffn_dim(self):  # 2/3 of 4 * dim (a GELU MLP's parameters), rounded up to multiple_of
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return -(-hidden // self.multiple_of) * self.multiple_of


class GPT(nn.Module):
    stream = False  # t2i.StreamT2I: DALL-E's one stream

    def __init__(self, config):
        super().__init__()
        cfg = self.config = config
        self.cls_embedding = (CaptionEmbedding(cfg.caption_dim, cfg.dim, cfg.cls_token_num,
                                               cfg.class_dropout_prob) if cfg.caption_dim else
                              ClassEmbedding(cfg.num_classes, cfg.dim, cfg.class_dropout_prob))
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)  # elementwise, on [prefix ; codes]
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.n_layer, device="cpu").tolist()
        self.layers = nn.ModuleList(Block(cfg, p) for p in rates)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size)
        # float32 and not a buffer: outside the state dict, and safe from .to(bfloat16)
        self.freqs_cis = rope_2d_table(math.isqrt(cfg.block_size), cfg.dim // cfg.n_head,
                                       cfg.rope_base, cfg.cls_token_num)
        self.meta = {}  # from_pretrained: the receipt of the codes it learned
        # the official init: N(0, 0.02), and a zero output layer (step 0's loss is ln(vocab))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.output.weight)

    def forward(self, idx, cond, targets=None, cond_mask=None, valid=None):
        """[prefix ; idx[:, :-1]] -> T float32 logits (t predicting idx[:, t]) and the cross-entropy
        (weighted per sample by valid, as the official t2i trainer). cond: labels (B,) or caption
        features (B, N, caption_dim) left padded as cond_mask (B, N) says (None: no padding)."""
        x = self.hidden(idx, cond, cond_mask)[:, self.config.cls_token_num - 1:]
        logits = self.output(self.norm(x)).float()  # the prefix's last position predicts code 0
        return logits, None if targets is None else next_token_loss(logits, targets, valid)

    def hidden(self, idx, cond, cond_mask=None):
        """The last block's output (B, N + T - 1, dim) at each position of [prefix ; codes]; the
        caller applies the final norm to the rows it reads."""
        self._check_condition(cond, cond_mask)
        L = self.config.block_size
        assert idx.shape[1] <= L, f"{idx.shape[1]} codes, but block_size is {L}"
        x = torch.cat([self.cls_embedding(cond), self.tok_embeddings(idx[:, :-1])], dim=1)
        x = self.tok_dropout(x)
        rope = self.rope_table(x.device)[: x.shape[1]]
        mask = None if cond_mask is None else prefix_mask(  # causal unless a caption has padding
            F.pad(cond_mask.bool(), (0, idx.shape[1] - 1), value=True), 0, x.shape[1])
        for layer in self.layers:
            x = layer(x, rope, 0, mask)
        return x

    def rope_table(self, device):  # moved to the device once
        if self.freqs_cis.device != device:
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis

    def _check_condition(self, cond, cond_mask):
        n, d = self.config.cls_token_num, self.config.caption_dim
        if not d and (cond.dim() != 1 or cond.is_floating_point() or cond_mask is not None):
            raise UserError(f"this GPT is class-conditional: pass class labels (B,) as integers "
                            f"and no caption mask, not a {tuple(cond.shape)} tensor")
        if d and (tuple(cond.shape) != (len(cond), n, d) or not cond.is_floating_point()):
            raise UserError(f"this GPT is text-conditional: pass caption features of shape "
                            f"{(len(cond), n, d)} (left padded to N = {n} tokens), not a "
                            f"{tuple(cond.shape)} {cond.dtype} tensor")
        if d and cond_mask is not None and tuple(cond_mask.shape) != (len(cond), n):
            raise UserError(f"caption mask of shape {tuple(cond_mask.shape)}, expected "
                            f"{(len(cond), n)}")

    def sampling_prefix(self, cond, cond_mask, cfg_scale, length):
        """A sampler's checked condition rows, [cond ; uncond] under guidance, and key_ok: None, or
        which slots of a KV cache of `length` are keys (prefix_mask), one row per condition row."""
        self._check_condition(cond, cond_mask)
        rows = torch.cat([cond, self.cls_embedding.null(cond)]) if cfg_scale != 1.0 else cond
        if cond_mask is None:  # no mask at all unless a caption has padding
            return rows, None
        key_ok = F.pad(cond_mask.bool(), (0, length - cond_mask.shape[1]), value=True)
        if not (key_ok[:, 1:] >= key_ok[:, :-1]).all():
            raise UserError("caption mask is not left padded (valid tokens last); convert a "
                            "text encoder's right-padded output with left_pad_caption")
        return rows, key_ok.repeat(len(rows) // len(cond), 1)

    def forward_cached(self, x, pos, mask=None):
        """x (b, T, dim) at positions pos.. through the KV-cached layers -> the last logits."""
        rope = self.rope_table(x.device)[pos:pos + x.shape[1]]
        for layer in self.layers:
            x = layer(x, rope, pos, mask)
        return self.output(self.norm(x[:, -1])).float()

    @torch.no_grad()
    def generate(self, cond, cfg_scale=1.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0,
                 greedy=False, generator=None, callback=None, cond_mask=None):
        """Codes int64 (B, block_size) drawn one at a time (a prefill of the prefix, then a step
        per code) for cond as in forward; callback(t, codes[:, :t]) after each code.

        Classifier-free guidance (paper 2.3): each sample runs twice, with its condition and with
        the null one, and the logits are extrapolated, uncond + s * (cond - uncond): s > 1 buys
        fidelity and alignment with diversity; s = 1 is off (the official generate() guides only
        when s > 1, here every s != 1 counts). cfg_interval k >= 0: codes 0 .. k+1 are guided."""
        B, L = cond.shape[0], self.config.block_size
        length = self.config.cls_token_num + L - 1  # the prefix and every code but the last one
        prefix, key_ok = self.sampling_prefix(cond, cond_mask, cfg_scale, length)
        was_training = self.training
        self.eval()
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(len(prefix), length)
        codes = torch.empty(B, L, dtype=torch.long, device=cond.device)
        self.rope_table(cond.device)  # moved here, so that a compiled forward_cached never has to
        try:
            x, pos = self.cls_embedding(prefix), 0
            for t in range(L):  # mask: the prefill's rows, then one row per step
                mask = None if key_ok is None else prefix_mask(key_ok[:len(x)], pos, x.shape[1])
                logits = self.forward_cached(x, pos, mask)
                pos += x.shape[1]
                if len(logits) > B:  # rows [cond ; uncond]
                    cond_logits, uncond_logits = logits.split(B)
                    logits = uncond_logits + cfg_scale * (cond_logits - uncond_logits)
                codes[:, t] = sample_logits(logits, temperature, top_k, top_p, greedy, generator)
                if callback is not None:
                    callback(t + 1, codes[:, :t + 1])
                # the conditional rows of the cache come first: past cfg_interval they go on alone
                guided = len(prefix) > B and (cfg_interval < 0 or t <= cfg_interval)
                x = self.tok_embeddings(codes[:, t:t + 1].repeat(2 if guided else 1, 1))
        finally:
            for layer in self.layers:
                layer.attention.kv_cache = None
            self.train(was_training)
        return codes

    @classmethod
    def from_pretrained(cls, path, block_size=None, ckpt=None, **overrides):
        """Ours or the official c2i_*.pt, t2i_*.pt (any container; ckpt: its contents, if read) ->
        model in eval mode on the CPU; an official file's shapes tell its config, not block_size."""
        ckpt = load_checkpoint(path) if ckpt is None else ckpt
        if ckpt.get("kind", "gpt") != "gpt":
            raise UserError(f"{path} is a {ckpt['kind']!r} checkpoint, not a GPT; pass a GPT one")
        sd = unwrap_state_dict(ckpt)
        found = config_from_state_dict(sd, overrides.get("n_head"))
        saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
        if set(saved) - {f.name for f in fields(GPTConfig)}:
            raise UserError(f"{path} was made by an older version; train again")
        if bool(saved.get("stream_words")) != cls.stream:
            kind, fix = ("a prefix", "GPT") if cls.stream else ("a DALL-E stream", "t2i.StreamT2I")
            raise UserError(f"{path} is {kind} GPT; load it with {fix}.from_pretrained")
        given = {} if block_size is None else {"block_size": block_size}
        model = cls(GPTConfig(**{**(saved or found), **given, **overrides}))
        name = next((k for k, v in GPT_CONFIGS.items()
                     if all(found.get(f) == v[f] for f in v)), None)
        fits = f"GPT-{name}" if name else ", ".join(f"{k}={v}" for k, v in found.items())
        # text_encoder.*: the T5 trained along (train.py JointT2I), which sample.py loads itself
        load_weights(model, sd, f"GPT checkpoint {path!r}",
                     ignore=(*RUNTIME_BUFFERS, "text_encoder."), hint=f"its shapes fit {fits}")
        model.meta = ckpt["meta"] if isinstance(ckpt.get("meta"), dict) else {}
        model.block_size_known = block_size is not None or "block_size" in saved  # else a guess
        return model.eval()

    def flops_per_token(self):
        """Training FLOPs per token (PaLM appendix B): 6 per matmul weight at every position (not
        the tables, nor cap_proj) + 12 * n_layer * dim * sequence for attention."""
        cfg = self.config
        n = sum(p.numel() for p in self.parameters()) - self.tok_embeddings.weight.numel()
        n -= sum(p.numel() for p in self.cls_embedding.parameters())
        return 6 * n + 12 * cfg.n_layer * cfg.dim * (cfg.cls_token_num + cfg.block_size - 1)

    def estimate_mfu(self, tokens_per_second, device):
        """Achieved training FLOP/s over the GPU's dense bf16 peak (None for other devices)."""
        gpu = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else "?"
        peaks = {"A100": 312e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12}  # dense
        peak = next((v for k, v in peaks.items() if k in gpu), None)
        return peak and self.flops_per_token() * tokens_per_second / peak


def next_token_loss(logits, targets, valid=None):
    """The mean cross-entropy of logits (B, T, V) for targets (B, T), each sample's tokens weighted
    by valid (B,) if given (the official t2i trainer's flag: 0 for an image it could not read)."""
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    weight = torch.ones_like(ce) if valid is None else valid.to(ce.dtype)[:, None].expand_as(ce)
    return (ce * weight).sum() / weight.sum().clamp(min=1)


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """logits / temperature, -inf outside the top_k (0 = off) and outside the top-p nucleus: the
    likeliest tokens up to the first whose cumulative probability crosses top_p, so the top token
    always survives (the official top_k_top_p_filtering, autoregressive/models/generate.py)."""
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = F.pad(cumulative[..., :-1] > top_p, (1, 0), value=False)  # mass before it > p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_logits(logits, temperature=1.0, top_k=0, top_p=1.0, greedy=False, generator=None):
    """One token per row of logits (b, vocab): the argmax if greedy, else a filtered draw."""
    if greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------------------ loading
def config_from_state_dict(sd, n_head=None):
    """The config fields a GPT state dict's shapes show; n_head (in none) is the registry's for its
    dim and depth, else the given one, else head_dim 64."""
    classes, caption = "cls_embedding.embedding_table.weight", "cls_embedding.cap_proj.fc1.weight"
    if "tok_embeddings.weight" not in sd or (classes not in sd and caption not in sd):
        raise UserError("not a class-conditional or text-conditional LlamaGen GPT checkpoint (no "
                        "tok_embeddings or cls_embedding weights); pass a GPT checkpoint")
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


# what some official files save beside the weights, and this model rebuilds: loaders drop them
RUNTIME_BUFFERS = ("kv_cache", "freqs_cis")

# The model zoo (paper Table 1: B 111M parameters .. 3B 3.1B; XXXL, 1B, 7B only in the official
# code); pico, nano and micro are ours, for CPU tests and demos, with a small codebook.
GPT_CONFIGS = {name: dict(n_layer=n, n_head=h, dim=d) for name, n, h, d in [
    ("pico", 2, 2, 64), ("nano", 4, 4, 128), ("micro", 6, 8, 256), ("B", 12, 12, 768),
    ("L", 24, 16, 1024), ("XL", 36, 20, 1280), ("XXL", 48, 24, 1536), ("XXXL", 48, 40, 2560),
    ("1B", 22, 32, 2048), ("3B", 24, 32, 3200), ("7B", 32, 32, 4096)]}


def gpt_config(name, **overrides):
    """GPTConfig of a registry entry ("B" or "GPT-B"), with any field overridden."""
    if (key := name.removeprefix("GPT-")) not in GPT_CONFIGS:
        raise UserError(f"unknown GPT config {name!r}; choose one of {', '.join(GPT_CONFIGS)}")
    return GPTConfig(**{**GPT_CONFIGS[key], **overrides})
