"""One trainer for every stage of LlamaGen: the VQ tokenizer on images, then the GPT on their codes.

    python train.py --model VQ-tiny --data synthetic:20000 --image-size 32    # stage 1, one process
    python codes.py extract --vq-ckpt runs/VQ-tiny/ckpt.pt --data synthetic:20000 --image-size 32 \\
        --out runs/codes
    torchrun --nproc_per_node=2 train.py --model nano --data runs/codes       # stage 2, DDP
    torchrun --nproc_per_node=8 train.py --model XXL --fsdp --data /data/imagenet256_codes  # FSDP

--model picks the Stage (GPT, with --text the text GPT, tokenizer, CLIP): model, data, loss and
validation figure. main is four steps: the recipe, the stage, the trainer (DDP/FSDP) and the loop.
"""
import argparse
import contextlib
import dataclasses
import itertools
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
import codes
import data
import scenes
import t2i
from common import (DTYPES, FRACTION, POSITIVE, SEED, UserError, at_least, between, check_flags,
                    check_weights, cli, first_line, load_checkpoint, os_error_line, progress,
                    json_checksum, rank_world, resolve_precision, save_atomic, setup_device, stored)
from model import GPT, GPT_CONFIGS, gpt_config
from text import T5_CONFIGS
from tokenizer import VQ_CONFIGS, VQLoss, VQModel, psnr, vq_config

LEARNED_TEXT = (*T5_CONFIGS, "stream")  # --text sides learnt with the GPT from the captions


# -------------------------------------------------------------------------------------------- data
def global_batches(n, batch, accum, rank, world, seed, start_step):
    """This rank's micro-batches of (index, item seed), forever: step s takes positions [s*B,
    (s+1)*B) of one stream of seeded per-epoch permutations (an item's seed is its position), so 1
    process, DDP or FSDP ranks, gradient accumulation and a kill + resume all see the same items."""
    mb, perm_epoch = batch // (accum * world), -1
    for step in itertools.count(start_step):
        for micro in range(accum):
            start, out = step * batch + (micro * world + rank) * mb, []  # slice micro*world+rank
            for pos in range(start, start + mb):
                epoch, i = divmod(pos, n)
                if epoch != perm_epoch:  # 7919, a prime: --seed s + 1 meets s's 7919 epochs on
                    g = torch.Generator().manual_seed(seed * 7919 + epoch)
                    perm_epoch, perm = epoch, torch.randperm(n, generator=g)
                out.append((int(perm[i]), seed * 2**40 + pos))
            yield out


@dataclasses.dataclass
class Seeded(torch.utils.data.Dataset):
    """Item `index` with the CPU RNG seeded by `seed` (then put back: it may be the dropout's)."""
    ds: torch.utils.data.Dataset

    def __getitem__(self, key):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(key[1])
            return self.ds[key[0]]


def split(ds, val_size):
    """(train, val): every (n / val_size)-th item held out, across a class-sorted folder."""
    if (n := len(ds)) <= val_size:
        raise UserError(f"--data has {n} items, not more than --val-size {val_size}; lower it")
    val = {i * n // val_size for i in range(val_size)}
    return (torch.utils.data.Subset(ds, [i for i in range(n) if i not in val]),
            torch.utils.data.Subset(ds, sorted(val)))


# ------------------------------------------------------------------------------------------ stages
class Stage:
    """What is trained, on what, with which loss: the loop knows nothing else. Its name, configs
    (the --model names), kind (the checkpoint's), unit (of throughput), defaults, flags (name ->
    (value when not given, type, help)), val_label; __init__(recipe, resumed checkpoint or None)
    sets model, config, meta (saved), train_set, val_set; loss(model, batch, step) -> (loss, logs)
    and val_metric(model, batch) get the wrapped model. A GAN adds discriminator(_active, _loss)."""
    units_per_item, discriminator, mfu = 1, None, None  # mfu(units/s, device): FLOPs utilisation
    val_group = 1  # val_metric scores whole groups of this many items (CLIP: among 10)
    flags = {}
    blocks = ()  # the repeated layers: FSDP shards them one by one, --grad-ckpt recomputes them

    def to(self, device):  # every network of the stage: the model and any loss networks
        for net in filter(lambda v: isinstance(v, torch.nn.Module), vars(self).values()):
            net.to(device)
        return self


class GPTStage(Stage):
    """Stage 2 (paper 2.3): next-token prediction over the codes of each image, its class first."""
    name, configs, kind, unit = "GPT", GPT_CONFIGS, "gpt", "tok"
    # the paper (3.2) and the official autoregressive/train/train_c2i.py agree on these
    defaults = dict(epochs=300, batch_size=256, weight_decay=0.05)
    flags = {
        "dropout": (None, float, "token/residual/FFN dropout in [0, 1) (default 0.1)"),
        "class_dropout": (None, float, "the null class's probability, for CFG (default 0.1)"),
        "grad_ckpt": (False, bool, "activation checkpointing: recompute each block in backward"),
        "init_from": (None, str, "GPT.pt: start from another GPT (ours, or official by path or "
                      "name: c2i_B_256.pt ...) of --model on the same tokenizer's codes; its class "
                      "or caption embedding too when that means the same, else that starts afresh")}
    val_label = "validation cross-entropy (nats/token)"

    def __init__(self, recipe, resumed):
        items = codes.codes_dataset(recipe.data)
        receipt = items.receipt  # vocabulary and grid: the GPT speaks its tokenizer's tokens
        over = dict(vocab_size=receipt.vocab_size, block_size=math.prod(receipt.grid))
        rates = dict(token_dropout_p=recipe.dropout, resid_dropout_p=recipe.dropout,
                     ffn_dropout_p=recipe.dropout, class_dropout_prob=recipe.class_dropout)
        over.update({k: v for k, v in rates.items() if v is not None})
        self.build(recipe, items, over, resumed)
        if resumed:
            codes.CodesReceipt.from_dict(resumed["meta"], checkpoint_path(recipe.out_dir)) \
                .check_same_tokenizer(receipt, "the checkpoint", f"the codes in {recipe.data}")
        if recipe.init_from and not resumed:
            t2i.init_from(self.model, self.meta, recipe.init_from, receipt, recipe.model)
        self.train_set, self.val_set = split(self.dataset, recipe.val_size)
        self.units_per_item, self.mfu = self.config.block_size, self.model.estimate_mfu
        self.blocks = self.model.layers  # embeddings, final norm and head stay in FSDP's root unit

    def build(self, recipe, items, over, resumed):
        """config, model, dataset, meta: the class GPT on the codes and their labels."""
        if resumed and any(map(resumed["config"].get, ("caption_dim", "stream_words"))):
            raise UserError(f"{checkpoint_path(recipe.out_dir)} is a text-to-image GPT; resume it "
                            "with the --text it was trained with")
        self.config = gpt_config(recipe.model, num_classes=items.receipt.num_classes, **over)
        self.model, self.dataset, self.meta = GPT(self.config), items, items.receipt.to_dict()

    def loss(self, model, batch, step):  # teacher forcing: each code from those before it
        seq, cond, mask, valid = (*batch, None, None)[:4]
        if cond.is_floating_point():  # frozen caption features come right-padded (T5's layout);
            cond, mask = t2i.left_pad_caption(cond, mask)  # JointT2I pads its T5's output itself
        return model(seq, cond, targets=seq, cond_mask=mask, valid=valid)[1], {}

    def val_metric(self, model, batch):
        return self.loss(model, batch, 0)[0]  # in eval mode: no dropout, no null condition


class T2IStage(GPTStage):
    """Paper 3.3: the codes after a caption prefix (t2i.py). `blocks`: the GPT's; T5's forward reads
    block 0's position table before block 0 runs, so its blocks stay in FSDP's root unit."""
    name = "text-to-image GPT"
    flags = {**GPTStage.flags,
             "text": (None, str, "FEATURES_DIR|T5_CONFIG|stream: condition on captions (--data: "
                      "codes with captions.json), as frozen features from `codes.py features`, "
                      f"through a T5 trained along ({', '.join(T5_CONFIGS)}), or as DALL-E's one "
                      "stream, the caption's tokens first in the GPT's own sequence"),
             "caption_len": (None, int, "with a T5 or stream: caption tokens N (default 120, the "
                             "paper's); longer captions are cut, </s> kept")}

    def build(self, recipe, items, over, resumed):  # a resumed run keeps its text side
        make = t2i.joint_gpt if recipe.text in LEARNED_TEXT else t2i.frozen_gpt
        was = resumed["meta"].get("text") if resumed else None
        self.config, self.model, self.dataset, text = make(recipe, items, over, was)
        self.meta = {**items.receipt.to_dict(), "text": text}


class VQStage(Stage):
    """Stage 1 (paper 2.2): images through the quantizer bottleneck, a PatchGAN at --disc-start."""
    name, configs, kind, unit = "tokenizer", VQ_CONFIGS, "vq", "img"
    # as the official vq_train.py that trained the release: Adam, no decay (the paper: AdamW 0.05)
    defaults = dict(epochs=40, batch_size=128, weight_decay=0.0)
    flags = {  # the official vq_train.py defaults; None: the VQ config's own value
        "image_size": (256, int, "training resolution, a multiple of the config's downsampling"),
        "disc_start": (20000, int, "the first step (counting from 1) with the PatchGAN loss"),
        "disc_weight": (0.5, float, "weight of the generator's GAN loss"),
        "perceptual_weight": (1.0, float, "LPIPS weight, 0 = off"),
        "lpips": (None, str, "folder with vgg16-397923af.pth and LPIPS vgg.pth"),
        "codebook_size": (None, int, "codes in the codebook (default: the config's)"),
        "entropy_loss_ratio": (None, float, "weight of the entropy loss (default 0, the paper's; "
                               "below 0 it gathers near-tied vectors on the more used code)")}
    val_label = "validation PSNR (dB)"

    def __init__(self, recipe, resumed):
        over = {k: getattr(recipe, k) for k in ("codebook_size", "entropy_loss_ratio")}
        self.config = vq_config(recipe.model, **{k: v for k, v in over.items() if v is not None})
        self.model, self.meta = VQModel(self.config), {}
        images = partial(data.image_dataset, recipe.data, recipe.image_size,
                         heldout=not recipe.with_heldout)
        self.train_set = split(images(augment="random_resize_crop"), recipe.val_size)[0]
        self.val_set = split(images(augment="center", flip=False), recipe.val_size)[1]
        self.crit = VQLoss(disc_start=recipe.disc_start, disc_weight=recipe.disc_weight,
                           perceptual_weight=recipe.perceptual_weight, lpips_path=recipe.lpips)
        self.discriminator = self.crit.discriminator
        # before --disc-start the official recipe multiplies D's loss by zero: skipping is the same
        self.discriminator_active = self.crit.gan_active

    def loss(self, model, batch, step):
        images = batch[0]
        recon, codebook_losses = model(images)
        self.last = (images, recon.detach())  # D's input: its loss must train D alone
        self.discriminator.requires_grad_(False)  # D only scores: DDP's hooks stay quiet
        loss, logs = self.crit.generator_loss(images, recon, codebook_losses, step)
        self.discriminator.requires_grad_(True)
        return loss, logs

    def val_metric(self, model, batch):
        # PSNR, not the loss, whose terms change weight at --disc-start (paper Table 2 reports it)
        return psnr(model(batch[0])[0].clamp(-1, 1), batch[0]).mean()

    def discriminator_loss(self, discriminator, step):
        return self.crit.discriminator_loss(*self.last, step, discriminator=discriminator)


class ClipStage(Stage):
    """CLIP (clip.py), sample.py's re-ranker and clip.py score, on the built-in captioned world;
    its closed vocabulary is BPE learnt on it, kept in the checkpoint's meta."""
    name, kind, unit = "CLIP", "clip", "img"  # the small configs: the released ones are loaded
    configs = {k: v for k, v in clip.CLIP_CONFIGS.items() if k.startswith("CLIP-")}
    # the CLIP paper's weight decay 0.2, and a peak rate for a small batch (its 5e-4 was at 32k)
    defaults = dict(epochs=30, batch_size=128, weight_decay=0.2, lr=1e-3)
    val_label, val_group = "validation accuracy of an image picking its caption among 10", 10

    def __init__(self, recipe, resumed):
        spec, _, n = str(recipe.data).partition(":")
        if spec != "scenes" or not (n == "" or n.isdigit() and int(n) > 0):
            raise UserError(f"--data {recipe.data!r}: CLIP trains on the built-in captioned world, "
                            "scenes[:N] (N scenes, default 20000)")
        if recipe.fsdp:  # the released checkpoints store logit_scale as a 0-d tensor
            raise UserError("--fsdp cannot shard CLIP's scalar logit_scale (FSDP2 refuses 0-d "
                            "parameters); CLIP-tiny fits any device: drop --fsdp to train with DDP")
        procs, r = rank_world()[1], recipe
        if r.batch_size < 10 * procs * r.grad_accum or r.val_size < 10 * procs:  # per micro-batch
            raise UserError(f"--batch-size {r.batch_size} (over --grad-accum and processes) and "
                            f"--val-size {r.val_size} must leave 10 pairs: one of 10 is picked")
        was = resumed["args"] if resumed else vars(r)
        if (was["data"], bool(was["with_heldout"])) != (r.data, bool(r.with_heldout)):
            raise UserError(f"--resume: that CLIP run trains on --data {was['data']} "
                            f"(--with-heldout {bool(was['with_heldout'])}); resume it so, or start "
                            "a new --out-dir")
        self.tokenizer = (clip.Tokenizer.from_merges([tuple(m) for m in stored(
            resumed["meta"], "bpe_merges", "--resume")]) if resumed else
            clip.Tokenizer.from_words(scenes.VOCABULARY))
        self.config = clip.clip_config(recipe.model, vocab_size=len(self.tokenizer.encoder))
        self.model = clip.CLIP(self.config)
        self.meta = {"bpe_merges": (m := [list(p) for p in self.tokenizer.merges]),
                     "bpe_merges_checksum": json_checksum(m), "data": recipe.data}
        # held-out pairs stay unseen (as by the text GPT); no flips or crops: "top left" holds
        world = scenes.CaptionedScenes(int(n or 20000), self.config.image_size, seed=recipe.seed,
                                       heldout=not recipe.with_heldout)
        items = clip.TokenizedCaptions(world, self.tokenizer, self.config.context_length)
        self.train_set, self.val_set = split(items, recipe.val_size)
        self.blocks = [*self.model.vision_model.encoder.layers,
                       *self.model.text_model.encoder.layers]

    def embed(self, model, batch):
        """(image, text embeddings, logit scale) of a batch, from the pixels rank() and clip score
        give CLIP: preprocess_tensor's, with its normalisation, not the loader's [-1, 1]."""
        images, ids = batch
        return model(clip.preprocess_tensor(images, self.config.image_size), ids,
                     return_embeddings=True)

    def loss(self, model, batch, step):
        image, text, scale = self.embed(model, batch)  # all ranks' negatives
        return (clip.distributed_contrastive_loss(image, text, scale),
                {"temperature": scale.detach().float().exp().clamp(max=100)})

    def val_metric(self, model, batch):
        # retrieval among 10: unlike the loss (chance ln B) it does not move with the batch size
        image, text, _ = self.embed(model, batch)
        return clip.retrieval_accuracy(image, text, batch[1], group=10)


STAGES = [GPTStage, VQStage, ClipStage, T2IStage]


def stage_for(model, text=None):
    """The Stage class whose configs hold --model; a GPT with --text is the text-to-image stage."""
    if stage := next((s for s in STAGES if model in s.configs), None):
        return T2IStage if stage is GPTStage and text is not None else stage
    known = "; ".join(f"{s.name} configs: {', '.join(s.configs)}" for s in STAGES)
    raise UserError(f"unknown --model {model!r}; {known}")


# ------------------------------------------------------------------------------------------ recipe
def get_args(argv=None):
    """The command line; args.typed names the flags typed (a resumed run takes the others from
    its checkpoint, not from today's defaults)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help="a config of model.py (GPT), tokenizer.py (VQ) or clip.py")
    a("--data", required=True, help="GPT: a codes folder from `codes.py extract` (several, "
      "comma-separated, mix per item). Tokenizer: an image folder or synthetic[:N]")
    a("--out-dir", help="where ckpt.pt and log.jsonl go (default runs/<model>)")
    a("--resume", action="store_true", help="continue <out-dir>/ckpt.pt exactly where it stopped")
    a("--overwrite", action="store_true", help="replace the run in --out-dir once this one saves")
    a("--epochs", type=float, help="passes over the data (default: GPT 300, VQ 40, CLIP 30)")
    a("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    a("--batch-size", type=int, help="GLOBAL batch over ranks and accumulation (GPT 256, VQ and "
      "CLIP 128)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step on each rank")
    a("--lr", type=float, help="peak learning rate (default 1e-4 per default batch, linear in it; "
      "CLIP 1e-3)")
    a("--lr-schedule", choices=["constant", "cosine"], default="constant")
    a("--warmup-steps", type=int, default=0, help="linear warmup steps")
    a("--weight-decay", type=float, help="AdamW's, on >=2-D weights (default: GPT 0.05, VQ 0)")
    a("--grad-clip", type=float, default=1.0, help="global grad-norm clip (0 = off)")
    a("--fsdp", action="store_true", help="shard parameters, grads and optimizer state (FSDP2)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--ema", type=float, default=0.0, help="an EMA of the weights with this decay (0 = none)")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="autocast "
      "dtype (auto: bf16 or fp16 on GPUs, fp32 on CPU/MPS); fp16 needs CUDA's loss scaling")
    a("--val-size", type=int, default=256, help="items held out for validation")
    a("--log-interval", type=int, default=10, help="steps per log.jsonl line (their mean losses)")
    a("--eval-interval", type=int, default=500, help="steps between validation passes")
    a("--ckpt-interval", type=int, default=1000, help="steps between checkpoints")
    a("--keep-ckpts", action="store_true", help="also keep a ckpt_<step>.pt at every checkpoint")
    a("--num-workers", type=int, default=2, help="data-loading processes per rank")
    a("--seed", type=int, default=0, help="global seed; rank r seeds dropout with seed*world+r")
    a("--device", default="auto", help="cuda, mps or cpu (default: the best available)")
    a("--with-heldout", action="store_true", help="--data scenes[:N]: also the colour-shape pairs "
      "held out of the text GPT's captions (a tokenizer reads no captions; default: never shown)")
    for i, stage in enumerate(STAGES):
        g = p.add_argument_group(f"the {stage.name} stage only")
        for name, (default, kind, text) in stage.flags.items():
            if all(name not in s.flags for s in STAGES[:i]):  # T2IStage has GPTStage's too
                text += f" (default {default})" if default not in (None, False) else ""
                shown, _, rest = text.partition(": ")  # "GPT.pt: ..." names the value
                how = {"action": "store_true"} if kind is bool else {"type": kind} | (
                    {"metavar": shown} if rest and " " not in shown else {})
                g.add_argument("--" + name.replace("_", "-"), default=None, help=text, **how)
    args = p.parse_args(argv)
    unset = object()  # argparse sets a default only where the namespace lacks the flag
    given = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    args.typed = {k for k, v in vars(given).items() if v is not unset}
    return args


def checkpoint_path(out_dir):
    return os.path.join(out_dir, "ckpt.pt")  # the run's one live checkpoint, replaced whole


def checkpoint_to_resume(path, resume, overwrite, stage, model):
    """The checkpoint --resume continues (train.py's, of this stage and --model, with its
    optimizer state), or None; never a silent restart over an old run."""
    if resume and overwrite:
        raise UserError("--resume continues the run and --overwrite replaces it: pass one of them")
    if resume and not os.path.exists(path):
        raise UserError(f"--resume: no checkpoint at {path}; drop --resume to start a new run")
    if not resume and not overwrite and os.path.exists(path):
        raise UserError(f"{path} exists; pass --resume to continue it or --overwrite to replace "
                        "it with a new run, or choose another --out-dir")
    if not resume:
        return None
    ckpt, new = load_checkpoint(path), "; start a new run in another --out-dir"
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("args"), dict):
        bare = isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values())
        raise UserError(f"--resume: {path} is " + ("a bare state dict (weights only), not a "
                        "checkpoint of train.py; sampling can load it" if bare else "not a "
                        "checkpoint of train.py (no recipe under 'args')") + new)
    saved = ckpt["args"].get("model")
    if ckpt.get("kind") != stage.kind:
        other = next((s.name for s in STAGES if s.kind == ckpt.get("kind")), ckpt.get("kind"))
        raise UserError(f"--resume: {path} is a {other} checkpoint (--model {saved}), and --model "
                        f"{model} trains the {stage.name}: use --model {saved} or a new --out-dir")
    if saved != model:
        raise UserError(f"--resume: {path} is a checkpoint of --model {saved}, not {model}: pass "
                        f"--model {saved} to continue it, or another --out-dir")
    needed = ["model", "optimizer", "step", "config", "rng"]
    needed += ["discriminator", "optimizer_disc"] if stage is VQStage else []
    for key in needed:  # an empty AdamW state too: Trainer.save writes zero moments for all
        if key not in ckpt or (key.startswith("optimizer") and not ckpt[key].get("state")):
            raise UserError(f"--resume: {path} has no {key!r} state{new}")
    return ckpt


def resolve_recipe(args, stage, out_dir, ckpt, world, device):
    """The flags with every default filled in: what the run reads and the checkpoint saves."""
    for other, flag in [(o, f) for o in STAGES for f in o.flags if f not in stage.flags]:
        if getattr(args, flag) is not None:
            raise UserError(f"--{flag.replace('_', '-')} only applies to the {other.name} stage; "
                            f"--model {args.model} trains the {stage.name}: drop it")
    saved = ckpt["args"] if ckpt else {}
    for name in ("batch_size", "weight_decay", "init_from", "text"):
        if saved and (given := getattr(args, name)) is not None and given != saved.get(name):
            raise UserError(f"--{name.replace('_', '-')} {given} differs from the checkpoint's "
                            f"{saved.get(name)}: a resumed run keeps it; start a new --out-dir")
    recipe = {k: v for k, v in vars(args).items() if k != "typed"}
    recipe.update({k: v for k, v in saved.items()
                   if k in recipe and k not in args.typed and k not in PER_INVOCATION})
    # every stage's flags keep a value in every checkpoint
    recipe.update({k: v[0] for s in STAGES for k, v in s.flags.items() if recipe[k] is None})
    recipe.update({k: v for k, v in stage.defaults.items() if recipe[k] is None})
    # the official 1e-4 per 256 images (GPT) or 128 (tokenizer), linear in the batch (Goyal 2017)
    if recipe["lr"] is None:
        recipe["lr"] = 1e-4 * recipe["batch_size"] / stage.defaults["batch_size"]
    recipe["out_dir"], recipe["precision"] = out_dir, resolve_precision(args.precision, device)[0]
    r = argparse.Namespace(**recipe)
    check_flags(r, RANGES, ONLY_WITH)
    if stage is VQStage:
        data.check_image_size(r.image_size, vq_config(r.model).downsample)
    if r.precision == "fp16" and not str(device).startswith("cuda"):  # GradScaler needs CUDA
        raise UserError(f"--precision fp16 needs a CUDA GPU, where its loss scaling runs; on "
                        f"{device} use --precision fp32 or bf16")
    if r.batch_size % (world * r.grad_accum):  # every micro-batch whole, every item alike
        raise UserError(f"--batch-size {r.batch_size} is not divisible by world size {world} x "
                        f"--grad-accum {r.grad_accum}; pick a multiple of {world * r.grad_accum}")
    if r.fsdp and r.ema:  # the EMA averages whole tensors; an FSDP rank holds only shards
        raise UserError("--ema with --fsdp is not supported (nor officially); drop one")
    return r


# the flags of this invocation rather than of the run: a resumed run may change them freely
PER_INVOCATION = {"resume", "overwrite", "out_dir", "device", "num_workers", "precision", "compile"}
RANGES = {**dict.fromkeys(("max_steps", "batch_size", "grad_accum", "val_size", "log_interval",
                           "eval_interval", "ckpt_interval", "codebook_size"), at_least(1)),
          **dict.fromkeys(("warmup_steps", "num_workers", "disc_start", "weight_decay", "grad_clip",
                           "disc_weight", "perceptual_weight"), at_least(0)),
          **dict.fromkeys(("epochs", "lr"), POSITIVE),
          **dict.fromkeys(("ema", "dropout", "class_dropout"), FRACTION),
          "caption_len": between(2, 1024), "entropy_loss_ratio": between(-1, 1), "seed": SEED,
          "image_size": between(1, 4096)}
ONLY_WITH = [("with_heldout", "--data scenes[:N], the built-in captioned world",
              lambda r: any(p.partition(":")[0] == "scenes" for p in str(r.data).split("+"))),
             ("caption_len", "a text encoder trained along or DALL-E's stream (--text "
              f"{'/'.join(LEARNED_TEXT)}); frozen features keep their own length",
              lambda r: r.text in LEARNED_TEXT)]


def lr_at(step, r, total):
    """Linear warmup to --lr, then constant (the paper, 3.2: a run can always be extended) or a
    cosine decay to 0 (short runs such as the demo's)."""
    if step < r.warmup_steps:
        return r.lr * (step + 1) / r.warmup_steps
    if r.lr_schedule == "cosine":
        t = (step - r.warmup_steps) / max(1, total - r.warmup_steps)
        return 0.5 * r.lr * (1 + math.cos(math.pi * min(1.0, t)))
    return r.lr


# ----------------------------------------------------------------------------------------- trainer
def configure_optimizers(module, weight_decay, learning_rate, betas, device_type):
    """AdamW for every network: decay on matrices, kernels and embeddings (>= 2-D), never on
    biases or norm gains (autoregressive/train/train_c2i.py, as nanoGPT); fused on CUDA."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                             fused=device_type == "cuda" or None)  # None: torch's default


def wrap(module, blocks, fsdp, dtype, device, world):
    """DDP keeps a full replica per rank and all-reduces gradients behind the backward pass; FSDP
    shards weights, gradients and optimizer state, one block whole at a time (paper 2.4: 3B)."""
    if not fsdp:
        ids = [device] if device.startswith("cuda") else None
        return module if world == 1 else DDP(module, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dtype == torch.bfloat16 else MixedPrecisionPolicy()
    for block in blocks:  # gathered for its forward (and backward), freed after
        fully_shard(block, mp_policy=mp)
    return fully_shard(module, mp_policy=mp)


def gradient_sync(module, last):
    """With accumulation DDP need all-reduce only the last backward. FSDP reduce-scatters every one:
    skipping it would keep whole gradients, the memory FSDP exists to save."""
    return contextlib.nullcontext() if last or not isinstance(module, DDP) else module.no_sync()


class Trainer:
    """The stage's networks on this rank, wrapped, with their AdamW, loss scaler and EMA."""

    def __init__(self, stage, recipe, device, rank, world):
        self.stage, self.recipe, self.device = stage, recipe, device
        self.rank, self.world = rank, world
        self.device_type, self.dtype = device.split(":")[0], DTYPES[recipe.precision]
        # bf16/fp16 matmuls, fp32 reductions; the fp16 scaler keeps small gradients from zero
        self.autocast = partial(torch.autocast, self.device_type, dtype=self.dtype,
                                enabled=self.dtype != torch.float32)
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == torch.float16)
        self.raw = stage.to(device).model  # unwrapped: the EMA's and restore's
        if recipe.grad_ckpt:  # keep each block's input only, recompute the block in backward
            for block in stage.blocks:
                block.forward = partial(torch.utils.checkpoint.checkpoint, block.forward,
                                        use_reentrant=False)
        self.names = [n for n, _ in self.raw.named_parameters()]  # without compile's prefixes
        # float32: a bf16 average would round away updates of 1e-4
        self.ema = [p.detach().clone().float() for p in self.raw.parameters()] \
            if recipe.ema else None
        compiled = torch.compile(self.raw) if recipe.compile else self.raw
        self.model = wrap(compiled, stage.blocks, recipe.fsdp, self.dtype, device, world)
        # beta2 0.95, not 0.999: forgetting old gradient scales faster steadies large transformers
        adamw = partial(configure_optimizers, weight_decay=recipe.weight_decay,
                        learning_rate=recipe.lr, betas=(0.9, 0.95), device_type=self.device_type)
        self.opt = adamw(self.model)  # the wrapper's parameters: FSDP's are the shards
        self.disc = self.opt_d = None
        if stage.discriminator is not None:  # a few convolutions: one FSDP unit
            self.disc = wrap(stage.discriminator, [], recipe.fsdp, self.dtype, device, world)
            self.opt_d = adamw(self.disc)
        self.sums, self.last_checkpoint = {}, None  # the way back, once there is one

    def log(self, logs, weight):  # weight: a micro-batch's share of its step, 0: a skipped step
        for k, v in logs.items():
            s, n = self.sums.get(k, (0.0, 0.0))
            self.sums[k] = (s + v.detach().float() * weight, n + weight)

    def read_logs(self):  # logged scalars are summed on the device, read once per log line
        keys = sorted(self.sums, key=lambda k: (k != "loss", k))  # one order on every rank
        means = torch.stack([self.sums[k][0] / self.sums[k][1] for k in keys])
        if self.world > 1:
            dist.all_reduce(means, op=dist.ReduceOp.AVG)
        self.sums = {}
        return dict(zip(keys, means.tolist()))

    def restore(self, ckpt):
        """Weights, AdamW's moments (else the first steps are far larger), EMA -> the step."""
        path = checkpoint_path(self.recipe.out_dir)
        for net, key in ((self.raw, "model"), (self.stage.discriminator, "discriminator")):
            if net is not None:
                check_weights(net, ckpt[key], f"--resume {path}", hint="it was trained with "
                              "another config (the codes' vocabulary or grid, --codebook-size)")
        if self.ema is not None and "ema" not in ckpt:
            raise UserError(f"--resume: {path} was trained without --ema; drop it or start anew")
        full = StateDictOptions(full_state_dict=True)  # consolidated in, sharded under FSDP
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
        self.last_checkpoint = path
        return ckpt["step"]

    def seed_dropout(self, ckpt, step):
        """Dropout continues exactly on one world size; else rank r seeds seed*world + r + step."""
        if ckpt and len(ckpt["rng"]) == self.world:
            torch.set_rng_state(ckpt["rng"][self.rank]["cpu"])
            if self.device_type == "cuda":
                torch.cuda.set_rng_state(ckpt["rng"][self.rank]["cuda"])
        else:
            torch.manual_seed(self.recipe.seed * self.world + self.rank + step)

    def train_step(self, step, lr, batches):
        """--grad-accum micro-batches, each loss / accum (their summed gradients are the global
        batch's mean's), through the model and the discriminator; then clip, AdamW and the EMA."""
        stage, accum = self.stage, self.recipe.grad_accum
        for group in self.opt.param_groups + (self.opt_d.param_groups if self.opt_d else []):
            group["lr"] = lr
        train_disc = self.disc is not None and stage.discriminator_active(step)
        for micro in range(accum):
            last = micro == accum - 1
            batch = [t.to(self.device, non_blocking=True) for t in next(batches)]  # pinned: async
            with gradient_sync(self.model, last):
                with self.autocast():
                    loss, logs = stage.loss(self.model, batch, step)
                self.scaler.scale(loss / accum).backward()
            self.log({"loss": loss, **logs}, 1 / accum)
            if train_disc:
                with gradient_sync(self.disc, last):
                    with self.autocast():
                        d_loss, d_logs = stage.discriminator_loss(self.disc, step)
                    self.scaler.scale(d_loss / accum).backward()
                self.log(d_logs, 1 / accum)
        clip = self.recipe.grad_clip or float("inf")  # inf: measure the norm, clip nothing
        self.scaler.unscale_(self.opt)  # the threshold is for the true gradients
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        # fp16: the scaler skips inf/nan steps, and the logged norm averages the others
        finite = torch.isfinite(norm) | (not self.scaler.is_enabled())
        self.log({"grad_norm": torch.where(finite, norm, 0.0)}, finite.float())
        self.scaler.step(self.opt)
        if train_disc:  # D's own clip and step at the same rate: the official vq_train.py's way
            self.scaler.unscale_(self.opt_d)
            torch.nn.utils.clip_grad_norm_(self.disc.parameters(), clip)
            self.scaler.step(self.opt_d)
            self.opt_d.zero_grad(set_to_none=True)
        self.scaler.update()  # after both steps: one loss scale serves G and D
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:  # ema = d * ema + (1 - d) * weights
            torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.raw.parameters()],
                                 1 - self.recipe.ema)

    def validate(self):
        """val_metric averaged over the held-out items (item j seeded by j), ranks sharing them."""
        stage, world = self.stage, self.world
        self.model.eval()
        vals, val_set = torch.zeros(2, device=self.device), Seeded(stage.val_set)
        idx, g = list(range(self.rank, len(stage.val_set), world)), stage.val_group
        idx, per_batch = idx[:len(idx) // g * g], max(g, self.recipe.batch_size // world // g * g)
        with torch.no_grad(), self.autocast():
            for chunk in (idx[i:i + per_batch] for i in range(0, len(idx), per_batch)):
                items = [t.to(self.device) for t in torch.utils.data.default_collate(
                    [val_set[(j, j)] for j in chunk])]
                vals += torch.stack([stage.val_metric(self.model, items).float() * len(chunk),
                                     torch.tensor(float(len(chunk)), device=self.device)])
        if world > 1:
            dist.all_reduce(vals)
        self.model.train()
        return (vals[0] / vals[1]).item()

    def save(self, step):
        """Everything to continue exactly, as full CPU tensors (a collective under FSDP)."""
        r, stage = self.recipe, self.stage
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
        if self.rank == 0:
            save_atomic(state, checkpoint_path(r.out_dir))
            if r.keep_ckpts:
                save_atomic(state, os.path.join(r.out_dir, f"ckpt_{step:07d}.pt"))
        self.last_checkpoint = checkpoint_path(r.out_dir)


# -------------------------------------------------------------------------------------------- loop
class RunLog:
    """log.jsonl, in step with ckpt.pt: a resumed run drops the lines after its checkpoint; a
    replacing run (--overwrite) writes log.jsonl.new until its first checkpoint."""

    def __init__(self, out_dir, step, replacing):
        self.out_dir, self.path = out_dir, os.path.join(out_dir, "log.jsonl")
        self.pending = self.path + ".new" if replacing else None
        kept = []
        if step and os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut short
                        kept += [line] if json.loads(line)["step"] <= step else []
        save_atomic(lambda f: f.write("".join(kept).encode()), self.pending or self.path)
        if not replacing and os.path.exists(self.path + ".new"):
            os.remove(self.path + ".new")  # left by an --overwrite run that never saved
        self.file = open(self.pending or self.path, "a", buffering=1)

    def write(self, rec):  # the file is line-buffered: a kill loses no logged step
        try:
            self.file.write(json.dumps(rec) + "\n")
        except OSError as e:
            raise UserError(os_error_line(e, self.file.name)) from None

    def checkpointed(self, step):
        if self.pending:  # a replacing run's first checkpoint retires the old run's files
            os.replace(self.pending, self.path)  # the open file follows: appends go on into it
            self.pending = None
            for old in os.listdir(self.out_dir):
                if old.startswith("ckpt_") and old.endswith(".pt") and old != f"ckpt_{step:07d}.pt":
                    os.remove(os.path.join(self.out_dir, old))


def train(trainer, step):
    """From `step` (optimizer steps taken) to the last; a log line before each save, too. The first
    Ctrl-C only asks: the loop stops at a step boundary, with a checkpoint (mid-step, torchrun's
    other ranks would wait in a collective); a second interrupts at once."""
    stage, r, world, master = trainer.stage, trainer.recipe, trainer.world, trainer.rank == 0
    total = r.max_steps or math.ceil(r.epochs * len(stage.train_set) / r.batch_size)
    if step >= total:
        raise UserError(f"--resume: the checkpoint is at step {step}, and the run ends at step "
                        f"{total}: raise --max-steps or --epochs to train on")
    batches = iter(torch.utils.data.DataLoader(
        Seeded(stage.train_set), num_workers=r.num_workers, batch_sampler=global_batches(
            len(stage.train_set), r.batch_size, r.grad_accum, trainer.rank, world, r.seed, step),
        pin_memory=trainer.device_type == "cuda", persistent_workers=r.num_workers > 0,
        generator=torch.Generator().manual_seed(r.seed)))
    log = RunLog(r.out_dir, step, r.overwrite and os.path.exists(checkpoint_path(r.out_dir))) \
        if master else None
    bar = progress(total=total, initial=step, show=master, desc=r.model)
    trainer.model.train()  # dropout and the null class on; validate turns them off and back on
    t0, logged = time.perf_counter(), step  # time and step of the last log line
    asked, before = [False], None

    def ask(signum, frame):
        asked[0] = True
        signal.signal(signal.SIGINT, before)
    if threading.current_thread() is threading.main_thread():  # signals reach only main's
        before = signal.signal(signal.SIGINT, ask)
    try:
        while step < total:
            lr = lr_at(step, r, total)
            trainer.train_step(step, lr, batches)
            step += 1
            bar.update(1)
            validating = step % r.eval_interval == 0 or step == total
            saving = step % r.ckpt_interval == 0 or step == total
            # Ctrl-C: one process stops at once, torchrun's ranks agree at the next log line
            if not (step % r.log_interval == 0 or validating or saving or asked[0] and world == 1):
                continue
            rec = dict(step=step, **trainer.read_logs(), lr=lr)
            # divergence stops training before it saves (fp16: an inf norm is a skipped step)
            if not math.isfinite(rec["loss"]) or not (
                    trainer.scaler.is_enabled() or math.isfinite(rec["grad_norm"])):
                back = trainer.last_checkpoint
                where, then = ((f"the last good checkpoint is {back}", "then --resume") if back
                               else ("no checkpoint was saved yet", "and start again"))
                raise UserError(f"loss {rec['loss']}, grad norm {rec['grad_norm']} by step {step}; "
                                f"{where}. Lower --lr, or use --precision bf16/fp32, {then}")
            rec[f"{stage.unit}/s"] = (r.batch_size * stage.units_per_item * (step - logged)
                                      / (time.perf_counter() - t0))
            mfu = stage.mfu and stage.mfu(rec[f"{stage.unit}/s"] / world, trainer.device)
            if mfu is not None:
                rec["mfu"] = mfu
            stopping = torch.tensor([float(asked[0])], device=trainer.device)
            if world > 1:  # one rank's Ctrl-C stops every rank, at this same step
                dist.all_reduce(stopping, op=dist.ReduceOp.MAX)
            if validating:
                rec["val"] = trainer.validate()
            if master:
                bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items() if k != "step"})
                if validating:
                    bar.write(f"step {step}: {stage.val_label} {rec['val']:.4f}")
                log.write(rec)
            if saving or stopping:
                trainer.save(step)
                if master:
                    log.checkpointed(step)
            if stopping:
                raise KeyboardInterrupt(f"interrupted at step {step}; checkpoint saved to "
                                        f"{trainer.last_checkpoint}, resume with --resume")
            t0, logged = time.perf_counter(), step  # throughput leaves out validation, saving
    finally:
        if before is not None:  # put back: demo.py calls train.main several times in one process
            signal.signal(signal.SIGINT, before)
        bar.close()
        if log:
            log.file.close()


def main(argv=None):
    """The four steps of the module docstring: recipe, stage, trainer, loop."""
    args = get_args(argv)
    Stage = stage_for(args.model, args.text)
    device, world = setup_device(args.device), rank_world()[1]
    out_dir = args.out_dir or os.path.join("runs", args.model)
    ckpt = checkpoint_to_resume(checkpoint_path(out_dir), args.resume, args.overwrite, Stage,
                                args.model)
    recipe = resolve_recipe(args, Stage, out_dir, ckpt, world, device)
    if "RANK" in os.environ:  # torchrun: join the others once bad input has stopped them all
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    torch.manual_seed(recipe.seed)  # the same initial weights on every rank: FSDP broadcasts none
    stage = Stage(recipe, ckpt)
    trainer = Trainer(stage, recipe, device, rank_world()[0], world)
    step = trainer.restore(ckpt) if ckpt else 0  # a resumed run overwrites the fresh weights
    trainer.seed_dropout(ckpt, step)  # after every initialisation: from here on, only dropout draws
    train(trainer, step)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    cli(main)
