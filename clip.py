"""CLIP (Radford et al. 2021), written out: an image tower and a text tower trained so that a
picture and its caption land on nearby points of one embedding space. nanoLlamaGen uses it twice: to
re-rank the candidates a generator drew for a prompt (DALL-E, Ramesh et al. 2021, section 2.5: draw
N, keep the K CLIP likes best) and to score text-image alignment (the CLIP score beside FID in
LlamaGen's t2i table).

Contrastive pre-training (CLIP paper 2.3). A batch holds N (image, caption) pairs. Both towers embed
their inputs, the embeddings are L2-normalised, and the N x N matrix of cosines is scaled by a
learned temperature: logits[i, j] = exp(t) * cos(image_i, text_j). Row i is an N-way classification
"which caption belongs to image i?", column j the same question for caption j; the loss is the mean
cross-entropy of both, with the diagonal as the answers. So every pair is one positive and N - 1
negatives for each side: N^2 - N mismatched pairs per batch, for free, which is why CLIP trains with
batches of 32k (and why the trainer gathers embeddings across GPUs before the loss: more negatives,
not just more data). The temperature exp(t) starts at 1/0.07 and is learned; it sets how peaked the
softmax is (a low temperature punishes near-misses hard). It is clamped at 100 during training,
which OpenAI found keeps training stable; the released models sit at that bound.

Why a contrastive score can rank a generator's candidates: the cosine was trained to be high exactly
when caption and image belong together, relative to every other caption in a huge batch. It does not
ask "is this a good picture?" but "does this picture match THIS text better than alternatives?",
which is the question a text-to-image sampler leaves open: its draws differ in whether they show
what was asked.

Layout, top to bottom: the transformer pieces, the two towers, CLIP (encode_image, encode_text,
forward, from_pretrained), the loss, preprocessing, the BPE tokenizer, re-ranking, then the named
configs. Weight names follow Hugging Face transformers' CLIPModel (modeling_clip.py), so the
released openai/clip-vit-base-patch32 and clip-vit-large-patch14 folders load unchanged.
"""
import gzip
import html
import json
import math
import os
import re
import unicodedata
import zipfile
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import text
from common import UserError, attention, load_checkpoint, load_weights, unwrap_state_dict


# -------------------------------------------------------------------------------------- transformer
def quick_gelu(x):
    """OpenAI's GELU approximation x * sigmoid(1.702 x); its models were trained with it, so they
    must run with it (exact GELU shifts their embeddings measurably)."""
    return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with biases on all four projections (CLIP's towers, unlike
    Llama's)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x, causal):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        # softmax(q k^T / sqrt(head_dim)) v; the text tower is causal (GPT-2's design, kept so the
        # tower could also be a language model), the image tower sees every patch
        y = attention(q, k, v, is_causal=causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """The per-token feed-forward, width -> 4 x width -> width in every OpenAI model."""

    def __init__(self, width, hidden, quick):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.act = quick_gelu if quick else F.gelu

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(LN(x)), then x + mlp(LN(x)). Same block in both towers."""

    def __init__(self, width, heads, hidden, quick, eps):
        super().__init__()
        self.self_attn, self.mlp = Attention(width, heads), MLP(width, hidden, quick)
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(width, eps), nn.LayerNorm(width, eps)

    def forward(self, x, causal=False):
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """The stack of blocks; `encoder.layers.{i}` in the Hugging Face names."""

    def __init__(self, layers, *args):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(*args) for _ in range(layers))

    def forward(self, x, causal=False):
        for layer in self.layers:
            x = layer(x, causal)
        return x


# --------------------------------------------------------------------------------------- the towers
class VisionEmbeddings(nn.Module):
    """ViT input (Dosovitskiy et al. 2021): non-overlapping patches, each linearly projected (a conv
    with kernel = stride = patch, no bias), a learned class token in front, learned absolute
    positions."""

    def __init__(self, c):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(c.vision_width) * c.vision_width ** -0.5)
        self.patch_embedding = nn.Conv2d(3, c.vision_width, c.patch_size, c.patch_size, bias=False)
        patches = (c.image_size // c.patch_size) ** 2
        self.position_embedding = nn.Embedding(patches + 1, c.vision_width)  # + the class token

    def forward(self, pixels):
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, grid^2, width)
        cls = self.class_embedding.to(patches.dtype).expand(len(patches), 1, -1)
        x = torch.cat([cls, patches], dim=1)
        built = self.position_embedding.num_embeddings - 1
        if x.shape[1] - 1 != built:
            raise UserError(f"CLIP: images of {pixels.shape[-2]}x{pixels.shape[-1]} px give "
                            f"{x.shape[1] - 1} patches, the model was built for {built}; "
                            "preprocess them to its image_size")
        return x + self.position_embedding.weight


class VisionTransformer(nn.Module):
    """The image tower. OpenAI's ViT adds a LayerNorm before the first block ("pre_layrnorm",
    spelled so in the Hugging Face names) and one on the class token's output; the class token is
    the image."""

    def __init__(self, c):
        super().__init__()
        self.embeddings = VisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.vision_width, c.eps)
        self.encoder = Encoder(c.vision_layers, c.vision_width, c.vision_heads, c.vision_mlp_dim,
                               c.quick_gelu, c.eps)
        self.post_layernorm = nn.LayerNorm(c.vision_width, c.eps)

    def forward(self, pixels):
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        # the class token carries no pixels of its own: after the blocks it holds what it gathered
        # from every patch, and it alone becomes the image's feature
        return self.post_layernorm(x[:, 0])


class TextEmbeddings(nn.Module):
    """Token table + learned absolute positions (77 in OpenAI's models: captions are short)."""

    def __init__(self, c):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.position_embedding = nn.Embedding(c.context_length, c.text_width)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class TextTransformer(nn.Module):
    """The text tower: a GPT-2-like causal transformer. Causal, so the end-of-text position is the
    one that has read the whole caption; its final state (after final_layer_norm) is the caption's
    feature."""

    def __init__(self, c):
        super().__init__()
        self.embeddings = TextEmbeddings(c)
        self.encoder = Encoder(c.text_layers, c.text_width, c.text_heads, c.text_mlp_dim,
                               c.quick_gelu, c.eps)
        self.final_layer_norm = nn.LayerNorm(c.text_width, c.eps)
        self.eot_id = c.eot_id

    def forward(self, ids):
        context = self.embeddings.position_embedding.num_embeddings
        if ids.shape[1] > context:
            raise UserError(f"CLIP: {ids.shape[1]} text tokens, the context is {context}; "
                            "truncate the ids")
        # OpenAI's vocabulary puts <|endoftext|> last (49407), so the highest id of a row marks the
        # end of its caption (padding after it attends only backwards and is never read). A
        # vocabulary with the end token elsewhere names it: the first position holding that id, as
        # HF does for eos != 2.
        end = ids.argmax(-1) if self.eot_id is None else (ids == self.eot_id).int().argmax(-1)
        # so the columns after the longest caption's end change nothing: they are cut, which
        # makes short captions in a 77-slot context several times cheaper
        ids = ids[:, :int(end.max()) + 1]
        x = self.final_layer_norm(self.encoder(self.embeddings(ids), causal=True))
        return x[torch.arange(len(x), device=x.device), end]


# --------------------------------------------------------------------------------------------- CLIP
class CLIP(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.text_model, self.vision_model = TextTransformer(c), VisionTransformer(c)
        self.visual_projection = nn.Linear(c.vision_width, c.embed_dim, bias=False)
        self.text_projection = nn.Linear(c.text_width, c.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP paper 2.5's start
        # Only for training from scratch (released weights overwrite all of it): GPT-2's N(0, 0.02)
        # for matrices and tables, zero biases, unit LayerNorms; the patch conv keeps torch's
        # default, scaled to its fan-in of 3 * patch^2 pixels.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    # Both encoders return the raw projections, as HF's get_image_features / get_text_features
    # do: the loss, forward and rank() normalise, so callers may also average or store them.
    def encode_image(self, pixels):
        """Preprocessed pixels (B, 3, S, S) -> projected image embeddings (B, embed_dim), not
        normalised."""
        return self.visual_projection(self.vision_model(pixels))

    def encode_text(self, ids):
        """Token ids (B, T <= context) -> projected text embeddings (B, embed_dim), not
        normalised."""
        return self.text_projection(self.text_model(ids))

    def forward(self, pixels, ids, return_embeddings=False):
        """Logits per image (B_img, B_txt): exp(logit_scale) * cosine, as HF's logits_per_image.
        return_embeddings=True: (image embeddings, text embeddings, logit_scale) instead, for a loss
        over embeddings gathered from every rank; training calls forward, not the encoders, because
        DDP and FSDP do their bookkeeping (and FSDP its unsharding) in forward."""
        if return_embeddings:
            return self.encode_image(pixels), self.encode_text(ids), self.logit_scale
        image = F.normalize(self.encode_image(pixels), dim=-1)
        text = F.normalize(self.encode_text(ids), dim=-1)
        return self.logit_scale.exp() * image @ text.t()

    @classmethod
    def from_pretrained(cls, path):
        """A Hugging Face CLIP folder (config.json + model.safetensors or pytorch_model.bin), or one
        of our checkpoints ({"model", "config", "kind": "clip"}) -> CLIP in eval mode on the CPU."""
        if os.path.basename(path) in ("config.json", "model.safetensors", "pytorch_model.bin"):
            path = os.path.dirname(path) or "."  # a file of a HF folder stands for the folder
        if os.path.isdir(path):
            config, sd = hf_config(path), _read_hf_weights(path)
        else:
            ckpt = _load_clip_file(path)
            if ckpt.get("kind") != "clip" or not isinstance(ckpt.get("config"), dict):
                what = f"a {ckpt['kind']!r} checkpoint" if "kind" in ckpt else "no CLIP checkpoint"
                raise UserError(f"{path} is {what}; pass a CLIP checkpoint (train.py --model "
                                "CLIP-*) or a Hugging Face CLIP folder")
            names = {f.name for f in fields(CLIPConfig)}
            config = CLIPConfig(**{k: v for k, v in ckpt["config"].items() if k in names})
            sd = unwrap_state_dict(ckpt)
        if "logit_scale" not in sd or not any(k.startswith("vision_model.") for k in sd):
            raise UserError(f"{path} holds no CLIP weights (no logit_scale / vision_model.*); "
                            "pass a CLIP checkpoint or a Hugging Face CLIP folder")
        model = cls(config)
        # Weights stored in fp16/bf16 are copied into the float32 parameters; position_ids is an
        # index buffer (0..n-1) that older transformers saved beside the weights, not a weight.
        load_weights(model, sd, f"CLIP weights {path!r}", ignore=("position_ids",),
                     hint="check that config.json belongs to these weights")
        return model.eval()

    def checkpoint_config(self):
        """The config as a plain dict, for train.py-style checkpoints."""
        return asdict(self.config)


def contrastive_loss(image_emb, text_emb, logit_scale):
    """Symmetric InfoNCE (CLIP paper, Figure 3): row i of the N x N scaled cosines must pick text i,
    column j must pick image j; the mean of both cross-entropies. Pass embeddings ALREADY gathered
    from every rank (with gradients, e.g. torch.distributed.nn.all_gather) so each pair meets all
    N^2 - N negatives of the global batch. The temperature exp(logit_scale) is capped at 100: beyond
    it the loss gives logit_scale no gradient (OpenAI clamps the parameter itself to the same
    bound)."""
    image = F.normalize(image_emb.float(), dim=-1)
    text = F.normalize(text_emb.float(), dim=-1)
    logits = logit_scale.float().clamp(max=math.log(100)).exp() * image @ text.t()
    # pair i is the only right answer for row i and for column i; every other entry is a negative
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2



class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the gradient that EVERY rank's loss sent to
    its slice (an all-reduce of the full gradient, then one's own rows). Every rank computes the
    same global-batch loss; summing the W copies' gradients gives W x dL/d(own embeddings), and
    DDP's average over W ranks brings the parameters' gradient back to exactly dL/d(theta) of one
    process holding the whole batch. (Swapping only the local slice back in, with the others
    detached, keeps each rank's own rows of the gradient: after DDP's average the towers would get
    1/W of it while logit_scale got all of it.) all_reduce rather than reduce_scatter: gloo, the
    CPU backend, has no reduce_scatter, and embeddings are small."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist
        ctx.rank, ctx.n = dist.get_rank(), len(x)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_embeddings(x):
    """This rank's embeddings (n, D) -> the global batch's (world * n, D) in rank order, with
    gradients flowing back to their owners; the identity in a single process."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def distributed_contrastive_loss(image_emb, text_emb, logit_scale):
    """contrastive_loss over the GLOBAL batch: every rank's pairs are negatives for every other's,
    as CLIP trained (paper 2.5: the similarity matrix of a 32k batch, computed across GPUs). Equal,
    loss and gradients, to one process holding the whole batch (the tests check it on 2 ranks)."""
    return contrastive_loss(gather_embeddings(image_emb), gather_embeddings(text_emb), logit_scale)

# ------------------------------------------------------------------------------------ preprocessing
# OpenAI's clip.py: Resize(S, bicubic) of the shorter side, CenterCrop(S), ToTensor, Normalize with
# the mean/std of its training images. The models only saw inputs made this way; other resizes cost
# accuracy.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(image, size=224):
    """A PIL image (any mode, any size) -> normalised pixels (3, size, size), float32."""
    from PIL import Image
    image = image.convert("RGB")
    w, h = image.size
    # the shorter side becomes `size`, the longer one keeps the aspect ratio, truncated as
    # torchvision does
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize(new, Image.BICUBIC)
    # torchvision's centre crop rounds the offset half-to-even (HF's CLIPImageProcessor floors it:
    # the two differ by one pixel when the margin is odd); we follow OpenAI, who used torchvision
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return _normalise(x)


def preprocess_tensor(images, size=224):
    """Images already in memory as float [-1, 1] (B, 3, H, W), what sample.py produces -> normalised
    pixels (B, 3, size, size). The same steps as preprocess() on the unrounded image: torch's
    antialiased bicubic uses PIL's kernel (a = -0.5, widened when shrinking), but the PIL path
    rounds to 8 bits before and after resizing and clips overshoot to [0, 255]; here nothing is
    rounded, so the two agree to about one grey level (a test measures it)."""
    x = (images.float() + 1) / 2
    h, w = x.shape[-2:]
    new = (int(size * h / w), size) if w <= h else (size, int(size * w / h))  # (H, W)
    if new != (h, w):
        x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True)
    top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return _normalise(x[..., top:top + size, left:left + size])


def _normalise(x):
    """Per-channel (x - mean) / std with the statistics above: inputs centred near 0 with unit
    spread, the range the patch convolution was trained on."""
    mean = torch.tensor(MEAN, device=x.device).view(3, 1, 1)
    return (x - mean) / torch.tensor(STD, device=x.device).view(3, 1, 1)


# ---------------------------------------------------------------------------------------- tokenizer
# CLIP's text tokenizer (OpenAI simple_tokenizer.py; HF's CLIPTokenizer): byte-level BPE (Sennrich
# et al. 2016 over the UTF-8 bytes, as GPT-2) with a lower-cased vocabulary and "</w>" marking the
# last symbol of a word, so "red" as a word and "red" inside "redder" are different tokens.
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# OpenAI keeps the first 49152 - 256 - 2 = 48894 merges of its file (HF's slow tokenizer too),
# so the vocabulary is 256 byte symbols + 256 with "</w>" + 48894 merges + 2 specials = 49408 ids
MAX_MERGES = 49152 - 256 - 2


@lru_cache()
def byte_to_unicode():
    """Every byte -> one printable character, so BPE works on strings with no whitespace or control
    symbols inside: printable Latin-1 bytes stand for themselves, the other 68 take code points
    256+. (GPT-2's table; CLIP reuses it.)"""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    # this insertion order (printable bytes first) is the order of the first 256 vocabulary ids
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


@lru_cache()
def word_pattern():
    """The word split, as OpenAI's pattern  <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|
    \\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+  (third-party `regex` module) but in the standard library's
    re. Python's \\w is letters, numbers (Unicode N: Nd, Nl, No) and "_"; \\d is only Nd. So letters
    are [^\\W\\d_] minus Nl/No (superscripts, fractions, roman numerals, circled digits), a number
    is ONE character of Nd, Nl or No (12 is two tokens), and the rest is a run of anything neither
    space, letter nor number, "_" included. Nl/No are listed once here from unicodedata (1131
    characters)."""
    # planes 0 and 1 hold every N character (planes 2-3 are CJK letters, 14 tags, 15-16 private use)
    other_numbers = "".join(chr(i) for i in range(0x20000)
                            if unicodedata.category(chr(i)) in ("Nl", "No"))
    n = re.escape(other_numbers)
    return re.compile(rf"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                      rf"|[^\W\d_{n}]+|[\d{n}]|(?:[^\s\w{n}]|_)+", re.IGNORECASE)


@lru_cache()
def _ftfy_table():
    """The parts of ftfy.fix_text's defaults that change ordinary captions, as a str.translate table
    (checked character by character against ftfy 6.3): curly quotes -> straight ones, so "it’s"
    splits like "it's"; Latin ligatures and full-width forms -> their compatibility (NFKC) spelling
    ("ﬁ" -> "fi", "Ａ" -> "A", ideographic space -> space)."""
    table = {c: "'" for c in (0x02BC, *range(0x2018, 0x201C))}
    table.update({c: '"' for c in range(0x201C, 0x2020)})
    ligatures = [0x132, 0x133, *range(0x1C4, 0x1CD), *range(0x1F1, 0x1F4), *range(0xFB00, 0xFB05),
                 0xFB06]  # not U+0149 and U+FB05, which ftfy leaves alone
    for c in [*ligatures, *range(0xFF01, 0xFFEF), 0x3000]:
        table[c] = unicodedata.normalize("NFKC", chr(c))
    return table


def clean_text(text):
    """OpenAI's cleaning: ftfy.fix_text, HTML entities undone twice ("&amp;amp;" -> "&"), whitespace
    runs -> one space, lower case. Of ftfy we do NFC composition (e + combining accent -> one
    letter) and the table above; ftfy would also repair mojibake ("Ã©" -> "é"), read C1 control
    bytes as Windows-1252 and drop other control characters: text needing those tokenizes
    differently here."""
    text = unicodedata.normalize("NFC", text).translate(_ftfy_table())
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def merge_pair(parts, first, second):
    """`parts` with every occurrence of the adjacent pair (first, second) joined, left to right in
    one pass: the one step of byte-pair encoding, when learning merges and when applying them."""
    merged, j = [], 0
    while j < len(parts):
        if j + 1 < len(parts) and parts[j] == first and parts[j + 1] == second:
            merged.append(first + second)
            j += 2
        else:
            merged.append(parts[j])
            j += 1
    return merged


class Tokenizer:
    """text -> CLIP token ids. `encoder` maps BPE symbols to ids, `merges` is the ranked merge
    list."""

    def __init__(self, encoder, merges):
        self.encoder = encoder
        self.decoder = {i: s for s, i in encoder.items()}
        self.merges = [tuple(m) for m in merges]  # kept so a checkpoint can carry its tokenizer
        self.ranks = {pair: r for r, pair in enumerate(self.merges)}
        for name in (SOT, EOT):
            if name not in encoder:
                raise UserError(f"CLIP tokenizer: {name} is not in the vocabulary; "
                                "pass CLIP's vocab.json")
        self.sot, self.eot = encoder[SOT], encoder[EOT]
        self.cache = {SOT: [self.sot], EOT: [self.eot]}

    @classmethod
    def from_pretrained(cls, path):
        """A folder (or file inside it) with HF's vocab.json + merges.txt, or OpenAI's
        bpe_simple_vocab_16e6.txt.gz (merges only: the vocabulary is rebuilt from them as CLIP does:
        the 256 byte symbols, the same with "</w>", one symbol per merge, then the two specials)."""
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        if path.endswith(".gz"):
            try:
                with gzip.open(path, "rt", encoding="utf-8") as f:
                    merges = _parse_merges(f.read(), path)
            except (OSError, EOFError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read BPE merges {path!r} ({e}); "
                                "pass CLIP's bpe_simple_vocab_16e6.txt.gz") from None
            return cls.from_merges(merges)
        files = [os.path.join(folder, n) for n in ("vocab.json", "merges.txt")]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise UserError(f"CLIP tokenizer: {missing[0]!r} not found; pass a folder with "
                            "vocab.json and merges.txt, or bpe_simple_vocab_16e6.txt.gz")
        try:
            with open(files[0], encoding="utf-8") as f:
                encoder = json.load(f)
            with open(files[1], encoding="utf-8") as f:
                merges = _parse_merges(f.read(), files[1])
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"CLIP tokenizer files in {folder!r} are unreadable ({e})") from None
        return cls(encoder, merges)

    @classmethod
    def from_merges(cls, merges):
        """The vocabulary CLIP builds from a merge list (simple_tokenizer.py): the 256 byte symbols,
        the same with "</w>", one symbol per merge in rank order, then the two specials, so
        <|endoftext|> is the highest id (where the text tower pools)."""
        symbols = list(byte_to_unicode().values())
        vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges),
                 SOT, EOT]
        return cls({s: i for i, s in enumerate(vocab)}, merges)

    @classmethod
    def from_words(cls, words):
        """A tokenizer with no file, for a closed vocabulary such as scenes.VOCABULARY: BPE learnt
        on the words themselves (Sennrich et al. 2016: merge the most frequent adjacent pair, ties
        by the pair's spelling, until every word is one symbol), so each word is ONE token and any
        other text still tokenizes, into byte pieces. Deterministic: the same words give the same
        merges. Merges learnt this way replay exactly under bpe(): a pair holding a symbol made by
        merge r cannot have a rank below r."""
        to_unicode = byte_to_unicode()
        spelt = {}  # every word as its byte symbols, the last one carrying "</w>"
        for caption in words:
            for word in word_pattern().findall(clean_text(caption)):
                w = "".join(to_unicode[b] for b in word.encode("utf-8"))
                spelt[w] = [*w[:-1], w[-1] + "</w>"]
        merges = []
        while True:
            counts = {}
            for parts in spelt.values():
                for pair in zip(parts, parts[1:]):
                    counts[pair] = counts.get(pair, 0) + 1
            if not counts:
                return cls.from_merges(merges)
            first, second = min(counts, key=lambda p: (-counts[p], p))
            merges.append((first, second))
            for w, parts in spelt.items():  # apply it to every word
                spelt[w] = merge_pair(parts, first, second)

    def bpe(self, word):
        """One pre-split word (byte symbols) -> ids: start from single symbols, the last one
        carrying "</w>", and keep merging the adjacent pair of lowest rank until none of its pairs
        is a merge."""
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
        """One string -> its ids, without <|startoftext|> / <|endoftext|>."""
        to_unicode, ids = byte_to_unicode(), []
        for word in word_pattern().findall(clean_text(text)):
            ids += self.bpe(word if word in (SOT, EOT) else
                            "".join(to_unicode[b] for b in word.encode("utf-8")))
        return ids

    def decode(self, ids):
        """Ids -> text, words separated by spaces where "</w>" stood (the specials are dropped)."""
        from_unicode = {c: b for b, c in byte_to_unicode().items()}
        symbols = "".join(self.decoder[i] for i in ids if i not in (self.sot, self.eot))
        from_unicode[" "] = 32  # what "</w>" becomes; a real space byte is spelt "Ġ"
        raw = bytes(from_unicode[c] for c in symbols.replace("</w>", " "))
        return raw.decode("utf-8", errors="replace").replace("\0", "").strip()

    def __call__(self, texts, context_length=77, truncate=True, pad_id=None):
        """A string or a list of them -> LongTensor (B, context_length): <|startoftext|>, the ids,
        <|endoftext|>, then padding with pad_id (default <|endoftext|>, as HF's CLIP tokenizer pads;
        OpenAI pads with 0: the text tower reads only up to the first end token either way). Longer
        texts are cut to context_length - 2 ids so the end token stays last, as HF's truncation and
        OpenAI's tokenize(truncate=True) both do; truncate=False makes them an error instead."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        pad = self.eot if pad_id is None else pad_id
        out = torch.full((len(texts), context_length), pad, dtype=torch.long)
        for row, caption in enumerate(texts):
            ids = self.encode(caption)
            if len(ids) > context_length - 2:
                if not truncate:
                    raise UserError(f"text {caption[:40]!r}... is {len(ids) + 2} tokens, over "
                                    f"CLIP's context of {context_length}; shorten it or allow "
                                    "truncation")
                ids = ids[: context_length - 2]
            out[row, : len(ids) + 2] = torch.tensor([self.sot, *ids, self.eot])
        return out


def _parse_merges(text, path):
    """merges.txt / the .gz: a "#version" header line (both files have one), then "a b" per line."""
    lines = text.split("\n")
    if lines and "#version" in lines[0]:
        lines = lines[1:]
    merges = [tuple(line.split()) for line in lines[:MAX_MERGES] if line.strip()]
    bad = next((m for m in merges if len(m) != 2), None)
    if bad is not None:
        raise UserError(f"{path!r} is not a BPE merges list (line {' '.join(bad)!r} is not a pair)")
    return merges


# ------------------------------------------------------------------------------------------ loading
def hf_config(folder):
    """CLIPConfig from a Hugging Face config.json (keys missing there take HF's defaults, which are
    ViT-B/32's, as transformers' CLIPTextConfig / CLIPVisionConfig do)."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{folder!r} has no config.json; pass a Hugging Face CLIP folder") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path!r} is not valid JSON ({e})") from None
    if cfg.get("model_type") != "clip":
        raise UserError(f"{path!r} describes a {cfg.get('model_type')!r} model, not CLIP "
                        "(model_type 'clip'); pass a folder such as openai/clip-vit-base-patch32")
    text = cfg.get("text_config") or cfg.get("text_config_dict") or {}  # *_dict: older exports
    vision = cfg.get("vision_config") or cfg.get("vision_config_dict") or {}
    b32 = CLIPConfig()
    # one flag for both towers: every released CLIP uses the same activation in both
    acts = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise UserError(f"{path!r}: activations {sorted(acts)} are not supported "
                        "(quick_gelu or gelu)")
    eos = text.get("eos_token_id", 49407)  # transformers' default when the file does not say
    return CLIPConfig(
        embed_dim=cfg.get("projection_dim", b32.embed_dim),
        image_size=vision.get("image_size", b32.image_size),
        patch_size=vision.get("patch_size", b32.patch_size),
        vision_width=vision.get("hidden_size", b32.vision_width),
        vision_layers=vision.get("num_hidden_layers", b32.vision_layers),
        vision_heads=vision.get("num_attention_heads", b32.vision_heads),
        vision_mlp=vision.get("intermediate_size", b32.vision_mlp_dim),
        context_length=text.get("max_position_embeddings", b32.context_length),
        vocab_size=text.get("vocab_size", b32.vocab_size),
        text_width=text.get("hidden_size", b32.text_width),
        text_layers=text.get("num_hidden_layers", b32.text_layers),
        text_heads=text.get("num_attention_heads", b32.text_heads),
        text_mlp=text.get("intermediate_size", b32.text_mlp_dim),
        quick_gelu=acts == {"quick_gelu"},
        eps=text.get("layer_norm_eps", b32.eps),
        # transformers pools at argmax(ids) when eos_token_id is the legacy 2, else at that id
        eot_id=None if eos == 2 else eos)


def _read_hf_weights(folder):
    """The state dict of a HF folder (safetensors, one file or sharded, else pytorch_model.bin with
    weights_only), through text.py's reader: one loader for T5 and CLIP."""
    return text.load_hf_state_dict(folder)


def _load_clip_file(path):
    """torch.load of a single file, refusing OpenAI's TorchScript archives (ViT-B-32.pt): loading
    one means running the code inside it, so it is never unpickled; the same weights come as a HF
    folder."""
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            # torch.jit.save writes <name>/code/... (the program) and <name>/constants.pkl
            names = z.namelist()
            if any(n.split("/")[1:2] == ["code"] or n.endswith("/constants.pkl") for n in names):
                raise UserError(f"{path} is a TorchScript archive (OpenAI's clip.load format), "
                                "which cannot be loaded safely; use the Hugging Face folder of the "
                                "same model (e.g. openai/clip-vit-base-patch32: config.json + "
                                "model.safetensors)")
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} holds a {type(ckpt).__name__}, not a CLIP checkpoint dict")
    return ckpt



def load(path):
    """(CLIP in eval mode, its Tokenizer) from one path: a Hugging Face folder (its vocab.json and
    merges.txt sit beside the weights) or one of our checkpoints (train.py --model CLIP-*), which
    carries its merges in "meta". A model is only as good as the tokens it was trained on, so the
    two always come from the same place."""
    model = CLIP.from_pretrained(path)
    if os.path.isdir(path) or os.path.basename(path) in ("config.json", "model.safetensors",
                                                          "pytorch_model.bin"):
        return model, Tokenizer.from_pretrained(path)
    merges = (_load_clip_file(path).get("meta") or {}).get("bpe_merges")
    if not merges:
        raise UserError(f"{path} carries no tokenizer (meta 'bpe_merges'); train it with train.py "
                        "--model CLIP-*, or pass a Hugging Face CLIP folder")
    return model, Tokenizer.from_merges([tuple(m) for m in merges])


class TokenizedCaptions(torch.utils.data.Dataset):
    """(image, caption) items -> (image, token ids [context]): what the trainer batches (tensors
    only), the tokenizer applied per item in the loader's workers."""

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
    """CLIP scores of candidate images against their prompts: 100 x cosine (the usual "CLIP score").
    images: float [-1, 1] (P*N, 3, H, W) in prompt-major order (prompt p's N candidates together),
    as sample.py makes them; texts: P strings (with `tokenizer`) or token ids (P, T). Returns
    float32 scores (P, N). A score compares one image with one text; across prompts it is not
    calibrated, so re-ranking compares candidates of the same prompt only."""
    context = clip.config.context_length
    ids = texts if tokenizer is None else tokenizer(texts, context_length=context)
    if len(images) % len(ids):
        raise UserError(f"{len(images)} images do not split evenly over {len(ids)} prompts")
    device = next(clip.parameters()).device
    text = F.normalize(clip.encode_text(ids.to(device)).float(), dim=-1)
    feats = []
    for chunk in images.split(batch_size):
        pixels = preprocess_tensor(chunk.to(device), clip.config.image_size)
        feats.append(F.normalize(clip.encode_image(pixels.to(text.dtype)).float(), dim=-1))
    image = torch.cat(feats).view(len(ids), -1, text.shape[-1])  # (P, N, embed)
    # unit vectors, so the dot product is the cosine; x 100 is the scale papers report
    # (Hessel et al. 2021's CLIPScore is 2.5 x max(cos, 0); the ranking is the same)
    return 100 * (image * text[:, None]).sum(-1)


def rerank(scores, keep):
    """Indices (P, keep) of the `keep` best candidates of each prompt, best first (ties keep drawing
    order), and their scores. keep = N returns every candidate, sorted, scores untouched."""
    if not 1 <= keep <= scores.shape[1]:
        raise UserError(f"--keep {keep} must be between 1 and the number of candidates "
                        f"{scores.shape[1]}")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
    return order, scores.gather(1, order)


def keep_best(candidates, scores, keep):
    """candidates (P*N, ...) in prompt-major order -> the `keep` best of each prompt (P, keep, ...)
    in rank order, with their scores (P, keep)."""
    order, best = rerank(scores, keep)
    grouped = candidates.view(*scores.shape, *candidates.shape[1:])
    item = candidates.shape[1:]
    pick = order.view(*order.shape, *[1] * len(item)).expand(-1, -1, *item)
    return grouped.gather(1, pick.to(grouped.device)), best




def retrieval_accuracy(image_emb, text_emb, ids, group=10):
    """The share of images whose most similar caption, among those of its group of `group`
    consecutive pairs (the last group may be smaller), is its own; a caption spelt exactly like
    the true one (two scenes both "a star") counts as right. Chance is 1/group."""
    image, text = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    right = []
    for g in range(0, len(ids), group):
        picked = ids[g:g + group][(image[g:g + group] @ text[g:g + group].t()).argmax(1)]
        right.append((picked == ids[g:g + group]).all(1).float())
    return torch.cat(right).mean()

# --------------------------------------------------------------------------------------- CLIP score
# The text-image metric. CLIPScore (Hessel et al. 2021): w * max(cos(image, "A photo depicts " +
# caption), 0) with w = 2.5, which stretches the cosines of ViT-B/32 (rarely above 0.4) over [0, 1];
# the prefix was found to raise agreement with human judgements. LlamaGen's t2i table (after
# GigaGAN) reports the plain mean cosine x 100 with the same prefix and ViT-B/32. Both are means
# over the set, one caption per image; papers quote them x 100.
PHOTO_DEPICTS = "A photo depicts"


@torch.no_grad()
def clip_score(clip, images, captions, tokenizer, prefix=PHOTO_DEPICTS, w=2.5, batch_size=64):
    """images: float [-1, 1] (N, 3, H, W) or an iterable of such batches; captions: N strings, in
    the same order. -> {"clip_score": 100 x mean cosine, "clipscore": 100 x mean w max(cos, 0),
    "count": N}, the cosines of each image with `prefix` + its caption ("" for none)."""
    if torch.is_tensor(images) and len(images) != len(captions):
        raise UserError(f"CLIP score: {len(captions)} captions for {len(images)} images; give "
                        "one caption per image")
    batches = images.split(batch_size) if torch.is_tensor(images) else images
    cos, done = [], 0
    for chunk in batches:
        texts = [f"{prefix} {c}".strip() for c in captions[done:done + len(chunk)]]
        if len(texts) != len(chunk):
            raise UserError(f"CLIP score: {len(captions)} captions for more images; give one "
                            "caption per image")
        cos.append(rank(clip, chunk, texts, tokenizer)[:, 0] / 100)  # (b, 1): one image each
        done += len(chunk)
    if done != len(captions):
        raise UserError(f"CLIP score: {len(captions)} captions for {done} images; give one "
                        "caption per image")
    cos = torch.cat(cos).double()
    return {"clip_score": 100 * cos.mean().item(),
            "clipscore": 100 * (w * cos.clamp(min=0)).mean().item(), "count": done}

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
    vision_mlp: Optional[int] = None  # None: 4 x width (every OpenAI model)
    context_length: int = 77  # text positions, <|startoftext|> and <|endoftext|> included
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp: Optional[int] = None
    quick_gelu: bool = True  # OpenAI's models; open_clip's LAION models use exact GELU
    eps: float = 1e-5
    eot_id: Optional[int] = None  # None: pool at the highest id (OpenAI's vocab ends with it)

    def __post_init__(self):
        problems = [
            (self.image_size % self.patch_size,
             f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"),
            (self.vision_width % self.vision_heads,
             f"vision_width {self.vision_width} is not divisible by vision_heads "
             f"{self.vision_heads}"),
            (self.text_width % self.text_heads,
             f"text_width {self.text_width} is not divisible by text_heads {self.text_heads}"),
        ]
        for bad, message in problems:
            if bad:
                raise UserError(f"CLIPConfig: {message}")

    @property
    def vision_mlp_dim(self):
        return self.vision_mlp or 4 * self.vision_width

    @property
    def text_mlp_dim(self):
        return self.text_mlp or 4 * self.text_width


# OpenAI's released models (CLIP paper Table 20; HF openai/clip-vit-base-patch32, -large-patch14),
# and ours for CPU training on the built-in captioned world (32 px images, a small BPE vocabulary).
# Parameter counts: B/32 151,277,313; L/14 427,616,513 (test_clip.py says where they come from);
# CLIP-tiny 0.38M at vocab 1024.
CLIP_CONFIGS = {
    "ViT-B/32": dict(),
    "ViT-L/14": dict(embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24,
                     vision_heads=16, text_width=768, text_heads=12),
    # CLIP-tiny: 32 px / patch 4 = an 8 x 8 grid (64 tokens, cheap on a CPU); a context of 32 fits
    # the built-in world's short captions; vocab 1024 = 512 byte symbols + 510 merges + 2
    # specials, e.g. the first 510 merges of CLIP's own file (Tokenizer.from_pretrained of a cut
    # .txt.gz).
    "CLIP-tiny": dict(embed_dim=64, image_size=32, patch_size=4, vision_width=64, vision_layers=3,
                      vision_heads=4, context_length=32, vocab_size=1024, text_width=64,
                      text_layers=3, text_heads=4),
}


def clip_config(name, **overrides):
    """CLIPConfig of a registry entry, with any field overridden."""
    if name not in CLIP_CONFIGS:
        raise UserError(f"unknown CLIP config {name!r}; choose one of {', '.join(CLIP_CONFIGS)}")
    return CLIPConfig(**{**CLIP_CONFIGS[name], **overrides})
