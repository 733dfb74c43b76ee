"""The few helpers every script shares: the device, safe checkpoint I/O, and one-line errors.

One copy of each, so that train.py, sample.py, data.py and fid.py load, save and fail the same way.
"""
import argparse
import os
import sys
import tempfile

import torch


class UserError(ValueError):
    """Bad input from the user (a path, a flag, a checkpoint). CLIs print it as one line and exit 2."""


def cli(main):
    """Run `main()`; a UserError becomes one line on stderr and exit code 2, never a traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def pick_device(name=None):
    """'cuda' if there is a GPU, else Apple's 'mps', else 'cpu'; an explicit name wins."""
    if name and name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but this torch sees no CUDA GPU; use --device cpu")
        if name == "mps" and not torch.backends.mps.is_available():
            raise UserError("--device mps asked for, but MPS is not available here; use --device cpu")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_checkpoint(path):
    """torch.load with weights_only=True. The official LlamaGen files pickle an argparse.Namespace
    under "args"; it is allow-listed by name instead of turning the safety off."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} does not exist; check the path")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated download, not a torch file, a pickled class we do not trust
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path!r} ({first}); re-download or re-save it") from None


def unwrap_state_dict(ckpt):
    """The weights inside any of the containers in use: our own and the official DDP trainer's
    {"model": ...}, DeepSpeed's {"module": ...}, {"state_dict": ...}, or a bare FSDP consolidated dict.
    A checkpoint with an "ema" dict (train.py --ema) yields its exponential moving average."""
    ema = ckpt.get("ema") if isinstance(ckpt, dict) else None
    for key in ("model", "module", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if isinstance(ema, dict):  # trained with --ema: sample from the averaged weights (buffers from "model")
        ckpt = {**ckpt, **ema}
    if not isinstance(ckpt, dict) or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise UserError("checkpoint holds no state dict (looked under 'model', 'module', 'state_dict')")
    # torch.compile and DDP wrap parameter names; strip their prefixes so every producer loads the same
    return {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt.items()}


def load_weights(module, state_dict, what, ignore=(), hint=""):
    """Strict loading with a readable failure. Keys matching a prefix/suffix in `ignore` (runtime buffers
    such as KV caches) are dropped; any other missing, unexpected or wrongly-shaped tensor raises one
    UserError naming the key, both shapes and `hint` (for example, the config that would fit)."""
    sd = {k: v for k, v in state_dict.items() if not any(s in k for s in ignore)}
    own = module.state_dict()
    hint = f"; {hint}" if hint else ""
    for k, v in own.items():
        if k not in sd:
            raise UserError(f"{what}: weight {k!r} missing from the checkpoint{hint}")
        if sd[k].shape != v.shape:
            raise UserError(f"{what}: {k!r} expected shape {tuple(v.shape)}, found {tuple(sd[k].shape)}{hint}")
    extra = sorted(set(sd) - set(own))
    if extra:
        raise UserError(f"{what}: unexpected weight {extra[0]!r} (+{len(extra) - 1} more) in the checkpoint{hint}")
    module.load_state_dict(sd, strict=True)
    return module


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a crash leaves the old file or
    the new one, never half of one."""
    save_file_atomic(path, lambda f: torch.save(obj, f))


def save_file_atomic(path, write):
    """Call write(file_object) on a temporary file beside `path`, then rename it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    except OSError as e:
        raise UserError(f"cannot write to {path!r} ({e.strerror}); choose a writable location") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
