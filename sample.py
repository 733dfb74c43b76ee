"""Pictures from a trained LlamaGen: the GPT writes a grid of codes one token at a time, the
tokenizer's decoder turns the grid into pixels (paper 2.1-2.3).

    python sample.py --class 0 1 2 --per-class 4             # demo models: one row per class
    python sample.py --class 3 --progress drawing.gif          # watch the raster being written
    python sample.py --gpt-ckpt c2i_L_384.pt --vq-ckpt vq_ds16_c2i.pt --class 207 360 387
    torchrun --nproc_per_node=8 sample.py --gpt-ckpt c2i_B_256.pt --vq-ckpt vq_ds16_c2i.pt \\
        --num-samples 50000 --cfg-scale 2.0 --out samples.npz  # ADM-format .npz for fid.py

Without --gpt-ckpt/--vq-ckpt it uses the demo's models (results/demo/). Checkpoints are ours
(train.py) or the official releases, which may be named alone: one not on disk is fetched once
into torch's hub cache. Text-to-image GPTs draw --prompt captions (t2i.py).

Two jobs share the code. Pictures (the default) are for looking at: a few classes, strong guidance
(cfg 4) and top-k 2000, as the official demo draws them. An evaluation set (--num-samples) is for
measuring: tens of thousands of images with the settings of the paper's FID runs (top-k 0, its
guidance scales), stored as ADM's evaluator reads them, sharded over torchrun processes and
resumable. Batch b is seeded by (--seed, b) alone, whatever the processes, their order or resumes.
"""
import argparse
import json
import math
import os
import re
import shutil
import time
import zipfile
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

import clip
import decoding
import t2i
from codes import CodesReceipt, encoder_checksum
from common import (SEED, UserError, at_least, between, check_flags, check_writable, cli,
                    from_uint8, json_checksum, load_checkpoint, make_grid, progress, rank_world,
                    read_json, resolve_precision, save_atomic, save_grid, say, setup_device,
                    to_uint8, weights_checksum, weights_file)
from data import check_image_size
from model import GPT
from text import read_lines
from tokenizer import VQModel, tokenizer_checksum

DEMO_GPT = "results/demo/gpt.pt"  # written by the demo; the default models when none is given
DEMO_VQ = "results/demo/vq.pt"
DEMO_CLIP = "results/demo/clip.pt"  # the re-ranker, when the demo has trained one
DEMO_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # the official demo's ImageNet classes


# ------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_images(gpt, vq, labels, resize_to=None, condition=None, passes=None, **knobs):
    """uint8 [B, H, W, 3] images of `labels` (class ids; prompt indices for a text GPT, `condition`
    giving their (features, mask)) by decoding.generate with `knobs` (cfg_scale, top_k, generator,
    sampler, ...); `passes` gets the batch's forward passes. The tokenizer decodes in float32
    whatever the GPT's dtype, so its pixels match any GPU's."""
    device = next(gpt.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    cond, mask = condition(labels) if condition is not None else (labels, None)
    codes, n_passes = decoding.generate(gpt, cond, cond_mask=mask, return_passes=True, **knobs)
    if passes is not None:
        passes.append(n_passes)
    return decode(vq, codes, resize_to)


def batch_seed(seed, index):
    """A seed in [0, 2^32) for batch `index` of a run seeded `seed`. SeedSequence mixes the pair
    into independent streams (seed + index would make run 1's batch 0 run 0's batch 1)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def decode(vq, codes, resize_to=None):
    """Codes [B, L] in raster order (L a square) -> uint8 [B, H, W, 3] by common.to_uint8."""
    b, length = codes.shape
    side = math.isqrt(length)  # the GPT writes a flat raster; the decoder wants the grid back
    return to_uint8(vq.decode(codes.view(b, side, side)).float(), resize_to)


# ------------------------------------------------------------------------------------- pictures
def picture_grid(args, gpt, vq, sample_kw):
    """args.out: a PNG grid, a row per class, batch b seeded by (seed, b); --progress: a GIF too."""
    # class-major: a class's pictures fill one grid row (and its --candidates are one block)
    labels = [k for k in args.classes for _ in range(args.per_class)]
    length = gpt.config.block_size
    steps = progress_steps(length, args.progress_frames) if args.progress else []
    images, shots, t0 = [], [], time.perf_counter()  # shots: per batch, {t: codes [B, t]}
    bar = progress(total=math.ceil(len(labels) / args.batch_size) * length, desc="drawing",
                   unit="step")
    for b in range(0, len(labels), args.batch_size):
        shots.append({})

        # after every token (Jacobi decoding may accept several: t can jump past a frame's step);
        # the defaults bind this batch's dict and a fresh count of the tokens reported
        def step(t, codes, shot=shots[-1], done=[0]):
            bar.update(t - done[0])
            for s in steps:
                if done[0] < s <= t:
                    shot[s] = codes[:, :s].clone()
            done[0] = t
        # a generator draws on its own device (CUDA's multinomial refuses a CPU one), so one seed
        # gives other pictures on a CPU than on a GPU
        gen = torch.Generator(args.device).manual_seed(batch_seed(args.seed, b // args.batch_size))
        images.append(sample_images(gpt, vq, labels[b:b + args.batch_size], generator=gen,
                                    callback=step, **sample_kw))
    bar.close()
    images = np.concatenate(images)
    report(0, len(images), time.perf_counter() - t0, length, args)
    images = rerank_grid(args, images)  # --candidates: each row keeps its --keep best, ranked
    nrow = args.per_class if len(args.classes) > 1 and args.per_class > 1 else 8
    save_grid(from_uint8(images), args.out, nrow=nrow)
    if args.progress:
        save_progress_gif(vq, shots, steps, length, nrow, sample_kw["resize_to"], args.progress)


def progress_steps(length, frames):
    """The token counts at which the GIF takes a frame: `frames` evenly spaced, at most one each."""
    n = min(frames, length)
    return [math.ceil(k * length / n) for k in range(1, n + 1)]


def raster_so_far(vq, codes, length, resize_to):
    """Codes [B, t] of an unfinished raster -> uint8 [B, H, W, 3], unwritten cells mid-grey: the
    decoder needs a full grid, so they are first filled with the codes of a grey picture."""
    b, t = codes.shape
    if t == length:
        return decode(vq, codes, resize_to)
    side = math.isqrt(length)
    pixels = side * vq.config.downsample
    grey = vq.encode(torch.zeros(1, 3, pixels, pixels, device=codes.device))
    codes = torch.cat([codes, grey.view(1, length)[:, t:].expand(b, -1)], dim=1)
    x = vq.decode(codes.view(b, side, side)).float()
    cell = x.shape[-1] // side
    written = (torch.arange(length, device=x.device) < t).view(side, side)
    x = x * written.repeat_interleave(cell, 0).repeat_interleave(cell, 1)  # 0 -> level 128
    return to_uint8(x, resize_to)


def save_progress_gif(vq, shots, steps, length, nrow, resize_to, path):
    """One grid per step, decoded from the saved rasters; the last frame holds 2 s when looping."""
    frames = [make_grid(from_uint8(np.concatenate([raster_so_far(vq, shot[t], length, resize_to)
                                                   for shot in shots])), nrow) for t in steps]
    # GIF frames hold 256 colours each; loop=0 repeats forever (without it most viewers play once)
    save_atomic(lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                                         duration=[80] * (len(frames) - 1) + [2000], loop=0), path)


# -------------------------------------------------------------------------------- evaluation set
def write_npz(f, **arrays):
    """np.savez (uncompressed, as ADM streams it), fixed timestamps: same samples, same bytes."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:  # 50k images > 4 GB
        for name, a in arrays.items():
            member = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            # streamed, its size unknown up front: force_zip64 lets a member pass 2 GiB
            with z.open(member, "w", force_zip64=True) as m:
                np.lib.format.write_array(m, np.ascontiguousarray(a))  # fid.py reads C order


def evaluation_labels(args):
    """The --num-samples labels, drawn up front from --seed on the CPU (whatever the processes):
    uniform over the classes as the official evaluation, or cycling (balanced, and prompts)."""
    classes, n = torch.tensor(args.classes), args.num_samples
    if args.prompt_list:
        return torch.arange(n) % len(args.prompt_list)
    if args.labels == "balanced":
        return classes[torch.arange(n) % len(classes)]
    return classes[torch.randint(len(classes), (n,), generator=torch.Generator().manual_seed(
        args.seed))]


def resume_stamp(args, parts, rank, gpt, vq, condition):
    """The settings that decide the pixels (PIXEL_FLAGS, inputs by their contents, not path) kept in
    <parts>/settings.json by rank 0, or checked against it: no .npz mixes other settings' parts."""
    reranker = getattr(args, "reranker", None)
    stamp = {**{k: getattr(args, k) for k in PIXEL_FLAGS}, "gpt_ckpt": weights_checksum(gpt),
             "vq_ckpt": tokenizer_checksum(vq), "prompts": json_checksum(args.prompt_list or []),
             "t5": hasattr(condition, "encoder") and encoder_checksum(condition.encoder),
             "clip": reranker and json_checksum([weights_checksum(reranker),
                                                  reranker.tokenizer.encoder])}
    path = os.path.join(parts, "settings.json")
    if os.path.isfile(path):
        old = read_json(path, f"the samples in {parts} cannot be matched to these settings; "
                        "delete that folder to start over")
        if old != stamp:
            diff = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in stamp.items()
                             if old.get(k) != v)
            raise UserError(f"{parts} holds samples made with other settings ({diff}); rerun with "
                            "the same flags to resume, or delete that folder to start over")
    elif rank == 0:
        save_atomic(lambda f: f.write(json.dumps(stamp).encode()), path)


def evaluation_npz(args, gpt, vq, sample_kw, rank, world):
    """args.out: an ADM .npz (uint8 NHWC arr_0, labels arr_1). Rank r draws every world-th
    unfinished batch into <out>.parts/ (a rerun skips finished ones); rank 0 gathers them."""
    n, bs = args.num_samples, args.batch_size
    labels, parts, n_batches = evaluation_labels(args), args.out + ".parts", math.ceil(n / bs)
    resume_stamp(args, parts, rank, gpt, vq, sample_kw["condition"])
    done = checked_parts(parts, n, bs, rank) if os.path.isdir(parts) else set()
    if world > 1:
        dist.barrier()  # every rank has listed the finished batches before any rank adds one
    # round-robin over the missing batches: a rerun may use another number of processes
    todo = [b for b in range(n_batches) if b not in done][rank::world]
    if rank == 0 and done:
        print(f"resuming: {len(done)} of {n_batches} batches already in {parts}")
    t0, made = time.perf_counter(), 0
    for b in progress(todo, show=rank == 0, desc="sampling", unit="batch"):
        batch_labels = labels[b * bs:(b + 1) * bs]
        gen = torch.Generator(args.device).manual_seed(batch_seed(args.seed, b))
        images = draw_best(args, gpt, vq, batch_labels, gen, sample_kw)
        save_atomic(lambda f: write_npz(f, arr_0=images, arr_1=batch_labels.numpy()),
                    os.path.join(parts, f"{b:06d}.npz"))
        made += len(batch_labels)
    report(rank, made, time.perf_counter() - t0, gpt.config.block_size, args)
    if world > 1:  # rank 0 gathers only once every rank's batches are on disk
        dist.barrier()
    if rank == 0:
        gather_parts(args, parts, n_batches)


def part_damage(path, count):
    """Why the part at `path` cannot be gathered, or None; from its zip directory, .npy headers."""
    try:
        with zipfile.ZipFile(path) as z:  # the directory sits at the end: a cut file fails here
            shapes = {}
            for name in ("arr_0", "arr_1"):
                info = z.getinfo(name + ".npy")
                with z.open(info) as m:  # .npy 1.0 has a 2-byte header length, 2.0 a 4-byte one
                    v = "1" if np.lib.format.read_magic(m) == (1, 0) else "2"
                    shape, _, dtype = getattr(np.lib.format, f"read_array_header_{v}_0")(m)
                    size = m.tell() + math.prod(shape) * dtype.itemsize  # header + data
                if info.file_size != size:
                    return f"{name} is cut short"
                shapes[name] = shape
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as e:
        return f"not a complete part ({type(e).__name__})"
    if shapes["arr_0"][:1] != (count,) or shapes["arr_1"] != (count,):
        return f"holds {shapes['arr_0'][:1]} images, not {count}"
    return None


def checked_parts(parts, n, bs, rank):
    """The finished batches whose parts are whole: a damaged one is drawn again, not gathered."""
    good, done = set(), {int(f[:6]) for f in os.listdir(parts) if re.fullmatch(r"\d{6}\.npz", f)}
    for b in sorted(b for b in done if b * bs < n):
        if (why := part_damage(os.path.join(parts, f"{b:06d}.npz"), min(bs, n - b * bs))) is None:
            good.add(b)
        elif rank == 0:  # every rank checks (each picks its share of the rest); one reports
            say(f"{parts}/{b:06d}.npz is damaged ({why}); sampling that batch again")
    return good


def gather_parts(args, parts, n_batches):
    """Rank 0's last step: the parts' batches -> one .npz at args.out, then no parts."""
    n, bs = args.num_samples, args.batch_size
    out, out_labels = None, np.empty(n, np.int64)  # images: allocated once their size is known
    for b in progress(range(n_batches), show=n_batches >= 100, desc="gathering", unit="batch"):
        if not os.path.isfile(path := os.path.join(parts, f"{b:06d}.npz")):
            raise UserError(f"{path} is missing (did a process fail?); rerun the same command to "
                            "finish it")
        with np.load(path) as z:
            if out is None:
                out = np.empty((n, *z["arr_0"].shape[1:]), np.uint8)
            out[b * bs:(b + 1) * bs], out_labels[b * bs:(b + 1) * bs] = z["arr_0"], z["arr_1"]
    # the ADM evaluator reads arr_0; arr_1, the labels, serves class-wise checks
    save_atomic(lambda f: write_npz(f, arr_0=out, arr_1=out_labels), args.out)
    shutil.rmtree(parts)  # only once the .npz is in place: a crash while gathering loses nothing
    print(f"wrote {args.out}: arr_0 {out.dtype} {tuple(out.shape)}, labels (arr_1) {args.labels} "
          f"over {len(args.classes)} classes")


def report(rank, n, seconds, tokens_per_image, args):
    """Sampling speed (generation and decoding) of this process's n images of this run."""
    if rank == 0 and n:
        per = " per process" if args.world > 1 else ""
        print(f"{n} images in {seconds:.1f} s on {args.device} ({args.precision}): "
              f"{seconds / n:.3f} s/image, {n * tokens_per_image / seconds:,.0f} tokens/s" + per)
        if args.sampler == "jacobi" and args.passes:  # a batch's images share its passes
            p = args.passes
            print(f"jacobi, window {args.window}: {sum(p) / len(p):.1f} forward passes per image "
                  f"(min {min(p)}, max {max(p)} over {len(p)} batches; sequential: "
                  f"{tokens_per_image})")


# ----------------------------------------------------------------------------------- re-ranking
# Re-ranking by CLIP (DALL-E, Ramesh et al. 2021, 2.5): draw N candidates per prompt and keep the K
# that CLIP finds most similar to it (clip.rerank_candidates). Class models are prompted with
# their class names ("a red circle"), text models with their prompts.
def class_prompts(gpt, classes):
    """{class id: "a <class name>"} from the names our checkpoints carry in their codes receipt;
    official ImageNet checkpoints know their classes by id only, so there is no text to score."""
    receipt = CodesReceipt.from_dict(gpt.meta, "the GPT checkpoint") if gpt.meta else None
    if receipt is None or len(receipt.classes) != gpt.config.num_classes:
        raise UserError("--candidates scores each class by its name, and this GPT carries no "
                        "class names (official checkpoints know ImageNet classes by id only); "
                        "use a GPT trained here")
    return {k: f"a {receipt.classes[k]}".replace("_", " ") for k in classes}  # "red_circle"


def setup_reranker(args, gpt):
    """With --candidates: the CLIP (on the GPT's device) and the text of every row drawn."""
    if args.candidates:
        args.prompts_of = (dict(enumerate(args.prompt_list)) if args.prompt_list
                           else class_prompts(gpt, args.classes))
        model, tokenizer = clip.load(args.clip)
        args.reranker = model.to(args.device)
        args.reranker.tokenizer = tokenizer


def rerank_grid(args, images):
    """Pictures: each row's N candidates -> its K best, best first, their scores printed."""
    if not args.candidates:
        return images
    t0, texts = time.perf_counter(), [args.prompts_of[k] for k in args.classes]
    kept, scores = clip.rerank_candidates(images, texts, args.reranker, args.keep)
    print(f"CLIP kept {args.keep} of {args.candidates} per row in "
          f"{time.perf_counter() - t0:.1f} s; scores (100 x cosine), best first:")
    for text, row in zip(texts, scores.tolist()):
        print(f"  {text}: " + " ".join(f"{v:.1f}" for v in row))
    args.per_class = args.keep
    return kept


def draw_best(args, gpt, vq, labels, gen, sample_kw):
    """An evaluation batch: one image per label, or with --candidates the best of N each, drawn
    --batch-size at a time from this batch's generator (so the batch depends on (seed, b) alone)."""
    if not args.candidates:
        return sample_images(gpt, vq, labels, generator=gen, **sample_kw)
    many = labels.repeat_interleave(args.candidates)  # prompt-major: a label's N are adjacent
    drawn = np.concatenate([sample_images(gpt, vq, many[i:i + args.batch_size], generator=gen,
                                          **sample_kw)
                            for i in range(0, len(many), args.batch_size)])
    texts = [args.prompts_of[int(k)] for k in labels]  # int: a tensor hashes by identity
    return clip.rerank_candidates(drawn, texts, args.reranker, 1)[0]


# --------------------------------------------------------------------------------------- models
NO_WEIGHTS = (f"no --gpt-ckpt/--vq-ckpt given and no demo models at {DEMO_GPT}, {DEMO_VQ} (demo.py "
              "trains them); or fetch the smallest official pair once (about 0.7 GB: GPT-B 111M "
              "and VQ-16 72M parameters in float32): python sample.py --gpt-ckpt c2i_B_256.pt "
              "--vq-ckpt vq_ds16_c2i.pt --class 207")


def load_gpt(path, image_size, downsample):
    """(GPT, its codes receipt or None) for --image-size, or the size ours record or an official
    file's name states (_256, _384); a file with neither is refused rather than guessed."""
    # the image size a file's name states: "c2i_L_384.pt" yes, "run2560.pt" no; the last wins
    sizes = re.findall(r"(?<!\d)(256|384|512)(?!\d)", os.path.basename(path))
    named = image_size or (int(sizes[-1]) if sizes else None)
    ckpt = load_checkpoint(path)  # read once; --text stream's are a t2i.StreamT2I
    cls = t2i.StreamT2I if (ckpt.get("config") or {}).get("stream_words") else GPT
    gpt = cls.from_pretrained(path, (named // downsample) ** 2 if named else None, ckpt)
    receipt = CodesReceipt.from_dict(gpt.meta, path) if gpt.meta else None
    if image_size is None:
        if receipt:
            h, w = receipt.grid
        elif named:
            h = w = named // downsample
        elif gpt.block_size_known:  # ours without a receipt: the saved config has the grid
            return gpt, receipt
        else:  # a bare state dict: guessing 256 px drew 64x64 tokens from a GPT trained on 8x8
            raise UserError(f"the GPT {path} does not say which image size it was trained at (no "
                            "config inside, no _256/_384/_512 in its name): pass --image-size (256 "
                            "or 384 for the official c2i files), or rename it like c2i_B_256.pt")
        if h * w != gpt.config.block_size:  # one of ours named _256: a second load
            gpt = cls.from_pretrained(path, h * w, ckpt)
    return gpt, receipt


def load_models(gpt_path, vq_path, image_size=None, text=False):
    """(gpt, vq, gpt_path, vq_path) on the CPU (no paths: the demo's; official names: the cached
    files), checked: vocabulary, grid and (ours) the tokenizer weights the GPT's codes came from."""
    if gpt_path is None and vq_path is None:
        gpt_path, vq_path, missing = ((t2i.DEMO_T2I_GPT, t2i.DEMO_T2I_VQ, t2i.NO_T2I_WEIGHTS)
                                      if text else (DEMO_GPT, DEMO_VQ, NO_WEIGHTS))
        if not (os.path.isfile(gpt_path) and os.path.isfile(vq_path)):
            raise UserError(missing)
    elif gpt_path is None or vq_path is None:
        raise UserError("pass both --gpt-ckpt and --vq-ckpt: a GPT's codes mean something only "
                        "to the tokenizer it was trained with")
    vq_path = weights_file(vq_path)  # an official name: its file in the hub cache, fetched once
    vq = VQModel.from_pretrained(vq_path)  # first: its downsampling turns sizes into grids
    ds = vq.config.downsample
    if image_size is not None:
        check_image_size(image_size, ds)
    gpt_path = weights_file(gpt_path)
    gpt, receipt = load_gpt(gpt_path, image_size, ds)
    if gpt.config.vocab_size != vq.config.codebook_size:  # official files: the shapes at least
        raise UserError(f"the GPT {gpt_path} predicts {gpt.config.vocab_size} codes but the "
                        f"tokenizer {vq_path} has {vq.config.codebook_size}: pass the tokenizer "
                        "the GPT was trained with")
    if receipt:
        # the grids: another downsampling (VQ-8 for VQ-16) cuts the images into other cells
        trained, grid = receipt.grid[0], receipt.image_size // ds
        if grid != trained:
            raise UserError(f"the GPT {gpt_path} learned {trained}x{trained} grids of "
                            f"{receipt.image_size} px images, but the tokenizer {vq_path} cuts "
                            f"them into {grid}x{grid}: pass the tokenizer the GPT was trained with")
        if image_size is not None and image_size // ds != trained:
            raise UserError(f"--image-size {image_size} means {image_size // ds}x"
                            f"{image_size // ds} tokens, but the GPT {gpt_path} learned "
                            f"{trained}x{trained}: drop --image-size or use {trained * ds}")
        # the weights: two tokenizers of one topology share grid and vocabulary, not the codes
        if receipt.tokenizer_checksum != tokenizer_checksum(vq):
            raise UserError(f"the GPT {gpt_path} was trained on the codes of another tokenizer "
                            f"than {vq_path} (weights checksum differs): pass the tokenizer its "
                            "codes were extracted with")
    return gpt, vq, gpt_path, vq_path


# ---------------------------------------------------------------------------------- command line
# The flags that decide the pixels: a --num-samples run records them with its parts (resume_stamp)
PIXEL_FLAGS = ("gpt_ckpt", "vq_ckpt", "classes", "cfg_scale", "cfg_interval", "temperature",
               "top_k", "top_p", "seed", "image_size", "resize_to", "batch_size", "precision",
               "num_samples", "labels", "prompt", "prompts", "t5", "candidates", "keep", "clip")
RANGES = {
    **dict.fromkeys(("per_class", "per_prompt", "batch_size", "progress_frames", "num_samples",
                     "candidates", "window", "resize_to"), at_least(1)),
    "seed": SEED, "temperature": between(0.01, 100), "keep": at_least(1),
    "image_size": between(1, 4096), "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= 0, "at least 0 (0 = every code)"),
    "cfg_scale": (lambda v: 0 <= v <= 1000, "in [0, 1000] (1 = no guidance, 0 = unconditional)"),
    "cfg_interval": (lambda v: v >= -1, "at least -1 (-1 = guide every token)")}
ONLY_WITH = [  # a flag given where it cannot act is refused, never silently ignored
    ("keep", "--candidates N", lambda a: a.candidates is not None),
    ("clip", "--candidates N", lambda a: a.candidates is not None),
    ("t5", "--prompt or --prompts", lambda a: a.prompt or a.prompts),
    ("per_prompt", "--prompt or --prompts", lambda a: a.prompt or a.prompts),
    ("per_prompt", "pictures, not --num-samples", lambda a: a.num_samples is None),
    ("per_class", "pictures, not --num-samples", lambda a: a.num_samples is None),
    ("labels", "--num-samples", lambda a: a.num_samples is not None),
    ("progress_frames", "--progress", lambda a: a.progress),
    ("progress", "pictures drawn without --candidates (it would animate every candidate, kept "
     "or not)", lambda a: a.candidates is None),
    ("keep", "pictures; with --num-samples each sample is the best 1 of --candidates",
     lambda a: a.num_samples is None or a.keep == 1),
    ("per_class", "class-conditional GPTs (--per-prompt sets pictures per prompt)",
     lambda a: not (a.prompt or a.prompts)),
    ("labels", "class-conditional GPTs", lambda a: not (a.prompt or a.prompts)),
    ("window", "--sampler jacobi", lambda a: a.sampler == "jacobi")]


def get_args(argv=None):
    """The command line; the flags that decide the pixels first (PIXEL_FLAGS)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what the pictures depend on", "a --num-samples run records these "
                             "(PIXEL_FLAGS); resuming it needs the same values")
    a = g.add_argument
    a("--gpt-ckpt", help="GPT: ours (train.py) or an official file, by path or name alone "
      f"(c2i_B_256.pt ... c2i_3B_384.pt, t2i_XL_stage1_256.pt; default: {DEMO_GPT})")
    a("--vq-ckpt", help="tokenizer: ours or an official file, by path or name alone "
      f"(vq_ds16_c2i.pt, vq_ds8_c2i.pt, vq_ds16_t2i.pt; default: {DEMO_VQ})")
    a("--class", dest="classes", type=int, nargs="+", help="class ids to draw (default: the "
      "official demo's 8 ImageNet classes if the GPT has them, else all its classes; with "
      "--num-samples every class), one row each; --num-samples draws labels from them")
    a("--cfg-scale", type=float, help="classifier-free guidance scale s >= 0 (paper 2.3): 1 = off, "
      "0 = the null class alone, between a blend, above 1 guidance (officially every s <= 1 is "
      "off). Pictures: default 4.0 (7.5 for prompts). --num-samples: required (paper: 2.0 for B "
      "and L)")
    a("--cfg-interval", type=int, default=-1, help="-1: guide every token; k >= 0: only tokens "
      "0..k+1, then the conditional logits alone (the official semantics)")
    a("--temperature", type=float, default=1.0, help="softmax temperature, > 0")
    a("--top-k", type=int, help="sample among the k most likely codes, 0 = all (default: 2000 for "
      "pictures, 1000 for prompts, as the official demos; 0 for --num-samples, as its FIDs)")
    a("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set with this mass")
    a("--seed", type=int, default=0, help="batch b is seeded from (seed, b), whatever the ranks")
    a("--image-size", type=int, help="pixels per side (default: the GPT's trained size: recorded "
      "in ours, _256/_384 in official file names)")
    a("--resize-to", type=int, help="resize bicubically to this size first, e.g. 256 for 384 px "
      "models before FID, as the official evaluation")
    a("--batch-size", type=int, default=32, help="images per forward pass (doubled inside by CFG)")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="the GPT's "
      "dtype (auto: bf16 or fp16 on GPUs, fp32 on CPU/MPS); the tokenizer decodes in fp32")
    a("--num-samples", type=int, help="evaluation: write exactly this many images as uint8 NHWC "
      "arr_0 (labels arr_1) in --out; resumable; run it under torchrun")
    a("--labels", choices=["random", "balanced"], help="with --num-samples: uniformly random over "
      "the classes, as the official evaluation (default), or cycling through them")
    a("--prompt", action="append", metavar="TEXT", help="text-to-image: a caption to draw, one row "
      "each; repeat for more (default cfg 7.5 and top-k 1000, the official t2i settings). Words "
      "the text encoder does not know are drawn as <unk>, named in a warning")
    a("--prompts", metavar="FILE", help="captions, one per line, none blank; with --num-samples "
      "sample i draws line i (cycling), as FID-30k draws the COCO captions")
    a("--t5", metavar="FOLDER", help="the T5 folder whose features the GPT reads (google/flan-t5-xl"
      " for the official t2i files); not for GPTs trained with their own (--text t5-nano, stream)")
    a("--candidates", type=int, metavar="N", help="re-rank by CLIP (DALL-E 2.5): draw N per "
      "picture kept and keep the best by CLIP against the prompt or \"a <class name>\"")
    a("--keep", type=int, metavar="K", help="with --candidates: the best K per row, best first "
      "(default: 4, or N if smaller; --num-samples keeps 1)")
    a("--clip", metavar="CKPT", help="with --candidates: our CLIP (train.py --model CLIP-tiny) or "
      f"a Hugging Face CLIP folder such as openai/clip-vit-base-patch32 (default: {DEMO_CLIP})")
    a = p.add_argument  # where the pictures go or how fast they come, not what they show
    a("--per-class", type=int, help="pictures per class, one row each (default: 4)")
    a("--per-prompt", type=int, help="pictures per prompt, one row each (default: 4)")
    a("--out", help="PNG grid to write (default: samples/class<ids>.png or samples/prompts.png), "
      "or the .npz with --num-samples (default: samples/samples<N>.npz); never replaced without "
      "--overwrite (an unfinished .npz run resumes instead)")
    a("--overwrite", action="store_true", help="replace an existing --out (and --progress GIF)")
    a("--device", default="auto", help="cuda, mps or cpu (default: the best available)")
    a("--progress", metavar="GIF", help="also write an animation of the rasters being written")
    a("--progress-frames", type=int, help="with --progress: frames, at most one per token "
      "(default: 32)")
    # the faster samplers (decoding.py) keep the distribution, so they are no pixel flags (Jacobi
    # spends the random numbers differently: a seed gives other pictures; --compile the same)
    a("--sampler", choices=["sequential", "jacobi"], default="sequential", help="sequential: one "
      "forward pass per code; jacobi: speculative Jacobi decoding, --window codes scored per pass "
      "(prints the passes per image)")
    a("--window", type=int, help="with --sampler jacobi: codes scored per pass (default: 16)")
    a("--compile", action="store_true", help="torch.compile the fixed-shape decode step (a CUDA "
      "graph on GPUs; slow start, faster steps)")
    return p.parse_args(argv)


def check_args(args):
    """One UserError line for a bad flag, then the mode's defaults (None meant "not given")."""
    check_flags(args, RANGES, ONLY_WITH)
    evaluation, prompts = args.num_samples is not None, bool(args.prompt or args.prompts)
    if args.candidates is not None:  # pictures draw N per row in place of --per-class/prompt
        per = "per_prompt" if prompts else "per_class"
        if getattr(args, per) is not None:
            raise UserError(f"--{per.replace('_', '-')} and --candidates both set the draws per "
                            "row; with --candidates each row shows its --keep best")
        args.keep = 1 if evaluation else min(4, args.candidates) if args.keep is None else args.keep
        if not evaluation:
            setattr(args, per, args.candidates)  # rerank_grid makes per_class K once ranked
        if not 1 <= args.keep <= args.candidates:
            raise UserError(f"--keep {args.keep} must be between 1 and --candidates "
                            f"{args.candidates}")
        if args.clip is None and not os.path.exists(DEMO_CLIP):
            raise UserError(f"--candidates needs a CLIP to rank with: --clip CKPT (train.py "
                            f"--model CLIP-tiny --data scenes, or a Hugging Face CLIP folder); "
                            f"none at {DEMO_CLIP}")
        args.clip = os.path.abspath(args.clip or DEMO_CLIP)  # the stamp must not depend on cwd
    # prompts: their indices stand where class ids stand elsewhere
    args.prompt_list = (args.prompt or []) + (read_lines(args.prompts, "--prompts") if
                                              args.prompts else []) or None
    if prompts:
        if args.cfg_scale != 0 and any(not p.strip() for p in args.prompt_list):
            raise UserError("--prompt: an empty prompt; give some words, or --cfg-scale 0 for "
                            "unconditional pictures")
        if args.classes is not None:
            raise UserError("--class is for class-conditional GPTs; with prompts drop it")
        args.classes, args.per_class = list(range(len(args.prompt_list))), args.per_prompt
        args.labels = "prompt indices" if evaluation else None  # gather_parts' summary says so
        if not evaluation:  # the official text-to-image demo: cfg 7.5, top-k 1000
            args.cfg_scale = 7.5 if args.cfg_scale is None else args.cfg_scale
            args.top_k = 1000 if args.top_k is None else args.top_k
    args.per_class, args.progress_frames = args.per_class or 4, args.progress_frames or 32
    args.labels, args.window = args.labels or "random", args.window or 16
    if args.top_k is None:  # the official demo's 2000 for pictures, all codes for FID
        args.top_k = 0 if evaluation else 2000
    if evaluation:
        if args.cfg_scale is None:
            raise UserError("evaluation runs need an explicit --cfg-scale (paper: 2.0 for B and "
                            "L, 1.75 for XL and XXL, 1.65 for 3B; 1 = no guidance)")
        if args.progress:
            raise UserError("--progress animates pictures; drop it for --num-samples runs")
    elif args.world > 1:  # one PNG: every rank would draw the same pictures into the same file
        raise UserError("torchrun is for --num-samples evaluation runs; draw pictures with "
                        "plain python")
    args.cfg_scale = 4.0 if args.cfg_scale is None else args.cfg_scale  # the official demo's


@torch.no_grad()  # sampling only: no autograd graph (and none left switched off for the caller)
def main(argv=None):
    """Check every flag, then load, then draw: a bad flag or --out is reported before any token."""
    args = get_args(argv)
    rank, args.world = rank_world()
    check_args(args)
    args.device = device = setup_device(args.device)  # under torchrun: the LOCAL_RANK GPU
    args.precision, dtype = resolve_precision(args.precision, device)  # "auto": by the GPU found
    if args.precision == "fp16" and device == "cpu":  # its KV cache and attention hold float32
        raise UserError("--precision fp16 is for GPUs; on a CPU use --precision fp32 or bf16")
    gpt, vq, gpt_path, vq_path = load_models(args.gpt_ckpt, args.vq_ckpt, args.image_size,
                                             text=bool(args.prompt_list))
    # what the stamp records: absolute paths, and the size drawn, resolved from the GPT
    args.gpt_ckpt, args.vq_ckpt = os.path.abspath(gpt_path), os.path.abspath(vq_path)
    args.image_size = math.isqrt(gpt.config.block_size) * vq.config.downsample
    condition = t2i.text_condition(args.prompt_list, args.t5, gpt, gpt_path, device, dtype)
    n_classes = len(args.prompt_list) if condition else gpt.config.num_classes
    if args.classes is None:  # evaluation: every class; pictures: the official demo's, if known
        demo = max(DEMO_CLASSES) < n_classes and not args.num_samples
        args.classes = DEMO_CLASSES if demo else list(range(n_classes))
    if bad := [k for k in args.classes if not 0 <= k < n_classes]:
        raise UserError(f"class {bad[0]} is outside [0, {n_classes}): this GPT knows {n_classes} "
                        f"classes; pick ids 0..{n_classes - 1}")
    if args.out is None:
        args.out = (f"samples/samples{args.num_samples}.npz" if args.num_samples else
                    "samples/prompts.png" if condition else
                    "samples/class" + "-".join(map(str, args.classes)) + ".png")
    setup_reranker(args, gpt)
    for flag, path in (("--out", args.out), ("--progress", args.progress)):
        if path:
            check_writable(path, args.overwrite, flag)

    gpt, vq = gpt.to(device=device, dtype=dtype), vq.to(device)  # the tokenizer stays float32
    if args.compile:  # generation loops over this one step: compile it, not the loop
        decoding.compile_step(gpt, device)
    args.passes = []  # forward passes of each batch
    sample_kw = dict(cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     resize_to=args.resize_to, condition=condition, sampler=args.sampler,
                     window=args.window, static=args.compile, passes=args.passes)
    if args.num_samples is None:
        picture_grid(args, gpt, vq, sample_kw)
        print(f"wrote {args.out}" + (f" and {args.progress}" if args.progress else ""))
        return
    # only barriers cross processes, so gloo serves GPUs too; the long timeout covers rank 0's
    # wait for the slowest rank, hours into a 50,000 image run
    if args.world > 1:
        dist.init_process_group("gloo", timeout=timedelta(hours=6))
    try:
        evaluation_npz(args, gpt, vq, sample_kw, rank, args.world)
    finally:
        if args.world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    cli(main)
