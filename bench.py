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


# memory bandwidth in bytes/s (SXM parts; the PCIe H100 listed first, as names contain "H100" in
# both): batch-1 sampling reads every weight once per token, so bandwidth bounds it
HBM_BANDWIDTH = {"A100": 2.0e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12}


def hbm_bandwidth(device):
    """The GPU's memory bandwidth in bytes/s, None off CUDA or for a GPU not in the table."""
    if not device.startswith("cuda"):
        return None
    return next((v for k, v in HBM_BANDWIDTH.items() if k in torch.cuda.get_device_name()), None)


def bench_gpt(args):
    """GPT-B sampling: tokens/s and ms per 256-token image, batch 1 and 16, CFG, fp32/bf16,
    with and without torch.compile."""
    import copy

    from model import GPT, gpt_config
    torch.manual_seed(0)
    base = GPT(gpt_config("B")).eval()  # random weights: the speed does not depend on them
    hbm = hbm_bandwidth(args.device)
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


# ------------------------------------------------------------------- side by side with the official
# The official code is never part of this project: `--peer PATH` names a checkout the user has of
# github.com/FoundationVision/LlamaGen, and its own files are imported from there for the run.
PEER_FILES = {"gpt": "autoregressive/models/gpt.py",
              "generate": "autoregressive/models/generate.py",
              "vq": "tokenizer/tokenizer_image/vq_model.py"}


def load_peer(path):
    """The official gpt.py, generate.py and vq_model.py of the checkout at `path`, as modules
    (llamagen_gpt, ...). gpt.py imports `utils.drop_path` from the checkout's root, so that root is
    on sys.path while they load, and any `utils` module of ours or the user's is put back after."""
    import importlib.util
    import os
    import sys
    missing = [f for f in PEER_FILES.values() if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise UserError(f"--peer {path}: no {missing[0]} there; pass a checkout of "
                        "github.com/FoundationVision/LlamaGen")
    is_utils = lambda name: name == "utils" or name.startswith("utils.")  # noqa: E731
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if is_utils(k)}
    sys.path.insert(0, os.path.abspath(path))
    modules = {}
    try:
        for name, file in PEER_FILES.items():
            spec = importlib.util.spec_from_file_location(f"llamagen_{name}",
                                                          os.path.join(path, file))
            modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(modules[name])
    except Exception as e:  # an old or modified checkout: say which file, not a traceback
        raise UserError(f"--peer {path}: importing {file} failed ({type(e).__name__}: "
                        f"{first_line(e)[:100]}); pass a checkout of LlamaGen's main branch")
    finally:
        sys.path.remove(os.path.abspath(path))
        for k in [k for k in sys.modules if is_utils(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
    return modules


def timed_side_by_side(fns, repeat, device):
    """Best seconds of each function in fns and its last output. The calls alternate (theirs,
    ours, theirs, ours, ...), so a neighbour's job that slows the machine for a while slows both
    sides alike. On a CPU there is no warm-up: a 256-token generation dwarfs the one-time costs,
    and skipping it halves the run; a GPU pays its first kernels' setup in one warm-up call."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for fn in fns if device.startswith("cuda") else ():
        fn()
    best, outs = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            sync()
            t0 = time.perf_counter()
            outs[i] = fn()
            sync()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best, outs


def bench_peer(args):
    """Ours against the official LlamaGen code (--peer PATH) in this process on the same random
    weights: GPT-B sampling (256 tokens, CFG 4, full codebook) fp32 and bf16 at batch 1 and 8, and
    the VQ-16 decoder at 256 px (fp32) at batch 1 and 8; ms per image and the ratio."""
    # Why in one process: two runs minutes apart on a shared VM differ by more than the effect
    # measured (README: these VMs differ 1.5-2x), while alternating calls within one process see
    # the same machine. Why the same weights: the speed does not depend on them, but the parity
    # check does, and it is what shows that both sides compute the same model.
    import copy

    import torch.nn as nn

    from common import load_weights
    from model import GPT, GPTConfig
    from tokenizer import VQModel, vq_config
    import warnings
    peer = args.peer_modules
    # generate.py enters torch.backends.cuda.sdp_kernel for every token, which newer torch
    # deprecates with a warning each time; it is their code's and changes no figure
    warnings.filterwarnings("ignore", message=".*sdp_kernel.*", category=FutureWarning)
    repeat, dev = args.repeat, args.device
    # --quick: a 4-layer, 128-wide GPT over an 8x8 grid, and 64 px decodes: the same code paths
    # in seconds, to check a checkout works before a real run
    shape = dict(n_layer=4, n_head=4, dim=128) if args.quick else dict(n_layer=12, n_head=12,
                                                                           dim=768)
    length, batches = (64, (1, 2)) if args.quick else (256, (1, 8))
    torch.manual_seed(0)
    official = peer["gpt"].Transformer(peer["gpt"].ModelArgs(
        **shape, vocab_size=16384, block_size=length, num_classes=1000, cls_token_num=1,
        model_type="c2i")).eval()
    # the official init zeroes the output layer (every code equally likely); drawn here, so that
    # the parity check below compares logits that differ from code to code
    nn.init.normal_(official.output.weight, std=0.02)
    ours = load_weights(GPT(GPTConfig(**shape, block_size=length)), official.state_dict(),
                        "the official GPT's weights").eval()
    # the same weights, checked: logits of one teacher-forced sequence agree to float32 rounding
    idx, cond = torch.randint(0, 16384, (2, 16)), torch.tensor([3, 1000])  # 1000: the null class
    with torch.no_grad():
        theirs_logits = official(idx, cond, input_pos=torch.arange(17))[0][:, :16]
        gap = (ours(idx, cond)[0] - theirs_logits).abs().max().item()
    if gap > 1e-3:
        raise UserError(f"--peer {args.peer}: its GPT's logits differ from ours by {gap:.2g} on "
                        "the same weights; is it a modified checkout?")
    name = "GPT-B" if not args.quick else "GPT 4x128"
    print(f"same weights, logits agree to {gap:.1g}; times: best of {repeat}, interleaved")
    hbm = hbm_bandwidth(dev)
    for dtype in (torch.float32, torch.bfloat16):
        theirs_model = copy.deepcopy(official).to(dev, dtype)
        ours_model = copy.deepcopy(ours).to(dev, dtype)
        for batch in batches:
            # varied classes; CFG 4 runs each image twice (conditional and null rows) on both
            # sides, and both keep guiding to the end (no cfg_interval), as the official demo
            cond = torch.arange(batch, device=dev) * 97 % 1000
            # the official sampler's arguments for the full codebook: no top-k, no top-p
            (theirs_s, ours_s), _ = timed_side_by_side([
                lambda: peer["generate"].generate(theirs_model, cond, length, cfg_scale=4.0,
                                                  temperature=1.0, top_k=0, top_p=1.0),
                lambda: ours_model.generate(cond, cfg_scale=4.0)], repeat, dev)
            floor = ""
            if hbm and batch == 1:  # each forward pass reads every weight once
                weight_bytes = sum(p.numel() * p.element_size() for p in ours_model.parameters())
                floor = f", bandwidth floor {weight_bytes / hbm * length * 1e3:.0f} ms"
            print(f"{name} sample {str(dtype).removeprefix('torch.'):8s} batch {batch}, CFG 4.0, "
                  f"{length} passes per image: official {theirs_s / batch * 1e3:7.0f} ms/image, "
                  f"ours {ours_s / batch * 1e3:7.0f} ms/image: {theirs_s / ours_s:.2f}x{floor}",
                  flush=True)
        del theirs_model, ours_model
    # the tokenizer's decoder: random codes of one grid through both, the pixels compared. It is
    # timed in float32 only, the precision sample.py decodes in; at batch 8 on a CPU it costs
    # about as much per image as the whole GPT, so it counts in the end-to-end ratio
    official_vq = peer["vq"].VQ_models["VQ-16"](codebook_size=16384, codebook_embed_dim=8).eval()
    ours_vq = load_weights(VQModel(vq_config("VQ-16")), official_vq.state_dict(),
                           "the official VQ-16's weights").eval()
    official_vq, ours_vq = official_vq.to(dev), ours_vq.to(dev)
    side = 4 if args.quick else 16
    for batch in batches:
        codes = torch.randint(0, 16384, (batch, side, side), device=dev)
        with torch.inference_mode():
            (theirs_s, ours_s), (theirs_px, ours_px) = timed_side_by_side([
                lambda: official_vq.decode_code(codes.flatten(), [batch, 8, side, side]),
                lambda: ours_vq.decode(codes)], repeat, dev)
        gap = (theirs_px - ours_px).abs().max().item()
        print(f"VQ-16 decode {side * 16} px fp32 batch {batch}: official "
              f"{theirs_s / batch * 1e3:6.0f} ms/image, ours {ours_s / batch * 1e3:6.0f} ms/image: "
              f"{theirs_s / ours_s:.2f}x (pixels agree to {gap:.1g})", flush=True)


def bench_jacobi(args):
    """Speculative Jacobi decoding against sequential sampling, the same model and settings (CFG 4,
    full codebook, window --window): forward passes and ms per image at batch 1 and 8, and the
    speed-up. With --gpt-ckpt a trained GPT (the demo's results/demo/gpt.pt, an official c2i file);
    without, random GPT-B weights: the cost of a pass at the official shapes, but not a trained
    model's pass count (random logits are nearly uniform and blind to the codes before, so drafts
    are kept far more often than on real images)."""
    from common import resolve_precision
    from model import GPT, gpt_config
    from sample import load_gpt
    # Jacobi decoding trades passes for width: each pass scores `window` codes per row. On a CPU
    # a pass's cost grows with its rows (GPT-B's float32 matmuls, 2 cores: 2 rows 22 ms, 16 rows
    # 26, 128 rows 158), so fewer passes pay off less than on a GPU, where a batch-1 pass is bound
    # by reading the weights whatever its width: read each machine's wall clock next to the passes.
    dev = args.device
    torch.manual_seed(0)
    if args.gpt_ckpt:  # sample.py's loader: an official file's grid from its name (_384: 24x24)
        model, what = load_gpt(args.gpt_ckpt, None, 16)[0], args.gpt_ckpt
    else:
        model, what = GPT(gpt_config("nano" if args.quick else "B")), "random weights"
        torch.nn.init.normal_(model.output.weight, std=0.02)  # codes not all equally likely
    precision, dtype = resolve_precision("auto", dev)  # fp32 on CPUs, bf16 on recent GPUs
    model = model.to(dev, dtype).eval()
    L = model.config.block_size
    print(f"GPT {model.config.n_layer} layers x {model.config.dim} ({what}), {L} codes, "
          f"{precision}; times: best of {args.repeat}, interleaved; passes: mean over the runs")
    for batch in (1, 2) if args.quick else (1, 8):
        cond = torch.arange(batch, device=dev) * 97 % model.config.num_classes
        passes = {"sequential": [], "jacobi": []}

        def run(sampler):
            # a fresh seed per run: the pass count of a Jacobi run varies with its draws
            gen = torch.Generator(dev).manual_seed(len(passes[sampler]))
            codes, n = model.generate(cond, cfg_scale=4.0, sampler=sampler, window=args.window,
                                      generator=gen, return_passes=True)
            passes[sampler].append(n)
        (seq_s, jac_s), _ = timed_side_by_side([lambda: run("sequential"), lambda: run("jacobi")],
                                               args.repeat, dev)
        jac_passes = sum(passes["jacobi"]) / len(passes["jacobi"])
        print(f"batch {batch}, CFG 4.0: sequential {seq_s / batch * 1e3:7.0f} ms/image, {L} "
              f"passes; jacobi window {args.window} {jac_s / batch * 1e3:7.0f} ms/image, "
              f"{jac_passes:.1f} passes ({L / jac_passes:.2f}x fewer): {seq_s / jac_s:.2f}x "
              "faster", flush=True)



def bench_clip(args):
    """CLIP ViT-B/32 (random weights of the released shape): image tower images/s at 224 px and
    text tower captions/s at the full 77-token context, fp32 and bf16 autocast; what re-ranking
    and the CLIP score cost per image."""
    import clip
    torch.manual_seed(0)
    model = clip.CLIP(clip.clip_config("ViT-B/32")).to(args.device).eval()
    dev = args.device.split(":")[0]
    for precision in ("fp32",) if args.quick else ("fp32", "bf16"):
        for batch in (2,) if args.quick else (1, 64):
            pixels = torch.randn(batch, 3, 224, 224, device=args.device)
            # full-length captions: the tower cuts the columns after the longest caption's end,
            # so this is the context's worst case (short prompts cost several times less)
            ids = torch.randint(0, 49406, (batch, 77), device=args.device)
            ids[:, -1] = 49407
            bf16 = torch.autocast(dev, torch.bfloat16, enabled=precision == "bf16")
            repeat = 1 if args.quick else 3
            with torch.inference_mode(), bf16:
                image = timed(lambda: model.encode_image(pixels), repeat=repeat, device=args.device)
                text = timed(lambda: model.encode_text(ids), repeat=repeat, device=args.device)
            print(f"CLIP ViT-B/32 batch {batch:2d} {precision}: image {batch / image:8.1f} img/s, "
                  f"text {batch / text:8.1f} captions/s", flush=True)


def stand_in_generator(success=0.3, image_size=32):
    """generate(prompts, n, seed) for rerank_sweep without a text-to-image model: each
    candidate renders the benchmark prompt's spec with probability `success`, else a near miss of
    it (scenes._wrong_spec), blurred like a ds4 tokenizer's output. The true renders are there to
    be found, as a generator's lucky draws are, so the curve shows the re-ranker, not a model."""
    import numpy as np

    import scenes

    def generate(prompts, n, seed):
        # one stream for the whole run: the same seed gives the same candidates, in order
        rng = np.random.default_rng([seed, 4242])
        out = []
        for p in prompts:
            avoid = [r["shape"] for r in p["spec"]["include"]]
            for _ in range(n):
                spec = p["spec"] if rng.random() < success else \
                    scenes._wrong_spec(p["task"], p["spec"], rng)
                img = scenes.render(scenes.scene_for(spec, image_size, rng, avoid=avoid),
                                    image_size, rng)
                out.append(scenes.distort(img, "blur", rng))
        return np.stack(out)
    return generate


def rerank_sweep(generate, clip_model, tokenizer, prompts, ns=(1, 2, 4, 8, 16, 32), seed=0):
    """DALL-E's best-of-N figure on the built-in benchmark: for each N, every prompt keeps the
    CLIP-best of N candidates and scenes.score grades the kept images. generate(prompt dicts, n,
    seed) -> uint8 (P*n, H, W, 3), prompt-major. The max(ns) candidates are drawn once and best-of-N
    reads each prompt's first N, so the N's share draws (a fair comparison, and one sampling run).
    -> rows {"n", "overall", each task, "s_per_kept"}: the sampling cost of N candidates (their
    share of the one run) plus CLIP's, per kept image."""
    import scenes
    from sample import rerank_candidates
    texts, top = [p["prompt"] for p in prompts], max(ns)
    t0 = time.perf_counter()
    drawn = generate(prompts, top, seed)
    # sampling is the cost that grows with N: N candidates are paid for every image kept
    per_candidate = (time.perf_counter() - t0) / len(drawn)
    grouped = drawn.reshape(len(prompts), top, *drawn.shape[1:])  # (prompt, candidate, H, W, 3)
    rows = []
    for n in ns:
        t0 = time.perf_counter()
        kept, _ = rerank_candidates(grouped[:, :n].reshape(-1, *drawn.shape[1:]), texts,
                                    clip_model, 1, tokenizer)
        # CLIP's own share: N image embeddings and one text embedding per prompt
        ranking = (time.perf_counter() - t0) / len(prompts)
        # graded by the exact checker, as the GPT's own pictures are: best-of-N changes only
        # which candidate is shown, never the grading
        res = scenes.score(list(kept), prompts)
        rows.append({"n": n, "overall": res["overall"], **{t: res[t] for t in scenes.TASKS},
                     "s_per_kept": n * per_candidate + ranking})
    return rows


def model_generator(gpt_path, vq_path, cfg_scale, device, batch_size=256):
    """generate(prompts, n, seed) for rerank_sweep from a text-to-image GPT trained with its own
    T5 (the demo's results/demo/t2i_gpt.pt) and its tokenizer: n candidates per prompt at
    `cfg_scale`, one generator stream for the run, `batch_size` pictures at a time."""
    import numpy as np

    import sample
    from model import GPT
    from tokenizer import VQModel
    gpt = GPT.from_pretrained(gpt_path).to(device).eval()
    if (gpt.meta.get("text") or {}).get("kind") != "joint":
        raise UserError(f"{gpt_path}: re-ranking here needs a text-to-image GPT trained with its "
                        "own T5 (train.py --text t5-nano), as the demo's")
    vq = VQModel.from_pretrained(vq_path).to(device).eval()

    def generate(prompts, n, seed):
        condition = sample.joint_condition(gpt, gpt_path, [p["prompt"] for p in prompts], device)
        labels = [i for i in range(len(prompts)) for _ in range(n)]  # prompt-major
        # PromptCondition encodes each batch's captions when it is drawn: 9,600 candidates never
        # hold 9,600 caption tensors at once, and the pictures are bytes as soon as decoded
        gen = torch.Generator(device).manual_seed(seed)
        return np.concatenate([
            sample.sample_images(gpt, vq, labels[b:b + batch_size], cfg_scale=cfg_scale,
                                 generator=gen, condition=condition)
            for b in range(0, len(labels), batch_size)])
    return generate


def bench_rerank(args):
    """Re-ranking on the built-in benchmark: overall and per-task accuracy against N = 1..32
    candidates with the demo's CLIP (results/demo/clip.pt), and seconds per kept image; the
    candidates from the demo's text-to-image GPT (results/demo/t2i_gpt.pt, at its cfg 3) when it
    is there, else from a stand-in generator."""
    import os

    import clip
    import scenes
    from sample import DEMO_CLIP, DEMO_T2I_GPT, DEMO_T2I_VQ
    if not os.path.isfile(DEMO_CLIP):
        print(f"skipped: no CLIP at {DEMO_CLIP} (python train.py --model CLIP-tiny --data scenes "
              f"--out-dir runs/clip, then copy runs/clip/ckpt.pt there)")
        return
    model, tokenizer = clip.load(DEMO_CLIP)
    prompts = scenes.benchmark_prompts(2 if args.quick else 50)
    ns = (1, 2, 4) if args.quick else (1, 2, 4, 8, 16, 32)
    if os.path.isfile(DEMO_T2I_GPT) and os.path.isfile(DEMO_T2I_VQ):
        # the demo's guided scale: re-ranking is judged on top of the sampler's own best setting,
        # not as a substitute for guidance (DALL-E had none; LlamaGen has no re-ranking)
        generate = model_generator(DEMO_T2I_GPT, DEMO_T2I_VQ, 3.0, args.device)
        print(f"generator: {DEMO_T2I_GPT} at cfg 3 (the demo's guided scale)")
    else:  # the re-ranker alone: true renders are there to be found
        generate = stand_in_generator()
        print(f"generator: stand_in_generator (no {DEMO_T2I_GPT}; true renders 30% of the "
              "time, near misses otherwise)")
    print("N   overall " + " ".join(f"{t[:10]:>10}" for t in scenes.TASKS) + "  s/kept image")
    for r in rerank_sweep(generate, model, tokenizer, prompts, ns):
        print(f"{r['n']:<3} {r['overall']:7.3f} " + " ".join(f"{r[t]:10.3f}" for t in scenes.TASKS)
              + f"  {r['s_per_kept']:.4f}", flush=True)


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
           "text": bench_text, "clip": bench_clip, "rerank": bench_rerank, "peer": bench_peer,
           "jacobi": bench_jacobi, "t2i": bench_t2i}
# opt-in: these run only when asked for by name (peer also needs --peer PATH)
OPT_IN = ("peer", "jacobi")


def add_sampling_flags(group):
    """The flags of the opt-in sampling benchmarks (peer, jacobi)."""
    a = group.add_argument
    a("--peer", default=None, metavar="PATH", help="peer: a checkout of "
      "github.com/FoundationVision/LlamaGen whose gpt.py, generate.py and vq_model.py are timed "
      "against ours (imported from there for the run, never copied)")
    a("--repeat", type=int, default=None,
      help="peer, jacobi: timed runs of each case, the best one kept (default: 3; --quick: 1)")
    a("--gpt-ckpt", default=None, help="jacobi: a trained GPT, ours or an official c2i file "
      "(default: random GPT-B weights: a pass's cost at the official shapes, not a trained "
      "model's pass count)")
    a("--window", type=int, default=None,
      help="jacobi: codes scored per forward pass (default: 16)")


def check_sampling_flags(args, names):
    """One UserError line for a sampling flag without its benchmark, or out of range."""
    # a flag that cannot act in this run is refused, never ignored: a --window that silently did
    # nothing would read as a measurement of that window
    if "peer" in names and not args.peer:
        raise UserError("--only peer needs --peer PATH, a checkout of "
                        "github.com/FoundationVision/LlamaGen")
    jacobi = "jacobi" in names
    given = [("--peer", args.peer is not None, "peer" in names, "--only peer"),
             ("--repeat", args.repeat is not None, "peer" in names or jacobi,
              "--only peer or jacobi"),
             ("--gpt-ckpt", args.gpt_ckpt is not None, jacobi, "--only jacobi"),
             ("--window", args.window is not None, jacobi, "--only jacobi")]
    for flag, is_given, applies, needs in given:
        if is_given and not applies:
            raise UserError(f"{flag} only applies with {needs}; drop it")
    args.repeat = (1 if args.quick else 3) if args.repeat is None else args.repeat
    args.window = 16 if args.window is None else args.window
    if args.repeat < 1 or args.window < 1:
        raise UserError(f"--repeat {args.repeat} / --window {args.window}: both must be >= 1")
    # imported now, so that a wrong PATH fails before the benchmarks that run ahead of peer
    args.peer_modules = load_peer(args.peer) if "peer" in names else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None,
                   help=f"comma-separated subset of {list(BENCHES)} (default: all but "
                        f"{' and '.join(OPT_IN)}; peer too when --peer is given)")
    p.add_argument("--device", default="auto",
                   help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats, for a smoke run")
    add_sampling_flags(p.add_argument_group("peer and jacobi"))
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else [n for n in BENCHES if n not in OPT_IN]
    if args.only is None and args.peer:
        names.append("peer")
    check_sampling_flags(args, names)
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
