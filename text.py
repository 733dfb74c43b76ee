"""The text side of LlamaGen's text-to-image model: FLAN-T5's encoder and its SentencePiece tokenizer.

Why a frozen language model (paper 3.3): the t2i GPT never reads words. A caption is cleaned, cut into
SentencePiece pieces, and run through the encoder of FLAN-T5-XL, a 1.2B-parameter model trained on far
more text than any image-caption set holds; its 120 x 2048 output is the GPT's prefix. Learning a text
encoder from captions alone would see a few hundred million short, noisy sentences; the frozen one
brings what it learnt from the whole C4 corpus and instruction tuning, costs nothing to train, and its
features can be computed once per caption and stored (the way image codes are).

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
import sys
import unicodedata
import urllib.parse
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, cli, load_checkpoint, pick_device, save_file_atomic

# -------------------------------------------------------------------------------------------- safetensors
# A safetensors file is: 8 bytes (little-endian u64) N, then N bytes of JSON header
#   {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {str: str}}
# (space-padded), then the raw little-endian row-major tensor bytes; offsets count from the end of the
# header. No pickle, so nothing runs on load, and the bytes can be memory-mapped as they lie.
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
        if n > min(size - 8, 100 * 2 ** 20):  # the official reader caps headers at 100 MB
            raise UserError(f"{path}: header length {n} does not fit a {size}-byte file; the file is "
                            "truncated or not safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        assert isinstance(header, dict)
    except (UnicodeDecodeError, ValueError, AssertionError):
        raise UserError(f"{path}: bad safetensors header (not a JSON object); the file is damaged or "
                        "not safetensors") from None
    meta = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        try:
            dtype, shape, (begin, end) = ST_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
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
                            f"data_offsets span {end - begin} bytes; the header lies about the shape")
        if end > data_size:
            raise UserError(f"{where} ends at byte {end} of the data, beyond the {data_size} bytes "
                            "present: the file is truncated; re-download it")
    return header, meta, 8 + n, size


def read_safetensors(path, keep=None):
    """{name: tensor} of a .safetensors file, memory-mapped: the tensors are views of the file's pages
    (copy-on-write, so writing to one never changes the file), read from disk only when touched; no
    second copy is made in RAM. `keep(name) -> bool` selects tensors before any is touched."""
    header, _, start, size = read_safetensors_header(path)
    names = [k for k in header if keep is None or keep(k)]
    if not names:
        return {}
    # shared=False maps the file privately (MAP_PRIVATE): pages come from the page cache on demand
    buf = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
    out = {}
    for name in names:
        info = header[name]
        begin, end = info["data_offsets"]
        dtype = ST_DTYPES[info["dtype"]]
        t = buf[start + begin: start + end]
        if (start + begin) % torch.empty(0, dtype=dtype).element_size():
            t = t.clone()  # a view as a wider type needs an aligned address; the official writer aligns
        out[name] = t.view(dtype).reshape(info["shape"])
    return out


def write_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as a safetensors file the official library reads. Tensors are laid out by
    decreasing element size, so every offset stays aligned for the memory-mapped views above."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset = {}, 0
    for k in order:
        t = tensors[k]
        if t.dtype not in ST_NAMES:
            raise UserError(f"tensor {k!r}: dtype {t.dtype} has no safetensors name")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data then starts at a multiple of 8 bytes

    def write(f):
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k in order:
            t = tensors[k].detach().cpu().contiguous()
            if t.numel():  # the bytes as they lie in memory (little-endian on every platform torch runs)
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    save_file_atomic(path, write)


def load_hf_state_dict(path, keep=None):
    """The weights of a Hugging Face folder or file as {name: tensor}, nothing renamed. Looks for, in this
    order: model.safetensors.index.json (shards), model.safetensors, pytorch_model.bin.index.json,
    pytorch_model.bin. safetensors are memory-mapped and `keep(name) -> bool` drops tensors before they
    are read; a .bin is a pickle, loaded whole with torch.load(weights_only=True), then filtered."""
    keep = keep or (lambda name: True)
    if os.path.isdir(path):
        for name in ("model.safetensors.index.json", "model.safetensors",
                     "pytorch_model.bin.index.json", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return load_hf_state_dict(os.path.join(path, name), keep)
        raise UserError(f"{path}: no model.safetensors, pytorch_model.bin or index of shards in this "
                        "folder; point to a Hugging Face model folder")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file or folder; check the path")
    if path.endswith(".json"):  # an index: {"weight_map": {tensor name: shard file}}
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}: not a shard index (no 'weight_map'); re-download it") from None
        folder, out = os.path.dirname(path), {}
        for shard in sorted({v for k, v in weight_map.items() if keep(k)}):
            file = os.path.join(folder, shard)
            if not os.path.isfile(file):
                raise UserError(f"{path} names shard {shard!r}, which is missing from {folder}; "
                                "download every shard")
            wanted = {k for k, v in weight_map.items() if v == shard and keep(k)}
            part = load_hf_state_dict(file, lambda k: k in wanted)
            if wanted - set(part):
                raise UserError(f"{file}: tensor {sorted(wanted - set(part))[0]!r} named in the index "
                                "is not in this shard; re-download it")
            out.update(part)
        return out
    if path.endswith(".safetensors"):
        return read_safetensors(path, keep)
    sd = load_checkpoint(path)
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{path}: holds no flat state dict of tensors; not a Hugging Face weight file")
    return {k: v for k, v in sd.items() if keep(k)}


# --------------------------------------------------------------------------------------- the T5 encoder
# T5 (Raffel et al. 2020) as released in "v1.1" form, which FLAN-T5 keeps: pre-norm blocks, an RMS norm,
# a gated-GELU feed-forward, no biases anywhere, and relative position biases instead of positions.
# Official behaviour matched: transformers models/t5/modeling_t5.py (encoder half).
class T5LayerNorm(nn.Module):
    """Scale by the root mean square only: no mean subtracted, no bias. Statistics in float32; in bf16
    the normalised input is rounded back to bf16 before the weight multiplies it, as T5 does."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps)).to(self.weight.dtype)


# T5 has no position table: nothing about "where" is added to the token embeddings. Instead every
# attention layer adds to the score of query i on key j a learned number that depends only on the
# offset j - i (one number per head): attention learns "look two tokens back" directly, and a sentence
# longer than any seen in training still has meaningful offsets. Offsets are grouped into 32 buckets:
# the sign takes half (bidirectional encoder), small offsets |d| < 8 get a bucket each, larger ones share
# logarithmically wider buckets up to max_distance 128, beyond which all offsets fall in the last one.
def relative_position_bucket(offset, num_buckets=32, max_distance=128):
    """Bucket index in [0, num_buckets) of each key-minus-query offset (an int64 tensor)."""
    half = num_buckets // 2
    bucket = (offset > 0).long() * half  # keys after the query use the upper half
    dist = offset.abs()
    exact = half // 2
    # log-spaced: exact + floor(log(d / exact) / log(max_distance / exact) * (half - exact)), capped
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
            self.relative_attention_bias = nn.Embedding(c.relative_attention_num_buckets, c.num_heads)

    def position_bias(self, n):
        """[1, heads, n, n]: the learned bias of query i on key j, a function of j - i only."""
        pos = torch.arange(n, device=self.relative_attention_bias.weight.device)
        bucket = relative_position_bucket(pos[None, :] - pos[:, None], self.c.relative_attention_num_buckets,
                                          self.c.relative_attention_max_distance)
        return self.relative_attention_bias(bucket).permute(2, 0, 1)[None]

    def forward(self, x, bias):
        B, N, _ = x.shape
        q, k, v = (proj(x).view(B, N, self.n_heads, self.d_kv).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0,
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
    """Pre-norm residual block; `layer` is a list so the module names match the released key names."""

    def __init__(self, c, has_bias):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(c, has_bias), T5LayerFF(c)])

    def forward(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block = nn.ModuleList([T5Block(c, has_bias=i == 0) for i in range(c.num_layers)])
        self.final_layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)
        self.dropout = nn.Dropout(c.dropout_rate)


@dataclass
class T5Config:
    """The fields of a Hugging Face T5 config.json that the encoder needs (same names)."""
    vocab_size: int = 32128
    d_model: int = 2048
    d_kv: int = 64
    d_ff: int = 5120
    num_layers: int = 24
    num_heads: int = 32
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    @classmethod
    def from_json(cls, path):
        """Read a Hugging Face config.json; anything but a gated-GELU T5 (v1.1, FLAN) is refused."""
        try:
            with open(path) as f:
                raw = json.load(f)
            assert isinstance(raw, dict)
        except (OSError, ValueError, AssertionError):
            raise UserError(f"{path}: cannot read a JSON config; point to a Hugging Face T5 folder") from None
        if raw.get("model_type") not in ("t5", None) or raw.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
            raise UserError(f"{path}: model_type {raw.get('model_type')!r} with feed_forward_proj "
                            f"{raw.get('feed_forward_proj')!r}; only gated-GELU T5 (v1.1, FLAN-T5) is supported")
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


def _is_encoder_key(name):
    return name.startswith("encoder.") or name == "shared.weight"


class T5Encoder(nn.Module):
    """The encoder half of T5: token embedding (not scaled, no positions), blocks, final norm.
    forward(ids [B, N] int64, mask [B, N] bool or 0/1) -> hidden states [B, N, d_model]."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, factor=1.0):
        """T5's initialisation, for training from scratch: every projection ~ N(0, 1/fan_in), except q,
        whose std also carries the 1/sqrt(d_kv) that attention leaves out."""
        c = self.config
        self.shared.weight.normal_(0, factor)
        for name, p in self.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".q.weight"):
                p.normal_(0, factor * (c.d_model * c.d_kv) ** -0.5)
            elif name.endswith((".k.weight", ".v.weight", "wi_0.weight", "wi_1.weight", "relative_attention_bias.weight")):
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
        if mask is not None:  # padded keys get the most negative score the dtype holds: zero weight
            pad = ~mask.bool()[:, None, None, :]
            bias = bias.masked_fill(pad, torch.finfo(x.dtype).min)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.dropout(self.encoder.final_layer_norm(x))

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32):
        """Load a Hugging Face T5 / FLAN-T5 folder (config.json + weights, see load_hf_state_dict): only
        the encoder's tensors are read, decoder.* and lm_head.* are skipped unread. Parameters of the
        file's own dtype stay memory-mapped views of it; another dtype converts one tensor at a time."""
        config = T5Config.from_json(os.path.join(folder, "config.json"))
        sd = load_hf_state_dict(folder, keep=_is_encoder_key)
        embed = sd.pop("encoder.embed_tokens.weight", None)  # the same tensor as shared.weight
        if "shared.weight" not in sd and embed is not None:
            sd["shared.weight"] = embed
        with torch.device("meta"):
            model = cls(config)
        for name, p in model.state_dict().items():
            if name not in sd:
                raise UserError(f"{folder}: tensor {name!r} missing from the weights; the download is "
                                "incomplete or not a T5 encoder")
            if sd[name].shape != p.shape:
                raise UserError(f"{_weight_file(folder, name)}: tensor {name!r} has shape "
                                f"{list(sd[name].shape)}, config.json implies {list(p.shape)}; "
                                "the config and the weights do not belong together")
            sd[name] = sd[name].to(dtype)
        extra = sorted(set(sd) - set(model.state_dict()))
        if extra:
            raise UserError(f"{_weight_file(folder, extra[0])}: unexpected encoder tensor {extra[0]!r}; "
                            "not a gated-GELU T5 encoder")
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


# ------------------------------------------------------------------------------------------- registry
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
