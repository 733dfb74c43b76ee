"""Images in, codes out: the embedded synthetic dataset, image folders, and code extraction.

Read top to bottom, in the order the data flows: SyntheticShapes, ten classes of coloured shapes
drawn on the fly so that every command runs with nothing downloaded; image folders in the ImageNet
layout with the two crops of the official recipe; the pixel rule (floats <-> uint8) and the PNG grid
that sample.py, the demo and the preview write; then the extraction of the tokenizer codes the GPT
trains on, the receipt that says how they were made, and CodesDataset that reads them back; last,
captioned images and the text encoder's features of their captions, extracted the same way.

    python data.py preview --out shapes.png                     # synthetic examples by class
    python data.py extract --vq-ckpt vq_ds16_c2i.pt --data /imagenet/train --out codes/in256 \\
        --ten-crop
    torchrun --nproc_per_node 8 data.py extract ...             # the same, sharded over 8 GPUs
    python data.py extract --vq-ckpt VQ.pt --data scenes:2000 --image-size 32 --out codes/scenes
    python data.py features --data codes/scenes --t5 flan-t5-xl/ --out features/scenes
"""
import argparse
import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw

from common import (DTYPES, IMAGE_EXTENSIONS, UNREADABLE, UserError, cli, first_line, from_uint8,
                    is_rank0, make_grid, os_error_line, progress, read_image, save_atomic,
                    save_grid, setup_device, to_rgb, to_uint8, weights_checksum)
from tokenizer import VQModel, tokenizer_checksum, vq_config


# ------------------------------------------------------------------------------------------------
# SyntheticShapes: the embedded dataset
#
# Each class is a distinct shape AND a distinct bright colour, on a dark, low-saturation background
# that never reaches the foreground's brightness; so a person, a colour histogram or a small
# classifier can tell whether a generated sample matches its class. Position, size, rotation, colour
# shade and background vary per image, so the tokenizer and the GPT still have something to learn.

CLASS_NAMES = ["red circle", "green square", "blue triangle", "yellow plus", "magenta ring",
               "cyan diamond", "white stripes", "orange star", "pink crescent", "purple hexagon"]
_COLOURS = np.array([(245, 45, 45), (45, 210, 60), (45, 95, 255), (250, 225, 35), (235, 45, 235),
                     (35, 225, 230), (245, 245, 245), (255, 140, 20), (255, 160, 205),
                     (150, 75, 255)], np.float32)
_SS = 4  # supersampling factor: shapes are drawn 4x larger, then box-filtered down (anti-aliasing)


def _polygon(points, angle, r, cx, cy):
    """Unit-radius outline -> rotated by `angle`, scaled by r, moved to (cx, cy), in supersampled
    pixels."""
    cos, sin = math.cos(angle), math.sin(angle)
    return [(_SS * (cx + r * (x * cos - y * sin)), _SS * (cy + r * (x * sin + y * cos)))
            for x, y in points]


def _star(n, inner):
    """A star of n points: 2n vertices alternating between radius 1 and `inner`, the first one
    straight up."""
    return [((1 if k % 2 == 0 else inner) * math.sin(k * math.pi / n),
             -(1 if k % 2 == 0 else inner) * math.cos(k * math.pi / n)) for k in range(2 * n)]


_SHAPES = {  # unit outlines, centred on the origin, y pointing down
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0, -1), (0.866, 0.5), (-0.866, 0.5)],
    "plus": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1),
             (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "diamond": [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)],  # narrower than tall: never a rotated square
    "star": _star(5, 0.45),
    "hexagon": [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)],
}


def _draw_mask(label, size, rng):
    """The shape's coverage, an 8-bit PIL mask [size, size], drawn at 4x then box-downsampled.
    The draws from `rng` come in a fixed order (radius, centre, tilt, then the shape's own), so
    an image is a pure function of its generator's state."""
    m = Image.new("L", (size * _SS, size * _SS), 0)
    d = ImageDraw.Draw(m)
    r = size * rng.uniform(0.2, 0.33)
    # centre r + 1 px from the edges: the shape stays in view (a square's corners at most graze it)
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
        angle = rng.uniform(0, math.pi)  # a half-turn covers all: three bars look the same turned
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
    """Dark, grey-ish and smooth: a gradient between two dark colours plus blotchy texture, built on
    a 6x6 grid and upsampled bicubically (cheap at any size). Channels stay below 90/255, far under
    every foreground colour (each keeps a channel above 190 after its shade jitter)."""
    grey = rng.uniform(10, 55, size=(2, 1, 1, 1))
    c0, c1 = grey + rng.uniform(-12, 12, size=(2, 1, 1, 3))
    a = rng.uniform(0, 2 * math.pi)
    t = np.linspace(0, 1, 6)
    ramp = ((t[None, :] - 0.5) * math.cos(a) + (t[:, None] - 0.5) * math.sin(a) + 0.5)[..., None]
    small = c0 + (c1 - c0) * ramp + rng.uniform(-1, 1, size=(6, 6, 3)) * rng.uniform(4, 22)
    small = np.clip(small, 0, 255).astype(np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


class SyntheticShapes(torch.utils.data.Dataset):
    """`num_images` procedurally drawn images of the 10 CLASS_NAMES, label = index % 10 (balanced).

    Item i is a pure function of (seed, i): its random generator is seeded with both, so the images
    do not depend on access order, shuffling or the number of DataLoader workers. Returns (image
    float32 [3, H, W] in [-1, 1], label int)."""

    classes = CLASS_NAMES
    num_classes = len(CLASS_NAMES)

    def __init__(self, num_images, image_size=64, seed=0):
        if num_images < 1 or image_size < 8:
            raise UserError(f"SyntheticShapes needs num_images >= 1 and image_size >= 8, "
                            f"got {num_images} and {image_size}")
        self.num_images, self.image_size, self.seed = int(num_images), int(image_size), int(seed)

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        # IndexError also ends the old iteration protocol (`for x in ds`), which a Dataset without
        # __iter__ falls back on; numpy would reject a negative seed with another error
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        # one generator per item, seeded by the pair: numpy's SeedSequence mixes (seed, index)
        # into independent streams, where seed + index would make dataset 1's item 0 equal
        # dataset 0's item 1
        rng = np.random.default_rng([self.seed, index])
        label = index % self.num_classes
        shade = np.clip(_COLOURS[label] + rng.uniform(-15, 15, size=3), 0, 255)
        colour = tuple(int(channel) for channel in shade)
        bg = _background(self.image_size, rng)
        mask = _draw_mask(label, self.image_size, rng)
        # alpha = the anti-aliased coverage: edge pixels mix shape and background
        img = Image.composite(Image.new("RGB", bg.size, colour), bg, mask)
        return from_uint8(img), label


def preview(out, image_size=64, per_class=8, seed=0):
    """A PNG with one row per class: a quick visual check of SyntheticShapes."""
    ds = SyntheticShapes(per_class * 10, image_size, seed)
    # labels cycle through the classes (index % 10): sort by class to get one row per class
    order = sorted(range(len(ds)), key=lambda i: (i % 10, i))
    return save_grid([ds[i][0] for i in order], out, nrow=per_class)


# ------------------------------------------------------------------------------------------------
# Image folders (the ImageNet layout: root/<class>/<image>) and the two crops of the official recipe

def _resize_shorter_side(pil, side):
    """Shorter side -> `side`: BOX-halve while it is at least twice `side`, then one BICUBIC resize.
    The halving is ADM's anti-aliasing (guided-diffusion's center_crop_arr, which LlamaGen copies):
    a single bicubic step from far above would alias."""
    while min(pil.size) >= 2 * side:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    # rounded, as center_crop_arr does: the shorter side lands exactly on `side`
    scale = side / min(pil.size)
    return pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)


def center_crop(pil_image, image_size):
    """The ADM centre crop LlamaGen uses for codes and FID (its center_crop_arr): shorter side to
    `image_size`, then the central square. Returns a PIL image of image_size x image_size."""
    pil = _resize_shorter_side(pil_image, image_size)
    # floored as center_crop_arr: an odd excess leaves its extra pixel on the right or bottom
    x, y = (pil.size[0] - image_size) // 2, (pil.size[1] - image_size) // 2
    return pil.crop((x, y, x + image_size, y + image_size))


def random_resize_crop(pil_image, image_size, max_scale=1.25):
    """The tokenizer's training crop (LlamaGen dataset/augmentation.py, random_crop_arr):
    shorter side to a random size in [image_size, ceil(image_size * max_scale)], then a random
    square. Draws from torch's RNG, so the DataLoader's per-worker seeding makes it reproducible."""
    # + 1: randint's upper end is exclusive, the interval of the docstring closed
    side = int(torch.randint(image_size, math.ceil(image_size * max_scale) + 1, ()))
    pil = _resize_shorter_side(pil_image, side)
    x = int(torch.randint(pil.size[0] - image_size + 1, ()))
    y = int(torch.randint(pil.size[1] - image_size + 1, ()))
    return pil.crop((x, y, x + image_size, y + image_size))


class ImageFolder(torch.utils.data.Dataset):
    """Images under root/<class name>/ (any depth), classes numbered in sorted name order, as
    ImageNet's synsets are. Item -> (image float32 [3, image_size, image_size] in [-1, 1],
    label int).

    augment: "center" (the ADM centre crop) or "random_resize_crop" (the tokenizer's); flip: a
    random horizontal flip with probability 1/2. Indexing lists file names only; images are decoded
    when read, and a file that cannot be decoded (corrupt, truncated, not an image) is replaced by
    the next readable index, counted in `.skipped` (per process: each DataLoader worker keeps its
    own) and reported by one warning per process, so a bad file costs one substitute image, never a
    crashed run."""

    def __init__(self, root, image_size, augment="center", flip=True):
        if augment not in ("center", "random_resize_crop"):
            raise UserError(f"augment must be 'center' or 'random_resize_crop', got {augment!r}")
        root = os.path.expanduser(str(root))
        if not os.path.isdir(root):
            raise UserError(f"data folder {root!r} does not exist; pass a folder with one "
                            "sub-folder per class (the ImageNet layout) or --data synthetic")
        self.classes = sorted(e.name for e in os.scandir(root)
                              if e.is_dir() and not e.name.startswith("."))
        # sorted at every level, so the index -> file map is the same on every machine and
        # filesystem: the codes' rows and the labels of a sharded extraction rely on it
        # links followed: class folders are often symlinks into a shared copy of ImageNet; hidden
        # files skipped: macOS's ._cat.jpg resource forks carry an image extension but no image
        self.samples = []
        for label, name in enumerate(self.classes):
            for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
                self.samples += [(os.path.join(folder, f), label) for f in sorted(files)
                                 if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        if not self.samples:
            loose = any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(root))
            raise UserError(f"no images in class sub-folders of {root!r}" + (
                "; the images sit directly in it: move them into one sub-folder per class"
                if loose else f"; expected {root}/<class>/<image>{{{','.join(IMAGE_EXTENSIONS)}}}"))
        self.root, self.image_size, self.augment, self.flip = root, image_size, augment, flip
        self.num_classes = len(self.classes)
        self.bad = set()

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        """(RGB PIL image, label) of `index`, or of the next readable index if it cannot be
        decoded."""
        for k in range(len(self.samples)):
            i = (index + k) % len(self.samples)
            if i in self.bad:  # known unreadable: not opened (nor warned about) a second time
                continue
            path, label = self.samples[i]
            try:
                return read_image(path), label
            except UNREADABLE as e:
                if not self.bad:
                    warnings.warn(f"unreadable image {path} ({e}); substituting the next readable "
                                  "one and counting the rest silently in ImageFolder.skipped",
                                  stacklevel=2)
                # remembered per process: each DataLoader worker meets its bad files by itself
                self.bad.add(i)
        raise UserError(f"none of the {len(self.samples)} images under {self.root!r} can be read")

    @property
    def skipped(self):
        """How many files this process found unreadable (each is tried once, then always
        substituted)."""
        return len(self.bad)

    def __getitem__(self, index):
        pil, label = self.load(index)
        crop = center_crop if self.augment == "center" else random_resize_crop
        x = from_uint8(crop(pil, self.image_size))
        if self.flip and torch.rand(()) < 0.5:  # drawn after the crop's draws: the order is fixed
            x = x.flip(-1)
        return x, label


def image_dataset(spec, image_size, augment="center", flip=True, seed=0):
    """The dataset behind a --data flag: "synthetic" (10,000 SyntheticShapes), "synthetic:N" (N of
    them, from `seed`), an ImageNet-layout folder ("./synthetic" for a folder of that name; a
    bare "synthetic" with such a folder present is refused as ambiguous), a caption spec
    (caption_dataset) as Captioned (image, 0) items, or specs joined by "+" (Joined). `augment`
    and `flip` apply to folders; synthetic images are drawn at the final size, already varied in
    position, size and rotation (a random crop could cut the shape that defines the class out of
    the picture)."""
    spec = str(spec)
    if "+" in spec and not os.path.isdir(spec):  # a real folder named a+b is one folder
        return Joined([image_dataset(part, image_size, augment, flip, seed)
                       for part in spec.split("+")], spec)
    if is_caption_spec(spec):  # scenes[:N], coco:..., captions:DIR: label 0 (see Captions below)
        return Captioned(caption_dataset(spec, image_size, augment, flip, seed))
    if spec == "synthetic" or spec.startswith("synthetic:"):
        if os.path.isdir(spec):  # a real folder of that name: neither reading may be guessed
            raise UserError(f"--data {spec!r} is ambiguous: a folder of that name is here too; "
                            f"write ./{spec} for the folder, or synthetic:N (e.g. synthetic:10000)"
                            " for the built-in shapes")
        n = spec.partition(":")[2] or "10000"
        if not n.isdigit() or int(n) < 1:
            raise UserError(f"--data {spec!r}: write synthetic:N with N a positive number of "
                            "images, e.g. synthetic:5000")
        return SyntheticShapes(int(n), image_size, seed)
    return ImageFolder(spec, image_size, augment, flip)


class Joined(torch.utils.data.ConcatDataset):
    """"A+B": the images of several datasets in one, for a tokenizer that serves them all (the demo
    trains one VQ on both of its worlds). Labels are dropped (item -> (image, 0)): the datasets'
    classes mean different things, and a tokenizer reads no labels."""
    num_classes, classes = 1, ("joined",)

    def __init__(self, parts, spec):
        super().__init__(parts)
        self.spec = spec

    def __getitem__(self, index):
        return super().__getitem__(index)[0], 0


def check_image_size(image_size, downsample, flag="--image-size"):
    """One UserError line unless `image_size` is a positive multiple of the tokenizer's
    downsampling factor, naming the nearest sizes that are. The encoder floors each halving, so
    30 px through VQ-tiny (4) gives 7x7 codes of a 28 px crop, a grid the decoder turns back into
    28 px: not what was asked for, and said nowhere."""
    if image_size >= downsample and image_size % downsample == 0:
        return
    below = image_size // downsample * downsample
    sizes = " or ".join(str(n) for n in (below, below + downsample) if n > 0)
    sizes = sizes or str(downsample)
    raise UserError(f"{flag} {image_size} is not a multiple of the tokenizer's downsampling "
                    f"factor {downsample}; use {sizes}")


# ------------------------------------------------------------------------------------------------
# Code extraction: the GPT trains on tokenizer codes computed once, not on pixels (paper 3.2)
#
# A codes folder holds codes.npy [N, n_aug, L] (uint16 while the codebook fits, else int32),
# labels.npy [N] and meta.json, the receipt of what made them (CodesReceipt). n_aug views per
# image: the original and its mirror image, or with ten_crop the 4 corners + centre of the image
# and of its mirror (the official extract_codes_c2i.py); training draws one view per access. A
# captioned image has one view, itself (the official extract_codes_t2i.py): its mirror would
# contradict the caption's left and right ("a star to the left of a circle").
# Written as .npy files so that np.load(mmap_mode="r") pages in only the rows in use.

@dataclasses.dataclass(frozen=True)
class CodesReceipt:
    """How a codes folder was made, stored as its meta.json and, by train.py, inside every GPT
    checkpoint (key "meta"): a GPT's codes mean something only to the tokenizer that made them,
    so whoever pairs codes, GPTs and tokenizers checks this receipt first. The fields are in
    meta.json's key order, so to_dict() writes the same bytes as the folders made before it."""
    vocab_size: int  # the tokenizer's codebook size
    grid: tuple  # (h, w) codes per image
    image_size: int  # pixels per side fed to the tokenizer
    n_aug: int  # views per image: 2 (image, mirror), 10 (ten crops) or 1 (captioned images)
    count: int  # images
    tokenizer_checksum: str  # tokenizer.tokenizer_checksum of the weights that encoded them
    ten_crop: bool
    crop_range: float | None  # the centre crop's oversize before the ten crops (None without)
    codes_dtype: str  # numpy dtype names of codes.npy and labels.npy
    labels_dtype: str
    data: str  # the --data spec: "synthetic:N", or the folder's absolute path
    num_classes: int
    classes: tuple  # class names, in label order

    @classmethod
    def from_dict(cls, d, where):
        """The receipt in a meta.json or a checkpoint's "meta" dict; `where` names that file in
        the one-line error a missing or malformed field gives. Unknown keys are ignored, so a
        receipt written by a later version still reads."""
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(fields - set(d)) if isinstance(d, dict) else ["all fields"]
        if missing:
            raise UserError(f"{where}: the codes receipt lacks {missing[0]!r}; it was not written "
                            "by data.py extract (or is damaged): extract the codes again")
        kept = {k: d[k] for k in fields}
        try:
            # JSON has no tuples: back to the record's own form, or a receipt read from meta.json
            # would never equal the same one built by _receipt (a list is not a tuple)
            kept.update(grid=tuple(int(n) for n in kept["grid"]), classes=tuple(kept["classes"]))
            if len(kept["grid"]) != 2:
                raise ValueError("grid")
        except (TypeError, ValueError):
            raise UserError(f"{where}: the codes receipt's grid {d['grid']!r} is not two numbers; "
                            "extract the codes again") from None
        return cls(**kept)

    def to_dict(self):
        """The JSON form (lists where the record holds tuples), as meta.json stores it."""
        d = dataclasses.asdict(self)
        return {**d, "grid": list(self.grid), "classes": list(self.classes)}

    def describe(self):
        """The fields that tie codes to their tokenizer, as error messages quote them."""
        return (f"tokenizer {self.tokenizer_checksum[:12]}, vocab {self.vocab_size}, "
                f"grid {list(self.grid)}")

    def check_same_tokenizer(self, other, mine="these codes", theirs="the others"):
        """One UserError line unless `other` was made by the same tokenizer (same weights
        checksum, hence the same vocabulary and grid): a GPT trained on one tokenizer's codes
        reads another's as noise."""
        said = {"tokenizer_checksum": "tokenizer checksum", "vocab_size": "vocab", "grid": "grid"}
        shown = {"tokenizer_checksum": lambda c: c[:16], "vocab_size": str, "grid": list}
        differ = [f"{said[k]} {shown[k](getattr(self, k))} vs {shown[k](getattr(other, k))}"
                  for k in said if getattr(self, k) != getattr(other, k)]  # only what differs
        if differ:
            raise UserError(f"the codes of {mine} come from another tokenizer than those in "
                            f"{theirs} ({', '.join(differ)}): extract codes with the tokenizer "
                            f"of {mine}, or start afresh")


def code_views(x, image_size, ten_crop=False, mirror=True):
    """[3, S, S] image -> [n_aug, 3, image_size, image_size] views: (x, mirror of x) with
    S == image_size, or the ten crops (top-left, top-right, bottom-left, bottom-right, centre; then
    the same of the mirror); mirror=False: x alone.

    Codes are computed once, so the data augmentation happens here instead of in the training
    loop: every view an epoch might draw is encoded ahead of time, and CodesDataset picks one."""
    if not ten_crop:
        return torch.stack([x, x.flip(-1)]) if mirror else x[None]
    h, w = x.shape[-2:]
    # the centre's offset rounds as torchvision's TenCrop does (the official extraction uses it)
    cy, cx = int(round((h - image_size) / 2)), int(round((w - image_size) / 2))
    corners = [(0, 0), (0, w - image_size), (h - image_size, 0), (h - image_size, w - image_size),
               (cy, cx)]
    return torch.stack([im[:, y:y + image_size, x0:x0 + image_size]
                        for im in (x, x.flip(-1)) for y, x0 in corners])


class _Views(torch.utils.data.Dataset):
    """A dataset's images as their code_views, so DataLoader workers cut the crops in parallel."""

    def __init__(self, base, image_size, ten_crop, mirror):
        self.base, self.image_size, self.ten_crop, self.mirror = base, image_size, ten_crop, mirror

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        x, label = self.base[index]
        return code_views(x, self.image_size, self.ten_crop, self.mirror), label


def _write_json(path, obj):
    """JSON written atomically: a progress file or receipt is either the old one or the new one,
    so a crash can never leave a receipt that vouches for rows which are not on disk."""
    save_atomic(lambda f: f.write(json.dumps(obj, indent=1).encode()), path)


def _read_json(path):
    """A receipt or progress file as a dict; a damaged one (hand-edited, not JSON) is one line."""
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise UserError(f"{path} cannot be read ({first_line(e)}); the codes folder is damaged: "
                        "extract it again (--overwrite starts over)") from None
    if not isinstance(found, dict):
        raise UserError(f"{path} holds no JSON object; the codes folder is damaged: extract it "
                        "again (--overwrite starts over)")
    return found


def _open_part(path, mode, dtype, shape):
    """A memory-mapped .npy file with every block of it reserved on disk now. A memory map
    writes into a sparse file: on a full disk the kernel finds no block for a page only when it is
    written back, and the process dies of SIGBUS with no message (exit 135). posix_fallocate asks
    for the blocks up front, so a full disk is one ENOSPC line before any image is encoded."""
    try:
        array = np.lib.format.open_memmap(path, mode, dtype, shape)
        if hasattr(os, "posix_fallocate"):  # Linux and most Unixes; macOS has none
            with open(path, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError as e:
        # a filesystem that cannot preallocate is written as before
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            array = None  # the map is closed, and a part made here gives its blocks back
            if mode == "w+" and os.path.isfile(path):
                os.remove(path)
            raise UserError(os_error_line(e, path)) from None
    return array


def _clear_output(out):
    """--overwrite: remove a previous extraction's files from `out` (meta.json first, the mark of
    a finished folder), nothing else that may live there."""
    for name in ("meta.json", "codes.npy", "labels.npy"):
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    shutil.rmtree(os.path.join(out, "parts"), ignore_errors=True)


def check_out_folder(out):
    """Fail before the tokenizer loads, not after: --out must be a folder that exists or can be
    made, and take a file (a real one, at once deleted: the only test that catches read-only
    mounts and paths through a file)."""
    if os.path.isfile(out):
        raise UserError(f"--out {out} is a file; codes go into a folder: choose another --out")
    try:
        os.makedirs(out, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise UserError(os_error_line(e, out)) from None


def extract_codes(vq, data, out, image_size=256, ten_crop=False, crop_range=1.1, batch_size=64,
                  num_workers=0, device="cpu", overwrite=False):
    """Encode dataset `data` (an image_dataset spec) with tokenizer `vq` into the codes folder
    `out`; returns its CodesReceipt.

    Images are ADM-centre-cropped to image_size (with ten_crop: to int(image_size * crop_range),
    then ten-cropped). Under torchrun each rank encodes a contiguous shard of the rows into its own
    part files; after every batch it flushes them and atomically records how many rows are done, so
    rerunning the same command after an interruption resumes where each rank stopped (with the same
    number of processes). Rank 0 then joins the parts and writes meta.json last: its presence means
    the folder is complete. overwrite: an earlier extraction in `out`, finished or not, is
    removed first instead of refused."""
    # under torchrun, join the process group unless the caller already has (train.py, a test);
    # only a barrier crosses processes, so gloo serves CPUs and nccl GPUs alike
    own_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    try:
        return _extract(vq, str(data), str(out), image_size, ten_crop, crop_range, batch_size,
                        num_workers, device, overwrite)
    finally:
        if own_group:
            dist.destroy_process_group()


def _receipt(vq, base, data, image_size, ten_crop, crop_range, device):
    """The receipt this extraction will write. The token grid is probed with one blank image
    rather than computed from a downsampling factor: whatever the encoder really outputs at this
    size is what the GPT will have to predict (and a stand-in tokenizer needs no such factor)."""
    with torch.no_grad():
        probe = torch.zeros(1, 3, image_size, image_size, device=device)
        grid = tuple(vq.encode(probe).shape[1:])
    vocab = vq.config.codebook_size
    # the smallest dtypes that hold every value: ImageNet's 1.28M x 10 views x 256 codes take
    # 6.6 GB as uint16, 26 GB as int64
    codes_dtype = np.uint16 if vocab <= 2 ** 16 else np.int32  # 16,384 codes: 2 bytes each, not 8
    labels_dtype = np.int16 if base.num_classes <= 2 ** 15 else np.int64
    return CodesReceipt(
        vocab_size=vocab, grid=grid, image_size=image_size,
        n_aug=10 if ten_crop else 1 if isinstance(base, Captioned) else 2,
        count=len(base), tokenizer_checksum=tokenizer_checksum(vq), ten_crop=ten_crop,
        crop_range=crop_range if ten_crop else None, codes_dtype=np.dtype(codes_dtype).name,
        labels_dtype=np.dtype(labels_dtype).name,
        # the spec as any later run writes it (synthetic:N as typed, a folder by absolute path):
        # _finished's comparison then does not depend on the working directory
        data=getattr(base, "spec", data if isinstance(base, SyntheticShapes) else
                     os.path.abspath(data)),
        num_classes=base.num_classes, classes=tuple(base.classes))


def _finished(out, receipt, rank):
    """True if `out` already holds these very codes; refuses a folder holding others. The whole
    receipt must match, not only the tokenizer: codes of other crops or other images under the
    same name would silently train a GPT on data it was not meant to see."""
    path = os.path.join(out, "meta.json")
    if not os.path.exists(path):
        return False
    found, meta = _read_json(path), receipt.to_dict()
    if found != meta:
        key = next(k for k in meta if found.get(k) != meta[k])
        raise UserError(f"{out} already holds finished codes with {key}={found.get(key)!r} (this "
                        f"run: {meta[key]!r}); pass --overwrite to replace them, or choose "
                        "another --out")
    if rank == 0:
        # parts are left over if a run stopped right after writing meta.json
        shutil.rmtree(os.path.join(out, "parts"), ignore_errors=True)
        print(f"{out} already holds these codes; nothing to do")
    return True


def refuse_other_world(out, parts, world, what, fix):
    """One line if `parts` holds the progress files of a run with another number of processes:
    the shards' boundaries depend on it, so such parts cannot be continued."""
    if os.path.isdir(parts):
        stale = [f for f in os.listdir(parts)
                 if f.startswith("progress-") and not f.endswith(f"-of-{world}.json")]
        if stale:
            raise UserError(f"{out} holds an unfinished {what} run with another number of "
                            f"processes ({stale[0]}); resume it with that many, or {fix} to start "
                            "over")


def _rows_done(out, parts, progress_path, world, receipt):
    """How many rows of this rank's shard an earlier, interrupted run of the same command wrote.
    The shards' boundaries depend on the number of processes, so a run with another number cannot
    continue these parts: it is refused rather than left to write overlapping rows."""
    refuse_other_world(out, parts, world, "extraction", "pass --overwrite")
    if not os.path.exists(progress_path):
        return 0
    progress = _read_json(progress_path)
    if progress.get("meta") != receipt.to_dict() or not isinstance(progress.get("done"), int):
        raise UserError(f"{out} holds an unfinished extraction with other settings (data, size, "
                        f"crops or tokenizer); rerun that command to finish it, or pass "
                        "--overwrite to start over")
    return progress["done"]


def _extract(vq, data, out, image_size, ten_crop, crop_range, batch_size, num_workers, device,
             overwrite=False):
    """extract_codes inside its process group: receipt, resume point, this rank's rows, join."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if overwrite:
        if rank == 0:
            _clear_output(out)
        if world > 1:  # no rank looks for old files before they are gone
            dist.barrier()
    # ten crops come from an oversized centre crop (crop_range 1.1: 281 px for 256 px crops)
    side = int(image_size * crop_range) if ten_crop else image_size
    # no random flip: code_views stores every image with its mirror, both encoded
    base = image_dataset(data, side, augment="center", flip=False)
    if isinstance(base, Joined):  # a GPT learns one world's labels or captions at a time
        raise UserError(f"--data {data!r} joins datasets, which only a tokenizer trains on; "
                        "extract the codes of each dataset on its own")
    if ten_crop and isinstance(base, Captioned):
        raise UserError(f"--ten-crop is for class labels: half of its views are mirror images, "
                        f"which contradict a caption's left and right; extract {data!r} "
                        "without it (one centre crop per image)")
    vq = vq.to(device).eval()  # no dropout: resumed and sharded runs write the same codes
    receipt = _receipt(vq, base, data, image_size, ten_crop, crop_range, device)
    if _finished(out, receipt, rank):
        return receipt
    parts, tag = os.path.join(out, "parts"), f"{rank}-of-{world}"
    progress_path = os.path.join(parts, f"progress-{tag}.json")
    lo, hi = receipt.count * rank // world, receipt.count * (rank + 1) // world  # this shard
    done = _rows_done(out, parts, progress_path, world, receipt)
    if rank == 0 and isinstance(base, Captioned):  # row i's caption, for t2i training
        write_captions(out, captions_of(base))
    if done < hi - lo:
        os.makedirs(parts, exist_ok=True)
        # memory-mapped part files: "w+" creates a shard's arrays, "r+" reopens them on resume,
        # so rows already written stay and the rest of the shard is filled in place
        mode, length = "r+" if done else "w+", receipt.grid[0] * receipt.grid[1]
        codes = _open_part(os.path.join(parts, f"codes-{tag}.npy"), mode,
                           receipt.codes_dtype, (hi - lo, receipt.n_aug, length))
        labels = _open_part(os.path.join(parts, f"labels-{tag}.npy"), mode,
                            receipt.labels_dtype, (hi - lo,))
        # in dataset order, never shuffled: part row j must hold image lo + j, its label too
        views = _Views(base, image_size, ten_crop, mirror=receipt.n_aug == 2)
        rows = torch.utils.data.Subset(views, range(lo + done, hi))
        loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, num_workers=num_workers,
                                             pin_memory=str(device).startswith("cuda"))
        # the loader covers only the rows still missing, so a resumed run encodes nothing twice
        bar = progress(total=hi - lo, initial=done, unit="img", desc="codes", show=rank == 0)
        for views, y in loader:
            with torch.no_grad():  # fp32: under bf16 a near-tie between two codes could flip
                batch = vq.encode(views.flatten(0, 1).to(device, non_blocking=True))
            batch = batch.view(len(y), receipt.n_aug, length).cpu().numpy()
            codes[done:done + len(y)] = batch.astype(receipt.codes_dtype)
            labels[done:done + len(y)] = y.numpy().astype(receipt.labels_dtype)
            codes.flush()
            labels.flush()  # the rows reach the file before the progress that vouches for them
            done += len(y)
            _write_json(progress_path, dict(meta=receipt.to_dict(), done=done))
            bar.update(len(y))
        bar.close()
        del codes, labels  # unmapped before the join, which renames or reads these very files
    if world > 1:  # rank 0 joins the parts only once every shard is complete
        dist.barrier()
    if rank == 0:
        _join_parts(out, parts, world, receipt)
    return receipt


def _join_parts(out, parts, world, receipt):
    """Parts -> codes.npy and labels.npy (a rename for one process), then meta.json, then no
    parts."""
    for name in ("codes", "labels"):
        dst = os.path.join(out, f"{name}.npy")
        if world == 1:
            src = os.path.join(parts, f"{name}-0-of-1.npy")
            if os.path.exists(src):  # absent when a previous run already moved it, then stopped
                os.replace(src, dst)
            continue
        srcs = [np.load(os.path.join(parts, f"{name}-{r}-of-{world}.npy"), mmap_mode="r")
                for r in range(world)]
        joined = _open_part(dst, "w+", srcs[0].dtype, (receipt.count, *srcs[0].shape[1:]))
        row = 0
        for src in srcs:
            for i in range(0, len(src), 65536):  # in chunks: a shard can exceed the memory
                chunk = src[i:i + 65536]
                joined[row:row + len(chunk)] = chunk
                row += len(chunk)
        joined.flush()
        del joined
    _write_json(os.path.join(out, "meta.json"), receipt.to_dict())
    shutil.rmtree(parts, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Reading codes back for GPT training

def finished_folder(folder, receipt, holds, kind, command, flags):
    """The receipt file of a folder that a resumable extraction wrote (codes, caption features),
    or one line for what is there instead: no folder, a run that did not finish (its parts/ is
    still there: the same command resumes it), or something else."""
    fix = f"python data.py {command} {flags} --out {folder}"
    path = os.path.join(folder, receipt)
    if not os.path.isdir(folder):
        label = "codes" if kind == "code" else "features"
        raise UserError(f"{label} folder {folder!r} does not exist; make it with {fix}")
    if not os.path.exists(path):
        if os.path.isdir(os.path.join(folder, "parts")):
            raise UserError(f"the {kind} extraction into {folder!r} did not finish; rerun the "
                            f"same {command} command to resume it")
        raise UserError(f"{folder!r} holds no {holds} (no {receipt}); make them with {fix}")
    return path


class CodesDataset(torch.utils.data.Dataset):
    """A codes folder for GPT training: item -> (codes int64 [L], label int64), one of the n_aug
    views drawn at random with torch's RNG (so the DataLoader's worker seeding governs it).

    vocab_size, grid (h or (h, w)) and tokenizer_checksum, when given, must match how the codes
    were made (`.receipt`). The arrays are memory-mapped lazily in each process (a worker forked
    or spawned gets a path, not a copy of the data)."""

    def __init__(self, folder, vocab_size=None, grid=None, tokenizer_checksum=None):
        folder = str(folder)
        meta_path = finished_folder(folder, "meta.json", "codes", "code", "extract",
                                    "--vq-ckpt TOKENIZER.pt --data DATA")
        self.receipt = receipt = CodesReceipt.from_dict(_read_json(meta_path), meta_path)
        if grid is not None:
            grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
        redo = ("re-extract the codes with the tokenizer you use (python data.py extract "
                f"--vq-ckpt TOKENIZER.pt --data DATA --out {folder})")
        for what, want, have in (("vocab size", vocab_size, receipt.vocab_size),
                                 ("token grid", grid, receipt.grid),
                                 ("tokenizer checksum", tokenizer_checksum,
                                  receipt.tokenizer_checksum)):
            if want is not None and want != have:
                show = list if what == "token grid" else str  # grids print as meta.json has them
                raise UserError(f"codes in {folder} were made by a tokenizer with {what} "
                                f"{show(have)}, but {show(want)} is expected here; {redo}, or "
                                "match the model to the codes")
        self.folder, self.num_classes = folder, receipt.num_classes
        self._codes = self._labels = None
        # checked now, in the main process: a damaged folder fails before training, not in a worker
        codes, labels = self._arrays()
        length = receipt.grid[0] * receipt.grid[1]
        want = (receipt.count, receipt.n_aug, length)
        if codes.shape != want or labels.shape != (receipt.count,):
            raise UserError(f"{folder}: codes.npy {codes.shape} / labels.npy {labels.shape} "
                            "disagree with meta.json; the folder is damaged, extract it again")
        _check_ranges(folder, codes, labels, receipt)

    def _arrays(self):
        """(codes, labels) memory maps, opened on first use in this process."""
        if self._codes is None:
            try:
                self._codes = np.load(os.path.join(self.folder, "codes.npy"), mmap_mode="r")
                self._labels = np.load(os.path.join(self.folder, "labels.npy"), mmap_mode="r")
            except (OSError, ValueError) as e:
                # numpy's advice for an array of Python objects (allow_pickle) is never passed on
                why = ("it holds Python objects, not codes" if "pickle" in str(e) or
                       "object" in str(e).lower() else first_line(e))
                raise UserError(f"{self.folder}: cannot read the codes ({why}); "
                                "extract them again") from None
        return self._codes, self._labels

    def __getstate__(self):
        # DataLoader workers get the folder and reopen the memory maps themselves: pickling the
        # maps would copy every code into each worker (or fail for a spawned one)
        return {**self.__dict__, "_codes": None, "_labels": None}

    def __len__(self):
        return self.receipt.count

    def __getitem__(self, index):
        # a fresh view per access: the crop-and-flip augmentation of the official GPT training,
        # applied by choosing among the views extracted beforehand
        codes, labels = self._arrays()
        view = int(torch.randint(self.receipt.n_aug, ()))
        # int64 is what nn.Embedding and cross_entropy take; the file keeps 2 bytes a code
        row = torch.from_numpy(codes[index, view].astype(np.int64))
        return row, torch.tensor(int(labels[index]))


def _check_ranges(folder, codes, labels, receipt):
    """Every code below the vocabulary and every label below the number of classes, as meta.json
    states them: a hand-edited or damaged file would otherwise reach the GPT's embedding as an
    index error (on a GPU, a device-side assert). One pass in blocks of 16M codes: seconds for
    ImageNet's 6.6 GB, once per training run."""
    flat = codes.reshape(len(codes), -1)
    step = max(1, (1 << 24) // max(flat.shape[1], 1))
    for i in range(0, len(flat), step):
        block = flat[i:i + step]
        bad = (block >= receipt.vocab_size) | (block < 0)
        if bad.any():
            row = i + int(bad.any(1).argmax())
            code = int(flat[row][bad[row - i]][0])
            raise UserError(f"{folder}: codes.npy row {row} holds code {code}, "
                            f"outside the vocabulary of {receipt.vocab_size} codes in meta.json; "
                            "the folder is damaged, extract it again")
    # len(labels) first: the min() of an empty array raises instead of answering
    if len(labels) and not (0 <= labels.min() and labels.max() < receipt.num_classes):
        raise UserError(f"{folder}: labels.npy holds labels outside [0, {receipt.num_classes}) "
                        "of meta.json; the folder is damaged, extract it again")


class MixedCodes(torch.utils.data.Dataset):
    """Codes folders of the same images made with different crops: each access picks a folder
    uniformly at random, then one of its views. The official GPTs trained on ten crops at
    crop_range 1.1 and 1.05 mixed this way, half and half (the official dataset/imagenet.py)."""

    def __init__(self, folders):
        # the folders must be row-aligned (same images, same labels, same tokenizer): only then
        # is drawing folder k for row i a choice between two crops of one image
        self.parts = [CodesDataset(f) for f in folders]
        first = self.parts[0]
        self.receipt, self.num_classes = first.receipt, first.num_classes
        keys = ("count", "vocab_size", "grid", "tokenizer_checksum")
        for p in self.parts[1:]:
            same = all(getattr(p.receipt, k) == getattr(self.receipt, k) for k in keys)
            # equal labels row by row: what the receipts alone cannot show is that rows align
            if not same or not np.array_equal(p._arrays()[1], first._arrays()[1]):
                raise UserError(f"{p.folder} and {first.folder} do not hold codes of the same "
                                "images by the same tokenizer; extract both from one --data with "
                                "one tokenizer")

    def __len__(self):
        return len(self.parts[0])

    def __getitem__(self, index):
        # torch's RNG, like the view drawn inside: under train.py's Seeded both follow the item seed
        return self.parts[int(torch.randint(len(self.parts), ()))][index]


def codes_dataset(spec):
    """The dataset behind the GPT's --data: one codes folder, or several joined by commas
    (MixedCodes). A real folder whose name holds a comma is one folder."""
    spec = str(spec)
    # empty names dropped: a trailing comma names no folder
    folders = [spec] if os.path.isdir(spec) else [f for f in spec.split(",") if f]
    if not folders:
        raise UserError(f"--data {spec!r} names no codes folder; pass one, or several separated "
                        "by commas")
    return CodesDataset(folders[0]) if len(folders) == 1 else MixedCodes(folders)


# ------------------------------------------------------------------------------------------------
# Captions: image-caption datasets, and the frozen text encoder's features computed once
#
# The text-to-image GPT never reads words: a caption reaches it as the output of a frozen FLAN-T5-XL
# encoder (paper 3.3), 1.2B parameters whose result for a given caption never changes, because the
# encoder is not trained. Running it in every epoch would cost more than the GPT itself, so, like
# the image codes, the features are computed once and stored (the official extract_t5_feature.py).
#
# Caption sources, each a Dataset of (image float32 [3, S, S] in [-1, 1], caption str) with
# `.spec` (how --data names it) and every caption readable without decoding an image
# (captions_of):
#   captions:DIR  images anywhere under DIR, each with a same-stem .txt beside it (cat.jpg, cat.txt)
#   coco:ANNOTATIONS.json:IMAGES_DIR  a COCO captions file: one item per image, its first caption
#   scenes[:N]    N scenes of the built-in captioned world (scenes.CaptionedScenes; 10,000 if no N)
# image_dataset takes the same specs and gives (image, 0): captioned images form one class, and
# extract_codes writes their captions, in row order, into the codes folder's captions.json.

def is_caption_spec(spec):
    """True for the --data specs that name captioned images (captions:, coco:, scenes[:N])."""
    spec = str(spec)
    return spec.startswith(("captions:", "coco:")) or spec == "scenes" or spec.startswith("scenes:")


def _read_caption(path, image):
    """The caption file of `image`: its whole text, every run of white space (line breaks too) read
    as one space, so a caption written over several lines stays one caption."""
    try:
        with open(path, encoding="utf-8") as f:
            text = " ".join(f.read().split())
    except FileNotFoundError:
        raise UserError(f"image {image} has no caption: {path} does not exist; write it or move "
                        "the image out of the folder") from None
    except UnicodeDecodeError:
        raise UserError(f"caption file {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read caption file {path} ({e.strerror})") from None
    if not text:
        raise UserError(f"caption file {path} is empty; write the caption of {image} in it, or "
                        "move both out of the folder")
    return text


class CaptionedImages(torch.utils.data.Dataset):
    """(image file, caption) pairs -> (image float32 [3, image_size, image_size] in [-1, 1],
    caption str); augment "center" (ADM's centre crop) or "random_resize_crop", and an optional
    random flip (off by default: a caption may say "left of").

    An image that cannot be decoded is an error naming it, not a substitute as in ImageFolder:
    another image would then carry this caption, and codes row i must show caption i."""

    def __init__(self, samples, image_size, augment="center", flip=False, spec=""):
        if augment not in ("center", "random_resize_crop"):
            raise UserError(f"augment must be 'center' or 'random_resize_crop', got {augment!r}")
        self.samples, self.image_size, self.augment, self.flip = samples, image_size, augment, flip
        self.spec, self.captions = spec, [caption for _, caption in samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, caption = self.samples[index]
        try:
            with Image.open(path) as im:
                im.load()  # decode now: a truncated file fails here, inside the try
                pil = to_rgb(im)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"unreadable image {path} ({first_line(e)}); remove it and its "
                            "caption, then extract into a new folder") from None
        crop = center_crop if self.augment == "center" else random_resize_crop
        x = from_uint8(crop(pil, self.image_size))
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, caption


def caption_folder(root, image_size, augment="center", flip=False):
    """Images anywhere under `root` (sorted paths, as ImageFolder), each with its same-stem .txt
    caption; an image without one is an error, not a silent gap in the data."""
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise UserError(f"caption folder {root!r} does not exist; pass a folder of images, each "
                        "with a same-stem .txt caption beside it")
    samples = []
    for folder, _, files in sorted(os.walk(root, followlinks=True)):
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                image = os.path.join(folder, name)
                samples.append((image, _read_caption(os.path.splitext(image)[0] + ".txt", image)))
    if not samples:
        raise UserError(f"no images under {root!r}; expected images with a same-stem .txt caption "
                        "beside each (cat.jpg and cat.txt)")
    return CaptionedImages(samples, image_size, augment, flip, spec=f"captions:{root}")


def coco_captions(annotations, images_dir, image_size, augment="center", flip=False):
    """A COCO captions file (captions_train2017.json: "images" [{id, file_name}], "annotations"
    [{image_id, caption}]): one item per image, in the file's order of "images", with the list
    of its captions in the file's order (COCO has five per image; joint training draws one per
    access, frozen features take the first: LlamaGen's t2i data has one caption per image).
    Images with no caption are left out, counted in `.uncaptioned`."""
    annotations = os.path.abspath(os.path.expanduser(annotations))
    images_dir = os.path.abspath(os.path.expanduser(images_dir))
    layout = ("it needs 'images' [{id, file_name}] and 'annotations' [{image_id, caption}], as "
              "captions_train2017.json has")
    try:
        with open(annotations, encoding="utf-8") as f:
            raw = json.load(f)
        names = {im["id"]: im["file_name"] for im in raw["images"]}  # in the file's order
        every = {}
        for a in raw["annotations"]:
            if not isinstance(a["caption"], str):  # the wrong file: the layout message below
                raise TypeError("caption")
            # white space normalised as in _read_caption: COCO's captions carry stray spaces and
            # line breaks, which would otherwise reach the tokenizer and the captions' checksum
            every.setdefault(a["image_id"], []).append(" ".join(a["caption"].split()))
    except FileNotFoundError:
        raise UserError(f"COCO annotations {annotations!r} do not exist; write "
                        "coco:ANNOTATIONS.json:IMAGES_DIR") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{annotations}: not valid JSON ({e.msg}, line {e.lineno}); the file is "
                        "damaged or cut short, download it again") from None
    except UnicodeDecodeError:
        raise UserError(f"{annotations}: not UTF-8 JSON; give a COCO captions file") from None
    except (KeyError, TypeError, AttributeError):
        raise UserError(f"{annotations}: not a COCO captions file; {layout}") from None
    if not os.path.isdir(images_dir):
        raise UserError(f"COCO image folder {images_dir!r} does not exist; write "
                        "coco:ANNOTATIONS.json:IMAGES_DIR")
    samples = [(os.path.join(images_dir, str(name)), every[i]) for i, name in names.items()
               if i in every]
    empty = next((i for i, name in names.items() if "" in every.get(i, ())), None)
    if empty is not None:
        raise UserError(f"{annotations}: image {empty} has an empty caption; fix the file")
    missing = [path for path, _ in samples if not os.path.isfile(path)]
    if missing:
        raise UserError(f"{missing[0]} (named in {os.path.basename(annotations)}) does not exist"
                        f"{f', nor {len(missing) - 1} more' if len(missing) > 1 else ''}; is "
                        f"{images_dir} the image folder of these annotations?")
    if not samples:
        raise UserError(f"{annotations}: no image has a caption")
    ds = CaptionedImages(samples, image_size, augment, flip,
                         spec=f"coco:{annotations}:{images_dir}")
    ds.uncaptioned = len(names) - len(samples)
    return ds


def caption_dataset(spec, image_size, augment="center", flip=False, seed=0):
    """The captioned dataset a spec names: "scenes[:N]" (scenes.CaptionedScenes, drawn at the
    final size like SyntheticShapes, so augment and flip do not apply), "coco:ANN.json:IMAGES"
    (coco_captions), "captions:DIR" or a plain folder (caption_folder). Items: (image float32
    [3, S, S] in [-1, 1], caption str); `.spec` is the normalised spec (absolute paths)."""
    spec = str(spec)
    if spec == "scenes" or spec.startswith("scenes:"):
        from scenes import CaptionedScenes  # here, not at the top: scenes.py imports data.py
        n = spec.partition(":")[2] or "10000"
        if not n.isdigit() or int(n) < 1:
            raise UserError(f"--data {spec!r}: write scenes:N with N a positive number of scenes, "
                            "e.g. scenes:2000")
        ds = CaptionedScenes(int(n), image_size, seed)
        # normalised (scenes:007 -> scenes:7): receipts compare specs as strings
        ds.spec = f"scenes:{int(n)}"
        return ds
    if spec.startswith("coco:"):
        # cut at ".json:", not at ":": Windows drives (C:\) and folder names may hold colons
        annotations, sep, images = spec[len("coco:"):].partition(".json:")
        if not sep or not images:
            raise UserError(f"--data {spec!r}: write coco:ANNOTATIONS.json:IMAGES_DIR, e.g. "
                            "coco:annotations/captions_train2017.json:train2017")
        return coco_captions(annotations + ".json", images, image_size, augment, flip)
    return caption_folder(spec.removeprefix("captions:"), image_size, augment, flip)


def captions_of(dataset):
    """Every caption of a caption_dataset (or of its Captioned view), in item order, with no image
    decoded or drawn."""
    dataset = getattr(dataset, "base", dataset)
    if hasattr(dataset, "captions"):
        return list(dataset.captions)
    return [dataset.caption(i) for i in range(len(dataset))]


class Captioned(torch.utils.data.Dataset):
    """A caption dataset as the labelled image dataset that extraction and tokenizer training take:
    item -> (image, 0). One class: a t2i model is conditioned on the caption, not on a label, and
    the caption of row i is captions_of(self)[i]."""
    num_classes, classes = 1, ("captioned",)

    def __init__(self, base):
        self.base, self.spec = base, base.spec

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        return self.base[index][0], 0


# Captions travel with the codes of their images: captions.json in the codes folder holds them in
# row order, with their checksum, which the features receipt quotes, so codes row i and features
# item i can be checked to describe one image before a t2i model trains on the pair.
def captions_checksum(captions):
    """sha256 of a list of captions (their JSON form, UTF-8): equal lists, equal checksums."""
    # one fixed serialisation: changing it would change every stored checksum, orphaning the
    # features folders already made from these captions
    text = json.dumps(list(captions), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_captions(folder, captions):
    """captions.json: {"count", "checksum", "captions"}, written atomically."""
    captions = list(captions)
    _write_json(os.path.join(folder, "captions.json"), dict(
        count=len(captions), checksum=captions_checksum(captions), captions=captions))


def read_captions(folder):
    """(captions in row order, checksum) of a codes folder made from captioned data. An entry is
    a caption, or the list of an image's captions (COCO), of which training draws one per access."""
    path = os.path.join(str(folder), "captions.json")
    if not os.path.isfile(path):
        raise UserError(f"{folder} holds no captions.json: its codes were not extracted from "
                        "captioned data; extract them with --data scenes:N, coco:... or "
                        "captions:DIR")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        captions = raw["captions"]
        ok = all(isinstance(c, str) or (isinstance(c, list) and c and
                                        all(isinstance(s, str) for s in c))
                 for c in captions) and raw["count"] == len(captions)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok or captions_checksum(captions) != raw.get("checksum"):
        raise UserError(f"{path} is damaged (its captions do not match their count or checksum); "
                        "extract the codes again")
    return captions, raw["checksum"]


@dataclasses.dataclass(frozen=True)
class FeaturesReceipt:
    """How a caption-features folder was made, stored as its features.json. Features mean
    something only to a GPT trained on that encoder's output, and only next to the codes of the
    images their captions describe: train.py checks both (check_same_encoder, and
    CaptionFeatures.check_codes against the codes folder's captions)."""
    encoder: str  # a name for people: the T5 folder's name (flan-t5-xl) or the caller's
    encoder_checksum: str  # encoder_checksum(): weights, vocabulary and caption cleaning
    length: int  # N, the tokens per caption the features were padded or truncated to (120)
    d_model: int  # width of each feature vector (2048 for FLAN-T5-XL)
    dtype: str  # storage: "float16", or "bfloat16" kept as its uint16 bit patterns
    compute_dtype: str  # the encoder's precision while encoding: "float32" or "bfloat16"
    clean: bool  # LlamaGen's caption cleaning applied before tokenizing
    count: int  # captions, one per codes row
    captions_checksum: str  # captions_checksum() of the captions, in item order
    data: str  # where the captions came from: a codes folder (absolute path) or a caption spec

    @classmethod
    def from_dict(cls, d, where):
        """The receipt in a features.json or a checkpoint's dict; unknown keys are ignored."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [k for k in names if not isinstance(d, dict) or k not in d]
        if missing:
            raise UserError(f"{where}: the features receipt lacks {missing[0]!r}; it was not "
                            "written by data.py features (or is damaged): extract them again")
        return cls(**{k: d[k] for k in names})

    def to_dict(self):
        """The JSON form: features.json, and a frozen-feature t2i checkpoint's meta, hold it."""
        return dataclasses.asdict(self)

    def describe(self):
        """The fields that tie features to their encoder, as error messages quote them."""
        return (f"encoder {self.encoder} {self.encoder_checksum[:12]}, N {self.length}, "
                f"d_model {self.d_model}")

    def check_same_encoder(self, other, mine="these features", theirs="the others"):
        """One UserError line, naming both checksums, unless `other` (a FeaturesReceipt) comes from
        the same encoder at the same N: a GPT trained on one encoder's features reads another's
        as noise."""
        keys = ("encoder_checksum", "length", "d_model", "clean")
        if any(getattr(self, k) != getattr(other, k) for k in keys):
            raise UserError(f"the caption features of {mine} come from another text encoder "
                            f"({self.describe()}) than those of {theirs} ({other.describe()}): "
                            f"extract features with the encoder of {mine}, or start afresh")

    def check_encoder(self, text_encoder, mine="these features", theirs="this text encoder"):
        """The same check against a live text.TextEncoder (sampling from prompts encodes them
        with it): one UserError line naming both checksums unless it is the one that made them."""
        have, width = encoder_checksum(text_encoder), text_encoder.encoder.config.d_model
        if have != self.encoder_checksum or width != self.d_model:
            raise UserError(f"{mine} were made with text encoder {self.encoder} "
                            f"{self.encoder_checksum[:12]} (d_model {self.d_model}), but {theirs} "
                            f"is {have[:12]} (d_model {width}); pass the T5 folder the features "
                            "were extracted with")


def encoder_checksum(text_encoder):
    """sha256 of what turns a caption into features (a text.TextEncoder): the T5 weights, hashed
    as bfloat16 so that one model loaded in float32 or in bfloat16 has one checksum, plus the
    tokenizer's pieces and scores and whether captions are cleaned. A whole pass over the weights:
    a few seconds for FLAN-T5-XL, once per extraction."""
    tok = text_encoder.tokenizer
    vocab = json.dumps([tok.pieces, tok.vocab, tok.unk_id, tok.eos_id, tok.pad_id,
                        tok.split_any_space, tok.special_ids, bool(text_encoder.clean)],
                       sort_keys=True, ensure_ascii=False)
    weights = weights_checksum(text_encoder.encoder, as_dtype=torch.bfloat16)
    return hashlib.sha256(f"{weights};{vocab}".encode()).hexdigest()


# A features folder holds features.bin, every caption's valid token vectors one after another
# ([total tokens, d_model], 2 bytes a number, little-endian, no header), lengths.npy [count] int32
# (item i's rows follow those of the items before it) and features.json, the receipt, written
# last: its presence means the folder is complete. Only valid tokens are kept: a COCO caption fills
# about 15 of its 120 positions, so the padded layout would be about 8 times larger, and it is
# rebuilt on reading (CaptionFeatures). Two bytes, because the encoder's own precision in LlamaGen
# is bf16 and a GPT's caption projection does not need more.
STORAGE = {"bf16": "bfloat16", "fp16": "float16"}  # --storage -> FeaturesReceipt.dtype
_STORED = {"bfloat16": "<u2", "float16": "<f2"}  # how each is laid out in features.bin


def extract_features(encoder, captions, out, length=120, batch_size=64, dtype="bfloat16", data="",
                     name="t5"):
    """Encode `captions` (in item order; an image with several, COCO's, gives its first) with
    `encoder` (a text.TextEncoder, on its device and in its precision) into the features folder
    `out`; returns its FeaturesReceipt.
    dtype: the stored format, "bfloat16" or "float16"; data and name: what the receipt says the
    captions and the encoder are.

    Sharded and resumable like extract_codes: under torchrun each rank encodes its share into its
    own part files, appending each batch's rows and then atomically recording how far it got, so
    rerunning the same command after an interruption continues where each rank stopped; rank 0
    joins the parts and writes features.json last."""
    own_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if own_group:  # as in extract_codes: only a barrier crosses processes
        dist.init_process_group("nccl" if encoder.device.type == "cuda" else "gloo")
    try:
        return _extract_features(encoder, captions, str(out), length, batch_size, dtype, data,
                                 name)
    finally:
        if own_group:
            dist.destroy_process_group()


def _shard(count, batch_size, rank, world):
    """Rank `rank`'s items [lo, hi). Cut at multiples of batch_size, so every batch holds the same
    captions whatever the number of processes: the encoder then computes the very same numbers,
    and 1 and 8 processes write byte-identical folders."""
    batches = math.ceil(count / batch_size)
    return (min(count, batches * rank // world * batch_size),
            min(count, batches * (rank + 1) // world * batch_size))


def _extract_features(encoder, captions, out, length, batch_size, dtype, data, name):
    """extract_features inside its process group: receipt, resume point, this rank's rows, join."""
    if dtype not in _STORED:
        raise UserError(f"features are stored as bfloat16 or float16, not {dtype!r}")
    if length < 1 or batch_size < 1:
        raise UserError(f"the caption length N and the batch size must be >= 1, got {length} and "
                        f"{batch_size}")
    captions = list(captions)
    if not captions or not all(isinstance(c, (str, list)) for c in captions):
        raise UserError("extract_features needs a non-empty list of captions")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    d = encoder.encoder.config.d_model
    receipt = FeaturesReceipt(
        encoder=name, encoder_checksum=encoder_checksum(encoder), length=length, d_model=d,
        dtype=dtype, compute_dtype=str(encoder.dtype).removeprefix("torch."),
        clean=bool(encoder.clean), count=len(captions),
        captions_checksum=captions_checksum(captions), data=data)
    if _features_finished(out, receipt, rank):
        return receipt
    parts, tag = os.path.join(out, "parts"), f"{rank}-of-{world}"
    progress_path = os.path.join(parts, f"progress-{tag}.json")
    lo, hi = _shard(len(captions), batch_size, rank, world)
    done, tokens = _features_done(out, parts, progress_path, world, receipt, batch_size)
    if done < hi - lo:
        os.makedirs(parts, exist_ok=True)
        rows_path = os.path.join(parts, f"features-{tag}.bin")
        lengths_path = os.path.join(parts, f"lengths-{tag}.bin")
        mode = "r+b" if done else "wb"
        try:
            rows_file, lengths_file = open(rows_path, mode), open(lengths_path, mode)
        except FileNotFoundError:
            raise UserError(f"{parts} lost its part files; delete {parts} to start over") from None
        with rows_file, lengths_file:
            # a killed run may have written past what its progress file vouches for: cut it off
            rows_file.truncate(tokens * d * 2)
            lengths_file.truncate(done * 4)
            rows_file.seek(0, os.SEEK_END)  # appends go after the cut: "r+b" opens at offset 0
            lengths_file.seek(0, os.SEEK_END)
            bar = progress(total=hi - lo, initial=done, unit="caption", desc="features",
                           show=rank == 0)
            for start in range(lo + done, hi, batch_size):
                texts = first_captions(captions[start:min(start + batch_size, hi)])
                rows, counts = _encode_valid(encoder, texts, length, dtype, start)
                rows_file.write(rows)
                lengths_file.write(counts.astype("<i4").tobytes())
                rows_file.flush()  # the rows reach the file before the progress that vouches
                lengths_file.flush()
                done, tokens = done + len(texts), tokens + int(counts.sum())
                _write_json(progress_path, dict(meta=receipt.to_dict(), batch_size=batch_size,
                                                done=done, tokens=tokens))
                bar.update(len(texts))
            bar.close()
    if world > 1:  # rank 0 joins the parts only once every shard is complete
        dist.barrier()
    if rank == 0:
        _join_features(out, parts, world, receipt, batch_size)
    return receipt


@torch.no_grad()
def _encode_valid(encoder, texts, length, dtype, start):
    """A batch of captions -> (the valid tokens' features as little-endian 16-bit bytes, one row
    of d_model per token, caption after caption; the number of tokens of each, a numpy array)."""
    from text import clean_caption  # here: text.py is only needed by the t2i side
    # Run the encoder at the batch's longest caption rather than at N: with the padding masked, the
    # valid tokens' outputs do not depend on how many pads follow, and most captions are far
    # shorter than 120 tokens. Truncation is unchanged: a caption longer than N makes this N.
    _, mask = encoder.tokenizer([clean_caption(t) if encoder.clean else t for t in texts], length)
    feats, mask = encoder.encode_captions(texts, int(mask.sum(1).max()), batch_size=len(texts))
    # cast first, checked after: an fp16 overflow exists only once the features are fp16
    stored = feats.to(getattr(torch, dtype))
    bad = ~torch.isfinite(stored).all(2).all(1)  # pads are zeros: only real tokens can be bad
    if bad.any():
        k = int(bad.float().argmax())  # float: torch's argmax refuses bool tensors
        why = ("exceed float16's range (65504); store them as bf16 (--storage bf16)"
               if torch.isfinite(feats[k]).all() else
               "are not finite: check the weights, or run the encoder in fp32 (--precision fp32)")
        raise UserError(f"the features of caption {start + k} ({texts[k][:40]!r}) {why}")
    # a boolean mask keeps caption order and token order: the layout features.bin promises
    valid = stored[mask]
    bits = valid.cpu().view(torch.int16).numpy().astype("<i2")  # bf16 kept as its bit pattern
    return bits.tobytes(), mask.sum(1).cpu().numpy()


def _features_finished(out, receipt, rank):
    """True if `out` already holds these very features; refuses a folder holding others."""
    path = os.path.join(out, "features.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        found, meta = json.load(f), receipt.to_dict()
    if found != meta:
        key = next((k for k in meta if found.get(k) != meta[k]), "data")
        raise UserError(f"{out} already holds finished caption features with {key}="
                        f"{found.get(key)!r} (this run: {meta[key]!r}); choose another --out or "
                        f"delete {out}")
    if rank == 0:
        shutil.rmtree(os.path.join(out, "parts"), ignore_errors=True)
        print(f"{out} already holds these features; nothing to do")
    return True


def _features_done(out, parts, progress_path, world, receipt, batch_size):
    """(captions, tokens) of this rank's share that an interrupted run of the same command wrote.
    Shards depend on the number of processes and the batch size, so both must stay the same."""
    refuse_other_world(out, parts, world, "feature extraction", f"delete {parts}")
    if not os.path.exists(progress_path):
        return 0, 0
    with open(progress_path) as f:
        progress_json = json.load(f)
    if progress_json["meta"] != receipt.to_dict():
        raise UserError(f"{out} holds an unfinished feature extraction with other settings "
                        "(captions, encoder, N or storage); rerun that command to finish it, or "
                        f"delete {parts} to start over")
    if progress_json["batch_size"] != batch_size:
        raise UserError(f"{out} holds an unfinished feature extraction with --batch-size "
                        f"{progress_json['batch_size']}; resume it with that batch size (the "
                        "shards follow it)")
    return progress_json["done"], progress_json["tokens"]


def _join_features(out, parts, world, receipt, batch_size):
    """Parts -> lengths.npy and features.bin (a rename for one process), then features.json, then
    no parts. Rerunnable: the parts stay until the receipt is written."""
    lengths = []
    for r in range(world):
        lo, hi = _shard(receipt.count, batch_size, r, world)
        path = os.path.join(parts, f"lengths-{r}-of-{world}.bin")
        # hi == lo where there are more ranks than batches of captions: that shard wrote nothing
        lengths.append(np.fromfile(path, "<i4") if hi > lo else np.zeros(0, "<i4"))
    lengths = np.concatenate(lengths).astype(np.int32)
    save_atomic(lambda f: np.save(f, lengths), os.path.join(out, "lengths.npy"))
    dst = os.path.join(out, "features.bin")
    if world == 1:
        src = os.path.join(parts, "features-0-of-1.bin")
        if os.path.exists(src):  # absent when a previous run already moved it, then stopped
            os.replace(src, dst)
    else:
        with open(dst, "wb") as joined:
            for r in range(world):
                src = os.path.join(parts, f"features-{r}-of-{world}.bin")
                if os.path.exists(src):  # an empty shard has no file
                    with open(src, "rb") as part:
                        shutil.copyfileobj(part, joined, 1 << 24)
    if len(lengths) != receipt.count or os.path.getsize(dst) != int(lengths.sum()) * \
            receipt.d_model * 2:
        raise UserError(f"the part files in {parts} are incomplete; delete {out} and extract "
                        "again")
    _write_json(os.path.join(out, "features.json"), receipt.to_dict())
    shutil.rmtree(parts, ignore_errors=True)


class CaptionFeatures(torch.utils.data.Dataset):
    """A features folder for t2i training: item i -> (features float32 [N, d_model], right-padded
    with zeros, mask bool [N]), the layout of TextEncoder.encode_captions, so that
    model.left_pad_caption applies unchanged. `.receipt` is the FeaturesReceipt; check_codes ties
    the features to a codes folder. The file is memory-mapped lazily in each process, as in
    CodesDataset."""

    def __init__(self, folder):
        folder = str(folder)
        path = finished_folder(folder, "features.json", "caption features", "feature",
                               "features", "--data CODES_OR_CAPTIONS --t5 T5_FOLDER")
        try:
            with open(path) as f:
                raw = json.load(f)
            lengths = np.load(os.path.join(folder, "lengths.npy"))
            size = os.path.getsize(os.path.join(folder, "features.bin"))
        except (OSError, ValueError) as e:
            raise UserError(f"{folder}: cannot read the features ({first_line(e)}); extract them "
                            "again") from None
        self.receipt = receipt = FeaturesReceipt.from_dict(raw, path)
        if lengths.shape != (receipt.count,) or size != int(lengths.sum()) * receipt.d_model * 2:
            raise UserError(f"{folder}: features.bin ({size} bytes) and lengths.npy disagree "
                            "with features.json; the folder is damaged, extract it again")
        self.folder, self.lengths = folder, lengths.astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])  # item i: rows from here
        self._rows = None

    def _map(self):
        """The features.bin memory map, opened on first use in this process (see __getstate__)."""
        if self._rows is None:
            self._rows = np.memmap(os.path.join(self.folder, "features.bin"),
                                   _STORED[self.receipt.dtype], "r",
                                   shape=(int(self.offsets[-1]), self.receipt.d_model))
        return self._rows

    def __getstate__(self):
        return {**self.__dict__, "_rows": None}  # workers reopen the map, never copy it

    def __len__(self):
        return self.receipt.count

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} captions")
        index %= len(self)  # a negative index counts from the end, as a list's; offsets need >= 0
        a, n, N = int(self.offsets[index]), int(self.lengths[index]), self.receipt.length
        rows = np.array(self._map()[a:a + n])  # a copy: the map is read-only
        if self.receipt.dtype == "bfloat16":  # the bit patterns, reinterpreted, not converted
            rows = torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
        else:
            rows = torch.from_numpy(rows)
        features = torch.zeros(N, self.receipt.d_model)
        features[:n] = rows.float()
        mask = torch.zeros(N, dtype=torch.bool)
        mask[:n] = True
        return features, mask

    def check_codes(self, codes_folder):
        """One UserError line unless these features were made from the captions of the codes in
        `codes_folder`, in the same order: codes row i must be the image of caption i."""
        _, checksum = read_captions(codes_folder)
        if checksum != self.receipt.captions_checksum:
            raise UserError(f"the caption features in {self.folder} were made from other captions "
                            f"(captions {self.receipt.captions_checksum[:12]}) than the codes in "
                            f"{codes_folder} (captions {checksum[:12]}); extract features with "
                            f"--data {codes_folder}")


def load_captions(spec):
    """(captions, data) for `features --data`: a codes folder's captions.json, or the captions of a
    caption spec, no image read (scenes:N draws its scenes' layouts at 32 px)."""
    spec = str(spec)
    # a folder with any trace of an extraction is read as codes: read_captions then names what is
    # missing, rather than the folder being taken for a captions:DIR of images
    if os.path.isdir(spec) and any(os.path.exists(os.path.join(spec, f))
                                   for f in ("captions.json", "meta.json", "parts")):
        return read_captions(spec)[0], os.path.abspath(spec)
    ds = caption_dataset(spec, 32)
    return captions_of(ds), ds.spec


def first_captions(captions):
    """One caption per image for frozen features: an image's first where it has several."""
    return [c if isinstance(c, str) else c[0] for c in captions]


# ------------------------------------------------------------------------------------------------
# command line

def get_args(argv=None):
    """Three subcommands: `preview` draws the embedded dataset, `extract` makes a codes folder,
    `features` a caption-features folder."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pv = sub.add_parser("preview", help="write a PNG grid of SyntheticShapes, one row per class")
    pv.add_argument("--out", default="shapes.png", help="PNG file to write (default: shapes.png); "
                    "an existing file is kept unless --overwrite")
    pv.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    pv.add_argument("--image-size", type=int, default=64,
                    help="side of each image in pixels (default: 64)")
    pv.add_argument("--per-class", type=int, default=8,
                    help="examples per class, one row each (default: 8)")
    pv.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")

    ex = sub.add_parser("extract", help="encode a dataset into a codes folder for GPT training "
                        "(torchrun-sharded, resumable: rerun the same command after an "
                        "interruption)")
    which = ex.add_mutually_exclusive_group(required=True)
    which.add_argument("--vq-ckpt", help="tokenizer checkpoint: ours or the official "
                       "vq_ds16_c2i.pt / vq_ds8_c2i.pt")
    which.add_argument("--vq-config", help="a tokenizer config name with random weights "
                       "(seed 0), for smoke tests")
    ex.add_argument("--data", required=True, help="an ImageNet-layout folder "
                    "(root/<class>/<image>), 'synthetic' (10,000 images) or 'synthetic:N' (a "
                    "folder named synthetic is ./synthetic); or captioned images, one class, "
                    "their captions kept in captions.json: 'scenes[:N]', "
                    "'coco:ANNOTATIONS.json:IMAGES_DIR' or 'captions:DIR'")
    ex.add_argument("--out", required=True,
                    help="codes folder to write (codes.npy, labels.npy, meta.json); finished "
                    "codes of other settings there are refused unless --overwrite, the same "
                    "command resumes an interrupted run")
    ex.add_argument("--overwrite", action="store_true", help="remove an earlier extraction in "
                    "--out (finished or not) and start over")
    ex.add_argument("--image-size", type=int, default=256, help="image side fed to the "
                    "tokenizer, a multiple of its downsampling factor (default: 256)")
    ex.add_argument("--ten-crop", action="store_true", help="10 views per image (corners + "
                    "centre of the image and of its mirror) instead of 2 (the image and its "
                    "mirror)")
    ex.add_argument("--crop-range", type=float, default=None, help="with --ten-crop: centre-crop "
                    "to int(image_size * crop_range) before the ten crops (default: 1.1; the "
                    "paper also uses 1.05)")
    ex.add_argument("--batch-size", type=int, default=64,
                    help="images per tokenizer call per process (default: 64)")
    ex.add_argument("--num-workers", type=int, default=4,
                    help="DataLoader processes decoding images (default: 4)")
    ex.add_argument("--device", default="auto", help="cuda, mps or cpu (default: the best "
                    "available)")

    ft = sub.add_parser("features", help="encode the captions of a dataset once with a frozen T5 "
                        "encoder into a features folder for text-to-image training "
                        "(torchrun-sharded, resumable: rerun the same command after an "
                        "interruption)")
    ft.add_argument("--data", required=True, help="a codes folder extracted from captioned data "
                    "(its captions.json: the features then pair with its codes row by row), or "
                    "a caption spec: 'scenes[:N]', 'coco:ANNOTATIONS.json:IMAGES_DIR', "
                    "'captions:DIR' or a folder of images with same-stem .txt captions")
    ft.add_argument("--t5", required=True, help="a Hugging Face (FLAN-)T5 folder: config.json, "
                    "spiece.model or tokenizer.json, and the weights (LlamaGen: "
                    "google/flan-t5-xl)")
    ft.add_argument("--out", required=True, help="features folder to write (features.bin, "
                    "lengths.npy, features.json)")
    ft.add_argument("--length", type=int, default=120, help="N, tokens per caption; longer "
                    "captions are truncated, keeping </s> (default: 120, the paper's)")
    ft.add_argument("--batch-size", type=int, default=64,
                    help="captions per encoder call per process (default: 64)")
    ft.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="the encoder's precision (default auto: bf16 on GPUs that have it, as "
                    "LlamaGen runs T5, else fp32); no fp16: FLAN-T5's activations overflow it")
    ft.add_argument("--storage", choices=list(STORAGE), default="bf16", help="stored format, 2 "
                    "bytes a number (default: bf16, float32's range; fp16 keeps 3 more bits of "
                    "mantissa and is refused if a feature exceeds 65504)")
    ft.add_argument("--device", default="auto", help="cuda, mps or cpu (default: the best "
                    "available)")
    return p.parse_args(argv)


def features_command(args):
    """`data.py features`: check the flags, read the captions, load the encoder, extract, report."""
    if args.length < 1 or args.batch_size < 1:
        raise UserError(f"--length and --batch-size must be >= 1, got {args.length} and "
                        f"{args.batch_size}")
    captions, data = load_captions(args.data)
    t5 = os.path.expanduser(args.t5)
    if not os.path.isdir(t5):
        raise UserError(f"--t5 {args.t5!r} is not a folder; download a Hugging Face T5 folder "
                        "(google/flan-t5-xl: config.json, spiece.model, model.safetensors) and "
                        "pass its path")
    device = setup_device(args.device, tf32=False)  # the features are stored: full fp32 when fp32
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() \
            else "fp32"
    from text import TextEncoder
    encoder = TextEncoder.from_pretrained(t5, device, DTYPES[precision])
    name = os.path.basename(os.path.normpath(t5))  # normpath: flan-t5-xl/ would name nothing
    receipt = extract_features(encoder, captions, args.out, args.length, args.batch_size,
                               STORAGE[args.storage], data, name)
    if is_rank0():  # one summary, not one per process
        tokens = int(np.load(os.path.join(args.out, "lengths.npy")).sum())
        print(f"wrote {args.out}: {receipt.count} captions, {tokens} tokens "
              f"({tokens / receipt.count:.1f} per caption, N {receipt.length}) x "
              f"{receipt.d_model} {receipt.dtype} (encoder {name} {receipt.encoder_checksum[:12]}, "
              f"captions {receipt.captions_checksum[:12]})")


def extract_command(args):
    """`data.py extract`: check the flags, load the tokenizer, extract, report."""
    check_out_folder(args.out)  # before the tokenizer loads: an unwritable --out fails at once
    if args.crop_range is not None and not args.ten_crop:
        raise UserError("--crop-range only applies with --ten-crop; add --ten-crop or drop "
                        "--crop-range")
    if args.crop_range is not None and args.crop_range < 1:
        raise UserError(f"--crop-range must be >= 1 (the ten crops are taken inside it), got "
                        f"{args.crop_range}")
    if args.batch_size < 1 or args.num_workers < 0:
        raise UserError("--batch-size must be >= 1 and --num-workers >= 0")
    device = setup_device(args.device, tf32=False)  # codes are nearest-neighbour decisions
    if args.vq_ckpt:  # ours or an official release; the codes are made in float32 either way
        vq = VQModel.from_pretrained(args.vq_ckpt)
    else:
        torch.manual_seed(0)  # the same random weights in every process
        vq = VQModel(vq_config(args.vq_config))
    check_image_size(args.image_size, vq.config.downsample)
    receipt = extract_codes(vq, args.data, args.out, args.image_size, args.ten_crop,
                            args.crop_range or 1.1, args.batch_size, args.num_workers, device,
                            overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary, not one per process
        # the checksum's first 12 hex digits are what train.py and sample.py quote on a mismatch
        h, w = receipt.grid
        print(f"wrote {args.out}: {receipt.count} images x {receipt.n_aug} views x {h}x{w} codes "
              f"(vocab {receipt.vocab_size}, tokenizer {receipt.tokenizer_checksum[:12]})")


def main(argv=None):
    """preview, extract or features: the three things one does to a dataset before training."""
    args = get_args(argv)
    if args.command == "preview":
        if os.path.exists(args.out) and not args.overwrite:
            raise UserError(f"--out {args.out} already exists; pass --overwrite to replace it, "
                            "or choose another --out")
        if args.image_size < 8 or args.per_class < 1:
            raise UserError(f"--image-size must be >= 8 and --per-class >= 1, got "
                            f"{args.image_size} and {args.per_class}")
        preview(args.out, args.image_size, args.per_class, args.seed)
        print(f"wrote {args.out}: {', '.join(CLASS_NAMES)} (one row each)")
    elif args.command == "features":
        features_command(args)
    else:
        extract_command(args)


if __name__ == "__main__":
    cli(main)
