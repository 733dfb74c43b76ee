"""SyntheticShapes, the embedded dataset: ten classes drawn on the fly, so every command runs with
nothing downloaded. Each class is a shape AND a bright colour on a dark background that never
reaches the foreground's brightness, so a person or a small classifier can tell whether a sample
matches its class; position, size, rotation, shade and background vary per image.

    python shapes.py preview --out shapes.png       # one row of examples per class
"""
import argparse
import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from common import (SEED, UserError, at_least, check_flags, check_writable, cli, from_uint8,
                    save_grid)

CLASS_NAMES = ["red circle", "green square", "blue triangle", "yellow plus", "magenta ring",
               "cyan diamond", "white stripes", "orange star", "pink crescent", "purple hexagon"]
COLOURS = np.array([(245, 45, 45), (45, 210, 60), (45, 95, 255), (250, 225, 35), (235, 45, 235),
                    (35, 225, 230), (245, 245, 245), (255, 140, 20), (255, 160, 205),
                    (150, 75, 255)], np.float32)
SS = 4  # supersampling: shapes are drawn 4x larger, then box-filtered down (anti-aliasing)


def polygon(points, angle, r, cx, cy):
    """Unit outline -> rotated by `angle`, scaled by r, moved to (cx, cy), in supersampled px."""
    cos, sin = math.cos(angle), math.sin(angle)
    return [(SS * (cx + r * (x * cos - y * sin)), SS * (cy + r * (x * sin + y * cos)))
            for x, y in points]


def disk(draw, x, y, r, fill):
    """A disk of radius r at (x, y) onto a supersampled ImageDraw."""
    draw.ellipse([SS * (x - r), SS * (y - r), SS * (x + r), SS * (y + r)], fill=fill)


def star(n, inner):
    """A star of n points: 2n vertices alternating between radius 1 and `inner`, the first up."""
    return [((1 if k % 2 == 0 else inner) * math.sin(k * math.pi / n),
             -(1 if k % 2 == 0 else inner) * math.cos(k * math.pi / n)) for k in range(2 * n)]


POLYGONS = {  # unit outlines, centred on the origin, y pointing down
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0, -1), (0.866, 0.5), (-0.866, 0.5)],
    "plus": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1),
             (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "diamond": [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)],  # narrower than tall: never a square
    "star": star(5, 0.45),
    "hexagon": [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)],
}


def _draw_mask(label, size, rng):
    """The shape's coverage, an 8-bit mask [size, size]; draws from `rng` in a fixed order."""
    m = Image.new("L", (size * SS, size * SS), 0)
    d = ImageDraw.Draw(m)
    r = size * rng.uniform(0.2, 0.33)
    cx, cy = rng.uniform(r + 1, size - r - 1, size=2)  # r + 1 px from the edges: in view
    tilt = rng.uniform(-0.3, 0.3)  # about +-17 degrees
    if label in (0, 4):  # circle; ring
        disk(d, cx, cy, r, 255)
        if label == 4:
            disk(d, cx, cy, 0.55 * r, 0)
    elif label == 6:  # three parallel bars at any angle (a half-turn covers all)
        angle = rng.uniform(0, math.pi)
        for y0 in (-0.6, 0.0, 0.6):
            bar = [(-0.85, y0 - 0.17), (0.85, y0 - 0.17), (0.85, y0 + 0.17), (-0.85, y0 + 0.17)]
            d.polygon(polygon(bar, angle, r, cx, cy), fill=255)
    elif label == 8:  # crescent: a disk minus a smaller disk shifted in a random direction
        a = rng.uniform(0, 2 * math.pi)
        disk(d, cx, cy, r, 255)
        disk(d, cx + 0.45 * r * math.cos(a), cy + 0.45 * r * math.sin(a), 0.85 * r, 0)
    else:
        name = {1: "square", 2: "triangle", 3: "plus", 5: "diamond", 7: "star", 9: "hexagon"}[label]
        d.polygon(polygon(POLYGONS[name], tilt, r, cx, cy), fill=255)
    return m.reduce(SS)


def background(size, rng):
    """Dark, grey and smooth: a gradient plus blotches on a 6x6 grid, upsampled bicubically; below
    90/255, far under every foreground colour (each keeps a channel above 190 after its jitter)."""
    grey = rng.uniform(10, 55, size=(2, 1, 1, 1))
    c0, c1 = grey + rng.uniform(-12, 12, size=(2, 1, 1, 3))
    a = rng.uniform(0, 2 * math.pi)
    t = np.linspace(0, 1, 6)
    ramp = ((t[None, :] - 0.5) * math.cos(a) + (t[:, None] - 0.5) * math.sin(a) + 0.5)[..., None]
    small = c0 + (c1 - c0) * ramp + rng.uniform(-1, 1, size=(6, 6, 3)) * rng.uniform(4, 22)
    small = np.clip(small, 0, 255).astype(np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


class SyntheticShapes(torch.utils.data.Dataset):
    """`num_images` images of the 10 CLASS_NAMES, label = index % 10; item -> (float32 [3, H, W] in
    [-1, 1], label), a pure function of (seed, index): the same in any order or worker."""
    classes, num_classes = CLASS_NAMES, len(CLASS_NAMES)

    def __init__(self, num_images, image_size=64, seed=0):
        if num_images < 1 or image_size < 8:
            raise UserError(f"SyntheticShapes needs num_images >= 1 and image_size >= 8, "
                            f"got {num_images} and {image_size}")
        self.num_images, self.image_size, self.seed = int(num_images), int(image_size), int(seed)

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        if not 0 <= index < self.num_images:  # IndexError also ends `for x in ds`
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        rng = np.random.default_rng([self.seed, index])  # independent streams, unlike seed + i
        label = index % self.num_classes
        shade = np.clip(COLOURS[label] + rng.uniform(-15, 15, size=3), 0, 255)
        bg = background(self.image_size, rng)
        mask = _draw_mask(label, self.image_size, rng)  # anti-aliased: edges mix shape and bg
        img = Image.composite(Image.new("RGB", bg.size, tuple(int(c) for c in shade)), bg, mask)
        return from_uint8(img), label


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    pv = p.add_subparsers(dest="command", required=True).add_parser(
        "preview", help="a PNG grid of SyntheticShapes, one row per class: a quick visual check")
    pv.add_argument("--out", default="shapes.png", help="PNG file to write (default: shapes.png)")
    pv.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    pv.add_argument("--image-size", type=int, default=64, help="side in pixels (default: 64)")
    pv.add_argument("--per-class", type=int, default=8, help="examples per class (default: 8)")
    pv.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    args = p.parse_args(argv)
    check_flags(args, {"image_size": at_least(8), "per_class": at_least(1), "seed": SEED})
    check_writable(args.out, args.overwrite)
    ds = SyntheticShapes(args.per_class * 10, args.image_size, args.seed)
    order = sorted(range(len(ds)), key=lambda i: (i % 10, i))  # labels cycle: sort by class
    save_grid([ds[i][0] for i in order], args.out, nrow=args.per_class)
    print(f"wrote {args.out}: {', '.join(CLASS_NAMES)} (one row each)")


if __name__ == "__main__":
    cli(main)
