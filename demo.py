"""The whole LlamaGen pipeline on the embedded dataset, on a laptop CPU in minutes (2 cores):

    python demo.py                           # 2 CPU cores: tokenizer, codes, GPT, pictures
    python demo.py --only c2i                # only the class-conditional half
    python demo.py --device cuda --scale 8   # the same story, bigger and longer, on a GPU

The class-conditional half (c2i, paper 3.1-3.2):

1. train a small VQ tokenizer on images of coloured shapes (train.py, stage 1)
2. measure it on held-out images: PSNR, SSIM, codebook usage; reconstructions beside the originals
3. turn every training image into codes (data.py extract)
4. train a small GPT on those codes (train.py, stage 2)
5. draw every class at cfg 1 and cfg 4, check the pictures with a simple classifier, animate one
   drawing

The text-conditional half (t2i, paper 3.3) is not there yet: `--only t2i` says so.

Everything lands in results/demo/ (sample.py then uses these models by default).

Each step calls the project's own entry points (train.main, data.extract_codes, sample.main) with
the flags a user would type, so the demo is also the end-to-end test of the pipeline: with the
same seed it prints the same figures (timings aside) and writes the same pictures on every run on
one machine. The sizes are chosen for a CPU: 32 px images cut into 8x8 codes, GPT-nano.
"""
import argparse
import json
import math
import os
import shutil
import time

import torch

import data
import fid
import sample
import train
from common import UserError, cli, pick_device
from data import CLASS_NAMES, SyntheticShapes
from model import GPT
from tokenizer import VQModel


class NearestNeighbour:
    """A simple classifier for the embedded dataset: k-nearest neighbours (k=5) in pixel space,
    against 10,000 real training images blurred to 8x8 so that a shape a few pixels off still
    matches its class. It stands in for the Inception network of FID: no download, and its accuracy
    on real images (printed beside the samples', per class too) says how far to trust it. With
    5,000 references a yellow plus was taken for another class one time in ten; 10,000 bring every
    class to at least 96% on real images."""

    def __init__(self, image_size, n=10000, seed=123):
        ds = SyntheticShapes(n, image_size, seed=seed)
        x, self.labels = zip(*(ds[i] for i in range(n)))
        self.refs, self.labels = self.features(torch.stack(x)), torch.tensor(self.labels)

    @staticmethod
    def features(x):
        """[B, 3, H, W] -> [B, 192]: the 8x8 average-pooled image, flattened. The pooling keeps
        colour and rough layout, which is all that tells these ten classes apart."""
        return torch.nn.functional.adaptive_avg_pool2d(x.float(), 8).flatten(1)

    def __call__(self, images):
        """Predicted labels [B]: the majority class of the 5 nearest real images."""
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
    p.add_argument("--vq-steps", type=int, default=300, help="tokenizer training steps (x --scale)")
    p.add_argument("--gpt-steps", type=int, default=600, help="GPT training steps (x --scale)")
    p.add_argument("--gpt", default="nano", help="GPT config (model.py)")
    p.add_argument("--images", type=int, default=12000,
                   help="training images of the embedded dataset")
    p.add_argument("--per-class", type=int, default=10,
                   help="samples per class and cfg for the accuracy")
    p.add_argument("--seed", type=int, default=0, help="seed of everything")
    p.add_argument("--only", choices=HALVES, default=None,
                   help="run one half: c2i (class-conditional) or t2i (text-conditional); "
                        "default: both")
    return p.parse_args()


def fresh(folder):
    """`folder`, emptied: the demo always starts over, its runs are minutes long."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def train_tokenizer(args, device, spec, shared):
    """Step 1: VQ-tiny trained by train.py; returns it loaded from its checkpoint, as a user
    would load it."""
    out, size = args.out, args.image_size
    print(f"== 1. tokenizer: VQ-tiny on {spec} at {size} px")
    vq_dir = fresh(os.path.join(out, "vq_run"))
    # no LPIPS and no discriminator: both need downloads or many steps to help, and plain L2 on
    # these flat-coloured shapes is enough; a 10x higher lr than the paper's for a short run
    train.main(["--model", "VQ-tiny", "--data", spec, "--image-size", str(size),
                "--batch-size", "32", "--lr", "1e-3",
                "--max-steps", str(int(args.vq_steps * args.scale)), "--perceptual-weight", "0",
                "--entropy-loss-ratio", "0.1",  # spreads use over the codebook in a few 100 steps
                "--disc-weight", "0", "--eval-interval", "100", "--out-dir", vq_dir, *shared])
    shutil.copy(os.path.join(vq_dir, "ckpt.pt"), os.path.join(out, "vq.pt"))
    return VQModel.from_pretrained(os.path.join(out, "vq.pt")).to(device).eval()


def measure_tokenizer(args, vq, device, figures):
    """Step 2: PSNR, SSIM and codebook usage on held-out images, and a PNG of reconstructions."""
    print("== 2. tokenizer on 512 held-out images")
    held = SyntheticShapes(512, args.image_size, seed=args.seed + 1)  # a seed training never saw
    # no rFID: its Inception weights need a download
    metrics = fid.tokenizer_metrics(vq, held, net=None, batch_size=256, device=device)
    figures.update(psnr=metrics["psnr"], ssim=metrics["ssim"],
                   codebook_usage=metrics["codebook_usage"], codebook_size=vq.config.codebook_size)
    x = torch.stack([held[i][0] for i in range(16)]).to(device)
    with torch.no_grad():
        recon = vq.decode(vq.encode(x))
    pairs = torch.stack([x.cpu(), recon.cpu()], 1).flatten(0, 1)  # original, reconstruction, ...
    data.save_grid(pairs, os.path.join(args.out, "reconstructions.png"), nrow=8)
    print(f"PSNR {figures['psnr']:.2f} dB, SSIM {figures['ssim']:.3f}, "
          f"codebook usage {100 * figures['codebook_usage']:.1f}% of {vq.config.codebook_size}")


def train_gpt(args, vq, codes_dir, shared, figures):
    """Step 4: the GPT trained by train.py on the codes; its validation loss in bits per token."""
    print(f"== 4. GPT-{args.gpt} on the codes")
    gpt_dir = fresh(os.path.join(args.out, "gpt_run"))
    # a short run needs a decaying schedule (the paper's is constant for 300 epochs)
    train.main(["--model", args.gpt, "--data", codes_dir, "--batch-size", "64", "--lr", "2e-3",
                "--lr-schedule", "cosine", "--warmup-steps", "50",
                "--max-steps", str(int(args.gpt_steps * args.scale)),
                "--eval-interval", "200", "--out-dir", gpt_dir, *shared])
    shutil.copy(os.path.join(gpt_dir, "ckpt.pt"), os.path.join(args.out, "gpt.pt"))
    # train.py logs the validation cross-entropy in nats; bits compare with log2(codebook), the
    # cost of a GPT that knows nothing
    with open(os.path.join(gpt_dir, "log.jsonl")) as f:
        val_nats = [json.loads(line) for line in f][-1]["val"]
    figures.update(val_bits_per_token=val_nats / math.log(2),
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
        pixels = data.from_uint8(images)  # the saved uint8 bytes, back to floats to classify
        right = (classify(pixels) == labels).float()
        acc = right.mean().item()
        figures[f"class_accuracy_cfg{cfg:g}"], figures[f"ms_per_image_cfg{cfg:g}"] = acc, ms
        # per class too: a mean hides one class the GPT never learnt to draw
        per_class = right.view(10, args.per_class).mean(1).tolist()
        figures[f"class_accuracy_cfg{cfg:g}_per_class"] = dict(zip(CLASS_NAMES, per_class))
        data.save_grid(pixels, os.path.join(out, f"samples_cfg{cfg:g}.png"), nrow=args.per_class)
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


HALVES = ("c2i", "t2i")


def extract(args, vq, device, spec):
    """Step 3: the codes of every training image, computed once: the GPT then trains on integers,
    not on pixels. Returns the codes folder."""
    print("== 3. codes of every training image (and of its mirror image)")
    codes_dir = fresh(os.path.join(args.out, "codes"))
    data.extract_codes(vq, spec, codes_dir, image_size=args.image_size, batch_size=256,
                       device=device)
    return codes_dir


def class_half(args, device, shared, figures, phase):
    """The class-conditional half: steps 1-5, each timed into figures["minutes_<step>"]."""
    spec = f"synthetic:{args.images}"
    vq = train_tokenizer(args, device, spec, shared)
    phase("tokenizer")
    measure_tokenizer(args, vq, device, figures)
    codes_dir = extract(args, vq, device, spec)
    phase("codes")
    train_gpt(args, vq, codes_dir, shared, figures)
    phase("gpt")
    draw_pictures(args, vq, device, figures)
    phase("pictures")


def text_half(args, device, shared, figures, phase):
    """The text-conditional half: not written yet (it needs train.py's caption stage)."""
    raise UserError("the text-conditional half of the demo (--only t2i) is not there yet; "
                    "run --only c2i")


def main():
    args = get_args()
    if args.only == "t2i":  # refused before any work: the half does not exist yet
        text_half(args, None, None, None, None)
    device, out, t_start = pick_device(args.device), args.out, time.time()
    os.makedirs(out, exist_ok=True)
    # figures collects every number printed, and the machine they were measured on, for
    # summary.json: timings differ between machines, the rest must not
    figures = dict(machine=torch.cuda.get_device_name(device) if device.startswith("cuda")
                   else f"{device}, {os.cpu_count()} CPU cores")
    # flags both training runs share: no DataLoader workers (a 2-core machine gains nothing from
    # them), one seed, and 256 held-out items for the validation loss
    shared = ["--device", device, "--num-workers", "0", "--seed", str(args.seed),
              "--val-size", "256"]

    def phase(name):  # minutes per phase go to summary.json
        figures[f"minutes_{name}"] = (time.time() - t_start) / 60 - sum(
            v for k, v in figures.items() if k.startswith("minutes_"))

    class_half(args, device, shared, figures, phase)
    if args.only is None:
        print("\n(the text-conditional half is not there yet: only the class half ran)")
    figures["minutes"] = (time.time() - t_start) / 60
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(figures, f, indent=1)
    print(f"\n== done in {figures['minutes']:.1f} min; pictures and summary.json in {out}/")
    print("rows of samples_cfg*.png, top to bottom: " + ", ".join(CLASS_NAMES))


if __name__ == "__main__":
    cli(main)
