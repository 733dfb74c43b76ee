"""CLIP (Radford et al. 2021): an image and a text tower trained so that a picture and its caption
land on nearby points of one space, to re-rank a generator's candidates (DALL-E 2.5: draw N, keep
the K CLIP likes best) and score text-image alignment (LlamaGen's t2i table). Contrastive training
(CLIP paper 2.3): row i of a batch's N x N cosines asks "which caption is image i's?", column j the
same of caption j. Weight names are Hugging Face's CLIPModel: openai/clip-vit-* folders load."""
import argparse
import gzip
import html
import json
import math
import os
import re
import unicodedata
import zipfile
from collections import Counter
from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import fid
import text
from common import (UserError, at_least, attention, check_flags, cli, from_uint8, load_checkpoint,
                    load_weights, pick_device, progress, read_json, stored, unwrap_state_dict)


# -------------------------------------------------------------------------------------- transformer
class EncoderLayer(nn.Module):
    """Pre-norm block of both towers: x + attn(LN(x)), then x + mlp(LN(x)); causal for text."""

    def __init__(self, width, heads, hidden, quick, eps):
        super().__init__()
        self.self_attn = nn.ModuleDict({name: nn.Linear(width, width)
                                        for name in ("q_proj", "k_proj", "v_proj", "out_proj")})
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(width, hidden), "fc2": nn.Linear(hidden, width)})
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(width, eps), nn.LayerNorm(width, eps)
        self.heads, self.quick = heads, quick

    def forward(self, x, causal=False):
        (B, T, C), a, h = x.shape, self.self_attn, self.layer_norm1(x)
        q, k, v = (p(h).view(B, T, self.heads, -1).transpose(1, 2)
                   for p in (a.q_proj, a.k_proj, a.v_proj))
        x = x + a.out_proj(attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(B, T, C))
        h = self.mlp.fc1(self.layer_norm2(x))
        # OpenAI's models were trained with the GELU approximation x * sigmoid(1.702 x)
        return x + self.mlp.fc2(h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h))


def encoder(layers, *args):
    """The stack of blocks, `encoder.layers.{i}` in the released names."""
    return nn.ModuleDict({"layers": nn.ModuleList(EncoderLayer(*args) for _ in range(layers))})


class VisionTransformer(nn.Module):
    """OpenAI's ViT (Dosovitskiy et al. 2021): the class token's final state is the image's."""

    def __init__(self, c):
        super().__init__()
        self.embeddings = e = nn.Module()
        e.class_embedding = nn.Parameter(torch.randn(c.vision_width) * c.vision_width ** -0.5)
        e.patch_embedding = nn.Conv2d(3, c.vision_width, c.patch_size, c.patch_size, bias=False)
        patches = (c.image_size // c.patch_size) ** 2
        e.position_embedding = nn.Embedding(patches + 1, c.vision_width)  # + the class token
        self.pre_layrnorm = nn.LayerNorm(c.vision_width, c.eps)
        self.encoder = encoder(c.vision_layers, c.vision_width, c.vision_heads, c.vision_mlp_dim,
                               c.quick_gelu, c.eps)
        self.post_layernorm = nn.LayerNorm(c.vision_width, c.eps)

    def forward(self, pixels):
        e = self.embeddings
        patches = e.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, grid^2, width)
        cls = e.class_embedding.to(patches.dtype).expand(len(patches), 1, -1)
        if patches.shape[1] != (built := e.position_embedding.num_embeddings - 1):
            raise UserError(f"CLIP: images of {pixels.shape[-2]}x{pixels.shape[-1]} px give "
                            f"{patches.shape[1]} patches, the model was built for {built}; "
                            "preprocess them to its image_size")
        x = self.pre_layrnorm(torch.cat([cls, patches], dim=1) + e.position_embedding.weight)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])


class TextTransformer(nn.Module):
    """A GPT-2-like causal transformer: the end-of-text position's final state is the caption."""

    def __init__(self, c):
        super().__init__()
        self.embeddings = nn.ModuleDict({  # learned absolute positions
            "token_embedding": nn.Embedding(c.vocab_size, c.text_width),
            "position_embedding": nn.Embedding(c.context_length, c.text_width)})
        self.encoder = encoder(c.text_layers, c.text_width, c.text_heads, c.text_mlp_dim,
                               c.quick_gelu, c.eps)
        self.final_layer_norm = nn.LayerNorm(c.text_width, c.eps)
        self.eot_id = c.eot_id

    def forward(self, ids):
        if ids.shape[1] > (context := self.embeddings.position_embedding.num_embeddings):
            raise UserError(f"CLIP: {ids.shape[1]} text tokens, the context is {context}; "
                            "truncate the ids")
        # a row ends at its highest id (OpenAI's <|endoftext|>), or at its first eot_id (as HF)
        end = ids.argmax(-1) if self.eot_id is None else (ids == self.eot_id).int().argmax(-1)
        ids = ids[:, :int(end.max()) + 1]  # causal: the columns after the last end change nothing
        e = self.embeddings
        x = e.token_embedding(ids) + e.position_embedding.weight[: ids.shape[1]]
        for layer in self.encoder.layers:
            x = layer(x, causal=True)
        return self.final_layer_norm(x)[torch.arange(len(x), device=x.device), end]


# --------------------------------------------------------------------------------------------- CLIP
class CLIP(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.text_model, self.vision_model = TextTransformer(c), VisionTransformer(c)
        self.visual_projection = nn.Linear(c.vision_width, c.embed_dim, bias=False)
        self.text_projection = nn.Linear(c.text_width, c.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP paper 2.5's start
        # for training from scratch: GPT-2's N(0, 0.02) for matrices and tables, zero biases
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def encode_image(self, pixels):
        """Preprocessed pixels (B, 3, S, S) -> raw image embeddings (B, embed_dim), as HF's."""
        return self.visual_projection(self.vision_model(pixels))

    def encode_text(self, ids):
        """Token ids (B, T <= context) -> raw text embeddings (B, embed_dim)."""
        return self.text_projection(self.text_model(ids))

    def forward(self, pixels, ids, return_embeddings=False):
        """exp(logit_scale) * cosines (B_img, B_txt), or the embeddings and logit_scale for the loss
        (through forward: DDP and FSDP's bookkeeping)."""
        if return_embeddings:
            return self.encode_image(pixels), self.encode_text(ids), self.logit_scale
        image = F.normalize(self.encode_image(pixels), dim=-1)
        text = F.normalize(self.encode_text(ids), dim=-1)
        return self.logit_scale.exp() * image @ text.t()

    @classmethod
    def from_pretrained(cls, path):
        """A Hugging Face CLIP folder (or a file in it) or our checkpoint ("meta" kept as .meta)."""
        if os.path.basename(path) in HF_FILES:
            path = os.path.dirname(path) or "."
        if os.path.isdir(path):
            config, sd, meta = hf_config(path), text.load_hf_state_dict(path), {}
        else:
            if zipfile.is_zipfile(path):  # torch.jit.save writes <name>/code/... and constants.pkl
                with zipfile.ZipFile(path) as z:
                    if any(n.split("/")[1:2] == ["code"] or n.endswith("/constants.pkl")
                           for n in z.namelist()):
                        raise UserError(f"{path} is a TorchScript archive (OpenAI's clip.load "
                                        "format), which cannot be loaded safely; use the Hugging "
                                        "Face folder of the same model (e.g. openai/clip-vit-base-"
                                        "patch32: config.json + model.safetensors)")
            if not isinstance(ckpt := load_checkpoint(path), dict):
                raise UserError(f"{path} holds a {type(ckpt).__name__}, not a CLIP checkpoint dict")
            if ckpt.get("kind") != "clip" or not isinstance(ckpt.get("config"), dict):
                what = f"a {ckpt['kind']!r} checkpoint" if "kind" in ckpt else "no CLIP checkpoint"
                raise UserError(f"{path} is {what}; pass a CLIP checkpoint (train.py --model "
                                "CLIP-*) or a Hugging Face CLIP folder")
            names = {f.name for f in fields(CLIPConfig)}
            config = CLIPConfig(**{k: v for k, v in ckpt["config"].items() if k in names})
            sd, meta = unwrap_state_dict(ckpt), ckpt.get("meta")
        if "logit_scale" not in sd or not any(k.startswith("vision_model.") for k in sd):
            raise UserError(f"{path} holds no CLIP weights (no logit_scale / vision_model.*); "
                            "pass a CLIP checkpoint or a Hugging Face CLIP folder")
        # fp16/bf16 weights become float32; position_ids: an index buffer of older transformers
        model = load_weights(cls(config), sd, f"CLIP weights {path!r}", ignore=("position_ids",),
                             hint="check that config.json belongs to these weights").eval()
        model.meta = meta if isinstance(meta, dict) else {}
        return model


def contrastive_loss(image_emb, text_emb, logit_scale):
    """Symmetric InfoNCE (CLIP paper, Figure 3) of embeddings gathered from every rank; the
    temperature exp(logit_scale) capped at 100, as OpenAI clamps it (beyond, no gradient)."""
    image, text = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    logits = logit_scale.float().clamp(max=math.log(100)).exp() * image @ text.t()
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the sum of what EVERY rank's (identical) loss
    sent to its slice: W x dL/d(own rows), which DDP's average over W ranks makes exactly one
    process's gradient. (all_reduce, then its rows: gloo has no reduce_scatter.)"""

    @staticmethod
    def forward(ctx, x):
        dist = torch.distributed
        ctx.rank, ctx.n = dist.get_rank(), len(x)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def distributed_contrastive_loss(image_emb, text_emb, logit_scale):
    """contrastive_loss over the global batch, every rank's embeddings gathered in rank order."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        image_emb, text_emb = _GatherWithGrad.apply(image_emb), _GatherWithGrad.apply(text_emb)
    return contrastive_loss(image_emb, text_emb, logit_scale)


# ------------------------------------------------------------------------------------ preprocessing
# OpenAI's clip.py: Resize(S, bicubic) of the shorter side, CenterCrop(S), ToTensor, Normalize.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(image, size=224):
    """A PIL image (any mode, any size) -> normalised pixels (3, size, size), float32."""
    from PIL import Image
    image = image.convert("RGB")
    w, h = image.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize(new, Image.BICUBIC)
    # torchvision's centre crop, as OpenAI's: the offset rounded half-to-even (HF floors it)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    return normalise(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))


def preprocess_tensor(images, size=224):
    """preprocess() of float [-1, 1] images (B, 3, H, W), unrounded (PIL also rounds to 8 bits and
    clips overshoot; its bicubic kernel is torch's antialiased one)."""
    x = (images.float() + 1) / 2
    h, w = x.shape[-2:]
    new = (int(size * h / w), size) if w <= h else (size, int(size * w / h))  # (H, W)
    if new != (h, w):
        x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True)
    top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return normalise(x[..., top:top + size, left:left + size])


def normalise(x):
    return (x - x.new_tensor(MEAN).view(3, 1, 1)) / x.new_tensor(STD).view(3, 1, 1)


# ---------------------------------------------------------------------------------------- tokenizer
# CLIP's tokenizer (OpenAI simple_tokenizer.py; HF's CLIPTokenizer): byte-level BPE (Sennrich et al.
# 2016, as GPT-2), lower-cased, "</w>" marking a word's last symbol ("red" != "red" in "redder").
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
MAX_MERGES = 49152 - 256 - 2  # OpenAI's: 512 byte symbols + 48894 merges + 2 specials = 49408 ids
# Unicode White_Space: Python's \s also matches U+001C-U+001F, which Hugging Face's fast tokenizer
# (Rust regex) keeps as symbols of their own
WHITESPACE = r"[^\S\x1c-\x1f]"


@lru_cache()
def byte_to_unicode():
    """Every byte -> one printable character (GPT-2's table): printable Latin-1 bytes themselves,
    the other 68 code points 256+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


@lru_cache()
def word_pattern():
    """OpenAI's word split  <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|
    [^\\s\\p{L}\\p{N}]+  in the standard library's re, \\s being White_Space. Python's \\w is
    letters, numbers (Nd, Nl, No) and "_", \\d only Nd: so letters are [^\\W\\d_] minus Nl/No, a
    number ONE character of Nd, Nl or No, and the rest a run of anything else, "_" included."""
    # planes 0 and 1 hold every N character (2-3 are CJK letters, 14 tags, 15-16 private use)
    n = re.escape("".join(chr(i) for i in range(0x20000)
                          if unicodedata.category(chr(i)) in ("Nl", "No")))
    return re.compile(rf"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                      rf"|[^\W\d_{n}]+|[\d{n}]|(?:[^\s\w{n}]|[\x1c-\x1f_])+", re.IGNORECASE)


# ftfy.fix_text's changes to ordinary captions (as ftfy 6.3): curly quotes -> straight ones, Latin
# ligatures (not U+0149 and U+FB05, left alone) and full-width forms -> NFKC ("ﬁ" -> "fi")
FTFY = {c: "'" for c in (0x02BC, *range(0x2018, 0x201C))} | {c: '"' for c in range(0x201C, 0x2020)}
FTFY.update({c: unicodedata.normalize("NFKC", chr(c)) for c in [
    0x132, 0x133, *range(0x1C4, 0x1CD), *range(0x1F1, 0x1F4), *range(0xFB00, 0xFB05), 0xFB06,
    *range(0xFF01, 0xFFEF), 0x3000]})


def clean_text(text):
    """OpenAI's cleaning: ftfy (NFC and FTFY), HTML entities undone twice, spaces, lower case."""
    text = html.unescape(html.unescape(unicodedata.normalize("NFC", text).translate(FTFY)))
    return re.sub(rf"{WHITESPACE}+", " ", text).strip(" ").lower()


def merge_pair(parts, first, second):
    """`parts` with every adjacent (first, second) joined, left to right: the one step of BPE."""
    merged, j = [], 0
    while j < len(parts):
        pair = j + 1 < len(parts) and parts[j] == first and parts[j + 1] == second
        merged.append(first + second if pair else parts[j])
        j += 2 if pair else 1
    return merged


def vocabulary(merges):
    """simple_tokenizer.py's symbols in id order: bytes, bytes + "</w>", merges, SOT, EOT (top)."""
    symbols = list(byte_to_unicode().values())
    return [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), SOT, EOT]


class Tokenizer:
    """text -> CLIP token ids: `encoder` maps BPE symbols to ids, `merges` ranked."""

    def __init__(self, encoder, merges):
        self.encoder, self.decoder = encoder, {i: s for s, i in encoder.items()}
        self.merges = [tuple(m) for m in merges]  # kept so a checkpoint can carry its tokenizer
        self.ranks = {pair: r for r, pair in enumerate(self.merges)}
        self.sot, self.eot = encoder[SOT], encoder[EOT]
        self.cache = {SOT: [self.sot], EOT: [self.eot]}

    @classmethod
    def from_pretrained(cls, path):
        """HF's vocab.json + merges.txt (a folder or a file in it), or OpenAI's .txt.gz merges."""
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        if path.endswith(".gz"):
            try:
                with gzip.open(path, "rt", encoding="utf-8") as f:
                    return cls.from_merges(_parse_merges(f.read(), path))
            except (OSError, EOFError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read BPE merges {path!r} ({e}); "
                                "pass CLIP's bpe_simple_vocab_16e6.txt.gz") from None
        files = [os.path.join(folder, n) for n in ("vocab.json", "merges.txt")]
        if missing := [f for f in files if not os.path.isfile(f)]:
            raise UserError(f"CLIP tokenizer: {missing[0]!r} not found; pass a folder with "
                            "vocab.json and merges.txt, or bpe_simple_vocab_16e6.txt.gz")
        try:
            with open(files[0], encoding="utf-8") as f:
                encoder = json.load(f)
            with open(files[1], encoding="utf-8") as f:
                merges = _parse_merges(f.read(), files[1])
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"CLIP tokenizer files in {folder!r} are unreadable ({e})") from None
        if not isinstance(encoder, dict) or not all(type(i) is int for i in encoder.values()):
            raise UserError(f"{files[0]}: not a JSON object of symbol -> id; give CLIP's")
        # every byte, alone or ending a word, each merge and the specials
        if lost := next((s for s in vocabulary(merges) if s not in encoder), None):
            raise UserError(f"{files[1]}: the symbol {lost!r} (a byte, a special, or a merge's "
                            "result) is not in vocab.json; the two files do not belong together")
        return cls(encoder, merges)

    @classmethod
    def from_merges(cls, merges):
        return cls({s: i for i, s in enumerate(vocabulary(merges))}, merges)

    @classmethod
    def from_words(cls, words):
        """BPE learnt on a closed vocabulary (scenes.VOCABULARY) until each word is ONE token."""
        to_unicode, spelt = byte_to_unicode(), {}  # word -> its byte symbols, "</w>" on the last
        for caption in words:
            for word in word_pattern().findall(clean_text(caption)):
                w = "".join(to_unicode[b] for b in word.encode("utf-8"))
                spelt[w] = [*w[:-1], w[-1] + "</w>"]
        merges = []
        while True:
            counts = Counter(pair for parts in spelt.values() for pair in zip(parts, parts[1:]))
            if not counts:
                return cls.from_merges(merges)
            first, second = min(counts, key=lambda p: (-counts[p], p))
            merges.append((first, second))
            spelt = {w: merge_pair(parts, first, second) for w, parts in spelt.items()}

    def bpe(self, word):
        """One word (byte symbols) -> ids: merge the adjacent pair of lowest rank while any is."""
        if word in self.cache:
            return self.cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = zip(parts, parts[1:])
            rank, i = min((self.ranks.get(p, math.inf), i) for i, p in enumerate(pairs))
            if rank == math.inf:
                break
            parts = merge_pair(parts, parts[i], parts[i + 1])
        ids = [self.encoder[p] for p in parts]
        if len(self.cache) < 100_000:
            self.cache[word] = ids
        return ids

    def encode(self, text):
        """One string -> its ids, without the specials."""
        to_unicode, ids = byte_to_unicode(), []
        for word in word_pattern().findall(clean_text(text)):
            ids += self.bpe(word if word in (SOT, EOT) else
                            "".join(to_unicode[b] for b in word.encode("utf-8")))
        return ids

    def decode(self, ids):
        """Ids -> text, a space where "</w>" stood (a real space byte is spelt "Ġ")."""
        from_unicode = {c: b for b, c in byte_to_unicode().items()} | {" ": 32}
        symbols = "".join(self.decoder[i] for i in ids if i not in (self.sot, self.eot))
        raw = bytes(from_unicode[c] for c in symbols.replace("</w>", " "))
        return raw.decode("utf-8", errors="replace").replace("\0", "").strip()

    def __call__(self, texts, context_length=77, truncate=True, pad_id=None):
        """Texts -> LongTensor (B, context_length): SOT, ids, EOT, pad_id (default EOT, as HF's);
        longer texts cut, EOT kept, unless truncate=False."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.full((len(texts), context_length), self.eot if pad_id is None else pad_id,
                         dtype=torch.long)
        for row, caption in enumerate(texts):
            if len(ids := self.encode(caption)) > context_length - 2:
                if not truncate:
                    raise UserError(f"text {caption[:40]!r}... is {len(ids) + 2} tokens, over "
                                    f"CLIP's context of {context_length}; shorten it or allow "
                                    "truncation")
                ids = ids[: context_length - 2]
            out[row, : len(ids) + 2] = torch.tensor([self.sot, *ids, self.eot])
        return out


def _parse_merges(text, path):
    lines = text.split("\n")
    lines = lines[1:] if "#version" in lines[0] else lines
    merges = [tuple(line.split()) for line in lines[:MAX_MERGES] if line.strip()]
    if bad := next((m for m in merges if len(m) != 2), None):
        raise UserError(f"{path!r} is not a BPE merges list (line {' '.join(bad)!r} is not a pair)")
    return merges


# ------------------------------------------------------------------------------------------ loading
HF_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")  # each stands for its folder


def hf_config(folder):
    """CLIPConfig of a Hugging Face config.json, missing keys at transformers' (B/32) defaults."""
    if not os.path.isfile(path := os.path.join(folder, "config.json")):
        raise UserError(f"{folder!r} has no config.json; pass a Hugging Face CLIP folder")
    cfg = read_json(path, "pass a Hugging Face CLIP folder")
    if cfg.get("model_type") != "clip":
        raise UserError(f"{path!r} describes a {cfg.get('model_type')!r} model, not CLIP "
                        "(model_type 'clip'); pass a folder such as openai/clip-vit-base-patch32")
    text = cfg.get("text_config") or cfg.get("text_config_dict") or {}  # *_dict: older exports
    vision = cfg.get("vision_config") or cfg.get("vision_config_dict") or {}
    # one flag for both towers: every released CLIP uses the same activation in both
    acts = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise UserError(f"{path!r}: activations {sorted(acts)} are not supported "
                        "(quick_gelu or gelu)")
    b32, tower = CLIPConfig(), {}
    for name, d in (("vision", vision), ("text", text)):
        for field, key in (("width", "hidden_size"), ("layers", "num_hidden_layers"),
                           ("heads", "num_attention_heads"), ("mlp_dim", "intermediate_size")):
            default = getattr(b32, f"{name}_{field}")
            tower[f"{name}_{field}".removesuffix("_dim")] = d.get(key, default)
    eos = text.get("eos_token_id", 49407)  # transformers' default when the file does not say
    return CLIPConfig(
        **tower, embed_dim=cfg.get("projection_dim", b32.embed_dim),
        image_size=vision.get("image_size", b32.image_size),
        patch_size=vision.get("patch_size", b32.patch_size),
        context_length=text.get("max_position_embeddings", b32.context_length),
        vocab_size=text.get("vocab_size", b32.vocab_size), eps=text.get("layer_norm_eps", b32.eps),
        # transformers pools at argmax(ids) when eos_token_id is the legacy 2, else at that id
        quick_gelu=acts == {"quick_gelu"}, eot_id=None if eos == 2 else eos)


def load(path):
    """(CLIP, its Tokenizer) from one place: a Hugging Face folder or our checkpoint's "meta"."""
    model = CLIP.from_pretrained(path)
    hf = os.path.isdir(path) or os.path.basename(path) in HF_FILES  # else ours: merges in meta
    tok = Tokenizer.from_pretrained(path) if hf else Tokenizer.from_merges(
        [tuple(m) for m in stored(model.meta, "bpe_merges", path)])
    c, top = model.config, max(tok.encoder.values())  # pooled at eot_id, or at the highest id
    if top >= c.vocab_size or tok.eot != (top if c.eot_id is None else c.eot_id):
        raise UserError(f"{path}: its tokenizer has {top + 1} ids (<|endoftext|> {tok.eot}), its "
                        f"text embedding {c.vocab_size} rows (eot_id {c.eot_id}): they do not "
                        "belong together")
    return model, tok


class TokenizedCaptions(torch.utils.data.Dataset):
    """(image, caption) items -> (image, token ids [context]), tokenized in the loader's workers."""

    def __init__(self, ds, tokenizer, context_length):
        self.ds, self.tokenizer, self.context = ds, tokenizer, context_length

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        image, caption = self.ds[i]
        return image, self.tokenizer(caption, context_length=self.context)[0]


# --------------------------------------------------------------------------------------- re-ranking
@torch.no_grad()
def rank(clip, images, texts, tokenizer=None, batch_size=64):
    """100 x cosine (P, N) of float [-1, 1] images (P*N, 3, H, W) with P prompts (ids, or strings
    with `tokenizer`); not calibrated across prompts."""
    ids = tokenizer(texts, context_length=clip.config.context_length) if tokenizer else texts
    if not len(ids) or len(images) % len(ids):
        raise UserError(f"{len(images)} images do not split evenly over {len(ids)} prompts")
    device = next(clip.parameters()).device
    text = F.normalize(clip.encode_text(ids.to(device)).float(), dim=-1)
    feats = []
    for chunk in images.split(batch_size):
        pixels = preprocess_tensor(chunk.to(device), clip.config.image_size)
        feats.append(F.normalize(clip.encode_image(pixels.to(text.dtype)).float(), dim=-1))
    image = torch.cat(feats).view(len(ids), -1, text.shape[-1])  # (P, N, embed)
    return 100 * (image * text[:, None]).sum(-1)


def keep_best(candidates, scores, keep):
    """Prompt-major candidates (P*N, ...) -> each prompt's best (P, keep, ...), scores (P, keep)."""
    if not 1 <= keep <= scores.shape[1]:
        raise UserError(f"--keep {keep} must be between 1 and the number of candidates "
                        f"{scores.shape[1]}")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
    rows = torch.arange(len(order))[:, None] * scores.shape[1] + order.cpu()  # row p * N + j
    kept = candidates[rows if torch.is_tensor(candidates) else rows.numpy()]
    return kept, scores.gather(1, order)


def rerank_candidates(images, texts, clip_model, keep, tokenizer=None):
    """DALL-E's best-of-N: uint8 candidates (P*N, H, W, 3) -> (P*keep, H, W, 3), scores."""
    scores = rank(clip_model, from_uint8(images), list(texts), tokenizer or clip_model.tokenizer)
    kept, best = keep_best(images, scores, keep)
    return kept.reshape(-1, *images.shape[1:]), best


def retrieval_accuracy(image_emb, text_emb, ids, group=10):
    """Share of images whose most similar caption among `group` consecutive pairs is theirs."""
    image, text = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    right = []
    for g in range(0, len(ids), group):
        picked = ids[g:g + group][(image[g:g + group] @ text[g:g + group].t()).argmax(1)]
        right.append((picked == ids[g:g + group]).all(1).float())
    return torch.cat(right).mean()


# --------------------------------------------------------------------------------------- CLIP score
# CLIPScore (Hessel et al. 2021): 2.5 max(cos(image, "A photo depicts " + caption), 0), means over
# a set; LlamaGen's t2i table (after GigaGAN) reports the plain mean cosine x 100, with ViT-B/32.
PHOTO_DEPICTS = "A photo depicts"


@torch.no_grad()
def clip_score(clip, images, captions, tokenizer, prefix=PHOTO_DEPICTS, w=2.5, batch_size=64):
    """Float [-1, 1] images (N, 3, H, W, or batches of them) against `prefix` + their captions ->
    {"clip_score": 100 x mean cosine, "clipscore": 100 x mean w max(cos, 0), "count": N}."""
    cos, done = [], 0
    for chunk in images.split(batch_size) if torch.is_tensor(images) else images:
        texts = [f"{prefix} {c}".strip() for c in captions[done:done + len(chunk)]]
        done += len(chunk)
        if len(texts) == len(chunk):  # else more images than captions: counted for the message
            cos.append(rank(clip, chunk, texts, tokenizer)[:, 0] / 100)  # (b, 1): one image each
    if done != len(captions):
        raise UserError(f"CLIP score: {len(captions)} captions for {done} images; give one "
                        "caption per image")
    cos = torch.cat(cos).double()
    return {"clip_score": 100 * cos.mean().item(),
            "clipscore": 100 * (w * cos.clamp(min=0)).mean().item(), "count": done}


def main(argv=None):
    p = argparse.ArgumentParser(description="CLIP scores of text-to-image samples against their "
                                "captions (LlamaGen's t2i table: openai/clip-vit-base-patch32).")
    p.add_argument("command", choices=["score"])
    p.add_argument("samples", help="an .npz of uint8 N x H x W x 3 'arr_0' or a folder of images")
    p.add_argument("--clip", required=True, help="our CLIP checkpoint (train.py --model CLIP-*) "
                   "or a Hugging Face CLIP folder")
    p.add_argument("--captions", required=True, help="UTF-8 text, line i the caption of image i")
    p.add_argument("--prefix", default=PHOTO_DEPICTS, help="text put before every caption "
                   f"(default {PHOTO_DEPICTS!r}, as CLIPScore and LlamaGen; '' for none)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="cuda, mps or cpu (default: the best)")
    args = p.parse_args(argv)
    check_flags(args, {"batch_size": at_least(1)})
    captions = text.read_lines(args.captions, "--captions")
    count, batches = fid.image_batches(args.samples, args.batch_size)
    if count is not None and count != len(captions):
        raise UserError(f"{args.captions} has {len(captions)} captions for {count} images in "
                        f"{args.samples}; give one caption per image, in order")
    model, tokenizer = load(args.clip)
    model = model.to(pick_device(args.device))
    # uint8 batches are the samples' own pixels; a folder of mixed sizes comes as floats in [0, 1]
    floats = (from_uint8(b) if isinstance(b, np.ndarray) else b * 2 - 1 for b in batches)
    got = clip_score(model, progress(floats, desc="CLIP"), captions, tokenizer, args.prefix)
    print(f"CLIP score ({got['count']} images, prefix {args.prefix!r}, {args.clip}):\n"
          f"  mean cosine x 100 (LlamaGen, GigaGAN): {got['clip_score']:.4f}\n"
          f"  CLIPScore x 100 (Hessel et al. 2021, 2.5 max(cos, 0)): {got['clipscore']:.4f}")


# ------------------------------------------------------------------------------------------ configs
@dataclass
class CLIPConfig:
    """Defaults are OpenAI's ViT-B/32."""
    embed_dim: int = 512  # the shared space both projections map into
    image_size: int = 224
    patch_size: int = 32  # 224 / 32 = a 7 x 7 grid: 49 patch tokens + the class token
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp: int | None = None  # None: 4 x width (every OpenAI model)
    context_length: int = 77  # text positions, <|startoftext|> and <|endoftext|> included
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp: int | None = None
    quick_gelu: bool = True  # OpenAI's models; open_clip's LAION models use exact GELU
    eps: float = 1e-5
    eot_id: int | None = None  # None: pool at the highest id (OpenAI's vocab ends with it)

    def __post_init__(self):
        for a, b, rule in (("image_size", "patch_size", "a multiple of"),
                           ("vision_width", "vision_heads", "divisible by"),
                           ("text_width", "text_heads", "divisible by")):
            if getattr(self, a) % getattr(self, b):
                raise UserError(f"CLIPConfig: {a} {getattr(self, a)} is not {rule} {b} "
                                f"{getattr(self, b)}")

    vision_mlp_dim = property(lambda self: self.vision_mlp or 4 * self.vision_width)
    text_mlp_dim = property(lambda self: self.text_mlp or 4 * self.text_width)


# OpenAI's released models (CLIP paper Table 20), and ours for the built-in captioned world
# (CLIP-tiny: 32 px / patch 4, 32 text positions, vocab 512 byte symbols + 510 merges + 2).
CLIP_CONFIGS = {
    "ViT-B/32": dict(),
    "ViT-L/14": dict(embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24,
                     vision_heads=16, text_width=768, text_heads=12),
    "CLIP-tiny": dict(embed_dim=64, image_size=32, patch_size=4, vision_width=64, vision_layers=3,
                      vision_heads=4, context_length=32, vocab_size=1024, text_width=64,
                      text_layers=3, text_heads=4),
}


def clip_config(name, **overrides):
    if name not in CLIP_CONFIGS:
        raise UserError(f"unknown CLIP config {name!r}; choose one of {', '.join(CLIP_CONFIGS)}")
    return CLIPConfig(**{**CLIP_CONFIGS[name], **overrides})


if __name__ == "__main__":
    cli(main)
