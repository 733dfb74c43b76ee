"""Faster sampling from model.GPT, the same distribution. GPT.generate pays one forward pass per
code, 256 for a 256 px image, and at batch 1 a pass is a few small matrix-vector products that
leave an accelerator idle between kernel launches: launch-bound, not compute-bound. Three remedies,
none of which changes what is sampled:
1. decode_step keeps every shape fixed for the whole image, so a compiled step is captured once
   (a CUDA graph) and replayed for every code: gpt-fast's recipe, a static cache and compile.
2. Speculative Jacobi decoding (Teng et al. 2024, arXiv 2410.01699, training-free) guesses the
   next codes, scores a whole window of guesses in ONE forward, and keeps the longest run that
   survives the speculative-sampling test: fewer forward passes than codes.
3. On a CPU, where a step's time is the streaming of the weights, the matmuls read a copy of each
   weight in oneDNN's blocked layout, which streams faster (onednn_weights).
generate() is what sample.py and bench.py call: GPT.generate or one of these."""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError
from model import KVCache, filter_logits, prefix_mask


def decode_step(model, x, positions, key_ok=None):
    """The fixed-shape step: embeddings x (b, T, dim) at sequence positions (b, T) int64, one row
    each, against caches of full length (static_caches) -> logits (b, T, vocab) float32. k/v are
    written BY POSITION and every query attends to the whole cache under the mask key <= query:
    causal inside the block, all of the cached prefix, blind to stale keys further on. No shape
    depends on how far sampling has got. key_ok (b, cache length) bool: False at a left-padded
    caption's pads, which no image query may see (prefix_mask's rule)."""
    table = model.rope_table(x.device)
    rope = table[positions.clamp(max=len(table) - 1)]  # past the last code: unused slots
    keys = torch.arange(model.layers[0].attention.kv_cache.length, device=x.device)
    mask = keys <= positions[..., None]  # (b, T, cache length)
    if key_ok is not None:
        mask = mask & key_ok[:, None, :]
    mask = mask[:, None]  # (b, 1, T, cache length), for all heads
    for layer in model.layers:
        x = layer(x, rope, positions, mask)
    return model.output(model.norm(x)).float()


def compile_step(model, device):
    """From now on, model's fixed-shape sampling runs through torch.compile of decode_step (stored
    as model.decode_step, which jacobi_generate prefers). Its shapes never change within an image,
    so one trace serves every code (another once guidance stops at cfg_interval, one per batch
    size); on CUDA, mode reduce-overhead records it as a CUDA graph and replays it, removing the
    per-kernel launch cost that bounds batch-1 sampling."""
    mode = "reduce-overhead" if str(device).startswith("cuda") else None
    model.decode_step = torch.compile(decode_step, mode=mode, dynamic=False)


def static_caches(model, rows, length):
    """An empty full-length KVCache of `rows` rows for every layer (allocated on first write)."""
    for layer in model.layers:
        layer.attention.kv_cache = KVCache(rows, length)


# ------------------------------------------------------------------ speculative Jacobi decoding
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
# Why images, unlike text, accept several drafts per pass. A draft drawn from q is kept with chance
# sum_x min(p(x), q(x)) = 1 - TV(p, q): how little the prediction moved since the draft was made.
# An image code depends mostly on its neighbours (2D RoPE makes "left" and "above" the strong
# relations), so a wrong guess some places back barely moves its distribution, and that
# distribution is broad (all 16384 codes for FID), so stale and fresh predictions overlap widely.
# The next word of a text hinges on the exact previous words and is often nearly deterministic.
# (Plain Jacobi decoding keeps a draft only if it EQUALS the fresh choice: fine for greedy text,
# useless for sampled images, where two draws from a broad distribution almost never coincide.)
def acceptance_probability(p_draft, q_draft):
    """The speculative test: keep a draft x drawn from q with probability min(1, p(x) / q(x))."""
    return (p_draft / q_draft).clamp(max=1.0)


def target_distributions(logits, n_images, codes, cfg_scale=1.0, cfg_interval=-1, temperature=1.0,
                         top_k=0, top_p=1.0, greedy=False):
    """logits (rows, T, vocab) predicting code indices `codes` (B, T) -> what the sequential sampler
    draws those codes from: guided where the code lies inside cfg_interval (rows [cond ; uncond], as
    in GPT.generate), then filtered and normalised, (B, T, vocab); greedy: the guided logits."""
    if len(logits) > n_images:
        cond, uncond = logits.split(n_images)
        logits = uncond + cfg_scale * (cond - uncond)
        if cfg_interval >= 0:  # GPT.generate's rule: codes 0 .. cfg_interval+1 guided
            logits = torch.where((codes <= cfg_interval + 1)[..., None], logits, cond)
    return logits if greedy else filter_logits(logits, temperature, top_k, top_p).softmax(-1)


@torch.no_grad()
def jacobi_generate(model, cond, window=16, cfg_scale=1.0, cfg_interval=-1, temperature=1.0,
                    top_k=0, top_p=1.0, greedy=False, generator=None, callback=None,
                    cond_mask=None, return_passes=False):
    """GPT.generate's codes (B, block_size), its arguments, through the fixed-shape decode_step,
    `window` codes scored per forward (1: exactly the sequential sampler). return_passes: (codes,
    forward passes).

    A pass feeds, per row, its newest accepted code and the W-1 drafts after it and scores W codes;
    1 to W of them are accepted (all W-1 drafts kept: the last score gives a free exact draw). Each
    row accepts its OWN number: the rows share a pass but sit at their own positions (per-row RoPE
    rows, cache writes and masks cost no more than shared ones), so no row waits for the slowest
    one, and a row's test involves only its own p, q and coins: every row is exactly distributed.
    Rows that finish early idle, writing only to slots past the image, until the last is done."""
    W = window
    if not isinstance(W, int) or W < 1:
        raise UserError(f"window {window!r} is not a whole number >= 1 (codes scored per pass)")
    c, B = model.config, cond.shape[0]
    L, V, N = c.block_size, c.vocab_size, c.cls_token_num
    # k/v of accepted codes stay where they were written; a rejected draft's slot is overwritten by
    # the next pass and masked until then. W-1 slots of slack let every window fit.
    prefix, key_ok = model.sampling_prefix(cond, cond_mask, cfg_scale, N + L + W - 1)
    step = getattr(model, "decode_step", decode_step)  # compile_step's, if any
    was_training = model.training
    model.eval()
    prefix = model.cls_embedding(prefix)  # embedded after eval(): no condition dropout
    rows, device = len(prefix), prefix.device
    guided = rows > B
    ar, every = torch.arange(W, device=device), torch.arange(B, device=device)
    tokens = torch.zeros(B, L + W, dtype=torch.long, device=device)  # accepted codes, then drafts
    q = torch.zeros(B, W - 1, V, device=device)  # the distribution each draft was drawn from
    kw = dict(cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature,
              top_k=top_k, top_p=top_p, greedy=greedy)
    static_caches(model, rows, N + L + W - 1)
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
                logits = step(model, x, positions)
            else:  # the first len(x) rows: the unconditional half drops out after cfg_interval
                logits = step(model, x, positions, key_ok[:len(x)])
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
        model.train(was_training)
    codes = tokens[:, :L].clone()
    return (codes, passes) if return_passes else codes


# ----------------------------------------------------------------------------- CPU weight copies
# oneDNN's packed linear, in PyTorch's CPU builds with mkldnn (torch.compile's CPU backend packs
# weights this way itself, so a compiled step leaves it to that)
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                           "_reorder_linear_weight")


class PackedLinear(nn.Linear):
    """A bias-free nn.Linear for one sampling call on a CPU: its product reads `packed`, a copy of
    the weight in oneDNN's blocked layout, which a step of few rows streams faster than the plain
    one (bf16 results bit-identical to F.linear's, float32 equal to rounding)."""

    def forward(self, x):  # is_compiling first: a traced step never reads the copy
        packed = None if torch.compiler.is_compiling() else self.__dict__.get("packed")
        if packed is None or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, None, "none",
                                               [], "")
        return y.reshape(*x.shape[:-1], -1)

    def __getstate__(self):  # deepcopy, pickle: the copy stays behind
        return {k: v for k, v in self.__dict__.items() if k != "packed"}


@contextlib.contextmanager
def onednn_weights(model):
    """Inside, model's float32 and bf16 linear layers on a CPU are PackedLinear, their class
    switched there and back: the copies, a second set of weights in memory, live for one call,
    safe from every way a weight can change between calls, and a step compiled inside sees the
    same class in every call."""
    def worth_it(w):  # float32 under 2^17 weights: bound by a call's fixed cost, F.linear's lower
        small = w.dtype == torch.float32 and w.numel() < 2 ** 17
        return (ONEDNN and w.device.type == "cpu" and not small
                and w.dtype in (torch.float32, torch.bfloat16)
                and not torch.is_autocast_enabled("cpu"))  # autocast: F.linear's dtype rules
    layers = [m for m in model.modules() if type(m) is nn.Linear and m.bias is None
              and worth_it(m.weight)]
    for m in layers:
        m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 16)
        m.__class__ = PackedLinear
    try:
        yield
    finally:
        for m in layers:
            m.__class__ = nn.Linear
            del m.packed


def generate(model, cond, sampler="sequential", window=16, static=False, return_passes=False, **kw):
    """Codes from GPT.generate (its arguments in kw) by the sampler asked for: "sequential", through
    decode_step if static, or "jacobi" with `window`; on a CPU with oneDNN weight copies.
    return_passes: (codes, forward passes)."""
    if sampler not in ("sequential", "jacobi"):
        raise UserError(f"unknown sampler {sampler!r}; choose 'sequential' or 'jacobi'")
    with onednn_weights(model):
        if sampler == "jacobi" or static:
            return jacobi_generate(model, cond, window if sampler == "jacobi" else 1,
                                   return_passes=return_passes, **kw)
        codes = model.generate(cond, **kw)
    return (codes, model.config.block_size) if return_passes else codes
