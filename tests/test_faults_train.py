"""train.py under bad input and faults: every case is one line and a known exit code, never a
traceback or a silent wrong run, and no finished file is lost (issue 12, the trainer's half).

Most cases run train.main in this process through common.cli (conftest.run_cli); the torchrun case
starts processes. The runs are the nano GPT on 8x8 codes of the embedded dataset, a few steps."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid

import pytest
import torch

import train
from codes import extract_codes
from common import load_checkpoint
from conftest import ENV, ROOT, HashTokenizer, PatchColours, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    out = tmp_path_factory.mktemp("codes") / "c"
    extract_codes(PatchColours(), "synthetic:300", out, image_size=32, batch_size=100)
    return str(out)


def gpt(codes, out, *flags, steps=2):
    """The argv of a tiny GPT run: batch 4, a log line every step."""
    return ["--model", "nano", "--data", codes, "--batch-size", 4, "--val-size", 10,
            "--num-workers", 0, "--log-interval", 1, "--max-steps", steps, "--out-dir", out,
            *flags]


def vq(out, *flags):
    return ["--model", "VQ-tiny", "--data", "synthetic:40", "--image-size", 16, "--batch-size", 4,
            "--val-size", 8, "--num-workers", 0, "--max-steps", 1, "--perceptual-weight", 0,
            "--out-dir", out, *flags]


def rows(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def one_line(code, err, expected_code, *words):
    """The promise: `expected_code`, and stderr is exactly one line holding every word."""
    lines = err.strip().splitlines()
    assert code == expected_code and len(lines) == 1, err
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in err and "weights_only" not in err


@pytest.fixture(scope="module")
def runs(codes, tmp_path_factory):
    """A finished 2-step GPT run and a 1-step tokenizer run, copied by the tests that change
    them."""
    root = tmp_path_factory.mktemp("runs")
    train.main(list(map(str, gpt(codes, root / "gpt"))))
    train.main(list(map(str, vq(root / "vq"))))
    return root


def copy_run(runs, name, tmp_path):
    dst = tmp_path / f"{name}-{uuid.uuid4().hex[:6]}"
    shutil.copytree(runs / name, dst)
    return dst


# ------------------------------------------------------------------------ 1. numbers and flags
# (flags, the words of the one line): each is refused before any data is read or folder made
BAD_FLAGS = [
    (["--max-steps", -5], "--max-steps must be at least 1, got -5"),
    (["--max-steps", 0], "--max-steps must be at least 1, got 0"),
    (["--epochs", 0], "--epochs must be > 0, got 0"),
    (["--epochs", -1], "--epochs must be > 0, got -1"),
    (["--epochs", "inf"], "--epochs must be > 0, got inf"),
    (["--batch-size", 0], "--batch-size must be at least 1, got 0"),
    (["--batch-size", -4], "--batch-size must be at least 1, got -4"),
    (["--lr", -1], "--lr must be > 0, got -1"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--dropout", 1.5], "--dropout must be in [0, 1), got 1.5"),
    (["--dropout", -0.1], "--dropout must be in [0, 1), got -0.1"),
    (["--class-dropout", 1], "--class-dropout must be in [0, 1), got 1"),
    (["--num-workers", -1], "--num-workers must be at least 0, got -1"),
    (["--grad-accum", 0], "--grad-accum must be at least 1, got 0"),
    (["--ckpt-interval", 0], "--ckpt-interval must be at least 1, got 0"),
    (["--eval-interval", -3], "--eval-interval must be at least 1, got -3"),
    (["--log-interval", 0], "--log-interval must be at least 1, got 0"),
    (["--warmup-steps", -1], "--warmup-steps must be at least 0, got -1"),
    (["--weight-decay", -0.5], "--weight-decay must be at least 0, got -0.5"),
    (["--grad-clip", -1], "--grad-clip must be at least 0, got -1"),
    (["--ema", 1], "--ema must be in [0, 1), got 1"),
    (["--batch-size", 6, "--grad-accum", 4],
     "--batch-size 6 is not divisible by world size 1 x --grad-accum 4; pick a multiple of 4"),
    (["--precision", "fp16"], "--precision fp16 needs a CUDA GPU", "use --precision fp32 or bf16"),
    (["--overwrite", "--resume"], "--resume continues the run", "--overwrite replaces it"),
]
VQ_BAD = [
    (["--image-size", 30], "--image-size 30 is not a multiple of the tokenizer's downsampling "
     "factor 4", "use 28 or 32"),
    (["--image-size", 2], "--image-size 2 is not a multiple", "use 4"),
    (["--codebook-size", 0], "--codebook-size must be at least 1, got 0"),
    (["--disc-start", -1], "--disc-start must be at least 0, got -1"),
]


@pytest.mark.parametrize("flags, words", [(c[0], c[1:]) for c in BAD_FLAGS],
                         ids=[" ".join(map(str, c[0])) for c in BAD_FLAGS])
def test_bad_numbers_are_one_line_naming_the_range(flags, words, codes, tmp_path, capsys):
    code, _, err = run_cli(train.main, gpt(codes, tmp_path / "o") + flags, capsys)
    one_line(code, err, 2, *words)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, words", [(c[0], c[1:]) for c in VQ_BAD],
                         ids=[" ".join(map(str, c[0])) for c in VQ_BAD])
def test_bad_tokenizer_numbers(flags, words, tmp_path, capsys):
    code, _, err = run_cli(train.main, vq(tmp_path / "o") + flags, capsys)
    one_line(code, err, 2, *words)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------- 2. unwritable folders, full disks
@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount(size, *options) -> a fresh tmpfs folder (root only; skipped where mount fails)."""
    mounted = []

    def mount(size, *options):
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        opts = ",".join([f"size={size}", *options])
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                           capture_output=True)
        if p.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.decode().strip()}")
        mounted.append(where)
        return where
    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)])


def test_out_dir_under_a_file(codes, tmp_path, capsys):
    """A path through a regular file cannot be made, even by root: one line, exit 2."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "run"
    code, _, err = run_cli(train.main, gpt(codes, out), capsys)
    one_line(code, err, 2, f"cannot write {out}", "part of that path is a file")


def test_read_only_out_dir(codes, mount_tmpfs, capsys):
    out = mount_tmpfs("1m", "ro") / "run"
    code, _, err = run_cli(train.main, gpt(codes, out), capsys)
    one_line(code, err, 2, "cannot write", str(out), "Read-only file system")


def _no_space(*args, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_at_a_checkpoint_keeps_the_last_one(codes, tmp_path, capsys, monkeypatch):
    """torch.save fails at the second checkpoint as on a full disk (its OSError under torch's
    RuntimeError, as the zip writer raises it): one line naming the folder; ckpt.pt still holds
    step 1 and no temporary file is left. The resumed run then logs each step once."""
    out = tmp_path / "o"
    real, calls = torch.save, []

    def save(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a checkpoint")
            try:
                _no_space()
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:664] unexpected pos")
        return real(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", save)
    code, _, err = run_cli(train.main, gpt(codes, out, "--ckpt-interval", 1, steps=3), capsys)
    one_line(code, err, 2, f"no space left on {out}", "files kept")
    monkeypatch.setattr(torch, "save", real)
    assert load_checkpoint(out / "ckpt.pt")["step"] == 1
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl"]  # no .tmp-*
    assert [r["step"] for r in rows(out)] == [1, 2]  # step 2 was logged, then its save failed
    code, _, err = run_cli(train.main, gpt(codes, out, "--resume", steps=3), capsys)
    assert code == 0, err
    assert [r["step"] for r in rows(out)] == [1, 2, 3]


def test_full_disk_while_logging(codes, tmp_path, capsys, monkeypatch):
    """The log's write fails with ENOSPC at its third line: one line naming log.jsonl."""
    out = tmp_path / "o"
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.name, self.lines = f, f.name, 0

        def write(self, text):
            self.lines += 1
            if self.lines == 3:
                _no_space()
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return Full(f) if "a" in mode else f
    monkeypatch.setattr(train, "open", fake_open, raising=False)
    code, _, err = run_cli(train.main, gpt(codes, out, "--ckpt-interval", 1, steps=4), capsys)
    one_line(code, err, 2, f"no space left on {out / 'log.jsonl'}")
    assert load_checkpoint(out / "ckpt.pt")["step"] == 2


def test_really_full_tmpfs(codes, mount_tmpfs, capsys):
    """A tmpfs with room for one nano checkpoint (12.9 MB) but not for the temporary file of the
    next: the real torch.save failure, one line, the first checkpoint kept."""
    out = mount_tmpfs("20m") / "run"
    code, _, err = run_cli(train.main, gpt(codes, out, "--ckpt-interval", 1, steps=3), capsys)
    one_line(code, err, 2, "no space left on", str(out))
    assert load_checkpoint(out / "ckpt.pt")["step"] == 1
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


# ------------------------------------------------------------------- 3. what --resume is given
def _edit(key, value):
    def edit(ckpt):
        ckpt[key] = value(ckpt) if callable(value) else value
        return ckpt
    return edit


def _wider_embedding(ckpt):
    w = ckpt["model"]["tok_embeddings.weight"]
    ckpt["model"]["tok_embeddings.weight"] = torch.zeros(w.shape[0] + 1, w.shape[1])
    return ckpt


# (case, the run the file comes from, how it is changed, extra flags, words of the line)
RESUMES = [
    ("another model", "gpt", _edit("args", lambda c: {**c["args"], "model": "micro"}), [],
     ["is a checkpoint of --model micro, not nano", "pass --model micro"]),
    ("a tokenizer checkpoint in a GPT run", "vq", None, [],
     ["is a tokenizer checkpoint (--model VQ-tiny)", "--model nano trains the GPT"]),
    ("a wrong shape", "gpt", _wider_embedding, [],
     ["'tok_embeddings.weight' expected shape (64, 128), found (65, 128)"]),
    ("a bare state dict", "gpt", lambda c: c["model"], [],
     ["is a bare state dict (weights only), not a checkpoint of train.py"]),
    ("an official checkpoint", "gpt", lambda c: {"model": c["model"], "steps": 5}, [],
     ["is not a checkpoint of train.py (no recipe under 'args'"]),
    ("no optimizer state", "gpt", lambda c: {k: v for k, v in c.items() if k != "optimizer"},
     [], ["has no 'optimizer' state"]),
    ("an empty optimizer state", "gpt", _edit("optimizer", lambda c: {
        "state": {}, "param_groups": c["optimizer"]["param_groups"]}), [],
     ["has no 'optimizer' state"]),
    ("moments missing for one weight", "gpt", _edit("optimizer", lambda c: {
        "state": dict(list(c["optimizer"]["state"].items())[1:]),
        "param_groups": c["optimizer"]["param_groups"]}), [],
     ["the optimizer state in", "does not fit the model"]),
    ("--ema without an EMA", "gpt", None, ["--ema", 0.9], ["was trained without --ema"]),
    ("a text file", "gpt", "text", [], ["it is not a PyTorch checkpoint"]),
    ("an empty file", "gpt", "empty", [], ["it is empty or cut short"]),
    ("a finished run", "gpt", None, ["--max-steps", 2],
     ["the checkpoint is at step 2, and the run ends at step 2", "raise --max-steps"]),
]


@pytest.mark.parametrize("case, run, change, flags, words", RESUMES, ids=[c[0] for c in RESUMES])
def test_resume_names_what_the_file_is(case, run, change, flags, words, runs, codes, tmp_path,
                                       capsys):
    out = copy_run(runs, run, tmp_path)
    path = out / "ckpt.pt"
    if change == "text":
        path.write_text("hello\n")
    elif change == "empty":
        path.write_bytes(b"")
    elif change is not None:
        torch.save(change(torch.load(path, weights_only=False)), path)
    before = path.read_bytes()
    code, _, err = run_cli(train.main, gpt(codes, out, "--resume", *flags, steps=3), capsys)
    one_line(code, err, 2, *words)
    assert path.read_bytes() == before  # a refused resume writes nothing


def test_tokenizer_resumes_before_its_discriminator_starts(runs, tmp_path, capsys):
    """The tokenizer's checkpoint, discriminator and its AdamW included, passes the same checks
    (before --disc-start its AdamW has not stepped: get_state_dict saves zero moments)."""
    out = copy_run(runs, "vq", tmp_path)
    argv = vq(out, "--resume")
    argv[argv.index("--max-steps") + 1] = 2
    code, _, err = run_cli(train.main, argv, capsys)
    assert code == 0, err
    assert load_checkpoint(out / "ckpt.pt")["step"] == 2


def test_gpt_checkpoint_in_a_tokenizer_run(runs, tmp_path, capsys):
    out = copy_run(runs, "gpt", tmp_path)
    code, _, err = run_cli(train.main, vq(out, "--resume"), capsys)
    one_line(code, err, 2, "is a GPT checkpoint (--model nano)", "--model VQ-tiny trains the "
             "tokenizer")


# ------------------------------------------------- 4. what a failed run says about its way back
def test_fresh_run_that_diverges_names_no_checkpoint(codes, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = run_cli(train.main, gpt(codes, out, "--lr", 1e30, steps=5), capsys)
    one_line(code, err, 2, "by step", "no checkpoint was saved yet")
    assert "last good checkpoint" not in err and not (out / "ckpt.pt").exists()


def test_resumed_run_that_diverges_names_its_checkpoint(runs, codes, tmp_path, capsys):
    out = copy_run(runs, "gpt", tmp_path)
    code, _, err = run_cli(train.main, gpt(codes, out, "--resume", "--lr", 1e30, steps=5),
                           capsys)
    one_line(code, err, 2, f"the last good checkpoint is {out / 'ckpt.pt'}")
    assert load_checkpoint(out / "ckpt.pt")["step"] == 2


def test_codes_of_another_tokenizer_name_both_checksums(runs, tmp_path, capsys):
    """Same vocabulary (64) and grid (8x8), another tokenizer: the line shows the two checksums,
    and not the vocabulary and grid they share."""
    other = tmp_path / "hash"
    receipt = extract_codes(HashTokenizer(codebook_size=64), "synthetic:300", other,
                                 image_size=32, batch_size=100)
    was = load_checkpoint(runs / "gpt" / "ckpt.pt")["meta"]["tokenizer_checksum"]
    out = copy_run(runs, "gpt", tmp_path)
    capsys.readouterr()  # the extraction's progress
    code, _, err = run_cli(train.main, gpt(str(other), out, "--resume", steps=3), capsys)
    one_line(code, err, 2, f"tokenizer checksum {was[:16]} vs {receipt.tokenizer_checksum[:16]}")
    assert "vocab" not in err and "grid" not in err


# ---------------------------------------------------------------------- 5. the overwrite policy
def test_overwrite_replaces_the_old_run_only_at_its_first_checkpoint(runs, codes, tmp_path,
                                                                     capsys):
    out = copy_run(runs, "gpt", tmp_path)
    old_ckpt, old_log = (out / "ckpt.pt").read_bytes(), (out / "log.jsonl").read_text()
    (out / "ckpt_0000002.pt").write_bytes(old_ckpt)  # as the old run's --keep-ckpts would
    code, _, err = run_cli(train.main, gpt(codes, out, steps=3), capsys)
    one_line(code, err, 2, "exists; pass --resume to continue it or --overwrite to replace it")
    # a new run that dies before its first checkpoint leaves the old run whole
    code, _, err = run_cli(train.main, gpt(codes, out, "--overwrite", "--lr", 1e30,
                                           "--ckpt-interval", 100, steps=3), capsys)
    one_line(code, err, 2, "no checkpoint was saved yet")
    assert (out / "ckpt.pt").read_bytes() == old_ckpt and (out / "log.jsonl").read_text() == old_log
    # one that saves replaces ckpt.pt, the log and the old run's ckpt_<step>.pt
    code, _, err = run_cli(train.main, gpt(codes, out, "--overwrite", "--lr", 1e-3, steps=3),
                           capsys)
    assert code == 0, err
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 3 and ckpt["args"]["lr"] == 1e-3
    assert [r["step"] for r in rows(out)] == [1, 2, 3]
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl"]


# ------------------------------------------------------------------------------ 6. hygiene
def test_resume_drops_log_lines_after_the_checkpoint_and_stale_temporaries(runs, codes, tmp_path,
                                                                          capsys):
    """A kill after a log line but before its checkpoint (here: lines 3 and 4 and half a line
    past ckpt.pt's step 2), and a kill during a save (its .tmp- file): the resumed run's log lists
    every step once, in order, and the temporary file is gone."""
    out = copy_run(runs, "gpt", tmp_path)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 9.0}\n{"step": 4, "loss": 9.0}\n{"step": 5, "lo')
    stale = out / ".tmp-k1ll3d00ckpt.pt"
    stale.write_bytes(b"half")
    code, _, err = run_cli(train.main, gpt(codes, out, "--resume", steps=4), capsys)
    assert code == 0, err
    log = rows(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] < 9 for r in log)
    assert not stale.exists()


def test_ctrl_c_saves_at_a_step_boundary_and_resumes_exactly(codes, tmp_path, capsys,
                                                            monkeypatch):
    """SIGINT arrives during step 3 (dropout on): the run finishes that step, saves it, says how to
    go on, exits 130; resumed to step 5 it ends with the weights of a run never interrupted."""
    real, calls = train.Trainer.train_step, []
    # what the run must put back: Python's default, or SIG_IGN when started in the background
    handler = signal.getsignal(signal.SIGINT)

    def step_then_ctrl_c(self, *a):
        real(self, *a)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(train.Trainer, "train_step", step_then_ctrl_c)
    out = tmp_path / "o"
    flags = ["--log-interval", 2, "--ckpt-interval", 100]
    code, _, err = run_cli(train.main, gpt(codes, out, *flags, steps=5), capsys)
    one_line(code, err, 130, "interrupted at step 3; checkpoint saved to", "resume with --resume")
    assert load_checkpoint(out / "ckpt.pt")["step"] == 3
    monkeypatch.setattr(train.Trainer, "train_step", real)
    assert signal.getsignal(signal.SIGINT) is handler  # handler put back
    code, _, err = run_cli(train.main, gpt(codes, out, *flags, "--resume", steps=5), capsys)
    assert code == 0, err
    code, _, err = run_cli(train.main, gpt(codes, tmp_path / "straight", *flags, steps=5), capsys)
    assert code == 0, err
    a, b = (load_checkpoint(p / "ckpt.pt")["model"] for p in (out, tmp_path / "straight"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert [r["step"] for r in rows(out)] == [2, 3, 4, 5]  # 3: the interrupted run's last line


# ------------------------------------------------------------------------------ 7. torchrun
@pytest.mark.subprocess
def test_torchrun_prints_a_bad_flag_once(codes, tmp_path):
    """Two ranks, one bad flag: its line once (rank 0 speaks), both ranks exit 2 before joining
    the process group. torchrun itself then reports the failed child and exits 1."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "train.py",
                        *map(str, gpt(codes, tmp_path / "o", "--lr", -1))],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert p.stderr.count("error: --lr must be > 0, got -1") == 1, p.stderr
    assert "exitcode  : 2" in p.stderr and p.returncode != 0
    assert not (tmp_path / "o").exists()


def test_resume_keeps_the_flags_it_is_not_given(codes, tmp_path, capsys):
    """A resumed run takes every flag not typed again from its checkpoint: without --max-steps a
    finished 2-step run stays finished (it does not restart as today's default of 300 epochs),
    and the schedule, warmup and EMA of the first run carry on when only --max-steps changes."""
    out = str(tmp_path / "r")
    first = gpt(codes, out, "--lr-schedule", "cosine", "--warmup-steps", 1, "--ema", 0.5)
    assert run_cli(train.main, first, capsys)[0] == 0
    base = ["--model", "nano", "--data", codes, "--out-dir", out, "--num-workers", 0, "--resume"]
    code, _, err = run_cli(train.main, base, capsys)
    one_line(code, err, 2, "at step 2, and the run ends at step 2")
    code, _, err = run_cli(train.main, base + ["--max-steps", 3], capsys)
    assert code == 0, err
    saved = load_checkpoint(os.path.join(out, "ckpt.pt"))["args"]
    assert (saved["max_steps"], saved["lr_schedule"], saved["warmup_steps"], saved["ema"],
            saved["log_interval"], saved["val_size"]) == (3, "cosine", 1, 0.5, 1, 10)
    assert [r["step"] for r in rows(out)] == [1, 2, 3]
