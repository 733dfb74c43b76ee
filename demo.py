"""The whole LlamaGen pipeline on the embedded dataset, on a laptop CPU in minutes:

    python demo.py                           # the class-conditional half
    python demo.py --only t2i                # the text-conditional half, on its own
    python demo.py --device cuda --scale 8   # the same story, bigger and longer, on a GPU

The class-conditional half (c2i, paper 3.1-3.2), on coloured shapes at 32 px:

1. train a small VQ tokenizer on them, 6,000 captioned scenes mixed in (train.py, stage 1)
2. measure it on held-out images: PSNR, SSIM, codebook usage; reconstructions beside the originals
3. turn every training image into codes (codes.py extract)
4. train a small GPT on those codes (train.py, stage 2)
5. draw every class at cfg 1 and cfg 4, check the pictures with a simple classifier, animate one
   drawing

The text-conditional half (t2i, paper 3.3), on captioned scenes (scenes.py) at 32 px:

6. its own tokenizer (VQ-patch: a code per 4x4 patch, every colour-shape pair) and the benchmark's
   checker on reconstructed scenes: the most the text GPT can score through it
7. the codes of the captioned scenes, their captions beside them
8. train a small GPT on them: DALL-E's one stream of caption and image tokens (train.py --text
   stream), or LlamaGen's caption prefix from a small T5 trained along (--t2i-text t5-nano)
9. score the compositional benchmark (scenes.py) at cfg 1 and a guided scale, seen and held-out
   colour-shape pairs apart; a grid of prompts (sample.py --prompt) and the GIF of its drawing
10. train a small CLIP on the captioned scenes (train.py --model CLIP-tiny) and re-rank with it,
   as DALL-E does: the benchmark again, each prompt keeping the best of N candidates, and a grid
   of each prompt's best 8 of 32 (sample.py --candidates)

Everything lands in results/demo/ (sample.py then uses these models by default).

Each step calls the project's own entry points (train.main, codes.extract_codes, sample.main) with
the flags a user would type, so the demo is also the end-to-end test of the pipeline: with the
same seed it prints the same figures (timings aside) and writes the same pictures on every run on
one machine with as many threads. The sizes are chosen for a CPU: 32 px images cut into 8x8 codes,
GPT-nano; each half takes under 10 minutes on a fast 2-core CPU with bf16 units (BENCHMARKS.md).
"""
import argparse
import json
import math
import os
import shutil
import time

import numpy as np
import torch

import clip
import codes
import sample
import scenes
import t2i
import train
from common import (POSITIVE, SEED, at_least, check_flags, cli, cpu_has_bf16, from_uint8,
                    pick_device, read_json, resolve_precision, save_atomic, save_grid)
from model import GPT
from shapes import CLASS_NAMES, SyntheticShapes
from tokenizer import VQModel, tokenizer_metrics


class NearestNeighbour:
    """A simple classifier for the embedded dataset: k-nearest neighbours (k=5) in pixel space,
    against 10,000 real training images blurred to 8x8 so that a shape a few pixels off still
    matches its class. It stands in for the Inception network of FID (no download); its accuracy
    on real images, printed beside the samples', says how far to trust it."""

    def __init__(self, image_size, n=10000, seed=123):
        ds = SyntheticShapes(n, image_size, seed=seed)
        x, self.labels = zip(*(ds[i] for i in range(n)))
        self.refs, self.labels = self.features(torch.stack(x)), torch.tensor(self.labels)

    @staticmethod
    def features(x):  # colour and rough layout: all that tells these ten classes apart
        return torch.nn.functional.adaptive_avg_pool2d(x.float(), 8).flatten(1)

    def __call__(self, images):  # the majority class of the 5 nearest real images
        d = torch.cdist(self.features(images), self.refs)
        votes = self.labels[d.topk(5, largest=False).indices]
        return torch.mode(votes, dim=1).values


def get_args():
    """The demo's knobs; the defaults are the run the README describes."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.dirname(sample.DEMO_GPT), help="results folder")
    p.add_argument("--device", default="auto",
                   help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step count by this")
    p.add_argument("--image-size", type=int, default=32,
                   help="pixels; the tokenizer makes (size/4)^2 codes")
    p.add_argument("--gpt", default="nano", help="GPT config (model.py), both halves")
    # each half's own knobs: None until parsed, then HALF_DEFAULTS of the half that runs
    p.add_argument("--vq-steps", type=int, help="c2i: tokenizer training steps (x --scale)")
    p.add_argument("--gpt-steps", type=int, help="c2i: GPT training steps (x --scale)")
    p.add_argument("--images", type=int, help="c2i: training images of the embedded dataset")
    p.add_argument("--per-class", type=int,
                   help="c2i: samples per class and cfg for the accuracy (the grids show 10)")
    p.add_argument("--t2i-vq-steps", type=int, help="t2i: tokenizer training steps (x --scale)")
    p.add_argument("--scenes", type=int, help="t2i: training scenes of the captioned world")
    p.add_argument("--t2i-steps", type=int, help="t2i: GPT training steps (x --scale)")
    p.add_argument("--t2i-text", choices=["stream", "t5-nano"],
                   help="t2i: the GPT's text side: DALL-E's one stream, or LlamaGen's caption "
                        "prefix from a T5-nano trained along (train.py --text)")
    p.add_argument("--per-task", type=int,
                   help="t2i: benchmark prompts per task (6 tasks), one image each per cfg")
    p.add_argument("--t2i-cfg", type=float, help="t2i: the guided scale of benchmark and grid")
    p.add_argument("--clip-steps", type=int,
                   help="t2i: CLIP-tiny training steps for re-ranking (x --scale)")
    p.add_argument("--candidates", type=int,
                   help="t2i: benchmark candidates per prompt that CLIP re-ranks (1 = none)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="training precision (auto: train.py's on GPUs, bf16 on CPUs that "
                        "multiply bf16 natively, e.g. avx512_bf16, fp32 on other CPUs; the "
                        "tokenizer always trains in fp32)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything")
    p.add_argument("--only", choices=list(HALF_DEFAULTS), default="c2i",
                   help="the half to run: c2i (class-conditional, the default) or t2i "
                        "(text-conditional); each trains its own tokenizer")
    p.epilog = "defaults: " + "; ".join(f"{h}: " + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in d.items()) for h, d in HALF_DEFAULTS.items())
    args = p.parse_args()
    # a count of 0 would only fail minutes later, inside a step; the other half's knob, never
    check_flags(args, RANGES, [(k, f"--only {h}", lambda a, h=h: a.only == h)
                               for h, d in HALF_DEFAULTS.items() for k in d])
    vars(args).update({k: v for k, v in HALF_DEFAULTS[args.only].items()
                       if getattr(args, k) is None})
    return args


# per_class 50: from 10 samples a class's accuracy moves 10 points with one sample, too coarse
HALF_DEFAULTS = {"c2i": dict(vq_steps=600, gpt_steps=1800, images=12000, per_class=50),
                 "t2i": dict(t2i_vq_steps=600, scenes=30000, t2i_steps=1000, t2i_text="stream",
                             per_task=50, t2i_cfg=1.5, clip_steps=800, candidates=4)}
RANGES = {"scale": POSITIVE, "t2i_cfg": at_least(0), "seed": SEED, "image_size": at_least(1),
          **{k: at_least(1) for half in HALF_DEFAULTS.values() for k, v in half.items()
             if type(v) is int}}


def fresh(folder):
    """`folder`, emptied: the demo always starts over, its runs are minutes long."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def last_val(run):
    """The last validation figure train.py logged in run/log.jsonl (a GPT: nats per token)."""
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f][-1]["val"]


def train_tokenizer(args, device, model, spec, shared, name, step, steps, *flags):
    """Steps 1 and 6: `model` trained by train.py on `spec` (and `flags`) into out/<name>.pt;
    returns it loaded from its checkpoint, as a user would load it."""
    out, size = args.out, args.image_size
    print(f"== {step}. tokenizer: {model} on {spec} at {size} px")
    vq_dir = fresh(os.path.join(out, f"{name}_run"))
    # no LPIPS and no discriminator: both need downloads or many steps to help, and plain L2 on
    # these flat-coloured shapes is enough; a 10-20x higher lr than the paper's for a short run,
    # small batches, and always float32 (BENCHMARKS.md, "the demo's settings", has the ablations)
    train.main(["--model", model, "--data", spec, "--image-size", str(size),
                "--batch-size", "16", "--max-steps", str(int(steps * args.scale)),
                "--perceptual-weight", "0", "--disc-weight", "0", "--eval-interval", "100",
                "--out-dir", vq_dir, *shared, "--precision", "fp32", *flags])
    shutil.copy(os.path.join(vq_dir, "ckpt.pt"), os.path.join(out, f"{name}.pt"))
    return VQModel.from_pretrained(os.path.join(out, f"{name}.pt")).to(device).eval()


def measure_tokenizer(args, vq, device, figures):
    """Step 2: PSNR, SSIM and codebook usage on held-out shapes, a PNG of reconstructions."""
    print("== 2. tokenizer on 512 held-out images")
    held = SyntheticShapes(512, args.image_size, seed=args.seed + 1)  # a seed training never saw
    # no rFID: its Inception weights need a download
    metrics = tokenizer_metrics(vq, held, net=None, batch_size=256, device=device)
    figures.update(psnr=metrics["psnr"], ssim=metrics["ssim"],
                   codebook_usage=metrics["codebook_usage"], codebook_size=vq.config.codebook_size)
    x = torch.stack([held[i][0] for i in range(16)]).to(device)
    with torch.no_grad():
        recon = vq.decode(vq.encode(x))
    pairs = torch.stack([x.cpu(), recon.cpu()], 1).flatten(0, 1)  # original, reconstruction, ...
    save_grid(pairs, os.path.join(args.out, "reconstructions.png"), nrow=8)
    print(f"PSNR {figures['psnr']:.2f} dB, SSIM {figures['ssim']:.3f}, "
          f"codebook usage {100 * figures['codebook_usage']:.1f}% of {vq.config.codebook_size}")


def checker_on_reconstructions(args, vq, device, figures):
    """Step 6's measure: the benchmark's checker on reconstructed true scenes, the ceiling the
    tokenizer leaves the text GPT."""
    prompts = scenes.benchmark_prompts(args.per_task, seed=args.seed + 1)
    rng, size = np.random.default_rng(args.seed + 1), args.image_size
    renders = torch.stack([from_uint8(scenes.render(scenes.scene_for(p["spec"], size, rng),
                                                    size)) for p in prompts]).to(device)
    with torch.no_grad():
        recon = sample.decode(vq, vq.encode(renders).flatten(1))
    res = scenes.score(list(recon), prompts)
    figures["checker_on_reconstructed_scenes"] = res["overall"]
    print(f"the benchmark's checker on reconstructed scenes: {100 * res['overall']:.0f}% "
          f"({per_task(res)})")


def train_gpt(args, vq, codes_dir, shared, figures):
    """Step 4: the GPT trained by train.py on the codes; its validation loss in bits per token."""
    print(f"== 4. GPT-{args.gpt} on the codes")
    gpt_dir = fresh(os.path.join(args.out, "gpt_run"))
    # a short run needs a decaying schedule (the paper's is constant for 300 epochs), a high
    # peak rate and no dropout: 1800 steps of 32 see each image about 2.4 times, too few to
    # overfit (the ablations: BENCHMARKS.md)
    train.main(["--model", args.gpt, "--data", codes_dir, "--batch-size", "32", "--lr", "3e-3",
                "--lr-schedule", "cosine", "--warmup-steps", "50", "--dropout", "0",
                "--max-steps", str(int(args.gpt_steps * args.scale)),
                "--eval-interval", "200", "--out-dir", gpt_dir, *shared])
    shutil.copy(os.path.join(gpt_dir, "ckpt.pt"), os.path.join(args.out, "gpt.pt"))
    # train.py logs the validation cross-entropy in nats; bits compare with log2(codebook), the
    # cost of a GPT that knows nothing
    figures.update(val_bits_per_token=last_val(gpt_dir) / math.log(2),
                   uniform_bits_per_token=math.log2(vq.config.codebook_size))
    print(f"validation loss {figures['val_bits_per_token']:.2f} bits/token "
          f"(knowing nothing: {figures['uniform_bits_per_token']:.0f})")


def draw_pictures(args, vq, device, figures):
    """Step 5: every class at cfg 1 and 4, scored by NearestNeighbour; then sample.py's own
    command line for one picture per class and the GIF of its drawing."""
    out, size = args.out, args.image_size
    print("== 5. pictures")
    gpt = GPT.from_pretrained(os.path.join(out, "gpt.pt")).to(device).eval()
    classify = NearestNeighbour(size)
    real = SyntheticShapes(500, size, seed=args.seed + 2)
    xr, yr = zip(*(real[i] for i in range(len(real))))
    right_real = (classify(torch.stack(xr)) == torch.tensor(yr)).float()
    on_real = right_real.mean().item()
    figures["classifier_accuracy_on_real"] = on_real
    real_per_class = [right_real[torch.tensor(yr) == c].mean().item() for c in range(10)]
    figures["classifier_accuracy_on_real_per_class"] = dict(zip(CLASS_NAMES, real_per_class))
    labels = torch.arange(10).repeat_interleave(args.per_class)
    # without guidance (cfg 1) and with the official demo's cfg 4 (paper 2.3): guidance trades
    # variety for fidelity to the class, which the accuracy shows; both from the same seed
    for cfg in (1.0, 4.0):
        gen = torch.Generator(device).manual_seed(args.seed)
        t0 = time.perf_counter()
        images = sample.sample_images(gpt, vq, labels.to(device), cfg_scale=cfg, generator=gen)
        ms = 1000 * (time.perf_counter() - t0) / len(labels)
        pixels = from_uint8(images)  # the saved uint8 bytes, back to floats to classify
        right = (classify(pixels) == labels).float()
        acc = right.mean().item()
        figures[f"class_accuracy_cfg{cfg:g}"], figures[f"ms_per_image_cfg{cfg:g}"] = acc, ms
        # per class too: a mean hides one class the GPT never learnt to draw
        per_class = right.view(10, args.per_class).mean(1).tolist()
        figures[f"class_accuracy_cfg{cfg:g}_per_class"] = dict(zip(CLASS_NAMES, per_class))
        shown = min(args.per_class, 10)  # each class's first 10: rows a reader can take in
        save_grid(pixels.view(10, args.per_class, *pixels.shape[1:])[:, :shown].flatten(0, 1),
                  os.path.join(out, f"samples_cfg{cfg:g}.png"), nrow=shown)
        print(f"cfg {cfg:g}: class accuracy {100 * acc:.0f}% ({ms:.0f} ms per image); per class: "
              + ", ".join(f"{name} {100 * a:.0f}%" for name, a in zip(CLASS_NAMES, per_class)))
    print(f"(the classifier itself gets {100 * on_real:.0f}% on real images, at least "
          f"{100 * min(real_per_class):.0f}% per class)")
    # the command line a user would type: one picture per class and the GIF of its drawing
    sample.main(["--class", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "--per-class", "1",
                 "--cfg-scale", "4", "--seed", str(args.seed),
                 "--progress", os.path.join(out, "drawing.gif"), "--device", device,
                 "--overwrite",  # a rerun of the demo replaces its own pictures
                 "--out", os.path.join(out, "one_per_class.png"),
                 "--gpt-ckpt", os.path.join(out, "gpt.pt"),
                 "--vq-ckpt", os.path.join(out, "vq.pt")])


def extract(args, vq, device, spec, name, step):
    """Steps 3 and 7: the codes of every training image, computed once: the GPT then trains on
    integers, not on pixels. Returns the codes folder."""
    print(f"== {step}. codes of every training image of {spec}")
    codes_dir = fresh(os.path.join(args.out, name))
    codes.extract_codes(vq, spec, codes_dir, image_size=args.image_size, batch_size=256,
                        device=device)
    return codes_dir


def class_half(args, device, shared, figures, phase):
    """The class-conditional half: steps 1-5, each timed into figures["minutes_<step>"]."""
    spec = f"synthetic:{args.images}"
    # the entropy loss spreads use over the codebook in a few 100 steps; 6,000 captioned scenes
    # mixed in (BENCHMARKS.md, "Figures", compares the class GPT's draws with and without them)
    vq = train_tokenizer(args, device, "VQ-tiny", spec + "+scenes:6000", shared, "vq", 1,
                         args.vq_steps, "--lr", "1e-3", "--entropy-loss-ratio", "0.1")
    phase("tokenizer")
    measure_tokenizer(args, vq, device, figures)
    codes_dir = extract(args, vq, device, spec, "codes", 3)
    phase("codes")
    train_gpt(args, vq, codes_dir, shared, figures)
    phase("gpt")
    draw_pictures(args, vq, device, figures)
    phase("pictures")


PROMPTS = ["a red circle", "a green square to the left of a blue star", "three yellow triangles",
           "a magenta cross at the top left", "a cyan triangle above a red square",
           "a blue triangle", "a yellow star and a green circle", "a red square"]
# The last three name pairs held out of training (scenes.HELDOUT_PAIRS: a red square, a blue
# triangle, a yellow star): the grid shows seen and unseen combinations side by side.


def train_t2i(args, codes_dir, shared, figures):
    """Step 8: the caption-conditional GPT, with the text side --t2i-text says, by train.py."""
    print(f"== 8. GPT-{args.gpt} on the captioned scenes, " + (
        "DALL-E's one stream" if args.t2i_text == "stream" else "a T5-nano trained along"))
    run = fresh(os.path.join(args.out, "t2i_run"))
    # either way the words are learnt from these captions (no pretrained encoder knows them);
    # 16 tokens hold the longest caption; the recipe: BENCHMARKS.md, "How the text half learns"
    train.main(["--model", args.gpt, "--data", codes_dir, "--text", args.t2i_text,
                "--caption-len", "16", "--batch-size", "64", "--lr", "2e-3",
                "--lr-schedule", "cosine", "--warmup-steps", "50", "--dropout", "0",
                "--max-steps", str(int(args.t2i_steps * args.scale)),
                "--eval-interval", "250", "--out-dir", run, *shared])
    shutil.copy(os.path.join(run, "ckpt.pt"), os.path.join(args.out, "t2i_gpt.pt"))
    figures["t2i_val_bits_per_token"] = last_val(run) / math.log(2)
    print(f"validation loss {figures['t2i_val_bits_per_token']:.2f} bits/token")


def per_task(res):
    """A benchmark result's tasks, for one printed line."""
    return ", ".join(f"{t} {100 * res[t]:.0f}%" for t in scenes.TASKS)


def prompt_grid(args, device, name, *flags):
    """sample.py's --prompt command line for the PROMPTS grid at the guided scale, as a user
    would type it, into args.out/name."""
    sample.main([*(a for p in PROMPTS for a in ("--prompt", p)), *flags,
                 "--cfg-scale", str(args.t2i_cfg), "--seed", str(args.seed), "--device", device,
                 "--overwrite", "--out", os.path.join(args.out, name),
                 "--gpt-ckpt", os.path.join(args.out, "t2i_gpt.pt"),
                 "--vq-ckpt", os.path.join(args.out, "t2i_vq.pt")])


def benchmark(args, vq, device, figures):
    """Step 9: the compositional benchmark (scenes.py) at cfg 1 and a guided scale: per task,
    overall, seen and held-out pairs; then sample.py's --prompt command line for the grid and
    the GIF. Returns (the GPT, the prompts, their condition) for step 10."""
    out = args.out
    print(f"== 9. the compositional benchmark ({args.per_task} prompts per task)")
    path = os.path.join(out, "t2i_gpt.pt")
    gpt = sample.load_gpt(path, None, 4)[0].to(device).eval()
    prompts = scenes.benchmark_prompts(args.per_task, seed=args.seed)
    condition = t2i.joint_condition(gpt, path, [p["prompt"] for p in prompts], device)
    checker = scenes.checker_accuracy(args.per_task, args.image_size, args.seed)
    figures["t2i_checker_accuracy_on_renders"] = checker
    for cfg in (1.0, args.t2i_cfg):
        gen = torch.Generator(device).manual_seed(args.seed)
        images = sample.sample_images(gpt, vq, list(range(len(prompts))), cfg_scale=cfg,
                                      generator=gen, condition=condition)
        res = scenes.score(list(images), prompts)
        figures[f"t2i_cfg{cfg:g}"] = res
        print(f"cfg {cfg:g}: overall {100 * res['overall']:.0f}% (seen pairs "
              f"{100 * res['seen']['overall']:.0f}%, held-out {100 * res['heldout']['overall']:.0f}"
              "%); " + per_task(res))
    print(f"(the checker on true renders: {per_task(checker)})")
    prompt_grid(args, device, "prompts.png", "--per-prompt", "8",
                "--progress", os.path.join(out, "t2i_drawing.gif"))
    return gpt, prompts, condition


def rerank(args, vq, device, shared, figures, gpt, prompts, condition):
    """Step 10: CLIP-tiny trained by train.py on the captioned scenes, then the benchmark at the
    guided scale with each prompt's CLIP-best of --candidates, and sample.py's re-ranked grid."""
    out = args.out
    print("== 10. CLIP-tiny on the captioned scenes, and re-ranking by it")
    run, steps = fresh(os.path.join(out, "clip_run")), str(int(args.clip_steps * args.scale))
    train.main(["--model", "CLIP-tiny", "--data", f"scenes:{args.scenes}", "--batch-size", "64",
                "--lr", "3e-3", "--lr-schedule", "cosine", "--warmup-steps", "50",
                "--max-steps", steps, "--eval-interval", steps, "--out-dir", run, *shared])
    clip_path = os.path.join(out, "clip.pt")  # where sample.py looks for the demo's CLIP
    shutil.copy(os.path.join(run, "ckpt.pt"), clip_path)
    figures["clip_val_right_caption_among_10"] = last_val(run)
    print(f"an image picks its own caption among 10 in "
          f"{100 * figures['clip_val_right_caption_among_10']:.0f}% (chance 10%)")
    model, tokenizer = clip.load(clip_path)
    model = model.to(device)
    texts = [p["prompt"] for p in prompts]
    n = args.candidates
    gen = torch.Generator(device).manual_seed(args.seed)
    # prompt-major, as rerank_candidates reads them: prompt i's n candidates are adjacent
    labels = [i for i in range(len(prompts)) for _ in range(n)]
    drawn = sample.sample_images(gpt, vq, labels, cfg_scale=args.t2i_cfg, generator=gen,
                                 condition=condition)
    kept, _ = clip.rerank_candidates(drawn, texts, model, 1, tokenizer)
    # the same draws twice: each prompt's first candidate (no re-ranking) and CLIP's pick, so the
    # difference is CLIP's alone, not another seed's
    for name, images in (("first", drawn[::n]), (f"best_of_{n}", kept)):
        res = scenes.score(list(images), prompts)
        figures[f"t2i_cfg{args.t2i_cfg:g}_{name}"] = res
        print(f"cfg {args.t2i_cfg:g}, " + ("the first" if name == "first" else "CLIP's best")
              + f" of {n} candidates: overall {100 * res['overall']:.0f}%; " + per_task(res))
    prompt_grid(args, device, "prompts_reranked.png", "--candidates", "32", "--keep", "8",
                "--clip", clip_path)


def text_half(args, device, shared, figures, phase):
    """The text-conditional half: steps 6-10 on the captioned world, with its own tokenizer."""
    spec = f"scenes:{args.scenes}"
    # The local tokenizer: VQ-tiny's codes settle differently in every training, and the text
    # half's score with them (BENCHMARKS.md, "The tokenizer's lottery"). No entropy loss: equal
    # patches share a code anyway; more codes in use only widen the GPT's choice. Every colour-
    # shape pair: a tokenizer reads no captions, the pairs are held out of the GPT's.
    vq = train_tokenizer(args, device, "VQ-patch", spec, shared, "t2i_vq", 6, args.t2i_vq_steps,
                         "--lr", "2e-3", "--entropy-loss-ratio", "0", "--with-heldout")
    checker_on_reconstructions(args, vq, device, figures)
    phase("t2i_tokenizer")
    codes_dir = extract(args, vq, device, spec, "scene_codes", 7)
    phase("scene_codes")
    train_t2i(args, codes_dir, shared, figures)
    phase("t2i_gpt")
    drawn_from = benchmark(args, vq, device, figures)
    phase("benchmark")
    rerank(args, vq, device, shared, figures, *drawn_from)
    phase("rerank")


def main():
    args = get_args()
    device, out, t_start = pick_device(args.device), args.out, time.time()
    os.makedirs(out, exist_ok=True)
    # figures collects every number printed, and the machine that printed them, for
    # summary.json: timings differ between machines, the rest must not
    figures = dict(machine=torch.cuda.get_device_name(device) if device.startswith("cuda")
                   else f"{device}, {os.cpu_count()} CPU cores")
    precision = args.precision
    if precision == "auto":  # train.py's own auto keeps every CPU in fp32
        precision = ("bf16" if cpu_has_bf16() else "fp32") if device == "cpu" else \
            resolve_precision("auto", device)[0]
    figures["precision"] = precision
    # flags every training run shares: no DataLoader workers (a 2-core machine gains nothing from
    # them), one seed, 256 held-out items for the validation loss, one precision
    shared = ["--device", device, "--num-workers", "0", "--seed", str(args.seed),
              "--val-size", "256", "--precision", precision]

    def phase(name):  # minutes per phase go to summary.json
        figures[f"minutes_{name}"] = (time.time() - t_start) / 60 - sum(
            v for k, v in figures.items() if k.startswith("minutes_"))

    (class_half if args.only == "c2i" else text_half)(args, device, shared, figures, phase)
    figures[f"minutes_{args.only}"] = (time.time() - t_start) / 60
    # one summary for both halves: each run replaces its own half's figures
    path = os.path.join(out, "summary.json")
    old = read_json(path, "delete it") if os.path.isfile(path) else {}
    save_atomic(lambda f: f.write(json.dumps({**old, **figures}, indent=1).encode()), path)
    print(f"\n== done in {figures[f'minutes_{args.only}']:.1f} min; pictures and summary.json "
          f"in {out}/")
    if args.only == "c2i":
        print("rows of samples_cfg*.png, top to bottom: " + ", ".join(CLASS_NAMES))
        print("the text half, its own 10 minutes: python demo.py --only t2i")
    else:
        print("rows of prompts.png and prompts_reranked.png, top to bottom: "
              + "; ".join(PROMPTS))


if __name__ == "__main__":
    cli(main)
