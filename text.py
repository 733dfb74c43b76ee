"""The text side of LlamaGen's text-to-image model: FLAN-T5's encoder and its SentencePiece tokenizer.

Why a frozen language model (paper 3.3): the t2i GPT never reads words. A caption is cleaned, cut into
SentencePiece pieces, and run through the encoder of FLAN-T5-XL, a 1.2B-parameter model trained on far
more text than any image-caption set holds; its 120 x 2048 output is the GPT's prefix. Learning a text
encoder from captions alone would see a few hundred million short, noisy sentences; the frozen one
brings what it learnt from the whole C4 corpus and instruction tuning, costs nothing to train, and its
features can be computed once per caption and stored (the way image codes are).

Layout, bottom-up: the safetensors reader and writer, Hugging Face folder loading, the T5 encoder
(layer norm, relative position bias, attention, gated-GELU FFN, blocks, T5Config, T5Encoder), the
unigram tokenizer (protobuf reader, normalisation, Viterbi), caption cleaning, TextEncoder (the one
call the GPT needs), a small CLI, then the config registry. Key names and file layouts are the ones
Hugging Face publishes (google/flan-t5-xl), so the real files load unchanged.
"""
import argparse
import html
import json
import math
import os
import re
import struct
import sys
import unicodedata
import urllib.parse
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, cli, load_checkpoint, pick_device, save_file_atomic

# -------------------------------------------------------------------------------------------- safetensors
# A safetensors file is: 8 bytes (little-endian u64) N, then N bytes of JSON header
#   {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {str: str}}
# (space-padded), then the raw little-endian row-major tensor bytes; offsets count from the end of the
# header. No pickle, so nothing runs on load, and the bytes can be memory-mapped as they lie.
ST_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
             "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
             "U32": torch.uint32, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
             "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
             "C64": torch.complex64}
if hasattr(torch, "float8_e8m0fnu"):  # the scale type of microscaling formats, torch >= 2.7
    ST_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def read_safetensors_header(path):
    """(header dict without __metadata__, metadata dict, byte offset of the data, file size)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such safetensors file; check the path")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: truncated safetensors file ({size} bytes, no header length); "
                            "re-download it")
        n = struct.unpack("<Q", head)[0]
        if n > min(size - 8, 100 * 2 ** 20):  # the official reader caps headers at 100 MB
            raise UserError(f"{path}: header length {n} does not fit a {size}-byte file; the file is "
                            "truncated or not safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        assert isinstance(header, dict)
    except (UnicodeDecodeError, ValueError, AssertionError):
        raise UserError(f"{path}: bad safetensors header (not a JSON object); the file is damaged or "
                        "not safetensors") from None
    meta = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        try:
            dtype, shape, (begin, end) = ST_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
            ok = all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(begin, int)
            ok = ok and isinstance(end, int) and 0 <= begin <= end
        except (TypeError, KeyError, ValueError):
            ok, dtype = False, True
        if not ok:
            raise UserError(f"{where} has a bad header entry {info!r}; the file is damaged")
        if dtype is None:
            raise UserError(f"{where} has dtype {info['dtype']!r}, which torch does not have here")
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if end - begin != nbytes:
            raise UserError(f"{where}: header says {info['dtype']} {shape} ({nbytes} bytes) but "
                            f"data_offsets span {end - begin} bytes; the header lies about the shape")
        if end > data_size:
            raise UserError(f"{where} ends at byte {end} of the data, beyond the {data_size} bytes "
                            "present: the file is truncated; re-download it")
    return header, meta, 8 + n, size


def read_safetensors(path, keep=None):
    """{name: tensor} of a .safetensors file, memory-mapped: the tensors are views of the file's pages
    (copy-on-write, so writing to one never changes the file), read from disk only when touched; no
    second copy is made in RAM. `keep(name) -> bool` selects tensors before any is touched."""
    header, _, start, size = read_safetensors_header(path)
    names = [k for k in header if keep is None or keep(k)]
    if not names:
        return {}
    # shared=False maps the file privately (MAP_PRIVATE): pages come from the page cache on demand
    buf = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
    out = {}
    for name in names:
        info = header[name]
        begin, end = info["data_offsets"]
        dtype = ST_DTYPES[info["dtype"]]
        t = buf[start + begin: start + end]
        if (start + begin) % torch.empty(0, dtype=dtype).element_size():
            t = t.clone()  # a view as a wider type needs an aligned address; the official writer aligns
        out[name] = t.view(dtype).reshape(info["shape"])
    return out


def write_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as a safetensors file the official library reads. Tensors are laid out by
    decreasing element size, so every offset stays aligned for the memory-mapped views above."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset = {}, 0
    for k in order:
        t = tensors[k]
        if t.dtype not in ST_NAMES:
            raise UserError(f"tensor {k!r}: dtype {t.dtype} has no safetensors name")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data then starts at a multiple of 8 bytes

    def write(f):
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k in order:
            t = tensors[k].detach().cpu().contiguous()
            if t.numel():  # the bytes as they lie in memory (little-endian on every platform torch runs)
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    save_file_atomic(path, write)


def load_hf_state_dict(path, keep=None):
    """The weights of a Hugging Face folder or file as {name: tensor}, nothing renamed. Looks for, in this
    order: model.safetensors.index.json (shards), model.safetensors, pytorch_model.bin.index.json,
    pytorch_model.bin. safetensors are memory-mapped and `keep(name) -> bool` drops tensors before they
    are read; a .bin is a pickle, loaded whole with torch.load(weights_only=True), then filtered."""
    keep = keep or (lambda name: True)
    if os.path.isdir(path):
        for name in ("model.safetensors.index.json", "model.safetensors",
                     "pytorch_model.bin.index.json", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return load_hf_state_dict(os.path.join(path, name), keep)
        raise UserError(f"{path}: no model.safetensors, pytorch_model.bin or index of shards in this "
                        "folder; point to a Hugging Face model folder")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file or folder; check the path")
    if path.endswith(".json"):  # an index: {"weight_map": {tensor name: shard file}}
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}: not a shard index (no 'weight_map'); re-download it") from None
        folder, out = os.path.dirname(path), {}
        for shard in sorted({v for k, v in weight_map.items() if keep(k)}):
            file = os.path.join(folder, shard)
            if not os.path.isfile(file):
                raise UserError(f"{path} names shard {shard!r}, which is missing from {folder}; "
                                "download every shard")
            wanted = {k for k, v in weight_map.items() if v == shard and keep(k)}
            part = load_hf_state_dict(file, lambda k: k in wanted)
            if wanted - set(part):
                raise UserError(f"{file}: tensor {sorted(wanted - set(part))[0]!r} named in the index "
                                "is not in this shard; re-download it")
            out.update(part)
        return out
    if path.endswith(".safetensors"):
        return read_safetensors(path, keep)
    sd = load_checkpoint(path)
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{path}: holds no flat state dict of tensors; not a Hugging Face weight file")
    return {k: v for k, v in sd.items() if keep(k)}
