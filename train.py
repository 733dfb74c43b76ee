"""One trainer for both stages of LlamaGen: the VQ tokenizer on images, then the GPT on their codes.

    python train.py --model VQ-tiny --data synthetic:20000 --image-size 32     # stage 1, one process
    python data.py extract --vq-ckpt runs/VQ-tiny/ckpt.pt --data synthetic:20000 --image-size 32 --out runs/codes
    torchrun --nproc_per_node=2 train.py --model nano --data runs/codes        # stage 2, DDP
    torchrun --nnodes=4 --nproc_per_node=8 --node_rank=$NODE --master_addr=$HOST --master_port=29500 \\
        train.py --model XXL --fsdp --data /data/imagenet256_codes

--model picks the stage: a GPT config name (model.py) trains the transformer on a codes folder, a VQ
config name (tokenizer.py) trains the tokenizer on images. Everything else is the same loop.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import time
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from common import UserError, cli, load_checkpoint, pick_device, save_atomic
from model import GPT, GPT_CONFIGS, gpt_config
from tokenizer import VQ_CONFIGS, VQLoss, VQModel, psnr, vq_config


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help=f"GPT config {list(GPT_CONFIGS)} or tokenizer config {list(VQ_CONFIGS)}")
    a("--data", required=True, help="GPT: a codes folder from `data.py extract` (or several of the same images, "
      "comma-separated, mixed per item: the official 1.1 and 1.05 ten crops). Tokenizer: an image folder "
      "(class sub-folders) or synthetic[:N], the embedded dataset of N images")
    a("--out-dir", default=None, help="where ckpt.pt and log.jsonl go (default runs/<model>)")
    a("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt exactly where it stopped")
    a("--image-size", type=int, default=256, help="tokenizer stage: training resolution in pixels")
    a("--epochs", type=float, default=None, help="passes over the data (default: GPT 300, tokenizer 40)")
    a("--max-steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    a("--batch-size", type=int, default=None, help="GLOBAL batch: per step, over all ranks and accumulation "
      "(default: GPT 256, tokenizer 128)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step on each rank")
    a("--lr", type=float, default=None, help="peak learning rate (default: 1e-4 at the default batch size, "
      "scaled linearly with --batch-size)")
    a("--lr-schedule", choices=["constant", "cosine"], default="constant", help="constant as in the paper")
    a("--warmup-steps", type=int, default=0, help="linear warmup steps")
    a("--weight-decay", type=float, default=None, help="AdamW weight decay, on >=2-D weights only "
      "(default: GPT 0.05, tokenizer 0)")
    a("--grad-clip", type=float, default=1.0, help="global grad-norm clip (0 = off)")
    a("--dropout", type=float, default=None, help="GPT: token/residual/FFN dropout (default 0.1)")
    a("--class-dropout", type=float, default=None, help="GPT: prob. of the null class, for CFG (default 0.1)")
    a("--disc-start", type=int, default=20000,
      help="tokenizer: the first step (counting from 1) with the PatchGAN loss")
    a("--disc-weight", type=float, default=0.5, help="tokenizer: weight of the generator's GAN loss")
    a("--perceptual-weight", type=float, default=1.0, help="tokenizer: LPIPS weight (0 = off)")
    a("--lpips", default=None, help="tokenizer: folder with vgg16-397923af.pth and LPIPS vgg.pth")
    a("--codebook-size", type=int, default=None, help="tokenizer: codes in the codebook (config default)")
    a("--entropy-loss-ratio", type=float, default=None,
      help="tokenizer: weight of the entropy loss that spreads use over the codebook (default 0, paper)")
    a("--fsdp", action="store_true", help="shard parameters, grads and optimizer state (FSDP2) per block")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--grad-ckpt", action="store_true", help="activation checkpointing: recompute blocks in backward")
    a("--ema", type=float, default=0.0, help="keep an EMA of the weights with this decay (e.g. 0.9999)")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
      help="autocast dtype (auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU/MPS)")
    a("--val-size", type=int, default=256, help="items held out for validation: every (N / val-size)-th of --data")
    a("--log-interval", type=int, default=10, help="steps per log.jsonl line, which holds their mean losses "
      "(the loss is read back only then: a read every step would make the GPU wait)")
    a("--eval-interval", type=int, default=500, help="steps between validation passes")
    a("--ckpt-interval", type=int, default=1000, help="steps between checkpoints")
    a("--keep-ckpts", action="store_true", help="also keep a ckpt_<step>.pt at every checkpoint")
    a("--num-workers", type=int, default=2, help="data-loading processes per rank")
    a("--seed", type=int, default=0, help="global seed; rank r seeds its dropout with seed * world + r")
    a("--device", default="auto", help="cuda, mps or cpu (default: the best available)")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Data: every rank sees its share of the same global batches, whatever the world size

class GlobalBatches(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of (index, item seed) pairs, forever. The data is one stream of
    seeded per-epoch permutations; step s consumes positions [s*B, (s+1)*B). Each item's augmentation is
    seeded by its position in the stream, so a 1-process run, a DDP run and a resumed run see the same
    pictures in the same order (the data position is simply step * B)."""

    def __init__(self, n, batch, accum, rank, world, seed, start_step):
        self.n, self.B, self.accum, self.rank, self.world = n, batch, accum, rank, world
        self.seed, self.start_step, self.mb = seed, start_step, batch // (accum * world)

    def __iter__(self):
        perm_epoch, perm = -1, None
        for step in range(self.start_step, 2**62):
            for micro in range(self.accum):
                start = step * self.B + (micro * self.world + self.rank) * self.mb
                out = []
                for pos in range(start, start + self.mb):
                    epoch, i = divmod(pos, self.n)
                    if epoch != perm_epoch:
                        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
                        perm_epoch, perm = epoch, torch.randperm(self.n, generator=g)
                    out.append((int(perm[i]), self.seed * 2**40 + pos))
                yield out


class Seeded(torch.utils.data.Dataset):
    """Fetches item `index` with torch's RNG seeded by `seed`: random crops, flips and augmentation choices
    become a pure function of the stream position."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.ds[index]


def split(ds, val_size):
    """(train, val): every (n / val_size)-th item is held out, so validation spans all classes of a
    class-sorted image folder."""
    n = len(ds)
    if n <= val_size:
        raise UserError(f"--data has {n} items, not more than --val-size {val_size}; use more data or lower it")
    val = {i * n // val_size for i in range(val_size)}
    return (torch.utils.data.Subset(ds, [i for i in range(n) if i not in val]),
            torch.utils.data.Subset(ds, sorted(val)))


# -----------------------------------------------------------------------------
# The two stages differ only here: the model, the data, the loss, and the tokenizer's discriminator

class GPTStage:
    """Stage 2 (paper 2.3): next-token prediction over the codes of each image, the class as a prefix."""
    kind, unit = "gpt", "tok"
    defaults = dict(epochs=300, batch_size=256, weight_decay=0.05)  # paper 3.2 and the official code agree

    def __init__(self, args, resumed):
        codes = data.codes_dataset(args.data)
        grid = codes.meta["grid"]
        over = dict(vocab_size=codes.meta["vocab_size"], block_size=grid[0] * grid[1],
                    num_classes=codes.meta["num_classes"])
        if args.dropout is not None:
            over.update(token_dropout_p=args.dropout, resid_dropout_p=args.dropout, ffn_dropout_p=args.dropout)
        if args.class_dropout is not None:
            over["class_dropout_prob"] = args.class_dropout
        self.config = gpt_config(args.model, **over)
        was, now = resumed and resumed["meta"], codes.meta
        if was and any(was[k] != now[k] for k in ("tokenizer_checksum", "vocab_size", "grid")):
            raise UserError(f"the checkpoint was trained on codes of another tokenizer (vocab {was['vocab_size']}, "
                            f"grid {was['grid']}) than those in {args.data} (vocab {now['vocab_size']}, grid "
                            f"{now['grid']}): extract codes with the first tokenizer, or start a new --out-dir")
        self.model, self.meta = GPT(self.config), codes.meta
        self.train_set, self.val_set = split(codes, args.val_size)
        self.items_to_units = self.config.block_size
        self.disc = None

    def loss(self, model, batch, step):
        """-> (loss, its parts to log): here the loss alone."""
        codes, labels = batch
        return model(codes, labels, targets=codes)[1], {}

    def val_metric(self, model, batch):
        """Validation cross-entropy in nats per token."""
        return self.loss(model, batch, 0)[0]


class VQStage:
    """Stage 1 (paper 2.2): reconstruct images through the quantizer bottleneck; after --disc-start a
    PatchGAN discriminator joins with its own optimizer."""
    kind, unit = "vq", "img"
    # The paper says AdamW with weight decay 0.05; the code that trained the released tokenizer uses Adam
    # without weight decay (REFERENCE 2). We follow the code: AdamW with decay 0 is exactly that Adam.
    defaults = dict(epochs=40, batch_size=128, weight_decay=0.0)

    def __init__(self, args, resumed):
        over = dict(codebook_size=args.codebook_size, entropy_loss_ratio=args.entropy_loss_ratio)
        self.config = vq_config(args.model, **{k: v for k, v in over.items() if v is not None})
        self.model, self.meta = VQModel(self.config), {}
        train = data.image_dataset(args.data, args.image_size, augment="random_resize_crop")
        val = data.image_dataset(args.data, args.image_size, augment="center", flip=False)
        self.train_set, _ = split(train, args.val_size)
        _, self.val_set = split(val, args.val_size)
        self.items_to_units = 1
        self.crit = VQLoss(disc_start=args.disc_start, disc_weight=args.disc_weight,
                           perceptual_weight=args.perceptual_weight, lpips_path=args.lpips)
        self.disc = self.crit.discriminator
        self._last = None

    def loss(self, model, batch, step):
        images = batch[0]
        recon, codebook_losses = model(images)
        self._last = (images, recon.detach())
        # D only scores here; keeping its weights out of this graph keeps DDP's gradient hooks quiet
        self.disc.requires_grad_(False)
        loss, logs = self.crit.generator_loss(images, recon, codebook_losses, step)
        self.disc.requires_grad_(True)
        return loss, logs

    def disc_loss(self, disc, step):
        """Hinge loss of the discriminator on the last micro-batch (skipped before --disc-start, where
        the official recipe multiplies it by zero)."""
        images, recon = self._last
        return self.crit.discriminator_loss(images, recon, step, discriminator=disc)

    def val_metric(self, model, batch):
        """Validation PSNR in dB of reconstructions (higher is better)."""
        images = batch[0]
        return psnr(model(images)[0].clamp(-1, 1), images).mean()


# -----------------------------------------------------------------------------

def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE; a plain `python train.py` is a world of one."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(args.device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(args.device)
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def lr_at(step, args, total):
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "cosine":
        t = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
        return 0.5 * args.lr * (1 + math.cos(math.pi * min(1.0, t)))
    return args.lr


def wrap(module, args, device, world, blocks):
    """Data parallelism. DDP keeps a full replica per rank and all-reduces gradients; FSDP shards
    parameters, gradients and optimizer state over ranks and gathers one block's weights at a time,
    which is what lets 1.4B-3B models train (paper 2.4)."""
    if world == 1 and not args.fsdp:
        return module
    if args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if args.dtype == torch.bfloat16 else MixedPrecisionPolicy()
        for block in blocks:
            fully_shard(block, mp_policy=mp)
        return fully_shard(module, mp_policy=mp)
    return DDP(module, device_ids=[device] if device.startswith("cuda") else None)


def main(argv=None):
    args = get_args(argv)
    rank, world, device = setup_distributed(args)
    master = rank == 0
    args.out_dir = args.out_dir or os.path.join("runs", args.model)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    Stage = GPTStage if args.model in GPT_CONFIGS else VQStage if args.model in VQ_CONFIGS else None
    if Stage is None:
        raise UserError(f"unknown --model {args.model!r}; GPT configs: {', '.join(GPT_CONFIGS)}; "
                        f"tokenizer configs: {', '.join(VQ_CONFIGS)}")
    if args.resume and not os.path.exists(ckpt_path):
        raise UserError(f"--resume: no checkpoint at {ckpt_path}; drop --resume to start a new run")
    if not args.resume and os.path.exists(ckpt_path):
        raise UserError(f"{ckpt_path} exists; pass --resume to continue it, or choose another --out-dir")
    ckpt = load_checkpoint(ckpt_path) if args.resume else None
    # a resumed run keeps its own recipe; a fresh one takes its stage's defaults (the two differ)
    saved = ckpt["args"] if ckpt else {}
    for name in ("batch_size", "weight_decay"):  # the data position is step * batch; the optimizer keeps its decay
        if saved and getattr(args, name) is not None and getattr(args, name) != saved[name]:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} differs from the checkpoint's "
                            f"{saved[name]}: a resumed run keeps it; start a new --out-dir to change it")
    for name, value in {**Stage.defaults, "lr": None}.items():
        if getattr(args, name) is None:
            setattr(args, name, value if saved.get(name) is None else saved[name])
    args.lr = args.lr or 1e-4 * args.batch_size / Stage.defaults["batch_size"]
    if args.log_interval < 1:
        raise UserError(f"--log-interval must be at least 1, got {args.log_interval}")
    if args.batch_size % (world * args.grad_accum):
        raise UserError(f"--batch-size {args.batch_size} is not divisible by world size {world} x --grad-accum "
                        f"{args.grad_accum}; pick a multiple of {world * args.grad_accum}")
    if args.fsdp and args.ema:
        raise UserError("--ema with --fsdp is not supported (nor in the official FSDP recipe); drop one")

    # what differs between the two stages
    torch.manual_seed(args.seed)  # the same initial weights on every rank (FSDP does not broadcast them)
    stage = Stage(args, ckpt)

    # precision: bf16 needs no loss scaling; fp16 does; CPUs train in fp32
    cuda = device.startswith("cuda")
    if args.precision == "auto":
        args.precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    args.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    autocast = partial(torch.autocast, device.split(":")[0], dtype=args.dtype, enabled=args.dtype != torch.float32)
    scaler = torch.amp.GradScaler(enabled=args.dtype == torch.float16)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    raw = stage.model.to(device)
    blocks = getattr(raw, "layers", [])
    if args.grad_ckpt:
        for block in blocks:
            block.forward = partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)
    names = [n for n, _ in raw.named_parameters()]
    ema = [p.detach().clone().float() for p in raw.parameters()] if args.ema else None
    if args.compile:
        raw = torch.compile(raw)
    model = wrap(raw, args, device, world, blocks)
    # GPT's AdamW recipe (decay on >= 2-D weights only) serves the tokenizer and its discriminator too
    adamw = partial(GPT.configure_optimizers, weight_decay=args.weight_decay, learning_rate=args.lr,
                    betas=(0.9, 0.95), device_type=device.split(":")[0])
    opt = adamw(model)
    disc = opt_d = None
    if stage.disc is not None:
        stage.crit.to(device)  # the discriminator and the frozen LPIPS network
        disc = wrap(stage.disc, args, device, world, [])
        opt_d = adamw(disc)

    # data: per-item seeding makes the stream independent of world size and of restarts
    n_train = len(stage.train_set)
    total = args.max_steps or math.ceil(args.epochs * n_train / args.batch_size)
    step = 0
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if ckpt:
        set_state_dict(model, opt, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
        if disc is not None:
            set_state_dict(disc, opt_d, model_state_dict=ckpt["discriminator"],
                           optim_state_dict=ckpt["optimizer_disc"], options=StateDictOptions(full_state_dict=True))
        if ema is not None:
            ema = [ckpt["ema"][n].to(device) for n in names]
        step = ckpt["step"]
    rng = ckpt["rng"] if ckpt and len(ckpt["rng"]) == world else None
    if rng:  # dropout continues exactly; a different world size reseeds instead
        torch.set_rng_state(rng[rank]["cpu"])
        if cuda:
            torch.cuda.set_rng_state(rng[rank]["cuda"])
    else:
        torch.manual_seed(args.seed * world + rank + step)
    sampler = GlobalBatches(n_train, args.batch_size, args.grad_accum, rank, world, args.seed, step)
    loader = torch.utils.data.DataLoader(Seeded(stage.train_set), batch_sampler=sampler,
                                         num_workers=args.num_workers, pin_memory=cuda,
                                         persistent_workers=args.num_workers > 0,
                                         generator=torch.Generator().manual_seed(args.seed))  # not the dropout RNG
    batches = iter(loader)
    move = lambda batch: [t.to(device, non_blocking=True) for t in batch]

    def evaluate():
        """Mean of stage.val_metric over the held-out items, each rank taking a shard."""
        model.eval()
        vals, val_set = torch.zeros(2, device=device), Seeded(stage.val_set)  # the same views every time
        idx = list(range(rank, len(stage.val_set), world))
        with torch.no_grad(), autocast():
            for i in range(0, len(idx), max(1, args.batch_size // world)):
                chunk = idx[i:i + max(1, args.batch_size // world)]
                batch = move(torch.utils.data.default_collate([val_set[(j, j)] for j in chunk]))
                vals += torch.stack([stage.val_metric(model, batch).float() * len(chunk),
                                     torch.tensor(float(len(chunk)), device=device)])
        if world > 1:
            dist.all_reduce(vals)
        model.train()
        return (vals[0] / vals[1]).item()

    def save():
        """Everything needed to continue exactly; consolidated so that from_pretrained loads it too."""
        msd, osd = get_state_dict(model, opt, options=full)
        state = dict(model=msd, optimizer=osd, step=step, samples_seen=step * args.batch_size,
                     config=dataclasses.asdict(stage.config), kind=stage.kind, meta=stage.meta,
                     args={k: v for k, v in vars(args).items() if k != "dtype"})
        if disc is not None:
            state["discriminator"], state["optimizer_disc"] = get_state_dict(disc, opt_d, options=full)
        if ema is not None:  # the averaged weights, under the model's own parameter names
            state["ema"] = {n: t.cpu() for n, t in zip(names, ema)}
        rngs = [None] * world
        mine = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if cuda else {})}
        dist.all_gather_object(rngs, mine) if world > 1 else rngs.__setitem__(0, mine)
        state["rng"] = rngs
        if master:
            save_atomic(state, ckpt_path)
            if args.keep_ckpts:
                save_atomic(state, os.path.join(args.out_dir, f"ckpt_{step:07d}.pt"))

    units = args.batch_size * stage.items_to_units
    bar = tqdm(total=total, initial=step, disable=not master, dynamic_ncols=True, desc=args.model)
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
    log = open(os.path.join(args.out_dir, "log.jsonl"), "a") if master else None
    sums, counts = {}, {}  # logged scalars summed on the device since the last log line

    def note(logs, weight=1.0):
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float() * weight
            counts[k] = counts.get(k, 0.0) + weight

    def read_logs():
        """Means since the last line, averaged over ranks: the one place where the CPU waits for the GPU."""
        keys = sorted(sums, key=lambda k: (k != "loss", k))  # the same on every rank: they depend on the step
        means = torch.stack([sums[k] / counts[k] for k in keys])
        if world > 1:
            dist.all_reduce(means, op=dist.ReduceOp.AVG)
        sums.clear()
        counts.clear()
        return dict(zip(keys, means.tolist()))

    model.train()
    t0, logged = time.perf_counter(), step  # time and step of the last log line
    while step < total:
        lr = lr_at(step, args, total)
        for group in opt.param_groups + (opt_d.param_groups if opt_d else []):
            group["lr"] = lr
        train_disc = disc is not None and stage.crit.gan_active(step)
        for micro in range(args.grad_accum):
            last = micro == args.grad_accum - 1
            batch = move(next(batches))
            # all-reduce gradients only on the last micro-batch of a step
            sync = contextlib.nullcontext() if last or not isinstance(model, DDP) else model.no_sync()
            with sync:
                with autocast():
                    loss, logs = stage.loss(model, batch, step)
                scaler.scale(loss / args.grad_accum).backward()
            note({"loss": loss, **logs}, 1 / args.grad_accum)
            if train_disc:
                dsync = contextlib.nullcontext() if last or not isinstance(disc, DDP) else disc.no_sync()
                with dsync:
                    with autocast():
                        d_loss, d_logs = stage.disc_loss(disc, step)
                    scaler.scale(d_loss / args.grad_accum).backward()
                note(d_logs, 1 / args.grad_accum)
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP returns a DTensor
        if scaler.is_enabled():  # fp16: the scaler skips steps with inf/nan gradients; average the others
            finite = torch.isfinite(norm)
            note({"grad_norm": torch.where(finite, norm, 0.0)}, finite.float())
        else:  # a non-finite norm here means non-finite weights after this step: caught below
            note({"grad_norm": norm})
        scaler.step(opt)
        if train_disc:
            scaler.unscale_(opt_d)
            torch.nn.utils.clip_grad_norm_(disc.parameters(), args.grad_clip or float("inf"))
            scaler.step(opt_d)
            opt_d.zero_grad(set_to_none=True)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            torch._foreach_lerp_(ema, [p.detach().float() for p in raw.parameters()], 1 - args.ema)
        step += 1
        bar.update(1)
        evaluating = step % args.eval_interval == 0 or step == total
        saving = step % args.ckpt_interval == 0 or step == total
        if not (step % args.log_interval == 0 or evaluating or saving):
            continue
        # a log line before every checkpoint, so a diverged run never overwrites the last good one
        rec = dict(step=step, **read_logs(), lr=lr)
        if not math.isfinite(rec["loss"]) or not (scaler.is_enabled() or math.isfinite(rec["grad_norm"])):
            raise UserError(f"loss {rec['loss']}, grad norm {rec['grad_norm']} by step {step}; the last good "
                            f"checkpoint is {ckpt_path}. Lower --lr, or use --precision bf16/fp32, then --resume")
        rec[f"{stage.unit}/s"] = units * (step - logged) / (time.perf_counter() - t0)
        if cuda and stage.kind == "gpt":
            rec["mfu"] = getattr(raw, "_orig_mod", raw).estimate_mfu(rec[f"{stage.unit}/s"] / world, device)
        if evaluating:
            rec["val"] = evaluate()
        if master:
            bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items() if k != "step" and v is not None})
            if evaluating:
                bar.write(f"step {step}: {stage.val_metric.__doc__.split(' in ')[0].lower()} {rec['val']:.4f}")
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if saving:
            save()
        t0, logged = time.perf_counter(), step  # throughput leaves out validation and checkpoint time
    bar.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    cli(main)
