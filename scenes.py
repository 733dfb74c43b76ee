"""A captioned world for text-to-image, and a compositional benchmark scored by an exact checker.

CaptionedScenes is the text-conditional sibling of data.SyntheticShapes: one to three bright objects
on the same dark background, each of a shape, colour, size and place drawn independently, and a
caption from a small grammar ("a large red circle at the top left", "a green square to the left of a
blue star", "three yellow triangles"). A few colour-shape pairs never occur in training scenes, so a
model can be asked for combinations it has never seen.

The benchmark follows GenEval (Ghosh et al. 2023): six tasks of prompts, each image right or wrong
by fixed rules, the score the mean of the task accuracies. GenEval finds objects with a detector and
names their colours with CLIP; here the world is known, so the checker reads the picture directly
(bright pixels on the dark background, connected components, template shapes, palette hues) and its
own error rate on true renders is measured (checker_accuracy) so that it cannot hide a model's.

    python scenes.py preview --out /tmp/scenes.png       # 4x-upscaled examples, captions printed
    python scenes.py check --per-task 200                # the checker's accuracy on renders
"""
import argparse
import functools
import math
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from common import UserError, cli
from data import _SHAPES, _SS, _background, _polygon, _star, save_grid

# --------------------------------------------------------------------------------------------------
# The world: palette, shapes, the held-out pairs and the words

# Six colours 40+ degrees apart in hue, each with a channel above 190 (the background stays below
# 90): blur mixes in the dark grey background, which lowers brightness and saturation but hardly
# moves hue, so hue alone names a colour even in a blurry sample. Orange and white were left out
# (orange sits between red and yellow; white fades into grey when blurred).
COLOURS = {"red": (245, 45, 45), "yellow": (250, 225, 35), "green": (45, 210, 60),
           "cyan": (35, 225, 230), "blue": (45, 95, 255), "magenta": (235, 45, 235)}


def _unit(points):
    """An outline recentred on its bounding box and scaled so its longer half-side is 1: an object's
    size is then the side of its box, whatever its shape, and its centre is its box centre (the
    centre GenEval compares)."""
    p = np.array(points, np.float64)
    lo, hi = p.min(0), p.max(0)
    p = (p - (lo + hi) / 2) / ((hi - lo).max() / 2)
    return [tuple(q) for q in p]


# Five bold shapes that survive a 4x-downsampling tokenizer at 8 px: upright (no rotation) so that
# the checker can match templates in the object's box. The star is fatter than data.py's (inner
# radius 0.55 of the outer) so its arms stay visible when small. None means a disk.
OUTLINES = {"circle": None, "square": _unit(_SHAPES["square"]),
            "triangle": _unit(_SHAPES["triangle"]), "star": _unit(_star(5, 0.55)),
            "cross": _unit(_SHAPES["plus"])}
SHAPES = tuple(OUTLINES)
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}

# Never in a training scene (heldout=True): three pairs with no colour and no shape twice, so every
# colour keeps four of its five shapes and every shape five of its six colours.
HELDOUT_PAIRS = (("red", "square"), ("blue", "triangle"), ("yellow", "star"))
ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
SEEN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)

SIZES = {"small": (9.0, 10.5), "large": (12.5, 14.0)}  # box side in px at 32 px (scaled)
NUMBERS = {1: "a", 2: "two", 3: "three"}
# GenEval's relation names; a caption writes "to the left of" for "left of"
RELATIONS = {"left of": "to the left of", "right of": "to the right of", "above": "above",
             "below": "below"}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
PLACES = (("at the top left", "at the top", "at the top right"),  # the 3x3 cells, row by row
          ("on the left", "in the middle", "on the right"),
          ("at the bottom left", "at the bottom", "at the bottom right"))

# Every word a caption or a benchmark prompt can use, for building a tokenizer: lower case, no
# punctuation
VOCABULARY = tuple(sorted(set(" ".join(
    [*NUMBERS.values(), *SIZES, *COLOURS, *SHAPES, *PLURALS.values(), "and", *RELATIONS.values(),
     *(p for row in PLACES for p in row)]).split())))


def _scale(image_size):
    return image_size / 32


# --------------------------------------------------------------------------------------------------
# Geometry: boxes, GenEval's relation rule, the non-overlapping layout

def relative_position(box_a, box_b, threshold=0.1, cut=0.5):
    """GenEval's rule for where box A lies relative to box B (boxes x0, y0, x1, y1; y down): the
    centre offset, shrunk on each axis by threshold x (side of A + side of B), divided by the
    offset's length; a component beyond `cut` names a relation. Returns a set of "left of", "right
    of", "above", "below" (empty when the boxes nearly share a centre; a diagonal offset can give
    two)."""
    a, b = np.asarray(box_a, np.float64), np.asarray(box_b, np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    names = [("left of", dx < -cut), ("right of", dx > cut),
             ("above", dy < -cut), ("below", dy > cut)]
    return {name for name, holds in names if holds}


def _clear_relations(box_a, box_b):
    """The relations a caption may claim: those that hold with twice GenEval's margin and a stricter
    cut, so a render (or a good sample) whose boxes are a pixel off still passes the checker's
    rule."""
    return relative_position(box_a, box_b, threshold=0.2, cut=0.6)


def _half_extent(shape):
    if OUTLINES[shape] is None:
        return 1.0, 1.0
    p = np.array(OUTLINES[shape])
    return tuple(float(v) for v in np.abs(p).max(0))


_HALF = {s: _half_extent(s) for s in SHAPES}


def _layout(objects, image_size, rng, tries=30):
    """Give each object (shape, colour, size word) a box side, a 3x3 cell of its own and a centre
    inside that cell (1 px from its edges, so the cell is unambiguous), its box at least 2 px from
    every other box and 1 px from the border. Returns False when this draw of sides and cells does
    not fit (two large objects side by side in one row of a 32 px image cannot), and the caller
    draws again. Plain Python floats: this runs for every training image, and numpy's per-call
    overhead dominated it."""
    s = _scale(image_size)
    cell, gap, border = image_size / 3, 2 * s, 1 * s
    placed, used = [], set()
    for obj in objects:
        lo_side, hi_side = SIZES[obj["size"]]
        side = s * (lo_side + (hi_side - lo_side) * rng.random())
        hx, hy = (side / 2 * e for e in _HALF[obj["shape"]])
        ranges = []  # the free cells this object fits in, with the interval of centres there
        for c in range(9):
            row, col = divmod(c, 3)
            x0 = max(col * cell + s, hx + border)
            x1 = min((col + 1) * cell - s, image_size - hx - border)
            y0 = max(row * cell + s, hy + border)
            y1 = min((row + 1) * cell - s, image_size - hy - border)
            if c not in used and x0 <= x1 and y0 <= y1:
                ranges.append((row, col, x0, x1, y0, y1))
        for _ in range(tries if ranges else 0):
            row, col, x0, x1, y0, y1 = ranges[int(rng.random() * len(ranges))]
            cx, cy = x0 + (x1 - x0) * rng.random(), y0 + (y1 - y0) * rng.random()
            box = (cx - hx, cy - hy, cx + hx, cy + hy)
            if all(max(box[0] - o["box"][2], o["box"][0] - box[2],
                       box[1] - o["box"][3], o["box"][1] - box[3]) >= gap for o in placed):
                obj.update(cell=(row, col), centre=(cx, cy), box=box, side=side)
                placed.append(obj)
                used.add(row * 3 + col)
                break
        else:
            return False
    return True


def _new_object(shape, colour, size, rng):
    """An object before layout; its colour shade is jittered +-15 per channel, as in
    SyntheticShapes."""
    rgb = tuple(min(max(int(v + 30 * rng.random() - 15), 0), 255) for v in COLOURS[colour])
    return {"shape": shape, "colour": colour, "size": size, "rgb": rgb}


def _arrange(pairs, image_size, rng, sizes=None):
    """Objects for (colour, shape) pairs with random sizes (or the given ones), laid out without
    overlap; draws again until the layout fits (a few draws at most, see _layout)."""
    for _ in range(200):
        objs = [_new_object(s, c, sizes[k] if sizes else ("small", "large")[rng.random() < 0.5],
                            rng) for k, (c, s) in enumerate(pairs)]
        if _layout(objs, image_size, rng):
            return objs
    raise RuntimeError(f"no layout found for {pairs} at {image_size} px")  # not reached at >= 24 px


# --------------------------------------------------------------------------------------------------
# Drawing: the shapes are drawn at 4x and box-filtered down, as in SyntheticShapes

def render(objects, image_size=32, rng=None):
    """Scene (a list of objects with "shape", "rgb", "centre", "side") -> RGB PIL image on the
    SyntheticShapes background drawn from `rng`."""
    return Image.fromarray(_render_array(objects, image_size, rng))


def _render_array(objects, image_size, rng=None):
    """render() as a uint8 [H, W, 3] array. The objects do not overlap, so they are all drawn into
    one 4x RGBA layer; Pillow's box reduction of it gives each pixel its colour and its coverage
    (alpha), and one blend puts them on the background."""
    rng = np.random.default_rng(0) if rng is None else rng
    bg = np.asarray(_background(image_size, rng), np.float32)
    big = image_size * _SS
    layer = Image.new("RGBA", (big, big))
    draw = ImageDraw.Draw(layer)
    for o in objects:
        cx, cy = o["centre"]
        r = o["side"] / 2
        if OUTLINES[o["shape"]] is None:
            draw.ellipse([_SS * (cx - r), _SS * (cy - r), _SS * (cx + r), _SS * (cy + r)],
                         fill=(*o["rgb"], 255))
        else:
            draw.polygon(_polygon(OUTLINES[o["shape"]], 0.0, r, cx, cy), fill=(*o["rgb"], 255))
    fg = np.asarray(layer.reduce(_SS), np.float32)
    alpha = fg[..., 3:] / 255
    return np.clip(bg * (1 - alpha) + fg[..., :3] * alpha + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Captions: a small grammar over the scene

def _phrase(obj, colour=True, size=False, count=1):
    """'a large red circle', 'two green crosses', 'a star'."""
    words = [NUMBERS[count]] + ([obj["size"]] if size else []) + ([obj["colour"]] if colour else [])
    return " ".join(words + [obj["shape"] if count == 1 else PLURALS[obj["shape"]]])


def _scene_and_caption(rng, image_size, pairs):
    """One scene and its caption. The kind of scene is drawn first (one object 30%, two 40%, three
    10%, a group of two or three alike 20%), then which attributes the caption names: colours are
    left out one time in four (the benchmark asks for "a circle" and "a circle and a square"), sizes
    are named three times in ten, a lone object's place half the time, a relation between two
    objects half the time when one clearly holds; everything a caption names is true of its
    scene."""
    kind = rng.choice(4, p=[0.3, 0.4, 0.1, 0.2])
    with_colour, with_size = rng.random() < 0.75, rng.random() < 0.3
    if kind == 3:  # a group: "three yellow triangles"
        pair = pairs[rng.integers(len(pairs))]
        objs = _arrange([pair] * int(rng.integers(2, 4)), image_size, rng)
        same_size = len({o["size"] for o in objs}) == 1
        return objs, _phrase(objs[0], with_colour, with_size and same_size, len(objs))
    n = int(kind) + 1
    objs = _arrange([pairs[k] for k in rng.choice(len(pairs), n, replace=False)], image_size, rng)
    if n == 1:
        words = _phrase(objs[0], with_colour, with_size)
        if rng.random() < 0.5:
            words += " " + PLACES[objs[0]["cell"][0]][objs[0]["cell"][1]]
        return objs, words
    if len({o["shape"] for o in objs}) < n:  # "a star to the right of a star" would say nothing
        with_colour = True
    order = [int(k) for k in rng.permutation(n)]
    if n == 2 and rng.random() < 0.5:
        a, b = objs[order[0]], objs[order[1]]
        clear = sorted(_clear_relations(a["box"], b["box"]))
        if clear:
            rel = clear[rng.integers(len(clear))]
            return objs, (f"{_phrase(a, with_colour, with_size)} {RELATIONS[rel]} "
                          f"{_phrase(b, with_colour, with_size)}")
    return objs, " and ".join(_phrase(objs[k], with_colour, with_size) for k in order)


class CaptionedScenes(torch.utils.data.Dataset):
    """`num_images` captioned scenes; item i -> (image float32 [3, H, W] in [-1, 1], caption str).

    Item i is a pure function of (seed, i), as in SyntheticShapes. scene(i) is its truth: a list of
    objects, each a dict with shape, colour (a COLOURS name), size ("small"/"large"), rgb (the
    jittered shade drawn), cell ((row, column) of the 3x3 layout), centre ((x, y) in pixels), side
    (box side in pixels) and box ((x0, y0, x1, y1)). With heldout=True no scene contains a
    HELDOUT_PAIRS pair."""

    def __init__(self, num_images, image_size=32, seed=0, heldout=True):
        if num_images < 1 or image_size < 24:
            raise UserError(f"CaptionedScenes needs num_images >= 1 and image_size >= 24 (objects "
                            f"are 9 px and up at 32), got {num_images} and {image_size}")
        self.num_images, self.image_size, self.seed = int(num_images), int(image_size), int(seed)
        self.heldout = bool(heldout)
        self.pairs = SEEN_PAIRS if heldout else ALL_PAIRS

    def __len__(self):
        return self.num_images

    def _draw(self, index):
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} scenes")
        rng = np.random.default_rng([self.seed, index])
        objs, caption = _scene_and_caption(rng, self.image_size, self.pairs)
        return objs, caption, rng  # the rng goes on to draw the background

    def scene(self, index):
        return self._draw(index)[0]

    def caption(self, index):
        return self._draw(index)[1]

    def __getitem__(self, index):
        objs, caption, rng = self._draw(index)
        a = _render_array(objs, self.image_size, rng)  # data.from_uint8's scaling, no PIL trip
        x = np.ascontiguousarray(a.transpose(2, 0, 1)) * np.float32(1 / 127.5) - 1
        return torch.from_numpy(x), caption


# --------------------------------------------------------------------------------------------------
# The benchmark: GenEval's six tasks over this world

TASKS = ("single_object", "two_objects", "counting", "colours", "position", "colour_attribution")


def benchmark_prompts(per_task, seed=0):
    """`per_task` prompts for each of TASKS, a pure function of (per_task, seed). Each is a dict:
    task, prompt, spec (what check() needs) and heldout (whether the prompt names a held-out pair).

    A spec is GenEval's metadata: "include", a list of requirements {shape, count, colour
    (optional), position (optional: [relation, index of an earlier requirement])}, and "exclude",
    requirements {shape, count} that must NOT be met. The tasks: single_object "a circle";
    two_objects "a circle and a square"; counting "three red circles" (exactly three circles, all
    red); colours "a red circle"; position "a red circle above a blue square"; colour_attribution "a
    red circle and a blue square". The four tasks that name colour-shape pairs alternate seen and
    held-out prompts (a held-out prompt names one held-out pair, the other object being seen); the
    two others name none."""
    if per_task < 1:
        raise UserError(f"benchmark_prompts needs per_task >= 1, got {per_task}")
    out = []
    for t, task in enumerate(TASKS):
        rng = np.random.default_rng([seed, t])
        for k in range(per_task):
            held = task in ("counting", "colours", "position", "colour_attribution") and k % 2 == 1
            out.append({"task": task, "heldout": held, **_prompt(task, held, k, rng)})
    return out


def _pick(pool, rng):
    return pool[rng.integers(len(pool))]


def _prompt(task, held, k, rng):
    """One prompt and spec of `task`."""
    if task == "single_object":
        shape = SHAPES[k % len(SHAPES)]  # every shape equally often
        return {"prompt": f"a {shape}", "spec": {"include": [{"shape": shape, "count": 1}]}}
    if task == "two_objects":
        a, b = rng.choice(SHAPES, 2, replace=False)
        return {"prompt": f"a {a} and a {b}",
                "spec": {"include": [{"shape": str(a), "count": 1}, {"shape": str(b), "count": 1}]}}
    first = _pick(HELDOUT_PAIRS if held else SEEN_PAIRS, rng)
    if task in ("counting", "colours"):
        (colour, shape), n = first, (1 if task == "colours" else int(rng.integers(2, 4)))
        spec = {"include": [{"shape": shape, "count": n, "colour": colour}]}
        if task == "counting":  # exactly n: GenEval's exclusion of n + 1
            spec["exclude"] = [{"shape": shape, "count": n + 1}]
        noun = PLURALS[shape] if n > 1 else shape
        return {"prompt": f"{NUMBERS[n]} {colour} {noun}", "spec": spec}
    other = _pick([p for p in SEEN_PAIRS if p[0] != first[0] and p[1] != first[1]], rng)
    (ca, sa), (cb, sb) = (first, other) if rng.random() < 0.5 else (other, first)
    req_b = {"shape": sb, "count": 1, "colour": cb}
    if task == "position":  # "A rel B": B is requirement 0, A must stand in `rel` to it
        rel = _pick(list(RELATIONS), rng)
        return {"prompt": f"a {ca} {sa} {RELATIONS[rel]} a {cb} {sb}",
                "spec": {"include": [req_b, {"shape": sa, "count": 1, "colour": ca,
                                             "position": [rel, 0]}]}}
    return {"prompt": f"a {ca} {sa} and a {cb} {sb}",
            "spec": {"include": [{"shape": sa, "count": 1, "colour": ca}, req_b]}}


# --------------------------------------------------------------------------------------------------
# The checker: read the objects off the picture, then GenEval's rules

def _as_uint8(image):
    """uint8 [H, W, 3] array, float [3, H, W] tensor/array in [-1, 1] (data.to_uint8's rule) or PIL
    image -> uint8 [H, W, 3] numpy array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if torch.is_tensor(image):
        image = image.detach().float().cpu().numpy()
    a = np.asarray(image)
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[-1] == 3:
        return a
    if a.ndim == 3 and a.shape[0] == 3 and np.issubdtype(a.dtype, np.floating):
        return np.clip(127.5 * a + 128, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    raise UserError(f"an image must be uint8 [H, W, 3] or float [3, H, W] in [-1, 1], "
                    f"got {a.dtype} {list(a.shape)}")


def _hue(rgb):
    """Hue angle in radians of an RGB colour (the hexagonal-projection formula)."""
    r, g, b = rgb
    return math.atan2(math.sqrt(3) * (g - b), 2 * r - g - b)


_HUES = {name: _hue(rgb) for name, rgb in COLOURS.items()}


def _moments(shape):
    """Area and centroid of a unit outline (shoelace formula; a disk's are pi and its centre)."""
    if OUTLINES[shape] is None:
        return math.pi, (0.0, 0.0)
    p = np.array(OUTLINES[shape])
    x, y, xn, yn = p[:, 0], p[:, 1], np.roll(p[:, 0], -1), np.roll(p[:, 1], -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    return abs(area), (((x + xn) * cross).sum() / (6 * area), ((y + yn) * cross).sum() / (6 * area))


_MOMENTS = {s: _moments(s) for s in SHAPES}
_BLURS = (0.0, 0.6, 1.0, 1.4)  # template blurs in pixels at 32 px: a render up to a soft sample


def _templates(shape, mass, centroid, window, s):
    """`shape` drawn with coverage `mass` (area in pixels) and its centroid at `centroid`, in a
    window of (height, width) pixels, at each of _BLURS (times the image scale s): [len(_BLURS),
    height, width]."""
    area, (ux, uy) = _MOMENTS[shape]
    r = math.sqrt(max(mass, 1.0) / area)  # the half side whose outline has this area
    cx, cy = centroid[0] - r * ux, centroid[1] - r * uy
    m = Image.new("L", (window[1] * _SS, window[0] * _SS))
    d = ImageDraw.Draw(m)
    if OUTLINES[shape] is None:
        d.ellipse([_SS * (cx - r), _SS * (cy - r), _SS * (cx + r), _SS * (cy + r)], fill=255)
    else:
        d.polygon(_polygon(OUTLINES[shape], 0.0, r, cx, cy), fill=255)
    t = np.asarray(m.reduce(_SS), np.float32) / 255
    rows, cols = _blur_matrices(window[0], s), _blur_matrices(window[1], s)
    return rows @ t @ cols.transpose(0, 2, 1)


@functools.lru_cache(maxsize=256)
def _blur_matrices(n, s):
    """[len(_BLURS), n, n]: Gaussian blurs along one axis of length n as matrices (zero outside, as
    a template is), so the blurred templates are two small matrix products, not filter calls."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    out = []
    for sigma in (b * s for b in _BLURS):
        if sigma:
            out.append(np.exp(-d ** 2 / (2 * sigma ** 2)) / (sigma * math.sqrt(2 * math.pi)))
        else:
            out.append(np.eye(n))
    return np.stack(out).astype(np.float32)


def detect(image):
    """The objects in an image of this world: a list of dicts with shape, colour, size ("small" or
    "large"), box (x0, y0, x1, y1 in pixels), centre and area (pixels), largest first (the checker's
    stand-in for a detector's confidence).

    Objects: pixels whose brightest channel is above half way from the background level (the image's
    median: objects cover well under half of it) to 210, the palette's dimmest main channel;
    connected components of them (4-neighbours, so blurred diagonal contacts do not join two
    objects), ignoring specks under 8 px at 32 px. Colour: the palette hue nearest to the mean of
    the component's brighter half. Shape: blur keeps two things of an object exactly, its coverage
    mass (area) and its centroid; so each shape's template is drawn with that area about that
    centroid, blurred by each of _BLURS, and the best match (least squared difference of coverage in
    a window around the object) names the shape; upright shapes need no rotation search."""
    a = _as_uint8(image).astype(np.float32)
    h, w = a.shape[:2]
    s = _scale(w)
    bright = a.max(-1)
    bg = float(np.median(bright))
    labels, _ = ndimage.label(bright >= bg + 0.5 * max(210 - bg, 1.0))
    found = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        blob = labels[sl] == k
        area = int(blob.sum())
        if area < 8 * s * s:
            continue
        y0, x0, y1, x1 = sl[0].start, sl[1].start, sl[0].stop, sl[1].stop
        pix = a[sl][blob]
        core = pix[pix.max(-1) >= np.median(pix.max(-1))]
        hue = _hue(core.mean(0))
        colour = min(_HUES, key=lambda name: abs(math.remainder(hue - _HUES[name], 2 * math.pi)))
        # coverage in a window 3 px around the box: brightness above the window's own background
        # level (its median outside the object), over the palette colour's; other objects' pixels
        # zeroed
        pad = max(2, round(3 * s))
        wy0, wx0, wy1, wx1 = max(y0 - pad, 0), max(x0 - pad, 0), min(y1 + pad, h), min(x1 + pad, w)
        lab, br = labels[wy0:wy1, wx0:wx1], bright[wy0:wy1, wx0:wx1]
        near = ndimage.binary_dilation(lab == k, iterations=2)
        local = float(np.median(br[~near & (lab == 0)])) if (~near & (lab == 0)).any() else bg
        cov = (br - local) / max(max(COLOURS[colour]) - local, 1.0)
        cov = np.where((lab == 0) | (lab == k), np.clip(cov, -0.5, 1.0), 0.0)
        mass = float(cov.sum())
        yy, xx = np.mgrid[wy0:wy1, wx0:wx1] + 0.5
        pos = np.clip(cov, 0, None) + 1e-6 * (labels[wy0:wy1, wx0:wx1] == k)  # never all zero
        centroid = ((xx * pos).sum() / pos.sum() - wx0, (yy * pos).sum() / pos.sum() - wy0)
        err = {sh: float(((_templates(sh, mass, centroid, cov.shape, s) - cov) ** 2)
                         .sum(axis=(1, 2)).min()) for sh in SHAPES}
        side = 2 * math.sqrt(max(mass, 1.0) / _MOMENTS[min(err, key=err.get)][0])
        found.append({"shape": min(err, key=err.get), "colour": colour,
                      "size": "small" if side < 11.5 * s else "large", "box": (x0, y0, x1, y1),
                      "centre": ((x0 + x1) / 2, (y0 + y1) / 2), "area": area})
    return sorted(found, key=lambda o: -o["area"])


def evaluate(objects, spec):
    """GenEval's decision on detected objects (its evaluate_images.py, rule for rule): each include
    requirement takes the `count` most confident objects of its shape (fails if fewer), needs
    `count` of them of its colour, and for a position needs every one of them in the relation to
    every object that requirement `index` matched; every exclude requirement fails the image if at
    least `count` objects of its shape are found."""
    by_shape = {}
    for o in sorted(objects, key=lambda o: -o["area"]):
        by_shape.setdefault(o["shape"], []).append(o)
    matched, ok = [], True
    for req in spec["include"]:
        found = by_shape.get(req["shape"], [])[:req["count"]]
        good = len(found) >= req["count"]
        if good and "colour" in req:
            good = sum(o["colour"] == req["colour"] for o in found) >= req["count"]
        if good and "position" in req:
            rel, target = req["position"]
            good = matched[target] is not None and all(
                rel in relative_position(o["box"], t["box"])
                for o in found for t in matched[target])
        matched.append(found if good else None)
        ok = ok and good
    return ok and all(len(by_shape.get(r["shape"], [])) < r["count"]
                      for r in spec.get("exclude", []))


def check(image, spec):
    """Is `image` right for `spec` (a benchmark prompt's spec)? detect(), then evaluate()."""
    return evaluate(detect(image), spec)


def score(images, prompts):
    """Benchmark figures for images generated from `prompts` (benchmark_prompts' dicts, one image
    each): {task: accuracy, ..., "overall": mean of the task accuracies (GenEval's score), "seen":
    {...}, "heldout": {...}}, the two splits by the prompt's heldout flag, each with its own
    per-task accuracies and overall (a split's overall averages the tasks present in it: held-out
    prompts exist only for the four tasks that name colours)."""
    if len(images) != len(prompts):
        raise UserError(f"score needs one image per prompt, got {len(images)} images for "
                        f"{len(prompts)} prompts")
    right = [check(img, p["spec"]) for img, p in zip(images, prompts)]

    def table(keep):
        res = {}
        for task in TASKS:
            hits = [r for r, p in zip(right, prompts) if p["task"] == task and keep(p)]
            if hits:
                res[task] = sum(hits) / len(hits)
        res["overall"] = float(np.mean(list(res.values()))) if res else float("nan")
        return res
    return {**table(lambda p: True), "seen": table(lambda p: not p["heldout"]),
            "heldout": table(lambda p: p["heldout"])}


# --------------------------------------------------------------------------------------------------
# Ground truth for the benchmark, and the checker's own accuracy

def scene_for(spec, image_size=32, rng=None, distractors=True, avoid=()):
    """A scene satisfying `spec`: its required objects (a random colour where none is named; a
    position requirement holding with the captions' clear margin) and, half the time when there is
    room, one or two distractors of shapes neither the spec nor `avoid` mentions, so the checker
    must pick the right objects out."""
    rng = np.random.default_rng(0) if rng is None else rng
    named = {r["shape"] for r in spec["include"] + spec.get("exclude", [])} | set(avoid)
    others = [p for p in ALL_PAIRS if p[1] not in named]
    for _ in range(200):
        pairs, owner = [], []
        for j, req in enumerate(spec["include"]):
            for _ in range(req["count"]):
                pairs.append((req.get("colour") or _pick(list(COLOURS), rng), req["shape"]))
                owner.append(j)
        if distractors and len(pairs) < 3 and rng.random() < 0.5:
            pairs += [_pick(others, rng) for _ in range(int(rng.integers(1, 4 - len(pairs))))]
        objs = _arrange(pairs, image_size, rng)
        box = lambda j: objs[owner.index(j)]["box"]  # noqa: E731  (requirement j's first object)
        if all(rel in _clear_relations(box(j), box(target))
               for j, req in enumerate(spec["include"]) if "position" in req
               for rel, target in [req["position"]]):
            return objs
    raise RuntimeError(f"no scene found for {spec}")  # not reached: a relation holds 1 time in 4+


def _wrong_spec(task, spec, rng):
    """A near miss of `spec` to render when measuring false positives: a missing shape, one object
    too few or too many, another colour, the opposite relation, the colours swapped."""
    inc = [dict(r) for r in spec["include"]]
    if task in ("single_object", "two_objects"):  # the last named shape becomes an unnamed one
        inc[-1]["shape"] = _pick([s for s in SHAPES if s not in {r["shape"] for r in inc}], rng)
    elif task == "counting":
        inc[0]["count"] += -1 if inc[0]["count"] == 3 or rng.random() < 0.5 else 1
    elif task == "colours":
        inc[0]["colour"] = _pick([c for c in COLOURS if c != inc[0]["colour"]], rng)
    elif task == "position":
        inc[1]["position"] = [OPPOSITE[inc[1]["position"][0]], 0]
    else:
        inc[0]["colour"], inc[1]["colour"] = inc[1]["colour"], inc[0]["colour"]
    return {"include": inc}


def distort(image, kind, rng):
    """A render made to look more like a sample: "blur" (2x box downsampling and bilinear upsampling
    back, about a ds4 tokenizer's softness) or "noise" (per-channel gain 0.9-1.1 and Gaussian noise
    of 6/255)."""
    a = _as_uint8(image)
    if kind == "blur":
        pil = Image.fromarray(a)
        return np.asarray(pil.reduce(2).resize(pil.size, Image.BILINEAR))
    if kind == "noise":
        b = a * rng.uniform(0.9, 1.1, 3) + rng.normal(0, 6, a.shape)
        return np.clip(b + 0.5, 0, 255).astype(np.uint8)
    raise UserError(f"distortion must be 'blur' or 'noise', got {kind!r}")


def checker_accuracy(per_task=200, image_size=32, seed=0, distortion=None, negatives=False):
    """The checker scored on true renders of `per_task` benchmark prompts per task: score() of
    scene_for(spec) renders (the fraction accepted; the checker is right when it is 1), or with
    negatives=True of renders of near misses (_wrong_spec), reporting the fraction rightly REJECTED.
    distortion: None, "blur" or "noise" (see distort())."""
    prompts = benchmark_prompts(per_task, seed)
    rng = np.random.default_rng([seed, 1_000_003])
    images = []
    for p in prompts:
        spec = _wrong_spec(p["task"], p["spec"], rng) if negatives else p["spec"]
        avoid = [r["shape"] for r in p["spec"]["include"]]  # a distractor must not fix a near miss
        img = render(scene_for(spec, image_size, rng, avoid=avoid), image_size, rng)
        images.append(distort(img, distortion, rng) if distortion else np.asarray(img))
    res = score(images, prompts)
    if negatives:  # accepted -> rejected
        flip = lambda t: {k: 1 - v for k, v in t.items()}  # noqa: E731
        res = {**flip({k: v for k, v in res.items() if k not in ("seen", "heldout")}),
               "seen": flip(res["seen"]), "heldout": flip(res["heldout"])}
    return res


# --------------------------------------------------------------------------------------------------
# command line

def preview(out, count=32, image_size=32, seed=0, upscale=4):
    """A PNG grid of the first `count` scenes, upscaled `upscale` x (nearest) for a person to look
    at; returns their captions."""
    ds = CaptionedScenes(count, image_size, seed)
    items = [ds[i] for i in range(count)]
    big = [torch.nn.functional.interpolate(x[None], scale_factor=upscale, mode="nearest")[0]
           for x, _ in items]
    save_grid(big, out, nrow=8)
    return [c for _, c in items]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pv = sub.add_parser("preview", help="write a 4x-upscaled grid of scenes, print their captions")
    pv.add_argument("--out", default="scenes.png", help="PNG file to write (default: scenes.png)")
    pv.add_argument("--count", type=int, default=32, help="scenes, 8 per row (default: 32)")
    pv.add_argument("--image-size", type=int, default=32, help="image side in pixels (default: 32)")
    pv.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    ck = sub.add_parser("check", help="the checker's accuracy on true renders, clean and distorted")
    ck.add_argument("--per-task", type=int, default=200, help="prompts per task (default: 200)")
    ck.add_argument("--image-size", type=int, default=32, help="image side in pixels (default: 32)")
    ck.add_argument("--seed", type=int, default=0, help="benchmark seed (default: 0)")
    args = p.parse_args(argv)
    if args.command == "preview":
        for k, c in enumerate(preview(args.out, args.count, args.image_size, args.seed)):
            print(f"{k:3d} {c}")
        print(f"wrote {args.out}")
    else:
        print("task".ljust(20) + "".join(f"{t[:12]:>13}" for t in TASKS))
        for name, kw in (("clean", {}), ("blur", {"distortion": "blur"}),
                         ("noise", {"distortion": "noise"}),
                         ("rejects near misses", {"negatives": True})):
            t0 = time.time()
            r = checker_accuracy(args.per_task, args.image_size, args.seed, **kw)
            print(name.ljust(20) + "".join(f"{r[t]:13.3f}" for t in TASKS)
                  + f"   ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    cli(main)
