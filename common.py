"""What every script shares, one copy of each: one-line errors, the flag table check, the output
policy, the image reader, the pixel rule and PNG grids, device and precision, safe checkpoint I/O,
downloads. Nothing here knows about codes or models; fid.py, a leaf, needs nothing else of ours."""
import argparse
import errno
import glob
import hashlib
import http.client
import json
import math
import os
import shutil
import sys
import tempfile
import time
import urllib.request
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm


# ------------------------------------------------------------------------------------ failing well
class UserError(ValueError):
    """Bad input from the user (a path, a flag, a checkpoint): CLIs print one line and exit 2."""

    def __init__(self, line=""):
        # one raised in a DataLoader worker is re-made in the main process from "Caught UserError
        # in DataLoader worker process 0.\nOriginal Traceback ...\ncommon.UserError: <line>":
        # only <line> is meant for the user
        if isinstance(line, str) and line.startswith("Caught UserError"):
            line = line.rstrip().rpartition("UserError: ")[2]
        super().__init__(line)


def rank_world():
    """(rank, world size): the process group's, else torchrun's RANK and WORLD_SIZE, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_rank0():
    """True in a single process and in torchrun's rank 0, the one process that speaks for all."""
    return rank_world()[0] == 0


def say(line):
    """Print one line on stderr above any tqdm bar (a plain print would be drawn over)."""
    tqdm.write(line, file=sys.stderr)


# The faults of the file system a user can fix: a full disk, a folder that cannot be written, a
# path that runs through a file. Anything else from the OS is a bug and keeps its traceback.
_FIXABLE = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
            errno.EISDIR, errno.EEXIST}


def os_error_line(e, path=None):
    """One line for a fixable OSError: what happened to which path, and what to do."""
    where = path or e.filename or "the output folder"  # the path asked for, not a temporary
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on {where}; free some space or write elsewhere (files kept)"
    if e.errno == errno.ENOTDIR:
        return f"cannot write {where}: part of that path is a file, not a folder; choose another"
    return f"cannot write {where} ({e.strerror}); choose a writable location"


def cli(main):
    """Run `main()`; bad input becomes one line on stderr and exit code 2, never a traceback. Under
    torchrun only rank 0 prints, and the process group is closed: no rank waits for a dead peer."""
    def leave(line, code):
        if is_rank0():
            say(line)
        else:  # torchrun stops every rank when one exits: give rank 0 time to say it first
            time.sleep(2)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        sys.exit(code)
    try:
        main()
    except UserError as e:
        leave(f"error: {e}", 2)
    except KeyboardInterrupt as e:  # its message, if any, says what was kept (train.py's Ctrl-C)
        leave(str(e) or "interrupted", 130)
    except OSError as e:
        if e.errno not in _FIXABLE:
            raise
        leave(f"error: {os_error_line(e)}", 2)


def first_line(e):
    """The first line of an exception's message (or its type): enough to name a cause."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def progress(iterable=None, show=True, **kw):
    """A tqdm bar, drawn only if `show` (rank 0) and stderr is a terminal (not a log file)."""
    return tqdm(iterable, disable=None if show else True, dynamic_ncols=True, **kw)


# ------------------------------------------------------------------------------------------- flags
# Every CLI declares its numeric ranges and its "only with" rules once, as a table, and calls
# check_flags: no flag has a hand-written check of its own, and none is parsed and then ignored.
def at_least(lo):
    return (lambda v: v >= lo, f"at least {lo}")


def between(lo, hi):
    return (lambda v: lo <= v <= hi, f"in [{lo}, {hi}]")


POSITIVE = (lambda v: v > 0, "> 0")
FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
SEED = between(0, 2**24 - 1)  # train.py seeds item (seed * 2^40 + position) in torch's 64 bits


def check_flags(args, ranges=None, only_with=()):
    """ranges: {dest: (ok(value), "the rule in words")}, a value of None meaning "not given";
    a float must also be finite (nan compares False with everything and would slip through).
    only_with: [(dest, "what it needs", present(args))]: given without it, the flag is refused."""
    for name, needs, present in only_with:
        value = getattr(args, name, None)
        if value is not None and value is not False and not present(args):
            raise UserError(f"--{name.replace('_', '-')} only applies with {needs}; drop it")
    for name, (ok, rule) in (ranges or {}).items():
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {value:g}")


def check_writable(path, overwrite=False, flag="--out"):
    """The one output policy of every CLI, checked before the work: a file there is kept unless
    --overwrite; the folder must take a real file (the one test of read-only mounts)."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a folder; give a file name")
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose "
                        f"another {flag}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"cannot write to {path!r} ({e.strerror}); choose a writable "
                        "location") from None


# ------------------------------------------------------------------------------------------ images
# the extensions pytorch-fid's folder reader accepts
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff")
# what Pillow raises for a file it cannot decode: corrupt, cut short, empty or not an image, or a
# decompression bomb (a small file declaring billions of pixels)
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_image(path):
    """The one image reader: decoded now, RGB by to_rgb's rules, else one of UNREADABLE."""
    with Image.open(path) as im:
        im.load()  # decode now: a truncated file fails here, not later in a crop
        return to_rgb(im)


def to_rgb(pil):
    """Any Pillow mode -> RGB. Transparency is composited on white, the page such images were made
    for (dropping alpha would expose whatever colour is stored under it); 16-bit gray is scaled."""
    if pil.mode == "RGB":
        return pil
    # a palette image may mark one colour transparent (as GIFs do) without any alpha channel
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


# The official evaluation's pixel rule, the one place it lives: decoder output (about [-1, 1], not
# clamped) -> optional bicubic resize -> clamp(127.5 x + 128) -> truncate to uint8. The order
# matters: LlamaGen's sample_c2i_ddp.py resizes its 384 px samples to 256 BEFORE clamping, so
# clamping first would give other pixels. The published FIDs were computed on exactly these bytes;
# every PNG, .npz and metric here goes through it. from_uint8 is its inverse on the 256 levels
# (127.5 x + 128 lands on the level + 0.5, so the round trip is exact).
def to_uint8(images, resize_to=None):
    """[B, 3, H, W] floats in [-1, 1] -> uint8 array [B, H, W, 3] (resized to resize_to first)."""
    x = images.detach().float()  # float32: bf16's 8-bit mantissa would shift pixel levels
    if resize_to and resize_to != x.shape[-1]:
        x = F.interpolate(x, size=(resize_to, resize_to), mode="bicubic")
    x = (127.5 * x + 128).clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(pixels):
    """uint8 pixels [..., H, W, 3] (array, tensor or RGB PIL image) -> float32 [..., 3, H, W]."""
    a = np.asarray(pixels.cpu() if torch.is_tensor(pixels) else pixels)
    channels_first = np.moveaxis(a, -1, -3).astype(np.float32, order="C")
    return torch.from_numpy(channels_first * (1 / 127.5) - 1)


def make_grid(images, nrow=8, pad=2, pad_value=0):
    """[B, 3, H, W] images in [-1, 1] -> one PIL image, `nrow` per row, `pad` pixels apart."""
    arr = to_uint8(images)  # the same bytes the .npz files and the metrics see
    b, h, w, _ = arr.shape
    nrow = max(1, min(nrow, b))  # fewer images than nrow: one row, as wide as they are
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), pad_value, np.uint8)
    for i in range(b):
        y, x = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[y:y + h, x:x + w] = arr[i]
    return Image.fromarray(grid)


def save_grid(images, path, nrow=8):
    """Write (atomically) and return a PNG grid of [B, 3, H, W] images or a list of [3, H, W]."""
    if isinstance(images, (list, tuple)):
        images = torch.stack(list(images))
    grid = make_grid(images, nrow)
    save_atomic(lambda f: grid.save(f, format="PNG"), path)
    return grid


# ---------------------------------------------------------------------------- device and precision
def pick_device(name=None):
    """'cuda' if there is a GPU, else Apple's 'mps', else 'cpu'; an explicit name wins."""
    if name and name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but this torch sees no CUDA GPU; "
                            "use --device cpu")
        if name == "mps" and not torch.backends.mps.is_available():
            raise UserError("--device mps asked for, but MPS is not available here; "
                            "use --device cpu")
        return name
    return ("cuda" if torch.cuda.is_available() else
            "mps" if torch.backends.mps.is_available() else "cpu")


def setup_device(name=None, tf32=True):
    """pick_device; under torchrun the GPU of LOCAL_RANK; TF32 matmuls as the official recipe unless
    tf32=False (code extraction: a near-tie between two codes must not flip)."""
    device = pick_device(name)
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if device.startswith("cuda") and tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision, device):
    """--precision -> (name, dtype). "auto": bf16 on GPUs that have it (the official choice), fp16
    on older GPUs, fp32 on CPUs and MPS, where bf16 is mostly emulated."""
    if precision == "auto":
        cuda = str(device).startswith("cuda")
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    return precision, DTYPES[precision]


def cpu_has_bf16():
    """True on a CPU whose matrix units multiply bf16 natively (avx512_bf16 or AMX, as oneDNN
    reports); elsewhere bf16 is emulated and slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def attention(q, k, v, attn_mask=None, **kw):
    """F.scaled_dot_product_attention, every attention's one call. On a CPU, PyTorch's bf16 flash
    attention is slow in two places, which attend in float32: a training step's backward, and a
    decode step's few queries against a long cache (why a CPU's KV cache holds float32)."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and (
            torch.is_grad_enabled() or k.dtype == torch.float32):
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.float()
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                               attn_mask=attn_mask, **kw)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw)


# -------------------------------------------------------------------------------- checkpoint files
def load_checkpoint(path):
    """torch.load with weights_only=True, argparse.Namespace allow-listed (the official files pickle
    one under "args"); torch's advice to load a bad file unsafely is never passed on."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} does not exist; check the path")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "pickle protocol 4" chatter from old files
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if isinstance(e, EOFError) or os.path.getsize(path) == 0:
            why = "it is empty or cut short; re-download or re-save it"
        elif "central directory" in text or "zip archive" in text:
            why = "it is truncated or damaged; re-download or re-save it"
        elif "unsupported global" in text.lower() or "Unsupported operand" in text:  # raw pickle
            why = ("it holds pickled Python objects besides tensors, which can be code: it was not "
                   "run (never unpickled here); save a state_dict with torch.save instead")
        else:  # a KeyError on a byte value, "invalid load key": some other kind of file
            why = "it is not a PyTorch checkpoint; check the path"
        raise UserError(f"cannot read checkpoint {path!r}: {why}") from None


def weights_checksum(module, as_dtype=None):
    """sha256 of a module's float tensors (names, dtypes, shapes, bytes): the identity of weights
    whichever file held them, to match data made with them. as_dtype: each cast to it first."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        if v.is_floating_point():
            v = v.detach().cpu()  # one tensor at a time: never a second copy of the whole model
            v = v if as_dtype is None else v.to(as_dtype)
            h.update(f"{k}:{v.dtype}:{tuple(v.shape)};".encode())
            h.update(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_json(path, fix="the folder is damaged: extract it again"):
    """A JSON object of a user's file (a receipt, a config); else one line naming it and `fix`."""
    try:
        with open(path, encoding="utf-8") as f:
            found = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise UserError(f"{path} cannot be read ({first_line(e)}); {fix}") from None
    if not isinstance(found, dict):
        raise UserError(f"{path} holds no JSON object; {fix}")
    return found


def json_checksum(obj):
    """sha256 of an object's compact JSON form (fixed: stored checksums quote it)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stored(meta, key, where):
    """meta[key], a tokenizer's words or merges, checked against the json_checksum beside it."""
    value = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(value, list) or json_checksum(value) != meta.get(f"{key}_checksum"):
        raise UserError(f"{where}: its stored {key} " + ("do not match their checksum" if value
                        else "are missing") + "; the file is damaged: train it again")
    return value


def unwrap_state_dict(ckpt):
    """The weights inside any container in use ({"model": ...} ours and the official trainer's,
    DeepSpeed's {"module": ...}, {"state_dict": ...}, a bare dict); with an "ema" dict, its EMA."""
    ema = ckpt.get("ema") if isinstance(ckpt, dict) else None
    for key in ("model", "module", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if isinstance(ema, dict):  # trained with --ema: sample from the averaged weights
        ckpt = {**ckpt, **ema}  # (buffers, which are not averaged, come from "model")
    if not isinstance(ckpt, dict) or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise UserError("checkpoint holds no state dict "
                        "(looked under 'model', 'module', 'state_dict')")
    # torch.compile and DDP wrap parameter names; strip their prefixes so every producer loads alike
    return {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt.items()}


def load_weights(module, state_dict, what, ignore=(), hint=""):
    """Strict loading, keys containing a string of `ignore` dropped, failures by check_weights."""
    sd = {k: v for k, v in state_dict.items() if not any(s in k for s in ignore)}
    check_weights(module, sd, what, hint)
    module.load_state_dict(sd, strict=True)
    return module


def check_weights(module, sd, what, hint=""):
    """Every tensor of `module` (or a state dict) in `sd` with its shape, nothing more; else one
    line naming the key, both shapes and `hint`."""
    own = module if isinstance(module, dict) else module.state_dict()
    hint = f"; {hint}" if hint else ""
    for k, v in own.items():
        if k not in sd:
            raise UserError(f"{what}: weight {k!r} missing from the checkpoint{hint}")
        if sd[k].shape != v.shape:
            raise UserError(f"{what}: {k!r} expected shape {tuple(v.shape)}, "
                            f"found {tuple(sd[k].shape)}{hint}")
    if extra := sorted(set(sd) - set(own)):
        raise UserError(f"{what}: unexpected weight {extra[0]!r} (+{len(extra) - 1} more) "
                        f"in the checkpoint{hint}")


def save_atomic(what, path):
    """Write `path` so that a crash leaves the old file or the new, never half: a temporary file
    beside it, flushed, then renamed. `what`: an object for torch.save, or f(binary file)."""
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    try:
        os.makedirs(folder, exist_ok=True)
        # a process killed mid-save leaves its temporary file: each path has one writer, so go
        for old in glob.glob(os.path.join(glob.escape(folder), ".tmp-*" + glob.escape(name))):
            # mkstemp's names are .tmp- + 8 random characters + `name`; any other match is not ours
            if len(os.path.basename(old)) == len(".tmp-12345678") + len(name):
                os.remove(old)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=name)
    except OSError as e:
        raise UserError(os_error_line(e, path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            what(f) if callable(what) else torch.save(what, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)  # read only by setting it: set straight back
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = e  # torch.save turns a failed write into a RuntimeError raised over the OSError
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is not None and cause.errno in _FIXABLE:
            raise UserError(os_error_line(cause, folder if cause.errno == errno.ENOSPC else path)
                            ) from None
        # no OSError in the chain, yet under 1 MiB free: the full disk is still the likely cause
        if isinstance(e, RuntimeError) and shutil.disk_usage(folder).free < (1 << 20):
            raise UserError(os_error_line(OSError(errno.ENOSPC, "full"), folder)) from None
        raise


def download(url, path, sha256_prefix=None, fix=""):
    """`path`, fetched from `url` unless there, atomically (save_atomic). Checked: the byte count
    against Content-Length, the SHA-256 against `sha256_prefix` (the digits in published weight
    files' names) or the server's (Hugging Face's X-Linked-ETag). Failure: one line with `fix`."""
    if int(os.environ.get("LOCAL_RANK", 0)) > 0:  # under torchrun one process a machine fetches
        while not os.path.isfile(path):  # (if it fails, torchrun stops this one too)
            time.sleep(1)
    if os.path.isfile(path):
        return path
    name, fix = os.path.basename(path), fix or f"download {url} by hand to {path}"
    say(f"downloading {name} to {path}")

    def write(f):
        with urllib.request.urlopen(url, timeout=60) as r:
            size = int(r.headers.get("Content-Length") or 0)
            stated = (r.headers.get("X-Linked-ETag") or "").strip('"')
            want = sha256_prefix or (stated if len(stated) == 64 else None)
            h, got = hashlib.sha256(), 0
            with progress(total=size or None, unit="B", unit_scale=True, desc=name) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
                    got += len(chunk)
        if size and got != size:
            raise OSError(f"transfer cut short at {got} of {size} bytes")
        if want and not h.hexdigest().startswith(want.lower()):
            raise OSError(f"SHA-256 {h.hexdigest()[:12]} is not the published {want[:12]}")
    try:
        save_atomic(write, path)
    except (OSError, ValueError, http.client.HTTPException) as e:  # offline, cut short, tampered
        raise UserError(f"cannot download {name} from {url} ({first_line(e)}); {fix}") from None
    return path


# The official LlamaGen weights (its README's tables), by file name. A name that is not a file on
# disk is fetched once into torch's hub cache; NANOLLAMAGEN_WEIGHTS_URL replaces both hosts (a
# mirror, or a local server in the tests).
_LLAMAGEN = "https://huggingface.co/FoundationVision/LlamaGen/resolve/main/"
_LLAMAGEN_T2I = "https://huggingface.co/peizesun/llamagen_t2i/resolve/main/"
OFFICIAL_WEIGHTS = {
    **dict.fromkeys(["vq_ds16_c2i.pt", "vq_ds8_c2i.pt"] + [f"c2i_{m}.pt" for m in (
        "B_256", "B_384", "L_256", "L_384", "XL_384", "XXL_384", "3B_384")], _LLAMAGEN),
    **dict.fromkeys(["vq_ds16_t2i.pt", "t2i_XL_stage1_256.pt", "t2i_XL_stage2_512.pt"],
                    _LLAMAGEN_T2I)}


def weights_file(path):
    """`path` itself when it exists or is not an official name; else the official file of that
    name from torch's hub cache, downloaded the first time."""
    if os.path.exists(path) or path not in OFFICIAL_WEIGHTS:
        return path
    url = os.environ.get("NANOLLAMAGEN_WEIGHTS_URL", OFFICIAL_WEIGHTS[path]).rstrip("/") + "/"
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", path)
    return download(url + path, cached, fix=f"offline? download it by hand to {cached} (or "
                    "anywhere, and pass that path)")
