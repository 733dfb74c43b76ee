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
import torch.nn.functional as F

import data
import train
from common import load_checkpoint
from tokenizer import VQModel, vq_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


class PatchColours(torch.nn.Module):
    """A fixed stand-in tokenizer for the trainer's tests: each 4x4 patch -> its mean colour quantised
    to 4 levels per channel (64 codes). Codes of the embedded dataset that mean something, made fast."""

    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"codebook_size": 64})()

    def encode(self, images):
        q = ((F.avg_pool2d(images, 4) + 1) / 2 * 3.999).floor().long().clamp(0, 3)
        return q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2]


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    out = tmp_path_factory.mktemp("codes") / "synthetic32"
    data.extract_codes(PatchColours(), "synthetic:1100", out, image_size=32, batch_size=100)
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


def test_codes_of_another_tokenizer_refuse_to_resume(codes, tmp_path):
    """A checkpoint trained on 64-code 8x8 codes cannot continue on codes of another grid."""
    out = tmp_path / "o"
    run(GPT_ARGS + ["--data", codes, "--max-steps", 1, "--out-dir", out])
    other = tmp_path / "c16"
    data.extract_codes(PatchColours(), "synthetic:120", other, image_size=16, batch_size=60)
    p = run(GPT_ARGS + ["--data", other, "--max-steps", 2, "--out-dir", out, "--resume"], check=False)
    assert p.returncode == 2 and "grid [8, 8]) than those in" in p.stderr and "grid [4, 4])" in p.stderr


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
