"""Pictures from a trained LlamaGen: the GPT writes a grid of codes one token at a time, the
tokenizer's decoder turns the grid into pixels (paper 2.1-2.3).

    python sample.py --class 0 1 2 --per-class 4             # demo models: one row per class
    python sample.py --class 3 --progress drawing.gif          # watch the raster being written
    python sample.py --gpt-ckpt c2i_L_384.pt --vq-ckpt vq_ds16_c2i.pt --class 207 360 387
    torchrun --nproc_per_node=8 sample.py --gpt-ckpt c2i_B_256.pt --vq-ckpt vq_ds16_c2i.pt \\
        --num-samples 50000 --cfg-scale 2.0 --out samples.npz  # ADM-format .npz for fid.py

Without --gpt-ckpt/--vq-ckpt it uses the demo's models (results/demo/). Checkpoints are ours
(train.py) or the official releases; the image size is the one the GPT was trained at unless
--image-size says so.

Read top to bottom, in the order the data flows: sample codes, decode them to pixels, save the
pixels (a PNG grid and its progress GIF, or an evaluation .npz written in resumable parts); then
loading and checking the models, and the command line.

Two jobs share the code. Pictures (the default) are for looking at: a few classes, strong
guidance (cfg 4) and top-k 2000, as the official demo draws them. An evaluation set
(--num-samples) is for measuring: tens of thousands of images with the settings of the paper's
FID runs (top-k 0, its guidance scales), stored as the ADM evaluator reads them, sharded over
torchrun processes and resumable batch by batch, since 50,000 images take hours.

Reproducibility is by construction: batch b is seeded from (--seed, b) alone, so a picture does
not change with the number of processes, the order they finish in, or a resumed run.
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

import clip
import data
from common import (UserError, cli, load_checkpoint, load_weights, progress, resolve_precision,
                    save_atomic, say, setup_device, unwrap_state_dict)
from data import (CodesReceipt, check_image_size, from_uint8, make_grid, save_grid,
                  to_uint8)
from model import GPT, left_pad_caption
from text import T5Config, T5Encoder, TextEncoder, UnigramTokenizer
from tokenizer import VQModel, tokenizer_checksum

DEMO_GPT = "results/demo/gpt.pt"  # written by the demo; the default models when none is given
DEMO_VQ = "results/demo/vq.pt"
OFFICIAL_URL = "https://huggingface.co/FoundationVision/LlamaGen/resolve/main/"
# ImageNet's 1000 classes; the number in the name is the image size the GPT was trained at
OFFICIAL_GPTS = ["c2i_B_256.pt", "c2i_B_384.pt", "c2i_L_256.pt", "c2i_L_384.pt", "c2i_XL_384.pt",
                 "c2i_XXL_384.pt", "c2i_3B_384.pt"]
OFFICIAL_VQ = "vq_ds16_c2i.pt"
DEMO_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # the official demo's ImageNet classes
DEMO_CLIP = "results/demo/clip.pt"  # the re-ranker, when the demo has trained one


# ------------------------------------------------------------------------------------------------
# Sampling: codes from the GPT (GPT.generate), then pixels from the tokenizer

@torch.no_grad()
def sample_images(gpt, vq, labels, cfg_scale=1.0, cfg_interval=-1, temperature=1.0, top_k=0,
                  top_p=1.0, generator=None, resize_to=None, callback=None, condition=None,
                  sampler="sequential", window=16, static=False, passes=None):
    """Images of the classes `labels` (list or int64 tensor [B]) as uint8 [B, H, W, 3]. The
    sampling knobs are GPT.generate's (cfg_interval's meaning is documented there); callback(t,
    codes[:, :t]) is called after each token. The tokenizer runs in float32 whatever the GPT's
    dtype: the decoder is a small share of the time, and its pixels then match any GPU's.
    condition: for a text-to-image GPT, labels are prompt indices and condition(labels) gives
    their (caption features, mask) (PromptCondition).
    sampler, window, static: GPT.generate's faster samplers (--sampler, --window, --compile);
    passes: a list that gets this batch's number of GPT forward passes appended."""
    # the labels go where the GPT's weights are, so callers may pass a plain list
    device = next(gpt.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    cond, mask = condition(labels) if condition is not None else (labels, None)
    codes, n_passes = gpt.generate(cond, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   generator=generator, callback=callback, cond_mask=mask,
                                   sampler=sampler, window=window, static=static,
                                   return_passes=True)
    if passes is not None:
        passes.append(n_passes)
    return decode(vq, codes, resize_to)


def batch_seed(seed, index):
    """A seed for batch `index` of a run seeded `seed`. SeedSequence mixes the pair into
    independent streams (seed + index would make run 1's batch 0 equal run 0's batch 1). A batch's
    pictures depend on (seed, index, batch size) only, not on how many processes share the work.
    Returns an int in [0, 2^32), a seed torch.Generator.manual_seed takes."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def decode(vq, codes, resize_to=None):
    """Codes [B, L] in raster order (L a square number) -> uint8 pixels [B, H, W, 3], by the pixel
    rule of data.to_uint8 (optionally resized first)."""
    # the GPT writes a flat raster; the decoder wants the grid back, row by row (paper 2.1)
    b, length = codes.shape
    side = math.isqrt(length)
    return to_uint8(vq.decode(codes.view(b, side, side)).float(), resize_to)


# ------------------------------------------------------------------------------------------------
# Saving: a PNG grid (and the animation of its drawing), or an evaluation .npz

def write_npz(f, **arrays):
    """np.savez (uncompressed, what the ADM evaluator streams) with a fixed timestamp on each
    member, so the same samples always give the same bytes (np.savez stamps the current time).
    f: a binary file (save_atomic's); each keyword becomes a member <name>.npy, as np.load
    expects."""
    # ZIP64 from the start: 50,000 images of 256 px are 9.8 GB, past the 4 GB of plain zip
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, a in arrays.items():
            # 1980-01-01: the earliest moment a zip (MS-DOS) timestamp can hold
            member = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            # streamed in, its size unknown up front: without force_zip64 zipfile raises at close
            # for a member past 2 GiB, its local header having no room for a larger size
            with z.open(member, "w", force_zip64=True) as m:
                # always C order: fid.py's streaming reader refuses a Fortran-ordered arr_0
                np.lib.format.write_array(m, np.ascontiguousarray(a))


def picture_grid(args, gpt, vq, sample_kw):
    """args.out: a PNG grid with one row per class (rows of 8 for a single class), batches seeded
    by (seed, batch index); with --progress, also the GIF of the rasters being written."""
    # class-major: a class's pictures are adjacent, so each fills one grid row (and its
    # --candidates are one block for re-ranking)
    labels = [k for k in args.classes for _ in range(args.per_class)]
    length = gpt.config.block_size
    steps = progress_steps(length, args.progress_frames) if args.progress else []
    # shots: per batch, {t: codes [B, t]}; the clock covers sampling and decoding, not saving
    images, shots, t0 = [], [], time.perf_counter()
    # one bar step = one more token in every image of the batch
    n_batches = math.ceil(len(labels) / args.batch_size)
    bar = progress(total=n_batches * length, desc="drawing", unit="step")
    for b in range(0, len(labels), args.batch_size):
        shots.append({})

        # GPT.generate calls this after every token; it copies the raster at the frames' steps
        # (the default argument binds this batch's dict, not the loop's last one). Jacobi
        # decoding accepts several tokens per call: t may jump past a frame's step. done: the
        # tokens this batch has reported (a fresh list per batch, as the def runs per batch)
        def step(t, codes, shot=shots[-1], done=[0]):
            """generate's callback: advance the bar, keep a copy of the raster at each frame."""
            bar.update(t - done[0])
            for s in steps:
                if done[0] < s <= t:
                    shot[s] = codes[:, :s].clone()
            done[0] = t
        # a generator lives on the device it draws for (torch.multinomial on CUDA refuses a CPU
        # one), so one seed gives other pictures on a CPU than on a GPU
        gen = torch.Generator(args.device).manual_seed(batch_seed(args.seed, b // args.batch_size))
        images.append(sample_images(gpt, vq, labels[b:b + args.batch_size], generator=gen,
                                    callback=step, **sample_kw))
    bar.close()
    images = np.concatenate(images)
    report(0, len(images), time.perf_counter() - t0, length, args)
    images = rerank_grid(args, images)  # --candidates: each row keeps its --keep best, ranked
    # one row per class; a single class (or one picture each) fills rows of 8 instead
    nrow = args.per_class if len(args.classes) > 1 and args.per_class > 1 else 8
    save_grid(from_uint8(images), args.out, nrow=nrow)
    if args.progress:
        save_progress_gif(vq, shots, steps, length, nrow, sample_kw["resize_to"], args.progress)


def progress_steps(length, frames):
    """Token counts after which the animation takes a frame: `frames` evenly spaced ones, at most
    one per token, the last one the finished raster."""
    # ceil spreads the frames evenly and makes the last one land on `length` exactly
    n = min(frames, length)
    return [math.ceil(k * length / n) for k in range(1, n + 1)]


def raster_so_far(vq, codes, length, resize_to):
    """Codes [B, t] of a raster still being written -> uint8 [B, H, W, 3] with the cells not yet
    written painted exactly mid-grey. The decoder needs a full grid, so the missing cells are
    first filled with the codes of a plain grey picture; its receptive field still lets the written
    cells change a little as their neighbours arrive."""
    b, t = codes.shape
    if t == length:
        return decode(vq, codes, resize_to)
    side = math.isqrt(length)
    pixels = side * vq.config.downsample
    # the filler is encoded by this very tokenizer: no code index means grey in every codebook
    grey = vq.encode(torch.zeros(1, 3, pixels, pixels, device=codes.device))
    codes = torch.cat([codes, grey.view(1, length)[:, t:].expand(b, -1)], dim=1)
    x = vq.decode(codes.view(b, side, side)).float()
    cell = x.shape[-1] // side
    written = (torch.arange(length, device=x.device) < t).view(side, side)
    x = x * written.repeat_interleave(cell, 0).repeat_interleave(cell, 1)  # 0 -> level 128
    return to_uint8(x, resize_to)


def save_progress_gif(vq, shots, steps, length, nrow, resize_to, path):
    """One grid per step in `steps`, every image at the same point of its raster; the last frame
    (all tokens) holds for 2 s, so a looping viewer shows the result."""
    frames = []
    # the frames are decoded after sampling, from the saved rasters: decoding at every step
    # inside the loop would cost a decoder pass per token instead of one per frame
    for t in steps:
        partial = np.concatenate([raster_so_far(vq, shot[t], length, resize_to) for shot in shots])
        frames.append(make_grid(from_uint8(partial), nrow))
    durations = [80] * (len(frames) - 1) + [2000]  # milliseconds per frame
    # GIF frames hold 256 colours each: Pillow reduces every frame's palette on its own.
    # loop=0 repeats forever; without it Pillow writes no loop block and most viewers play once
    save_atomic(lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                                         duration=durations, loop=0), path)


def evaluation_labels(args):
    """The --num-samples labels: uniformly random over the classes (the official evaluation's
    protocol), all drawn up front from --seed so they do not depend on the number of processes;
    or, with --labels balanced, cycling through them (50 per class for 50k of 1000). Returns an
    int64 CPU tensor [num_samples]; each part stores its slice as arr_1."""
    # random labels make the class counts vary a little (about sqrt(N/classes) per class), as in
    # the published numbers; balanced ones remove that spread from the comparison
    classes = torch.tensor(args.classes)
    n = args.num_samples
    if getattr(args, "prompt_list", None):  # captions: sample i draws prompt i (cycling)
        return torch.arange(n) % len(args.prompt_list)
    if args.labels == "balanced":
        return classes[torch.arange(n) % len(classes)]
    draw = torch.Generator().manual_seed(args.seed)  # on the CPU: the same labels on any device
    return classes[torch.randint(len(classes), (n,), generator=draw)]


def resume_stamp(args, parts, rank):
    """Record the settings that decide the pixels (the flags get_args declares as such) in
    <parts>/settings.json, or check them against a stamp already there: parts made with other
    settings must not be mixed into one .npz."""
    stamp = {k: getattr(args, k) for k in args.pixel_settings}
    # every rank reads the stamp; only rank 0 writes it, and the barrier that follows in
    # evaluation_npz comes before any rank writes a part
    path = os.path.join(parts, "settings.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):  # ValueError: not JSON (hand-edited, cut short)
            old = None
        if not isinstance(old, dict):
            raise UserError(f"{path} is damaged, so the samples in {parts} cannot be matched to "
                            "these settings; delete that folder to start over")
        if old != stamp:
            diff = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in stamp.items()
                             if old.get(k) != v)
            raise UserError(f"{parts} holds samples made with other settings ({diff}); rerun with "
                            "the same flags to resume, or delete that folder to start over")
    elif rank == 0:
        save_atomic(lambda f: f.write(json.dumps(stamp).encode()), path)


def evaluation_npz(args, gpt, vq, sample_kw, rank, world):
    """args.out: an ADM-format .npz of args.num_samples images (uint8 NHWC arr_0, labels arr_1).
    Batch b holds samples [b*bs, (b+1)*bs). Rank r draws every world-th unfinished batch and saves
    each atomically in <out>.parts/; a rerun skips finished ones; rank 0 gathers the final .npz
    and deletes the parts."""
    n, bs = args.num_samples, args.batch_size
    # every rank draws the whole list itself, the same on each (from --seed): nothing to send
    labels = evaluation_labels(args)
    parts, n_batches = args.out + ".parts", math.ceil(n / bs)
    resume_stamp(args, parts, rank)
    done = set()
    if os.path.isdir(parts):
        # the parts' own names only: settings.json and save_atomic's .tmp-* leftovers are no batch
        done = {int(f[:6]) for f in os.listdir(parts) if re.fullmatch(r"\d{6}\.npz", f)}
        done = checked_parts(parts, done, n, bs, rank)
    if world > 1:
        dist.barrier()  # every rank has listed the finished batches before any rank adds one
    # round-robin over the batches still missing: each rank gets an equal share, and a rerun
    # with another number of processes still fits (a batch's pixels do not depend on the rank)
    todo = [b for b in range(n_batches) if b not in done][rank::world]
    if rank == 0 and done:
        print(f"resuming: {len(done)} of {n_batches} batches already in {parts}")
    t0, made = time.perf_counter(), 0
    for b in progress(todo, show=rank == 0, desc="sampling", unit="batch"):
        batch_labels = labels[b * bs:(b + 1) * bs]
        gen = torch.Generator(args.device).manual_seed(batch_seed(args.seed, b))
        images = draw_best(args, gpt, vq, batch_labels, gen, sample_kw)
        # one file per batch, written atomically: a process killed mid-batch loses that batch
        # only, and a file that exists is always complete
        save_atomic(lambda f: write_npz(f, arr_0=images, arr_1=batch_labels.numpy()),
                    os.path.join(parts, f"{b:06d}.npz"))
        made += len(batch_labels)
    report(rank, made, time.perf_counter() - t0, gpt.config.block_size, args)
    if world > 1:  # rank 0 gathers only once every rank's batches are on disk
        dist.barrier()
    if rank == 0:
        gather_parts(args, parts, n_batches)


def part_damage(path, count):
    """Why the part at `path` cannot be gathered (cut short, not an .npz, not `count` images and
    labels), or None. Only the zip directory and the two .npy headers are read, not the pixels,
    so checking 1,563 parts of a 50k run takes a moment, not a re-read of 10 GB."""
    try:
        with zipfile.ZipFile(path) as z:  # the directory sits at the end: a cut file fails here
            shapes = {}
            for name in ("arr_0", "arr_1"):
                info = z.getinfo(name + ".npy")
                with z.open(info) as m:
                    # .npy 1.0 stores a 2-byte header length; 2.0 and 3.0 a 4-byte one
                    read_header = (np.lib.format.read_array_header_1_0
                                   if np.lib.format.read_magic(m) == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(m)
                    size = m.tell() + math.prod(shape) * dtype.itemsize  # header + data
                if info.file_size != size:
                    return f"{name} is cut short"
                shapes[name] = shape
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as e:
        return f"not a complete part ({type(e).__name__})"
    if shapes["arr_0"][:1] != (count,) or shapes["arr_1"] != (count,):
        return f"holds {shapes['arr_0'][:1]} images, not {count}"
    return None


def checked_parts(parts, done, n, bs, rank):
    """The finished batches whose part files are whole. A damaged one (a copy cut short, a disk
    error) is drawn again now, before sampling, rather than found by the gathering at the end."""
    good = set()
    for b in sorted(b for b in done if b * bs < n):
        why = part_damage(os.path.join(parts, f"{b:06d}.npz"), min(bs, n - b * bs))
        if why is None:
            good.add(b)
        # every rank checks, as each needs the whole set to pick its share; one reports
        elif rank == 0:
            say(f"{parts}/{b:06d}.npz is damaged ({why}); sampling that batch again")
    return good


def gather_parts(args, parts, n_batches):
    """Rank 0's last step: the parts' batches -> one .npz at args.out, then no parts."""
    n, bs = args.num_samples, args.batch_size
    # the image array is allocated once the first part shows the image size (after --resize-to)
    out, out_labels = None, np.empty(n, np.int64)
    for b in progress(range(n_batches), show=n_batches >= 100, desc="gathering", unit="batch"):
        path = os.path.join(parts, f"{b:06d}.npz")
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing (did a process fail?); rerun the same command to "
                            "finish it")
        with np.load(path) as z:
            if out is None:
                out = np.empty((n, *z["arr_0"].shape[1:]), np.uint8)
            out[b * bs:(b + 1) * bs], out_labels[b * bs:(b + 1) * bs] = z["arr_0"], z["arr_1"]
    # arr_0 is what the ADM evaluator reads; it ignores arr_1, the labels, which are kept for
    # class-wise checks (a per-class accuracy, as the demo measures on its pictures)
    save_atomic(lambda f: write_npz(f, arr_0=out, arr_1=out_labels), args.out)
    # the parts go only once the .npz is in place: a crash while gathering loses no sample
    shutil.rmtree(parts)
    print(f"wrote {args.out}: arr_0 {out.dtype} {tuple(out.shape)}, labels (arr_1) {args.labels} "
          f"over {len(args.classes)} classes")


def report(rank, n, seconds, tokens_per_image, args):
    """Sampling speed (generation + decoding, without file writing) of this process. n counts
    this run's images only, so a resumed run's speed is not flattered by the parts it skipped."""
    # tokens/s counts image tokens only; under guidance each one costs two rows of the batch
    if rank == 0 and n:
        per = " per process" if args.world > 1 else ""
        print(f"{n} images in {seconds:.1f} s on {args.device} ({args.precision}): "
              f"{seconds / n:.3f} s/image, {n * tokens_per_image / seconds:,.0f} tokens/s" + per)


def report_passes(rank, passes, length, args):
    """With --sampler jacobi: the GPT forward passes per image (a batch's images share its
    passes, the prefill included), against one per code for the sequential sampler."""
    if rank == 0 and args.sampler == "jacobi" and passes:
        print(f"jacobi, window {args.window}: {sum(passes) / len(passes):.1f} forward passes per "
              f"image (min {min(passes)}, max {max(passes)} over {len(passes)} batches; "
              f"sequential: {length})")


def compiled_step(gpt, device):
    """torch.compile of GPT.decode_step. Its shapes never change within an image, so one trace
    serves every token (a second one once guidance stops at --cfg-interval, and one per batch
    size); on CUDA, mode reduce-overhead records it as a CUDA graph and replays it, which removes
    the per-kernel launch cost that bounds batch-1 sampling."""
    # CUDA graphs exist on CUDA only; elsewhere the default mode still fuses the step's kernels
    mode = "reduce-overhead" if str(device).startswith("cuda") else None
    return torch.compile(gpt.decode_step, mode=mode, dynamic=False)


# ------------------------------------------------------------------------------------------------
# Re-ranking by CLIP (DALL-E, Ramesh et al. 2021, 2.5): draw N candidates per prompt and keep the K
# that CLIP finds most similar to it. The sampler's draws differ in whether they show what was
# asked; CLIP's contrastive score is trained to answer exactly that question (clip.py), so best-of-N
# trades N times the sampling for better agreement with the prompt (DALL-E's FID and IS improve up
# to N = 32). Class models are prompted with their class names ("a red circle"); text models with
# their prompts.

def rerank_candidates(images, texts, clip_model, keep, tokenizer=None):
    """images: uint8 (P*N, H, W, 3) in prompt-major order (prompt p's N candidates together);
    texts: the P prompts; clip_model: clip.CLIP (its .tokenizer unless `tokenizer` is given). ->
    (uint8 (P*keep, H, W, 3): each prompt's `keep` best, best first; float (P, keep): their scores,
    100 x cosine). keep = N returns every candidate, pixels untouched, in rank order. CLIP scores
    the uint8 pixels, exactly what is saved, not the decoder's unrounded floats."""
    if len(texts) == 0 or len(images) % len(texts):
        raise UserError(f"{len(images)} candidates do not split evenly over {len(texts)} prompts")
    scores = clip.rank(clip_model, from_uint8(images), list(texts),
                       tokenizer or clip_model.tokenizer)
    order, best = clip.rerank(scores, keep)
    # candidate j of prompt p is row p * N + j of the prompt-major stack
    rows = torch.arange(len(texts))[:, None] * scores.shape[1] + order
    return images[rows.flatten().numpy()], best


def add_rerank_flags(p):
    """The re-ranking flags, their own group; a --num-samples run given them records them with the
    others that decide the pixels (check_rerank_args)."""
    g = p.add_argument_group("re-ranking by CLIP (DALL-E 2.5)", "draw N candidates per prompt "
                             "or class, keep the K most similar to the prompt (a class: \"a "
                             "<class name>\") by CLIP")
    g.add_argument("--candidates", type=int, default=None, metavar="N",
                   help="candidates drawn per picture kept (DALL-E: up to 32; 512 in its blog)")
    g.add_argument("--keep", type=int, default=None, metavar="K", help="with --candidates: the "
                   "best K of each prompt or class, best first (default: 4, or N if smaller, for "
                   "pictures; --num-samples keeps 1 of N per sample and takes only 1)")
    g.add_argument("--clip", default=None, metavar="CKPT", help="with --candidates: our CLIP "
                   "(train.py --model CLIP-tiny) or a Hugging Face CLIP folder such as "
                   f"openai/clip-vit-base-patch32 (default: {DEMO_CLIP})")
    return g


def check_rerank_args(args):
    """One line for a re-ranking flag out of range or out of its mode; then the defaults. Runs
    before check_args: pictures draw --candidates per class in place of --per-class."""
    if args.candidates is None:
        for flag in ("keep", "clip"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag} only applies with --candidates N; add it or drop "
                                f"--{flag}")
        return
    if args.candidates < 1:
        raise UserError(f"--candidates must be at least 1, got {args.candidates}")
    # prompts take their N candidates per prompt, classes per class (check_prompt_args then
    # moves per_prompt into per_class, the one count the grid reads)
    prompts = bool(args.prompt or args.prompts)
    per, flag = ("per_prompt", "--per-prompt") if prompts else ("per_class", "--per-class")
    if getattr(args, per) is not None:
        raise UserError(f"{flag} and --candidates both set the draws per row; with "
                        "--candidates each row shows its --keep best")
    if args.progress:
        raise UserError("--progress animates every candidate, kept or not; drop it with "
                        "--candidates")
    if args.num_samples is not None:
        if args.keep not in (None, 1):
            raise UserError(f"--keep {args.keep} with --num-samples: each sample is the best 1 "
                            "of --candidates; drop --keep")
        args.keep = 1
    else:
        # the grid draws N per row but shows K: rerank_grid sets per_class to K once ranked
        args.keep = min(4, args.candidates) if args.keep is None else args.keep
        setattr(args, per, args.candidates)
    if not 1 <= args.keep <= args.candidates:
        raise UserError(f"--keep {args.keep} must be between 1 and --candidates "
                        f"{args.candidates}")
    if args.clip is None:
        if not os.path.exists(DEMO_CLIP):
            raise UserError(f"--candidates needs a CLIP to rank with: --clip CKPT (train.py "
                            f"--model CLIP-tiny --data scenes, or a Hugging Face CLIP folder); "
                            f"none at {DEMO_CLIP}")
        args.clip = DEMO_CLIP
    args.clip = os.path.abspath(args.clip)  # the resume stamp must not depend on the cwd
    # stamped only when given: parts drawn without re-ranking keep the stamp they always had
    args.pixel_settings += ("candidates", "keep", "clip")


def class_prompts(gpt, classes):
    """{class id: "a <class name>"} from the names our checkpoints carry in their codes receipt;
    official ImageNet checkpoints know their classes by id only, so there is no text to score."""
    receipt = CodesReceipt.from_dict(gpt.meta, "the GPT checkpoint") if gpt.meta else None
    if receipt is None or len(receipt.classes) != gpt.config.num_classes:
        raise UserError("--candidates scores each class by its name, and this GPT carries no "
                        "class names (official checkpoints know ImageNet classes by id only); "
                        "use a GPT trained here")
    # class names are folder names ("red_circle"): spaced out, they read like CLIP's captions
    return {k: f"a {receipt.classes[k]}".replace("_", " ") for k in classes}


def setup_reranker(args, gpt):
    """With --candidates: the CLIP (on the GPT's device) and the text of every row drawn: the
    prompt itself, or a class's name."""
    args.reranker = None
    if not args.candidates:
        return
    args.prompts_of = (dict(enumerate(args.prompt_list)) if args.prompt_list
                       else class_prompts(gpt, args.classes))
    model, tokenizer = clip.load(args.clip)
    args.reranker = model.to(args.device)
    args.reranker.tokenizer = tokenizer


def rerank_grid(args, images):
    """Pictures: the P rows' (classes' or prompts') N candidates each -> their K best, best
    first, the scores printed row by row; args.per_class becomes K so the grid has K per row."""
    if not args.candidates:
        return images
    # timed apart: report's sampling speed stops before the ranking
    t0 = time.perf_counter()
    texts = [args.prompts_of[k] for k in args.classes]
    kept, scores = rerank_candidates(images, texts, args.reranker, args.keep)
    print(f"CLIP kept {args.keep} of {args.candidates} per row in "
          f"{time.perf_counter() - t0:.1f} s; scores (100 x cosine), best first:")
    for text, row in zip(texts, scores.tolist()):
        print(f"  {text}: " + " ".join(f"{v:.1f}" for v in row))
    args.per_class = args.keep
    return kept


def draw_best(args, gpt, vq, labels, gen, sample_kw):
    """An evaluation batch: one image per label, or with --candidates the best of N each (drawn in
    chunks of --batch-size, from this batch's generator)."""
    if not args.candidates:
        return sample_images(gpt, vq, labels, generator=gen, **sample_kw)
    # prompt-major, as rerank_candidates reads it: a label's N candidates are adjacent rows
    many = labels.repeat_interleave(args.candidates)
    # N candidates per label multiply the batch: drawn --batch-size at a time to bound memory, all
    # from the one generator, so the batch still depends on (seed, b) alone
    drawn = np.concatenate([sample_images(gpt, vq, many[i:i + args.batch_size], generator=gen,
                                          **sample_kw)
                            for i in range(0, len(many), args.batch_size)])
    # int(k): the dict is keyed by Python ints, and a tensor element hashes by identity
    texts = [args.prompts_of[int(k)] for k in labels]
    return rerank_candidates(drawn, texts, args.reranker, 1)[0]


# ------------------------------------------------------------------------------------------------
# Loading and checking the inputs

NO_WEIGHTS = f"""no --gpt-ckpt/--vq-ckpt given and no demo models at {DEMO_GPT}, {DEMO_VQ}.
Run the demo to train small models there, or use the official LlamaGen weights ({OFFICIAL_URL}):
  tokenizer: {OFFICIAL_VQ}
  GPT (ImageNet classes, _256/_384 = image size): {' '.join(OFFICIAL_GPTS)}
  e.g.  wget {OFFICIAL_URL}{OFFICIAL_VQ} {OFFICIAL_URL}c2i_L_384.pt
        python sample.py --gpt-ckpt c2i_L_384.pt --vq-ckpt {OFFICIAL_VQ} --class 207"""


def size_in_name(path):
    """The image size an official file's name states (c2i_L_384.pt -> 384), else None."""
    # a size standing alone in the name: "c2i_L_384.pt" yes, "run2560.pt" no; the last one wins
    sizes = re.findall(r"(?<!\d)(256|384|512)(?!\d)", os.path.basename(path))
    return int(sizes[-1]) if sizes else None


def load_gpt(path, image_size, downsample):
    """(GPT, its codes receipt or None) with the token grid of its images: (image_size //
    downsample)^2 tokens. The size is --image-size if given; else ours know theirs (the receipt,
    saved with the config), and an official release states it in its file name (_256, _384);
    a file with neither is refused rather than guessed. One load in the usual cases; a second
    only when the name misled the first."""
    # the first guess needs no receipt: an explicit size, else the name's, else the saved config
    named = image_size or size_in_name(path)
    gpt = GPT.from_pretrained(path, block_size=(named // downsample) ** 2 if named else None)
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
                            "config inside, no _256/_384/_512 in its name): pass --image-size "
                            "(256 or 384 for the official c2i files), or rename it like "
                            "c2i_B_256.pt")
        if h * w != gpt.config.block_size:  # one of ours named _256
            gpt = GPT.from_pretrained(path, block_size=h * w)
    return gpt, receipt


def load_models(gpt_path, vq_path, image_size=None):
    """Both models on the CPU in eval mode, checked against each other: the GPT's words must be
    the tokenizer's codes (vocab = codebook size), its grid the tokenizer's grid at the trained
    size, and (for ours) its codes those of these very tokenizer weights. Returns (gpt, vq,
    gpt_path, vq_path), the paths being the demo's when none was given."""
    if gpt_path is None and vq_path is None:
        if not (os.path.isfile(DEMO_GPT) and os.path.isfile(DEMO_VQ)):
            raise UserError(NO_WEIGHTS)
        gpt_path, vq_path = DEMO_GPT, DEMO_VQ
    elif gpt_path is None or vq_path is None:
        raise UserError("pass both --gpt-ckpt and --vq-ckpt: a GPT's codes mean something only "
                        "to the tokenizer it was trained with")
    # the tokenizer first: its downsampling factor turns an image size into the GPT's grid
    vq = VQModel.from_pretrained(vq_path)
    ds = vq.config.downsample
    if image_size is not None:
        check_image_size(image_size, ds)
    gpt, receipt = load_gpt(gpt_path, image_size, ds)
    # official files carry no receipt, but the vocabulary is in the shapes: check at least that
    if gpt.config.vocab_size != vq.config.codebook_size:
        raise UserError(f"the GPT {gpt_path} predicts {gpt.config.vocab_size} codes but the "
                        f"tokenizer {vq_path} has {vq.config.codebook_size}: pass the tokenizer "
                        "the GPT was trained with")
    if receipt:  # ours: the codes it learned must be this tokenizer's
        check_receipt(receipt, gpt_path, vq, vq_path, image_size)
    return gpt, vq, gpt_path, vq_path


def check_receipt(receipt, gpt_path, vq, vq_path, image_size):
    """The GPT's codes receipt against this tokenizer and --image-size (one UserError line)."""
    # the grids: a tokenizer with another downsampling factor (VQ-8 for VQ-16) cuts the same
    # images into another number of cells, and the GPT's raster positions would mean nothing
    ds, (trained, _) = vq.config.downsample, receipt.grid
    grid = receipt.image_size // ds  # this tokenizer's grid at the trained size
    if grid != trained:
        raise UserError(f"the GPT {gpt_path} learned {trained}x{trained} grids of "
                        f"{receipt.image_size} px images, but the tokenizer {vq_path} cuts them "
                        f"into {grid}x{grid}: pass the tokenizer the GPT was trained with")
    if image_size is not None and image_size // ds != trained:
        raise UserError(f"--image-size {image_size} means {image_size // ds}x{image_size // ds} "
                        f"tokens, but the GPT {gpt_path} learned {trained}x{trained}: drop "
                        f"--image-size or use {trained * ds}")
    # the weights: two tokenizers of one topology (another seed, another training run) share the
    # grid and the vocabulary but not what each code looks like
    if receipt.tokenizer_checksum != tokenizer_checksum(vq):
        raise UserError(f"the GPT {gpt_path} was trained on the codes of another tokenizer than "
                        f"{vq_path} (weights checksum differs): pass the tokenizer its codes "
                        "were extracted with")


def check_writable(path, overwrite=False, flag="--out"):
    """Fail before minutes of sampling, not after: the folder must exist (or be creatable) and
    take a file, and a file already there (a finished evaluation set, a picture) is kept unless
    --overwrite says otherwise: 50,000 samples cost GPU-hours, and a new --seed would replace them
    without a word."""
    if os.path.isdir(path):
        raise UserError(f"output {path!r} is a folder; give a file name")
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose "
                        f"another {flag}")
    # a real file, at once deleted: the only test that catches read-only mounts and full quotas
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"cannot write to {path!r} ({e.strerror}); choose a writable "
                        "location") from None


# ------------------------------------------------------------------------------------------------
# Text-to-image (paper 3.3): prompts in, the caption prefix out, then the same sampler
#
# A text-conditional GPT reads caption features, not words. Which encoder makes them is part of
# the model: ours trained with --text t5-nano carry their T5 and its words inside the checkpoint;
# the official t2i_XL_*.pt files, and ours trained on frozen features, read FLAN-T5-XL's, so --t5
# names that folder (google/flan-t5-xl: config.json, spiece.model, the safetensors shards).

DEMO_T2I_GPT = "results/demo/t2i_gpt.pt"  # the demo's text-to-image half writes these
DEMO_T2I_VQ = "results/demo/t2i_vq.pt"
OFFICIAL_T2I = ["t2i_XL_stage1_256.pt", "t2i_XL_stage2_512.pt"]  # 16x16 and 32x32 codes
OFFICIAL_T2I_VQ = "vq_ds16_t2i.pt"
NO_T2I_WEIGHTS = f"""no --gpt-ckpt/--vq-ckpt given and no demo models at {DEMO_T2I_GPT}, \
{DEMO_T2I_VQ}. Run the demo, or use the official LlamaGen text-to-image weights ({OFFICIAL_URL}):
  tokenizer: {OFFICIAL_T2I_VQ}; GPT: {' or '.join(OFFICIAL_T2I)}; text encoder: the
  google/flan-t5-xl folder from Hugging Face (config.json, spiece.model, model-*.safetensors)
  e.g.  python sample.py --gpt-ckpt t2i_XL_stage1_256.pt --vq-ckpt {OFFICIAL_T2I_VQ} \\
            --t5 flan-t5-xl --prompt "a red apple on a wooden table\""""


def add_text_flags(p):
    """The text-to-image flags, in their own group; returns their names (they decide pixels)."""
    g = p.add_argument_group("text-to-image", "draw captions with a text-conditional GPT "
                             "(pictures default to cfg 7.5 and top-k 1000, the official t2i "
                             "settings)")
    g.add_argument("--prompt", dest="prompt", action="append", default=None, metavar="TEXT",
                   help="a caption to draw, one row each; repeat for more rows")
    g.add_argument("--prompts", default=None, metavar="FILE", help="a text file of captions, one "
                   "per line; with --num-samples, sample i draws line i (cycling), as FID-30k "
                   "draws the COCO captions")
    g.add_argument("--t5", default=None, metavar="FOLDER", help="the T5 folder whose features "
                   "the GPT reads (google/flan-t5-xl for the official t2i files); not for GPTs "
                   "trained with their own encoder (--text t5-nano)")
    g.add_argument("--per-prompt", type=int, default=None,
                   help="pictures per prompt, one row each (default: 4); not with --num-samples")
    return ("prompt", "prompts", "t5")


def read_prompts(path):
    """The non-empty lines of a prompts file."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts {path}: cannot read it ({e}); give a UTF-8 text file, one "
                        "prompt per line") from None
    # blank lines are dropped (spacing, a trailing newline); fid.py's --captions keeps them, as
    # its line i must stay the caption of image i
    lines = [line for line in lines if line]
    if not lines:
        raise UserError(f"--prompts {path} holds no prompt; write one per line")
    return lines


def check_prompt_args(args):
    """Prompts: one list (args.prompt_list) whose indices stand where class ids stand elsewhere,
    the official t2i picture defaults, and one line for every flag that does not go with them."""
    prompts = (args.prompt or []) + (read_prompts(args.prompts) if args.prompts else [])
    args.prompt_list = prompts or None
    evaluation = args.num_samples is not None
    if not prompts:  # a class run's stamp keeps the keys it always had: old parts still compare
        args.pixel_settings = tuple(k for k in args.pixel_settings
                                    if k not in ("prompt", "prompts", "t5"))
        for flag, value in (("--t5", args.t5), ("--per-prompt", args.per_prompt)):
            if value is not None:
                raise UserError(f"{flag} only applies with --prompt or --prompts; drop it")
        return
    if any(not p.strip() for p in prompts):
        raise UserError("--prompt: an empty prompt; give some words, or --cfg-scale 0 for "
                        "unconditional pictures")
    for flag, value in (("--class", args.classes), ("--per-class", args.per_class),
                        ("--labels", args.labels)):
        if value is not None:
            raise UserError(f"{flag} is for class-conditional GPTs; with prompts drop it"
                            + (" (--per-prompt sets pictures per prompt)"
                               if flag == "--per-class" else ""))
    if evaluation and args.per_prompt is not None:
        raise UserError("--per-prompt applies to pictures; with --num-samples each sample draws "
                        "the next prompt: drop it")
    args.classes = list(range(len(prompts)))  # sample_images' labels: indices into the prompts
    args.per_class = args.per_prompt
    if evaluation:  # gather_parts' summary line names this in place of random/balanced
        args.labels = "prompt indices"
    else:  # the official text-to-image demo: cfg 7.5, top-k 1000
        args.cfg_scale = 7.5 if args.cfg_scale is None else args.cfg_scale
        args.top_k = 1000 if args.top_k is None else args.top_k
    if args.out is None and not evaluation:
        args.out = "samples/prompts.png"


def default_t2i_models(args):
    """With prompts and no checkpoints: the demo's text-to-image models, or where to get some."""
    if args.prompt_list and args.gpt_ckpt is None and args.vq_ckpt is None:
        if not (os.path.isfile(DEMO_T2I_GPT) and os.path.isfile(DEMO_T2I_VQ)):
            raise UserError(NO_T2I_WEIGHTS)
        args.gpt_ckpt, args.vq_ckpt = DEMO_T2I_GPT, DEMO_T2I_VQ


class PromptCondition:
    """Prompt indices -> (caption features [B, N, caption_dim], mask [B, N]) left padded, on the
    GPT's device: the text encoder's right-padded output moved as the GPT was trained on it."""

    def __init__(self, prompts, encoder, length):
        """prompts: the captions the indices point into; encoder: a text.TextEncoder; length: the
        caption prefix the GPT was trained with (its cls_token_num), each caption cut or padded
        to it."""
        self.prompts, self.encoder, self.length = prompts, encoder, length

    def __call__(self, indices):
        """Encoded on each call rather than once: an evaluation set draws many prompts, and only
        a batch's worth of features need exist at a time."""
        texts = [self.prompts[int(i)] for i in indices]
        features, mask = self.encoder.encode_captions(texts, self.length)
        features, mask = left_pad_caption(features.float(), mask)
        return features.to(indices.device), mask.to(indices.device)


def joint_text_encoder(gpt_path, info, device, dtype):
    """The T5 and word tokenizer a GPT was trained with (train.py --text t5-nano), rebuilt from
    its checkpoint: the config and words from "meta", the weights under text_encoder.*."""
    ckpt = load_checkpoint(gpt_path)
    sd = {k.removeprefix("text_encoder."): v for k, v in unwrap_state_dict(ckpt).items()
          if k.startswith("text_encoder.")}
    try:
        encoder = T5Encoder(T5Config(**info["config"]))
    # KeyError: no config recorded; TypeError: a field this T5Config does not know (or lacks)
    except (KeyError, TypeError):
        raise UserError(f"{gpt_path}: its text encoder record is damaged; train it again") \
            from None
    load_weights(encoder, sd, f"text encoder of {gpt_path!r}")
    return TextEncoder(UnigramTokenizer.from_words(info["words"]), encoder, device, dtype)


def joint_condition(gpt, gpt_path, prompts, device):
    """The PromptCondition of `prompts` for a GPT trained with its own T5 (its meta["text"] kind
    "joint"), the encoder in float32: what the demo's benchmark and bench.py's re-ranking draw
    from, without sample.py's command line."""
    encoder = joint_text_encoder(gpt_path, gpt.meta["text"], device, torch.float32)
    return PromptCondition(prompts, encoder, gpt.config.cls_token_num)


def pretrained_text_encoder(args, gpt, gpt_path, info, device, dtype):
    """--t5 FOLDER, checked against what the GPT reads: the width always, and for ours the
    encoder receipt its training features carried."""
    receipt = (info or {}).get("receipt") or {}
    if args.t5 is None:
        name = (receipt.get("encoder") or receipt.get("name")) if info else "google/flan-t5-xl"
        raise UserError(f"the GPT {gpt_path} reads the features of a frozen text encoder "
                        f"({name}): pass its folder with --t5")
    encoder = TextEncoder.from_pretrained(args.t5, device, dtype)
    width = encoder.encoder.config.d_model
    if width != gpt.config.caption_dim:
        raise UserError(f"--t5 {args.t5} makes {width}-d features, the GPT {gpt_path} reads "
                        f"{gpt.config.caption_dim}-d ones: pass the encoder it was trained on")
    # the receipt of `data.py features` checksums the whole encoder (weights, pieces, cleaning)
    stamp, ours = ((receipt["encoder_checksum"], data.encoder_checksum(encoder))
                   if "encoder_checksum" in receipt else
                   (receipt.get("checksum"), tokenizer_checksum(encoder.encoder)))
    if stamp and stamp != ours:
        raise UserError(f"--t5 {args.t5} is not the text encoder whose features the GPT "
                        f"{gpt_path} learned (weights checksum differs): pass that one")
    return encoder


def text_condition(args, gpt, gpt_path, device, dtype):
    """The PromptCondition for a text-to-image GPT and its prompts; None for a class GPT. The
    condition kinds must agree: one line when they do not."""
    if not gpt.config.caption_dim:
        if args.prompt_list:
            raise UserError(f"the GPT {gpt_path} is class-conditional: draw it with --class, or "
                            "pass a text-to-image GPT for --prompt")
        return None
    if not args.prompt_list:
        raise UserError(f"the GPT {gpt_path} is text-conditional: give --prompt TEXT or "
                        "--prompts FILE, not --class")
    info = gpt.meta.get("text")
    # FLAN-T5 overflows float16 (text.py); bf16 has float32's range, as LlamaGen runs it
    text_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
    if info and info.get("kind") == "joint":
        if args.t5 is not None:
            raise UserError(f"the GPT {gpt_path} carries its own text encoder "
                            f"({info.get('encoder')}, trained with it): drop --t5")
        encoder = joint_text_encoder(gpt_path, info, device, text_dtype)
    else:
        encoder = pretrained_text_encoder(args, gpt, gpt_path, info, device, text_dtype)
    return PromptCondition(args.prompt_list, encoder, gpt.config.cls_token_num)


# ------------------------------------------------------------------------------------------------
# command line

def add_pixel_flags(decides):
    """The flags that decide the pixels, all in the argument group `decides`."""
    a = decides.add_argument
    a("--gpt-ckpt", default=None,
      help=f"GPT: ours (train.py) or an official c2i_*.pt (default: {DEMO_GPT})")
    a("--vq-ckpt", default=None,
      help=f"tokenizer: ours or the official {OFFICIAL_VQ} (default: {DEMO_VQ})")
    a("--class", dest="classes", type=int, nargs="+", default=None,
      help="class ids to draw (default: the official demo's 8 ImageNet classes if the GPT has "
           "them, else all its classes); with --num-samples, every class unless given, and the "
           "labels are drawn from them")
    a("--cfg-scale", type=float, default=None, help="classifier-free guidance scale s >= 0 "
      "(paper 2.3): 1 = off, 0 = the null class alone (unconditional), between 0 and 1 a blend "
      "of the two, above 1 guidance; negative s (pushing away from the class) is refused. (The "
      "official code treats every s <= 1 as off.) Pictures: default 4.0, as the official demo. "
      "--num-samples: required (paper FIDs: 2.0 for B and L)")
    a("--cfg-interval", type=int, default=-1, help="-1: guide every token; k >= 0: only tokens "
      "0..k+1, then the conditional logits alone (the official semantics)")
    a("--temperature", type=float, default=1.0,
      help="softmax temperature, > 0 and finite (default: 1.0)")
    a("--top-k", type=int, default=None, help="sample among the k most likely codes only, 0 = "
      "all (default: 2000 for pictures, as the official demo; 0 for --num-samples, as the "
      "official FID runs)")
    a("--top-p", type=float, default=1.0,
      help="nucleus sampling: smallest set with this mass, in (0, 1] (1 = all)")
    a("--seed", type=int, default=0,
      help="batch b is seeded from (seed, b), whatever the number of processes; >= 0")
    a("--image-size", type=int, default=None, help="pixels per side, (size/downsample)^2 tokens "
      "(default: the size the GPT was trained at: recorded in ours, _256/_384 in official file "
      "names; a file that states neither is refused without --image-size)")
    a("--resize-to", type=int, default=None, help="resize the images bicubically to this size, "
      "e.g. 256 for 384 px models before FID, as the official evaluation did")
    a("--batch-size", type=int, default=32,
      help="images per forward pass (doubled inside under CFG)")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
      help="GPT weights' dtype (auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on "
           "CPU/MPS); the tokenizer always decodes in fp32")
    a("--num-samples", type=int, default=None, help="evaluation: write exactly this many images "
      "as uint8 NHWC arr_0 (labels arr_1) in --out; resumable; run it under torchrun")
    a("--labels", choices=["random", "balanced"], default=None, help="with --num-samples: "
      "uniformly random over the classes, as the official evaluation (default), or cycling "
      "through them, N/classes each")


def get_args(argv=None):
    """The flags; args.pixel_settings names those that decide the pictures."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # The flags that decide the pixels are declared in one group: a --num-samples run records
    # their values with its parts (resume_stamp), so a resumed run cannot mix other settings in;
    # the stamp's keys are read off the group, never listed by hand.
    decides = p.add_argument_group("what the pictures depend on", "a --num-samples run records "
                                   "these; resuming it needs the same values")
    add_pixel_flags(decides)
    # argparse has no public accessor for a group's actions; _group_actions is the private one
    pixel_settings = tuple(action.dest for action in decides._group_actions)
    add_rerank_flags(p)
    pixel_settings += add_text_flags(p)  # the prompts and their encoder decide pixels too
    # the flags below change where the pictures go or how fast they come, not what they show
    a = p.add_argument
    a("--per-class", type=int, default=None,
      help="pictures per class, one row each (default: 4); not with --num-samples")
    a("--out", default=None, help="PNG grid to write (default: samples/class<ids>.png, or "
      "samples/prompts.png), or the .npz with --num-samples (default: samples/samples<N>.npz); "
      "an existing file is never "
      "replaced without --overwrite (an unfinished .npz run resumes instead)")
    a("--overwrite", action="store_true",
      help="replace an existing --out (and --progress GIF) instead of refusing")
    a("--device", default="auto", help="cuda, mps or cpu (default: the best available)")
    a("--progress", default=None, metavar="GIF",
      help="also write an animation of the rasters being written")
    a("--progress-frames", type=int, default=None,
      help="with --progress: frames, at most one per token (default: 32)")
    add_speed_flags(p.add_argument_group("speed", "how fast the codes come: the same "
                                         "distribution whichever is chosen"))
    args = p.parse_args(argv)
    args.pixel_settings = pixel_settings
    return args


def add_speed_flags(speed):
    """The faster samplers of model.py ("Faster sampling"). Not in the resume stamp: they keep the
    distribution, so parts drawn with either are samples of the same thing (Jacobi decoding
    spends the random numbers differently, so a seed gives other pictures; --compile gives the
    same ones, up to the float rounding of fused kernels)."""
    a = speed.add_argument
    a("--sampler", choices=["sequential", "jacobi"], default="sequential",
      help="sequential: one forward pass per code; jacobi: speculative Jacobi decoding, "
           "--window codes scored per pass and accepted by the speculative-sampling test, so "
           "fewer passes than codes (prints the passes per image)")
    a("--window", type=int, default=None,
      help="with --sampler jacobi: codes scored per forward pass (default: 16)")
    a("--compile", action="store_true",
      help="torch.compile the fixed-shape decode step (GPT.decode_step: captured once, as a "
           "CUDA graph on GPUs; slow start, faster steps); sequential sampling then runs "
           "through that step too")


def check_speed_args(args):
    """One UserError line for a speed flag out of its range or without its sampler."""
    if args.window is not None and args.sampler != "jacobi":
        raise UserError("--window only applies with --sampler jacobi; drop it")
    args.window = 16 if args.window is None else args.window
    if args.window < 1:
        raise UserError(f"--window {args.window} is out of range: codes scored per pass, >= 1")


# Flags that apply to one mode only: given in the other, they are refused, never ignored (a
# silently ignored --per-class in an evaluation run would look like a setting that took effect).
# Rows: (flag, attribute, what it needs, whether that is there); one test per row.
ONLY_WITH = [("--per-class", "per_class", "pictures, not --num-samples",
              lambda args: args.num_samples is None),
             ("--labels", "labels", "--num-samples", lambda args: args.num_samples is not None),
             ("--progress-frames", "progress_frames", "--progress", lambda args: args.progress)]


def check_args(args):
    """One UserError line for a flag out of its range or its mode; then the mode's defaults.
    Those flags default to None so that "not given" can be told apart from "given as the
    default"; the values the help promises are filled in here, after the check."""
    for flag, name, needs, present in ONLY_WITH:
        if getattr(args, name) is not None and not present(args):
            raise UserError(f"{flag} only applies with {needs}; drop it")
    evaluation = args.num_samples is not None
    args.per_class = 4 if args.per_class is None else args.per_class
    args.progress_frames = 32 if args.progress_frames is None else args.progress_frames
    args.labels = args.labels or "random"
    if args.top_k is None:  # the official demo's 2000 for pictures, all codes for FID
        args.top_k = 0 if evaluation else 2000
    if evaluation:
        if args.cfg_scale is None:
            raise UserError("evaluation runs need an explicit --cfg-scale (paper: 2.0 for B and "
                            "L, 1.75 for XL and XXL, 1.65 for 3B; 1 = no guidance)")
        if args.num_samples < 1:
            raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
        if args.progress:
            raise UserError("--progress animates pictures; drop it for --num-samples runs")
    elif args.world > 1:  # one PNG: every rank would draw the same pictures into the same file
        raise UserError("torchrun is for --num-samples evaluation runs; draw pictures with "
                        "plain python")
    if not evaluation and args.cfg_scale is None:
        args.cfg_scale = 4.0  # the official demo's guidance for pictures
    # each flag with the range it must lie in, as the one line names it; nan and inf fail every
    # comparison or the isfinite test, so they are refused here instead of inside the sampler
    finite = math.isfinite
    for name, ok, valid in [
            ("per_class", args.per_class >= 1, ">= 1"),
            ("batch_size", args.batch_size >= 1, ">= 1"),
            ("top_k", args.top_k >= 0, ">= 0 (0 = every code)"),
            ("progress_frames", args.progress_frames >= 1, ">= 1"),
            ("temperature", finite(args.temperature) and args.temperature > 0, "finite and > 0"),
            ("top_p", 0 < args.top_p <= 1, "in (0, 1]"),
            ("cfg_scale", finite(args.cfg_scale) and args.cfg_scale >= 0,
             "finite and >= 0 (1 = no guidance, 0 = unconditional)"),
            ("cfg_interval", args.cfg_interval >= -1, ">= -1 (-1 = guide every token)"),
            ("seed", args.seed >= 0, ">= 0"),
            ("resize_to", args.resize_to is None or args.resize_to > 0, ">= 1 pixel")]:
        if not ok:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} is out of range: "
                            f"it must be {valid}")


@torch.no_grad()  # sampling only: no autograd graph (and none left switched off for the caller)
def main(argv=None):
    """Check every flag, then load, then draw: a bad flag or an unwritable --out is reported before
    the first token, so that a mistake never costs a sampling run. Three outputs: a PNG grid of
    classes or prompts (picture_grid), or with --num-samples the evaluation .npz that fid.py reads
    (evaluation_npz, sharded over torchrun ranks and resumable by its parts)."""
    args = get_args(argv)
    # torchrun sets RANK and WORLD_SIZE; a plain `python sample.py` is rank 0 of 1
    rank, args.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    check_rerank_args(args)
    check_prompt_args(args)
    check_args(args)
    check_speed_args(args)
    # under torchrun each process takes the GPU of its LOCAL_RANK (common.setup_device)
    args.device = device = setup_device(args.device)
    # after the device: "auto" precision depends on the GPU found
    args.precision, dtype = resolve_precision(args.precision, device)

    default_t2i_models(args)
    gpt, vq, gpt_path, vq_path = load_models(args.gpt_ckpt, args.vq_ckpt, args.image_size)
    # absolute paths: the resume stamp must not depend on the working directory
    args.gpt_ckpt, args.vq_ckpt = os.path.abspath(gpt_path), os.path.abspath(vq_path)
    # the size actually drawn, resolved from the GPT, is what the resume stamp records
    args.image_size = math.isqrt(gpt.config.block_size) * vq.config.downsample
    condition = text_condition(args, gpt, gpt_path, device, dtype)
    n_classes = len(args.prompt_list) if condition else gpt.config.num_classes
    if args.classes is None:  # evaluation covers every class; pictures show the official demo's
        # a GPT of fewer classes (the demo's) lacks those ImageNet ids: it shows all of its own
        demo = max(DEMO_CLASSES) < n_classes and not args.num_samples
        args.classes = DEMO_CLASSES if demo else list(range(n_classes))
    bad = [k for k in args.classes if not 0 <= k < n_classes]
    if bad:
        raise UserError(f"class {bad[0]} is outside [0, {n_classes}): this GPT knows {n_classes} "
                        f"classes; pick ids 0..{n_classes - 1}")
    if args.out is None:
        args.out = (f"samples/samples{args.num_samples}.npz" if args.num_samples else
                    "samples/prompts.png" if condition else
                    "samples/class" + "-".join(map(str, args.classes)) + ".png")
    setup_reranker(args, gpt)
    for flag, path in (("--out", args.out), ("--progress", args.progress)):
        if path:  # all checks done before the first token is drawn
            check_writable(path, args.overwrite, flag)

    # the GPT in --precision, the tokenizer kept in float32 (sample_images says why)
    gpt, vq = gpt.to(device=device, dtype=dtype), vq.to(device)
    if args.compile:  # generation loops over this one step: compile it, not the loop
        gpt.decode_step = compiled_step(gpt, device)
    passes = []  # forward passes of each batch
    sample_kw = dict(cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     resize_to=args.resize_to, condition=condition, sampler=args.sampler,
                     window=args.window, static=args.compile, passes=passes)
    if args.num_samples is None:
        picture_grid(args, gpt, vq, sample_kw)
        report_passes(rank, passes, gpt.config.block_size, args)
        print(f"wrote {args.out}" + (f" and {args.progress}" if args.progress else ""))
        return
    # only barriers cross processes, so gloo serves GPUs too; the long timeout covers rank 0's
    # wait for the slowest rank, which can be hours into a 50,000 image run
    if args.world > 1:
        dist.init_process_group("gloo", timeout=timedelta(hours=6))
    try:
        evaluation_npz(args, gpt, vq, sample_kw, rank, args.world)
        report_passes(rank, passes, gpt.config.block_size, args)
    finally:
        if args.world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    cli(main)
