"""The text side of LlamaGen's text-to-image model: FLAN-T5's encoder, its SentencePiece tokenizer.

Why a frozen language model (paper 3.3): the t2i GPT never reads words. A caption is cleaned, cut
into SentencePiece pieces, and run through the encoder of FLAN-T5-XL, a 1.2B-parameter model trained
on far more text than any image-caption set holds; its 120 x 2048 output is the GPT's prefix.
A text encoder learnt from the captions alone would see only short machine-written sentences (stage
I: 50M BLIP captions); the frozen one brings what it learnt from the C4 web corpus and instruction
tuning, costs nothing to train, and its features can be computed once per caption and stored (the
way image codes are).

Layout, bottom-up: the safetensors reader and writer, Hugging Face folder loading, the T5 encoder
(layer norm, relative position bias, attention, gated-GELU FFN, blocks, T5Config, T5Encoder), the
unigram tokenizer (protobuf reader, normalisation, Viterbi), caption cleaning, TextEncoder (the one
call the GPT needs), a small CLI, then the config registry. Key names and file layouts are the ones
Hugging Face publishes (google/flan-t5-xl), so the real files load unchanged.
"""
import argparse
import html
import json
import math
import os
import re
import struct
import unicodedata
import urllib.parse
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, attention, cli, load_checkpoint, pick_device, save_atomic

# ------------------------------------------------------------------------------------- safetensors
# A safetensors file is: 8 bytes (little-endian u64) N, then N bytes of JSON header
#   {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}
# (space-padded), then the raw little-endian row-major tensor bytes; offsets count from the end of
# the header. No pickle, so nothing runs on load, and the bytes can be memory-mapped as they lie.
ST_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
             "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
             "U32": torch.uint32, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
             "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
             "C64": torch.complex64}
if hasattr(torch, "float8_e8m0fnu"):  # the scale type of microscaling formats, torch >= 2.7
    ST_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def read_safetensors_header(path):
    """(header dict without __metadata__, metadata dict, byte offset of the data, file size)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such safetensors file; check the path")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: truncated safetensors file ({size} bytes, no header length); "
                            "re-download it")
        n = struct.unpack("<Q", head)[0]
        if n > min(size - 8, 100_000_000):  # the official reader caps headers at 100 MB too
            raise UserError(f"{path}: header length {n} does not fit a {size}-byte file; the file "
                            "is truncated or not safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        assert isinstance(header, dict)
    except (UnicodeDecodeError, ValueError, AssertionError):
        raise UserError(f"{path}: bad safetensors header (not a JSON object); the file is damaged "
                        "or not safetensors") from None
    meta = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        try:
            dtype, shape = ST_DTYPES.get(info["dtype"]), info["shape"]
            begin, end = info["data_offsets"]
            ok = all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(begin, int)
            ok = ok and isinstance(end, int) and 0 <= begin <= end
        except (TypeError, KeyError, ValueError):
            ok, dtype = False, True
        if not ok:
            raise UserError(f"{where} has a bad header entry {info!r}; the file is damaged")
        if dtype is None:
            raise UserError(f"{where} has dtype {info['dtype']!r}, which torch does not have here")
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if end - begin != nbytes:
            raise UserError(f"{where}: header says {info['dtype']} {shape} ({nbytes} bytes) but "
                            f"data_offsets span {end - begin} bytes; the header lies about the "
                            "shape")
        if end > data_size:
            raise UserError(f"{where} ends at byte {end} of the data, beyond the {data_size} bytes "
                            "present: the file is truncated; re-download it")
    return header, meta, 8 + n, size


def read_safetensors(path, keep=None):
    """{name: tensor} of a .safetensors file, memory-mapped: the tensors are views of the file's
    pages (copy-on-write, so writing to one never changes the file), read from disk only when
    touched; no second copy is made in RAM. `keep(name) -> bool` selects tensors before any is
    touched."""
    header, _, start, size = read_safetensors_header(path)  # every entry checked before any byte
    names = [k for k in header if keep is None or keep(k)]
    if not names:
        return {}
    # shared=False maps the file privately (MAP_PRIVATE): pages come from the page cache on demand,
    # and the kernel may drop them again under pressure, since the file holds them. Loading a 2.4 GB
    # encoder this way costs 2.4 GB of page cache and no anonymous copy, where torch.load of a .bin
    # reads everything into freshly allocated memory first.
    buf = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
    out = {}
    for name in names:
        info = header[name]
        begin, end = info["data_offsets"]
        dtype = ST_DTYPES[info["dtype"]]
        t = buf[start + begin: start + end]
        if (start + begin) % torch.empty(0, dtype=dtype).element_size():
            t = t.clone()  # viewing as a wider type needs an aligned address (official files are)
        out[name] = t.view(dtype).reshape(info["shape"])
    return out


def write_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as a safetensors file the official library reads. Tensors are laid out
    by decreasing element size, so every offset stays aligned for the memory-mapped views above."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset = {}, 0
    for k in order:
        t = tensors[k]
        if t.dtype not in ST_NAMES:
            raise UserError(f"tensor {k!r}: dtype {t.dtype} has no safetensors name")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data then starts at a multiple of 8 bytes

    def write(f):
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k in order:
            t = tensors[k].detach().cpu().contiguous()
            if t.numel():  # the bytes as they lie in memory (little-endian wherever torch runs)
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    save_atomic(write, path)


def load_hf_state_dict(path, keep=None):
    """The weights of a Hugging Face folder or file as {name: tensor}, nothing renamed. Looks for,
    in this order: model.safetensors.index.json (shards), model.safetensors,
    pytorch_model.bin.index.json, pytorch_model.bin. safetensors are memory-mapped and `keep(name)
    -> bool` drops tensors before they are read; a .bin is a pickle, loaded whole with
    torch.load(weights_only=True), then filtered."""
    keep = keep or (lambda name: True)
    if os.path.isdir(path):
        for name in ("model.safetensors.index.json", "model.safetensors",
                     "pytorch_model.bin.index.json", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return load_hf_state_dict(os.path.join(path, name), keep)
        raise UserError(f"{path}: no model.safetensors, pytorch_model.bin or index of shards in "
                        "this folder; point to a Hugging Face model folder")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file or folder; check the path")
    # Large models are cut into shards of a few GB; the index maps every tensor to its shard, so a
    # loader opens only the shards that hold tensors it keeps (FLAN-T5-XL: both, the decoder's
    # tensors being spread over them).
    if path.endswith(".json"):  # an index: {"weight_map": {tensor name: shard file}}
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}: not a shard index (no 'weight_map'); re-download it") \
                from None
        folder, out = os.path.dirname(path), {}
        for shard in sorted({v for k, v in weight_map.items() if keep(k)}):
            file = os.path.join(folder, shard)
            if not os.path.isfile(file):
                raise UserError(f"{path} names shard {shard!r}, which is missing from {folder}; "
                                "download every shard")
            wanted = {k for k, v in weight_map.items() if v == shard and keep(k)}
            part = load_hf_state_dict(file, lambda k: k in wanted)
            if wanted - set(part):
                absent = sorted(wanted - set(part))[0]
                raise UserError(f"{file}: tensor {absent!r} named in the index is not in this "
                                "shard; re-download it")
            out.update(part)
        return out
    if path.endswith(".safetensors"):
        return read_safetensors(path, keep)
    sd = load_checkpoint(path)
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{path}: holds no flat state dict of tensors; not a Hugging Face weight "
                        "file")
    return {k: v for k, v in sd.items() if keep(k)}


# ---------------------------------------------------------------------------------- the T5 encoder
# T5 (Raffel et al. 2020) as released in "v1.1" form, which FLAN-T5 keeps: pre-norm blocks, an RMS
# norm, a gated-GELU feed-forward, no biases anywhere, and relative position biases instead of
# positions. Official behaviour matched: transformers models/t5/modeling_t5.py (encoder half).
class T5LayerNorm(nn.Module):
    """Scale by the root mean square only: no mean subtracted, no bias. Statistics in float32; in
    bf16 the normalised input is rounded to bf16 before the weight multiplies it, as T5 does."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps)).to(self.weight.dtype)


# T5 has no position table: nothing about "where" is added to the token embeddings. Instead every
# attention layer adds to the score of query i on key j a learned number that depends only on the
# offset j - i (one number per head): attention learns "look two tokens back" directly, and a
# sentence longer than any seen in training still has meaningful offsets. Offsets are grouped into
# 32 buckets: the sign takes half (bidirectional encoder), small offsets |d| < 8 get a bucket each,
# larger ones share logarithmically wider buckets up to max_distance 128, beyond which all offsets
# fall in the last one.
def relative_position_bucket(offset, num_buckets=32, max_distance=128):
    """Bucket index in [0, num_buckets) of each key-minus-query offset (an int64 tensor)."""
    half = num_buckets // 2
    bucket = (offset > 0).long() * half  # keys after the query use the upper half
    dist = offset.abs()
    exact = half // 2
    # log-spaced: exact + floor(log(d / exact) / log(max_distance / exact) * (half - exact)), capped
    # clamp: log(0) would be -inf for offset 0; those small offsets take the exact branch anyway
    far = exact + (torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                   * (half - exact)).long()
    return bucket + torch.where(dist < exact, dist, far.clamp(max=half - 1))


class T5Attention(nn.Module):
    """Multi-head self-attention with no 1/sqrt(d) scaling of the scores: Mesh TensorFlow folds that
    factor into the initialisation of q instead (see T5Encoder.init_weights), so the trained weights
    expect raw q.k scores. Only the first layer owns the relative position bias table."""

    def __init__(self, c, has_bias):
        super().__init__()
        self.n_heads, self.d_kv, self.c, self.dropout = c.num_heads, c.d_kv, c, c.dropout_rate
        inner = c.num_heads * c.d_kv
        self.q, self.k, self.v = (nn.Linear(c.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, c.d_model, bias=False)
        if has_bias:
            table = torch.empty(c.relative_attention_num_buckets, c.num_heads)  # see T5Encoder
            self.relative_attention_bias = nn.Embedding(*table.shape, _weight=table)

    def position_bias(self, n):
        """[1, heads, n, n]: the learned bias of query i on key j, a function of j - i only."""
        pos = torch.arange(n, device=self.relative_attention_bias.weight.device)
        bucket = relative_position_bucket(pos[None, :] - pos[:, None],
                                          self.c.relative_attention_num_buckets,
                                          self.c.relative_attention_max_distance)
        return self.relative_attention_bias(bucket).permute(2, 0, 1)[None]

    def forward(self, x, bias):
        B, N, _ = x.shape
        q, k, v = (proj(x).view(B, N, self.n_heads, self.d_kv).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        # PyTorch's fused attention takes an additive float mask, here position bias + padding, and
        # scale=1.0 keeps T5's unscaled scores; it never materialises the softmax in a slow path.
        y = attention(q, k, v, attn_mask=bias, scale=1.0,
                      dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, N, -1))


class T5DenseGatedGelu(nn.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x): one projection is a gate for the other (Shazeer 2020, GLU
    variants), which T5 v1.1 found better than the original ReLU FFN at the same cost."""

    def __init__(self, c):
        super().__init__()
        self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)
        self.dropout = nn.Dropout(c.dropout_rate)

    def forward(self, x):
        return self.wo(self.dropout(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, c, has_bias):
        super().__init__()
        self.SelfAttention = T5Attention(c, has_bias)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)
        self.dropout = nn.Dropout(c.dropout_rate)

    def forward(self, x, bias):
        return x + self.dropout(self.SelfAttention(self.layer_norm(x), bias))


class T5LayerFF(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.DenseReluDense = T5DenseGatedGelu(c)  # the name is historical: v1 used ReLU
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)
        self.dropout = nn.Dropout(c.dropout_rate)

    def forward(self, x):
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class T5Block(nn.Module):
    """Pre-norm residual block; `layer` is a list so module names match the released key names."""

    def __init__(self, c, has_bias):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(c, has_bias), T5LayerFF(c)])

    def forward(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    """The blocks and the final norm, under the name "encoder" as in the released files. Only
    block 0 holds a relative_attention_bias table; T5Encoder.forward turns it into one bias tensor
    that every block adds (sharing it costs nothing and T5 was trained that way)."""

    def __init__(self, c):
        super().__init__()
        self.block = nn.ModuleList([T5Block(c, has_bias=i == 0) for i in range(c.num_layers)])
        self.final_layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)
        self.dropout = nn.Dropout(c.dropout_rate)


@dataclass
class T5Config:
    """The fields of a Hugging Face T5 config.json that the encoder needs (same names)."""
    vocab_size: int = 32128  # 32000 pieces + 100 <extra_id_*> sentinels + 28 rows never used
    d_model: int = 2048  # width of the residual stream, and of the features the GPT reads
    d_kv: int = 64  # per-head width; num_heads * d_kv need not equal d_model in T5
    d_ff: int = 5120  # hidden width of the gated feed-forward
    num_layers: int = 24
    num_heads: int = 32
    relative_attention_num_buckets: int = 32  # 16 per direction (see relative_position_bucket)
    relative_attention_max_distance: int = 128  # offsets at least this far share the last bucket
    dropout_rate: float = 0.1  # training only; eval() turns it off
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # the only kind served here (v1.1 and FLAN-T5)

    @classmethod
    def from_json(cls, path):
        """Read a Hugging Face config.json; anything but a gated-GELU T5 (v1.1, FLAN) is refused."""
        try:
            with open(path) as f:
                raw = json.load(f)
            assert isinstance(raw, dict)
        except (OSError, ValueError, AssertionError):
            raise UserError(f"{path}: cannot read a JSON config; point to a Hugging Face T5 "
                            "folder") from None
        kind, ffn = raw.get("model_type"), raw.get("feed_forward_proj", "gated-gelu")
        if kind not in ("t5", None) or ffn != "gated-gelu":
            raise UserError(f"{path}: model_type {kind!r} with feed_forward_proj {ffn!r}; only "
                            "gated-GELU T5 (v1.1, FLAN-T5) is supported")
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


def _is_encoder_key(name):
    return name.startswith("encoder.") or name == "shared.weight"


class T5Encoder(nn.Module):
    """The encoder half of T5: token embedding (not scaled, no positions), blocks, final norm.
    forward(ids [B, N] int64, mask [B, N] bool or 0/1) -> hidden states [B, N, d_model].

    The embedding is `shared` because in the full model the decoder reads the same table; the
    released files store it as shared.weight and often again as encoder.embed_tokens.weight."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        # Tables come uninitialised (init_weights draws them): nn.Embedding's own normal_ init
        # would, on the meta device that from_pretrained builds on, import torch's compiler (~10 s).
        table = torch.empty(config.vocab_size, config.d_model)
        self.shared = nn.Embedding(*table.shape, _weight=table)
        self.encoder = T5Stack(config)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, factor=1.0):
        """T5's initialisation, for training from scratch: every projection ~ N(0, 1/fan_in), except
        q, whose std also carries the 1/sqrt(d_kv) that attention leaves out."""
        c = self.config
        self.shared.weight.normal_(0, factor)
        for name, p in self.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".q.weight"):
                p.normal_(0, factor * (c.d_model * c.d_kv) ** -0.5)
            elif name.endswith((".k.weight", ".v.weight", "wi_0.weight", "wi_1.weight",
                                "relative_attention_bias.weight")):
                p.normal_(0, factor * c.d_model ** -0.5)
            elif name.endswith(".o.weight"):
                p.normal_(0, factor * (c.num_heads * c.d_kv) ** -0.5)
            elif name.endswith("wo.weight"):
                p.normal_(0, factor * c.d_ff ** -0.5)

    def forward(self, ids, mask=None):
        x = self.encoder.dropout(self.shared(ids))
        n = ids.shape[1]
        # one bias for all layers: computed once from block 0's table, then shared
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(n).to(x.dtype)
        # The most negative finite score, not -inf: a padded key gets exactly zero weight after the
        # softmax, and a row whose keys are all padding still gives finite numbers, never NaN.
        if mask is not None:
            pad = ~mask.bool()[:, None, None, :]
            bias = bias.masked_fill(pad, torch.finfo(x.dtype).min)
        # Precision: FLAN-T5's activations exceed float16's range (65504) in the feed-forward, a
        # known trait of the released weights; float32 or bfloat16 (float32's range) are safe, and
        # LlamaGen runs it in bf16.
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.dropout(self.encoder.final_layer_norm(x))

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32):
        """Load a Hugging Face T5 / FLAN-T5 folder (config.json + weights, see load_hf_state_dict):
        only the encoder's tensors are read, decoder.* and lm_head.* are skipped unread. Parameters
        of the file's own dtype stay memory-mapped views of it; another dtype converts one tensor at
        a time."""
        config = T5Config.from_json(os.path.join(folder, "config.json"))
        sd = load_hf_state_dict(folder, keep=_is_encoder_key)
        embed = sd.pop("encoder.embed_tokens.weight", None)  # the same tensor as shared.weight
        if "shared.weight" not in sd and embed is not None:
            sd["shared.weight"] = embed
        # Built on the meta device (shapes, no memory), then load_state_dict(assign=True) makes the
        # loaded tensors themselves the parameters: at no point do two copies of the weights exist.
        with torch.device("meta"):
            model = cls(config)
        for name, p in model.state_dict().items():
            if name not in sd:
                raise UserError(f"{folder}: tensor {name!r} missing from the weights; the download "
                                "is incomplete or not a T5 encoder")
            if sd[name].shape != p.shape:
                raise UserError(f"{_weight_file(folder, name)}: tensor {name!r} has shape "
                                f"{list(sd[name].shape)}, config.json implies {list(p.shape)}; "
                                "the config and the weights do not belong together")
            sd[name] = sd[name].to(dtype)
        extra = sorted(set(sd) - set(model.state_dict()))
        if extra:
            raise UserError(f"{_weight_file(folder, extra[0])}: unexpected encoder tensor "
                            f"{extra[0]!r}; not a gated-GELU T5 encoder")
        model.load_state_dict(sd, strict=True, assign=True)  # the tensors themselves, no copy
        return model.eval()


def _weight_file(folder, name):
    """The file of a folder that holds tensor `name` (for error messages)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        try:
            with open(os.path.join(folder, index)) as f:
                return os.path.join(folder, json.load(f)["weight_map"][name])
        except (OSError, ValueError, KeyError):
            pass
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, single)):
            return os.path.join(folder, single)
    return folder



# --------------------------------------------------------------------------- the unigram tokenizer
# SentencePiece's unigram model (Kudo 2018), the tokenizer of T5: a vocabulary of pieces, each with
# a log-probability; a text is cut into the pieces whose log-probabilities sum highest. Spaces are
# not separators but part of the pieces: each word starts with the metaspace U+2581 ("▁"), so
# "a cat" is "▁a▁cat" and decoding is a plain concatenation.
METASPACE = "\u2581"
UNK_PENALTY = 10.0  # an unknown character scores 10 nats below the rarest piece (SentencePiece's)

# NMT-NFKC, the normaliser T5 was trained with, is NFKC plus these rules (SentencePiece
# normalization_rule_name="nmt_nfkc"): control characters are deleted, line breaks, tabs, zero-width
# and direction marks and the replacement character become a space, and the full-width tilde is
# kept.
_NMT_DELETE = [*range(0x01, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, 0x8F, 0x9F]
_NMT_SPACE = [0x09, 0x0A, 0x0C, 0x0D, 0x061C, 0x1680, 0x200B, 0x200C, 0x200E, 0x200F, 0x2028,
              0x2029,
              0xFEFF, 0xFFFD, 0x2581]  # a literal "▁" in the input is a space too
_NMT_TABLE = {**{c: None for c in _NMT_DELETE}, **{c: " " for c in _NMT_SPACE}}


def nmt_nfkc(text):
    """NMT-NFKC with the standard library. The real files carry a "precompiled_charsmap" (a trie of
    replacement strings built from a newer Unicode release); it is not read here. Compared on every
    code point against sentencepiece 0.2, the differences are characters newer than Python's
    unicodedata (e.g. Unicode 16's outlined Latin letters) and U+0344 after a letter."""
    text = text.translate(_NMT_TABLE)
    if "\uff5e" in text:  # NMT keeps the full-width tilde, which NFKC would fold to "~"
        return "\uff5e".join(unicodedata.normalize("NFKC", part) for part in text.split("\uff5e"))
    return unicodedata.normalize("NFKC", text)


# The protobuf wire format, all spiece.model needs: a message is a run of (key, value) records. The
# key is a varint (7 bits per byte, low bits first, high bit set on all but the last byte) holding
# field_number * 8 + wire_type; type 0 is a varint value, 2 a varint length then that many bytes (a
# string or a nested message), 5 four little-endian bytes (a float32 here), 1 eight bytes. Unknown
# fields are skipped by their wire type, which is why old readers survive new fields.
def _protobuf(buf, where):
    """The fields of one protobuf message, as [(field number, value)]: varints as ints, 32-bit
    fields as floats, length-delimited ones as bytes (strings or nested messages: the caller knows
    which)."""
    out, i = [], 0

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            if i >= len(buf):
                raise UserError(f"{where}: truncated protobuf; not a SentencePiece model")
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value
    while i < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 1:  # 64-bit: none of the fields read here, skipped
            value, i = buf[i: i + 8], i + 8
        elif wire == 2:
            n = varint()
            value, i = buf[i: i + n], i + n
        elif wire == 5:
            value, i = struct.unpack("<f", buf[i: i + 4])[0] if i + 4 <= len(buf) else None, i + 4
        else:
            raise UserError(f"{where}: protobuf wire type {wire}; not a SentencePiece model file")
        if i > len(buf) or field == 0:
            raise UserError(f"{where}: damaged protobuf; not a SentencePiece model file")
        out.append((field, value))
    return out


class UnigramTokenizer:
    """T5's tokenizer. `tok(texts, length=120) -> (ids int64 [B, N], mask bool [B, N])`: each text
    is normalised, cut into pieces by Viterbi, </s> appended, truncated to `length` (keeping </s>
    last) and right-padded with <pad>, as LlamaGen's T5Embedder asks of Hugging Face
    (padding="max_length").

    Two flavours of the same model, matched to the library each file belongs to: a `spiece.model`
    behaves as sentencepiece (words split at spaces only), a `tokenizer.json` as Hugging Face
    tokenizers (words split at any Unicode whitespace; its special tokens such as "</s>" are also
    recognised inside the text)."""

    def __init__(self, pieces, unk_id=2, eos_id=1, pad_id=0, split_any_space=False, specials=()):
        """pieces: [(piece, log_prob, usable)] in id order; usable=False for control/unknown pieces,
        which Viterbi never proposes. specials: pieces matched verbatim in the raw text."""
        self.pieces = [p for p, _, _ in pieces]
        self.unk_id, self.eos_id, self.pad_id = unk_id, eos_id, pad_id
        self.split_any_space = split_any_space
        self.vocab = {p: (i, s) for i, (p, s, ok) in enumerate(pieces) if ok and p}
        # the longest piece bounds how far back Viterbi looks from each position
        self.max_len = max((len(p) for p in self.vocab), default=1)
        scores = [s for p, s, ok in pieces if ok]
        self.unk_score = (min(scores) if scores else 0.0) - UNK_PENALTY
        self.special_ids = {p: self.pieces.index(p) for p in specials}
        self._cache = {}  # word -> ids: caption words repeat (Zipf), so most cuts are looked up
        specials = sorted(specials, key=len, reverse=True)  # longest first, as a regex alternation
        self.special_re = re.compile("|".join(map(re.escape, specials))) if specials else None

    def __len__(self):
        return len(self.pieces)

    def segment(self, word):
        """Viterbi: ids of the best cut of one "▁word". best[i] is the highest score of any cut of
        word[:i]; each end is reached from every start j whose word[j:i] is a piece (or a lone
        unknown character). Ties go to the longest piece, as in sentencepiece; unknown runs merge
        into one."""
        # Why Viterbi and not greedy longest-match: the unigram model treats pieces as independent
        # draws, so the probability of a cut is the product of its pieces' probabilities, and the
        # best cut of word[:i] must extend the best cut of some word[:j]: O(len * max piece length).
        if word in self._cache:
            return list(self._cache[word])
        n = len(word)
        best, back = [0.0] + [-math.inf] * n, [None] * (n + 1)
        for i in range(1, n + 1):
            for j in range(max(0, i - self.max_len), i):
                hit = self.vocab.get(word[j:i])
                if hit is not None and best[j] + hit[1] > best[i]:
                    best[i], back[i] = best[j] + hit[1], (j, hit[0])
            if word[i - 1] not in self.vocab and best[i - 1] + self.unk_score > best[i]:
                best[i], back[i] = best[i - 1] + self.unk_score, (i - 1, self.unk_id)
        ids, i = [], n  # walk the back-pointers from the end
        while i > 0:
            j, piece = back[i]
            if not (piece == self.unk_id and ids and ids[-1] == self.unk_id):
                ids.append(piece)
            i = j
        if len(self._cache) >= 1 << 16:  # bounded memory on endless new words
            self._cache.clear()
        self._cache[word] = tuple(ids[::-1])
        return ids[::-1]

    def encode(self, text, eos=True):
        """Piece ids of one text (</s> appended unless eos=False)."""
        ids = []
        parts = self.special_re.split(text) if self.special_re else [text]
        found = self.special_re.findall(text) if self.special_re else []
        # Each word is cut on its own, with "▁" in front (SentencePiece's dummy prefix): T5's
        # pieces never hold "▁" except at their start (trained with split_by_whitespace), so this
        # equals a cut of the whole "▁a▁red▁cat", and leading, trailing and repeated spaces vanish
        # as remove_extra_whitespaces asks.
        for k, part in enumerate(parts):
            norm = nmt_nfkc(part)
            for word in norm.split() if self.split_any_space else norm.split(" "):
                if word:
                    ids += self.segment(METASPACE + word)
            if k < len(found):
                ids.append(self.special_ids[found[k]])
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids):
        """The text of piece ids, control pieces dropped (the normalisation is not undone)."""
        keep = [self.pieces[i] for i in ids if i not in (self.pad_id, self.eos_id)]
        return "".join(keep).replace(METASPACE, " ").strip()

    def __call__(self, texts, length=120):
        """A batch of texts (or one) as padded ids and a True-where-valid mask, both [B, length]."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.full((len(texts), length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        for b, text in enumerate(texts):
            row = self.encode(text)
            if len(row) > length:  # truncation keeps </s> as the last token
                row = row[: length - 1] + [self.eos_id]
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = True
        return ids, mask

    @classmethod
    def from_words(cls, words):
        """A tokenizer with no file, for a small captioned world: <pad> 0, </s> 1, <unk> 2, then
        each word as one whole piece "▁word". All words score alike, so Viterbi takes whole words;
        any other word becomes a single <unk>."""
        words = list(dict.fromkeys(words))
        pieces = [("<pad>", 0.0, False), ("</s>", 0.0, False), ("<unk>", 0.0, False)]
        return cls(pieces + [(METASPACE + nmt_nfkc(w), -1.0, True) for w in words])

    @classmethod
    def from_file(cls, path):
        """Read a Hugging Face tokenizer.json or a SentencePiece spiece.model (or a folder with
        one)."""
        if os.path.isdir(path):
            for name in ("spiece.model", "tokenizer.json"):
                if os.path.isfile(os.path.join(path, name)):
                    return cls.from_file(os.path.join(path, name))
            raise UserError(f"{path}: no spiece.model or tokenizer.json in this folder")
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such tokenizer file; check the path")
        with open(path, "rb") as f:
            raw = f.read()
        if path.endswith(".json") or raw[:1] == b"{":
            return cls._from_json(raw, path)
        return cls._from_spiece(raw, path)

    @classmethod
    def _from_json(cls, raw, path):
        try:
            model = json.loads(raw.decode("utf-8"))["model"]
            kind = model.get("type")
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{path}: not a Hugging Face tokenizer.json (no 'model' object)") \
                from None
        if kind != "Unigram":
            raise UserError(f"{path}: a {kind} tokenizer, not a SentencePiece unigram one (T5's); "
                            "give the tokenizer.json or spiece.model of a T5 model")
        # "added_tokens" are matched verbatim in the raw text before the model sees it; the special
        # ones (<pad>, </s>, <unk>, <extra_id_*>) are also barred from ordinary segmentation.
        added = json.loads(raw)["added_tokens"] if b"added_tokens" in raw else []
        special = {t["content"] for t in added if t.get("special")}
        unk = model.get("unk_id", 2)
        pieces = [(p, float(s), p not in special and i != unk)
                  for i, (p, s) in enumerate(model["vocab"])]
        ids = {p: i for i, (p, _, _) in enumerate(pieces)}
        return cls(pieces, unk_id=unk, eos_id=ids.get("</s>", 1), pad_id=ids.get("<pad>", 0),
                   split_any_space=True, specials=[p for p in special if p in ids])

    @classmethod
    def _from_spiece(cls, raw, path):
        # ModelProto: 1 = repeated SentencePiece {1 piece, 2 score, 3 type}, 3 = NormalizerSpec
        # {1 name, 2 precompiled_charsmap, 3 add_dummy_prefix, 4 remove_extra_whitespaces, ...}
        pieces, norm, trainer = [], {}, {}
        for field, value in _protobuf(raw, path):
            if field == 1 and isinstance(value, bytes):
                sub = dict(_protobuf(value, path))
                piece = sub.get(1, b"").decode("utf-8", "replace")
                pieces.append((piece, sub.get(2, 0.0), sub.get(3, 1)))
            elif field == 2 and isinstance(value, bytes):  # TrainerSpec: 3 = model_type
                trainer = dict(_protobuf(value, path))
            elif field == 3 and isinstance(value, bytes):
                norm = dict(_protobuf(value, path))
        if not pieces or not all(isinstance(s, float) for _, s, _ in pieces):
            raise UserError(f"{path}: no SentencePiece pieces found; not a spiece.model file")
        if trainer.get(3, 1) != 1:  # 1 UNIGRAM (the default), 2 BPE, 3 WORD, 4 CHAR
            raise UserError(f"{path}: a SentencePiece model of type {trainer[3]} (2 = BPE), not a "
                            "unigram one (T5's); give the spiece.model of a T5 model")
        if any(t == 6 for _, _, t in pieces) or 2 not in {t for _, _, t in pieces}:
            raise UserError(f"{path}: a SentencePiece model with byte pieces or no <unk>; only "
                            "T5-style unigram models are supported")
        # proto2 defaults: absent fields mean add_dummy_prefix and remove_extra_whitespaces are on;
        # a model trained otherwise would need rules this reader does not implement.
        name = norm.get(1, b"nmt_nfkc").decode("utf-8", "replace")
        if name not in ("nmt_nfkc", "nfkc") or norm.get(3, 1) != 1 or norm.get(4, 1) != 1:
            raise UserError(f"{path}: normaliser {name!r} without the dummy prefix / whitespace "
                            "rules T5 uses; only nmt_nfkc models are supported")
        ids = {p: i for i, (p, _, _) in enumerate(pieces)}
        # piece types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
        return cls([(p, s, t in (1, 4)) for p, s, t in pieces],
                   unk_id=next(i for i, (_, _, t) in enumerate(pieces) if t == 2),
                   eos_id=ids.get("</s>", 1), pad_id=ids.get("<pad>", 0))



# -------------------------------------------------------------------------------- caption cleaning
# LlamaGen cleans every caption before T5 sees it, with the rules of language/t5.py (inherited from
# PixArt / DeepFloyd IF), applied twice: web captions carry URLs, markup, shop boilerplate and
# product codes that would spend the 120 tokens on noise. The rules below reproduce that behaviour
# in order.
_DASHES = ("\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030"
           "\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d")
_EXT = "(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"
_DOMAIN = r"[a-zA-Z0-9.\-]+\.(?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b/?(?!@)"
_BEFORE_MARKUP = [  # (pattern, replacement), on the lower-cased caption, before markup is stripped
    (r"<person>", "person"),  # a placeholder some caption sets use for a name
    (r"\b(?:https?:(?:/{1,3}|[a-zA-Z0-9%])|" + _DOMAIN + ")", ""),  # a scheme, then a bare domain
    (r"\b(?:www:(?:/{1,3}|[a-zA-Z0-9%])|" + _DOMAIN + ")", ""),
]
_AFTER_MARKUP = [
    (r"@[\w\d]+\b", ""),  # @nicknames
    # CJK strokes, enclosed letters, compatibility forms and ideographs (U+31C0-U+9FFF, kana kept):
    # T5's English vocabulary has almost none of them, so they would only become <unk>.
    ("[\u31c0-\u9fff]+", ""),
    ("[" + _DASHES + "]+", "-"),  # every kind of dash, runs included, becomes one hyphen
    ("[`\u00b4\u00ab\u00bb\u201c\u201d\u00a8]", '"'), ("[\u2018\u2019]", "'"),  # one quote each
    (r"&quot;?", ""), (r"&amp", ""),  # entities that were escaped twice
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # a trailing article id
    (r"\\n", " "),  # a literal backslash-n left by a scraper
    (r"#\d{1,3}\b", ""), (r"#\d{5,}\b", ""), (r"\b\d{6,}\b", ""),  # numbers that are ids
    (r"\S+\." + _EXT, ""),  # file names
    (r"[\"']{2,}", '"'), (r"\.{2,}", " "),  # runs of quotes; ellipses
    ("[#\u00ae\u2022\u00a9\u2122&@\u00b7\u00ba\u00bd\u00be\u00bf\u00a1\u00a7~"
     r")(\]\[}{|\\/*]+", " "),  # stray symbols and brackets
    (r"\s+\.\s+", " "),  # a lone full stop
]
_AFTER_UNESCAPE = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # product codes: jc6640,
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # jc6640vc, 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""), (r"(free\s)?download(\sfree)?", ""),  # shop talk
    (r"\bclick\b\s(?:for|on)\s\w+", ""), (r"\b" + _EXT + r"(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # longer letter-digit codes
    (r"\b\d+\.?\d*[x\u0445\u00d7]\d+\.?\d*\b", ""),  # sizes such as 1920x1080
    (r"\b\s+:\s+", ": "), (r"(\D[,./])\b", r"\1 "), (r"\s+", " "),  # spacing around punctuation
]
_EDGES = [  # on the stripped result: surrounding quotes, one stray character at either end
    (r"^[\"']([\w\W]+)[\"']$", r"\1"), (r"^['_,\-:;]", ""), (r"['_,\-:\-+]$", ""), (r"^\.\S+$", ""),
]
_COMPILED = {name: [(re.compile(p), r) for p, r in rules] for name, rules in dict(
    before=_BEFORE_MARKUP, after=_AFTER_MARKUP, unescape=_AFTER_UNESCAPE, edges=_EDGES).items()}
# What stands in for BeautifulSoup: a tag starts with a letter, "/" or "!" ("a < b" stays text).
_TAG = re.compile(r"</?[a-zA-Z!][^<>]*>")


def _clean_once(text):
    text = urllib.parse.unquote_plus(str(text)).strip().lower()
    for pattern, repl in _COMPILED["before"]:
        text = pattern.sub(repl, text)
    text = html.unescape(_TAG.sub("", text))  # markup: tags dropped, entities decoded
    for pattern, repl in _COMPILED["after"]:
        text = pattern.sub(repl, text)
    if len(re.findall(r"[-_]", text)) > 3:  # this-is-my-cute-cat, this_is_my_cute_cat
        text = re.sub(r"[-_]", " ", text)
    text = html.unescape(html.unescape(text)).strip()
    for pattern, repl in _COMPILED["unescape"]:
        text = pattern.sub(repl, text)
    for pattern, repl in _COMPILED["edges"]:  # on the unstripped text, as the official code does
        text = pattern.sub(repl, text)
    return text.strip()


def clean_caption(text):
    """A caption as LlamaGen's T5Embedder cleans it (twice, as it does): url-unquoted, lower-cased,
    URLs, markup, @nicknames and CJK ideographs removed, dashes and quotes unified, ids, file names,
    shop phrases and product codes dropped, punctuation spacing fixed. Left out, for want of a
    dependency: ftfy's repair of mojibake and odd characters (it runs ftfy.fix_text), and
    BeautifulSoup's full HTML parser (here a tag is anything like <a ...> or </b>, then entities are
    decoded)."""
    return _clean_once(_clean_once(text))


# ---------------------------------------------------------------------------- one call for the GPT
class TextEncoder:
    """Tokenizer + frozen T5 encoder on one device and dtype: captions in, the t2i GPT's condition
    out."""

    def __init__(self, tokenizer, encoder, device="cpu", dtype=torch.float32, clean=True):
        self.tokenizer, self.clean, self.dtype = tokenizer, clean, dtype
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device, dtype).eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=torch.float32, clean=True):
        """A Hugging Face (FLAN-)T5 folder: spiece.model or tokenizer.json, config.json, the
        weights."""
        device = pick_device(device)
        return cls(UnigramTokenizer.from_file(folder), T5Encoder.from_pretrained(folder, dtype),
                   device, dtype, clean)

    @torch.no_grad()
    def encode_captions(self, texts, length=120, batch_size=32):
        """(features [B, length, d_model] in self.dtype, mask [B, length] bool), on self.device.
        Right-padded as T5 returns them (valid tokens first, then padding); padded positions'
        features are zero. The GPT side moves the valid tokens to the end itself (paper 3.3, left
        padding)."""
        # N = 120 (paper 3.3): long enough for LAION-COCO's BLIP captions and the short first
        # sentence of the stage II LLaVA captions; longer ones are truncated, </s> kept.
        texts = [texts] if isinstance(texts, str) else list(texts)
        if self.clean:
            texts = [clean_caption(t) for t in texts]
        ids, mask = self.tokenizer(texts, length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = torch.empty(len(texts), length, self.encoder.config.d_model, dtype=self.dtype,
                          device=self.device)
        for i in range(0, len(texts), batch_size):
            h = self.encoder(ids[i: i + batch_size], mask[i: i + batch_size])
            # T5 computes outputs at padded positions too (their queries are not masked); they
            # carry nothing about the caption, so they are zeroed before anyone can use them.
            out[i: i + batch_size] = h * mask[i: i + batch_size, :, None]
        return out, mask


# --------------------------------------------------------------------------------------------- CLI
def main(argv=None):
    """`python text.py tokenize --tokenizer spiece.model "a cat"`: the pieces a caption becomes.
    `python text.py encode --t5 flan-t5-xl/ "a cat"`: what the GPT would receive for it."""
    p = argparse.ArgumentParser(description="T5 text encoding: tokenize, or encode captions.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("encode", help="print token ids and feature shapes of captions")
    e.add_argument("--t5", required=True, help="a Hugging Face (FLAN-)T5 folder")
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    e.add_argument("--length", type=int, default=120, help="tokens per caption (LlamaGen: 120)")
    e.add_argument("captions", nargs="+")
    t = sub.add_parser("tokenize", help="print the pieces and ids of texts")
    t.add_argument("--tokenizer", required=True, help="spiece.model, tokenizer.json, or a folder")
    t.add_argument("--clean", action="store_true", help="apply LlamaGen's caption cleaning first")
    t.add_argument("texts", nargs="+")
    args = p.parse_args(argv)
    if args.cmd == "tokenize":
        tok = UnigramTokenizer.from_file(args.tokenizer)
        for text in args.texts:
            ids = tok.encode(clean_caption(text) if args.clean else text)
            pieces = [tok.pieces[i] for i in ids]
            print(f"{text!r}: {len(ids)} tokens\n  ids    {ids}\n  pieces {pieces}")
        return
    if args.length < 1:
        raise UserError(f"--length {args.length}: give at least 1 token")
    enc = TextEncoder.from_pretrained(args.t5, args.device, getattr(torch, args.dtype))
    feats, mask = enc.encode_captions(args.captions, args.length)
    print(f"features {list(feats.shape)} {args.dtype} on {feats.device}, mask {list(mask.shape)}")
    for text, f, m in zip(args.captions, feats, mask):
        ids = enc.tokenizer.encode(clean_caption(text))[: args.length]
        rms = f[m].float().pow(2).mean().sqrt()
        print(f"{text!r}: {int(m.sum())} tokens, ids {ids}, feature rms {rms:.4f}")


# ---------------------------------------------------------------------------------------- registry
# Encoder shapes from the google/* config.json files on Hugging Face. FLAN-T5-XL is the one LlamaGen
# uses (paper 3.3): its encoder has 1,223,527,424 parameters (2.4 GB in bf16). The XXL models share
# this code (same gated-GELU v1.1 layout, twice as wide). "t5-nano" and "t5-micro" are ours, for CPU
# tests and small captioned worlds; give them the vocab_size of their tokenizer.
T5_CONFIGS = {
    "t5-nano": dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, vocab_size=1024),
    "t5-micro": dict(d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=4, vocab_size=4096),
    "flan-t5-small": dict(d_model=512, d_kv=64, num_heads=6, d_ff=1024, num_layers=8),
    "flan-t5-base": dict(d_model=768, d_kv=64, num_heads=12, d_ff=2048, num_layers=12),
    "flan-t5-large": dict(d_model=1024, d_kv=64, num_heads=16, d_ff=2816, num_layers=24),
    "flan-t5-xl": dict(d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24),
    "flan-t5-xxl": dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24),
    "t5-v1_1-xxl": dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24),
}


def t5_config(name, **overrides):
    """T5Config of a registry entry, with any field overridden (e.g. vocab_size=len(tokenizer))."""
    if name not in T5_CONFIGS:
        raise UserError(f"unknown T5 config {name!r}; choose one of {', '.join(T5_CONFIGS)}")
    return T5Config(**{**T5_CONFIGS[name], **overrides})


if __name__ == "__main__":
    cli(main)
