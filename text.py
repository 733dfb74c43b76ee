"""The text side of LlamaGen's t2i model (paper 3.3): a caption is cleaned, cut into SentencePiece
pieces and run through the frozen encoder of FLAN-T5-XL, whose 120 x 2048 output is the GPT's
prefix: it knows far more text than any caption set, costs nothing to train, and is computed once.
Parity: transformers' modeling_t5.py, sentencepiece, LlamaGen's language/t5.py."""
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

from common import (UserError, attention, between, check_flags, cli, load_checkpoint, read_json,
                    pick_device, save_atomic)

# ------------------------------------------------------------------------------------- safetensors
# A safetensors file: a u64 N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin,
# end]}, "__metadata__"}, then the raw little-endian tensors: no pickle, and it maps into memory.
ST_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
             "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
             "U32": torch.uint32, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
             "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
             "C64": torch.complex64}
if hasattr(torch, "float8_e8m0fnu"):  # the scale type of microscaling formats, torch >= 2.7
    ST_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def read_safetensors_header(path):
    """(header, metadata, byte offset of the data, file size), every entry checked."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such safetensors file; check the path")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if len(head := f.read(8)) < 8:
            raise UserError(f"{path}: truncated safetensors file ({size} bytes, no header "
                            "length); re-download it")
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
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        try:
            dtype, shape, (begin, end) = (ST_DTYPES.get(info["dtype"]), info["shape"],
                                          info["data_offsets"])
            ok = all(isinstance(d, int) and d >= 0 for d in [*shape, begin, end]) and begin <= end
        except (TypeError, KeyError, ValueError):
            ok, dtype = False, True
        if not ok:
            raise UserError(f"{where} has a bad header entry {info!r}; the file is damaged")
        if dtype is None:
            raise UserError(f"{where} has dtype {info['dtype']!r}, which torch does not have here")
        if end - begin != (nbytes := math.prod(shape) * dtype.itemsize):
            raise UserError(f"{where}: header says {info['dtype']} {shape} ({nbytes} bytes) but "
                            f"data_offsets span {end - begin} bytes; the header lies about the "
                            "shape")
        if end > size - 8 - n:
            raise UserError(f"{where} ends at byte {end} of the data, beyond the {size - 8 - n} "
                            "bytes present: the file is truncated; re-download it")
    return header, meta, 8 + n, size


def read_safetensors(path, keep=None):
    """{name: tensor} of a .safetensors file (`keep(name)` selects), mapped copy-on-write."""
    header, _, start, size = read_safetensors_header(path)
    buf = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
    out = {}
    for name, info in header.items():
        if keep is None or keep(name):
            (begin, end), dtype = info["data_offsets"], ST_DTYPES[info["dtype"]]
            t = buf[start + begin: start + end]
            t = t.clone() if (start + begin) % dtype.itemsize else t  # wide types need alignment
            out[name] = t.view(dtype).reshape(info["shape"])
    return out


def write_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as a safetensors file, widest elements first (aligned offsets)."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset = {}, 0
    for k in order:
        if (t := tensors[k]).dtype not in ST_NAMES:
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


def load_hf_state_dict(path, keep=None, source=None):
    """{name: tensor} of a Hugging Face folder or weight file, `keep(name)` selecting; the dict
    `source` gets each tensor's file."""
    keep, source = keep or (lambda name: True), {} if source is None else source
    if os.path.isdir(path):
        for name in ("model.safetensors.index.json", "model.safetensors",
                     "pytorch_model.bin.index.json", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return load_hf_state_dict(os.path.join(path, name), keep, source)
        raise UserError(f"{path}: no model.safetensors, pytorch_model.bin or index of shards in "
                        "this folder; point to a Hugging Face model folder")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file or folder; check the path")
    if path.endswith(".json"):  # large models come in shards, the index maps tensors to them
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}: not a shard index (no 'weight_map'); re-download it") \
                from None
        folder, out = os.path.dirname(path), {}
        for shard in sorted({v for k, v in weight_map.items() if keep(k)}):  # only those needed
            if not os.path.isfile(file := os.path.join(folder, shard)):
                raise UserError(f"{path} names shard {shard!r}, which is missing from {folder}; "
                                "download every shard")
            wanted = {k for k, v in weight_map.items() if v == shard and keep(k)}
            out.update(load_hf_state_dict(file, lambda k: k in wanted, source))
            if wanted - set(out):
                raise UserError(f"{file}: tensor {sorted(wanted - set(out))[0]!r} named in the "
                                "index is not in this shard; re-download it")
        return out
    if path.endswith(".safetensors"):
        sd = read_safetensors(path, keep)
    else:
        sd = load_checkpoint(path)
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise UserError(f"{path}: holds no flat state dict of tensors; not a Hugging Face "
                            "weight file")
        sd = {k: v for k, v in sd.items() if keep(k)}
    source.update(dict.fromkeys(sd, path))
    return sd


# ---------------------------------------------------------------------------------- the T5 encoder
# T5 (Raffel et al. 2020) in its "v1.1" form, which FLAN-T5 keeps: pre-norm blocks, an RMS norm, a
# gated-GELU feed-forward, no biases anywhere, and relative position biases instead of positions.
class T5LayerNorm(nn.Module):
    """Scale by the root mean square only (no mean, no bias), statistics in float32."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps)).to(self.weight.dtype)


# T5 has no position embeddings: attention adds to the score of query i on key j a learned number
# (per head) of the offset j - i, in 32 buckets: the sign takes half, |d| < 8 get one each, larger
# ones share logarithmically wider buckets up to max_distance 128, beyond which all share the last.
def relative_position_bucket(offset, num_buckets=32, max_distance=128):
    """Bucket index in [0, num_buckets) of each key-minus-query offset (an int64 tensor)."""
    half, dist = num_buckets // 2, offset.abs()
    bucket, exact = (offset > 0).long() * half, half // 2  # keys after the query: the upper half
    far = exact + (torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                   * (half - exact)).long()
    return bucket + torch.where(dist < exact, dist, far.clamp(max=half - 1))


class T5Block(nn.Module):
    """x + dropout(f(layer_norm(x))) around self-attention, then around the gated-GELU feed-forward
    wo(gelu_tanh(wi_0 x) * wi_1 x) (Shazeer 2020)."""

    def __init__(self, c, has_bias):
        super().__init__()
        self.c, inner = c, c.num_heads * c.d_kv
        attn = {p: nn.Linear(c.d_model, inner, bias=False) for p in "qkv"}
        attn["o"] = nn.Linear(inner, c.d_model, bias=False)
        if has_bias:  # uninitialised, see T5Encoder
            table = torch.empty(c.relative_attention_num_buckets, c.num_heads)
            attn["relative_attention_bias"] = nn.Embedding(*table.shape, _weight=table)
        ffn = {w: nn.Linear(c.d_model, c.d_ff, bias=False) for w in ("wi_0", "wi_1")}
        ffn["wo"] = nn.Linear(c.d_ff, c.d_model, bias=False)
        self.layer = nn.ModuleList([nn.ModuleDict({
            "SelfAttention": nn.ModuleDict(attn),
            "layer_norm": T5LayerNorm(c.d_model, c.layer_norm_epsilon)}), nn.ModuleDict({
            "DenseReluDense": nn.ModuleDict(ffn),
            "layer_norm": T5LayerNorm(c.d_model, c.layer_norm_epsilon)})])
        self.dropout = nn.Dropout(c.dropout_rate)

    def forward(self, x, bias):
        (attn, norm1), (ffn, norm2) = (d.values() for d in self.layer)
        (B, N, _), h, c = x.shape, norm1(x), self.c
        q, k, v = (attn[p](h).view(B, N, c.num_heads, c.d_kv).transpose(1, 2) for p in "qkv")
        # no 1/sqrt(d) (scale=1): Mesh TensorFlow folds it into q's initialisation (init_weights)
        y = attention(q, k, v, attn_mask=bias, scale=1.0,
                      dropout_p=c.dropout_rate if self.training else 0.0)
        x = x + self.dropout(attn.o(y.transpose(1, 2).reshape(B, N, -1)))
        h = norm2(x)
        h = self.dropout(F.gelu(ffn.wi_0(h), approximate="tanh") * ffn.wi_1(h))
        return x + self.dropout(ffn.wo(h))


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


class T5Encoder(nn.Module):
    """The encoder half of T5, (ids [B, N], mask [B, N]) -> [B, N, d_model]: token embedding (not
    scaled), blocks, final norm."""

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        # uninitialised (init_weights draws it): nn.Embedding's init on "meta" imports the compiler
        table = torch.empty(c.vocab_size, c.d_model)
        self.shared = nn.Embedding(*table.shape, _weight=table)
        self.encoder = nn.ModuleDict({  # "encoder" as in the released files
            "block": nn.ModuleList(T5Block(c, i == 0) for i in range(c.num_layers)),
            "final_layer_norm": T5LayerNorm(c.d_model, c.layer_norm_epsilon),
            "dropout": nn.Dropout(c.dropout_rate)})
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """For training from scratch: projections ~ N(0, 1/fan_in), q's also / sqrt(d_kv)."""
        c = self.config
        std = {"shared": 1.0, "q": (c.d_model * c.d_kv) ** -0.5, "wo": c.d_ff ** -0.5,
               "o": (c.num_heads * c.d_kv) ** -0.5}
        for name, p in self.named_parameters():  # shared, then q, k, v, o, layer_norm, wi_0, ...
            if (kind := name.split(".")[-2]).endswith("layer_norm"):
                p.fill_(1.0)
            else:
                p.normal_(0, std.get(kind, c.d_model ** -0.5))

    def forward(self, ids, mask=None):
        c, x = self.config, self.encoder.dropout(self.shared(ids))
        # one bias [1, heads, N, N] for every block, from block 0's table: query i on key j
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        pos = torch.arange(ids.shape[1], device=table.weight.device)
        n, far = c.relative_attention_num_buckets, c.relative_attention_max_distance
        bucket = relative_position_bucket(pos[None, :] - pos[:, None], n, far)
        bias = table(bucket).permute(2, 0, 1)[None].to(x.dtype)
        if mask is not None:  # the most negative finite score, not -inf: never a NaN
            bias = bias.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(x.dtype).min)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.dropout(self.encoder.final_layer_norm(x))

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32):
        """A Hugging Face gated-GELU T5 folder (v1.1, FLAN), only the encoder read, mapped."""
        raw = read_json(path := os.path.join(folder, "config.json"),
                        "point to a Hugging Face T5 folder")
        kind, ffn = raw.get("model_type"), raw.get("feed_forward_proj", "gated-gelu")
        if kind not in ("t5", None) or ffn != "gated-gelu":
            raise UserError(f"{path}: model_type {kind!r} with feed_forward_proj {ffn!r}; only "
                            "gated-GELU T5 (v1.1, FLAN-T5) is supported")
        config = T5Config(**{f.name: raw[f.name] for f in fields(T5Config) if f.name in raw})
        sd = load_hf_state_dict(folder, lambda k: k.startswith("encoder.") or k == "shared.weight",
                                (source := {}))  # tensor -> its file, for error messages
        embed = sd.pop("encoder.embed_tokens.weight", None)  # the same tensor as shared.weight
        if "shared.weight" not in sd and embed is not None:
            sd["shared.weight"] = embed
            source["shared.weight"] = source["encoder.embed_tokens.weight"]
        # built on the meta device, then assign=True makes the loaded tensors the parameters
        with torch.device("meta"):
            model = cls(config)
        for name, p in model.state_dict().items():
            if name not in sd:
                raise UserError(f"{folder}: tensor {name!r} missing from the weights; the download "
                                "is incomplete or not a T5 encoder")
            if sd[name].shape != p.shape:
                raise UserError(f"{source[name]}: tensor {name!r} has shape "
                                f"{list(sd[name].shape)}, config.json implies {list(p.shape)}; "
                                "the config and the weights do not belong together")
            sd[name] = sd[name].to(dtype)
        if extra := sorted(set(sd) - set(model.state_dict())):
            raise UserError(f"{source[extra[0]]}: unexpected encoder tensor {extra[0]!r}; not a "
                            "gated-GELU T5 encoder")
        model.load_state_dict(sd, strict=True, assign=True)
        return model.eval()


# --------------------------------------------------------------------------- the unigram tokenizer
# SentencePiece's unigram model (Kudo 2018), T5's tokenizer: pieces with log-probabilities, a text
# cut into the pieces whose sum is highest; a word starts with the metaspace "▁": "▁a▁cat".
METASPACE = "\u2581"
# NMT-NFKC, T5's normaliser: NFKC, control characters deleted, whitespace-like ones spaced
_NMT_TABLE = {**dict.fromkeys([*range(0x01, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, 0x8F, 0x9F]),
              **dict.fromkeys([0x09, 0x0A, 0x0C, 0x0D, 0x061C, 0x1680, 0x200B, 0x200C, 0x200E,
                               0x200F, 0x2028, 0x2029, 0xFEFF, 0xFFFD, 0x2581], " ")}  # 2581: "▁"


def nmt_nfkc(text):
    """NMT-NFKC by unicodedata (not the files' newer "precompiled_charsmap"), "～" kept."""
    return "～".join(unicodedata.normalize("NFKC", p) for p in text.translate(_NMT_TABLE).split("～"))


def _protobuf(buf, where):
    """[(field, value)] of one protobuf message (spiece.model's format): records keyed by a varint
    (7 bits a byte, low first) field * 8 + wire type; wire 0: a varint, 2: a varint length and
    bytes (strings or messages), 5: a float32, 1: eight bytes."""
    out, i = [], 0

    def varint():
        nonlocal i
        shift = value = 0
        while i < len(buf):
            value, shift, i = value | (buf[i] & 0x7F) << shift, shift + 7, i + 1
            if buf[i - 1] < 0x80:
                return value
        raise UserError(f"{where}: truncated protobuf; not a SentencePiece model")
    while i < len(buf):
        field, wire = divmod(varint(), 8)
        if wire == 0:
            value = varint()
        else:
            n = varint() if wire == 2 else {1: 8, 5: 4}.get(wire)  # 1: 64 bits, none read here
            if n is None:
                raise UserError(f"{where}: protobuf wire type {wire}; not a SentencePiece model "
                                "file")
            value, i = buf[i: i + n], i + n
            if wire == 5 and i <= len(buf):
                value = struct.unpack("<f", value)[0]
        if i > len(buf) or field == 0:
            raise UserError(f"{where}: damaged protobuf; not a SentencePiece model file")
        out.append((field, value))
    return out


class UnigramTokenizer:
    """T5's tokenizer of [(piece, log_prob, usable)] in id order. A `spiece.model` splits words at
    spaces (as sentencepiece), a `tokenizer.json` at any whitespace and finds special tokens."""

    def __init__(self, pieces, unk_id=2, eos_id=1, pad_id=0, split_any_space=False, specials=()):
        self.pieces = [p for p, _, _ in pieces]
        self.unk_id, self.eos_id, self.pad_id = unk_id, eos_id, pad_id
        self.split_any_space = split_any_space
        self.vocab = {p: (i, s) for i, (p, s, ok) in enumerate(pieces) if ok and p}
        self.max_len = max((len(p) for p in self.vocab), default=1)  # how far back Viterbi looks
        # an unknown character scores 10 nats below the rarest piece, as in sentencepiece
        self.unk_score = min((s for _, s, ok in pieces if ok), default=0.0) - 10.0
        self.special_ids = {p: self.pieces.index(p) for p in specials}
        self._cache = {}  # word -> ids: caption words repeat (Zipf), so most cuts are looked up
        specials = sorted(specials, key=len, reverse=True)  # longest first, as a regex alternation
        self.special_re = re.compile("|".join(map(re.escape, specials))) if specials else None

    def __len__(self):
        return len(self.pieces)

    def unknown_words(self, texts, clean=True):
        """The words of `texts` read as <unk> (in part), once each: what the GPT cannot follow."""
        words = dict.fromkeys(w for t in texts
                              for w in nmt_nfkc(clean_caption(t) if clean else t).split())
        return [w for w in words if self.unk_id in self.segment(METASPACE + w)]

    def segment(self, word):
        """Viterbi: the best cut of word[:i] extends the best of some word[:j] by a piece (or one
        unknown character); ties go to the longest piece, unknown runs merge, as sentencepiece's."""
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
            i, piece = back[i]
            if not (piece == self.unk_id and ids and ids[-1] == self.unk_id):
                ids.append(piece)
        if len(self._cache) >= 1 << 16:  # bounded memory on endless new words
            self._cache.clear()
        self._cache[word] = tuple(ids[::-1])
        return ids[::-1]

    def encode(self, text, eos=True):
        """Piece ids of one text (</s> appended unless eos=False)."""
        ids, parts = [], self.special_re.split(text) if self.special_re else [text]
        found = self.special_re.findall(text) if self.special_re else []
        # words cut one by one, "▁" in front: T5's pieces hold "▁" only at their start
        for k, part in enumerate(parts):
            for word in nmt_nfkc(part).split(None if self.split_any_space else " "):
                if word:
                    ids += self.segment(METASPACE + word)
            if k < len(found):
                ids.append(self.special_ids[found[k]])
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids):
        """The text of piece ids, control pieces dropped."""
        keep = [self.pieces[i] for i in ids if i not in (self.pad_id, self.eos_id)]
        return "".join(keep).replace(METASPACE, " ").strip()

    def __call__(self, texts, length=120):
        """Texts -> ids, valid-mask [B, length]: </s> kept last, right-padded, as LlamaGen's."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.full((len(texts), length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        for b, text in enumerate(texts):
            if len(row := self.encode(text)) > length:  # truncation keeps </s> as the last token
                row = row[: length - 1] + [self.eos_id]
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = True
        return ids, mask

    @classmethod
    def from_words(cls, words):
        """For a small world: <pad>, </s>, <unk>, then each word one piece "▁word", scored alike."""
        return cls([("<pad>", 0.0, False), ("</s>", 0.0, False), ("<unk>", 0.0, False)]
                   + [(METASPACE + nmt_nfkc(w), -1.0, True) for w in dict.fromkeys(words)])

    @classmethod
    def from_file(cls, path):
        """A Hugging Face tokenizer.json or a SentencePiece spiece.model (or a folder with one)."""
        if os.path.isdir(path):
            for name in ("spiece.model", "tokenizer.json"):
                if os.path.isfile(os.path.join(path, name)):
                    return cls.from_file(os.path.join(path, name))
            raise UserError(f"{path}: no spiece.model or tokenizer.json in this folder")
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such tokenizer file; check the path")
        with open(path, "rb") as f:
            raw = f.read()
        if path.endswith(".json") or raw[:1] == b"{":  # Hugging Face's tokenizer.json
            try:
                whole = json.loads(raw.decode("utf-8"))
                model, kind = whole["model"], whole["model"].get("type")
                added = whole.get("added_tokens") or []
                special = {t["content"] for t in added if t.get("special")}
            except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
                raise UserError(f"{path}: not a Hugging Face tokenizer.json (no 'model' object, "
                                "or damaged 'added_tokens')") from None
            if kind != "Unigram":
                raise UserError(f"{path}: a {kind} tokenizer, not a SentencePiece unigram one "
                                "(T5's); give the tokenizer.json or spiece.model of a T5 model")
            vocab, unk = model.get("vocab"), model.get("unk_id", 2)
            ok = [isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and type(v[1]) in
                  (int, float) for v in vocab] if isinstance(vocab, list) else []
            if not ok or not all(ok) or type(unk) is not int or not 0 <= unk < len(ok):
                why = (f"unk_id {unk} is not the id of one of its {len(ok)} pieces" if all(ok)
                       and ok else f"'vocab' entry {ok.index(False)} is not a [piece, score] pair"
                       if ok else "'vocab' is not a non-empty list of [piece, score] pairs")
                raise UserError(f"{path}: {why}; the file is damaged, download it again")
            pieces = [(p, float(s), p not in special and i != unk)
                      for i, (p, s) in enumerate(vocab)]
            ids = {p: i for i, (p, _, _) in enumerate(pieces)}
            return cls(pieces, unk_id=unk, eos_id=ids.get("</s>", 1), pad_id=ids.get("<pad>", 0),
                       split_any_space=True, specials=[p for p in special if p in ids])
        # spiece.model: 1 = repeated SentencePiece {1 piece, 2 score, 3 type}, 2 = TrainerSpec
        # {3 model_type}, 3 = NormalizerSpec {1 name, 3 dummy prefix, 4 remove extra whitespace}
        pieces, spec = [], {}
        for field, value in _protobuf(raw, path):
            if field in (1, 2, 3) and isinstance(value, bytes):
                sub = dict(_protobuf(value, path))
                if field == 1:
                    piece = sub.get(1, b"").decode("utf-8", "replace")
                    pieces.append((piece, sub.get(2, 0.0), sub.get(3, 1)))
                else:
                    spec[field] = sub
        trainer, norm = spec.get(2, {}), spec.get(3, {})
        if not pieces or not all(isinstance(s, float) for _, s, _ in pieces):
            raise UserError(f"{path}: no SentencePiece pieces found; not a spiece.model file")
        if trainer.get(3, 1) != 1:  # 1 UNIGRAM (the default), 2 BPE, 3 WORD, 4 CHAR
            raise UserError(f"{path}: a SentencePiece model of type {trainer[3]} (2 = BPE), not a "
                            "unigram one (T5's); give the spiece.model of a T5 model")
        if any(t == 6 for _, _, t in pieces) or 2 not in {t for _, _, t in pieces}:
            raise UserError(f"{path}: a SentencePiece model with byte pieces or no <unk>; only "
                            "T5-style unigram models are supported")
        # proto2 defaults: absent fields mean add_dummy_prefix and remove_extra_whitespaces are on
        name = norm.get(1, b"nmt_nfkc").decode("utf-8", "replace")
        if name not in ("nmt_nfkc", "nfkc") or norm.get(3, 1) != 1 or norm.get(4, 1) != 1:
            raise UserError(f"{path}: normaliser {name!r} without the dummy prefix / whitespace "
                            "rules T5 uses; only nmt_nfkc models are supported")
        ids = {p: i for i, (p, _, _) in enumerate(pieces)}
        return cls([(p, s, t in (1, 4)) for p, s, t in pieces],  # 1 normal, 4 user-defined
                   unk_id=next(i for i, (_, _, t) in enumerate(pieces) if t == 2),
                   eos_id=ids.get("</s>", 1), pad_id=ids.get("<pad>", 0))


# -------------------------------------------------------------------------------- caption cleaning
# LlamaGen cleans every caption twice with language/t5.py's rules (from PixArt / DeepFloyd IF): web
# captions carry URLs, markup, shop talk and product codes that would spend the 120 tokens on noise.
_DASHES = ("\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030"
           "\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d")
_EXT = "(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"
_DOMAIN = r"[a-zA-Z0-9.\-]+\.(?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b/?(?!@)"
_BEFORE_MARKUP = [  # (pattern, replacement), on the lower-cased caption, before markup is stripped
    (r"<person>", "person"),  # a placeholder some caption sets use for a name
    (r"\b(?:https?:(?:/{1,3}|[a-zA-Z0-9%])|" + _DOMAIN + ")", ""),  # a scheme, then a bare domain
    (r"\b(?:www:(?:/{1,3}|[a-zA-Z0-9%])|" + _DOMAIN + ")", "")]
_AFTER_MARKUP = [
    (r"@[\w\d]+\b", ""), ("[\u31c0-\u9fff]+", ""),  # @nicknames; CJK (kana kept): T5's <unk>
    ("[" + _DASHES + "]+", "-"),  # every kind of dash, runs included, becomes one hyphen
    ("[`\u00b4\u00ab\u00bb\u201c\u201d\u00a8]", '"'), ("[\u2018\u2019]", "'"),  # one quote each
    (r"&quot;?", ""), (r"&amp", ""), (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # entities; IPs
    (r"\d:\d\d\s+$", ""), (r"\\n", " "), (r"#\d{1,3}\b", ""), (r"#\d{5,}\b", ""),  # article ids,
    (r"\b\d{6,}\b", ""),  # a scraper's literal \n, numbers that are ids
    (r"\S+\." + _EXT, ""), (r"[\"']{2,}", '"'), (r"\.{2,}", " "),  # files; quote runs; ellipses
    ("[#\u00ae\u2022\u00a9\u2122&@\u00b7\u00ba\u00bd\u00be\u00bf\u00a1\u00a7~"
     r")(\]\[}{|\\/*]+", " "),  # stray symbols and brackets
    (r"\s+\.\s+", " ")]  # a lone full stop
_AFTER_UNESCAPE = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""), (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # product codes:
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # jc6640, jc6640vc, 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""), (r"(free\s)?download(\sfree)?", ""),  # shop talk
    (r"\bclick\b\s(?:for|on)\s\w+", ""), (r"\b" + _EXT + r"(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # longer letter-digit codes
    (r"\b\d+\.?\d*[x\u0445\u00d7]\d+\.?\d*\b", ""),  # sizes such as 1920x1080
    (r"\b\s+:\s+", ": "), (r"(\D[,./])\b", r"\1 "), (r"\s+", " ")]  # spacing, punctuation
_EDGES = [  # surrounding quotes, one stray character at either end
    (r"^[\"']([\w\W]+)[\"']$", r"\1"), (r"^['_,\-:;]", ""), (r"['_,\-:\-+]$", ""), (r"^\.\S+$", "")]
_COMPILED = {name: [(re.compile(p), r) for p, r in rules] for name, rules in dict(
    before=_BEFORE_MARKUP, after=_AFTER_MARKUP, unescape=_AFTER_UNESCAPE, edges=_EDGES).items()}
_TAG = re.compile(r"</?[a-zA-Z!][^<>]*>")  # BeautifulSoup's stand-in: "a < b" stays text


def _rules(stage, text):
    for pattern, repl in _COMPILED[stage]:
        text = pattern.sub(repl, text)
    return text


def clean_caption(text):
    """A caption as LlamaGen's T5Embedder cleans it, save ftfy's and BeautifulSoup's repairs."""
    for _ in range(2):
        text = _rules("before", urllib.parse.unquote_plus(str(text)).strip().lower())
        text = _rules("after", html.unescape(_TAG.sub("", text)))  # tags dropped, entities decoded
        if len(re.findall(r"[-_]", text)) > 3:  # this-is-my-cute-cat, this_is_my_cute_cat
            text = re.sub(r"[-_]", " ", text)
        text = _rules("unescape", html.unescape(html.unescape(text)).strip())
        text = _rules("edges", text).strip()  # on the unstripped text, as the official code does
    return text


def read_lines(path, flag):
    """Line i of a prompts or captions file, the text of sample i (blank: refused, not dropped)."""
    try:
        with open(path, encoding="utf-8") as f:  # a final newline ends the last line
            lines = [line.strip() for line in f.read().removesuffix("\n").split("\n")]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {path}: cannot read it ({e}); give a UTF-8 text file, one text "
                        "per line") from None
    if "" in lines:
        raise UserError(f"{flag} {path} line {lines.index('') + 1} is blank: line i is the text "
                        "of sample i; remove it")
    return lines


# ------------------------------------------------------------------- one call for the GPT, a CLI
class TextEncoder:
    """Tokenizer + frozen T5 encoder on one device and dtype: captions in, the GPT's prefix out.
    FLAN-T5's activations overflow float16: run it in float32 or bfloat16, as LlamaGen does."""

    def __init__(self, tokenizer, encoder, device="cpu", dtype=torch.float32, clean=True):
        self.tokenizer, self.clean, self.dtype = tokenizer, clean, dtype
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device, dtype).eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=torch.float32, clean=True):
        """A Hugging Face (FLAN-)T5 folder: spiece.model or tokenizer.json, config.json, weights."""
        tok, t5 = UnigramTokenizer.from_file(folder), T5Encoder.from_pretrained(folder, dtype)
        if len(tok) > (rows := t5.config.vocab_size):  # an id past the table has no row
            raise UserError(f"the tokenizer of {folder} has {len(tok)} pieces, more than the "
                            f"{rows} rows of its encoder's embedding: they do not fit together")
        return cls(tok, t5, pick_device(device), dtype, clean)

    @torch.no_grad()
    def encode_captions(self, texts, length=120, batch_size=32):
        """(features [B, length, d_model], mask [B, length]), right-padded, padding zero."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        texts = [clean_caption(t) for t in texts] if self.clean else texts
        ids, mask = (t.to(self.device) for t in self.tokenizer(texts, length))
        out = torch.empty(len(texts), length, self.encoder.config.d_model, dtype=self.dtype,
                          device=self.device)
        for i in range(0, len(texts), batch_size):
            h = self.encoder(ids[i: i + batch_size], mask[i: i + batch_size])
            out[i: i + batch_size] = h * mask[i: i + batch_size, :, None]  # padding's: zeroed
        return out, mask


def main(argv=None):
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
    check_flags(args, {"length": between(1, 1024)})
    if args.cmd == "tokenize":
        tok = UnigramTokenizer.from_file(args.tokenizer)
        for text in args.texts:
            ids = tok.encode(clean_caption(text) if args.clean else text)
            print(f"{text!r}: {len(ids)} tokens\n  ids    {ids}\n  "
                  f"pieces {[tok.pieces[i] for i in ids]}")
        return
    enc = TextEncoder.from_pretrained(args.t5, args.device, getattr(torch, args.dtype))
    feats, mask = enc.encode_captions(args.captions, args.length)
    print(f"features {list(feats.shape)} {args.dtype} on {feats.device}, mask {list(mask.shape)}")
    for text, f, m in zip(args.captions, feats, mask):
        ids = enc.tokenizer.encode(clean_caption(text))[: args.length]
        print(f"{text!r}: {int(m.sum())} tokens, ids {ids}, "
              f"feature rms {f[m].float().pow(2).mean().sqrt():.4f}")


# ---------------------------------------------------------------------------------------- registry
# The google/* config.json files (LlamaGen: FLAN-T5-XL), and ours for small captioned worlds.
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
