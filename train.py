"""One trainer for both stages of LlamaGen: the VQ tokenizer on images, then the GPT on their codes.

    python train.py --model VQ-tiny --data synthetic:20000 --image-size 32    # stage 1, one process
    python data.py extract --vq-ckpt runs/VQ-tiny/ckpt.pt --data synthetic:20000 --image-size 32 \\
        --out runs/codes
    torchrun --nproc_per_node=2 train.py --model nano --data runs/codes       # stage 2, DDP
    torchrun --nnodes=4 --nproc_per_node=8 --node_rank=$NODE --master_addr=$HOST \\
        --master_port=29500 train.py --model XXL --fsdp --data /data/imagenet256_codes

--model picks the stage: a GPT config name (model.py) trains the transformer on a codes folder, a VQ
config name (tokenizer.py) trains the tokenizer on images. What differs between the stages (the
model, its data, its loss, its validation figure) is a Stage; the rest is one loop for all of them:

  1. the recipe: the flags, resolved once against the stage's defaults (or the resumed checkpoint's)
  2. the stage: its model and data, built from the same seed on every rank
  3. the trainer: device, data parallelism, AdamW, mixed precision, EMA; restored on --resume
  4. the loop: one step of accumulated micro-batches; now and then a log line, validation, a save
"""
import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import signal
import threading
import time
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

import clip
import data
from common import (DTYPES, UserError, check_weights, cli, first_line, load_checkpoint,
                    is_rank0, os_error_line, progress, resolve_precision, save_atomic, say,
                    setup_device, unwrap_state_dict)
from model import GPT, GPT_CONFIGS, RUNTIME_BUFFERS, gpt_config, left_pad_caption
from tokenizer import VQ_CONFIGS, VQLoss, VQModel, psnr, vq_config
from text import T5_CONFIGS, T5Encoder, UnigramTokenizer, clean_caption, t5_config


# ----------------------------------------------------------------------------------------------
# Data: every rank sees its share of the same global batches, whatever the world size
#
# The usual DistributedSampler shuffles per epoch and deals items out to ranks, so what one step
# sees depends on the number of GPUs, and a restart mid-epoch replays or skips data. Here a step
# is a fixed slice of one global stream instead, which is what lets the tests demand equal
# weights from 1 process, 2 DDP ranks, 2 FSDP ranks, gradient accumulation and a kill + resume.

class GlobalBatches(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of (index, item seed) pairs, forever. The data is one stream
    of seeded per-epoch permutations; step s consumes positions [s*B, (s+1)*B). Each item's
    augmentation is seeded by its position in the stream, so a 1-process run, a DDP run and a
    resumed run see the same pictures in the same order (the data position is simply step * B)."""

    def __init__(self, n, batch, accum, rank, world, seed, start_step):
        self.n, self.B, self.accum, self.rank, self.world = n, batch, accum, rank, world
        # check_recipe has made B divisible by accum * world: every rank's micro-batch is whole
        self.seed, self.start_step, self.mb = seed, start_step, batch // (accum * world)

    def __iter__(self):
        perm_epoch, perm = -1, None
        for step in range(self.start_step, 2**62):  # endless: the loop stops at its last step
            for micro in range(self.accum):
                # rank r's micro-batch m of a step is the slice (m * world + r) of its B positions
                start = step * self.B + (micro * self.world + self.rank) * self.mb
                out = []
                for pos in range(start, start + self.mb):
                    epoch, i = divmod(pos, self.n)
                    if epoch != perm_epoch:  # a fresh permutation, seeded by (seed, epoch) only
                        # 7919, a prime: --seed s + 1 meets s's permutations only 7919 epochs on
                        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
                        perm_epoch, perm = epoch, torch.randperm(self.n, generator=g)
                    # the item seed: distinct for every position of every --seed's stream
                    out.append((int(perm[i]), self.seed * 2**40 + pos))
                yield out


class Seeded(torch.utils.data.Dataset):
    """Fetches item `index` with torch's RNG seeded by `seed`: random crops, flips and augmentation
    choices become a pure function of the stream position."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        index, seed = key
        # fork_rng restores the RNG afterwards: with --num-workers 0 the items load in the training
        # process, whose RNG is the dropout RNG, and must not advance it (or 0 and 2 workers differ)
        # Only the CPU generator: torch.manual_seed would also queue a seed for every accelerator,
        # recording a stack trace each time (1 ms an item: a third of a small model's step)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.ds[index]


def split(ds, val_size):
    """(train, val): every (n / val_size)-th item is held out, so validation spans all classes of a
    class-sorted image folder."""
    n = len(ds)
    if n <= val_size:
        raise UserError(f"--data has {n} items, not more than --val-size {val_size}; "
                        "use more data or lower it")
    val = {i * n // val_size for i in range(val_size)}  # evenly spaced; no RNG, no shuffling
    return (torch.utils.data.Subset(ds, [i for i in range(n) if i not in val]),
            torch.utils.data.Subset(ds, sorted(val)))


# ----------------------------------------------------------------------------------------------
# Stages: what is trained, on what, with which loss. The loop below knows nothing else.

class Stage:
    """The one interface between a model and the training loop.

    A new stage (a text-conditional GPT, a contrastive image-text model) is one subclass plus its
    entry in STAGES; the loop is not touched. It sets the class attributes below, builds the
    instance attributes in __init__(recipe, resumed) (`resumed`: the checkpoint being continued, or
    None), and defines `loss` and `val_metric`; the rest has defaults. A contrastive model, say,
    returns its symmetric InfoNCE loss from `loss`, its held-out loss from `val_metric`, and its
    towers' transformer layers as `blocks`; it has no discriminator and its `meta` is {}.
    """
    name: str  # how messages name the stage: "GPT", "tokenizer"
    configs: dict  # the --model names this stage trains
    kind: str  # the checkpoint's "kind", which the stage's from_pretrained checks before loading
    unit: str  # what the throughput counts: "tok" per second, "img" per second
    defaults: dict  # epochs, batch_size, weight_decay unless a flag or the checkpoint sets them
    flags: dict  # the flags only this stage reads -> their value when not given
    val_label: str  # what val_metric measures, with its unit, for the progress line

    model: torch.nn.Module  # the network the loop trains, as built (on the CPU, unwrapped)
    config: object  # its dataclass config, saved as the checkpoint's "config"
    meta: dict  # saved as the checkpoint's "meta": the codes folder's receipt, {} if none
    train_set: torch.utils.data.Dataset  # items are tuples of tensors; batches their collation
    val_set: torch.utils.data.Dataset
    units_per_item: int  # units (see `unit`) per dataset item

    discriminator = None  # a second network trained against the model, with its own AdamW

    @property
    def blocks(self):
        """The model's repeated layers: FSDP shards them one by one, --grad-ckpt recomputes them."""
        return []

    def to(self, device):
        """Moves every network of the stage (the model and any loss networks) to the device."""
        self.model.to(device)
        return self

    def loss(self, model, batch, step):
        """-> (scalar loss to minimise, dict of detached scalars to log). `model` is self.model
        wrapped for data parallelism; `step` counts optimizer steps from 0."""
        raise NotImplementedError

    def val_metric(self, model, batch):
        """-> the validation figure of one batch, a scalar: the loop averages it over items."""
        raise NotImplementedError

    def discriminator_active(self, step):
        """Whether the discriminator trains at this step."""
        return False

    def discriminator_loss(self, discriminator, step):
        """-> (loss, logs) of the discriminator on the last micro-batch that `loss` saw."""
        raise NotImplementedError

    def mfu(self, units_per_second, device):
        """Model FLOPs utilisation of one rank at this throughput, or None where it is not known."""
        return None


class GPTStage(Stage):
    """Stage 2 (paper 2.3): next-token prediction over the codes of each image, its class first."""
    name, configs, kind, unit = "GPT", GPT_CONFIGS, "gpt", "tok"
    # the paper (3.2) and the official autoregressive/train/train_c2i.py agree on these
    defaults = dict(epochs=300, batch_size=256, weight_decay=0.05)
    # None: the config's own dropout (0.1 each); --grad-ckpt recomputes `blocks`
    flags = dict(dropout=None, class_dropout=None, grad_ckpt=False, init_from=None)
    val_label = "validation cross-entropy (nats/token)"

    def __init__(self, recipe, resumed):
        codes = data.codes_dataset(recipe.data)
        # the vocabulary and the grid come from the codes' receipt, never from flags: the GPT must
        # speak the tokens of the tokenizer that made them (hence no --image-size here)
        receipt = codes.receipt
        h, w = receipt.grid
        over = dict(vocab_size=receipt.vocab_size, block_size=h * w,
                    num_classes=receipt.num_classes)
        if recipe.dropout is not None:  # one flag, three rates: the official recipe sets them alike
            over.update(token_dropout_p=recipe.dropout, resid_dropout_p=recipe.dropout,
                        ffn_dropout_p=recipe.dropout)
        if recipe.class_dropout is not None:
            over["class_dropout_prob"] = recipe.class_dropout
        self.config = gpt_config(recipe.model, **over)
        if resumed and resumed["config"].get("caption_dim"):
            raise UserError(f"{checkpoint_path(recipe.out_dir)} is a text-to-image GPT; resume it "
                            "with the --text it was trained with")
        if resumed and resumed["meta"]:  # a GPT only speaks the tokens of the tokenizer it learned
            was = data.CodesReceipt.from_dict(resumed["meta"], checkpoint_path(recipe.out_dir))
            was.check_same_tokenizer(receipt, mine="the checkpoint",
                                     theirs=f"the codes in {recipe.data}")
        self.model, self.meta = GPT(self.config), receipt.to_dict()
        if recipe.init_from and not resumed:
            self.start_from(recipe, receipt)
        self.train_set, self.val_set = split(codes, recipe.val_size)
        self.units_per_item = self.config.block_size

    def start_from(self, recipe, receipt):
        """--init-from: a new run whose GPT begins as another one, as LlamaGen's 512 px stage 2
        begins as its 256 px stage 1. What draws the codes (their embedding, the Llama blocks,
        the final norm and the head) must fit whole: the same --model, on codes of the same
        tokenizer, so that each code means what it meant. The condition (the class table; the
        caption's cap_proj and null caption; a T5 trained along) comes too when it means the
        same (equal class names or text side, or an official file of equal shapes), and starts
        afresh otherwise: a class GPT then hands a text GPT everything but its classes."""
        path = recipe.init_from
        ckpt = load_checkpoint(path)
        if ckpt.get("kind", "gpt") != "gpt":
            raise UserError(f"--init-from {path} is a {ckpt['kind']!r} checkpoint, not a GPT")
        meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
        if meta.get("tokenizer_checksum"):  # official files carry no receipt: shapes must do
            data.CodesReceipt.from_dict(meta, path).check_same_tokenizer(
                receipt, mine=f"--init-from {path}", theirs=f"--data {receipt.data}")
        theirs = {k: v for k, v in unwrap_state_dict(ckpt).items()
                  if not any(b in k for b in RUNTIME_BUFFERS)}
        mine = self.model.state_dict()

        def parts(sd):  # (what draws the codes, the condition)
            cond = {k: v for k, v in sd.items()
                    if k.startswith(("cls_embedding.", "text_encoder."))}
            return {k: v for k, v in sd.items() if k not in cond}, cond
        (body, their_cond), (my_body, my_cond) = parts(theirs), parts(mine)
        check_weights(my_body, body, f"--init-from {path}",
                      f"--init-from takes a GPT of --model {recipe.model} on these codes")
        same = (their_cond.keys() == my_cond.keys()
                and all(their_cond[k].shape == v.shape for k, v in my_cond.items())
                and (not meta or condition_of(meta) == condition_of(self.meta)))
        self.model.load_state_dict({**mine, **body, **(their_cond if same else {})})
        if is_rank0():
            say(f"--init-from {path}: " + ("every weight" if same else "all but the condition "
                "embedding, which starts afresh (another condition)"))

    @property
    def blocks(self):
        """The Llama blocks; the embeddings, the final norm and the head stay in FSDP's root."""
        return self.model.layers

    def loss(self, model, batch, step):
        codes, labels = batch  # teacher forcing: every code is predicted from the ones before it
        return model(codes, labels, targets=codes)[1], {}

    def val_metric(self, model, batch):
        # the same cross-entropy as training, in eval mode (no dropout, no null class): log(vocab)
        # nats knows nothing, and exp(loss) is the perplexity, the codes the model hesitates between
        return self.loss(model, batch, 0)[0]

    def mfu(self, units_per_second, device):
        # the FLOPs a token costs (model.py flops_per_token) x tokens/s, over the GPU's bf16 peak:
        # the share of the hardware's arithmetic the training really uses
        return self.model.estimate_mfu(units_per_second, device)


def condition_of(meta):
    """What a GPT's condition tensors mean, from its checkpoint's meta: its class names, or its
    text side (a jointly-trained T5's words and shape, or the frozen encoder's receipt)."""
    text = meta.get("text")
    if text is None:
        return "class", list(meta.get("classes") or []), meta.get("num_classes")
    if text.get("kind") == "joint":
        return "joint", text["words"], text["length"], text["config"]
    return "frozen", text["receipt"], text["length"], text["width"]


class VQStage(Stage):
    """Stage 1 (paper 2.2): reconstruct images through the quantizer bottleneck; from --disc-start
    on, a PatchGAN discriminator joins with its own optimizer."""
    name, configs, kind, unit = "tokenizer", VQ_CONFIGS, "vq", "img"
    # The paper says AdamW with weight decay 0.05; the official tokenizer/tokenizer_image/
    # vq_train.py that trained the released tokenizer uses Adam without weight decay. We follow the
    # code: AdamW with decay 0 is exactly that Adam.
    defaults = dict(epochs=40, batch_size=128, weight_decay=0.0)
    # the official vq_train.py defaults; None: the VQ config's own value
    flags = dict(image_size=256, disc_start=20000, disc_weight=0.5, perceptual_weight=1.0,
                 lpips=None, codebook_size=None, entropy_loss_ratio=None)
    val_label = "validation PSNR (dB)"
    units_per_item = 1

    def __init__(self, recipe, resumed):
        over = dict(codebook_size=recipe.codebook_size,
                    entropy_loss_ratio=recipe.entropy_loss_ratio)
        self.config = vq_config(recipe.model, **{k: v for k, v in over.items() if v is not None})
        self.model, self.meta = VQModel(self.config), {}
        # one folder read twice: random crops to train on, centre crops to validate on; split
        # holds out the same indices of both, so no validation image is ever trained on
        train = data.image_dataset(recipe.data, recipe.image_size, augment="random_resize_crop")
        val = data.image_dataset(recipe.data, recipe.image_size, augment="center", flip=False)
        self.train_set, _ = split(train, recipe.val_size)
        _, self.val_set = split(val, recipe.val_size)
        self.crit = VQLoss(disc_start=recipe.disc_start, disc_weight=recipe.disc_weight,
                           perceptual_weight=recipe.perceptual_weight, lpips_path=recipe.lpips)
        self.discriminator = self.crit.discriminator
        self._last = None  # (images, reconstructions) of the last micro-batch: D's input

    def to(self, device):
        self.model.to(device)
        self.crit.to(device)  # the discriminator and the frozen LPIPS network
        return self

    def loss(self, model, batch, step):
        images = batch[0]
        recon, codebook_losses = model(images)
        # detached: D's loss must train D alone, and the tokenizer's graph is freed by its own
        # backward before discriminator_loss runs
        self._last = (images, recon.detach())
        # D only scores here; keeping its weights out of this graph keeps DDP's gradient hooks quiet
        self.discriminator.requires_grad_(False)
        loss, logs = self.crit.generator_loss(images, recon, codebook_losses, step)
        self.discriminator.requires_grad_(True)
        return loss, logs

    def val_metric(self, model, batch):
        # PSNR rather than the training loss: the loss mixes terms that change weight at
        # --disc-start, PSNR means the same at every step (and is what paper Table 2 reports)
        images = batch[0]
        return psnr(model(images)[0].clamp(-1, 1), images).mean()

    def discriminator_active(self, step):
        # before --disc-start the official recipe multiplies D's loss by zero: skipping is the same
        return self.crit.gan_active(step)

    def discriminator_loss(self, discriminator, step):
        images, recon = self._last
        return self.crit.discriminator_loss(images, recon, step, discriminator=discriminator)


class ClipStage(Stage):
    """CLIP (Radford et al. 2021) on the built-in captioned world (scenes.py): the image and text
    towers learn one embedding space by symmetric InfoNCE over the global batch, with a learned
    temperature (clip.py explains both). It is the re-ranker and scorer of sample.py and fid.py.
    The captions' vocabulary is closed, so the tokenizer is BPE learnt on it (clip.Tokenizer.
    from_words), carried in the checkpoint's meta: a resumed run keeps the tokens it learnt."""
    # the small configs only: the released ViT-B/32 and L/14 are loaded, never trained here
    name, kind, unit = "CLIP", "clip", "img"
    configs = {k: v for k, v in clip.CLIP_CONFIGS.items() if k.startswith("CLIP-")}
    # the CLIP paper's weight decay 0.2 and a peak rate for a small batch (its 5e-4 was at 32k);
    # an lr here, not scaled with the batch as the other stages' 1e-4 rule
    defaults = dict(epochs=30, batch_size=128, weight_decay=0.2, lr=1e-3)
    flags = dict(with_heldout=False)
    val_label = "validation accuracy of an image picking its caption among 10"
    units_per_item = 1

    def __init__(self, recipe, resumed):
        import scenes
        spec, _, n = str(recipe.data).partition(":")
        if spec != "scenes" or not (n == "" or n.isdigit() and int(n) > 0):
            raise UserError(f"--data {recipe.data!r}: CLIP trains on the built-in captioned world, "
                            "scenes[:N] (N scenes, default 20000)")
        if recipe.fsdp:  # the released checkpoints store logit_scale as a 0-d tensor
            raise UserError("--fsdp cannot shard CLIP's scalar logit_scale (FSDP2 refuses 0-d "
                            "parameters); CLIP-tiny fits any device: drop --fsdp to train with DDP")
        merges = resumed["meta"]["bpe_merges"] if resumed else None
        self.tokenizer = (clip.Tokenizer.from_merges([tuple(m) for m in merges]) if merges else
                          clip.Tokenizer.from_words(scenes.VOCABULARY))
        # the table has exactly the tokenizer's ids; <|endoftext|> is the last, where pooling reads
        self.config = clip.clip_config(recipe.model, vocab_size=len(self.tokenizer.encoder))
        self.model = clip.CLIP(self.config)
        self.meta = {"bpe_merges": [list(m) for m in self.tokenizer.merges], "data": recipe.data}
        # without held-out pairs by default, as the text-to-image GPT: re-ranking a held-out prompt
        # then tests whether CLIP, too, composes colour and shape; no flips or crops, which would
        # falsify "on the left" and "at the top" in the captions
        world = scenes.CaptionedScenes(int(n or 20000), self.config.image_size, seed=recipe.seed,
                                       heldout=not recipe.with_heldout)
        items = clip.TokenizedCaptions(world, self.tokenizer, self.config.context_length)
        self.train_set, self.val_set = split(items, recipe.val_size)

    @property
    def blocks(self):
        return [*self.model.vision_model.encoder.layers, *self.model.text_model.encoder.layers]

    def loss(self, model, batch, step):
        images, ids = batch
        image, text, scale = model(images, ids, return_embeddings=True)
        # every rank's loss is the global batch's: its pairs meet the negatives of all ranks
        loss = clip.distributed_contrastive_loss(image, text, scale)
        # the logged temperature is the one the loss used: it caps the scale at 100 as well
        return loss, {"temperature": scale.detach().float().exp().clamp(max=100)}

    def val_metric(self, model, batch):
        # retrieval among 10, a figure that does not move with the batch size as the loss does
        # (chance ln B); local to this rank, whose share of validation batches may differ
        images, ids = batch
        image, text, _ = model(images, ids, return_embeddings=True)
        return clip.retrieval_accuracy(image, text, ids, group=10)



# ----------------------------------------------------------------------------------------------
# The text-to-image GPT (paper 3.3): the same next-token loss, a caption prefix instead of a class
#
# Two ways to turn a caption into the prefix's features:
#   --text FEATURES_DIR  frozen features, computed once by `data.py features` (FLAN-T5-XL for the
#       paper), the LlamaGen recipe. A 1.2B encoder trained on the C4 web corpus knows far more
#       language than any caption set teaches, costs nothing to train, and its outputs can be
#       stored like the image codes (paper 3.3).
#   --text t5-nano       a small T5 (text.T5_CONFIGS) learnt together with the GPT from the
#       captions, as DALL-E learns its text embeddings jointly. Right for a tiny closed world such
#       as scenes.py's: 35 words and one grammar, which the captions themselves cover completely,
#       so there is nothing for a pretrained encoder to add, and no pretrained encoder on a CPU
#       with no network. At scale it is the wrong trade: the GPT would have to learn language from
#       short machine-written captions alone.

def caption_texts(folder):
    """The captions of a codes folder, item by item (data.read_captions: a caption, or a list of
    them of which one is drawn per access)."""
    return data.read_captions(folder)[0]


def caption_features(folder):
    """The frozen text features of a --text folder: a dataset whose item i is (features float32
    [N, d] right-padded as T5 returns them, mask bool [N]) for codes item i, with a .receipt of
    the encoder that made them (data.py features)."""
    if not hasattr(data, "CaptionFeatures"):
        raise UserError(f"--text {folder}: this data.py cannot read caption features yet; pass a "
                        f"T5 config name ({', '.join(T5_CONFIGS)}) to train a text encoder too")
    return data.CaptionFeatures(folder)


def receipt_dict(receipt):
    """A features receipt as a plain dict (what a checkpoint can hold)."""
    if isinstance(receipt, dict):
        return dict(receipt)
    if dataclasses.is_dataclass(receipt):
        return dataclasses.asdict(receipt)
    return dict(receipt.to_dict())


def caption_vocabulary(texts):
    """The words of a jointly-trained tokenizer: the built-in world's vocabulary (scenes.py), then
    every other word of the training captions, in sorted order: the same list for the same data."""
    from scenes import VOCABULARY
    seen = {w for t in texts for c in ([t] if isinstance(t, str) else t)
            for w in clean_caption(c).split()}
    return list(VOCABULARY) + sorted(seen - set(VOCABULARY))


class CaptionedCodes(torch.utils.data.Dataset):
    """Codes with their captions: item -> (codes int64 [L], caption, mask bool [N], valid).

    The caption is token ids int64 [N] (joint training: a tokenizer is given) or frozen features
    float32 [N, d]; both right-padded as T5 reads and writes them, the model side moves them to
    the left (left_pad_caption). valid (float32) weighs the item's loss as the official trainer's
    flag does (0 for an image it could not read); every item here has its codes, so it is 1."""

    def __init__(self, codes, texts=None, tokenizer=None, length=120, features=None):
        self.codes, self.texts, self.tokenizer = codes, texts, tokenizer
        self.length, self.features = length, features
        # caption -> (ids, mask), made once: cleaning and tokenizing take ~0.2 ms a caption, 8% of
        # a GPT-pico step at batch 64 (the test's). At most 2^14 kept (17 MB at N = 120): all of
        # the built-in world's captions, a few of COCO's 600k, which then cost as before
        self.memo = {}

    def __len__(self):
        return len(self.codes)

    def __getitem__(self, index):
        codes = self.codes[index][0]
        if self.features is not None:
            feats, mask = self.features[index]
            caption, mask = torch.as_tensor(feats, dtype=torch.float32), torch.as_tensor(mask)
        else:
            text = self.texts[index]
            if not isinstance(text, str):  # several captions: one per access (Seeded's RNG)
                text = text[int(torch.randint(len(text), ()))]
            row = self.memo.get(text)
            if row is None:
                ids, mask = self.tokenizer(clean_caption(text), self.length)
                row = ids[0], mask[0]
                if len(self.memo) < 1 << 14:
                    self.memo[text] = row
            caption, mask = row
        return codes, caption, mask.bool(), torch.tensor(1.0)


class JointT2I(GPT):
    """The text-conditional GPT with its own T5 encoder inside, trained together. forward takes
    token ids (B, N) and their right-padded mask where GPT.forward takes features: T5 reads the
    ids, its output is left-padded, and from there on it is GPT.forward. One module, so DDP and
    FSDP see every weight in one forward; the GPT's keys keep their names and the encoder's sit
    under text_encoder., which GPT.from_pretrained skips (sample.py loads them for the T5)."""

    def __init__(self, config, text_config):
        super().__init__(config)  # GPT's N(0, 0.02) init runs before the encoder exists ...
        self.text_encoder = T5Encoder(text_config)  # ... which keeps T5's own

    def forward(self, idx, ids, targets=None, cond_mask=None, valid=None):
        """-> GPT.forward's (logits, loss), with T5 inside the graph: the GPT's next-token loss
        is the encoder's objective too, the one loss of joint training."""
        features, mask = left_pad_caption(self.text_encoder(ids, cond_mask), cond_mask)
        return super().forward(idx, features, targets, mask, valid)

    def flops_per_token(self):
        """GPT.flops_per_token, with the encoder counted once per caption token, not per code."""
        t5 = sum(p.numel() for p in self.text_encoder.parameters())
        t5 -= self.text_encoder.shared.weight.numel()  # a lookup, no matmul
        per_code = self.config.cls_token_num / self.config.block_size
        return GPT.flops_per_token(self) - 6 * t5 + 6 * t5 * per_code


class T2IStage(GPTStage):
    """Paper 3.3: next-token prediction of the codes after a caption prefix. With probability 0.1
    (--class-dropout, the official rate) the whole caption becomes the null caption, so that
    classifier-free guidance can sample at cfg 7.5 (the official picture setting)."""
    name = "text-to-image GPT"
    flags = dict(GPTStage.flags, text=None, caption_len=None)

    def __init__(self, recipe, resumed):
        codes = data.codes_dataset(recipe.data)
        receipt = codes.receipt
        if receipt.n_aug != 1:  # a folder extracted before captioned images had one view
            raise UserError(f"{recipe.data} holds {receipt.n_aug} views per captioned image; "
                            "mirror views contradict their captions' left and right: extract "
                            "the codes again (python data.py extract ... --overwrite)")
        h, w = receipt.grid
        # no num_classes: the caption prefix takes the class token's place (cls_token_num = N)
        over = dict(vocab_size=receipt.vocab_size, block_size=h * w)
        if recipe.dropout is not None:
            over.update(token_dropout_p=recipe.dropout, resid_dropout_p=recipe.dropout,
                        ffn_dropout_p=recipe.dropout)
        if recipe.class_dropout is not None:
            over["class_dropout_prob"] = recipe.class_dropout
        # the resumed run's text side: _joint keeps its words and length, _frozen refuses other
        # features, since the GPT's prefix must go on meaning what it meant
        was = resumed["meta"].get("text") if resumed else None
        if recipe.text in T5_CONFIGS:
            self._joint(recipe, codes, over, was)
        else:
            self._frozen(recipe, codes, over, was)
        if resumed:
            old = data.CodesReceipt.from_dict(resumed["meta"], checkpoint_path(recipe.out_dir))
            old.check_same_tokenizer(receipt, mine="the checkpoint",
                                     theirs=f"the codes in {recipe.data}")
        self.meta = {**receipt.to_dict(), "text": self.text_meta}
        if recipe.init_from and not resumed:
            self.start_from(recipe, receipt)
        self.train_set, self.val_set = split(self.dataset, recipe.val_size)
        self.units_per_item = self.config.block_size

    def _joint(self, recipe, codes, over, was):
        """--text <T5 config>: the tokenizer's words from the captions, a T5 of that config."""
        texts = caption_texts(recipe.data)
        if len(texts) != len(codes):
            raise UserError(f"{recipe.data}: {len(texts)} captions for {len(codes)} images; "
                            "extract the codes again")
        if was is not None and (was.get("kind"), was.get("encoder")) != ("joint", recipe.text):
            raise UserError(f"the checkpoint's text encoder is {was.get('encoder')!r}, not "
                            f"--text {recipe.text}; resume with the --text it was trained with")
        # a resumed run keeps its words: token ids must mean what they meant
        words = was["words"] if was else caption_vocabulary(texts)
        length = recipe.caption_len or (was["length"] if was else 120)  # N = 120 (paper 3.3)
        if length < 2:
            raise UserError(f"--caption-len {length}: a caption needs at least 2 tokens (a word "
                            "and </s>)")
        if was and length != was["length"]:
            raise UserError(f"--caption-len {length} differs from the checkpoint's "
                            f"{was['length']}; a resumed run keeps it")
        tokenizer = UnigramTokenizer.from_words(words)
        t5 = dict(vocab_size=len(tokenizer))
        if recipe.dropout is not None:  # --dropout 0 switches every dropout off, T5's too
            t5["dropout_rate"] = recipe.dropout
        text_config = t5_config(recipe.text, **t5)
        self.config = gpt_config(recipe.model, caption_dim=text_config.d_model,
                                 cls_token_num=length, **over)
        self.model = JointT2I(self.config, text_config)
        self.dataset = CaptionedCodes(codes, texts, tokenizer, length)
        self.text_meta = dict(kind="joint", encoder=recipe.text, length=length, words=words,
                              config=dataclasses.asdict(text_config))

    def _frozen(self, recipe, codes, over, was):
        """--text <features folder>: the GPT alone, on features of a frozen encoder."""
        if recipe.caption_len is not None:
            raise UserError("--caption-len applies when a text encoder is trained (--text "
                            f"{'/'.join(T5_CONFIGS)}); frozen features keep their own length")
        feats = caption_features(recipe.text)
        if len(feats) != len(codes):
            raise UserError(f"--text {recipe.text} holds features of {len(feats)} captions, "
                            f"--data {recipe.data} {len(codes)} images: make both from one "
                            "dataset")
        first, _ = feats[0]
        length, width = first.shape
        receipt = receipt_dict(feats.receipt)
        if was is not None and was.get("receipt") != receipt:
            raise UserError(f"--text {recipe.text} holds features of another text encoder than "
                            "the checkpoint was trained on; resume with the same features")
        self.config = gpt_config(recipe.model, caption_dim=int(width), cls_token_num=int(length),
                                 **over)
        self.model = GPT(self.config)
        self.dataset = CaptionedCodes(codes, length=length, features=feats)
        self.text_meta = dict(kind="frozen", features=os.path.abspath(recipe.text),
                              length=int(length), width=int(width), receipt=receipt)

    # blocks: the GPT's layers only (GPTStage's). T5's blocks stay in the root FSDP unit: its
    # forward reads block 0's relative-position table before block 0 runs, when a block of its
    # own would still be sharded.

    def loss(self, model, batch, step):
        codes, caption, mask, valid = batch
        if not caption.is_floating_point():  # token ids: the joint model encodes them itself
            return model(codes, caption, targets=codes, cond_mask=mask, valid=valid)[1], {}
        # frozen features come right-padded (T5's layout); the prefix wants them on the left
        features, mask = left_pad_caption(caption, mask)
        return model(codes, features, targets=codes, cond_mask=mask, valid=valid)[1], {}


STAGES = [GPTStage, VQStage, ClipStage, T2IStage]


def stage_for(model, text=None):
    """The Stage class whose configs hold --model; a GPT with --text is the text-to-image stage."""
    if text is not None and model in T2IStage.configs:
        return T2IStage
    for stage in STAGES:
        if model in stage.configs:
            return stage
    known = "; ".join(f"{s.name} configs: {', '.join(s.configs)}" for s in STAGES)
    raise UserError(f"unknown --model {model!r}; {known}")


# ----------------------------------------------------------------------------------------------
# The recipe: flags, resolved once into the namespace the whole run reads (and the checkpoint saves)

def get_args(argv=None):
    """The command line. Flags shared by every stage come first; each stage's own flags are in
    their own group and default to None, so that resolve_recipe can tell "not given" (take the
    stage's default, or the resumed checkpoint's value) from a value typed on purpose."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", required=True,
      help=f"GPT config {list(GPT_CONFIGS)} or tokenizer config {list(VQ_CONFIGS)}")
    a("--data", required=True,
      help="GPT: a codes folder from `data.py extract` (or several of the same images, "
      "comma-separated, mixed per item: the official 1.1 and 1.05 ten crops). Tokenizer: an image "
      "folder (class sub-folders) or synthetic[:N], the embedded dataset of N images")
    a("--out-dir", default=None, help="where ckpt.pt and log.jsonl go (default runs/<model>); "
      "one that already holds a ckpt.pt needs --resume or --overwrite")
    a("--resume", action="store_true",
      help="continue from <out-dir>/ckpt.pt exactly where it stopped (its model, stage and "
      "recipe); log.jsonl drops any lines logged after that checkpoint")
    a("--overwrite", action="store_true",
      help="start afresh in an --out-dir that holds a run: its ckpt.pt, ckpt_<step>.pt and "
      "log.jsonl are replaced when the new run saves its first checkpoint, not before")
    a("--epochs", type=float, default=None,
      help="passes over the data, > 0 (default: GPT 300, tokenizer 40)")
    a("--max-steps", type=int, default=None, help="optimizer steps, >= 1; overrides --epochs")
    a("--batch-size", type=int, default=None, help="GLOBAL batch: per step, over all ranks and "
      "accumulation (default: GPT 256, tokenizer 128)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step on each rank")
    a("--lr", type=float, default=None, help="peak learning rate (default: 1e-4 at the default "
      "batch size, scaled linearly with --batch-size)")
    a("--lr-schedule", choices=["constant", "cosine"], default="constant",
      help="constant as in the paper")
    a("--warmup-steps", type=int, default=0, help="linear warmup steps")
    a("--weight-decay", type=float, default=None, help="AdamW weight decay, on >=2-D weights only "
      "(default: GPT 0.05, tokenizer 0)")
    a("--grad-clip", type=float, default=1.0, help="global grad-norm clip (0 = off)")
    a("--fsdp", action="store_true", help="shard parameters, grads and optimizer state (FSDP2)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--ema", type=float, default=0.0,
      help="keep an EMA of the weights with this decay in [0, 1), e.g. 0.9999 (0 = none)")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
      help="autocast dtype (auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU/MPS)"
      "; fp16 needs CUDA, where its loss scaling runs; bf16 trains a GPT 1.6x faster on CPUs with "
      "avx512_bf16 or AMX")
    a("--val-size", type=int, default=256,
      help="items held out for validation: every (N / val-size)-th of --data")
    a("--log-interval", type=int, default=10, help="steps per log.jsonl line, which holds their "
      "mean losses (the loss is read back only then: a read every step would make the GPU wait)")
    a("--eval-interval", type=int, default=500, help="steps between validation passes")
    a("--ckpt-interval", type=int, default=1000, help="steps between checkpoints")
    a("--keep-ckpts", action="store_true", help="also keep a ckpt_<step>.pt at every checkpoint")
    a("--num-workers", type=int, default=2,
      help="data-loading processes per rank (0: load in the training process)")
    a("--seed", type=int, default=0,
      help="global seed; rank r seeds its dropout with seed * world + r")
    a("--device", default="auto", help="cuda, mps or cpu (default: the best available)")
    add_stage_flags(a)
    add_clip_flags(p)
    add_text_flags(p)
    args = p.parse_args(argv)
    # which flags were typed: a resumed run takes every other one from its checkpoint, so that a
    # restart without --max-steps does not turn into today's default of 300 epochs
    for action in p._actions:
        action.default = argparse.SUPPRESS
    args.typed = set(vars(p.parse_args(argv)))
    return args


def add_stage_flags(a):
    """Flags of one stage only. Their argparse default is None, so that "given" shows and another
    stage's run can refuse them; resolve_recipe fills in the defaults these help texts name."""
    vq = VQStage.flags
    a("--dropout", type=float, default=None,
      help="GPT: token/residual/FFN dropout in [0, 1) (default 0.1)")
    a("--class-dropout", type=float, default=None,
      help="GPT: probability in [0, 1) of the null class, for CFG (default 0.1)")
    a("--grad-ckpt", action="store_true", default=None,
      help="GPT: activation checkpointing, recompute each block in the backward pass")
    a("--image-size", type=int, default=None, help="tokenizer: training resolution in pixels, a "
      f"multiple of the config's downsampling (16 for VQ-16) (default {vq['image_size']})")
    a("--disc-start", type=int, default=None, help="tokenizer: the first step (counting from 1) "
      f"with the PatchGAN loss (default {vq['disc_start']})")
    a("--disc-weight", type=float, default=None,
      help=f"tokenizer: weight of the generator's GAN loss (default {vq['disc_weight']})")
    a("--perceptual-weight", type=float, default=None,
      help=f"tokenizer: LPIPS weight, 0 = off (default {vq['perceptual_weight']})")
    a("--lpips", default=None, help="tokenizer: folder with vgg16-397923af.pth and LPIPS vgg.pth")
    a("--codebook-size", type=int, default=None,
      help="tokenizer: codes in the codebook (default: the config's)")
    a("--entropy-loss-ratio", type=float, default=None, help="tokenizer: weight of the entropy "
      "loss that spreads use over the codebook (default 0, the paper's)")
    a("--init-from", default=None, metavar="GPT.pt", help="GPT: start from another GPT's "
      "weights (ours or official) instead of random ones: its code embedding, blocks and head, "
      "which must fit --model and come from the same tokenizer's codes, and its class or caption "
      "embedding when that means the same (else it starts afresh: a class GPT can start a text "
      "GPT); a resumed run keeps its own")


def add_clip_flags(p):
    """The CLIP stage's flags, in their own group (default None, as add_stage_flags says why)."""
    g = p.add_argument_group("CLIP (--model CLIP-tiny --data scenes[:N], the built-in captioned "
                             "world; defaults batch 128, lr 1e-3, weight decay 0.2; a short "
                             "--warmup-steps, e.g. 20, spares the towers a slow start)")
    g.add_argument("--with-heldout", action="store_true", default=None,
                   help="CLIP: also train on the held-out colour-shape pairs (default: never "
                   "shown, as to the text-to-image GPT)")


def add_text_flags(p):
    """The text-to-image GPT's flags: --text makes a GPT --model caption-conditional."""
    g = p.add_argument_group("text-to-image", "a GPT conditioned on captions (paper 3.3): --data "
                             "is a codes folder holding captions.json")
    g.add_argument("--text", default=None, metavar="FEATURES_DIR|T5_CONFIG", help="a folder of "
                   "frozen caption features from `data.py features` (LlamaGen's recipe: "
                   "FLAN-T5-XL), or a T5 config name to train that encoder with the GPT from the "
                   f"captions ({', '.join(T5_CONFIGS)}; t5-nano for the built-in world)")
    g.add_argument("--caption-len", type=int, default=None, help="with a T5 config: caption "
                   "tokens N, the prefix length (default 120, the paper's); longer captions are "
                   "cut, </s> kept")


def refuse_other_stages_flags(args, stage):
    """One policy for every flag: one that the chosen stage would not read is refused, never
    silently ignored (as data.py refuses --crop-range without --ten-crop)."""
    for other in STAGES:
        for flag in other.flags:
            if flag not in stage.flags and getattr(args, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')} only applies to the {other.name} "
                                f"stage; --model {args.model} trains the {stage.name}: drop it")


def checkpoint_path(out_dir):
    """<out-dir>/ckpt.pt, the run's one live checkpoint: --resume continues it, sample.py loads
    it, and every save replaces it whole (ckpt_<step>.pt copies only with --keep-ckpts)."""
    return os.path.join(out_dir, "ckpt.pt")


def checkpoint_to_resume(path, resume, overwrite, stage, model):
    """The checkpoint --resume continues, or None; never a silent restart over an old run."""
    if resume and overwrite:
        raise UserError("--resume continues the run in --out-dir and --overwrite replaces it: "
                        "pass one of them")
    if resume and not os.path.exists(path):
        raise UserError(f"--resume: no checkpoint at {path}; drop --resume to start a new run")
    if not resume and not overwrite and os.path.exists(path):
        raise UserError(f"{path} exists; pass --resume to continue it or --overwrite to replace "
                        "it with a new run, or choose another --out-dir")
    if not resume:
        return None
    ckpt = load_checkpoint(path)
    check_resumable(ckpt, path, stage, model)
    return ckpt


def check_resumable(ckpt, path, stage, model):
    """What --resume needs: a checkpoint that train.py wrote, of this stage and --model, with the
    optimizer state and the recipe to continue from. Anything else is named, with the way out."""
    if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        raise UserError(f"--resume: {path} is a bare state dict (weights only), not a checkpoint "
                        "of train.py: it has no optimizer state or recipe to continue; sampling "
                        "can load it, training needs a new --out-dir")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("args"), dict):
        raise UserError(f"--resume: {path} is not a checkpoint of train.py (no recipe under "
                        "'args'; an official or exported file holds weights only); start a new "
                        "run in another --out-dir")
    saved = ckpt["args"].get("model")
    if ckpt.get("kind") != stage.kind:
        other = next((s.name for s in STAGES if s.kind == ckpt.get("kind")), ckpt.get("kind"))
        raise UserError(f"--resume: {path} is a {other} checkpoint (--model {saved}), and --model "
                        f"{model} trains the {stage.name}: pass --model {saved} or another "
                        "--out-dir")
    if saved != model:
        raise UserError(f"--resume: {path} is a checkpoint of --model {saved}, not {model}: pass "
                        f"--model {saved} to continue it, or another --out-dir")
    # the optimizer state: without AdamW's moments a resumed run is not the run continued
    needed = ["model", "optimizer", "step", "config", "rng"]
    needed += ["discriminator", "optimizer_disc"] if stage.discriminator is not None else []
    for key in needed:
        # an empty AdamW state comes only from a hand-made file: get_state_dict (Trainer.save)
        # fills in zero moments for every weight, even those that have not stepped yet
        if key not in ckpt or (key.startswith("optimizer") and not ckpt[key].get("state")):
            raise UserError(f"--resume: {path} has no {key!r} state (a file of train.py always "
                            "has); it cannot continue a run: start a new one in another "
                            "--out-dir")


def resolve_recipe(args, stage, out_dir, ckpt, world, device):
    """The flags with every default filled in: the run reads only this, nothing rewrites it, and
    the checkpoint saves it as "args". A resumed run keeps its own recipe (unset flags come from the
    checkpoint, not from today's defaults); a fresh one takes its stage's defaults."""
    saved = ckpt["args"] if ckpt else {}
    # the data position is step * batch, the optimizer state keeps its decay, and the run began
    # from the weights it began from: none of them changes
    for name in ("batch_size", "weight_decay", "init_from"):
        given = getattr(args, name)
        if saved and given is not None and given != saved.get(name):
            raise UserError(f"--{name.replace('_', '-')} {given} differs from the checkpoint's "
                            f"{saved.get(name)}: a resumed run keeps it; start a new --out-dir to "
                            "change it")
    recipe = dict(vars(args))
    # a Namespace built without get_args has no `typed`: every flag then counts as given
    typed = recipe.pop("typed", set(recipe))
    for name, value in saved.items():  # resumed: what was not typed now, the run decided then
        if name in recipe and name not in typed and name not in PER_INVOCATION:
            recipe[name] = value
    for other in STAGES:  # every flag keeps a value, as the checkpoints have always listed them
        recipe.update({k: v for k, v in other.flags.items() if recipe[k] is None})
    for name, value in stage.defaults.items():
        if recipe[name] is None:
            recipe[name] = value if saved.get(name) is None else saved[name]
    # the official rule: 1e-4 per 256 images (GPT) or 128 (tokenizer), linear in the batch, as
    # the gradient's noise falls with its size (Goyal et al. 2017); XL used 2e-4 at 256
    if recipe["lr"] is None:
        recipe["lr"] = saved.get("lr") or 1e-4 * recipe["batch_size"] / stage.defaults["batch_size"]
    recipe["out_dir"], recipe["precision"] = out_dir, resolve_precision(args.precision, device)[0]
    recipe = argparse.Namespace(**recipe)
    check_recipe(recipe, world, stage, device)
    return recipe


# Flags that describe this invocation rather than the run: a resumed run may change them freely.
PER_INVOCATION = {"resume", "overwrite", "out_dir", "device", "num_workers", "precision",
                  "compile"}


# flag -> (the values it may take, how messages say so). A float must also be finite: a nan
# compares False with everything and would slip through any range.
RANGES = {
    **{k: (lambda v: v >= 1, "at least 1") for k in (
        "max_steps", "batch_size", "grad_accum", "val_size", "log_interval", "eval_interval",
        "ckpt_interval", "codebook_size")},
    **{k: (lambda v: v >= 0, "at least 0") for k in (
        "warmup_steps", "num_workers", "disc_start", "weight_decay", "grad_clip", "disc_weight",
        "perceptual_weight", "entropy_loss_ratio")},
    **{k: (lambda v: v > 0, "> 0") for k in ("epochs", "lr")},
    **{k: (lambda v: 0 <= v < 1, "in [0, 1)") for k in ("ema", "dropout", "class_dropout")},
}


def check_recipe(r, world, stage=None, device="cpu"):
    """Numbers the loop could not honour, each refused with the flag it came from and its range."""
    for name, (ok, rule) in RANGES.items():
        value = getattr(r, name)  # None: not set (--max-steps: --epochs decides)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {value:g}")
    if stage is VQStage:  # the encoder halves the image len(ch_mult) - 1 times, to whole codes
        down = vq_config(r.model).downsample
        if r.image_size < down or r.image_size % down:
            near = sorted({max(1, r.image_size // down) * down, -(-r.image_size // down) * down})
            raise UserError(f"--image-size {r.image_size} is not a multiple of {r.model}'s "
                            f"downsampling factor {down}: use {' or '.join(map(str, near))}")
    # without CUDA, torch's GradScaler turns itself off: fp16 gradients would underflow unscaled
    if r.precision == "fp16" and not str(device).startswith("cuda"):
        raise UserError(f"--precision fp16 needs a CUDA GPU, where its loss scaling runs; on "
                        f"{device} use --precision fp32 or bf16")
    # each rank's micro-batch holds batch / (world x accum) items: the split must be even, or
    # the ranks' items would weigh differently in the averaged gradient
    if r.batch_size % (world * r.grad_accum):
        raise UserError(f"--batch-size {r.batch_size} is not divisible by world size {world} x "
                        f"--grad-accum {r.grad_accum}; pick a multiple of {world * r.grad_accum}")
    # the EMA averages whole tensors on one rank; under FSDP each rank holds only shards of them
    if r.fsdp and r.ema:
        raise UserError("--ema with --fsdp is not supported (nor in the official FSDP recipe); "
                        "drop one")


def lr_at(step, r, total):
    """Linear warmup to --lr, then constant or a cosine decay to 0. The paper trains at a
    constant rate (3.2), so that a run can be extended without a schedule to re-plan; the cosine
    suits short runs such as the demo's, whose last steps at a low rate polish the weights."""
    if step < r.warmup_steps:
        return r.lr * (step + 1) / r.warmup_steps
    if r.lr_schedule == "cosine":
        t = (step - r.warmup_steps) / max(1, total - r.warmup_steps)
        return 0.5 * r.lr * (1 + math.cos(math.pi * min(1.0, t)))
    return r.lr


# ----------------------------------------------------------------------------------------------
# The trainer: the stage's networks on this rank, made ready to train

def world_size():
    """torchrun sets RANK and WORLD_SIZE (and LOCAL_RANK, the GPU that setup_device picks); a plain
    `python train.py` is a world of one."""
    return int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else 1


def setup_distributed(device):
    """This process's rank, once it has joined the others (after every flag is checked, so that bad
    input stops each rank alike, before any of them waits for the rest)."""
    if "RANK" not in os.environ:
        return 0
    # NCCL between GPUs; gloo between CPU processes (the tests run two ranks on one CPU)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return int(os.environ["RANK"])


def configure_optimizers(module, weight_decay, learning_rate, betas, device_type):
    """AdamW, the one recipe for the GPT, the tokenizer and its discriminator. Weight decay pulls
    matrices, convolution kernels and embeddings (>= 2-D) towards 0, never biases or norm gains
    (1-D), whose scale is not a capacity to limit (autoregressive/train/train_c2i.py, as in
    nanoGPT). On CUDA the fused kernel updates every parameter in one launch."""
    params = [p for p in module.parameters() if p.requires_grad]  # frozen weights get no state
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                             **({"fused": True} if fused else {}))


def wrap(module, blocks, fsdp, dtype, device, world):
    """Data parallelism. DDP keeps a full replica per rank and all-reduces gradients; FSDP shards
    parameters, gradients and optimizer state over ranks and gathers one block's weights at a
    time, which is what lets 1.4B-3B models train (paper 2.4)."""
    if world == 1 and not fsdp:  # one process: its gradients already are the global batch's
        return module
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # bf16 weights in the forward, gradients reduced in fp32; other precisions as they are
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if dtype == torch.bfloat16 else MixedPrecisionPolicy()
        # the blocks first, then the root: each block's weights are gathered just before its
        # forward (and again for its backward) and freed after, so one block at a time is whole
        for block in blocks:
            fully_shard(block, mp_policy=mp)
        return fully_shard(module, mp_policy=mp)
    # DDP all-reduces gradients in buckets while the backward pass is still running, so the
    # communication mostly hides behind computation
    return DDP(module, device_ids=[device] if device.startswith("cuda") else None)


def gradient_sync(module, last):
    """DDP all-reduces gradients in every backward; with accumulation only the last one needs to.
    FSDP is left to reduce-scatter every micro-batch: skipping it would keep whole, unsharded
    gradients between micro-batches, the very memory FSDP exists to save."""
    return contextlib.nullcontext() if last or not isinstance(module, DDP) else module.no_sync()


class LogWindow:
    """Logged scalars summed on the device since the last log line. Reading one back would make the
    CPU wait for the GPU, so they are read only once per line, averaged over ranks."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, logs, weight=1.0):
        """`weight`: the micro-batch's share of its step (1 / accum), so the window's mean is one
        over steps; an fp16 step the scaler skips adds its grad norm with weight 0."""
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float() * weight
            self.counts[k] = self.counts.get(k, 0.0) + weight

    def read(self, world):
        # the same order on every rank (the all-reduce pairs tensors by position), loss first
        keys = sorted(self.sums, key=lambda k: (k != "loss", k))
        means = torch.stack([self.sums[k] / self.counts[k] for k in keys])
        if world > 1:
            dist.all_reduce(means, op=dist.ReduceOp.AVG)
        self.sums.clear()
        self.counts.clear()
        return dict(zip(keys, means.tolist()))


class Trainer:
    """The stage's networks on this rank's device, wrapped for data parallelism, with their AdamW,
    the loss scaler and the EMA; then a step, validation and a checkpoint of them."""

    def __init__(self, stage, recipe, device, rank, world):
        self.stage, self.recipe, self.device = stage, recipe, device
        self.rank, self.world = rank, world
        self.dtype = DTYPES[recipe.precision]
        # fp16 has 5 exponent bits: gradients under 6e-8 flush to zero. The scaler multiplies the
        # loss by a large factor before backward, divides the gradients by it before the step, and
        # skips a step whose gradients overflowed (then halves the factor). bf16 has fp32's
        # exponent range and needs none of it: the scaler is off, every call a no-op.
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == torch.float16)
        # raw: the bare module, before compile and wrapping: the EMA and restore's checks read it
        self.raw = stage.to(device).model
        # --grad-ckpt keeps only each block's input and recomputes the block in backward: the
        # activations of one block instead of all, for about one more forward pass of compute
        if recipe.grad_ckpt:
            for block in stage.blocks:
                block.forward = partial(torch.utils.checkpoint.checkpoint, block.forward,
                                        use_reentrant=False)
        # taken before compile and wrapping, which prefix the names (_orig_mod., module.)
        self.names = [n for n, _ in self.raw.named_parameters()]
        self.ema = None  # float32 copies: a bf16 average would round away updates of 1e-4
        if recipe.ema:
            self.ema = [p.detach().clone().float() for p in self.raw.parameters()]
        # compile inside the wrapper: DDP's and FSDP's hooks stay outside the compiled graph
        compiled = torch.compile(self.raw) if recipe.compile else self.raw
        self.model = wrap(compiled, stage.blocks, recipe.fsdp, self.dtype, device, world)
        # beta2 0.95 rather than Adam's 0.999: the second moment forgets old gradient scales
        # faster, which steadies large transformers (GPT-3, Llama, and the paper's recipe)
        adamw = partial(configure_optimizers, weight_decay=recipe.weight_decay,
                        learning_rate=recipe.lr, betas=(0.9, 0.95), device_type=self.device_type)
        self.opt = adamw(self.model)  # the wrapper's parameters: FSDP's are the shards
        self.disc = self.opt_d = None
        if stage.discriminator is not None:
            # no blocks: the PatchGAN is a few convolutions, sharded as one FSDP unit
            self.disc = wrap(stage.discriminator, [], recipe.fsdp, self.dtype, device, world)
            self.opt_d = adamw(self.disc)
        self.window = LogWindow()
        self.saved_step = None  # the step of this run's last checkpoint: None until one is saved

    @property
    def last_checkpoint(self):
        """The way back to a good state, once this run has one (restored or saved), else None."""
        return None if self.saved_step is None else checkpoint_path(self.recipe.out_dir)

    @property
    def device_type(self):
        """"cuda" of "cuda:1": what autocast, the fused AdamW and the CUDA RNG state go by."""
        return self.device.split(":")[0]

    def autocast(self):
        """Mixed precision for the forward passes; none under fp32, for which autocast has no
        mode (it would warn and turn itself off)."""
        return torch.autocast(self.device_type, dtype=self.dtype,
                              enabled=self.dtype != torch.float32)

    def restore(self, ckpt):
        """Continue a checkpoint: weights, optimizer moments, EMA -> the step it stopped at. The
        consolidated tensors go in through set_state_dict, which shards them under FSDP."""
        path = checkpoint_path(self.recipe.out_dir)
        # every weight in place, with its shape, before anything loads: a mismatch is named here
        # rather than deep inside set_state_dict (FSDP's shards report their whole shapes)
        for net, key in ((self.raw, "model"), (self.stage.discriminator, "discriminator")):
            if net is not None:
                check_weights(net, {k.removeprefix("_orig_mod."): v for k, v in ckpt[key].items()},
                              f"--resume {path}", hint="it was trained with another config "
                              "(the codes' vocabulary or grid, --codebook-size) than this run's")
        if self.ema is not None and "ema" not in ckpt:
            raise UserError(f"--resume: {path} was trained without --ema; drop it, or start a "
                            "new run with it")
        # AdamW's moments too: without them the first steps after a resume would be far larger
        # than those of the run never stopped (Adam's bias correction restarts from zero)
        full = StateDictOptions(full_state_dict=True)
        try:
            set_state_dict(self.model, self.opt, model_state_dict=ckpt["model"],
                           optim_state_dict=ckpt["optimizer"], options=full)
            if self.disc is not None:
                set_state_dict(self.disc, self.opt_d, model_state_dict=ckpt["discriminator"],
                               optim_state_dict=ckpt["optimizer_disc"], options=full)
        except (RuntimeError, KeyError, ValueError) as e:  # e.g. moments missing for a weight
            raise UserError(f"--resume: the optimizer state in {path} does not fit the model "
                            f"({first_line(e)}); start a new run in another --out-dir") from None
        if self.ema is not None:
            self.ema = [ckpt["ema"][n].to(self.device) for n in self.names]
        self.saved_step = ckpt["step"]
        return ckpt["step"]

    def seed_dropout(self, ckpt, step):
        """Dropout continues exactly from a checkpoint of the same world size; another size (or a
        fresh run) seeds each rank apart: seed * world + rank, as the official trainer does."""
        rng = ckpt["rng"] if ckpt and len(ckpt["rng"]) == self.world else None
        if rng:
            torch.set_rng_state(rng[self.rank]["cpu"])
            if self.device_type == "cuda":
                torch.cuda.set_rng_state(rng[self.rank]["cuda"])
        else:
            # + step: a run resumed on another world size draws new masks, not step 0's again
            torch.manual_seed(self.recipe.seed * self.world + self.rank + step)

    def batches(self, step):
        """This rank's micro-batches from `step` on. Per-item seeding makes the stream independent
        of the world size and of restarts; the loader's own generator is not the dropout RNG."""
        r = self.recipe
        sampler = GlobalBatches(len(self.stage.train_set), r.batch_size, r.grad_accum, self.rank,
                                self.world, r.seed, step)
        loader = torch.utils.data.DataLoader(
            Seeded(self.stage.train_set), batch_sampler=sampler, num_workers=r.num_workers,
            # page-locked host memory: the copy to the GPU (to_device) runs asynchronously
            pin_memory=self.device_type == "cuda", persistent_workers=r.num_workers > 0,
            generator=torch.Generator().manual_seed(r.seed))
        return iter(loader)

    def to_device(self, batch):
        """The batch's tensors on this rank's device; asynchronous from pinned memory (batches)."""
        return [t.to(self.device, non_blocking=True) for t in batch]

    def train_step(self, step, lr, batches):
        """One optimizer step: --grad-accum micro-batches through the model (and the discriminator,
        when it trains), gradients scaled so that their sum is the mean over the global batch."""
        stage, accum = self.stage, self.recipe.grad_accum
        for group in self.opt.param_groups + (self.opt_d.param_groups if self.opt_d else []):
            group["lr"] = lr
        train_disc = self.disc is not None and stage.discriminator_active(step)
        for micro in range(accum):
            last = micro == accum - 1
            batch = self.to_device(next(batches))
            with gradient_sync(self.model, last):
                # autocast runs matmuls and convolutions in bf16/fp16 and keeps reductions
                # (norms, softmax, the loss) in fp32; the weights themselves stay fp32
                with self.autocast():
                    loss, logs = stage.loss(self.model, batch, step)
                # gradients add up over backward calls: dividing each micro-batch's mean loss by
                # accum makes their sum the gradient of the mean over the whole step's batch
                self.scaler.scale(loss / accum).backward()
            self.window.add({"loss": loss, **logs}, 1 / accum)
            if train_disc:
                with gradient_sync(self.disc, last):
                    with self.autocast():
                        d_loss, d_logs = stage.discriminator_loss(self.disc, step)
                    self.scaler.scale(d_loss / accum).backward()
                self.window.add(d_logs, 1 / accum)
        self.clip_and_update(train_disc)

    def clip_and_update(self, train_disc):
        """Global grad-norm clip, AdamW, then the EMA of the weights."""
        clip = self.recipe.grad_clip or float("inf")  # inf: measure the norm, clip nothing
        # the clip threshold is for true gradients: divide the fp16 loss scale out first. After
        # DDP's all-reduce every rank holds the same gradients, so every rank clips alike
        self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        if self.scaler.is_enabled():  # fp16: the scaler skips inf/nan steps; average the others
            finite = torch.isfinite(norm)
            self.window.add({"grad_norm": torch.where(finite, norm, 0.0)}, finite.float())
        else:  # a non-finite norm here means non-finite weights after this step: main stops then
            self.window.add({"grad_norm": norm})
        self.scaler.step(self.opt)
        if train_disc:  # D's own clip and step at the same rate: the official vq_train.py's way
            self.scaler.unscale_(self.opt_d)
            torch.nn.utils.clip_grad_norm_(self.disc.parameters(), clip)
            self.scaler.step(self.opt_d)
            self.opt_d.zero_grad(set_to_none=True)
        self.scaler.update()  # after both steps: one loss scale serves G and D, adjusted once
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:  # ema = d * ema + (1 - d) * weights
            torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.raw.parameters()],
                                 1 - self.recipe.ema)

    def validate(self):
        """The stage's val_metric, averaged over the held-out items, each rank taking a shard; every
        item is seeded by its index, so every pass sees the same views."""
        stage, world = self.stage, self.world
        self.model.eval()  # no dropout, no null-class draws: the figure depends on the weights only
        # sums, not means: ranks may hold one item more or less, and the all-reduce adds them up
        vals, val_set = torch.zeros(2, device=self.device), Seeded(stage.val_set)
        idx = list(range(self.rank, len(stage.val_set), world))
        per_batch = max(1, self.recipe.batch_size // world)
        with torch.no_grad(), self.autocast():
            for i in range(0, len(idx), per_batch):
                chunk = idx[i:i + per_batch]
                collate = torch.utils.data.default_collate
                items = self.to_device(collate([val_set[(j, j)] for j in chunk]))
                vals += torch.stack([stage.val_metric(self.model, items).float() * len(chunk),
                                     torch.tensor(float(len(chunk)), device=self.device)])
        if world > 1:
            dist.all_reduce(vals)
        self.model.train()
        return (vals[0] / vals[1]).item()

    def save(self, step):
        """Everything needed to continue exactly, consolidated (full tensors on the CPU, even under
        FSDP) so that the stage's from_pretrained loads it too. Every rank joins the gathers."""
        r, stage = self.recipe, self.stage
        # under FSDP the full tensors are gathered from the shards: a collective call, so every
        # rank takes part, and rank 0 alone writes; cpu_offload keeps the copy out of GPU memory
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd, osd = get_state_dict(self.model, self.opt, options=full)
        state = dict(model=msd, optimizer=osd, step=step, samples_seen=step * r.batch_size,
                     config=dataclasses.asdict(stage.config), kind=stage.kind, meta=stage.meta,
                     args=dict(vars(r)))
        if self.disc is not None:
            state["discriminator"], state["optimizer_disc"] = get_state_dict(self.disc, self.opt_d,
                                                                             options=full)
        if self.ema is not None:  # the averaged weights, under the model's own parameter names
            state["ema"] = {n: t.cpu() for n, t in zip(self.names, self.ema)}
        mine = {"cpu": torch.get_rng_state()}  # each rank's dropout RNG, for seed_dropout
        if self.device_type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state()
        state["rng"] = [mine] if self.world == 1 else [None] * self.world
        if self.world > 1:
            dist.all_gather_object(state["rng"], mine)
        if self.rank == 0:  # written whole or not at all: a kill mid-save keeps the last one
            save_atomic(state, checkpoint_path(r.out_dir))
            if r.keep_ckpts:
                save_atomic(state, os.path.join(r.out_dir, f"ckpt_{step:07d}.pt"))
        self.saved_step = step


# ----------------------------------------------------------------------------------------------

def last_step(recipe, stage, step):
    """The step the run ends at: --max-steps, or --epochs over the training split. A resumed run
    must have steps left, or it would end at once without a word."""
    total = recipe.max_steps or math.ceil(recipe.epochs * len(stage.train_set) / recipe.batch_size)
    if step >= total:
        raise UserError(f"--resume: the checkpoint is at step {step}, and the run ends at step "
                        f"{total}: raise --max-steps or --epochs to train on")
    return total


def stop_if_diverged(rec, fp16, ckpt_path):
    """A non-finite loss, or (bf16, fp32) grad norm, ends the run with the way back: the last
    checkpoint of this run (`ckpt_path`), or None when it has saved none yet. Under fp16 an
    infinite norm is the scaler's overflow, a skipped step, not a diverged model."""
    if not math.isfinite(rec["loss"]) or not (fp16 or math.isfinite(rec["grad_norm"])):
        back = (f"the last good checkpoint is {ckpt_path}. Lower --lr, or use --precision "
                "bf16/fp32, then --resume") if ckpt_path else (
                "no checkpoint was saved yet. Lower --lr, or use --precision bf16/fp32, and start "
                "again")
        raise UserError(f"loss {rec['loss']}, grad norm {rec['grad_norm']} by step {rec['step']}; "
                        + back)


class RunLog:
    """log.jsonl (rank 0 writes it): one JSON line per log step, always in step with ckpt.pt. A
    resumed run first drops the lines after its checkpoint's step (logged by a run killed before
    its next save), so no step is listed twice; a fresh run starts it empty. A run that replaces
    another (--overwrite) writes log.jsonl.new until its first checkpoint, which the new log then
    follows into place; the old run's ckpt_<step>.pt files go then too."""

    def __init__(self, out_dir, step, replacing):
        self.out_dir, self.path = out_dir, os.path.join(out_dir, "log.jsonl")
        self.pending = self.path + ".new" if replacing else None
        kept = []
        if step and os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= step:
                            kept.append(line)
                    except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                        pass
        # the kept lines, written whole or not at all (this also makes the folder)
        save_atomic(lambda f: f.write("".join(kept).encode()), self.pending or self.path)
        if not replacing and os.path.exists(self.path + ".new"):
            os.remove(self.path + ".new")  # left by an --overwrite run that never saved
        self.file = open(self.pending or self.path, "a")

    def write(self, text):
        """Appends one line and flushes it: a kill loses no logged step, and `tail -f` follows."""
        try:
            self.file.write(text)
            self.file.flush()
        except OSError as e:  # a full disk: one line; the checkpoint and the lines before stay
            raise UserError(os_error_line(e, self.file.name)) from None

    def flush(self):
        pass  # write flushes every line

    def checkpointed(self, step):
        """After each save: the first one of a replacing run retires the old run's files."""
        if self.pending:
            os.replace(self.pending, self.path)  # the open file follows: appends go on into it
            self.pending = None
            for old in os.listdir(self.out_dir):
                if old.startswith("ckpt_") and old.endswith(".pt") and old != f"ckpt_{step:07d}.pt":
                    os.remove(os.path.join(self.out_dir, old))

    def close(self):
        self.file.close()


class CtrlC:
    """The first Ctrl-C (SIGINT) only asks the loop to stop: it does so at a step boundary, with a
    checkpoint that --resume continues exactly. A second one interrupts at once, as usual."""

    def __enter__(self):
        self.asked, self.before = False, None
        if threading.current_thread() is threading.main_thread():  # signals reach only main's
            self.before = signal.signal(signal.SIGINT, self.ask)
        return self

    def ask(self, signum, frame):
        """The handler only raises a flag: Python runs it between two bytecodes of the main
        thread, anywhere in a step, where stopping would lose the step (and, under torchrun, leave
        the other ranks waiting in a collective)."""
        self.asked = True
        signal.signal(signal.SIGINT, self.before)  # the next Ctrl-C: KeyboardInterrupt

    def agreed(self, world, device):
        """Whether any rank was asked: all of them then save the same step together."""
        if world == 1:
            return self.asked
        flag = torch.tensor([float(self.asked)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __exit__(self, *exc):
        # the handler found is put back: demo.py calls train.main several times in one process
        if self.before is not None:
            signal.signal(signal.SIGINT, self.before)


def write_log_line(rec, log, bar, val_label):
    """One JSON line of log.jsonl; the bar's postfix; the validation figure on its own line."""
    bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items() if k != "step" and v is not None})
    if val_label:
        bar.write(f"step {rec['step']}: {val_label} {rec['val']:.4f}")
    log.write(json.dumps(rec) + "\n")
    log.flush()


def train(trainer, batches, step, total):
    """The loop with what surrounds it: rank 0's log, the progress bar, the way out of Ctrl-C."""
    recipe, master = trainer.recipe, trainer.rank == 0
    # --overwrite: the old run stays whole until the new one has a checkpoint of its own
    replacing = recipe.overwrite and os.path.exists(checkpoint_path(recipe.out_dir))
    log = RunLog(recipe.out_dir, step, replacing) if master else None
    bar = progress(total=total, initial=step, show=master, desc=recipe.model)
    try:
        with CtrlC() as ctrl_c:
            loop(trainer, batches, step, total, log, bar, ctrl_c)
    finally:
        bar.close()
        if log:
            log.close()


def loop(trainer, batches, step, total, log, bar, ctrl_c):
    """Steps until `total`; every --log-interval steps (and before validation and every
    checkpoint) a log line; validation every --eval-interval, a checkpoint every --ckpt-interval."""
    stage, recipe, world, master = trainer.stage, trainer.recipe, trainer.world, trainer.rank == 0
    trainer.model.train()  # dropout and the null class on; validate turns them off and back on
    t0, logged = time.perf_counter(), step  # time and step of the last log line
    # `step` counts the optimizer steps taken: the checkpoint at step s holds the weights after s
    # steps, and a resumed run's data continues at stream position s * batch (GlobalBatches)
    while step < total:
        lr = lr_at(step, recipe, total)
        trainer.train_step(step, lr, batches)
        step += 1
        bar.update(1)
        # the last step always validates and saves: a run ends with its figure and its weights
        validating = step % recipe.eval_interval == 0 or step == total
        saving = step % recipe.ckpt_interval == 0 or step == total
        # Ctrl-C stops at a step boundary with a checkpoint: one process at once, torchrun's
        # ranks at the next log line, where they meet anyway and can agree on the step
        stopping = ctrl_c.asked and world == 1
        if not (step % recipe.log_interval == 0 or validating or saving or stopping):
            continue
        # a log line, with its finiteness check, before every checkpoint: a diverged run never
        # overwrites the last good one
        rec = dict(step=step, **trainer.window.read(world), lr=lr)
        stop_if_diverged(rec, trainer.scaler.is_enabled(), trainer.last_checkpoint)
        rec[f"{stage.unit}/s"] = (recipe.batch_size * stage.units_per_item * (step - logged)
                                  / (time.perf_counter() - t0))
        mfu = stage.mfu(rec[f"{stage.unit}/s"] / world, trainer.device)
        if mfu is not None:
            rec["mfu"] = mfu
        # every rank calls it at every log line, asked or not: an all-reduce that one rank
        # skipped would leave the others waiting in it for ever
        stopping = ctrl_c.agreed(world, trainer.device)
        if validating:
            rec["val"] = trainer.validate()
        if master:
            write_log_line(rec, log, bar, stage.val_label if validating else None)
        if saving or stopping:
            trainer.save(step)
            if master:
                log.checkpointed(step)
        if stopping:
            raise KeyboardInterrupt(f"interrupted at step {step}; checkpoint saved to "
                                    f"{trainer.last_checkpoint}, resume with --resume")
        t0, logged = time.perf_counter(), step  # throughput leaves out validation and saving
    bar.close()
    if log:
        log.close()


def main(argv=None):
    """The four steps of the module docstring: recipe, stage, trainer, loop."""
    args = get_args(argv)
    Stage = stage_for(args.model, args.text)
    refuse_other_stages_flags(args, Stage)
    device, world = setup_device(args.device), world_size()
    out_dir = args.out_dir or os.path.join("runs", args.model)
    ckpt = checkpoint_to_resume(checkpoint_path(out_dir), args.resume, args.overwrite, Stage,
                                args.model)
    recipe = resolve_recipe(args, Stage, out_dir, ckpt, world, device)
    rank = setup_distributed(device)

    torch.manual_seed(recipe.seed)  # the same initial weights on every rank: FSDP broadcasts none
    stage = Stage(recipe, ckpt)
    trainer = Trainer(stage, recipe, device, rank, world)
    step = trainer.restore(ckpt) if ckpt else 0  # a resumed run overwrites the fresh weights
    trainer.seed_dropout(ckpt, step)  # after every initialisation: from here on, only dropout draws
    total = last_step(recipe, stage, step)
    train(trainer, trainer.batches(step), step, total)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    cli(main)
