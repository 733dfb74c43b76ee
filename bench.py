"""Speed, measured: `python bench.py [--only gpt,vq,train,fid] [--device cuda] [--quick]`.

Every speed figure in the README comes from here, quoted with the machine it ran on. The tests time
nothing: speed depends on the machine, correctness does not. Models carry random weights (a forward
pass costs the same whatever the numbers), so nothing is downloaded.

How to read the figures: these are wall-clock minima of a few repeats, so they are the machine's
best case, not its average. On a shared 2-core VM a neighbour's job can double a figure; compare two
codes only within one run (the same process, the same minute), never across runs or machines. At
small batch the GPT's decode step is bound by memory bandwidth (every weight is read once per
token), so its floor is weight bytes / bandwidth; training and the tokenizer are bound by
arithmetic, so they are quoted against the chip's peak FLOP/s instead (MFU)."""
import argparse
import platform
import time

import torch

from common import UserError, cli, first_line, pick_device


def timed(fn, warmup=1, repeat=3, device="cpu"):
    """Best wall-clock seconds of `repeat` calls after `warmup` calls. The warm-up pays the
    one-time costs (CUDA context, kernel selection, compilation, allocator growth); the best of the
    repeats, not their mean, is the figure least disturbed by whatever else the machine runs. GPU
    kernels run asynchronously: the clock stops only after synchronising."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    # perf_counter: a monotonic clock with sub-microsecond resolution, unaffected by clock changes
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_gpt(args):
    """GPT-B sampling: tokens/s and ms per 256-token image, batch 1 and 16, CFG, fp32/bf16,
    with and without torch.compile."""
    import copy

    from model import GPT, gpt_config
    torch.manual_seed(0)
    base = GPT(gpt_config("B")).eval()  # random weights: the speed does not depend on them
    cuda = args.device.startswith("cuda")
    # memory bandwidth in bytes/s (SXM parts; the PCIe H100 listed first, as names contain
    # "H100" in both): batch-1 sampling reads every weight once per token, so bandwidth bounds it
    bandwidths = {"A100": 2.0e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12}
    hbm = next((v for k, v in bandwidths.items()
                if cuda and k in torch.cuda.get_device_name()), None)
    # one token per forward pass: at batch 1 the GPU waits on memory and on Python's launch of
    # each of its many small kernels, which compiling the per-token step fuses into fewer
    for compiled in ([False] if args.quick else [False, True]):
        for dtype in (torch.float32, torch.bfloat16):
            model = copy.deepcopy(base).to(args.device, dtype)  # the same weights in each run
            label = f"{str(dtype).removeprefix('torch.')} {'compiled' if compiled else 'eager'}"
            if compiled:  # only the per-token step: sampling and bookkeeping stay in Python
                torch._dynamo.reset()  # a fresh recompile budget for each dtype
                model.forward_cached = torch.compile(model.forward_cached, dynamic=True)
            for batch in ([1] if args.quick else [1, 16]):
                cond = torch.arange(batch, device=args.device) * 97 % 1000  # varied classes
                # CFG 4.0 doubles the batch (conditional + null rows), as real sampling does
                try:
                    sec = timed(lambda: model.generate(cond, cfg_scale=4.0), warmup=1,
                                repeat=1 if args.quick else 2, device=args.device)
                except Exception as e:  # torch.compile needs a working C++/Triton toolchain
                    print(f"GPT-B {label}: skipped ({type(e).__name__}: {first_line(e)[:100]})")
                    break
                floor = ""
                if hbm and batch == 1:  # each step must read every weight once from GPU memory
                    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
                    floor = f", bandwidth floor {weight_bytes / hbm * 256 * 1e3:.0f} ms"
                print(f"GPT-B sample {label:15s} batch {batch:2d}, CFG 4.0: "
                      f"{sec / batch * 1e3:8.0f} ms/image, {256 * batch / sec:7.1f} tokens/s"
                      f"{floor}", flush=True)


def bench_train(args):
    """Training step (forward + backward + AdamW) tokens/s for GPT-B and a small config; MFU on
    GPUs."""
    from model import GPT, gpt_config
    from train import configure_optimizers
    cuda = args.device.startswith("cuda")
    for name in (["micro"] if args.quick else ["micro", "B"]):
        torch.manual_seed(0)
        model = GPT(gpt_config(name)).to(args.device).train()
        # train.py's optimizer (fused AdamW on CUDA): its step is part of what a step costs
        opt = configure_optimizers(model, 0.05, 1e-4, (0.9, 0.95), args.device.split(":")[0])
        batch = (32 if cuda else 8) // (4 if args.quick else 1)
        L = model.config.block_size
        idx = torch.randint(0, model.config.vocab_size, (batch, L), device=args.device)
        cond = torch.randint(0, 1000, (batch,), device=args.device)

        def step():  # train.py's step without data loading: bf16 autocast on GPUs, fp32 on CPUs
            with torch.autocast(args.device.split(":")[0], torch.bfloat16, enabled=cuda):
                _, loss = model(idx, cond, targets=idx)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sec = timed(step, warmup=1, repeat=2 if args.quick else 3, device=args.device)
        tps = batch * L / sec
        mfu = model.estimate_mfu(tps, args.device)  # None off CUDA or on a GPU of unknown peak
        print(f"GPT-{name} train step, batch {batch} x {L} tokens, "
              f"{'bf16 autocast' if cuda else 'fp32'}: {tps:8.0f} tokens/s, {sec * 1e3:.0f} ms/step"
              + (f", MFU {mfu * 100:.1f}%" if mfu is not None else ""), flush=True)


def bench_vq(args):
    """VQ-16 encode and decode images/s at 256 px, batch 1 and 16, fp32 and bf16."""
    from tokenizer import VQModel, vq_config
    torch.manual_seed(0)
    model = VQModel(vq_config("VQ-16")).to(args.device).eval()
    dev = args.device.split(":")[0]
    for precision in ("fp32", "bf16"):
        for batch in (1, 4) if args.quick else (1, 16):
            images = torch.rand(batch, 3, 256, 256, device=args.device) * 2 - 1
            codes = torch.randint(0, 16384, (batch, 16, 16), device=args.device)  # a 16x16 grid
            bf16 = torch.autocast(dev, torch.bfloat16, enabled=precision == "bf16")
            repeat = 1 if args.quick else 3
            # the decoder is the heavier half (3 res blocks per level against the encoder's 2),
            # and the one sampling pays per image
            with torch.inference_mode(), bf16:
                enc = timed(lambda: model.encode(images), repeat=repeat, device=args.device)
                dec = timed(lambda: model.decode(codes), repeat=repeat, device=args.device)
            print(f"VQ-16 256px batch {batch:2d} {precision}: encode {batch / enc:7.2f} img/s, "
                  f"decode {batch / dec:7.2f} img/s ({1000 * dec / batch:.0f} ms per image)")


def bench_fid(args):
    """Frechet distance of two 10k x 2048 feature sets; Inception feature throughput in
    images/s; PSNR and SSIM throughput."""
    # 10k: the size of ADM's ImageNet reference batch; 2048: the Inception pool features' width
    import numpy as np

    import fid
    n = 2000 if args.quick else 10000
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, 2048), dtype=np.float32)
    b = rng.standard_normal((n, 2048), dtype=np.float32) * 1.1 + 0.1  # another distribution
    # the two costs of FID: the covariances (n x 2048 x 2048 each) and the matrix square root
    t0 = time.perf_counter()
    stats_a, stats_b = fid.statistics(a), fid.statistics(b)
    t_stats = time.perf_counter() - t0
    t_fd = timed(lambda: fid.frechet_distance(*stats_a, *stats_b), warmup=0, repeat=1)
    print(f"FID of {n} vs {n} x 2048 features: {t_stats + t_fd:.2f} s "
          f"(mean + covariance of both {t_stats:.2f} s, Frechet distance {t_fd:.2f} s)")
    # precision/recall compares every feature with every other: n^2 distances, on the device
    t_pr = timed(lambda: fid.precision_recall(a, b, device=args.device), warmup=0, repeat=1,
                 device=args.device)
    print(f"precision/recall, {n} vs {n} x 2048, k=3: {t_pr:.2f} s")
    batch = 4 if args.quick else 16
    net = fid.FIDInception()
    images = torch.rand(2 * batch, 3, 299, 299)  # two batches: fid.py's loop, not one call
    t_inc = timed(lambda: fid.compute_features(net, images, batch, args.device, progress=False),
                  warmup=1, repeat=1 if args.quick else 2, device=args.device)
    print(f"Inception features (pool, logits, spatial) at 299 px, batch {batch}: "
          f"{2 * batch / t_inc:.1f} images/s")
    # the tokenizer's metrics run over 50k images in fid.py: they must not be the slow part
    from tokenizer import psnr, ssim
    x = torch.rand(16 if args.quick else 64, 3, 256, 256, device=args.device) * 2 - 1
    y = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    t_ssim = timed(lambda: (psnr(x, y), ssim(x, y)), warmup=1, repeat=2, device=args.device)
    print(f"PSNR + SSIM (official 7x7 window) at 256 px: {len(x) / t_ssim:.0f} images/s")


def bench_text(args):
    """FLAN-T5-XL encoder (random weights, real shape): captions/s at 120 tokens in fp32 and bf16,
    tokenizer captions/s, load time + peak RSS of a 2-shard bf16 safetensors folder that size."""
    import json
    import os
    import random
    import subprocess
    import sys
    import tempfile

    from text import T5Encoder, UnigramTokenizer, t5_config, write_safetensors
    # the tokenizer first: it is pure Python (Viterbi per word), the part most likely to bind a
    # feature extraction on many CPU workers; a cold cache is the honest first pass over a dataset
    root = os.path.dirname(os.path.abspath(__file__))
    rng = random.Random(0)  # captions of 14 words from 2000 made-up ones: a cold cache at first
    words = ["".join(rng.choice("aeioubcdfglmnprst") for _ in range(rng.randint(2, 9)))
             for _ in range(2000)]
    texts = [" ".join(rng.choice(words) for _ in range(14))
             for _ in range(200 if args.quick else 2000)]
    sec = timed(lambda: UnigramTokenizer.from_file(os.path.join(root, "tests", "data", "spm_tiny"))(
        texts, length=120), warmup=0, repeat=1)
    print(f"tokenizer (tests/data/spm_tiny, vocab 300), {len(texts)} captions of 14 words to 120 "
          f"ids from a cold cache: {len(texts) / sec:.0f} captions/s", flush=True)
    # random weights of the real FLAN-T5-XL shape; the speed of a 24-layer, 2048-wide encoder
    # does not depend on what the weights are
    torch.manual_seed(0)
    batch = 8 if args.device != "cpu" else 1 if args.quick else 2  # 2 CPU cores: ~1 min/caption
    ids = torch.randint(3, 32000, (batch, 120), device=args.device)
    mask = torch.ones(batch, 120, dtype=torch.bool, device=args.device)
    model = T5Encoder(t5_config("flan-t5-xl")).eval()  # fp32 first: 4.9 GB
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(args.device, dtype)
        with torch.inference_mode():
            sec = timed(lambda: model(ids, mask), warmup=1 if args.device != "cpu" else 0,
                        repeat=1 if args.quick or args.device == "cpu" else 3, device=args.device)
        name = str(dtype).removeprefix("torch.")
        print(f"FLAN-T5-XL encoder {name:8s} batch {batch} x 120 tokens: "
              f"{batch / sec:.3g} captions/s ({sec / batch:.3g} s each)", flush=True)
    with tempfile.TemporaryDirectory() as folder:  # google/flan-t5-xl's layout: 2 shards + index
        sd = {k: v.cpu() for k, v in model.state_dict().items()}
        del model
        names = sorted(sd)
        shards = [names[: len(names) // 2], names[len(names) // 2:]]
        weight_map = {}
        for i, part in enumerate(shards):
            file = f"model-0000{i + 1}-of-00002.safetensors"
            write_safetensors({k: sd[k] for k in part}, os.path.join(folder, file))
            weight_map.update({k: file for k in part})
        del sd
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": weight_map}, f)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"model_type": "t5", **t5_config("flan-t5-xl").__dict__}, f)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        # A fresh process, so that its peak RSS is the loading alone. It reports VmHWM itself: the
        # ru_maxrss of a child also counts the parent's pages it shared before exec.
        code = ("import resource, sys, time, torch; sys.path.insert(0, sys.argv[2]);"
                "from text import T5Encoder; t0 = time.perf_counter();"
                "m = T5Encoder.from_pretrained(sys.argv[1], torch.bfloat16);"
                "t1 = time.perf_counter();"
                "s = sum(p.sum(dtype=torch.float32).item() for p in m.parameters());"
                "hwm = [int(l.split()[1]) for l in open('/proc/self/status')"
                "       if l.startswith('VmHWM')];"
                "peak = hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
                "print(t1 - t0, time.perf_counter() - t1, peak * 1024)")
        out = subprocess.run([sys.executable, "-c", code, folder, root],
                             capture_output=True, text=True, check=True).stdout.split()
        t_load, t_touch, rss = map(float, out)
        print(f"load FLAN-T5-XL encoder from a {size / 1e9:.2f} GB bf16 safetensors folder (2 "
              f"shards): {t_load:.2f} s (memory-mapped), reading every weight once "
              f"{t_touch:.1f} s; peak RSS of the loading process {rss / 1e9:.2f} GB "
              "(torch itself ~0.2 GB)", flush=True)


def bench_t2i(args):
    """Text-to-image sampling: ms per 256-token image after a 120-token caption prefix (the
    official N, features 2048-d as FLAN-T5-XL's, 20 valid tokens left padded, so the masked path
    runs) against one class token, batch 1 and 16, CFG on, fp32 and bf16; GPT-B (--quick: micro,
    batch 1)."""
    import copy

    from model import GPT, gpt_config, left_pad_caption
    name = "micro" if args.quick else "B"
    torch.manual_seed(0)
    models = {"class token": GPT(gpt_config(name)).eval(),
              "caption, N = 120": GPT(gpt_config(name, caption_dim=2048,
                                                 cls_token_num=120)).eval()}
    # The prefix is run once (the prefill) and then sits in the KV cache: each of the 256 steps
    # attends over 120 + t keys instead of 1 + t, and a padded caption adds a mask row per step.
    # Guidance doubles the rows either way; its cost does not depend on the scale.
    for dtype in (torch.float32, torch.bfloat16):
        for batch in ([1] if args.quick else [1, 16]):
            for kind, base in models.items():
                model = copy.deepcopy(base).to(args.device, dtype)
                if model.config.caption_dim:
                    valid = torch.arange(120) >= 100  # 20 valid tokens, then right-pad -> left
                    feats = torch.randn(batch, 120, 2048) * valid[:, None]
                    cond, mask = left_pad_caption(feats, valid.expand(batch, -1))
                    cond, mask = cond.to(args.device), mask.to(args.device)
                else:
                    cond, mask = torch.arange(batch, device=args.device) * 97 % 1000, None
                sec = timed(lambda: model.generate(cond, cfg_scale=7.5, cond_mask=mask),
                            warmup=1, repeat=1 if args.quick else 2, device=args.device)
                label = str(dtype).removeprefix("torch.")
                print(f"GPT-{name} {label:8s} batch {batch:2d}, CFG, {kind:16s}: "
                      f"{sec / batch * 1e3:8.0f} ms/image", flush=True)


BENCHES = {"gpt": bench_gpt, "train": bench_train, "vq": bench_vq, "fid": bench_fid,
           "text": bench_text, "t2i": bench_t2i}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(BENCHES),
                   help=f"comma-separated subset of {list(BENCHES)}")
    p.add_argument("--device", default="auto",
                   help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats, for a smoke run")
    args = p.parse_args(argv)
    names = args.only.split(",")
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise UserError(f"--only {unknown[0]!r} is not a benchmark; choose from {list(BENCHES)}")
    # pick_device, not common.setup_device: that one turns TF32 on, and the fp32 figures here
    # are of true float32 matmuls (a CPU user gets the same numbers either way)
    args.device = pick_device(args.device)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else ""
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads {gpu}, torch {torch.__version__}, device {args.device}")
    for name in names:
        print(f"\n== {name}: {' '.join(BENCHES[name].__doc__.split())}")
        BENCHES[name](args)


if __name__ == "__main__":
    cli(main)
