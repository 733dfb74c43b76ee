"""The datasets behind every --data flag: ImageNet-layout folders with the two crops of the official
recipe, the built-in worlds (shapes.py, scenes.py), and captioned images, whose captions captions_of
reads without decoding an image. Item: (float32 [3, S, S] in [-1, 1], label or caption)."""
import json
import math
import os
import warnings

import torch
from PIL import Image

from common import IMAGE_EXTENSIONS, UNREADABLE, UserError, first_line, from_uint8, read_image
from scenes import CaptionedScenes
from shapes import SyntheticShapes


# ------------------------------------------------------------- The two crops of the official recipe
def _resize_shorter_side(pil, side):
    """Shorter side -> `side`: BOX-halve while it is at least twice `side`, then one BICUBIC
    resize. The halving is ADM's anti-aliasing (guided-diffusion's center_crop_arr, which LlamaGen
    copies): a single bicubic step from far above would alias."""
    while min(pil.size) >= 2 * side:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = side / min(pil.size)  # rounded below as center_crop_arr: lands exactly on `side`
    return pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)


def center_crop(pil_image, image_size):
    """The ADM centre crop LlamaGen uses for codes and FID (its center_crop_arr): shorter side to
    `image_size`, then the central square (floored: an odd excess leaves its pixel right/bottom)."""
    pil = _resize_shorter_side(pil_image, image_size)
    x, y = (pil.size[0] - image_size) // 2, (pil.size[1] - image_size) // 2
    return pil.crop((x, y, x + image_size, y + image_size))


def random_resize_crop(pil_image, image_size, max_scale=1.25):
    """The tokenizer's training crop (LlamaGen's random_crop_arr): shorter side to a random size in
    [image_size, ceil(image_size * max_scale)], then a random square, by torch's seeded RNG."""
    side = int(torch.randint(image_size, math.ceil(image_size * max_scale) + 1, ()))
    pil = _resize_shorter_side(pil_image, side)
    x = int(torch.randint(pil.size[0] - image_size + 1, ()))
    y = int(torch.randint(pil.size[1] - image_size + 1, ()))
    return pil.crop((x, y, x + image_size, y + image_size))


def _check_augment(augment):
    if augment not in ("center", "random_resize_crop"):
        raise UserError(f"augment must be 'center' or 'random_resize_crop', got {augment!r}")


def crop(pil, image_size, augment, flip):
    """A decoded image -> float32 [3, S, S]: `augment`'s crop, then a random flip if `flip`."""
    x = from_uint8((center_crop if augment == "center" else random_resize_crop)(pil, image_size))
    return x.flip(-1) if flip and torch.rand(()) < 0.5 else x


# ---------------------------------------- Image folders (root/<class>/<image>) and the --data specs
class ImageFolder(torch.utils.data.Dataset):
    """Images under root/<class name>/ (any depth), classes numbered in sorted name order (as
    ImageNet's synsets); item -> (image, label). An undecodable file is replaced by the next
    readable one, counted in `.skipped` (per process), warned about once: never a crashed run."""

    def __init__(self, root, image_size, augment="center", flip=True):
        _check_augment(augment)
        root, spec = os.path.expanduser(str(root)), root
        if not os.path.isdir(root):
            raise UserError(f"data folder {root!r} does not exist; pass a folder with one "
                            "sub-folder per class (the ImageNet layout) or --data synthetic")
        self.classes = sorted(e.name for e in os.scandir(root)
                              if e.is_dir() and not e.name.startswith("."))
        # sorted at every level (a sharded extraction's rows on any filesystem); ._cat.jpg skipped
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
        self.spec = os.path.abspath(str(spec))
        self.num_classes, self.bad = len(self.classes), set()

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        """(RGB PIL image, label) of `index`, or of the next readable index."""
        for k in range(len(self.samples)):
            i = (index + k) % len(self.samples)
            if i in self.bad:  # known unreadable: not opened (nor warned about) again
                continue
            path, label = self.samples[i]
            try:
                return read_image(path), label
            except UNREADABLE as e:
                if not self.bad:
                    warnings.warn(f"unreadable image {path} ({e}); substituting the next readable "
                                  "one and counting the rest silently in ImageFolder.skipped",
                                  stacklevel=2)
                self.bad.add(i)  # per process: each DataLoader worker meets its bad files
        raise UserError(f"none of the {len(self.samples)} images under {self.root!r} can be read")

    @property
    def skipped(self):
        return len(self.bad)

    def __getitem__(self, index):
        pil, label = self.load(index)
        return crop(pil, self.image_size, self.augment, self.flip), label


def image_dataset(spec, image_size, augment="center", flip=True, seed=0, heldout=True):
    """The dataset of a --data spec: "synthetic[:N]" (SyntheticShapes from `seed`, N 10,000), an
    ImageNet-layout folder ("./synthetic" for one of that name), a caption spec as Captioned, or
    specs joined by "+" (Joined). `augment` and `flip` apply to folders only, `heldout` to
    scenes."""
    spec = str(spec)
    if "+" in spec and not os.path.isdir(spec):  # a real folder named a+b is one folder
        return Joined([image_dataset(part, image_size, augment, flip, seed, heldout)
                       for part in spec.split("+")], spec)
    if spec.startswith(("captions:", "coco:", "scenes:")) or spec == "scenes":  # captioned images
        return Captioned(caption_dataset(spec, image_size, augment, flip, seed, heldout))
    if spec == "synthetic" or spec.startswith("synthetic:"):
        if os.path.isdir(spec):  # a real folder of that name: neither reading may be guessed
            raise UserError(f"--data {spec!r} is ambiguous: a folder of that name is here too; "
                            f"write ./{spec} for the folder, or synthetic:N (e.g. synthetic:10000)"
                            " for the built-in shapes")
        n = spec.partition(":")[2] or "10000"
        if not n.isdigit() or int(n) < 1:
            raise UserError(f"--data {spec!r}: write synthetic:N with N a positive number of "
                            "images, e.g. synthetic:5000")
        ds = SyntheticShapes(int(n), image_size, seed)
        ds.spec = spec  # as typed; a folder's is its absolute path: receipts compare them
        return ds
    return ImageFolder(spec, image_size, augment, flip)


class Joined(torch.utils.data.ConcatDataset):
    """"A+B": several datasets in one, for a tokenizer that serves them all (the demo trains one VQ
    on both of its worlds). Labels are dropped (item -> (image, 0)): a tokenizer reads none."""
    num_classes, classes = 1, ("joined",)

    def __init__(self, parts, spec):
        super().__init__(parts)
        self.spec = spec

    def __getitem__(self, index):
        return super().__getitem__(index)[0], 0


def code_views(x, image_size, ten_crop=False, mirror=True):
    """[3, S, S] image -> [n_aug, 3, image_size, image_size], the views whose codes are extracted
    once (augmentation free in training): (x, its mirror), x alone (mirror=False), or the ten crops
    of extract_codes_c2i.py (4 corners and centre, then the same of the mirror)."""
    if not ten_crop:
        return torch.stack([x, x.flip(-1)]) if mirror else x[None]
    h, w = x.shape[-2:]
    # the centre's offset rounds as torchvision's TenCrop does (the official extraction uses it)
    cy, cx = int(round((h - image_size) / 2)), int(round((w - image_size) / 2))
    corners = [(0, 0), (0, w - image_size), (h - image_size, 0), (h - image_size, w - image_size),
               (cy, cx)]
    return torch.stack([im[:, y:y + image_size, x0:x0 + image_size]
                        for im in (x, x.flip(-1)) for y, x0 in corners])


class CodeViews(torch.utils.data.Dataset):
    """A dataset's items as (code_views, label), so that DataLoader workers cut the crops."""

    def __init__(self, base, image_size, ten_crop, mirror):
        self.base, self.args = base, (image_size, ten_crop, mirror)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        x, label = self.base[index]
        return code_views(x, *self.args), label


def check_image_size(image_size, downsample, flag="--image-size"):
    """One line unless `image_size` is a positive multiple of the tokenizer's downsampling factor:
    the encoder floors each halving (30 px through VQ-tiny's 4 would code a 28 px crop silently)."""
    if image_size >= downsample and image_size % downsample == 0:
        return
    below = image_size // downsample * downsample
    sizes = " or ".join(str(n) for n in (below, below + downsample) if n > 0) or str(downsample)
    raise UserError(f"{flag} {image_size} is not a multiple of the tokenizer's downsampling "
                    f"factor {downsample}; use {sizes}")


# ----------- Captioned images: a Dataset of (image, caption str) with `.spec` (how --data names it)
def _read_caption(path, image):
    """The caption file of `image`, every run of white space (line breaks too) one space."""
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
    """(image file, caption) pairs -> (image, caption), no flip by default (a caption may say "left
    of"); an undecodable image is an error, not a substitute that would carry this caption."""

    def __init__(self, samples, image_size, augment="center", flip=False, spec=""):
        _check_augment(augment)
        self.samples, self.image_size, self.augment, self.flip = samples, image_size, augment, flip
        self.spec, self.captions = spec, [caption for _, caption in samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, caption = self.samples[index]
        try:
            pil = read_image(path)
        except UNREADABLE as e:
            raise UserError(f"unreadable image {path} ({first_line(e)}); remove it and its "
                            "caption, then extract into a new folder") from None
        return crop(pil, self.image_size, self.augment, self.flip), caption


def caption_folder(root, image_size, augment="center", flip=False):
    """Images anywhere under `root` (sorted), each with a same-stem .txt caption, else an error."""
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
    """A COCO captions file: one item per captioned image, in the order of "images", with the list
    of its captions (joint training draws one per access, frozen features take the first)."""
    annotations = os.path.abspath(os.path.expanduser(annotations))
    images_dir = os.path.abspath(os.path.expanduser(images_dir))
    try:
        with open(annotations, encoding="utf-8") as f:
            raw = json.load(f)
        ids = [im["id"] for im in raw["images"]]
        names = dict(zip(ids, (im["file_name"] for im in raw["images"])))
        every = {}
        for a in raw["annotations"]:
            if not isinstance(a["caption"], str):  # the wrong file: the layout message below
                raise TypeError("caption")
            # white space normalised as in _read_caption (COCO's captions carry stray spaces)
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
        raise UserError(f"{annotations}: not a COCO captions file; it needs 'images' [{{id, "
                        "file_name}] and 'annotations' [{image_id, caption}], as "
                        "captions_train2017.json has") from None
    if not os.path.isdir(images_dir):
        raise UserError(f"COCO image folder {images_dir!r} does not exist; write "
                        "coco:ANNOTATIONS.json:IMAGES_DIR")
    if len(names) < len(ids):  # one image would be lost, another would take its captions
        twice = next(a for a, b in zip(sorted(ids), sorted(ids)[1:]) if a == b)
        raise UserError(f"{annotations}: image id {twice} is listed twice in 'images'; fix it")
    samples = [(os.path.join(images_dir, str(name)), every[i]) for i, name in names.items()
               if i in every]
    if (empty := next((i for i in names if "" in every.get(i, ())), None)) is not None:
        raise UserError(f"{annotations}: image {empty} has an empty caption; fix the file")
    if missing := [path for path, _ in samples if not os.path.isfile(path)]:
        raise UserError(f"{missing[0]} (named in {os.path.basename(annotations)}) does not exist"
                        f"{f', nor {len(missing) - 1} more' if len(missing) > 1 else ''}; is "
                        f"{images_dir} the image folder of these annotations?")
    if not samples:
        raise UserError(f"{annotations}: no image has a caption")
    return CaptionedImages(samples, image_size, augment, flip,
                           spec=f"coco:{annotations}:{images_dir}")


def caption_dataset(spec, image_size, augment="center", flip=False, seed=0, heldout=True):
    """The captioned dataset of a spec: "scenes[:N]" (scenes.CaptionedScenes, N 10,000, without
    the held-out pairs unless heldout=False), "coco:ANN.json:IMAGES" or "[captions:]DIR"
    (same-stem .txt captions); `.spec` normalised (absolute paths, no leading zeros: receipts
    compare them)."""
    spec = str(spec)
    if spec == "scenes" or spec.startswith("scenes:"):
        n = spec.partition(":")[2] or "10000"
        if not n.isdigit() or int(n) < 1:
            raise UserError(f"--data {spec!r}: write scenes:N with N a positive number of scenes, "
                            "e.g. scenes:2000")
        ds = CaptionedScenes(int(n), image_size, seed, heldout)
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
    """Every caption of a caption_dataset (or its Captioned view) in item order, no image read."""
    dataset = getattr(dataset, "base", dataset)
    return (list(dataset.captions) if hasattr(dataset, "captions") else
            [dataset.caption(i) for i in range(len(dataset))])


class Captioned(torch.utils.data.Dataset):
    """A caption dataset as a labelled one (extraction, tokenizer training): item -> (image, 0)."""
    num_classes, classes = 1, ("captioned",)

    def __init__(self, base):
        self.base, self.spec = base, base.spec

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        return self.base[index][0], 0
