"""Images in, codes out: the embedded synthetic dataset, image folders, and code extraction.

Read top to bottom: a PNG grid writer every script shares; SyntheticShapes, ten classes of coloured shapes
drawn on the fly so every command runs with nothing downloaded; (then image folders with the ADM centre
crop, and the extraction of tokenizer codes that the GPT trains on).

    python data.py preview --out shapes.png      # a grid of synthetic examples, one row per class
"""
import argparse
import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from common import UserError, cli, save_file_atomic


# ----------------------------------------------------------------------------------------------------------
# PNG grids: the one picture writer used by sample.py, the demo and the previews below

def to_uint8(images):
    """[B, 3, H, W] floats in [-1, 1] -> uint8 array [B, H, W, 3] (rounded, clamped)."""
    x = (images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(images, nrow=8, pad=2, pad_value=0):
    """Tile [B, 3, H, W] images in [-1, 1] into one PIL image, `nrow` images per row, `pad` pixels apart."""
    arr = to_uint8(images)
    b, h, w, _ = arr.shape
    nrow = max(1, min(nrow, b))
    ncol = math.ceil(b / nrow)
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), pad_value, np.uint8)
    for i in range(b):
        y, x = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[y:y + h, x:x + w] = arr[i]
    return Image.fromarray(grid)


def save_grid(images, path, nrow=8):
    """Write a PNG grid of [B, 3, H, W] images in [-1, 1] (a list of [3, H, W] tensors works too)."""
    if isinstance(images, (list, tuple)):
        images = torch.stack(list(images))
    grid = make_grid(images, nrow)
    save_file_atomic(path, lambda f: grid.save(f, format="PNG"))
    return grid


# ----------------------------------------------------------------------------------------------------------
# SyntheticShapes: the embedded dataset
#
# Each class is a distinct shape AND a distinct bright colour, on a dark, low-saturation background that
# never reaches the foreground's brightness; so a person, a colour histogram or a small classifier can tell
# whether a generated sample matches its class. Position, size, rotation, colour shade and background vary
# per image, so the tokenizer and the GPT still have something to learn.

CLASS_NAMES = ["red circle", "green square", "blue triangle", "yellow plus", "magenta ring",
               "cyan diamond", "white stripes", "orange star", "pink crescent", "purple hexagon"]
_COLOURS = np.array([(245, 45, 45), (45, 210, 60), (45, 95, 255), (250, 225, 35), (235, 45, 235),
                     (35, 225, 230), (245, 245, 245), (255, 140, 20), (255, 160, 205), (150, 75, 255)], np.float32)
_SS = 4  # supersampling factor: shapes are drawn 4x larger, then box-filtered down (anti-aliasing)


def _polygon(points, angle, r, cx, cy):
    """Unit-radius outline -> rotated by `angle`, scaled by r, moved to (cx, cy), in supersampled pixels."""
    c, s = math.cos(angle), math.sin(angle)
    return [(_SS * (cx + r * (x * c - y * s)), _SS * (cy + r * (x * s + y * c))) for x, y in points]


def _star(n, inner):
    return [((1 if k % 2 == 0 else inner) * math.sin(k * math.pi / n),
             -(1 if k % 2 == 0 else inner) * math.cos(k * math.pi / n)) for k in range(2 * n)]


_SHAPES = {  # unit outlines, centred on the origin, y pointing down
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0, -1), (0.866, 0.5), (-0.866, 0.5)],
    "plus": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
             (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "diamond": [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)],  # narrower than tall: never a rotated square
    "star": _star(5, 0.45),
    "hexagon": [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)],
}


def _draw_mask(label, size, rng):
    """The shape's coverage, an 8-bit PIL mask [size, size], drawn at 4x then box-downsampled."""
    m = Image.new("L", (size * _SS, size * _SS), 0)
    d = ImageDraw.Draw(m)
    r = size * rng.uniform(0.2, 0.33)
    cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
    tilt = rng.uniform(-0.3, 0.3)  # small rotation, about +-17 degrees

    def disk(x, y, rad, fill):
        d.ellipse([_SS * (x - rad), _SS * (y - rad), _SS * (x + rad), _SS * (y + rad)], fill=fill)

    if label == 0:
        disk(cx, cy, r, 255)
    elif label == 4:  # ring
        disk(cx, cy, r, 255)
        disk(cx, cy, 0.55 * r, 0)
    elif label == 6:  # three parallel bars, at any angle
        angle = rng.uniform(0, math.pi)
        for y0 in (-0.6, 0.0, 0.6):
            bar = [(-0.85, y0 - 0.17), (0.85, y0 - 0.17), (0.85, y0 + 0.17), (-0.85, y0 + 0.17)]
            d.polygon(_polygon(bar, angle, r, cx, cy), fill=255)
    elif label == 8:  # crescent: a disk minus a smaller disk shifted in a random direction
        a = rng.uniform(0, 2 * math.pi)
        disk(cx, cy, r, 255)
        disk(cx + 0.45 * r * math.cos(a), cy + 0.45 * r * math.sin(a), 0.85 * r, 0)
    else:
        name = {1: "square", 2: "triangle", 3: "plus", 5: "diamond", 7: "star", 9: "hexagon"}[label]
        d.polygon(_polygon(_SHAPES[name], tilt, r, cx, cy), fill=255)
    return m.reduce(_SS)


def _background(size, rng):
    """Dark, grey-ish and smooth: a gradient between two dark colours plus blotchy texture, built on a 6x6
    grid and upsampled bicubically (cheap at any size). Channels stay below 90/255, far under every
    foreground colour (each keeps a channel above 190 after its shade jitter)."""
    grey = rng.uniform(10, 55, size=(2, 1, 1, 1))
    c0, c1 = grey + rng.uniform(-12, 12, size=(2, 1, 1, 3))
    a = rng.uniform(0, 2 * math.pi)
    t = np.linspace(0, 1, 6)
    ramp = ((t[None, :] - 0.5) * math.cos(a) + (t[:, None] - 0.5) * math.sin(a) + 0.5)[..., None]
    small = c0 + (c1 - c0) * ramp + rng.uniform(-1, 1, size=(6, 6, 3)) * rng.uniform(4, 22)
    return Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)


class SyntheticShapes(torch.utils.data.Dataset):
    """`num_images` procedurally drawn images of the 10 CLASS_NAMES, label = index % 10 (balanced).

    Item i is a pure function of (seed, i): its random generator is seeded with both, so the images do not
    depend on access order, shuffling or the number of DataLoader workers. Returns (image float32 [3, H, W]
    in [-1, 1], label int)."""

    num_classes = len(CLASS_NAMES)

    def __init__(self, num_images, image_size=64, seed=0):
        if num_images < 1 or image_size < 8:
            raise UserError(f"SyntheticShapes needs num_images >= 1 and image_size >= 8, got {num_images}, {image_size}")
        self.num_images, self.image_size, self.seed = int(num_images), int(image_size), int(seed)

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        rng = np.random.default_rng([self.seed, index])
        label = index % self.num_classes
        colour = tuple(int(c) for c in np.clip(_COLOURS[label] + rng.uniform(-15, 15, size=3), 0, 255))
        bg = _background(self.image_size, rng)
        mask = _draw_mask(label, self.image_size, rng)
        img = Image.composite(Image.new("RGB", bg.size, colour), bg, mask)  # alpha = anti-aliased coverage
        img = np.asarray(img).transpose(2, 0, 1).astype(np.float32, order="C") * (1 / 127.5) - 1
        return torch.from_numpy(img), label


def preview(out, image_size=64, per_class=8, seed=0):
    """A PNG with one row per class: a quick visual check of SyntheticShapes."""
    ds = SyntheticShapes(per_class * 10, image_size, seed)
    order = sorted(range(len(ds)), key=lambda i: (i % 10, i))
    return save_grid([ds[i][0] for i in order], out, nrow=per_class)


# ----------------------------------------------------------------------------------------------------------
# command line

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pv = sub.add_parser("preview", help="write a PNG grid of SyntheticShapes, one row per class")
    pv.add_argument("--out", default="shapes.png", help="PNG file to write (default: shapes.png)")
    pv.add_argument("--image-size", type=int, default=64, help="side of each image in pixels (default: 64)")
    pv.add_argument("--per-class", type=int, default=8, help="examples per class, one row each (default: 8)")
    pv.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    args = p.parse_args(argv)
    if args.command == "preview":
        preview(args.out, args.image_size, args.per_class, args.seed)
        print(f"wrote {args.out}: {', '.join(CLASS_NAMES)} (one row each)")


if __name__ == "__main__":
    cli(main)
