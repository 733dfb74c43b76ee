"""train.py: one process == DDP == FSDP, resume == uninterrupted, a GPT that learns, clear errors."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from codes import extract_codes
from common import load_checkpoint
from conftest import ENV, ROOT, PatchColours
from tokenizer import VQModel, vq_config

pytestmark = pytest.mark.subprocess  # python train.py and torchrun, as users run them


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    out = tmp_path_factory.mktemp("codes") / "synthetic32"
    extract_codes(PatchColours(), "synthetic:1100", out, image_size=32, batch_size=100)
    return str(out)


def run(args, nproc=1, check=True):
    """train.py in a fresh process: as a user runs it (`python` or `torchrun`)."""
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    p = subprocess.run(launcher + ["train.py", *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out, name="ckpt.pt"):
    return load_checkpoint(os.path.join(out, name))["model"]


def assert_same_weights(a, b, tol):
    assert a.keys() == b.keys()
    print("max weight difference", max((a[k] - b[k]).abs().max().item() for k in a))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), (k, (a[k] - b[k]).abs().max())


GPT_ARGS = ["--model", "nano", "--batch-size", 8, "--val-size", 100, "--num-workers", 0, "--eval-interval", 3,
            "--lr", 3e-3, "--log-interval", 1]


def test_ddp_and_fsdp_match_one_process(codes, tmp_path):
    """Dropout off: 2-rank DDP, 2-rank FSDP, and one process with 2 accumulation steps all train the same
    model on the same global batches as one plain process."""
    common = GPT_ARGS + ["--data", codes, "--max-steps", 6, "--dropout", 0, "--class-dropout", 0, "--lr", 1e-3]
    run(common + ["--out-dir", tmp_path / "one"])
    run(common + ["--out-dir", tmp_path / "accum", "--grad-accum", 2])
    run(common + ["--out-dir", tmp_path / "ddp"], nproc=2)
    run(common + ["--out-dir", tmp_path / "fsdp", "--fsdp"], nproc=2)
    ref = log(tmp_path / "one")
    assert len(ref) == 6 and ref[-1]["loss"] < ref[0]["loss"]
    for other in ("accum", "ddp", "fsdp"):
        got = log(tmp_path / other)
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], abs=1e-5), other
        assert got[-1]["val"] == pytest.approx(ref[-1]["val"], abs=1e-5)
        assert_same_weights(weights(tmp_path / other), weights(tmp_path / "one"), 1e-5)
    # --log-interval 4 writes lines at steps 3 (validation), 4 and 6 (the end), each the mean since the last
    run(common + ["--out-dir", tmp_path / "sparse", "--log-interval", 4])
    sparse = log(tmp_path / "sparse")
    assert [r["step"] for r in sparse] == [3, 4, 6] and "val" in sparse[0] and "val" not in sparse[1]
    for r, window in zip(sparse, (ref[0:3], ref[3:4], ref[4:6])):
        for key in ("loss", "grad_norm"):
            assert r[key] == pytest.approx(sum(w[key] for w in window) / len(window), abs=1e-5)


def test_resume_after_kill_matches_uninterrupted(codes, tmp_path):
    """Dropout on. A run killed with SIGKILL after a checkpoint, then --resume'd, ends with exactly the
    weights and losses of a run that was never interrupted."""
    out = tmp_path / "killed"
    args = GPT_ARGS + ["--data", codes, "--ckpt-interval", 5]
    p = subprocess.Popen([sys.executable, "train.py", *map(str, args + ["--max-steps", 100000, "--out-dir", out])],
                         cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it between its second and third checkpoints
        steps = len(log(out)) if (out / "log.jsonl").exists() else 0
        if steps >= 12:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    saved = load_checkpoint(out / "ckpt.pt")["step"]
    assert saved >= 10 and saved % 5 == 0
    end = saved + 4
    run(args + ["--max-steps", end, "--out-dir", out, "--resume"])
    run(args + ["--max-steps", end, "--out-dir", tmp_path / "straight"])
    straight, resumed = log(tmp_path / "straight"), log(out)
    # the killed run may have logged steps after its last checkpoint; the resumed run logs them again
    tail = [r for r in resumed if r["step"] > saved][-4:]
    assert [r["loss"] for r in tail] == pytest.approx([r["loss"] for r in straight[saved:]], abs=1e-6)
    assert_same_weights(weights(out), weights(tmp_path / "straight"), 1e-6)


def test_gpt_learns_the_embedded_dataset(codes, tmp_path):
    """The nano GPT on codes of the embedded dataset (64 codes, 8x8 grid): after 100 steps of 16 the
    held-out loss is well under log(64) = 4.16 nats, the loss of knowing nothing (the zero-initialised
    output layer starts exactly there). We assert < 1.6 nats/token; 1.17 was seen after 50 steps of 32."""
    out = tmp_path / "learn"
    run(GPT_ARGS + ["--data", codes, "--max-steps", 100, "--eval-interval", 100, "--batch-size", 16,
                    "--out-dir", out])
    val = log(out)[-1]["val"]
    assert val < 1.6 < math.log(64)
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["config"]["vocab_size"] == 64 and ckpt["config"]["block_size"] == 64
    assert ckpt["config"]["num_classes"] == 10 and ckpt["step"] == 100 and ckpt["samples_seen"] == 100 * 16
    assert ckpt["args"]["weight_decay"] == 0.05 and ckpt["args"]["epochs"] == 300  # the GPT recipe (paper 3.2)


def test_tokenizer_stage(tmp_path):
    """--model VQ-*: the discriminator trains only from --disc-start on, and the checkpoint loads with
    VQModel.from_pretrained."""
    out = tmp_path / "vq"
    run(["--model", "VQ-tiny", "--data", "synthetic:40", "--image-size", 32, "--batch-size", 4,
         "--val-size", 8, "--max-steps", 3, "--disc-start", 3, "--perceptual-weight", 0, "--num-workers", 0,
         "--eval-interval", 3, "--ckpt-interval", 1, "--keep-ckpts", "--out-dir", out])
    d = [load_checkpoint(out / f"ckpt_{s:07d}.pt")["discriminator"] for s in (1, 2, 3)]
    key = next(k for k in d[0] if k.endswith("weight") and d[0][k].dim() == 4)
    assert torch.equal(d[0][key], d[1][key])  # steps 1 and 2: before --disc-start 3
    assert not torch.equal(d[1][key], d[2][key])  # step 3 trains it
    vq = VQModel.from_pretrained(str(out / "ckpt.pt"))
    assert vq.config == vq_config("VQ-tiny")
    # the tokenizer recipe of the official code: Adam without decay, lr 1e-4 per 128 images, 40 epochs
    saved = load_checkpoint(out / "ckpt.pt")["args"]
    assert saved["weight_decay"] == 0 and saved["lr"] == pytest.approx(1e-4 * 4 / 128) and saved["epochs"] == 40
    lines = log(out)
    assert 5 < lines[-1]["val"] < 60  # PSNR in dB, a sane value
    # the log holds the loss's parts: it is their sum, and the GAN terms appear from --disc-start on
    assert [("gen_adv" in r, "disc" in r) for r in lines] == [(False, False), (False, False), (True, True)]
    for r in lines:
        parts = r["rec"] + r["vq"] + r["commit"] + r["entropy"] + 0.5 * r.get("gen_adv", 0.0)
        assert r["loss"] == pytest.approx(parts, abs=1e-6)


def test_bad_input_messages(codes, tmp_path, capsys):
    from common import cli
    cases = [
        (["--model", "nonsense", "--data", codes], "unknown --model 'nonsense'"),
        (["--model", "nano", "--data", "/no/such/folder"], "does not exist"),
        (["--model", "nano", "--data", codes, "--batch-size", 10, "--grad-accum", 4],
         "not divisible by world size 1 x --grad-accum 4"),
        (["--model", "nano", "--data", codes, "--resume"], "--resume: no checkpoint"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            cli(lambda: train.main([*map(str, args), "--out-dir", str(tmp_path / "o")]))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err


# Every flag does what it says or is refused: a flag of the other stage, or a number the loop cannot
# honour, is one line naming it and exit code 2 (the policy codes.py applies to --crop-range).
REFUSED = [
    ("nano", ["--image-size", 32], "--image-size only applies to the tokenizer stage"),
    ("nano", ["--disc-start", 5], "--disc-start only applies to the tokenizer stage"),
    ("nano", ["--disc-weight", 0], "--disc-weight only applies to the tokenizer stage"),
    ("nano", ["--perceptual-weight", 0], "--perceptual-weight only applies to the tokenizer stage"),
    ("nano", ["--lpips", "/no/lpips"], "--lpips only applies to the tokenizer stage"),
    ("nano", ["--codebook-size", 64], "--codebook-size only applies to the tokenizer stage"),
    ("nano", ["--entropy-loss-ratio", 0.1], "--entropy-loss-ratio only applies to the tokenizer stage"),
    ("VQ-tiny", ["--dropout", 0], "--dropout only applies to the GPT stage"),
    ("VQ-tiny", ["--class-dropout", 0], "--class-dropout only applies to the GPT stage"),
    ("VQ-tiny", ["--grad-ckpt"], "--grad-ckpt only applies to the GPT stage"),
    ("nano", ["--max-steps", 0], "--max-steps must be at least 1, got 0"),
    ("nano", ["--eval-interval", 0], "--eval-interval must be at least 1, got 0"),
    ("nano", ["--ckpt-interval", 0], "--ckpt-interval must be at least 1, got 0"),
    ("nano", ["--grad-accum", 0], "--grad-accum must be at least 1, got 0"),
    ("nano", ["--val-size", 0], "--val-size must be at least 1, got 0"),
    ("nano", ["--lr", 0], "--lr must be > 0, got 0"),
]


@pytest.mark.parametrize("model, flags, message", REFUSED,
                         ids=[" ".join(map(str, f)) for _, f, _ in REFUSED])
def test_flags_that_do_not_apply_are_refused(model, flags, message, codes, tmp_path, capsys):
    """In-process through common.cli: exit 2, one line, the flag named; nothing is trained or
    written (the refusals come before any data is read or any model built)."""
    from common import cli
    data_arg = codes if model == "nano" else "synthetic:40"
    argv = ["--model", model, "--data", data_arg, "--out-dir", str(tmp_path / "o"),
            *map(str, flags)]
    with pytest.raises(SystemExit) as e:
        cli(lambda: train.main(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_stage_flags_resolve_to_their_documented_defaults(codes):
    """A flag left out takes the default its --help names, as before it became None to detect
    "given": the checkpoint's "args" lists every flag with the same value as ever."""
    args = train.get_args(["--model", "nano", "--data", codes])
    recipe = train.resolve_recipe(args, train.GPTStage, "runs/x", None, 1, "cpu")
    assert (recipe.image_size, recipe.disc_start, recipe.disc_weight, recipe.perceptual_weight) == \
        (256, 20000, 0.5, 1.0)
    assert recipe.grad_ckpt is False and recipe.dropout is None and recipe.lpips is None
    assert (recipe.batch_size, recipe.weight_decay, recipe.epochs) == (256, 0.05, 300)
    assert recipe.precision == "fp32"  # "auto" on a CPU
    assert recipe.lr == 1e-4 and recipe.out_dir == "runs/x"
    vq_args = train.get_args(["--model", "VQ-tiny", "--data", "synthetic", "--batch-size", "32"])
    vq = train.resolve_recipe(vq_args, train.VQStage, "runs/y", None, 1, "cpu")
    assert (vq.batch_size, vq.weight_decay, vq.epochs) == (32, 0.0, 40)
    assert vq.lr == pytest.approx(1e-4 * 32 / 128)  # linear in the batch, 1e-4 per 128 images


def test_one_adamw_recipe_for_every_network():
    """configure_optimizers: decay on >= 2-D tensors (matrices, conv kernels, embeddings) only, for
    the tokenizer's PatchGAN as for the GPT; fused only on CUDA."""
    from tokenizer import PatchGAN
    disc = PatchGAN()
    opt = train.configure_optimizers(disc, 0.05, 1e-4, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(p) for p in disc.parameters() if p.dim() == 4}
    assert len(decay["params"]) == 5  # the five convolution kernels
    # the first and last convolutions' biases, the weight and bias of three BatchNorms
    assert all(p.dim() == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 2 + 3 * 2
    assert opt.defaults["lr"] == 1e-4 and opt.defaults["betas"] == (0.9, 0.95)
    assert not opt.defaults.get("fused")


def test_codes_of_another_tokenizer_refuse_to_resume(codes, tmp_path):
    """A checkpoint trained on 64-code 8x8 codes cannot continue on codes of another grid."""
    out = tmp_path / "o"
    run(GPT_ARGS + ["--data", codes, "--max-steps", 1, "--out-dir", out])
    other = tmp_path / "c16"
    extract_codes(PatchColours(), "synthetic:120", other, image_size=16, batch_size=60)
    p = run(GPT_ARGS + ["--data", other, "--max-steps", 2, "--out-dir", out, "--resume"], check=False)
    assert p.returncode == 2 and "(grid [8, 8] vs [4, 4])" in p.stderr


def test_resume_keeps_the_runs_recipe(codes, tmp_path):
    """Unset flags come from the checkpoint, not from today's defaults; a different batch size or weight
    decay is refused (the data position is step * batch, and the optimizer state keeps its decay)."""
    out = tmp_path / "o"
    run(GPT_ARGS + ["--data", codes, "--max-steps", 1, "--weight-decay", 0.01, "--out-dir", out])
    i = GPT_ARGS.index("--batch-size")
    without_batch = GPT_ARGS[:i] + GPT_ARGS[i + 2:]
    run(without_batch + ["--data", codes, "--max-steps", 2, "--out-dir", out, "--resume"])
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["args"]["batch_size"] == 8 and ckpt["samples_seen"] == 2 * 8 and ckpt["args"]["weight_decay"] == 0.01
    for flag, value, saved in (("--batch-size", 16, 8), ("--weight-decay", 0.05, 0.01)):
        p = run(without_batch + ["--data", codes, "--max-steps", 3, "--out-dir", out, "--resume", flag, value],
                check=False)
        assert p.returncode == 2 and f"{flag} {value} differs from the checkpoint's {saved}" in p.stderr


def test_divergence_stops_before_a_bad_checkpoint(codes, tmp_path):
    """An absurd learning rate: the run stops with one line naming the last good checkpoint, which holds
    finite weights (a log line, with its finiteness check, comes before every save)."""
    out = tmp_path / "o"
    p = run(GPT_ARGS + ["--data", codes, "--max-steps", 20, "--lr", 1e30, "--ckpt-interval", 1, "--out-dir", out],
            check=False)
    assert p.returncode == 2 and f"the last good checkpoint is {out / 'ckpt.pt'}" in p.stderr
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert 1 <= ckpt["step"] < 20 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_ema_is_the_running_average_and_what_sampling_loads(codes, tmp_path):
    """--ema d: after each step ema = d * ema + (1 - d) * weights; from_pretrained serves the average."""
    from model import GPT
    out = tmp_path / "ema"
    run(GPT_ARGS + ["--data", codes, "--max-steps", 3, "--ema", 0.5, "--ckpt-interval", 1, "--keep-ckpts",
                    "--out-dir", out])
    two, three = (load_checkpoint(out / f"ckpt_{s:07d}.pt") for s in (2, 3))
    k = "layers.0.attention.wqkv.weight"
    assert torch.allclose(three["ema"][k], 0.5 * two["ema"][k] + 0.5 * three["model"][k], atol=1e-7)
    assert not torch.allclose(three["ema"][k], three["model"][k])
    assert torch.equal(GPT.from_pretrained(str(out / "ckpt.pt")).state_dict()[k], three["ema"][k])
