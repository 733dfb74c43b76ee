"""The whole LlamaGen pipeline on the embedded dataset, on a laptop CPU in about five minutes (2 cores):

    python demo.py                    # 2 CPU cores: a small tokenizer, codes, a small GPT, pictures
    python demo.py --device cuda --scale 8    # the same story, bigger and longer, on a GPU

1. train a small VQ tokenizer on images of coloured shapes (train.py, stage 1)
2. measure it on held-out images: PSNR, SSIM, codebook usage; reconstructions beside the originals
3. turn every training image into codes (data.py extract)
4. train a small GPT on those codes (train.py, stage 2)
5. draw every class at cfg 1 and cfg 4, check the pictures with a simple classifier, animate one drawing

Everything lands in results/demo/ (sample.py then uses these models by default).
"""
import argparse
import json
import math
import os
import shutil
import time

import numpy as np
import torch

import data
import fid
import sample
import train
from common import cli, pick_device
from data import CLASS_NAMES, SyntheticShapes
from model import GPT
from tokenizer import VQModel


class NearestNeighbour:
    """A simple classifier for the embedded dataset: k-nearest neighbours (k=5) in pixel space, against
    real training images blurred to 8x8 so that a shape a few pixels off still matches its class."""

    def __init__(self, image_size, n=5000, seed=123):
        ds = SyntheticShapes(n, image_size, seed=seed)
        x, self.labels = zip(*(ds[i] for i in range(n)))
        self.refs, self.labels = self.features(torch.stack(x)), torch.tensor(self.labels)

    @staticmethod
    def features(x):
        return torch.nn.functional.adaptive_avg_pool2d(x.float(), 8).flatten(1)

    def __call__(self, images):
        d = torch.cdist(self.features(images), self.refs)
        votes = self.labels[d.topk(5, largest=False).indices]
        return torch.mode(votes, dim=1).values


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.dirname(sample.DEMO_GPT), help="results folder")
    p.add_argument("--device", default="auto", help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step count by this")
    p.add_argument("--image-size", type=int, default=32, help="pixels; the tokenizer makes (size/4)^2 codes")
    p.add_argument("--vq-steps", type=int, default=300, help="tokenizer training steps (x --scale)")
    p.add_argument("--gpt-steps", type=int, default=600, help="GPT training steps (x --scale)")
    p.add_argument("--gpt", default="nano", help="GPT config (model.py)")
    p.add_argument("--images", type=int, default=12000, help="training images of the embedded dataset")
    p.add_argument("--per-class", type=int, default=10, help="samples per class and cfg for the accuracy")
    p.add_argument("--seed", type=int, default=0, help="seed of everything")
    args = p.parse_args()
    device, out, t_start = pick_device(args.device), args.out, time.time()
    os.makedirs(out, exist_ok=True)
    size, spec = args.image_size, f"synthetic:{args.images}"
    figures = dict(machine=torch.cuda.get_device_name(device) if device.startswith("cuda")
                   else f"{device}, {os.cpu_count()} CPU cores")
    common = ["--device", device, "--num-workers", "0", "--seed", str(args.seed), "--val-size", "256"]

    def fresh(folder):  # the demo always starts over: its runs are minutes long
        shutil.rmtree(folder, ignore_errors=True)
        return folder

    def phase(name):  # minutes per phase go to summary.json
        figures[f"minutes_{name}"] = (time.time() - t_start) / 60 - sum(
            v for k, v in figures.items() if k.startswith("minutes_"))

    print(f"== 1. tokenizer: VQ-tiny on {spec} at {size} px")
    vq_dir = fresh(os.path.join(out, "vq_run"))
    train.main(["--model", "VQ-tiny", "--data", spec, "--image-size", str(size), "--batch-size", "32",
                "--lr", "1e-3", "--max-steps", str(int(args.vq_steps * args.scale)), "--perceptual-weight", "0",
                "--entropy-loss-ratio", "0.1",  # spreads use over the codebook within a few hundred steps
                "--disc-weight", "0", "--eval-interval", "100", "--out-dir", vq_dir, *common])
    shutil.copy(os.path.join(vq_dir, "ckpt.pt"), os.path.join(out, "vq.pt"))
    vq = VQModel.from_pretrained(os.path.join(out, "vq.pt")).to(device).eval()

    phase("tokenizer")
    print("== 2. tokenizer on 512 held-out images")
    held = SyntheticShapes(512, size, seed=args.seed + 1)
    m = fid.tokenizer_metrics(vq, held, net=None, batch_size=256, device=device)  # no rFID: needs a download
    figures.update(psnr=m["psnr"], ssim=m["ssim"], codebook_usage=m["codebook_usage"],
                   codebook_size=vq.config.codebook_size)
    x = torch.stack([held[i][0] for i in range(16)]).to(device)
    with torch.no_grad():
        recon = vq.decode(vq.encode(x))
    pairs = torch.stack([x.cpu(), recon.cpu()], 1).flatten(0, 1)  # original, reconstruction, ...
    data.save_grid(pairs, os.path.join(out, "reconstructions.png"), nrow=8)
    print(f"PSNR {figures['psnr']:.2f} dB, SSIM {figures['ssim']:.3f}, "
          f"codebook usage {100 * figures['codebook_usage']:.1f}% of {vq.config.codebook_size}")

    print("== 3. codes of every training image (and of its mirror image)")
    codes_dir = fresh(os.path.join(out, "codes"))
    data.extract_codes(vq, spec, codes_dir, image_size=size, batch_size=256, device=device)

    phase("codes")
    print(f"== 4. GPT-{args.gpt} on the codes")
    gpt_dir = fresh(os.path.join(out, "gpt_run"))
    train.main(["--model", args.gpt, "--data", codes_dir, "--batch-size", "64", "--lr", "2e-3",
                "--lr-schedule", "cosine", "--warmup-steps", "50", "--max-steps", str(int(args.gpt_steps * args.scale)),
                "--eval-interval", "200", "--out-dir", gpt_dir, *common])
    shutil.copy(os.path.join(gpt_dir, "ckpt.pt"), os.path.join(out, "gpt.pt"))
    with open(os.path.join(gpt_dir, "log.jsonl")) as f:
        val_nats = [json.loads(line) for line in f][-1]["val"]
    figures.update(val_bits_per_token=val_nats / math.log(2), uniform_bits_per_token=math.log2(vq.config.codebook_size))
    print(f"validation loss {figures['val_bits_per_token']:.2f} bits/token "
          f"(knowing nothing: {figures['uniform_bits_per_token']:.0f})")

    phase("gpt")
    print("== 5. pictures")
    gpt = GPT.from_pretrained(os.path.join(out, "gpt.pt")).to(device).eval()
    classify = NearestNeighbour(size)
    real = SyntheticShapes(500, size, seed=args.seed + 2)
    xr, yr = zip(*(real[i] for i in range(len(real))))
    figures["classifier_accuracy_on_real"] = (classify(torch.stack(xr)) == torch.tensor(yr)).float().mean().item()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    for cfg in (1.0, 4.0):
        gen = torch.Generator(device).manual_seed(args.seed)
        t0 = time.perf_counter()
        images = sample.sample_images(gpt, vq, labels.to(device), cfg_scale=cfg, generator=gen)
        ms = 1000 * (time.perf_counter() - t0) / len(labels)
        pixels = data.from_uint8(images)
        acc = (classify(pixels) == labels).float().mean().item()
        figures[f"class_accuracy_cfg{cfg:g}"], figures[f"ms_per_image_cfg{cfg:g}"] = acc, ms
        data.save_grid(pixels, os.path.join(out, f"samples_cfg{cfg:g}.png"), nrow=args.per_class)
        print(f"cfg {cfg:g}: class accuracy {100 * acc:.0f}% ({ms:.0f} ms per image)")
    print(f"(the classifier itself gets {100 * figures['classifier_accuracy_on_real']:.0f}% on real images)")
    sample.main(["--class", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "--n", "1", "--cfg-scale", "4",
                 "--seed", str(args.seed), "--progress", os.path.join(out, "drawing.gif"), "--device", device,
                 "--out", os.path.join(out, "one_per_class.png"), "--gpt-ckpt", os.path.join(out, "gpt.pt"),
                 "--vq-ckpt", os.path.join(out, "vq.pt")])

    phase("pictures")
    figures["minutes"] = (time.time() - t_start) / 60
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(figures, f, indent=1)
    print(f"\n== done in {figures['minutes']:.1f} min; pictures and summary.json in {out}/")
    print("rows of samples_cfg*.png, top to bottom: " + ", ".join(CLASS_NAMES))


if __name__ == "__main__":
    cli(main)
