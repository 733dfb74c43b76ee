"""Speed, measured: `python bench.py [--only gpt,vq,train,fid] [--device cuda]`.

Every figure in the README comes from here, quoted with the machine it ran on. Timed tests are not used:
speed depends on the machine, correctness does not.
"""
import argparse
import platform
import time

import torch

from common import pick_device


def timed(fn, warmup=1, repeat=3, device="cpu"):
    """Best wall-clock seconds of `repeat` calls after `warmup` calls (synchronising the GPU)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_gpt(args):
    """GPT-B sampling: tokens/s and ms per 256-token image, batch 1 and 16, CFG, fp32/bf16, +-compile."""
    raise NotImplementedError


def bench_train(args):
    """Training step (forward + backward + AdamW) tokens/s for GPT-B and a small config; MFU on GPUs."""
    raise NotImplementedError


def bench_vq(args):
    """VQ-16 encode and decode images/s at 256 px, batch 1 and 16, fp32 and bf16."""
    raise NotImplementedError


def bench_fid(args):
    """Frechet distance of two 10k x 2048 feature sets; Inception feature throughput in images/s."""
    raise NotImplementedError


BENCHES = {"gpt": bench_gpt, "train": bench_train, "vq": bench_vq, "fid": bench_fid}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {list(BENCHES)}")
    p.add_argument("--device", default="auto", help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats, for a smoke run")
    args = p.parse_args()
    args.device = pick_device(args.device)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else ""
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads {gpu}, "
          f"torch {torch.__version__}, device {args.device}")
    for name in args.only.split(","):
        print(f"\n== {name}: {BENCHES[name].__doc__.strip()}")
        BENCHES[name](args)


if __name__ == "__main__":
    main()
