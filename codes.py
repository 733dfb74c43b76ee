"""Compute once, store, read back: the tokenizer codes the GPT trains on, not pixels (paper 3.2),
and the frozen text encoder's features of their captions (3.3, extract_t5_feature.py). A folder's
receipt (meta.json, features.json), written last, says how it was made. Under torchrun each rank
writes its shard and per-batch progress into parts/: a rerun resumes; 1 or N processes, same bytes.

    python codes.py extract --vq-ckpt vq_ds16_c2i.pt --data /imagenet/train --ten-crop --out in256
    torchrun --nproc_per_node 8 codes.py extract ...            # the same, sharded over 8 GPUs
    python codes.py extract --vq-ckpt VQ.pt --data scenes:2000 --image-size 32 --out codes/scenes
    python codes.py features --data codes/scenes --t5 flan-t5-xl/ --out features/scenes
"""
import argparse
import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile

import numpy as np
import torch
import torch.distributed as dist

from common import (DTYPES, UserError, at_least, between, check_flags, cli, first_line,
                    json_checksum, os_error_line, progress, rank_world, read_json, save_atomic,
                    setup_device, weights_checksum)
from data import (Captioned, CodeViews, Joined, caption_dataset, captions_of, check_image_size,
                  image_dataset)
from text import T5_CONFIGS, TextEncoder, clean_caption
from tokenizer import VQModel, tokenizer_checksum, vq_config


# -- Receipts: how a folder was made, checked before codes, features and models are paired ---------
def _fields(cls, d, where, what):
    """A receipt's fields from its JSON dict (unknown keys ignored); a missing one is one line."""
    names = [f.name for f in dataclasses.fields(cls)]
    if missing := [k for k in names if not isinstance(d, dict) or k not in d]:
        raise UserError(f"{where}: the {what} receipt lacks {missing[0]!r}; it was not written by "
                        "codes.py (or is damaged): extract them again")
    return {k: d[k] for k in names}


@dataclasses.dataclass(frozen=True)
class CodesReceipt:
    """A codes folder's meta.json, also a GPT checkpoint's "meta": codes mean something only to the
    tokenizer that made them."""
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
    def from_dict(cls, d, where):  # a meta.json or a checkpoint's "meta", named `where`
        kept = _fields(cls, d, where, "codes")
        try:  # JSON has no tuples: back to the record's own form, or equal receipts would differ
            kept.update(grid=tuple(int(n) for n in kept["grid"]), classes=tuple(kept["classes"]))
            if len(kept["grid"]) != 2:
                raise ValueError
        except (TypeError, ValueError):
            raise UserError(f"{where}: the codes receipt's grid {d['grid']!r} is not two numbers; "
                            "extract the codes again") from None
        return cls(**kept)

    def to_dict(self):
        return {**dataclasses.asdict(self), "grid": list(self.grid), "classes": list(self.classes)}

    def check_same_tokenizer(self, other, mine="these codes", theirs="the others"):
        """One line unless `other` was made by the same tokenizer (a GPT reads others' as noise)."""
        differ = [f"{name} {show(getattr(self, k))} vs {show(getattr(other, k))}" for k, name, show
                  in (("tokenizer_checksum", "tokenizer checksum", lambda c: c[:16]),
                      ("vocab_size", "vocab", str), ("grid", "grid", list))
                  if getattr(self, k) != getattr(other, k)]
        if differ:
            raise UserError(f"the codes of {mine} come from another tokenizer than those in "
                            f"{theirs} ({', '.join(differ)}): extract codes with the tokenizer "
                            f"of {mine}, or start afresh")


@dataclasses.dataclass(frozen=True)
class FeaturesReceipt:
    """A features folder's features.json: what made the features, and of which captions."""
    encoder: str  # a name for people: the T5 folder's name (flan-t5-xl)
    encoder_checksum: str  # encoder_checksum(): weights, vocabulary and caption cleaning
    length: int  # N, the tokens per caption the features were padded or truncated to (120)
    d_model: int  # width of each feature vector (2048 for FLAN-T5-XL)
    dtype: str  # storage: "float16", or "bfloat16" kept as its uint16 bit patterns
    compute_dtype: str  # the encoder's precision while encoding: "float32" or "bfloat16"
    clean: bool  # LlamaGen's caption cleaning applied before tokenizing
    count: int  # captions, one per codes row
    captions_checksum: str  # captions_checksum() of the captions, in item order
    data: str  # where the captions came from: a codes folder (absolute path) or a caption spec

    to_dict = dataclasses.asdict
    from_dict = classmethod(lambda cls, d, where: cls(**_fields(cls, d, where, "features")))


def encoder_checksum(text_encoder):
    """sha256 of what turns a caption into features: T5 weights (as bfloat16), pieces, cleaning."""
    tok = text_encoder.tokenizer
    vocab = json.dumps([tok.pieces, tok.vocab, tok.unk_id, tok.eos_id, tok.pad_id,
                        tok.split_any_space, tok.special_ids, bool(text_encoder.clean)],
                       sort_keys=True, ensure_ascii=False)
    weights = weights_checksum(text_encoder.encoder, as_dtype=torch.bfloat16)
    return hashlib.sha256(f"{weights};{vocab}".encode()).hexdigest()


def write_json(path, obj):
    """Atomically: a crash never leaves a receipt vouching for rows that are not on disk."""
    save_atomic(lambda f: f.write(json.dumps(obj, indent=1).encode()), path)


# captions.json: a codes folder's captions in row order, with the checksum the features receipt
# quotes, so that codes row i and features item i are checked to describe one image
captions_checksum = json_checksum


def read_captions(folder):
    """(captions in row order, checksum) of a codes folder; an entry: a caption or a list (COCO)."""
    if not os.path.isfile(path := os.path.join(str(folder), "captions.json")):
        raise UserError(f"{folder} holds no captions.json: its codes are not of captioned data; "
                        "extract them with --data scenes:N, coco:... or captions:DIR")
    raw = read_json(path)
    captions = raw.get("captions")
    if not isinstance(captions, list) or captions_checksum(captions) != raw.get("checksum"):
        raise UserError(f"{path} is damaged (its captions do not match their checksum); extract "
                        "the codes again")
    return captions, raw["checksum"]


# -- The one sharded, resumable writer behind both extractions -------------------------------------
@contextlib.contextmanager
def process_group(device):
    """(rank, world) under torchrun's process group, made here unless the caller has one."""
    own = rank_world()[1] > 1 and not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    try:
        yield rank_world()
    finally:
        if own:
            dist.destroy_process_group()


def write_sharded(out, name, receipt, fill, join, what, redo, batch_size=None):
    """Write folder `out`, its receipt `name` last (a finished one is kept; of another receipt,
    refused). fill(parts, tag, lo, hi, state) writes this rank's rows [lo, hi) from `state` on,
    yielding (rows, progress) per flushed batch; then rank 0 runs join(parts, world)."""
    rank, world = rank_world()
    meta, path, parts = receipt.to_dict(), os.path.join(out, name), os.path.join(out, "parts")
    if os.path.exists(path):
        if (found := read_json(path)) != meta:
            key = next((k for k in meta if found.get(k) != meta[k]), "data")
            raise UserError(f"{out} already holds finished {what} with {key}={found.get(key)!r} "
                            f"(this run: {meta[key]!r}); {redo} to replace them, or choose "
                            "another --out")
        if rank == 0:  # parts are left over if a run stopped right after writing the receipt
            shutil.rmtree(parts, ignore_errors=True)
            print(f"{out} already holds these {what}; nothing to do")
        return receipt
    stale = [f for f in (os.listdir(parts) if os.path.isdir(parts) else [])
             if f.startswith("progress-") and not f.endswith(f"-of-{world}.json")]
    if stale:  # the shards' boundaries depend on the number of processes
        raise UserError(f"{out} holds an unfinished extraction with another number of processes "
                        f"({stale[0]}); resume it with that many, or {redo} to start over")
    tag, fixed = f"{rank}-of-{world}", {} if batch_size is None else {"batch_size": batch_size}
    progress_path = os.path.join(parts, f"progress-{tag}.json")
    state = read_json(progress_path) if os.path.exists(progress_path) else None
    if state is not None and (state.get("meta") != meta or not isinstance(state.get("done"), int)):
        raise UserError(f"{out} holds an unfinished extraction with other settings; rerun that "
                        f"command to finish it, or {redo} to start over")
    if state is not None and state.get("batch_size") != batch_size:
        raise UserError(f"{out} holds an unfinished extraction with --batch-size "
                        f"{state.get('batch_size')}; resume it with that batch size")
    unit, done = batch_size or 1, state["done"] if state else 0
    lo, hi = (min(receipt.count, math.ceil(receipt.count / unit) * k // world * unit)
              for k in (rank, rank + 1))  # a batch holds the same rows in any world
    if done < hi - lo:
        os.makedirs(parts, exist_ok=True)
        with progress(total=hi - lo, initial=done, desc=what, show=rank == 0) as bar:
            for rows, state in fill(parts, tag, lo, hi, state):
                write_json(progress_path, dict(meta=meta, **fixed, **state))
                bar.update(rows)
    if world > 1:  # rank 0 joins the parts only once every shard is complete
        dist.barrier()
    if rank == 0:
        join(parts, world)
        write_json(path, meta)
        shutil.rmtree(parts, ignore_errors=True)
    return receipt


def _join(parts, world, name, dst, rows=None):
    """The ranks' part files `name` ({} for the tag) -> dst: renamed, or joined (.npy: `rows`)."""
    paths = [p for p in (os.path.join(parts, name.format(f"{k}-of-{world}")) for k in range(world))
             if os.path.exists(p)]
    if world == 1 and paths:  # (none if a run renamed it, then stopped)
        os.replace(paths[0], dst)
    elif world > 1 and rows is None:
        with open(dst, "wb") as joined:
            for p in paths:
                with open(p, "rb") as part:
                    shutil.copyfileobj(part, joined, 1 << 24)
    elif world > 1:
        srcs = [np.load(p, mmap_mode="r") for p in paths]
        if sum(map(len, srcs)) != rows:
            raise UserError(f"the part files of {dst} are incomplete; rerun with --overwrite")
        joined = _open_part(dst, "w+", srcs[0].dtype, (rows, *srcs[0].shape[1:]))
        row = 0
        for src in srcs:
            for i in range(0, len(src), 65536):  # in chunks: a shard can exceed the memory
                joined[row + i:row + min(i + 65536, len(src))] = src[i:i + 65536]
            row += len(src)
        joined.flush()


# -- Codes -----------------------------------------------------------------------------------------
# codes.npy [N, n_aug, L] (uint16 while the codebook fits, else int32), labels.npy [N]: n_aug views
# per image (data.code_views), training draws one per access; a captioned image has one.
def _open_part(path, mode, dtype, shape):
    """A memory-mapped .npy file with all its blocks reserved now: on a full disk a memory map
    dies of SIGBUS at write-back with no message; posix_fallocate makes that one ENOSPC line."""
    try:
        array = np.lib.format.open_memmap(path, mode, dtype, shape)
        if hasattr(os, "posix_fallocate"):  # Linux and most Unixes; macOS has none
            with open(path, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # cannot preallocate
            array = None  # the map is closed, and a part made here gives its blocks back
            if mode == "w+" and os.path.isfile(path):
                os.remove(path)
            raise UserError(os_error_line(e, path)) from None
    return array


def extract_codes(vq, data, out, image_size=256, ten_crop=False, crop_range=1.1, batch_size=64,
                  num_workers=0, device="cpu", overwrite=False):
    """Encode `data` (an image_dataset spec) with tokenizer `vq` into codes folder `out`."""
    data, out = str(data), str(out)
    with process_group(device) as (rank, world):
        if overwrite and rank == 0:  # meta.json first: the mark of a finished folder
            for name in ("meta.json", "codes.npy", "labels.npy", "captions.json"):
                if os.path.isfile(os.path.join(out, name)):
                    os.remove(os.path.join(out, name))
            shutil.rmtree(os.path.join(out, "parts"), ignore_errors=True)
        if overwrite and world > 1:  # no rank looks for old files before they are gone
            dist.barrier()
        base = image_dataset(data, int(image_size * crop_range) if ten_crop else image_size,
                             augment="center", flip=False)  # no random flip: views mirror
        if isinstance(base, Joined):  # a GPT learns one world's labels or captions at a time
            raise UserError(f"--data {data!r} joins datasets, which only a tokenizer trains on; "
                            "extract the codes of each dataset on its own")
        if ten_crop and isinstance(base, Captioned):
            raise UserError(f"--ten-crop is for class labels: half its views are mirrored, against "
                            f"a caption's left and right; extract {data!r} without it (one view)")
        vq = vq.to(device).eval()  # no dropout: resumed and sharded runs write the same codes
        with torch.no_grad():  # the grid is probed: what the encoder outputs, the GPT predicts
            grid = tuple(vq.encode(torch.zeros(1, 3, image_size, image_size, device=device))
                         .shape[1:])
        vocab, length = vq.config.codebook_size, grid[0] * grid[1]
        r = CodesReceipt(vocab_size=vocab, grid=grid, image_size=image_size, count=len(base),
                         n_aug=10 if ten_crop else 1 if isinstance(base, Captioned) else 2,
                         tokenizer_checksum=tokenizer_checksum(vq), ten_crop=ten_crop,
                         crop_range=crop_range if ten_crop else None, data=base.spec,
                         codes_dtype="uint16" if vocab <= 2 ** 16 else "int32",  # 2 bytes a code
                         labels_dtype="int16" if base.num_classes <= 2 ** 15 else "int64",
                         num_classes=base.num_classes, classes=tuple(base.classes))
        views = CodeViews(base, image_size, ten_crop, mirror=r.n_aug == 2)

        def fill(parts, tag, lo, hi, state):
            done = state["done"] if state else 0
            mode = "r+" if done else "w+"  # "r+" reopens a shard to fill in the rest in place
            codes = _open_part(f"{parts}/codes-{tag}.npy", mode, r.codes_dtype,
                               (hi - lo, r.n_aug, length))
            labels = _open_part(f"{parts}/labels-{tag}.npy", mode, r.labels_dtype, (hi - lo,))
            for x, y in torch.utils.data.DataLoader(  # in order: part row j is image lo + j
                    torch.utils.data.Subset(views, range(lo + done, hi)), batch_size=batch_size,
                    num_workers=num_workers, pin_memory=str(device).startswith("cuda")):
                with torch.no_grad():  # fp32: under bf16 a near-tie between two codes could flip
                    batch = vq.encode(x.flatten(0, 1).to(device, non_blocking=True))
                codes[done:done + len(y)] = batch.view(len(y), r.n_aug, length).cpu().numpy()
                labels[done:done + len(y)] = y.numpy()
                codes.flush()
                labels.flush()  # the rows reach the file before the progress that vouches
                done += len(y)
                yield len(y), {"done": done}

        def join(parts, world):
            if isinstance(base, Captioned):  # row i's caption, for t2i training
                c = captions_of(base)
                write_json(os.path.join(out, "captions.json"),
                           dict(count=len(c), checksum=captions_checksum(c), captions=c))
            for name in ("codes", "labels"):
                _join(parts, world, name + "-{}.npy", os.path.join(out, f"{name}.npy"), r.count)

        return write_sharded(out, "meta.json", r, fill, join, "codes", "pass --overwrite")


# -- Caption features -----------------------------------------------------------------------------
# The t2i GPT reads no words, only a frozen FLAN-T5-XL's output, fixed for a caption: computed once.
# features.bin: the valid tokens' vectors of every caption in turn ([tokens, d_model], 2 bytes a
# number, little-endian, no header: a COCO caption fills ~15 of 120), lengths.npy [count] int32.
_STORED = {"bfloat16": "<u2", "float16": "<f2"}  # how each is laid out in features.bin


def extract_features(encoder, captions, out, length=120, batch_size=64, dtype="bfloat16", data="",
                     name="t5"):
    """Encode `captions` (an image's first) with a text.TextEncoder into features folder `out`."""
    captions, out, d = list(captions), str(out), encoder.encoder.config.d_model
    if not captions or not all(isinstance(c, (str, list)) for c in captions):
        raise UserError("extract_features needs a non-empty list of captions")
    r = FeaturesReceipt(encoder=name, encoder_checksum=encoder_checksum(encoder), length=length,
                        d_model=d, dtype=dtype, clean=bool(encoder.clean), count=len(captions),
                        compute_dtype=str(encoder.dtype).removeprefix("torch."), data=data,
                        captions_checksum=captions_checksum(captions))

    def fill(parts, tag, lo, hi, state):
        done, tokens = (state["done"], state["tokens"]) if state else (0, 0)
        try:
            files = [open(os.path.join(parts, f"{kind}-{tag}.bin"), "r+b" if done else "wb")
                     for kind in ("features", "lengths")]
        except FileNotFoundError:
            raise UserError(f"{parts} lost its part files; delete {parts} to start over") from None
        with files[0], files[1]:
            for f, size in zip(files, (tokens * d * 2, done * 4)):  # what the progress vouches for:
                f.truncate(size)  # a killed run may have written past it
                f.seek(size)
            for start in range(lo + done, hi, batch_size):
                texts = [c if isinstance(c, str) else c[0]  # an image's first caption
                         for c in captions[start:min(start + batch_size, hi)]]
                rows, counts = _encode_valid(encoder, texts, length, dtype, start)
                for f, b in zip(files, (rows, counts.astype("<i4").tobytes())):
                    f.write(b)
                    f.flush()  # the rows reach the file before the progress that vouches
                done, tokens = done + len(texts), tokens + int(counts.sum())
                yield len(texts), {"done": done, "tokens": tokens}

    def join(parts, world):  # an empty shard (more ranks than batches) wrote no files
        found = [os.path.join(parts, f"lengths-{k}-of-{world}.bin") for k in range(world)]
        lengths = np.concatenate([np.zeros(0, "<i4")] + [np.fromfile(p, "<i4") for p in found
                                                         if os.path.exists(p)]).astype(np.int32)
        save_atomic(lambda f: np.save(f, lengths), os.path.join(out, "lengths.npy"))
        _join(parts, world, "features-{}.bin", os.path.join(out, "features.bin"))
        if len(lengths) != r.count or os.path.getsize(os.path.join(out, "features.bin")) != \
                int(lengths.sum()) * d * 2:
            raise UserError(f"the part files in {parts} are incomplete; delete {out} and rerun")

    with process_group(encoder.device.type):
        return write_sharded(out, "features.json", r, fill, join, "caption features",
                             f"delete {out}", batch_size)


@torch.no_grad()
def _encode_valid(encoder, texts, length, dtype, start):
    """Captions -> (their valid tokens' features as little-endian 16-bit bytes, tokens of each),
    encoded at the longest caption, not N: with padding masked, pads change no valid token."""
    _, mask = encoder.tokenizer([clean_caption(t) if encoder.clean else t for t in texts], length)
    feats, mask = encoder.encode_captions(texts, int(mask.sum(1).max()), batch_size=len(texts))
    stored = feats.to(getattr(torch, dtype))  # cast first: an fp16 overflow exists only after
    bad = ~torch.isfinite(stored).all(2).all(1)  # pads are zeros: only real tokens can be bad
    if bad.any():
        k = int(bad.float().argmax())  # float: torch's argmax refuses bool tensors
        why = ("exceed float16's range (65504); store them as bf16 (--storage bf16)"
               if torch.isfinite(feats[k]).all() else
               "are not finite: check the weights, or run the encoder in fp32 (--precision fp32)")
        raise UserError(f"the features of caption {start + k} ({texts[k][:40]!r}) {why}")
    bits = stored[mask].cpu().view(torch.int16).numpy().astype("<i2")  # bf16: its bit pattern
    return bits.tobytes(), mask.sum(1).cpu().numpy()


def load_captions(spec):
    """(captions, data) for `features --data`: a codes folder's, or a caption spec's (no image)."""
    if os.path.isdir(spec) and any(os.path.exists(os.path.join(spec, f))
                                   for f in ("captions.json", "meta.json", "parts")):
        return read_captions(spec)[0], os.path.abspath(spec)
    ds = caption_dataset(spec, 32)
    return captions_of(ds), ds.spec


# -- Reading back ----------------------------------------------------------------------------------
# Memory maps open lazily in each process (a DataLoader worker gets a path, not a copy of the data);
# the folder is checked at once, in the main process.
def _receipt(folder, name, kind, flags):
    """The receipt dict of a finished extraction into `folder`, or one line for what is there."""
    fix = f"python codes.py {kind} {flags} --out {folder}"
    what = "codes" if kind == "extract" else "caption features"
    if not os.path.isdir(folder):
        raise UserError(f"{what.split()[-1]} folder {folder!r} does not exist; make it with {fix}"
                        + (f" (or name a T5 config: {', '.join(T5_CONFIGS)})" * (what != "codes")))
    if os.path.exists(os.path.join(folder, name)):
        return read_json(os.path.join(folder, name))
    if os.path.isdir(os.path.join(folder, "parts")):
        raise UserError(f"the extraction into {folder!r} did not finish; rerun the same {kind} "
                        "command to resume it")
    raise UserError(f"{folder!r} holds no {what} (no {name}); make them with {fix}")


class CodesDataset(torch.utils.data.Dataset):
    """A codes folder: item -> (codes int64 [L], label int64), a random one of the n_aug views."""

    def __init__(self, folder):
        self.folder = folder = str(folder)
        raw = _receipt(folder, "meta.json", "extract", "--vq-ckpt TOKENIZER.pt --data DATA")
        self.receipt = r = CodesReceipt.from_dict(raw, os.path.join(folder, "meta.json"))
        self.num_classes, self._codes, self._labels = r.num_classes, None, None
        codes, labels = self._arrays()
        if codes.shape != (r.count, r.n_aug, r.grid[0] * r.grid[1]) or labels.shape != (r.count,):
            raise UserError(f"{folder}: codes.npy {codes.shape} / labels.npy {labels.shape} "
                            "disagree with meta.json; the folder is damaged, extract it again")
        # an out-of-vocabulary code would crash the embedding (a CUDA assert): checked 16M at a time
        flat = codes.reshape(len(codes), -1)
        step = max(1, (1 << 24) // max(flat.shape[1], 1))
        for i in range(0, len(flat), step):
            bad = (flat[i:i + step] >= r.vocab_size) | (flat[i:i + step] < 0)
            if bad.any():
                row = i + int(bad.any(1).argmax())
                raise UserError(f"{folder}: codes.npy row {row} holds code "
                                f"{int(flat[row][bad[row - i]][0])}, outside the vocabulary of "
                                f"{r.vocab_size} codes in meta.json; the folder is damaged, "
                                "extract it again")
        if len(labels) and not (0 <= labels.min() and labels.max() < r.num_classes):
            raise UserError(f"{folder}: labels.npy holds labels outside [0, {r.num_classes}) of "
                            "meta.json; the folder is damaged, extract it again")

    def _arrays(self):
        if self._codes is None:
            try:
                self._codes, self._labels = (np.load(os.path.join(self.folder, f"{n}.npy"),
                                                     mmap_mode="r") for n in ("codes", "labels"))
            except (OSError, ValueError) as e:  # numpy's advice to allow_pickle is not passed on
                why = ("it holds Python objects, not codes" if "pickle" in str(e) or
                       "object" in str(e).lower() else first_line(e))
                raise UserError(f"{self.folder}: cannot read the codes ({why}); "
                                "extract them again") from None
        return self._codes, self._labels

    def __getstate__(self):
        return {**self.__dict__, "_codes": None, "_labels": None}

    def __len__(self):
        return self.receipt.count

    def __getitem__(self, index):
        codes, labels = self._arrays()
        view = int(torch.randint(self.receipt.n_aug, ()))
        return (torch.from_numpy(codes[index, view].astype(np.int64)),  # int64: nn.Embedding's
                torch.tensor(int(labels[index])))


class MixedCodes(torch.utils.data.Dataset):
    """Codes folders of the same images, one drawn per access: the official GPTs mixed ten crops at
    crop_range 1.1 and 1.05 so (dataset/imagenet.py)."""

    def __init__(self, folders):
        self.parts = [CodesDataset(f) for f in folders]
        self.receipt, self.num_classes = self.parts[0].receipt, self.parts[0].num_classes
        for p in self.parts[1:]:  # row-aligned: equal receipts and equal labels row by row
            if any(getattr(p.receipt, k) != getattr(self.receipt, k)
                   for k in ("count", "vocab_size", "grid", "tokenizer_checksum")) or \
                    not np.array_equal(p._arrays()[1], self.parts[0]._arrays()[1]):
                raise UserError(f"{p.folder} and {self.parts[0].folder} do not hold codes of the "
                                "same images by the same tokenizer; extract both from one --data "
                                "with one tokenizer")

    def __len__(self):
        return len(self.parts[0])

    def __getitem__(self, index):
        return self.parts[int(torch.randint(len(self.parts), ()))][index]


def codes_dataset(spec):
    """The GPT's --data: one codes folder, or several joined by commas (MixedCodes)."""
    spec = str(spec)
    folders = [spec] if os.path.isdir(spec) else [f for f in spec.split(",") if f]
    if not folders:
        raise UserError(f"--data {spec!r} names no codes folder; pass one, or several as A,B")
    return CodesDataset(folders[0]) if len(folders) == 1 else MixedCodes(folders)


class CaptionFeatures(torch.utils.data.Dataset):
    """A features folder: item i -> (features float32 [N, d_model], mask bool [N]), right-padded."""

    def __init__(self, folder):
        self.folder = folder = str(folder)
        raw = _receipt(folder, "features.json", "features", "--data CODES_OR_CAPTIONS --t5 T5")
        try:
            lengths = np.load(os.path.join(folder, "lengths.npy"))
            size = os.path.getsize(os.path.join(folder, "features.bin"))
        except (OSError, ValueError) as e:
            raise UserError(f"{folder}: cannot read the features ({first_line(e)}); extract them "
                            "again") from None
        self.receipt = r = FeaturesReceipt.from_dict(raw, os.path.join(folder, "features.json"))
        if lengths.shape != (r.count,) or size != int(lengths.sum()) * r.d_model * 2:
            raise UserError(f"{folder}: features.bin ({size} bytes) and lengths.npy disagree "
                            "with features.json; the folder is damaged, extract it again")
        self.offsets, self._rows = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]), None

    def __getstate__(self):
        return {**self.__dict__, "_rows": None}

    def __len__(self):
        return self.receipt.count

    def __getitem__(self, index):
        index, r = range(len(self))[index], self.receipt  # IndexError past the end, as a list
        if self._rows is None:
            self._rows = np.memmap(os.path.join(self.folder, "features.bin"), _STORED[r.dtype],
                                   "r", shape=(int(self.offsets[-1]), r.d_model))
        a, n = int(self.offsets[index]), int(self.offsets[index + 1] - self.offsets[index])
        rows = torch.from_numpy(np.array(self._rows[a:a + n]))  # a copy: the map is read-only
        if r.dtype == "bfloat16":  # the bit patterns, reinterpreted, not converted
            rows = rows.view(torch.int16).view(torch.bfloat16)
        mask = torch.arange(r.length) < n
        return torch.cat([rows.float(), torch.zeros(r.length - n, r.d_model)]), mask

    def check_codes(self, codes_folder):
        """One line unless codes row i in `codes_folder` is the image of caption i here."""
        _, checksum = read_captions(codes_folder)
        if checksum != self.receipt.captions_checksum:
            raise UserError(f"the caption features in {self.folder} were made from other captions "
                            f"(captions {self.receipt.captions_checksum[:12]}) than the codes in "
                            f"{codes_folder} (captions {checksum[:12]}); extract features with "
                            f"--data {codes_folder}")


# -- command line ----------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="a dataset -> a codes folder for GPT training")
    which = ex.add_mutually_exclusive_group(required=True)
    which.add_argument("--vq-ckpt", help="ours, or the official vq_ds16_c2i.pt / vq_ds8_c2i.pt")
    which.add_argument("--vq-config", help="a tokenizer config with random weights (seed 0)")
    ex.add_argument("--data", required=True, help="an ImageNet-layout folder, 'synthetic[:N]', "
                    "or captioned images: 'scenes[:N]', 'coco:ANN.json:IMAGES', 'captions:DIR'")
    ex.add_argument("--out", required=True, help="codes folder (codes.npy, labels.npy, meta.json)")
    ex.add_argument("--overwrite", action="store_true", help="remove an earlier extraction there")
    ex.add_argument("--image-size", type=int, default=256,
                    help="a multiple of the tokenizer's downsampling (default: 256)")
    ex.add_argument("--ten-crop", action="store_true", help="10 views per image (corners + "
                    "centre of it and of its mirror), not 2 (it and its mirror)")
    ex.add_argument("--crop-range", type=float, help="with --ten-crop: centre-crop to "
                    "int(image_size * crop_range) first (default: 1.1; the paper also uses 1.05)")
    ex.add_argument("--num-workers", type=int, default=4, help="DataLoader workers (default: 4)")
    ft = sub.add_parser("features", help="captions -> a frozen T5's features, for t2i training")
    ft.add_argument("--data", required=True, help="a codes folder of captioned data (the features "
                    "pair with its rows) or a caption spec ('scenes[:N]', 'coco:...', 'captions:')")
    ft.add_argument("--t5", required=True, help="a Hugging Face (FLAN-)T5 folder (flan-t5-xl)")
    ft.add_argument("--out", required=True, help="folder: features.bin, lengths.npy, features.json")
    ft.add_argument("--length", type=int, default=120, help="N, tokens per caption (default: 120)")
    ft.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="the "
                    "encoder's (auto: bf16 on GPUs that have it, else fp32; fp16 overflows T5)")
    ft.add_argument("--storage", choices=["bf16", "fp16"], default="bf16", help="2 bytes a number "
                    "(default: bf16; fp16 keeps 3 more bits, refused beyond 65504)")
    for q in (ex, ft):
        q.add_argument("--batch-size", type=int, default=64, help="per process (default: 64)")
        q.add_argument("--device", default="auto", help="cuda, mps or cpu (default: the best)")
    args = p.parse_args(argv)
    check_flags(args, {"batch_size": at_least(1), "num_workers": at_least(0),
                       "crop_range": at_least(1), "length": between(1, 1024),
                       "image_size": between(1, 4096)},
                [("crop_range", "--ten-crop", lambda a: a.ten_crop)])
    rank0 = rank_world()[0] == 0
    device = setup_device(args.device, tf32=False)  # fp32: codes are nearest-neighbour decisions
    if args.command == "extract":
        if os.path.isfile(args.out):  # fail before the tokenizer loads
            raise UserError(f"--out {args.out} is a file; codes go into a folder, choose another")
        os.makedirs(args.out, exist_ok=True)  # an OSError here is one line (common.cli)
        tempfile.TemporaryFile(dir=args.out).close()  # a real file: catches read-only mounts
        torch.manual_seed(0)  # --vq-config: the same random weights in every process
        vq = VQModel.from_pretrained(args.vq_ckpt) if args.vq_ckpt else \
            VQModel(vq_config(args.vq_config))
        check_image_size(args.image_size, vq.config.downsample)
        r = extract_codes(vq, args.data, args.out, args.image_size, args.ten_crop,
                          args.crop_range or 1.1, args.batch_size, args.num_workers, device,
                          overwrite=args.overwrite)
        if rank0:  # the checksum's first 12 hex digits are what train.py and sample.py quote
            print(f"wrote {args.out}: {r.count} images x {r.n_aug} views x {r.grid[0]}x"
                  f"{r.grid[1]} codes (vocab {r.vocab_size}, tokenizer "
                  f"{r.tokenizer_checksum[:12]})")
        return
    captions, data = load_captions(args.data)
    if not os.path.isdir(t5 := os.path.expanduser(args.t5)):
        raise UserError(f"--t5 {args.t5!r} is not a folder; pass a Hugging Face T5 folder "
                        "(google/flan-t5-xl: config.json, spiece.model, model.safetensors)")
    precision = args.precision if args.precision != "auto" else "bf16" if \
        device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    encoder = TextEncoder.from_pretrained(t5, device, DTYPES[precision])
    name = os.path.basename(os.path.normpath(t5))  # normpath: flan-t5-xl/ would name nothing
    r = extract_features(encoder, captions, args.out, args.length, args.batch_size,
                         str(DTYPES[args.storage]).removeprefix("torch."), data, name)
    if rank0:
        tokens = int(np.load(os.path.join(args.out, "lengths.npy")).sum())
        print(f"wrote {args.out}: {r.count} captions, {tokens} tokens ({tokens / r.count:.1f} "
              f"per caption, N {r.length}) x {r.d_model} {r.dtype} (encoder {name} "
              f"{r.encoder_checksum[:12]}, captions {r.captions_checksum[:12]})")


if __name__ == "__main__":
    cli(main)
