"""Text-to-image (paper 3.3): captions in, the GPT's caption prefix out, for training and sampling.

A text-conditional GPT is the class GPT with a prefix of N caption features in place of its one
class token. Two ways to make those features, and DALL-E's way without them:
  --text FEATURES_DIR  frozen features, computed once by `codes.py features` (FLAN-T5-XL for the
      paper), LlamaGen's recipe: an encoder trained on a web corpus knows far more language than
      any caption set teaches, costs nothing to train, and its outputs are stored like the codes.
  --text t5-nano       a small T5 learnt together with the GPT from the captions (JointT2I).
  --text stream        the caption's own tokens first in the GPT's sequence (StreamT2I, DALL-E).
      These two learn their language from the captions alone, as DALL-E its text embeddings:
      right for a small closed world such as scenes.py's, whose captions cover it, not at scale.
train.py's T2IStage builds its GPT by joint_gpt or frozen_gpt (--init-from: init_from, which
also starts a text GPT from a class GPT); sample.py draws prompts through PromptCondition.
"""
import dataclasses
import os

import torch
import torch.nn as nn

import codes
from common import (UserError, check_weights, is_rank0, load_checkpoint, load_weights, say,
                    json_checksum, stored, unwrap_state_dict, weights_file)
from model import GPT, RUNTIME_BUFFERS, gpt_config, next_token_loss
from scenes import VOCABULARY
from text import T5Config, T5Encoder, TextEncoder, UnigramTokenizer, clean_caption, t5_config


# ------------------------------------------------------------------------------------- training
def caption_vocabulary(texts):
    """The words of a jointly-trained tokenizer: the built-in world's vocabulary (scenes.py), then
    every other word of the training captions, sorted: the same list for the same data."""
    seen = {w for t in texts for c in ([t] if isinstance(t, str) else t)
            for w in clean_caption(c).split()}
    return list(VOCABULARY) + sorted(seen - set(VOCABULARY))


def left_pad_caption(features, mask):
    """A right-padded text-encoder output (T5's) -> the left-padded prefix: features (B, N, d) and
    mask (B, N), valid tokens moved to the end in order, pads zeroed, mask bool (sample_t2i.py).
    Why the left: the prefix's LAST position predicts code 0, and must be a token that has seen
    the whole caption; a pad there sees only itself."""
    mask, order = torch.sort(mask.bool().long(), dim=1, stable=True)  # pads first, order kept
    features = features.gather(1, order[..., None].expand_as(features))
    return features * mask[..., None].to(features.dtype), mask.bool()


class CaptionedCodes(torch.utils.data.Dataset):
    """Codes with their captions: item -> (codes int64 [L], caption, mask bool [N], valid).

    The caption is token ids int64 [N] (joint training: a tokenizer is given) or frozen features
    float32 [N, d]; both right-padded as T5 reads and writes them, the model side moves them to
    the left (left_pad_caption). valid (float32) weighs the item's loss as the official trainer's
    flag does (0 for an image it could not read); every item here has its codes, so it is 1."""

    def __init__(self, items, texts=None, tokenizer=None, length=120, features=None):
        self.items, self.texts, self.tokenizer = items, texts, tokenizer
        # memo: caption -> (ids, mask), tokenized once; at most 2^14 kept (all the built-in world's)
        self.length, self.features, self.memo = length, features, {}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        seq = self.items[index][0]
        if self.features is not None:
            feats, mask = self.features[index]
            caption, mask = torch.as_tensor(feats, dtype=torch.float32), torch.as_tensor(mask)
        else:
            text = self.texts[index]
            if not isinstance(text, str):  # several captions: one per access (Seeded's RNG)
                text = text[int(torch.randint(len(text), ()))]
            if (row := self.memo.get(text)) is None:
                ids, mask = self.tokenizer(clean_caption(text), self.length)
                row = ids[0], mask[0]
                if len(self.memo) < 1 << 14:
                    self.memo[text] = row
            caption, mask = row
        return seq, caption, mask.bool(), torch.tensor(1.0)


class JointT2I(GPT):
    """The text-conditional GPT with its own T5 inside, trained together: forward takes token ids
    (B, N) and their right-padded mask where GPT.forward takes features. One module, so DDP and
    FSDP see every weight in one forward; the encoder's keys sit under text_encoder., which
    GPT.from_pretrained skips (joint_text_encoder loads them)."""

    def __init__(self, config, text_config):
        super().__init__(config)  # GPT's N(0, 0.02) init runs before the encoder exists ...
        self.text_encoder = T5Encoder(text_config)  # ... which keeps T5's own

    def forward(self, idx, ids, targets=None, cond_mask=None, valid=None):
        """-> GPT.forward's (logits, loss), with T5 inside the graph: the GPT's next-token loss
        is the encoder's objective too."""
        features, mask = left_pad_caption(self.text_encoder(ids, cond_mask), cond_mask)
        return super().forward(idx, features, targets, mask, valid)

    def flops_per_token(self):
        """GPT.flops_per_token, with the encoder counted once per caption token, not per code."""
        t5 = sum(p.numel() for p in self.text_encoder.parameters())
        t5 -= self.text_encoder.shared.weight.numel()  # a lookup, no matmul
        per_code = self.config.cls_token_num / self.config.block_size
        return GPT.flops_per_token(self) - 6 * t5 + 6 * t5 * per_code


# ------------------------------------------------------------------------------ DALL-E's one stream
# DALL-E (Ramesh et al. 2021) has no text encoder and no prefix: the caption's tokens are the
# first N positions of the GPT's own sequence, one causal stream with the image's, and the GPT
# learns to predict both. A pad is no mask but a token, its own per slot: every position is a
# real input and attention stays plain causal. DALL-E had no classifier-free guidance; the null
# caption here is all pads, swapped in for whole captions as LlamaGen drops its prefix.
class StreamCaption(nn.Module):
    """The stream's caption side: ids (B, N) -> the table's rows (the words, then slot i's pad at
    n_words + i) plus a learned position per slot, as DALL-E's; `head` predicts the next id."""

    def __init__(self, n_words, n, dim):
        super().__init__()
        self.n_words, self.embedding_table = n_words, nn.Embedding(n_words + n, dim)
        self.position, self.head = nn.Embedding(n, dim), nn.Linear(dim, n_words + n, bias=False)
        for m in (self.embedding_table, self.position, self.head):
            nn.init.normal_(m.weight, std=0.02)  # GPT's init

    def null(self, ids):  # the all-padding caption
        return stream_ids(ids, torch.zeros_like(ids, dtype=torch.bool), self.n_words)

    def forward(self, ids):
        return self.embedding_table(ids) + self.position.weight


def stream_ids(ids, mask, n_words):
    """Right-padded caption ids (B, N) and mask -> the stream's ids: slot i's pad is n_words + i."""
    return torch.where(mask, ids, n_words + torch.arange(ids.shape[1], device=ids.device))


class StreamT2I(GPT):
    """The stream GPT: GPT with StreamCaption for its condition, which is caption ids (B, N),
    pads included (stream_ids), no mask; GPT.generate, its KV cache and decoding.py run as is."""
    stream = True

    def __init__(self, config):
        super().__init__(config)
        n = config.cls_token_num
        self.cls_embedding = StreamCaption(config.stream_words, n, config.dim)
        # the identity rotation (cos 1, sin 0) at the text positions, not the prefix's zero rows:
        # those make every text q.k zero, and a caption token could not tell where, nor which,
        # the words before it are; its position comes from the learned table instead
        self.freqs_cis[:n, :, 0] = 1.0

    def forward(self, idx, ids, targets=None, cond_mask=None, valid=None):
        """-> GPT.forward's (image logits, loss) for caption ids (B, N), right padded as cond_mask
        says (None: already stream ids). The loss is DALL-E's (text + 7 * image) / 8, each the
        mean over its own tokens; text positions 0..N-2 predict caption tokens 1..N-1. Out of
        training the image's alone, the figure a prefix GPT's validation reports."""
        if cond_mask is not None:
            ids = stream_ids(ids, cond_mask.bool(), self.config.stream_words)
        if self.training and self.config.class_dropout_prob > 0:  # whole captions -> the null one
            drop = torch.rand(len(ids), 1, device=ids.device) < self.config.class_dropout_prob
            ids = torch.where(drop, self.cls_embedding.null(ids), ids)
        x, n = self.hidden(idx, ids), self.config.cls_token_num
        logits = self.output(self.norm(x[:, n - 1:])).float()
        if targets is None:
            return logits, None
        image = next_token_loss(logits, targets, valid)
        if not self.training:
            return logits, image
        text = self.cls_embedding.head(self.norm(x[:, :n - 1])).float()
        text = next_token_loss(text, ids[:, 1:], valid)
        return logits, (text + 7 * image) / 8

    def _check_condition(self, cond, cond_mask):
        n, bad = self.config.cls_token_num, cond.is_floating_point() or cond_mask is not None
        if bad or cond.dim() != 2 or cond.shape[1] != n:
            raise UserError(f"this GPT is DALL-E's one stream: pass caption ids (B, {n}) with "
                            f"their pads (t2i.stream_ids), no mask, not a {tuple(cond.shape)} "
                            f"{cond.dtype} tensor")


def joint_gpt(recipe, items, over, was):
    """--text <T5 config>: a GPT and a T5 of that config trained together (stream: StreamT2I),
    the tokenizer's words from the captions -> (config, model, CaptionedCodes, the text side for
    the checkpoint's meta); `was`: a resumed run's text side, whose words and N it keeps."""
    texts = codes.read_captions(recipe.data)[0]  # per item a caption, or a list to draw from
    if len(texts) != len(items):
        raise UserError(f"{recipe.data}: {len(texts)} captions for {len(items)} images; "
                        "extract the codes again")
    if was is not None and was.get("encoder") != recipe.text:
        raise UserError(f"the checkpoint's text encoder is {was.get('encoder')!r}, not "
                        f"--text {recipe.text}; resume with the --text it was trained with")
    words = stored(was, "words", "the checkpoint's text encoder") if was else \
        caption_vocabulary(texts)
    length = recipe.caption_len or (was["length"] if was else 120)  # N = 120 (paper 3.3)
    if was and length != was["length"]:
        raise UserError(f"--caption-len {length} differs from the checkpoint's {was['length']}; "
                        "a resumed run keeps it")
    tokenizer = UnigramTokenizer.from_words(words)
    data = CaptionedCodes(items, texts, tokenizer, length)
    side = dict(encoder=recipe.text, length=length, words=words,  # the meta either kind records
                words_checksum=json_checksum(words))
    if recipe.text == "stream":
        config = gpt_config(recipe.model, stream_words=len(tokenizer), cls_token_num=length, **over)
        return config, StreamT2I(config), data, dict(kind="stream", **side)
    t5 = dict(vocab_size=len(tokenizer))
    if recipe.dropout is not None:  # --dropout 0 switches every dropout off, T5's too
        t5["dropout_rate"] = recipe.dropout
    text_config = t5_config(recipe.text, **t5)
    config = gpt_config(recipe.model, caption_dim=text_config.d_model, cls_token_num=length, **over)
    return config, JointT2I(config, text_config), data, dict(
        kind="joint", **side, config=dataclasses.asdict(text_config))


def frozen_gpt(recipe, items, over, was):
    """--text <features folder>: the GPT alone, on a frozen encoder's features -> joint_gpt's
    four. The features must be of the codes' captions (by checksum), and a resumed run's of the
    same encoder."""
    feats = codes.CaptionFeatures(recipe.text)  # item i: (features [N, d], mask [N]) of caption i
    feats.check_codes(recipe.data)
    if len(feats) != len(items):  # the codes folder's captions.json and codes disagree
        raise UserError(f"{recipe.data}: {len(feats)} captions for {len(items)} images; extract "
                        "the codes again")
    length, width = feats[0][0].shape
    receipt = feats.receipt.to_dict()
    if was is not None and was.get("receipt") != receipt:
        raise UserError(f"--text {recipe.text} holds features of another text encoder than the "
                        "checkpoint was trained on; resume with the same features")
    config = gpt_config(recipe.model, caption_dim=int(width), cls_token_num=int(length), **over)
    return (config, GPT(config), CaptionedCodes(items, length=length, features=feats),
            dict(kind="frozen", features=os.path.abspath(recipe.text), length=int(length),
                 width=int(width), receipt=receipt))


def init_from(model, meta, path, receipt, name):
    """--init-from: `model` (of --model `name`, whose checkpoint meta is `meta`, on codes of
    `receipt`) begins as the GPT at `path`, as LlamaGen's 512 px text stage 2 begins as its 256 px
    stage 1. What draws the codes (embedding, blocks, norm, head) must fit whole; the condition
    (class table; caption projection and null caption; a T5 trained along) comes too when it means
    the same (condition_of), and starts afresh otherwise: a class GPT can start a text GPT."""
    ckpt = load_checkpoint(weights_file(path))  # an official name: its cached file
    if ckpt.get("kind", "gpt") != "gpt":
        raise UserError(f"--init-from {path} is a {ckpt['kind']!r} checkpoint, not a GPT")
    theirs = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    if theirs.get("tokenizer_checksum"):  # official files carry no receipt: shapes must do
        codes.CodesReceipt.from_dict(theirs, path).check_same_tokenizer(
            receipt, mine=f"--init-from {path}", theirs=f"--data {receipt.data}")

    def parts(sd):  # (what draws the codes, the condition)
        cond = {k: v for k, v in sd.items() if k.startswith(("cls_embedding.", "text_encoder."))}
        return {k: v for k, v in sd.items() if k not in cond}, cond
    mine = model.state_dict()
    (body, their_cond), (my_body, my_cond) = parts({
        k: v for k, v in unwrap_state_dict(ckpt).items()
        if not any(b in k for b in RUNTIME_BUFFERS)}), parts(mine)
    check_weights(my_body, body, f"--init-from {path}",
                  f"--init-from takes a GPT of --model {name} on these codes")
    same = (their_cond.keys() == my_cond.keys()
            and all(their_cond[k].shape == v.shape for k, v in my_cond.items())
            and (not theirs or condition_of(theirs) == condition_of(meta)))
    model.load_state_dict({**mine, **body, **(their_cond if same else {})})
    if is_rank0():
        say(f"--init-from {path}: " + ("every weight" if same else "all but the condition "
            "embedding, which starts afresh (another condition)"))


def condition_of(meta):
    """What a GPT's condition means, from its checkpoint's meta: its class names, or its text side
    (the words and shapes of one trained along, a frozen encoder's receipt; not where it lies)."""
    if (text := meta.get("text")) is None:
        return "class", list(meta.get("classes") or []), meta.get("num_classes")
    return {k: v for k, v in text.items() if k != "features"}


# ------------------------------------------------------------------------------------- sampling
# The encoder is part of the model: ours trained with --text t5-nano carry their T5 and its words
# in the checkpoint; the official t2i_XL_*.pt files, and ours trained on frozen features, read
# FLAN-T5-XL's, whose folder --t5 names (google/flan-t5-xl: config.json, spiece.model, shards).
DEMO_T2I_GPT = "results/demo/t2i_gpt.pt"  # the demo's text-to-image half writes these
DEMO_T2I_VQ = "results/demo/t2i_vq.pt"
NO_T2I_WEIGHTS = (f"no --gpt-ckpt/--vq-ckpt given and no demo models at {DEMO_T2I_GPT}, "
                  f"{DEMO_T2I_VQ} (python demo.py --only t2i trains them); or fetch the "
                  "official pair once (about 3.4 GB: GPT-XL 775M and VQ-16 72M parameters in "
                  "float32), with FLAN-T5-XL cloned by hand (git clone "
                  "https://huggingface.co/google/flan-t5-xl): python sample.py --gpt-ckpt "
                  "t2i_XL_stage1_256.pt --vq-ckpt vq_ds16_t2i.pt --t5 flan-t5-xl --prompt "
                  "\"a red apple on a wooden table\"")


class PromptCondition:
    """Prompt indices -> (caption features [B, N, caption_dim], mask [B, N]) left padded, on the
    indices' device. prompts: the captions the indices point into; encoder: a text.TextEncoder;
    length: the GPT's caption prefix N (its cls_token_num)."""

    def __init__(self, prompts, encoder, length):
        self.prompts, self.encoder, self.length = prompts, encoder, length

    def __call__(self, indices):
        """Encoded per call: an evaluation set draws many prompts, a batch's worth at a time."""
        texts = [self.prompts[int(i)] for i in indices]
        features, mask = self.encoder.encode_captions(texts, self.length)
        features, mask = left_pad_caption(features.float(), mask)
        return features.to(indices.device), mask.to(indices.device)


def joint_text_encoder(gpt_path, info, device, dtype):
    """The T5 and words a GPT was trained with (--text t5-nano), rebuilt from its checkpoint: the
    config and words from meta["text"] (`info`), the weights under text_encoder.*."""
    sd = {k.removeprefix("text_encoder."): v
          for k, v in unwrap_state_dict(load_checkpoint(gpt_path)).items()
          if k.startswith("text_encoder.")}
    try:
        encoder = T5Encoder(T5Config(**info["config"]))
    except (KeyError, TypeError):  # no config recorded, or a field T5Config does not know
        raise UserError(f"{gpt_path}: its text encoder record is damaged; train it again") \
            from None
    load_weights(encoder, sd, f"text encoder of {gpt_path!r}")
    tokenizer = UnigramTokenizer.from_words(stored(info, "words", gpt_path))
    return TextEncoder(tokenizer, encoder, device, dtype)


def joint_condition(gpt, gpt_path, prompts, device, dtype=torch.float32):
    """The PromptCondition of `prompts` for a GPT trained with its own T5, or for a StreamT2I
    the same mapping to (caption ids, no mask): what the demo's benchmark and bench.py draw from."""
    info, n = gpt.meta["text"], gpt.config.cls_token_num
    if info["kind"] != "stream":
        return PromptCondition(prompts, joint_text_encoder(gpt_path, info, device, dtype), n)
    # the stream GPT embeds the words itself
    tokenizer = UnigramTokenizer.from_words(stored(info, "words", gpt_path))

    def condition(indices):
        ids, mask = tokenizer([clean_caption(prompts[int(i)]) for i in indices], n)
        return stream_ids(ids, mask, len(tokenizer)).to(indices.device), None
    return condition


def pretrained_text_encoder(t5, gpt, gpt_path, info, device, dtype):
    """--t5 FOLDER, checked against what the GPT reads: the width always, and for ours the
    encoder receipt of its training features."""
    receipt = (info or {}).get("receipt") or {}
    if t5 is None:
        name = receipt.get("encoder") if info else "google/flan-t5-xl"
        raise UserError(f"the GPT {gpt_path} reads the features of a frozen text encoder "
                        f"({name}): pass its folder with --t5")
    encoder = TextEncoder.from_pretrained(t5, device, dtype)
    if (width := encoder.encoder.config.d_model) != gpt.config.caption_dim:
        raise UserError(f"--t5 {t5} makes {width}-d features, the GPT {gpt_path} reads "
                        f"{gpt.config.caption_dim}-d ones: pass the encoder it was trained on")
    stamp = receipt.get("encoder_checksum")  # of the whole encoder: weights, pieces, cleaning
    if stamp and stamp != codes.encoder_checksum(encoder):
        raise UserError(f"--t5 {t5} is not the text encoder whose features the GPT "
                        f"{gpt_path} learned (weights checksum differs): pass that one")
    return encoder


def text_condition(prompts, t5, gpt, gpt_path, device, dtype):
    """The PromptCondition of `prompts` (--t5: the frozen encoder's folder) for a text GPT; None
    for a class GPT. One line when the condition kinds disagree."""
    if not (gpt.config.caption_dim or gpt.stream):
        if prompts:
            raise UserError(f"the GPT {gpt_path} is class-conditional: draw it with --class, or "
                            "pass a text-to-image GPT for --prompt")
        return None
    if not prompts:
        raise UserError(f"the GPT {gpt_path} is text-conditional: give --prompt TEXT or "
                        "--prompts FILE, not --class")
    info = gpt.meta.get("text")
    # FLAN-T5 overflows float16 (text.py); bf16 has float32's range, as LlamaGen runs it
    text_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
    if info and info.get("kind") in ("joint", "stream"):
        if t5 is not None:
            raise UserError(f"the GPT {gpt_path} learned its own text side (--text "
                            f"{info.get('encoder')}): drop --t5")
        condition = joint_condition(gpt, gpt_path, prompts, device, text_dtype)
        tokenizer, clean = UnigramTokenizer.from_words(stored(info, "words", gpt_path)), True
    else:
        encoder = pretrained_text_encoder(t5, gpt, gpt_path, info, device, text_dtype)
        condition = PromptCondition(prompts, encoder, gpt.config.cls_token_num)
        tokenizer, clean = encoder.tokenizer, encoder.clean
    if unknown := tokenizer.unknown_words(prompts, clean):
        say(f"warning: the text encoder reads {len(unknown)} word(s) of the prompts as <unk>, "
            "unknown to it: " + ", ".join(map(repr, unknown[:10])))
    return condition
