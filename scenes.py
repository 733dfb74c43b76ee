"""A captioned world for text-to-image, and a compositional benchmark scored by an exact checker.

CaptionedScenes, the text-conditional sibling of shapes.SyntheticShapes: one to three objects of a
shape and colour drawn at random, each in a cell of its own of a 2x2 grid, captioned by a small
grammar ("a green square to the left of a blue star"); a few colour-shape pairs never occur in
training. The benchmark follows GenEval (Ghosh et al. 2023), six tasks of prompts judged by fixed
rules; where GenEval runs a detector and CLIP, the checker here reads the known world off the
picture, and its own error rate on true renders is measured (checker_accuracy).

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

from common import (SEED, UserError, at_least, between, check_flags, check_writable, cli,
                    from_uint8, save_grid)
from shapes import POLYGONS, SS, disk, polygon, star

# -- The world: palette, shapes, the held-out pairs and the words ----------------------------------
# Six colours 40+ degrees apart in hue, each with a channel above 190, on a dark grey: blurring in
# the background hardly moves hue, so hue names a colour even when blurred.
BACKGROUND = (40, 40, 40)
COLOURS = {"red": (245, 45, 45), "yellow": (250, 225, 35), "green": (45, 210, 60),
           "cyan": (35, 225, 230), "blue": (45, 95, 255), "magenta": (235, 45, 235)}


def _unit(points):
    """An outline recentred on its box, longer half-side 1: size and centre are its box's."""
    p = np.array(points, np.float64)
    lo, hi = p.min(0), p.max(0)
    return [tuple(q) for q in (p - (lo + hi) / 2) / ((hi - lo).max() / 2)]


# Five bold shapes that survive a ds4 tokenizer, upright so the checker can match templates
# (a fatter star than SyntheticShapes': its arms stay visible). None is a disk.
OUTLINES = {"circle": None, "square": _unit(POLYGONS["square"]),
            "triangle": _unit(POLYGONS["triangle"]), "star": _unit(star(5, 0.55)),
            "cross": _unit(POLYGONS["plus"])}
SHAPES = tuple(OUTLINES)
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}

# Never in a training scene (heldout=True): every colour keeps four shapes, every shape five colours
HELDOUT_PAIRS = (("red", "square"), ("blue", "triangle"), ("yellow", "star"))
ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
SEEN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)

NUMBERS = {1: "a", 2: "two", 3: "three"}
RELATIONS = {"left of": "to the left of", "right of": "to the right of", "above": "above",
             "below": "below"}  # GenEval's names -> a caption's words
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
PLACES = (("at the top left", "at the top right"),  # the cells, row by row
          ("at the bottom left", "at the bottom right"))
GRID = len(PLACES)
# every word a caption or prompt can use (lower case, no punctuation), to build a tokenizer from
VOCABULARY = tuple(sorted(set(" ".join(
    [*NUMBERS.values(), *COLOURS, *SHAPES, *PLURALS.values(), "and", *RELATIONS.values(),
     *(p for row in PLACES for p in row)]).split())))


# -- Geometry: GenEval's relation rule, the layout -------------------------------------------------
def relative_position(box_a, box_b, threshold=0.1, cut=0.5):
    """GenEval's rule for where box A (x0, y0, x1, y1; y down) lies relative to box B: the centre
    offset, shrunk on each axis by threshold x (side of A + side of B), over its length; a
    component beyond `cut` names a relation: a set of "left of", "right of", "above", "below"."""
    a, b = np.asarray(box_a, np.float64), np.asarray(box_b, np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {name for name, holds in [("left of", dx < -cut), ("right of", dx > cut),
                                     ("above", dy < -cut), ("below", dy > cut)] if holds}


# the relations a caption may claim: twice GenEval's margin, a stricter cut (a pixel off passes)
_clear_relations = functools.partial(relative_position, threshold=0.2, cut=0.6)
_HALF = {s: (1.0, 1.0) if OUTLINES[s] is None else  # each outline's half width and height
         tuple(float(v) for v in np.abs(np.array(OUTLINES[s])).max(0)) for s in SHAPES}


# Why a grid, each object centred in its cell at one size, in its palette colour on a flat
# background: a scene is then its cells' contents and nothing else, so every code the GPT predicts
# is about the caption, and the tokenizer's 4x4 codes of a cell (paper 2.2) are the same wherever
# that object appears. Free placement, sizes and textured backgrounds (SyntheticShapes') are
# images the GPT must also learn to draw; this world keeps only what the six tasks test.
FILL = 0.8  # an object's box side over its cell's: gaps of 0.2 cells keep objects apart


def _arrange(pairs, image_size, rng):
    """(colour, shape) pairs -> objects (shape, colour, rgb, cell, centre, side, box), each centred
    in a cell of its own, drawn at random."""
    cell, objs = image_size / GRID, []
    for (colour, shape), k in zip(pairs, rng.permutation(GRID * GRID)):
        row, col = divmod(int(k), GRID)
        cx, cy, side = (col + 0.5) * cell, (row + 0.5) * cell, FILL * cell
        hx, hy = (side / 2 * e for e in _HALF[shape])
        objs.append({"shape": shape, "colour": colour, "rgb": COLOURS[colour], "cell": (row, col),
                     "centre": (cx, cy), "side": side, "box": (cx - hx, cy - hy, cx + hx, cy + hy)})
    return objs


# -- Drawing, at 4x and box-filtered down as in SyntheticShapes; captions from a small grammar -----
def _draw_shape(draw, shape, r, cx, cy, fill):
    if OUTLINES[shape] is None:
        disk(draw, cx, cy, r, fill)
    else:
        draw.polygon(polygon(OUTLINES[shape], 0.0, r, cx, cy), fill=fill)


def render(objects, image_size):
    """Scene (objects with "shape", "rgb", "centre", "side") -> RGB PIL image: one 4x RGBA layer of
    all objects, box-reduced, then blended over the background."""
    bg = np.array(BACKGROUND, np.float32)
    layer = Image.new("RGBA", (image_size * SS, image_size * SS))
    draw = ImageDraw.Draw(layer)
    for o in objects:
        _draw_shape(draw, o["shape"], o["side"] / 2, *o["centre"], (*o["rgb"], 255))
    fg = np.asarray(layer.reduce(SS), np.float32)
    alpha = fg[..., 3:] / 255
    return Image.fromarray(np.clip(bg * (1 - alpha) + fg[..., :3] * alpha + 0.5, 0, 255)
                           .astype(np.uint8))


def _phrase(obj, colour=True, count=1):
    """'a red circle', 'two green crosses', 'a star'."""
    words = [NUMBERS[count]] + ([obj["colour"]] if colour else [])
    return " ".join(words + [obj["shape"] if count == 1 else PLURALS[obj["shape"]]])


def _scene_and_caption(rng, image_size, pairs):
    """One scene and its caption: one object 20%, two 50%, three 10%, two or three alike 20%; the
    caption names colours 19 times in 20, a lone object's place half the time, and a clear relation
    of two whenever one holds; all of it true. Colours nearly always: a colour-less "a square" says
    squares come in the seen colours only, and pulls a held-out "a red square" to one of them; the
    few colour-less captions keep "a square" (the benchmark's single and two objects) known."""
    kind = rng.choice(4, p=[0.2, 0.5, 0.1, 0.2])
    with_colour = rng.random() < 0.95
    if kind == 3:  # a group: "three yellow triangles"
        objs = _arrange([_pick(pairs, rng)] * int(rng.integers(2, 4)), image_size, rng)
        return objs, _phrase(objs[0], with_colour, len(objs))
    n = int(kind) + 1
    objs = _arrange([pairs[k] for k in rng.choice(len(pairs), n, replace=False)], image_size, rng)
    if n == 1:
        place = " " + PLACES[objs[0]["cell"][0]][objs[0]["cell"][1]] if rng.random() < 0.5 else ""
        return objs, _phrase(objs[0], with_colour) + place
    with_colour = with_colour or len({o["shape"] for o in objs}) < n  # not "a star by a star"
    order = [int(k) for k in rng.permutation(n)]
    if n == 2:
        a, b = objs[order[0]], objs[order[1]]
        if clear := sorted(_clear_relations(a["box"], b["box"])):
            pa, pb = (_phrase(o, with_colour) for o in (a, b))
            return objs, f"{pa} {RELATIONS[_pick(clear, rng)]} {pb}"
    return objs, " and ".join(_phrase(objs[k], with_colour) for k in order)


class CaptionedScenes(torch.utils.data.Dataset):
    """Item i -> (float32 [3, H, W] in [-1, 1], caption), a pure function of (seed, i); scene(i):
    its objects (shape, colour, rgb, cell, centre, side, box). heldout: no HELDOUT_PAIRS."""

    def __init__(self, num_images, image_size=32, seed=0, heldout=True):
        if num_images < 1 or image_size < 24:
            raise UserError(f"CaptionedScenes needs num_images >= 1 and image_size >= 24, got "
                            f"{num_images} and {image_size}")
        self.num_images, self.image_size, self.seed = int(num_images), int(image_size), int(seed)
        self.heldout, self.pairs = bool(heldout), SEEN_PAIRS if heldout else ALL_PAIRS

    def __len__(self):
        return self.num_images

    def _draw(self, index):
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} scenes")
        return _scene_and_caption(np.random.default_rng([self.seed, index]), self.image_size,
                                  self.pairs)

    def scene(self, index):
        return self._draw(index)[0]

    def caption(self, index):
        return self._draw(index)[1]

    def __getitem__(self, index):
        objs, caption = self._draw(index)
        return from_uint8(render(objs, self.image_size)), caption


# -- The benchmark: GenEval's six tasks over this world --------------------------------------------
TASKS = ("single_object", "two_objects", "counting", "colours", "position", "colour_attribution")


def benchmark_prompts(per_task, seed=0):
    """`per_task` prompts per task: dicts of task, prompt ("three red circles"), heldout (odd colour
    prompts name a held-out pair) and spec, GenEval's metadata: "include" [{shape, count, colour?,
    position?: [relation, index of an earlier requirement]}], "exclude" [{shape, count}] NOT met."""
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


# -- The checker: read the objects off the picture, GenEval's rules, the checker's own accuracy ----
def _as_uint8(image):
    """uint8 [H, W, 3], float [3, H, W] in [-1, 1] (common.to_uint8's rule) or PIL -> uint8 HWC."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image.detach().float().cpu() if torch.is_tensor(image) else image)
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[-1] == 3:
        return a
    if a.ndim == 3 and a.shape[0] == 3 and np.issubdtype(a.dtype, np.floating):
        return np.clip(127.5 * a + 128, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    raise UserError(f"an image must be uint8 [H, W, 3] or float [3, H, W] in [-1, 1], "
                    f"got {a.dtype} {list(a.shape)}")


def _hue(rgb):
    """Hue angle in radians of an RGB colour (the hexagonal-projection formula)."""
    return math.atan2(math.sqrt(3) * (rgb[1] - rgb[2]), 2 * rgb[0] - rgb[1] - rgb[2])


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
    """`shape` of area `mass` about `centroid` in a (height, width) window, at each of _BLURS."""
    area, (ux, uy) = _MOMENTS[shape]
    r = math.sqrt(max(mass, 1.0) / area)  # the half side whose outline has this area
    m = Image.new("L", (window[1] * SS, window[0] * SS))
    _draw_shape(ImageDraw.Draw(m), shape, r, centroid[0] - r * ux, centroid[1] - r * uy, 255)
    t = np.asarray(m.reduce(SS), np.float32) / 255
    return _blur_matrices(window[0], s) @ t @ _blur_matrices(window[1], s).transpose(0, 2, 1)


@functools.lru_cache(maxsize=256)
def _blur_matrices(n, s):
    """[len(_BLURS), n, n]: Gaussian blurs along an axis of length n as matrices (zero outside)."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    blurs = [np.exp(-d ** 2 / (2 * sigma ** 2)) / (sigma * math.sqrt(2 * math.pi)) if sigma
             else np.eye(n) for sigma in (b * s for b in _BLURS)]
    return np.stack(blurs).astype(np.float32)


def detect(image):
    """The objects in an image of this world (dicts of shape, colour, box, centre, area),
    largest first: 4-connected components of pixels half way from the background (the median) to
    210; colour: the nearest palette hue; shape: blur keeps an object's coverage mass and
    centroid, so templates of that area about that centroid, blurred, are matched."""
    a = _as_uint8(image).astype(np.float32)
    (h, w), bright = a.shape[:2], a.max(-1)
    s, bg = w / 32, float(np.median(bright))
    labels, _ = ndimage.label(bright >= bg + 0.5 * max(210 - bg, 1.0))
    found = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        blob = labels[sl] == k
        if (area := int(blob.sum())) < 8 * s * s:
            continue
        y0, x0, y1, x1 = sl[0].start, sl[1].start, sl[0].stop, sl[1].stop
        pix = a[sl][blob]
        hue = _hue(pix[pix.max(-1) >= np.median(pix.max(-1))].mean(0))
        colour = min(COLOURS, key=lambda c: abs(math.remainder(hue - _hue(COLOURS[c]), 2 * np.pi)))
        # coverage in a window 3 px around the box: brightness above the window's own background
        # (its median outside the object) over the palette colour's; other objects zeroed
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
        found.append({"shape": min(err, key=err.get), "colour": colour, "box": (x0, y0, x1, y1),
                      "centre": ((x0 + x1) / 2, (y0 + y1) / 2), "area": area})
    return sorted(found, key=lambda o: -o["area"])


def evaluate(objects, spec):
    """GenEval's decision (its evaluate_images.py): each include requirement takes the `count` most
    confident objects of its shape, needs them all of its colour and, for a position, each in the
    relation to every object requirement `index` matched; excludes fail on `count` of a shape."""
    ranked = sorted(objects, key=lambda o: -o["area"])
    by_shape = {s: [o for o in ranked if o["shape"] == s] for s in {o["shape"] for o in ranked}}
    matched = []
    for req in spec["include"]:
        found = by_shape.get(req["shape"], [])[:req["count"]]
        good = len(found) == req["count"] and all(o["colour"] == req.get("colour", o["colour"])
                                                  for o in found)
        if good and "position" in req:
            rel, target = req["position"]
            good = matched[target] is not None and all(rel in relative_position(o["box"], t["box"])
                                                       for o in found for t in matched[target])
        matched.append(found if good else None)
    return None not in matched and all(len(by_shape.get(r["shape"], [])) < r["count"]
                                       for r in spec.get("exclude", []))


def score(images, prompts):
    """One image per prompt -> {task: accuracy, ..., "overall": their mean (GenEval's score),
    "seen": {...}, "heldout": {...}}, the same over the prompts of each split."""
    if len(images) != len(prompts):
        raise UserError(f"score needs one image per prompt, got {len(images)} for {len(prompts)}")
    right = [evaluate(detect(img), p["spec"]) for img, p in zip(images, prompts)]

    def table(keep):
        hits = {t: [r for r, p in zip(right, prompts) if p["task"] == t and keep(p)] for t in TASKS}
        res = {t: sum(h) / len(h) for t, h in hits.items() if h}
        return {**res, "overall": float(np.mean(list(res.values()))) if res else float("nan")}
    return {**table(lambda p: True), "seen": table(lambda p: not p["heldout"]),
            "heldout": table(lambda p: p["heldout"])}


def scene_for(spec, image_size, rng, avoid=()):
    """A scene satisfying `spec` (positions with the captions' clear margin) and, half the time,
    one or two distractors of shapes neither the spec nor `avoid` names."""
    named = {r["shape"] for r in spec["include"] + spec.get("exclude", [])} | set(avoid)
    others = [p for p in ALL_PAIRS if p[1] not in named]
    for _ in range(200):
        owner = [j for j, req in enumerate(spec["include"]) for _ in range(req["count"])]
        pairs = [(spec["include"][j].get("colour") or _pick(list(COLOURS), rng),
                  spec["include"][j]["shape"]) for j in owner]
        if len(pairs) < 3 and rng.random() < 0.5:
            pairs += [_pick(others, rng) for _ in range(int(rng.integers(1, 4 - len(pairs))))]
        objs = _arrange(pairs, image_size, rng)
        box = lambda j: objs[owner.index(j)]["box"]  # noqa: E731  (requirement j's first object)
        if all(rel in _clear_relations(box(j), box(target))
               for j, req in enumerate(spec["include"]) if "position" in req
               for rel, target in [req["position"]]):
            return objs
    raise RuntimeError(f"no scene found for {spec}")  # not reached: a relation holds 1 draw in 6


def wrong_spec(task, spec, rng):
    """A near miss of `spec` (a shape, count, colour or relation wrong), for false positives."""
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
    """A render made to look like a sample: "blur" (about a ds4 tokenizer's softness) or "noise"."""
    a = _as_uint8(image)
    if kind == "blur":
        return np.asarray(Image.fromarray(a).reduce(2).resize(a.shape[1::-1], Image.BILINEAR))
    if kind == "noise":
        b = a * rng.uniform(0.9, 1.1, 3) + rng.normal(0, 6, a.shape)
        return np.clip(b + 0.5, 0, 255).astype(np.uint8)
    raise UserError(f"distortion must be 'blur' or 'noise', got {kind!r}")


def checker_accuracy(per_task=200, image_size=32, seed=0, distortion=None, negatives=False):
    """score() of true renders of `per_task` prompts per task, or with negatives=True the fraction
    of near misses (wrong_spec) rightly REJECTED; distortion: None, "blur" or "noise"."""
    prompts = benchmark_prompts(per_task, seed)
    rng = np.random.default_rng([seed, 1_000_003])
    images = []
    for p in prompts:
        spec = wrong_spec(p["task"], p["spec"], rng) if negatives else p["spec"]
        avoid = [r["shape"] for r in p["spec"]["include"]]  # a distractor must not fix a near miss
        img = render(scene_for(spec, image_size, rng, avoid=avoid), image_size)
        images.append(distort(img, distortion, rng) if distortion else np.asarray(img))
    res = score(images, prompts)
    if negatives:  # accepted -> rejected
        return {k: {j: 1 - x for j, x in v.items()} if isinstance(v, dict) else 1 - v
                for k, v in res.items()}
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pv = sub.add_parser("preview", help="a 4x-upscaled grid of scenes; their captions printed")
    pv.add_argument("--out", default="scenes.png", help="PNG file to write (default: scenes.png)")
    pv.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    pv.add_argument("--count", type=int, default=32, help="scenes, 8 per row (default: 32)")
    ck = sub.add_parser("check", help="the checker's accuracy on true renders and near misses")
    ck.add_argument("--per-task", type=int, default=200, help="prompts per task (default: 200)")
    for q in (pv, ck):
        q.add_argument("--image-size", type=int, default=32, help="image side (default: 32)")
        q.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    args = p.parse_args(argv)
    check_flags(args, {"count": at_least(1), "image_size": between(24, 1024),
                       "per_task": at_least(1), "seed": SEED})
    if args.command == "preview":
        check_writable(args.out, args.overwrite)
        items = list(CaptionedScenes(args.count, args.image_size, args.seed))
        save_grid([x.repeat_interleave(4, 1).repeat_interleave(4, 2) for x, _ in items], args.out)
        print("\n".join(f"{k:3d} {c}" for k, (_, c) in enumerate(items)) + f"\nwrote {args.out}")
        return
    print("task".ljust(20) + "".join(f"{t[:12]:>13}" for t in TASKS))
    for name, kw in (("clean", {}), ("blur", {"distortion": "blur"}), ("noise", {
            "distortion": "noise"}), ("rejects near misses", {"negatives": True})):
        t0 = time.time()
        r = checker_accuracy(args.per_task, args.image_size, args.seed, **kw)
        print(name.ljust(20) + "".join(f"{r[t]:13.3f}" for t in TASKS)
              + f"   ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    cli(main)
