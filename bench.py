"""Speed, measured: `python bench.py [--only gpt,vq,train,fid] [--device cuda] [--quick]`, the
figures of BENCHMARKS.md. Random weights (a pass costs the same whatever the numbers), so nothing
is downloaded; a figure is the best of a few repeats, comparable only within one run. At small
batch a GPT step is bound by memory bandwidth (every weight read once per token), training and
the tokenizer by arithmetic (MFU: against the chip's peak FLOP/s)."""
import argparse
import copy
import itertools
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

import clip
import decoding
import demo
import fid
import sample
import scenes
import t2i
import common
from common import (UserError, at_least, check_flags, cli, first_line, load_weights, pick_device,
                    resolve_precision)
from model import GPT, GPT_CONFIGS, GPTConfig, gpt_config
from text import T5Encoder, UnigramTokenizer, t5_config, write_safetensors
from tokenizer import VQModel, psnr, ssim, vq_config
from train import configure_optimizers

DTYPES = {k: common.DTYPES[k] for k in ("fp32", "bf16")}  # the precisions every bench compares
# memory bandwidth in bytes/s (SXM parts; the PCIe H100 first, as both names contain "H100")
HBM_BANDWIDTH = {"A100": 2.0e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12}


def timed_side_by_side(fns, repeat, device, warmup=None):
    """Best seconds of each of fns and its last output, the calls alternating so that a slow spell
    slows every side alike; `warmup` calls of each first (default: one on a GPU, none on a CPU)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for fn in fns * (int(device.startswith("cuda")) if warmup is None else warmup):
        fn()
    sync()
    best, outs = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            sync()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best, outs


def timed(fn, warmup=1, repeat=3, device="cpu"):
    """Best wall-clock seconds of `repeat` calls of fn after `warmup` calls."""
    return timed_side_by_side([fn], repeat, device, warmup)[0][0]


def bandwidth_floor(model, device, tokens):
    """", bandwidth floor N ms" of batch-1 sampling (a pass reads every weight), "" if unknown."""
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "?"
    hbm = next((v for k, v in HBM_BANDWIDTH.items() if k in gpu), None)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return f", bandwidth floor {weight_bytes / hbm * tokens * 1e3:.0f} ms" if hbm else ""


def sampling_rows(args, models, cfg, compile_too=False):
    """One line per {name: model}, dtype, compile mode and batch: ms per image and tokens/s of
    decoding.generate under CFG (which doubles the rows, as real sampling does)."""
    compiles = [False, True] if compile_too and not args.quick else [False]
    for compiled, (dtype_name, dtype), (name, base) in itertools.product(
            compiles, DTYPES.items(), models.items()):
        model = copy.deepcopy(base).to(args.device, dtype).eval()  # the same weights each run
        L, label = model.config.block_size, f"{name} {dtype_name} " + (
            "compiled" if compiled else "eager")
        if compiled:  # the per-token step: fewer, fused kernels for a GPU that waits on launches
            torch._dynamo.reset()  # a fresh recompile budget for each dtype
            model.forward_cached = torch.compile(model.forward_cached, dynamic=True)
        for batch in [1] if args.quick else [1, 16]:
            cond, mask = torch.arange(batch, device=args.device) * 97 % 1000, None  # varied classes
            if model.config.caption_dim:  # a prefix of N in the KV cache: a step attends N + t keys
                valid = torch.arange(120) >= 100  # 20 valid tokens, right-padded -> left
                cond, mask = [t.to(args.device) for t in t2i.left_pad_caption(
                    torch.randn(batch, 120, 2048) * valid[:, None], valid.expand(batch, -1))]
            try:  # torch.compile needs a working C++/Triton toolchain
                sec = timed(lambda: decoding.generate(model, cond, cfg_scale=cfg, cond_mask=mask),
                            repeat=1 if args.quick else 2, device=args.device)
            except Exception as e:
                if not compiled:
                    raise
                print(f"{label}: skipped ({type(e).__name__}: {first_line(e)[:100]})")
                break
            floor = bandwidth_floor(model, args.device, L) if batch == 1 else ""
            print(f"{label:34s} batch {batch:2d}, CFG {cfg}: {sec / batch * 1e3:8.0f} "
                  f"ms/image, {L * batch / sec:7.1f} tokens/s{floor}", flush=True)


def bench_gpt(args):
    """GPT-B class-conditional sampling, CFG 4: ms per 256-token image and tokens/s at batch 1 and
    16, fp32 and bf16, eager and with torch.compile."""
    torch.manual_seed(0)
    sampling_rows(args, {"GPT-B": GPT(gpt_config("B"))}, 4.0, compile_too=True)


def bench_t2i(args):
    """Text-to-image sampling, CFG 7.5: after a 120-token caption prefix (the official N,
    FLAN-T5-XL's 2048-d features, 20 valid tokens left-padded: the masked path) against one class
    token, batch 1 and 16, fp32 and bf16; GPT-B (--quick: micro, batch 1)."""
    name = "GPT-micro" if args.quick else "GPT-B"
    torch.manual_seed(0)
    sampling_rows(args, {f"{name} class token": GPT(gpt_config(name)), f"{name} caption N=120":
                         GPT(gpt_config(name, caption_dim=2048, cls_token_num=120))}, 7.5)


def bench_jacobi(args):
    """Speculative Jacobi decoding against sequential sampling (CFG 4, full codebook, --window):
    forward passes and ms per image at batch 1 and 8, on --gpt-ckpt or random GPT-B weights (a
    pass's cost at the official shapes, but near-uniform logits keep far more drafts)."""
    dev = args.device
    torch.manual_seed(0)
    if args.gpt_ckpt:  # sample.py's loader: an official file's grid from its name
        model, what = sample.load_gpt(args.gpt_ckpt, None, 16)[0], args.gpt_ckpt
    else:
        model, what = GPT(gpt_config("nano" if args.quick else "B")), "random weights"
        torch.nn.init.normal_(model.output.weight, std=0.02)  # codes not all equally likely
    precision, dtype = resolve_precision("auto", dev)
    model, L = model.to(dev, dtype).eval(), model.config.block_size
    print(f"GPT {model.config.n_layer} layers x {model.config.dim} ({what}), {L} codes, "
          f"{precision}; times: best of {args.repeat}, interleaved; passes: mean over the runs")
    for batch in (1, 2) if args.quick else (1, 8):
        cond = torch.arange(batch, device=dev) * 97 % model.config.num_classes
        passes = {"sequential": [], "jacobi": []}

        def run(sampler):  # a fresh seed per run: a Jacobi run's pass count varies with its draws
            gen = torch.Generator(dev).manual_seed(len(passes[sampler]))
            passes[sampler].append(decoding.generate(
                model, cond, sampler, args.window, cfg_scale=4.0, generator=gen,
                return_passes=True)[1])
        (seq_s, jac_s), _ = timed_side_by_side([lambda: run("sequential"), lambda: run("jacobi")],
                                               args.repeat, dev)
        jac_passes = np.mean(passes["jacobi"])
        print(f"batch {batch}, CFG 4.0: sequential {seq_s / batch * 1e3:7.0f} ms/image, {L} "
              f"passes; jacobi window {args.window} {jac_s / batch * 1e3:7.0f} ms/image, "
              f"{jac_passes:.1f} passes ({L / jac_passes:.2f}x fewer): {seq_s / jac_s:.2f}x "
              "faster", flush=True)


def bench_train(args):
    """Training step (forward + backward + AdamW) tokens/s for GPT-B and micro; MFU on GPUs."""
    cuda, kind = args.device.startswith("cuda"), args.device.split(":")[0]
    for name in ["micro"] if args.quick else ["micro", "B"]:
        torch.manual_seed(0)
        model = GPT(gpt_config(name)).to(args.device).train()
        opt = configure_optimizers(model, 0.05, 1e-4, (0.9, 0.95), kind)
        batch, L = (32 if cuda else 8) // (4 if args.quick else 1), model.config.block_size
        idx = torch.randint(0, model.config.vocab_size, (batch, L), device=args.device)
        cond = torch.randint(0, 1000, (batch,), device=args.device)

        def step():  # train.py's step without data loading: bf16 autocast on GPUs, fp32 on CPUs
            with torch.autocast(kind, torch.bfloat16, enabled=cuda):
                model(idx, cond, targets=idx)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sec = timed(step, repeat=2 if args.quick else 3, device=args.device)
        mfu = model.estimate_mfu(batch * L / sec, args.device)
        print(f"GPT-{name} train step, batch {batch} x {L} tokens, "
              f"{'bf16 autocast' if cuda else 'fp32'}: {batch * L / sec:8.0f} tokens/s, "
              f"{sec * 1e3:.0f} ms/step" + (f", MFU {mfu * 100:.1f}%" if mfu else ""), flush=True)


def inference_rows(args, label, batches, precisions, parts):
    """One line per precision (bf16: under autocast) and batch: the throughput of each
    (name, fn, input, unit) of parts(batch), fn(input) in inference mode."""
    for precision, batch in itertools.product(precisions, batches):
        with torch.inference_mode(), torch.autocast(args.device.split(":")[0], torch.bfloat16,
                                                    enabled=precision == "bf16"):
            secs = [(name, unit, timed(lambda: fn(x), repeat=1 if args.quick else 3,
                                       device=args.device)) for name, fn, x, unit in parts(batch)]
        print(f"{label} batch {batch:2d} {precision}: " + ", ".join(
            f"{name} {batch / sec:7.2f} {unit} ({1000 * sec / batch:.0f} ms each)"
            for name, unit, sec in secs), flush=True)


def bench_vq(args):
    """VQ-16 encode and decode images/s at 256 px, batch 1 and 16, fp32 and bf16."""
    torch.manual_seed(0)
    model, dev = VQModel(vq_config("VQ-16")).to(args.device).eval(), args.device
    inference_rows(args, "VQ-16 256px", (1, 4) if args.quick else (1, 16), DTYPES, lambda b: [
        ("encode", model.encode, torch.rand(b, 3, 256, 256, device=dev) * 2 - 1, "img/s"),
        ("decode", model.decode, torch.randint(0, 16384, (b, 16, 16), device=dev), "img/s")])


def bench_clip(args):
    """CLIP ViT-B/32 (random weights, the released shape): image tower images/s at 224 px and text
    tower captions/s at the full 77-token context (the worst case), fp32 and bf16 autocast."""
    torch.manual_seed(0)
    model, dev = clip.CLIP(clip.clip_config("ViT-B/32")).to(args.device).eval(), args.device

    def parts(b):
        ids = torch.randint(0, 49406, (b, 77), device=dev)
        ids[:, -1] = 49407  # end of text
        return [("image", model.encode_image, torch.randn(b, 3, 224, 224, device=dev), "img/s"),
                ("text", model.encode_text, ids, "captions/s")]
    inference_rows(args, "CLIP ViT-B/32", (2,) if args.quick else (1, 64),
                   ("fp32",) if args.quick else DTYPES, parts)


def bench_fid(args):
    """Frechet distance of two 10k x 2048 feature sets (ADM's reference batch, Inception's pool
    width); precision/recall; Inception feature throughput in images/s; PSNR and SSIM throughput."""
    n, rng = 2000 if args.quick else 10000, np.random.default_rng(0)
    a = rng.standard_normal((n, 2048), dtype=np.float32)
    b = rng.standard_normal((n, 2048), dtype=np.float32) * 1.1 + 0.1  # another distribution
    t0 = time.perf_counter()
    stats_a, stats_b = fid.statistics(a), fid.statistics(b)
    t_stats = time.perf_counter() - t0
    t_fd = timed(lambda: fid.frechet_distance(*stats_a, *stats_b), warmup=0, repeat=1)
    print(f"FID of {n} vs {n} x 2048 features: {t_stats + t_fd:.2f} s "
          f"(mean + covariance of both {t_stats:.2f} s, Frechet distance {t_fd:.2f} s)")
    t_pr = timed(lambda: fid.precision_recall(a, b, device=args.device), warmup=0, repeat=1,
                 device=args.device)
    print(f"precision/recall, {n} vs {n} x 2048, k=3: {t_pr:.2f} s")
    batch = 4 if args.quick else 16
    net, images = fid.FIDInception(), torch.rand(2 * batch, 3, 299, 299)  # two batches: the loop
    t_inc = timed(lambda: fid.compute_features(net, images, batch, args.device, progress=False),
                  repeat=1 if args.quick else 2, device=args.device)
    print(f"Inception features (pool, logits, spatial) at 299 px, batch {batch}: "
          f"{2 * batch / t_inc:.1f} images/s")
    x = torch.rand(16 if args.quick else 64, 3, 256, 256, device=args.device) * 2 - 1
    y = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    t_ssim = timed(lambda: (psnr(x, y), ssim(x, y)), repeat=2, device=args.device)
    print(f"PSNR + SSIM (official 7x7 window) at 256 px: {len(x) / t_ssim:.0f} images/s")


# A fresh process loads the folder, so that its peak RSS is the loading alone. It reads VmHWM
# itself: the ru_maxrss of a child also counts the parent's pages it shared before exec.
LOAD_T5 = """import resource, sys, time, torch; sys.path.insert(0, sys.argv[2])
from text import T5Encoder; t0 = time.perf_counter()
m = T5Encoder.from_pretrained(sys.argv[1], torch.bfloat16); t1 = time.perf_counter()
s = sum(p.sum(dtype=torch.float32).item() for p in m.parameters())
hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')]
peak = hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(t1 - t0, time.perf_counter() - t1, peak * 1024)"""


def bench_text(args):
    """FLAN-T5-XL encoder (random weights, real shape): captions/s at 120 tokens in fp32 and bf16,
    tokenizer captions/s, load time + peak RSS of a 2-shard bf16 safetensors folder that size."""
    # the tokenizer is pure Python, the part most likely to bind a feature extraction on many CPU
    # workers; timed from a cold cache, as a first pass over a dataset
    root, rng = os.path.dirname(os.path.abspath(__file__)), random.Random(0)
    words = ["".join(rng.choice("aeioubcdfglmnprst") for _ in range(rng.randint(2, 9)))
             for _ in range(2000)]  # captions of 14 words from 2000 made-up ones
    texts = [" ".join(rng.choice(words) for _ in range(14))
             for _ in range(200 if args.quick else 2000)]
    spm = os.path.join(root, "tests", "data", "spm_tiny")
    sec = timed(lambda: UnigramTokenizer.from_file(spm)(texts, length=120), warmup=0, repeat=1)
    print(f"tokenizer (tests/data/spm_tiny, vocab 300), {len(texts)} captions of 14 words to 120 "
          f"ids from a cold cache: {len(texts) / sec:.0f} captions/s", flush=True)
    torch.manual_seed(0)
    cpu = args.device == "cpu"
    batch = 8 if not cpu else 1 if args.quick else 2
    ids = torch.randint(3, 32000, (batch, 120), device=args.device)
    mask = torch.ones(batch, 120, dtype=torch.bool, device=args.device)
    model = T5Encoder(t5_config("flan-t5-xl")).eval()
    for dtype_name, dtype in DTYPES.items():
        model = model.to(args.device, dtype)
        with torch.inference_mode():
            sec = timed(lambda: model(ids, mask), warmup=0 if cpu else 1,
                        repeat=1 if args.quick or cpu else 3, device=args.device)
        print(f"FLAN-T5-XL encoder {dtype_name} batch {batch} x 120 tokens: {batch / sec:.3g} "
              f"captions/s ({sec / batch:.3g} s each)", flush=True)
    with tempfile.TemporaryDirectory() as folder:  # google/flan-t5-xl's layout: 2 shards + index
        sd = {k: v.cpu() for k, v in model.state_dict().items()}
        del model
        names, weight_map = sorted(sd), {}
        for i, part in enumerate([names[: len(names) // 2], names[len(names) // 2:]]):
            file = f"model-0000{i + 1}-of-00002.safetensors"
            write_safetensors({k: sd.pop(k) for k in part}, os.path.join(folder, file))
            weight_map.update({k: file for k in part})
        config = {"model_type": "t5", **vars(t5_config("flan-t5-xl"))}
        for file, content in [("model.safetensors.index.json", {"weight_map": weight_map}),
                              ("config.json", config)]:
            with open(os.path.join(folder, file), "w") as f:
                json.dump(content, f)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        t_load, t_touch, rss = map(float, subprocess.run(
            [sys.executable, "-c", LOAD_T5, folder, root], capture_output=True, text=True,
            check=True).stdout.split())
        print(f"load FLAN-T5-XL encoder from a {size / 1e9:.2f} GB bf16 safetensors folder (2 "
              f"shards): {t_load:.2f} s (memory-mapped), reading every weight once "
              f"{t_touch:.1f} s; peak RSS of the loading process {rss / 1e9:.2f} GB", flush=True)


# ------------------------------------------------------------------- side by side with the official
# The official code is never part of this project: `--peer PATH` names a checkout the user has of
# github.com/FoundationVision/LlamaGen, and its own files are imported from there for the run.
PEER_FILES = {"gpt": "autoregressive/models/gpt.py",
              "generate": "autoregressive/models/generate.py",
              "vq": "tokenizer/tokenizer_image/vq_model.py"}


def load_peer(path):
    """The checkout's PEER_FILES as modules (llamagen_gpt, ...). gpt.py imports `utils.drop_path`
    from the checkout's root: on sys.path while they load, any `utils` of ours put back after."""
    import importlib.util
    if missing := [f for f in PEER_FILES.values() if not os.path.isfile(os.path.join(path, f))]:
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


def bench_peer(args):
    """Ours against the official LlamaGen code (--peer PATH), alternating in one process on the
    same random weights: GPT-B sampling (256 tokens, CFG 4, full codebook) fp32 and bf16, and the
    VQ-16 decoder at 256 px (fp32), batch 1 and 8; ms per image and the ratio."""
    peer, repeat, dev = args.peer_modules, args.repeat, args.device
    # their generate.py enters the deprecated torch.backends.cuda.sdp_kernel for every token
    warnings.filterwarnings("ignore", message=".*sdp_kernel.*", category=FutureWarning)
    # --quick: a 4-layer, 128-wide GPT over an 8x8 grid, 64 px decodes: the same code paths
    shape = dict(n_layer=4, n_head=4, dim=128) if args.quick else GPT_CONFIGS["B"]
    name, length, batches = ("GPT 4x128", 64, (1, 2)) if args.quick else ("GPT-B", 256, (1, 8))
    torch.manual_seed(0)
    official = peer["gpt"].Transformer(peer["gpt"].ModelArgs(
        **shape, vocab_size=16384, block_size=length, num_classes=1000, cls_token_num=1,
        model_type="c2i")).eval()
    # their init zeroes the output layer; drawn here, so that the logits compared differ by code
    torch.nn.init.normal_(official.output.weight, std=0.02)
    ours = load_weights(GPT(GPTConfig(**shape, block_size=length)), official.state_dict(),
                        "the official GPT's weights").eval()
    idx, cond = torch.randint(0, 16384, (2, 16)), torch.tensor([3, 1000])  # 1000: the null class
    with torch.no_grad():  # teacher-forced logits agree to float32 rounding
        theirs_logits = official(idx, cond, input_pos=torch.arange(17))[0][:, :16]
        gap = (ours(idx, cond)[0] - theirs_logits).abs().max().item()
    if gap > 1e-3:
        raise UserError(f"--peer {args.peer}: its GPT's logits differ from ours by {gap:.2g} on "
                        "the same weights; is it a modified checkout?")
    print(f"same weights, logits agree to {gap:.1g}; times: best of {repeat}, interleaved")
    for dtype_name, dtype in DTYPES.items():
        theirs_model, ours_model = [copy.deepcopy(m).to(dev, dtype) for m in (official, ours)]
        for batch in batches:
            cond = torch.arange(batch, device=dev) * 97 % 1000  # CFG 4 to the end, both sides
            (theirs_s, ours_s), _ = timed_side_by_side([
                lambda: peer["generate"].generate(theirs_model, cond, length, cfg_scale=4.0,
                                                  temperature=1.0, top_k=0, top_p=1.0),
                lambda: decoding.generate(ours_model, cond, cfg_scale=4.0)], repeat, dev)
            floor = bandwidth_floor(ours_model, dev, length) if batch == 1 else ""
            print(f"{name} sample {dtype_name} batch {batch}, CFG 4.0, {length} passes per image: "
                  f"official {theirs_s / batch * 1e3:7.0f} ms/image, ours "
                  f"{ours_s / batch * 1e3:7.0f} ms/image: {theirs_s / ours_s:.2f}x{floor}",
                  flush=True)
        del theirs_model, ours_model
    # the tokenizer's decoder, in float32 as sample.py runs it; the pixels compared
    official_vq = peer["vq"].VQ_models["VQ-16"](codebook_size=16384, codebook_embed_dim=8)
    ours_vq = load_weights(VQModel(vq_config("VQ-16")), official_vq.state_dict(),
                           "the official VQ-16's weights").to(dev).eval()
    official_vq, side = official_vq.to(dev).eval(), 4 if args.quick else 16
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


# ------------------------------------------------------------------------ re-ranking (DALL-E 2.5)
def rerank_sweep(generate, clip_model, tokenizer, prompts, ns=(1, 2, 4, 8, 16, 32), seed=0):
    """DALL-E's best-of-N figure: each prompt keeps the CLIP-best of its first N candidates
    (generate(prompts, n, seed) -> uint8 (P*n, H, W, 3), prompt-major, drawn once), graded by
    scenes.score -> rows {"n", "overall", each task, "s_per_kept": sampling + ranking seconds}."""
    texts, top = [p["prompt"] for p in prompts], max(ns)
    t0 = time.perf_counter()
    drawn = generate(prompts, top, seed)
    per_candidate = (time.perf_counter() - t0) / len(drawn)
    grouped = drawn.reshape(len(prompts), top, *drawn.shape[1:])  # (prompt, candidate, H, W, 3)
    rows = []
    for n in ns:
        t0 = time.perf_counter()
        kept, _ = clip.rerank_candidates(grouped[:, :n].reshape(-1, *drawn.shape[1:]), texts,
                                         clip_model, 1, tokenizer)
        ranking = (time.perf_counter() - t0) / len(prompts)
        res = scenes.score(list(kept), prompts)  # the exact checker: N changes only the pick
        rows.append({"n": n, "overall": res["overall"], **{t: res[t] for t in scenes.TASKS},
                     "s_per_kept": n * per_candidate + ranking})
    return rows


def model_generator(gpt_path, vq_path, cfg_scale, device, batch_size=256):
    """generate(prompts, n, seed) for rerank_sweep from a text-to-image GPT that learned its own
    text side (the demo's: --text t5-nano or stream) and its tokenizer, at cfg_scale, one
    generator stream, batch_size at a time."""
    vq = VQModel.from_pretrained(vq_path).to(device).eval()
    gpt = sample.load_gpt(gpt_path, None, vq.config.downsample)[0].to(device).eval()
    if (gpt.meta.get("text") or {}).get("kind") not in ("joint", "stream"):
        raise UserError(f"{gpt_path}: re-ranking here needs a text-to-image GPT that learned its "
                        "own text side (train.py --text t5-nano or stream), as the demo's")

    def generate(prompts, n, seed):
        # the captions of a batch are encoded when it is drawn, its pictures kept as bytes
        condition = t2i.joint_condition(gpt, gpt_path, [p["prompt"] for p in prompts], device)
        labels = [i for i in range(len(prompts)) for _ in range(n)]  # prompt-major
        gen = torch.Generator(device).manual_seed(seed)
        return np.concatenate([
            sample.sample_images(gpt, vq, labels[b:b + batch_size], cfg_scale=cfg_scale,
                                 generator=gen, condition=condition)
            for b in range(0, len(labels), batch_size)])
    return generate


def bench_rerank(args):
    """Re-ranking on the built-in benchmark with the demo's CLIP: accuracy against N = 1..32
    candidates, and seconds per kept image; the candidates from the demo's text-to-image GPT at
    its guided scale, cfg 1.5."""
    if not os.path.isfile(sample.DEMO_CLIP):
        print(f"skipped: no CLIP at {sample.DEMO_CLIP} (python train.py --model CLIP-tiny --data "
              f"scenes --out-dir runs/clip, then copy runs/clip/ckpt.pt there)")
        return
    model, tokenizer = clip.load(sample.DEMO_CLIP)
    prompts = scenes.benchmark_prompts(2 if args.quick else 50)
    gpt_path, vq_path = t2i.DEMO_T2I_GPT, t2i.DEMO_T2I_VQ
    if not (os.path.isfile(gpt_path) and os.path.isfile(vq_path)):
        print(f"skipped: no text-to-image GPT at {gpt_path} (python demo.py --only t2i writes one)")
        return
    cfg = demo.HALF_DEFAULTS["t2i"]["t2i_cfg"]  # re-ranking on top of the demo's guidance
    generate = model_generator(gpt_path, vq_path, cfg, args.device)
    print(f"generator: {gpt_path} at cfg {cfg:g} (the demo's guided scale)")
    print("N   overall " + " ".join(f"{t[:10]:>10}" for t in scenes.TASKS) + "  s/kept image")
    for r in rerank_sweep(generate, model, tokenizer, prompts, (1, 2, 4) if args.quick else
                          (1, 2, 4, 8, 16, 32)):
        print(f"{r['n']:<3} {r['overall']:7.3f} " + " ".join(f"{r[t]:10.3f}" for t in scenes.TASKS)
              + f"  {r['s_per_kept']:.4f}", flush=True)


BENCHES = {"gpt": bench_gpt, "train": bench_train, "vq": bench_vq, "fid": bench_fid,
           "text": bench_text, "clip": bench_clip, "rerank": bench_rerank, "peer": bench_peer,
           "jacobi": bench_jacobi, "t2i": bench_t2i}
OPT_IN = ("peer", "jacobi")  # run only when asked for by name (peer also needs --peer PATH)
# The flags of the opt-in benchmarks, refused without them rather than ignored: a --window that
# did nothing would read as a measurement of that window.
RANGES = {"repeat": at_least(1), "window": at_least(1)}
ONLY_WITH = [("peer", "--only peer", lambda a: "peer" in a.names),
             ("repeat", "--only peer or jacobi", lambda a: {"peer", "jacobi"} & set(a.names)),
             ("gpt_ckpt", "--only jacobi", lambda a: "jacobi" in a.names),
             ("window", "--only jacobi", lambda a: "jacobi" in a.names)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help=f"comma-separated subset of {list(BENCHES)} (default: all but "
                   f"{' and '.join(OPT_IN)}; peer too when --peer is given)")
    p.add_argument("--device", default="auto", help="cuda, mps or cpu (default: the best one)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats, for a smoke run")
    a = p.add_argument_group("peer and jacobi").add_argument
    a("--peer", metavar="PATH", help="peer: a checkout of github.com/FoundationVision/LlamaGen, "
      "whose gpt.py, generate.py and vq_model.py are timed against ours")
    a("--repeat", type=int, help="peer, jacobi: timed runs of each case (default: 3; --quick: 1)")
    a("--gpt-ckpt", help="jacobi: a trained GPT, ours or an official c2i file (default: random "
      "GPT-B weights)")
    a("--window", type=int, help="jacobi: codes scored per forward pass (default: 16)")
    args = p.parse_args(argv)
    args.names = args.only.split(",") if args.only else \
        [n for n in BENCHES if n not in OPT_IN] + (["peer"] if args.peer else [])
    if "peer" in args.names and not args.peer:
        raise UserError("--only peer needs --peer PATH, a checkout of "
                        "github.com/FoundationVision/LlamaGen")
    check_flags(args, RANGES, ONLY_WITH)
    if unknown := [n for n in args.names if n not in BENCHES]:
        raise UserError(f"--only {unknown[0]!r} is not a benchmark; choose from {list(BENCHES)}")
    args.repeat = (1 if args.quick else 3) if args.repeat is None else args.repeat
    args.window = 16 if args.window is None else args.window
    # imported now, so that a wrong PATH fails before the benchmarks that run ahead of peer
    args.peer_modules = load_peer(args.peer) if "peer" in args.names else None
    args.device = pick_device(args.device)  # not setup_device, which turns TF32 on: true fp32
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else ""
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads {gpu}, torch {torch.__version__}, device {args.device}")
    for name in args.names:
        print(f"\n== {name}: {' '.join(BENCHES[name].__doc__.split())}")
        BENCHES[name](args)


if __name__ == "__main__":
    cli(main)
