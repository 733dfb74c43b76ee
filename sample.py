"""Pictures from a trained LlamaGen: the GPT writes a grid of codes one token at a time, the tokenizer's
decoder turns the grid into pixels (paper 2.1-2.3).

    python sample.py --class 0 1 2 --n 4                       # demo models: a PNG grid, one row per class
    python sample.py --class 3 --progress drawing.gif          # watch the raster being written
    python sample.py --gpt-ckpt c2i_L_384.pt --vq-ckpt vq_ds16_c2i.pt --class 207 360 387
    torchrun --nproc_per_node=8 sample.py --gpt-ckpt c2i_B_256.pt --vq-ckpt vq_ds16_c2i.pt \\
        --num-samples 50000 --cfg-scale 2.0 --out samples.npz  # ADM-format .npz for fid.py

Without --gpt-ckpt/--vq-ckpt it uses the demo's models (results/demo/). Checkpoints are ours (train.py)
or the official releases; the image size is the one the GPT was trained at unless --image-size says so.
"""
import argparse
import json
import math
import os
import re
import shutil
import tempfile
import time
import zipfile
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from common import UserError, cli, pick_device, save_atomic
from data import from_uint8, make_grid, save_grid, to_uint8, tokenizer_checksum
from model import GPT
from tokenizer import VQModel

DEMO_GPT = "results/demo/gpt.pt"  # written by the demo; the default models when no checkpoint is given
DEMO_VQ = "results/demo/vq.pt"
OFFICIAL_URL = "https://huggingface.co/FoundationVision/LlamaGen/resolve/main/"
OFFICIAL_GPTS = ["c2i_B_256.pt", "c2i_B_384.pt", "c2i_L_256.pt", "c2i_L_384.pt", "c2i_XL_384.pt",
                 "c2i_XXL_384.pt", "c2i_3B_384.pt"]  # ImageNet 1000 classes; the number is the image size
OFFICIAL_VQ = "vq_ds16_c2i.pt"
DEMO_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # the official demo's ImageNet classes


# ----------------------------------------------------------------------------------------------------------
# Sampling: codes from the GPT, pixels from the tokenizer

def decode(vq, codes, resize_to=None, block_size=None):
    """Codes [B, t] in raster order -> uint8 [B, H, W, 3]. A partial raster (t < block_size, for the progress
    animation) is completed with the codes of a plain grey picture, since the decoder needs a full grid,
    and the cells not yet written are then painted exactly mid-grey; the decoder's receptive field still
    lets the written cells change a little as their neighbours arrive. With every token written this is
    the plain decode."""
    B, t = codes.shape
    L = block_size or t
    g = math.isqrt(L)
    if t < L:
        grey = vq.encode(torch.zeros(1, 3, g * vq.config.downsample, g * vq.config.downsample, device=codes.device))
        codes = torch.cat([codes, grey.view(1, L)[:, t:].expand(B, -1)], dim=1)
    x = vq.decode(codes.view(B, g, g)).float()
    if t < L:
        cell = x.shape[-1] // g
        written = (torch.arange(L, device=x.device) < t).view(g, g)
        x = x * written.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return to_uint8(x, resize_to)


@torch.no_grad()
def sample_images(gpt, vq, labels, cfg_scale=1.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0,
                  generator=None, resize_to=None, callback=None):
    """Images of the classes `labels` (list or int64 tensor [B]) as uint8 [B, H, W, 3]. The tokenizer runs in
    float32 whatever the GPT's dtype; callback(t, codes[:, :t]) is GPT.generate's, after each token."""
    device = next(gpt.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    codes = gpt.generate(labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature,
                         top_k=top_k, top_p=top_p, generator=generator, callback=callback)
    return decode(vq, codes, resize_to)


def batch_seed(seed, index):
    """A seed for batch `index` of a run seeded `seed`. SeedSequence mixes the pair into independent
    streams (seed + index would make run 1's batch 0 equal run 0's batch 1). A batch's pictures depend on
    (seed, index, batch size) only, not on how many processes share the work."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_npz(f, **arrays):
    """np.savez (uncompressed, what the ADM evaluator streams) with a fixed timestamp on each member, so
    the same samples always give the same bytes (np.savez stamps the current time)."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, a in arrays.items():
            with z.open(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as m:
                np.lib.format.write_array(m, np.ascontiguousarray(a))


# ----------------------------------------------------------------------------------------------------------
# Loading and checking the inputs

NO_WEIGHTS = f"""no --gpt-ckpt/--vq-ckpt given and no demo models at {DEMO_GPT}, {DEMO_VQ}.
Run the demo to train small models there, or use the official LlamaGen weights ({OFFICIAL_URL}):
  tokenizer: {OFFICIAL_VQ}
  GPT (ImageNet classes, _256/_384 = image size): {' '.join(OFFICIAL_GPTS)}
  e.g.  wget {OFFICIAL_URL}{OFFICIAL_VQ} {OFFICIAL_URL}c2i_L_384.pt
        python sample.py --gpt-ckpt c2i_L_384.pt --vq-ckpt {OFFICIAL_VQ} --class 207"""


def load_models(gpt_path, vq_path, image_size=None):
    """Both models on the CPU in eval mode, checked against each other: the GPT's words must be the
    tokenizer's codes (vocab = codebook size) and its grid a whole number of the tokenizer's cells."""
    if gpt_path is None and vq_path is None:
        if not (os.path.isfile(DEMO_GPT) and os.path.isfile(DEMO_VQ)):
            raise UserError(NO_WEIGHTS)
        gpt_path, vq_path = DEMO_GPT, DEMO_VQ
    elif gpt_path is None or vq_path is None:
        raise UserError("pass both --gpt-ckpt and --vq-ckpt: a GPT's codes mean something only to the "
                        "tokenizer it was trained with")
    vq = VQModel.from_pretrained(vq_path)
    ds = vq.config.downsample
    if image_size is not None and (image_size <= 0 or image_size % ds):
        raise UserError(f"--image-size {image_size} is not a multiple of the tokenizer's downsampling "
                        f"factor {ds}; use e.g. {max(1, round(image_size / ds)) * ds}")
    gpt = GPT.from_pretrained(gpt_path, image_size=image_size, downsample=ds)
    if gpt.config.vocab_size != vq.config.codebook_size:
        raise UserError(f"the GPT {gpt_path} predicts {gpt.config.vocab_size} codes but the tokenizer "
                        f"{vq_path} has {vq.config.codebook_size}: pass the tokenizer the GPT was trained with")
    meta = gpt.meta
    if meta.get("image_size") and meta.get("grid"):
        trained, grid = meta["grid"][0], meta["image_size"] // ds  # this tokenizer's grid at that size
        if grid != trained:
            raise UserError(f"the GPT {gpt_path} learned {trained}x{trained} grids of {meta['image_size']} px "
                            f"images, but the tokenizer {vq_path} cuts them into {grid}x{grid}: pass the "
                            "tokenizer the GPT was trained with")
        if image_size is not None and image_size // ds != trained:
            raise UserError(f"--image-size {image_size} means {image_size // ds}x{image_size // ds} tokens, but "
                            f"the GPT {gpt_path} learned {trained}x{trained}: drop --image-size or use "
                            f"{trained * ds}")
    if meta.get("tokenizer_checksum") and meta["tokenizer_checksum"] != tokenizer_checksum(vq):
        raise UserError(f"the GPT {gpt_path} was trained on the codes of another tokenizer than {vq_path} "
                        "(weights checksum differs): pass the tokenizer its codes were extracted with")
    return gpt, vq, gpt_path, vq_path


def check_writable(path):
    """Fail before minutes of sampling, not after: the folder must exist (or be creatable) and take a file."""
    if os.path.isdir(path):
        raise UserError(f"output {path!r} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"cannot write to {path!r} ({e.strerror}); choose a writable location") from None


# ----------------------------------------------------------------------------------------------------------
# The two jobs: a picture (+ animation), and an evaluation set sharded over torchrun processes

def pictures(args, gpt, vq, sample_kw):
    """One row per class (rows of 8 for a single class), batches seeded by (seed, batch index)."""
    labels = [c for c in args.classes for _ in range(args.n)]
    L = gpt.config.block_size
    n_frames = min(args.progress_frames, L)
    steps = [math.ceil(k * L / n_frames) for k in range(1, n_frames + 1)]  # tokens written at each frame
    images, shots, t0 = [], [], time.perf_counter()  # shots: per batch, {t: codes [B, t] after t tokens}
    # one step = one more token in every image of the batch
    bar = tqdm(total=math.ceil(len(labels) / args.batch_size) * L, desc="drawing", unit="step", dynamic_ncols=True)
    for b in range(0, len(labels), args.batch_size):
        shots.append({})

        def step(t, codes, shot=shots[-1]):
            bar.update()
            if args.progress and t in steps:
                shot[t] = codes.clone()
        gen = torch.Generator(args.device).manual_seed(batch_seed(args.seed, b // args.batch_size))
        images.append(sample_images(gpt, vq, labels[b:b + args.batch_size], generator=gen, callback=step,
                                    **sample_kw))
    bar.close()
    images = np.concatenate(images)
    report(0, len(images), time.perf_counter() - t0, L, args)
    nrow = args.n if len(args.classes) > 1 and args.n > 1 else 8
    save_grid(from_uint8(images), args.out, nrow=nrow)
    if args.progress:
        frames = []
        for t in steps:  # one grid per snapshot, every image at the same step of its raster
            partial = np.concatenate([decode(vq, s[t], sample_kw["resize_to"], L) for s in shots])
            frames.append(make_grid(from_uint8(partial), nrow))
        # the last frame (all tokens) holds for 2 s, so a looping viewer shows the result
        durations = [80] * (len(frames) - 1) + [2000]
        save_atomic(lambda f: frames[0].save(
            f, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0), args.progress)


def evaluation(args, gpt, vq, sample_kw, rank, world):
    """args.num_samples images of labels drawn from the classes: uniformly at random (the official
    evaluation's protocol), or cycling through them (--labels balanced: 50 per class for 50k of 1000). Batch b
    holds samples [b*bs, (b+1)*bs). Rank r draws every world-th unfinished batch and saves each atomically
    in <out>.parts/; a rerun skips finished ones; rank 0 gathers the final .npz and deletes the parts."""
    N, bs = args.num_samples, args.batch_size
    classes = torch.tensor(args.classes)
    if args.labels == "balanced":
        labels = classes[torch.arange(N) % len(classes)]
    else:  # all drawn up front from --seed, so they do not depend on the number of processes
        labels = classes[torch.randint(len(classes), (N,), generator=torch.Generator().manual_seed(args.seed))]
    parts, n_batches = args.out + ".parts", math.ceil(N / bs)
    # the settings that decide the pixels: parts made with others must not be mixed in
    stamp = {k: getattr(args, k) for k in ("num_samples", "classes", "labels", "batch_size", "seed",
                                           "cfg_scale", "cfg_interval", "temperature", "top_k", "top_p",
                                           "image_size", "resize_to", "precision")}
    stamp.update(gpt_ckpt=os.path.abspath(args.gpt_ckpt), vq_ckpt=os.path.abspath(args.vq_ckpt))
    stamp_path = os.path.join(parts, "settings.json")
    if os.path.isfile(stamp_path):
        with open(stamp_path) as f:
            old = json.load(f)
        old.setdefault("labels", "balanced")  # parts written before --labels existed cycled through the classes
        if old != stamp:
            diff = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in stamp.items() if old.get(k) != v)
            raise UserError(f"{parts} holds samples made with other settings ({diff}); rerun with the same "
                            "flags to resume, or delete that folder to start over")
    elif rank == 0:
        save_atomic(lambda f: f.write(json.dumps(stamp).encode()), stamp_path)
    done = {int(n[:6]) for n in os.listdir(parts) if re.fullmatch(r"\d{6}\.npz", n)} if os.path.isdir(parts) else set()
    if world > 1:
        dist.barrier()  # every rank has listed the finished batches before any rank adds one
    todo = [b for b in range(n_batches) if b not in done][rank::world]
    if rank == 0 and done:
        print(f"resuming: {len(done)} of {n_batches} batches already in {parts}")
    t0, made = time.perf_counter(), 0
    for b in tqdm(todo, disable=rank != 0, desc="sampling", unit="batch", dynamic_ncols=True):
        lab = labels[b * bs:(b + 1) * bs]
        gen = torch.Generator(args.device).manual_seed(batch_seed(args.seed, b))
        images = sample_images(gpt, vq, lab, generator=gen, **sample_kw)
        save_atomic(lambda f: write_npz(f, arr_0=images, arr_1=lab.numpy()), os.path.join(parts, f"{b:06d}.npz"))
        made += len(lab)
    report(rank, made, time.perf_counter() - t0, gpt.config.block_size, args)
    if world > 1:
        dist.barrier()
    if rank != 0:
        return
    out, out_labels = None, np.empty(N, np.int64)
    for b in tqdm(range(n_batches), desc="gathering", unit="batch", disable=n_batches < 100):
        path = os.path.join(parts, f"{b:06d}.npz")
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing (did a process fail?); rerun the same command to finish it")
        with np.load(path) as z:
            if out is None:
                out = np.empty((N, *z["arr_0"].shape[1:]), np.uint8)
            out[b * bs:(b + 1) * bs], out_labels[b * bs:(b + 1) * bs] = z["arr_0"], z["arr_1"]
    # arr_0 is what the ADM evaluator reads; it ignores arr_1, the labels
    save_atomic(lambda f: write_npz(f, arr_0=out, arr_1=out_labels), args.out)
    shutil.rmtree(parts)
    print(f"wrote {args.out}: arr_0 {out.dtype} {tuple(out.shape)}, labels (arr_1) {args.labels} over "
          f"{len(classes)} classes")


def report(rank, n, seconds, tokens_per_image, args):
    """Sampling speed (generation + decoding, without file writing) of this process."""
    if rank == 0 and n:
        print(f"{n} images in {seconds:.1f} s on {args.device} ({args.precision}): {seconds / n:.3f} s/image, "
              f"{n * tokens_per_image / seconds:,.0f} tokens/s" + (" per process" if args.world > 1 else ""))


# ----------------------------------------------------------------------------------------------------------
# command line

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--gpt-ckpt", default=None, help=f"GPT: ours (train.py) or an official c2i_*.pt (default: {DEMO_GPT})")
    a("--vq-ckpt", default=None, help=f"tokenizer: ours or the official {OFFICIAL_VQ} (default: {DEMO_VQ})")
    a("--class", dest="classes", type=int, nargs="+", default=None,
      help="class ids to draw (default: the official demo's 8 ImageNet classes if the GPT has them, else all "
           "its classes); with --num-samples, every class unless given, and the labels are drawn from them")
    a("--n", type=int, default=4, help="pictures per class (default: 4)")
    a("--out", default=None, help="PNG grid to write (default: samples/class<ids>.png), or the .npz with "
      "--num-samples (default: samples/samples<N>.npz)")
    a("--cfg-scale", type=float, default=None, help="classifier-free guidance scale s (paper 2.3): 1 = off, "
      "0 = the null class alone (unconditional); the official code treats every s <= 1 as off. Pictures: "
      "default 4.0, as the official demo. Evaluation: required (paper FIDs: 2.0 for B and L)")
    a("--cfg-interval", type=int, default=-1, help="-1: guide every token; k >= 0: only tokens 0..k+1, then "
      "the conditional logits alone (the official semantics)")
    a("--temperature", type=float, default=1.0, help="softmax temperature (default: 1.0)")
    a("--top-k", type=int, default=None, help="sample among the k most likely codes only, 0 = all (default: "
      "2000 for pictures, as the official demo; 0 for --num-samples, as the official FID runs)")
    a("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this mass (1 = all)")
    a("--seed", type=int, default=0, help="batch b is seeded from (seed, b), whatever the number of processes")
    a("--image-size", type=int, default=None, help="pixels per side, (size/downsample)^2 tokens (default: "
      "the size the GPT was trained at: recorded in ours, _256/_384 in official file names)")
    a("--resize-to", type=int, default=None, help="resize the images bicubically to this size, e.g. 256 for "
      "384 px models before FID, as the official evaluation did")
    a("--batch-size", type=int, default=32, help="images per forward pass (doubled inside under CFG)")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
      help="GPT weights' dtype (auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU/MPS); "
           "the tokenizer always decodes in fp32")
    a("--compile", action="store_true", help="torch.compile the GPT's one-token step (slow start, faster steps)")
    a("--device", default="auto", help="cuda, mps or cpu (default: the best available)")
    a("--progress", default=None, metavar="GIF", help="also write an animation of the rasters being written")
    a("--progress-frames", type=int, default=32, help="frames of --progress, at most one per token (default: 32)")
    a("--num-samples", type=int, default=None, help="evaluation: write exactly this many images as uint8 "
      "NHWC arr_0 (labels arr_1) in --out; resumable; run it under torchrun")
    a("--labels", choices=["random", "balanced"], default="random", help="evaluation labels: uniformly random "
      "over the classes, as the official evaluation (default), or cycling through them, N/classes each")
    return p.parse_args(argv)


def check_args(args):
    if args.num_samples is not None:
        if args.cfg_scale is None:
            raise UserError("evaluation runs need an explicit --cfg-scale (paper: 2.0 for B and L, 1.75 for XL "
                            "and XXL, 1.65 for 3B; 1 = no guidance)")
        if args.num_samples < 1:
            raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
        if args.progress:
            raise UserError("--progress animates pictures; drop it for --num-samples runs")
    elif args.world > 1:
        raise UserError("torchrun is for --num-samples evaluation runs; draw pictures with plain python")
    for name, ok in [("n", args.n >= 1), ("batch_size", args.batch_size >= 1), ("top_k", args.top_k >= 0),
                     ("progress_frames", args.progress_frames >= 1), ("temperature", args.temperature > 0),
                     ("top_p", 0 < args.top_p <= 1), ("resize_to", args.resize_to is None or args.resize_to > 0)]:
        if not ok:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} is out of range; see --help")


@torch.no_grad()  # sampling only: no autograd graph (and none left switched off for the caller)
def main(argv=None):
    args = get_args(argv)
    rank, args.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.top_k is None:
        args.top_k = 0 if args.num_samples else 2000
    check_args(args)
    if args.num_samples is None and args.cfg_scale is None:
        args.cfg_scale = 4.0
    device = pick_device(args.device)
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    args.device = device
    if args.precision == "auto":
        args.precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.startswith("cuda") else "fp32"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    gpt, vq, args.gpt_ckpt, args.vq_ckpt = load_models(args.gpt_ckpt, args.vq_ckpt, args.image_size)
    args.image_size = math.isqrt(gpt.config.block_size) * vq.config.downsample
    C = gpt.config.num_classes
    if args.classes is None:  # evaluation covers every class; pictures show the official demo's
        args.classes = DEMO_CLASSES if max(DEMO_CLASSES) < C and not args.num_samples else list(range(C))
    bad = [c for c in args.classes if not 0 <= c < C]
    if bad:
        raise UserError(f"class {bad[0]} is outside [0, {C}): this GPT knows {C} classes; pick ids 0..{C - 1}")
    if args.out is None:
        args.out = (f"samples/samples{args.num_samples}.npz" if args.num_samples else
                    "samples/class" + "-".join(map(str, args.classes)) + ".png")
    for path in (args.out, args.progress):
        if path:
            check_writable(path)

    gpt, vq = gpt.to(device=device, dtype=dtype), vq.to(device)
    if args.compile:  # generation loops over this one-token step; compile it, not the Python loop around it
        gpt.forward_cached = torch.compile(gpt.forward_cached)
    sample_kw = dict(cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, resize_to=args.resize_to)
    if args.num_samples is None:
        pictures(args, gpt, vq, sample_kw)
        print(f"wrote {args.out}" + (f" and {args.progress}" if args.progress else ""))
        return
    if args.world > 1:  # only barriers cross processes, so gloo serves GPUs too; long waits are normal
        dist.init_process_group("gloo", timeout=timedelta(hours=6))
    try:
        evaluation(args, gpt, vq, sample_kw, rank, args.world)
    finally:
        if args.world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    cli(main)
