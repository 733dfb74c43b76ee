"""Images in, codes out: the embedded synthetic dataset, image folders, and code extraction.

Read top to bottom: the picture helpers every script shares (PNG grids); SyntheticShapes, ten classes of
coloured shapes drawn on the fly so every command runs with nothing downloaded; image folders in the
ImageNet layout with the ADM centre crop and the tokenizer's random crop (REFERENCE 2, 6); then the
extraction of tokenizer codes that the GPT trains on, and CodesDataset that reads them back.

    python data.py preview --out shapes.png                                   # synthetic examples by class
    python data.py extract --vq-ckpt vq_ds16_c2i.pt --data /imagenet/train --out codes/in256 --ten-crop
    torchrun --nproc_per_node 8 data.py extract ...                           # the same, sharded over 8 GPUs
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from common import UserError, cli, pick_device, save_atomic


# ----------------------------------------------------------------------------------------------------------
# Pictures: tensors <-> PIL, and the one PNG grid writer used by sample.py, the demo and the previews below

# The official evaluation's pixel rule, the one place it lives: decoder output (about [-1, 1], not
# clamped) -> optional bicubic resize -> clamp(127.5 x + 128) -> truncate to uint8. The order matters:
# LlamaGen's sample_c2i_ddp.py resizes its 384 px samples to 256 BEFORE clamping, so clamping first
# would give other pixels. The published FIDs were computed on exactly these bytes; every PNG, .npz and
# metric here goes through it. from_uint8 is its inverse on the 256 levels (127.5 x + 128 lands on the
# level + 0.5, so the round trip is exact).
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
    return torch.from_numpy(np.moveaxis(a, -1, -3).astype(np.float32, order="C") * (1 / 127.5) - 1)


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
    save_atomic(lambda f: grid.save(f, format="PNG"), path)
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
        rng = np.random.default_rng([self.seed, index])
        label = index % self.num_classes
        colour = tuple(int(c) for c in np.clip(_COLOURS[label] + rng.uniform(-15, 15, size=3), 0, 255))
        bg = _background(self.image_size, rng)
        mask = _draw_mask(label, self.image_size, rng)
        img = Image.composite(Image.new("RGB", bg.size, colour), bg, mask)  # alpha = anti-aliased coverage
        return from_uint8(img), label


def preview(out, image_size=64, per_class=8, seed=0):
    """A PNG with one row per class: a quick visual check of SyntheticShapes."""
    ds = SyntheticShapes(per_class * 10, image_size, seed)
    order = sorted(range(len(ds)), key=lambda i: (i % 10, i))
    return save_grid([ds[i][0] for i in order], out, nrow=per_class)


# ----------------------------------------------------------------------------------------------------------
# Image folders (the ImageNet layout: root/<class>/<image>) and the two crops of the official recipe

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff")  # pytorch-fid's


def _resize_shorter_side(pil, side):
    """Shorter side -> `side`: BOX-halve while it is at least twice `side`, then one BICUBIC resize. The
    halving is ADM's anti-aliasing: a single bicubic step from far above would alias (REFERENCE 6)."""
    while min(pil.size) >= 2 * side:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = side / min(pil.size)
    return pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)


def center_crop_arr(pil_image, image_size):
    """The ADM centre crop used by LlamaGen for codes and FID: shorter side to `image_size`, then the
    central square. Returns a PIL image of image_size x image_size (np.asarray it for an array)."""
    pil = _resize_shorter_side(pil_image, image_size)
    x, y = (pil.size[0] - image_size) // 2, (pil.size[1] - image_size) // 2
    return pil.crop((x, y, x + image_size, y + image_size))


def random_resize_crop(pil_image, image_size, max_scale=1.25):
    """The tokenizer's training crop (REFERENCE 2): shorter side to a random size in
    [image_size, ceil(image_size * max_scale)], then a random square. Draws from torch's RNG, so the
    DataLoader's per-worker seeding makes it reproducible."""
    side = int(torch.randint(image_size, math.ceil(image_size * max_scale) + 1, ()))
    pil = _resize_shorter_side(pil_image, side)
    x = int(torch.randint(pil.size[0] - image_size + 1, ()))
    y = int(torch.randint(pil.size[1] - image_size + 1, ()))
    return pil.crop((x, y, x + image_size, y + image_size))


def to_rgb(pil):
    """Any Pillow mode -> RGB. Transparent pixels are composited on white, the page colour such images
    (logos, product shots) were made to be seen on; dropping alpha instead would expose whatever colour
    happens to be stored under it. 16-bit grayscale is scaled to 8 bits rather than clipped at 255."""
    if pil.mode == "RGB":
        return pil
    if pil.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (pil.mode == "P" and "transparency" in pil.info):
        rgba = pil.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if pil.mode in ("I", "F") or pil.mode.startswith("I;16"):
        a = np.asarray(pil, np.float64)
        a = a / 257 if a.max() > 255 else a  # 16-bit data (65535 -> 255)
        pil = Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8))
    return pil.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


class ImageFolder(torch.utils.data.Dataset):
    """Images under root/<class name>/ (any depth), classes numbered in sorted name order, as ImageNet's
    synsets are. Item -> (image float32 [3, image_size, image_size] in [-1, 1], label int).

    augment: "center" (the ADM centre crop) or "random_resize_crop" (the tokenizer's); flip: a random
    horizontal flip with probability 1/2. Indexing lists file names only; images are decoded when read, and
    a file that cannot be decoded (corrupt, truncated, not an image) is replaced by
    the next readable index, counted in `.skipped` (per process: each DataLoader worker keeps its own) and
    reported by one warning per process, so a bad file costs one substitute image, never a crashed run."""

    def __init__(self, root, image_size, augment="center", flip=True):
        if augment not in ("center", "random_resize_crop"):
            raise UserError(f"augment must be 'center' or 'random_resize_crop', got {augment!r}")
        root = os.path.expanduser(str(root))
        if not os.path.isdir(root):
            raise UserError(f"data folder {root!r} does not exist; pass a folder with one sub-folder per class "
                            "(the ImageNet layout) or --data synthetic")
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        self.samples = []
        for label, name in enumerate(self.classes):
            for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
                self.samples += [(os.path.join(folder, f), label) for f in sorted(files)
                                 if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        if not self.samples:
            loose = any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(root))
            raise UserError(f"no images in class sub-folders of {root!r}" + (
                "; the images sit directly in it: move them into one sub-folder per class" if loose else
                f"; expected {root}/<class>/<image>{{{','.join(IMAGE_EXTENSIONS)}}}"))
        self.root, self.image_size, self.augment, self.flip = root, image_size, augment, flip
        self.num_classes = len(self.classes)
        self.bad = set()

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        """(RGB PIL image, label) of `index`, or of the next readable index if it cannot be decoded."""
        for k in range(len(self.samples)):
            i = (index + k) % len(self.samples)
            if i in self.bad:
                continue
            path, label = self.samples[i]
            try:
                with Image.open(path) as im:
                    im.load()  # decode now: a truncated file fails here, inside the try
                    return to_rgb(im), label
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                if not self.bad:
                    warnings.warn(f"unreadable image {path} ({e}); substituting the next readable one and "
                                  f"counting the rest silently in ImageFolder.skipped", stacklevel=2)
                self.bad.add(i)
        raise UserError(f"none of the {len(self.samples)} images under {self.root!r} can be read")

    @property
    def skipped(self):
        """How many files this process found unreadable (each is tried once, then always substituted)."""
        return len(self.bad)

    def __getitem__(self, index):
        pil, label = self.load(index)
        crop = center_crop_arr if self.augment == "center" else random_resize_crop
        x = from_uint8(crop(pil, self.image_size))
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, label


def image_dataset(spec, image_size, augment="center", flip=True, seed=0):
    """The dataset behind a --data flag: "synthetic" (10,000 SyntheticShapes), "synthetic:N" (N of them,
    from `seed`), or an ImageNet-layout folder. `augment` and `flip` apply to folders; synthetic images
    are drawn at the final size, already varied in position, size and rotation (a random crop could cut
    the shape that defines the class out of the picture)."""
    spec = str(spec)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        n = spec.partition(":")[2] or "10000"
        if not n.isdigit() or int(n) < 1:
            raise UserError(f"--data {spec!r}: write synthetic:N with N a positive number of images, "
                            "e.g. synthetic:5000")
        return SyntheticShapes(int(n), image_size, seed)
    return ImageFolder(spec, image_size, augment, flip)


# ----------------------------------------------------------------------------------------------------------
# Code extraction: the GPT trains on tokenizer codes computed once, not on pixels (paper 3.2)
#
# A codes folder holds codes.npy [N, n_aug, L] (uint16 while the codebook fits, else int32), labels.npy [N]
# and meta.json, the receipt of what made them. n_aug views per image: the original and its mirror image,
# or with ten_crop the 4 corners + centre of the image and of its mirror (REFERENCE 6); training draws one
# view per access. Written as .npy files so that np.load(mmap_mode="r") pages in only the rows in use.

def code_views(x, image_size, ten_crop=False):
    """[3, S, S] image -> [n_aug, 3, image_size, image_size] views: (x, mirror of x) with S == image_size,
    or the ten crops (top-left, top-right, bottom-left, bottom-right, centre; then the same of the mirror)."""
    if not ten_crop:
        return torch.stack([x, x.flip(-1)])
    h, w = x.shape[-2:]
    cy, cx = int(round((h - image_size) / 2)), int(round((w - image_size) / 2))  # torchvision's rounding
    corners = [(0, 0), (0, w - image_size), (h - image_size, 0), (h - image_size, w - image_size), (cy, cx)]
    return torch.stack([im[:, y:y + image_size, x0:x0 + image_size]
                        for im in (x, x.flip(-1)) for y, x0 in corners])


class _Views(torch.utils.data.Dataset):
    def __init__(self, base, image_size, ten_crop):
        self.base, self.image_size, self.ten_crop = base, image_size, ten_crop

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        x, label = self.base[index]
        return code_views(x, self.image_size, self.ten_crop), label


def tokenizer_checksum(vq):
    """sha256 of a tokenizer's weights (its floating-point tensors, in key order): the same for a model
    whichever file it came from, so codes can be matched to the tokenizer that decodes them."""
    h = hashlib.sha256()
    for k, v in sorted(vq.state_dict().items()):
        if v.is_floating_point():
            h.update(f"{k}:{v.dtype}:{tuple(v.shape)};".encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _codebook_size(vq):
    return getattr(vq, "codebook_size", None) or vq.config.codebook_size


def _write_json(path, obj):
    save_atomic(lambda f: f.write(json.dumps(obj, indent=1).encode()), path)


def extract_codes(vq, data, out, image_size=256, ten_crop=False, crop_range=1.1, batch_size=64, num_workers=0,
                  device="cpu", max_batches=None):
    """Encode dataset `data` (an image_dataset spec) with tokenizer `vq` into the codes folder `out`;
    returns its meta dict.

    Images are ADM-centre-cropped to image_size (with ten_crop: to int(image_size * crop_range), then
    ten-cropped). Under torchrun each rank encodes a contiguous shard of the rows into its own part files;
    after every batch it flushes them and atomically records how many rows are done, so rerunning the same
    command after an interruption resumes where each rank stopped (with the same number of processes).
    Rank 0 then joins the parts and writes meta.json last: its presence means the folder is complete.
    `max_batches` stops after that many batches, as an interruption would (for tests)."""
    own_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    try:
        return _extract(vq, data, out, image_size, ten_crop, crop_range, batch_size, num_workers, device, max_batches)
    finally:
        if own_group:
            dist.destroy_process_group()


def _extract(vq, data, out, image_size, ten_crop, crop_range, batch_size, num_workers, device, max_batches):
    data, out = str(data), str(out)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    crop = int(image_size * crop_range) if ten_crop else image_size
    base = image_dataset(data, crop, augment="center", flip=False)
    vq = vq.to(device).eval()
    with torch.no_grad():
        grid = list(vq.encode(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1:])
    vocab, n, n_aug, length = _codebook_size(vq), len(base), 10 if ten_crop else 2, grid[0] * grid[1]
    codes_dtype = np.uint16 if vocab <= 2 ** 16 else np.int32  # 16,384 codes: 2 bytes each, not 8
    labels_dtype = np.int16 if base.num_classes <= 2 ** 15 else np.int64
    meta = dict(vocab_size=vocab, grid=grid, image_size=image_size, n_aug=n_aug, count=n,
                tokenizer_checksum=tokenizer_checksum(vq), ten_crop=ten_crop,
                crop_range=crop_range if ten_crop else None,
                codes_dtype=np.dtype(codes_dtype).name, labels_dtype=np.dtype(labels_dtype).name,
                data=data if isinstance(base, SyntheticShapes) else os.path.abspath(data),
                num_classes=base.num_classes, classes=list(base.classes))

    meta_path, parts = os.path.join(out, "meta.json"), os.path.join(out, "parts")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            found = json.load(f)
        if found != meta:
            key = next(k for k in meta if found.get(k) != meta[k])
            raise UserError(f"{out} already holds finished codes with {key}={found.get(key)!r} (this run: "
                            f"{meta[key]!r}); choose another --out or delete {out}")
        if rank == 0:
            shutil.rmtree(parts, ignore_errors=True)  # left over if a run stopped right after meta.json
            print(f"{out} already holds these codes; nothing to do")
        return meta
    tag = f"{rank}-of-{world}"
    if os.path.isdir(parts):
        stale = [f for f in os.listdir(parts) if f.startswith("progress-") and not f.endswith(f"-of-{world}.json")]
        if stale:
            raise UserError(f"{out} holds an unfinished extraction run with another number of processes "
                            f"({stale[0]}); resume it with that many, or delete {parts} to start over")
    progress_path = os.path.join(parts, f"progress-{tag}.json")
    lo, hi = n * rank // world, n * (rank + 1) // world
    done = 0
    if os.path.exists(progress_path):
        with open(progress_path) as f:
            progress = json.load(f)
        if progress["meta"] != meta:
            raise UserError(f"{out} holds an unfinished extraction with other settings (data, size, crops or "
                            f"tokenizer); rerun that command to finish it, or delete {parts} to start over")
        done = progress["done"]

    if done < hi - lo:
        os.makedirs(parts, exist_ok=True)
        mode = "r+" if done else "w+"
        codes = np.lib.format.open_memmap(os.path.join(parts, f"codes-{tag}.npy"), mode, codes_dtype,
                                          (hi - lo, n_aug, length))
        labels = np.lib.format.open_memmap(os.path.join(parts, f"labels-{tag}.npy"), mode, labels_dtype, (hi - lo,))
        rows = torch.utils.data.Subset(_Views(base, image_size, ten_crop), range(lo + done, hi))
        loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, num_workers=num_workers,
                                             pin_memory=str(device).startswith("cuda"))
        bar = tqdm(total=hi - lo, initial=done, unit="img", desc="codes", disable=rank != 0)
        for b, (views, y) in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                bar.close()
                return None
            with torch.no_grad():  # fp32: under bf16 a near-tie between two codes could flip
                c = vq.encode(views.flatten(0, 1).to(device, non_blocking=True)).view(len(y), n_aug, length)
            codes[done:done + len(y)] = c.cpu().numpy().astype(codes_dtype)
            labels[done:done + len(y)] = y.numpy().astype(labels_dtype)
            codes.flush()
            labels.flush()  # the rows reach the file before the progress that vouches for them
            done += len(y)
            _write_json(progress_path, dict(meta=meta, done=done))
            bar.update(len(y))
        bar.close()
        del codes, labels
    if world > 1:
        dist.barrier()
    if rank == 0:
        _join_parts(out, parts, world, meta)
    return meta


def _join_parts(out, parts, world, meta):
    """Parts -> codes.npy and labels.npy (a rename for one process), then meta.json, then no parts."""
    for name in ("codes", "labels"):
        dst = os.path.join(out, f"{name}.npy")
        if world == 1:
            src = os.path.join(parts, f"{name}-0-of-1.npy")
            if os.path.exists(src):  # absent when a previous run already moved it, then stopped
                os.replace(src, dst)
            continue
        srcs = [np.load(os.path.join(parts, f"{name}-{r}-of-{world}.npy"), mmap_mode="r") for r in range(world)]
        joined = np.lib.format.open_memmap(dst, "w+", srcs[0].dtype, (meta["count"], *srcs[0].shape[1:]))
        row = 0
        for src in srcs:
            for i in range(0, len(src), 65536):
                chunk = src[i:i + 65536]
                joined[row:row + len(chunk)] = chunk
                row += len(chunk)
        joined.flush()
        del joined
    _write_json(os.path.join(out, "meta.json"), meta)
    shutil.rmtree(parts, ignore_errors=True)


class CodesDataset(torch.utils.data.Dataset):
    """A codes folder for GPT training: item -> (codes int64 [L], label int64), one of the n_aug views
    drawn at random with torch's RNG (so the DataLoader's worker seeding governs it).

    vocab_size, grid (h or (h, w)) and tokenizer_checksum, when given, must match how the codes were made:
    codes from another tokenizer would train a GPT on tokens its decoder does not speak. The arrays are
    memory-mapped lazily in each process (a worker forked or spawned gets a path, not a copy of the data)."""

    def __init__(self, folder, vocab_size=None, grid=None, tokenizer_checksum=None):
        folder = str(folder)
        fix = f"python data.py extract --vq-ckpt TOKENIZER.pt --data DATA --out {folder}"
        if not os.path.isdir(folder):
            raise UserError(f"codes folder {folder!r} does not exist; make it with {fix}")
        if not os.path.exists(os.path.join(folder, "meta.json")):
            if os.path.isdir(os.path.join(folder, "parts")):
                raise UserError(f"the code extraction into {folder!r} did not finish; "
                                "rerun the same extract command to resume it")
            raise UserError(f"{folder!r} holds no codes (no meta.json); make them with {fix}")
        with open(os.path.join(folder, "meta.json")) as f:
            self.meta = json.load(f)
        m = self.meta
        if grid is not None:
            grid = [grid, grid] if isinstance(grid, int) else list(grid)
        redo = f"re-extract the codes with the tokenizer you use ({fix})"
        for what, want, have in (("vocab size", vocab_size, m["vocab_size"]), ("token grid", grid, m["grid"]),
                                 ("tokenizer checksum", tokenizer_checksum, m["tokenizer_checksum"])):
            if want is not None and want != have:
                raise UserError(f"codes in {folder} were made by a tokenizer with {what} {have}, but {want} "
                                f"is expected here; {redo}, or match the model to the codes")
        self.folder, self.num_classes = folder, m["num_classes"]
        self._codes = self._labels = None
        codes, labels = self._arrays()
        if codes.shape != (m["count"], m["n_aug"], m["grid"][0] * m["grid"][1]) or labels.shape != (m["count"],):
            raise UserError(f"{folder}: codes.npy {codes.shape} / labels.npy {labels.shape} disagree with "
                            f"meta.json; the folder is damaged, extract it again")

    def _arrays(self):
        if self._codes is None:
            try:
                self._codes = np.load(os.path.join(self.folder, "codes.npy"), mmap_mode="r")
                self._labels = np.load(os.path.join(self.folder, "labels.npy"), mmap_mode="r")
            except (OSError, ValueError) as e:
                raise UserError(f"{self.folder}: cannot read the codes ({e}); extract them again") from None
        return self._codes, self._labels

    def __getstate__(self):  # DataLoader workers reopen the memmaps instead of pickling their contents
        return {**self.__dict__, "_codes": None, "_labels": None}

    def __len__(self):
        return self.meta["count"]

    def __getitem__(self, index):
        codes, labels = self._arrays()
        view = int(torch.randint(self.meta["n_aug"], ()))
        return torch.from_numpy(codes[index, view].astype(np.int64)), torch.tensor(int(labels[index]))


class MixedCodes(torch.utils.data.Dataset):
    """Codes folders of the same images made with different crops: each access picks a folder uniformly at
    random, then one of its views. The official GPTs trained on ten crops at crop_range 1.1 and 1.05 mixed
    this way, half and half (REFERENCE 6)."""

    def __init__(self, folders):
        self.parts = [CodesDataset(f) for f in folders]
        self.meta, self.num_classes = self.parts[0].meta, self.parts[0].num_classes
        for p in self.parts[1:]:
            same = all(p.meta[k] == self.meta[k] for k in ("count", "vocab_size", "grid", "tokenizer_checksum"))
            if not same or not np.array_equal(p._arrays()[1], self.parts[0]._arrays()[1]):
                raise UserError(f"{p.folder} and {self.parts[0].folder} do not hold codes of the same images "
                                "by the same tokenizer; extract both from one --data with one tokenizer")

    def __len__(self):
        return len(self.parts[0])

    def __getitem__(self, index):
        return self.parts[int(torch.randint(len(self.parts), ()))][index]


def codes_dataset(spec):
    """The dataset behind the GPT's --data: one codes folder, or several joined by commas (MixedCodes)."""
    spec = str(spec)
    folders = [spec] if os.path.isdir(spec) else [f for f in spec.split(",") if f]  # a comma in a real path
    if not folders:
        raise UserError(f"--data {spec!r} names no codes folder; pass one, or several separated by commas")
    return CodesDataset(folders[0]) if len(folders) == 1 else MixedCodes(folders)


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

    ex = sub.add_parser("extract", help="encode a dataset into a codes folder for GPT training "
                        "(torchrun-sharded, resumable: rerun the same command after an interruption)")
    which = ex.add_mutually_exclusive_group(required=True)
    which.add_argument("--vq-ckpt", help="tokenizer checkpoint: ours or the official vq_ds16_c2i.pt / vq_ds8_c2i.pt")
    which.add_argument("--vq-config", help="a tokenizer config name with random weights (seed 0), for smoke tests")
    ex.add_argument("--data", required=True, help="an ImageNet-layout folder (root/<class>/<image>), "
                    "'synthetic' (10,000 images) or 'synthetic:N'")
    ex.add_argument("--out", required=True, help="codes folder to write (codes.npy, labels.npy, meta.json)")
    ex.add_argument("--image-size", type=int, default=256, help="image side fed to the tokenizer (default: 256)")
    ex.add_argument("--ten-crop", action="store_true", help="10 views per image (corners + centre of the image "
                    "and of its mirror) instead of 2 (the image and its mirror)")
    ex.add_argument("--crop-range", type=float, default=None, help="with --ten-crop: centre-crop to "
                    "int(image_size * crop_range) before the ten crops (default: 1.1; the paper also uses 1.05)")
    ex.add_argument("--batch-size", type=int, default=64, help="images per tokenizer call per process (default: 64)")
    ex.add_argument("--num-workers", type=int, default=4, help="DataLoader processes decoding images (default: 4)")
    ex.add_argument("--device", default="auto", help="cuda, mps or cpu (default: the best available)")
    args = p.parse_args(argv)

    if args.command == "preview":
        preview(args.out, args.image_size, args.per_class, args.seed)
        print(f"wrote {args.out}: {', '.join(CLASS_NAMES)} (one row each)")
    elif args.command == "extract":
        if args.crop_range is not None and not args.ten_crop:
            raise UserError("--crop-range only applies with --ten-crop; add --ten-crop or drop --crop-range")
        if args.crop_range is not None and args.crop_range < 1:
            raise UserError(f"--crop-range must be >= 1 (the ten crops are taken inside it), got {args.crop_range}")
        if args.batch_size < 1 or args.num_workers < 0:
            raise UserError("--batch-size must be >= 1 and --num-workers >= 0")
        device = pick_device(args.device)
        if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        import tokenizer  # only extraction needs it
        if args.vq_ckpt:
            vq = tokenizer.VQModel.from_pretrained(args.vq_ckpt)
        else:
            torch.manual_seed(0)  # the same random weights in every process
            vq = tokenizer.VQModel(tokenizer.vq_config(args.vq_config))
        meta = extract_codes(vq, args.data, args.out, args.image_size, args.ten_crop, args.crop_range or 1.1,
                             args.batch_size, args.num_workers, device)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"wrote {args.out}: {meta['count']} images x {meta['n_aug']} views x {meta['grid'][0]}x"
                  f"{meta['grid'][1]} codes (vocab {meta['vocab_size']}, tokenizer {meta['tokenizer_checksum'][:12]})")


if __name__ == "__main__":
    cli(main)
