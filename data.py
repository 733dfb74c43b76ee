"""Images in, codes out: the embedded synthetic dataset, image folders, and code extraction.

Read top to bottom, in the order the data flows: SyntheticShapes, ten classes of coloured shapes
drawn on the fly so that every command runs with nothing downloaded; image folders in the ImageNet
layout with the two crops of the official recipe; the pixel rule (floats <-> uint8) and the PNG grid
that sample.py, the demo and the preview write; then the extraction of the tokenizer codes the GPT
trains on, the receipt that says how they were made, and CodesDataset that reads them back.

    python data.py preview --out shapes.png                     # synthetic examples by class
    python data.py extract --vq-ckpt vq_ds16_c2i.pt --data /imagenet/train --out codes/in256 \\
        --ten-crop
    torchrun --nproc_per_node 8 data.py extract ...             # the same, sharded over 8 GPUs
"""
import argparse
import dataclasses
import errno
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
from tqdm import tqdm

from common import UserError, cli, first_line, os_error_line, save_atomic, setup_device
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

# the extensions pytorch-fid's folder reader accepts
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff")


def _resize_shorter_side(pil, side):
    """Shorter side -> `side`: BOX-halve while it is at least twice `side`, then one BICUBIC resize.
    The halving is ADM's anti-aliasing (guided-diffusion's center_crop_arr, which LlamaGen copies):
    a single bicubic step from far above would alias."""
    while min(pil.size) >= 2 * side:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = side / min(pil.size)
    return pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)


def center_crop(pil_image, image_size):
    """The ADM centre crop LlamaGen uses for codes and FID (its center_crop_arr): shorter side to
    `image_size`, then the central square. Returns a PIL image of image_size x image_size."""
    pil = _resize_shorter_side(pil_image, image_size)
    x, y = (pil.size[0] - image_size) // 2, (pil.size[1] - image_size) // 2
    return pil.crop((x, y, x + image_size, y + image_size))


def random_resize_crop(pil_image, image_size, max_scale=1.25):
    """The tokenizer's training crop (LlamaGen dataset/augmentation.py, random_crop_arr):
    shorter side to a random size in [image_size, ceil(image_size * max_scale)], then a random
    square. Draws from torch's RNG, so the DataLoader's per-worker seeding makes it reproducible."""
    side = int(torch.randint(image_size, math.ceil(image_size * max_scale) + 1, ()))
    pil = _resize_shorter_side(pil_image, side)
    x = int(torch.randint(pil.size[0] - image_size + 1, ()))
    y = int(torch.randint(pil.size[1] - image_size + 1, ()))
    return pil.crop((x, y, x + image_size, y + image_size))


# what Pillow raises for a file it cannot decode: corrupt or cut short (OSError, SyntaxError,
# ValueError), empty or not an image (UnidentifiedImageError, an OSError), or a decompression bomb
# (a small file declaring billions of pixels)
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_image(path):
    """The project's one image reader (ImageFolder, fid.py's folders): the file decoded now, as
    RGB by to_rgb's rules. Raises one of UNREADABLE for a file that cannot be decoded."""
    with Image.open(path) as im:
        im.load()  # decode now: a truncated file fails here, not later in a crop
        return to_rgb(im)


def to_rgb(pil):
    """Any Pillow mode -> RGB. Transparent pixels are composited on white, the page colour such
    images (logos, product shots) were made to be seen on; dropping alpha instead would expose
    whatever colour happens to be stored under it. 16-bit grayscale is scaled to 8 bits rather than
    clipped at 255."""
    if pil.mode == "RGB":
        return pil
    transparent = pil.mode == "P" and "transparency" in pil.info
    if pil.mode in ("RGBA", "LA", "PA", "RGBa", "La") or transparent:
        rgba = pil.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if pil.mode in ("I", "F") or pil.mode.startswith("I;16"):
        a = np.asarray(pil, np.float64)
        a = a / 257 if a.max() > 255 else a  # 16-bit data (65535 -> 255)
        pil = Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8))
    return pil.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


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
    them, from `seed`), or an ImageNet-layout folder ("./synthetic" for a folder of that name; a
    bare "synthetic" with such a folder present is refused as ambiguous). `augment` and `flip`
    apply to folders; synthetic images are drawn at the final size, already varied in position,
    size and rotation (a random crop could cut the shape that defines the class out of the
    picture)."""
    spec = str(spec)
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
# Pictures: the pixel rule between floats and uint8, and the one PNG grid writer used by sample.py,
# the demo and the preview above

# The official evaluation's pixel rule, the one place it lives: decoder output (about [-1, 1], not
# clamped) -> optional bicubic resize -> clamp(127.5 x + 128) -> truncate to uint8. The order
# matters: LlamaGen's sample_c2i_ddp.py resizes its 384 px samples to 256 BEFORE clamping, so
# clamping first would give other pixels. The published FIDs were computed on exactly these bytes;
# every PNG, .npz and metric here goes through it. from_uint8 is its inverse on the 256 levels
# (127.5 x + 128 lands on the level + 0.5, so the round trip is exact).
def to_uint8(images, resize_to=None):
    """[B, 3, H, W] floats in [-1, 1] -> uint8 array [B, H, W, 3] (resized to resize_to first)."""
    x = images.detach().float()
    if resize_to and resize_to != x.shape[-1]:
        x = F.interpolate(x, size=(resize_to, resize_to), mode="bicubic")
    x = (127.5 * x + 128).clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(pixels):
    """uint8 pixels [..., H, W, 3] (an array, a tensor or an RGB PIL image) -> float32 tensor
    [..., 3, H, W] in [-1, 1]."""
    a = np.asarray(pixels.cpu() if torch.is_tensor(pixels) else pixels)
    channels_first = np.moveaxis(a, -1, -3).astype(np.float32, order="C")
    return torch.from_numpy(channels_first * (1 / 127.5) - 1)


def make_grid(images, nrow=8, pad=2, pad_value=0):
    """Tile [B, 3, H, W] images in [-1, 1] into one PIL image, `nrow` images per row, `pad` pixels
    apart (black by default; an empty slot at the end stays the padding colour)."""
    arr = to_uint8(images)  # the same bytes the .npz files and the metrics see
    b, h, w, _ = arr.shape
    nrow = max(1, min(nrow, b))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), pad_value, np.uint8)
    for i in range(b):
        y, x = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[y:y + h, x:x + w] = arr[i]
    return Image.fromarray(grid)


def save_grid(images, path, nrow=8):
    """Write a PNG grid of [B, 3, H, W] images in [-1, 1] (a list of [3, H, W] tensors works too);
    returns the PIL image."""
    if isinstance(images, (list, tuple)):
        images = torch.stack(list(images))
    grid = make_grid(images, nrow)
    # atomic, like every file written here: an interrupted run leaves the old PNG, not half one
    save_atomic(lambda f: grid.save(f, format="PNG"), path)
    return grid


# ------------------------------------------------------------------------------------------------
# Code extraction: the GPT trains on tokenizer codes computed once, not on pixels (paper 3.2)
#
# A codes folder holds codes.npy [N, n_aug, L] (uint16 while the codebook fits, else int32),
# labels.npy [N] and meta.json, the receipt of what made them (CodesReceipt). n_aug views per
# image: the original and its mirror image, or with ten_crop the 4 corners + centre of the image
# and of its mirror (the official extract_codes_c2i.py); training draws one view per access.
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
    n_aug: int  # views per image: 2 (image, mirror) or 10 (ten crops)
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
        keys = ("tokenizer_checksum", "vocab_size", "grid")
        if any(getattr(self, k) != getattr(other, k) for k in keys):
            raise UserError(f"the codes of {mine} come from another tokenizer ({self.describe()}) "
                            f"than those in {theirs} ({other.describe()}): extract codes with the "
                            f"tokenizer of {mine}, or start afresh")


def code_views(x, image_size, ten_crop=False):
    """[3, S, S] image -> [n_aug, 3, image_size, image_size] views: (x, mirror of x) with
    S == image_size, or the ten crops (top-left, top-right, bottom-left, bottom-right, centre; then
    the same of the mirror).

    Codes are computed once, so the data augmentation happens here instead of in the training
    loop: every view an epoch might draw is encoded ahead of time, and CodesDataset picks one."""
    if not ten_crop:
        return torch.stack([x, x.flip(-1)])
    h, w = x.shape[-2:]
    # the centre's offset rounds as torchvision's TenCrop does (the official extraction uses it)
    cy, cx = int(round((h - image_size) / 2)), int(round((w - image_size) / 2))
    corners = [(0, 0), (0, w - image_size), (h - image_size, 0), (h - image_size, w - image_size),
               (cy, cx)]
    return torch.stack([im[:, y:y + image_size, x0:x0 + image_size]
                        for im in (x, x.flip(-1)) for y, x0 in corners])


class _Views(torch.utils.data.Dataset):
    """A dataset's images as their code_views, so DataLoader workers cut the crops in parallel."""

    def __init__(self, base, image_size, ten_crop):
        self.base, self.image_size, self.ten_crop = base, image_size, ten_crop

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        x, label = self.base[index]
        return code_views(x, self.image_size, self.ten_crop), label


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
        vocab_size=vocab, grid=grid, image_size=image_size, n_aug=10 if ten_crop else 2,
        count=len(base), tokenizer_checksum=tokenizer_checksum(vq), ten_crop=ten_crop,
        crop_range=crop_range if ten_crop else None, codes_dtype=np.dtype(codes_dtype).name,
        labels_dtype=np.dtype(labels_dtype).name,
        data=data if isinstance(base, SyntheticShapes) else os.path.abspath(data),
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


def _rows_done(out, parts, progress_path, world, receipt):
    """How many rows of this rank's shard an earlier, interrupted run of the same command wrote.
    The shards' boundaries depend on the number of processes, so a run with another number cannot
    continue these parts: it is refused rather than left to write overlapping rows."""
    if os.path.isdir(parts):
        stale = [f for f in os.listdir(parts)
                 if f.startswith("progress-") and not f.endswith(f"-of-{world}.json")]
        if stale:
            raise UserError(f"{out} holds an unfinished extraction run with another number of "
                            f"processes ({stale[0]}); resume it with that many, or pass "
                            "--overwrite to start over")
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
    side = int(image_size * crop_range) if ten_crop else image_size
    base = image_dataset(data, side, augment="center", flip=False)
    vq = vq.to(device).eval()
    receipt = _receipt(vq, base, data, image_size, ten_crop, crop_range, device)
    if _finished(out, receipt, rank):
        return receipt
    parts, tag = os.path.join(out, "parts"), f"{rank}-of-{world}"
    progress_path = os.path.join(parts, f"progress-{tag}.json")
    lo, hi = receipt.count * rank // world, receipt.count * (rank + 1) // world  # this shard
    done = _rows_done(out, parts, progress_path, world, receipt)
    if done < hi - lo:
        os.makedirs(parts, exist_ok=True)
        # memory-mapped part files: "w+" creates a shard's arrays, "r+" reopens them on resume,
        # so rows already written stay and the rest of the shard is filled in place
        mode, length = "r+" if done else "w+", receipt.grid[0] * receipt.grid[1]
        codes = _open_part(os.path.join(parts, f"codes-{tag}.npy"), mode,
                           receipt.codes_dtype, (hi - lo, receipt.n_aug, length))
        labels = _open_part(os.path.join(parts, f"labels-{tag}.npy"), mode,
                            receipt.labels_dtype, (hi - lo,))
        rows = torch.utils.data.Subset(_Views(base, image_size, ten_crop), range(lo + done, hi))
        loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, num_workers=num_workers,
                                             pin_memory=str(device).startswith("cuda"))
        # the loader covers only the rows still missing, so a resumed run encodes nothing twice
        bar = tqdm(total=hi - lo, initial=done, unit="img", desc="codes", disable=rank != 0)
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
        del codes, labels
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

class CodesDataset(torch.utils.data.Dataset):
    """A codes folder for GPT training: item -> (codes int64 [L], label int64), one of the n_aug
    views drawn at random with torch's RNG (so the DataLoader's worker seeding governs it).

    vocab_size, grid (h or (h, w)) and tokenizer_checksum, when given, must match how the codes
    were made (`.receipt`). The arrays are memory-mapped lazily in each process (a worker forked
    or spawned gets a path, not a copy of the data)."""

    def __init__(self, folder, vocab_size=None, grid=None, tokenizer_checksum=None):
        folder = str(folder)
        fix = f"python data.py extract --vq-ckpt TOKENIZER.pt --data DATA --out {folder}"
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.isdir(folder):
            raise UserError(f"codes folder {folder!r} does not exist; make it with {fix}")
        if not os.path.exists(meta_path):
            if os.path.isdir(os.path.join(folder, "parts")):
                raise UserError(f"the code extraction into {folder!r} did not finish; "
                                "rerun the same extract command to resume it")
            raise UserError(f"{folder!r} holds no codes (no meta.json); make them with {fix}")
        self.receipt = receipt = CodesReceipt.from_dict(_read_json(meta_path), meta_path)
        if grid is not None:
            grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
        redo = f"re-extract the codes with the tokenizer you use ({fix})"
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
            if not same or not np.array_equal(p._arrays()[1], first._arrays()[1]):
                raise UserError(f"{p.folder} and {first.folder} do not hold codes of the same "
                                "images by the same tokenizer; extract both from one --data with "
                                "one tokenizer")

    def __len__(self):
        return len(self.parts[0])

    def __getitem__(self, index):
        return self.parts[int(torch.randint(len(self.parts), ()))][index]


def codes_dataset(spec):
    """The dataset behind the GPT's --data: one codes folder, or several joined by commas
    (MixedCodes). A real folder whose name holds a comma is one folder."""
    spec = str(spec)
    folders = [spec] if os.path.isdir(spec) else [f for f in spec.split(",") if f]
    if not folders:
        raise UserError(f"--data {spec!r} names no codes folder; pass one, or several separated "
                        "by commas")
    return CodesDataset(folders[0]) if len(folders) == 1 else MixedCodes(folders)


# ------------------------------------------------------------------------------------------------
# command line

def get_args(argv=None):
    """Two subcommands: `preview` draws the embedded dataset, `extract` makes a codes folder."""
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
                    "(root/<class>/<image>), 'synthetic' (10,000 images) or 'synthetic:N'; a "
                    "folder named synthetic is ./synthetic (a bare 'synthetic' beside such a "
                    "folder is refused as ambiguous)")
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
    return p.parse_args(argv)


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
    else:
        extract_command(args)


if __name__ == "__main__":
    cli(main)
