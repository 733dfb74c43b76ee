"""sample.py on tiny random models: 16 px images of 4x4 codes from a 32-code tokenizer, 10 classes."""
import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

import sample
from conftest import ENV, ROOT, run_cli
from common import json_checksum, save_atomic, weights_checksum
from codes import CodesReceipt
from model import GPT, gpt_config
from tokenizer import VQModel, tokenizer_checksum, vq_config

VOCAB, GRID, SIZE, CLASSES = 32, 4, 16, 10  # VQ-tiny downsamples by 4: 16 px <-> 4x4 codes


pytestmark = pytest.mark.usefixtures("one_thread")


def save_vq(path, seed, **over):
    torch.manual_seed(seed)
    vq = VQModel(vq_config("VQ-tiny", **{"codebook_size": VOCAB, **over}))
    save_atomic(dict(model=vq.state_dict(), config=dataclasses.asdict(vq.config), kind="vq"), path)
    return vq


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """Checkpoints in train.py's format: a tokenizer, a GPT trained (here: initialised) on its codes, and
    the wrong partners for the error tests."""
    d = tmp_path_factory.mktemp("ckpts")
    vq = save_vq(d / "vq.pt", 0)
    save_vq(d / "vq_other.pt", 1)  # same topology, other weights
    save_vq(d / "vq_ds8.pt", 0, ch_mult=(1, 2, 2, 2))  # 16 px -> 2x2 codes
    save_vq(d / "vq_64.pt", 0, codebook_size=64)
    torch.manual_seed(0)
    # one 64-wide head: what from_pretrained infers for an official file of this width
    gpt = GPT(gpt_config("nano", n_layer=2, dim=64, n_head=1, vocab_size=VOCAB, block_size=GRID ** 2,
                         num_classes=CLASSES))
    torch.nn.init.normal_(gpt.output.weight, std=0.5)  # non-uniform logits, so classes and seeds matter
    meta = CodesReceipt(vocab_size=VOCAB, grid=(GRID, GRID), image_size=SIZE, n_aug=2, count=100,
                        tokenizer_checksum=tokenizer_checksum(vq), ten_crop=False, crop_range=None,
                        codes_dtype="uint16", labels_dtype="int16", data="synthetic:100",
                        num_classes=CLASSES, classes=tuple(map(str, range(CLASSES)))).to_dict()
    save_atomic(dict(model=gpt.state_dict(), config=dataclasses.asdict(gpt.config), kind="gpt", meta=meta),
                d / "gpt.pt")
    # the same weights as the official releases store them: no config, the trainer's argparse Namespace
    save_atomic(dict(model=gpt.state_dict(), args=argparse.Namespace(gpt_model="GPT-tiny"), steps=1), d / "c2i_tiny.pt")
    save_atomic(dict(model=vq.state_dict()), d / "vq_official.pt")
    return {p.stem: str(p) for p in d.iterdir()}


def models(ck):
    return GPT.from_pretrained(ck["gpt"]), VQModel.from_pretrained(ck["vq"])


def cli_run(argv, capsys):
    """sample.py's command line in-process: (exit code, stderr)."""
    code, _, err = run_cli(sample.main, argv, capsys)
    return code, err


EVAL = ["--num-samples", "23", "--batch-size", "4", "--cfg-scale", "2"]  # 6 batches, the last one of 3


@pytest.fixture(scope="module")
def reference_npz(ck, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    sample.main(["--gpt-ckpt", ck["gpt"], "--vq-ckpt", ck["vq"], *EVAL, "--out", str(out)])
    return out


def test_grid_png_holds_the_samples_one_row_per_class(ck, tmp_path):
    out = tmp_path / "grid.png"
    argv = ["--gpt-ckpt", ck["gpt"], "--vq-ckpt", ck["vq"], "--class", "1", "7", "--per-class", "3", "--batch-size", "4"]
    sample.main(argv + ["--out", str(out)])
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape == (2 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2, 3)  # common.make_grid: 2 px padding
    # the same images straight from sample_images: batch b of 4 is seeded by (seed 0, b), cfg 4 by default
    gpt, vq = models(ck)
    labels = [1, 1, 1, 7, 7, 7]
    direct = np.concatenate([sample.sample_images(gpt, vq, labels[b:b + 4], cfg_scale=4.0,
                                                  generator=torch.Generator().manual_seed(sample.batch_seed(0, b // 4)))
                             for b in (0, 4)])
    for i in range(6):
        y, x = 2 + (i // 3) * (SIZE + 2), 2 + (i % 3) * (SIZE + 2)
        np.testing.assert_array_equal(grid[y:y + SIZE, x:x + SIZE], direct[i])
    sample.main(argv + ["--out", str(tmp_path / "again.png")])  # same seed, same file
    assert (tmp_path / "again.png").read_bytes() == out.read_bytes()
    sample.main(argv + ["--out", str(tmp_path / "seed1.png"), "--seed", "1"])
    assert (tmp_path / "seed1.png").read_bytes() != out.read_bytes()


def test_pixels_follow_the_official_rule_resized_before_quantising(ck, tmp_path):
    """uint8 = clamp(127.5 x + 128) truncated; --resize-to: bicubic on the unclamped decoder output, then
    clamped and quantised (sample_c2i_ddp.py's order)."""
    gpt, vq = models(ck)
    codes = gpt.generate(torch.tensor([1, 2]), cfg_scale=2.0, generator=torch.Generator().manual_seed(5))
    raw = vq.decoder(vq.post_quant_conv(vq.quantize.lookup(codes.view(2, GRID, GRID))))
    assert raw.abs().max() > 1  # so clamping before the resize would give other pixels
    x = torch.nn.functional.interpolate(raw, size=(8, 8), mode="bicubic")
    expected = torch.clamp(127.5 * x + 128, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    got = sample.sample_images(gpt, vq, [1, 2], cfg_scale=2.0, generator=torch.Generator().manual_seed(5), resize_to=8)
    np.testing.assert_array_equal(got, expected)
    sample.main(["--gpt-ckpt", ck["gpt"], "--vq-ckpt", ck["vq"], "--class", "1", "--per-class", "3", "--resize-to", "8",
                 "--out", str(tmp_path / "small.png")])
    assert Image.open(tmp_path / "small.png").size == (3 * (8 + 2) + 2, 8 + 4)


def test_official_format_checkpoints_draw_the_same_pictures(ck, tmp_path):
    """Official files carry no config: the topology comes from the shapes, the grid from --image-size."""
    ours, official = tmp_path / "ours.png", tmp_path / "official.png"
    sample.main(["--gpt-ckpt", ck["gpt"], "--vq-ckpt", ck["vq"], "--class", "5", "--per-class", "2", "--out", str(ours)])
    sample.main(["--gpt-ckpt", ck["c2i_tiny"], "--vq-ckpt", ck["vq_official"], "--image-size", str(SIZE),
                 "--class", "5", "--per-class", "2", "--out", str(official)])
    assert official.read_bytes() == ours.read_bytes()


def test_progress_gif_reveals_the_raster_and_ends_on_the_picture(ck, tmp_path):
    png, gif = tmp_path / "p.png", tmp_path / "p.gif"
    sample.main(["--gpt-ckpt", ck["gpt"], "--vq-ckpt", ck["vq"], "--class", "3", "--per-class", "2", "--out", str(png),
                 "--progress", str(gif), "--progress-frames", "5"])
    frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(Image.open(gif))]
    assert len(frames) == 5  # after ceil(k * 16 / 5) = 4, 7, 10, 13, 16 tokens
    # GIF frames hold 256 colours: the last one is the PNG through Pillow's own palette reduction, exactly
    final = Image.open(png).convert("RGB")
    np.testing.assert_array_equal(frames[-1], np.asarray(final.convert("P", palette=Image.Palette.ADAPTIVE).convert("RGB")))
    for frame, t in zip(frames[:-1], (4, 7, 10, 13)):
        for x0 in (2, 2 + SIZE + 2):  # each image: cells >= t mid-grey (128), the written ones not all grey
            cells = frame[2:2 + SIZE, x0:x0 + SIZE].reshape(GRID, 4, GRID, 4, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1)
            assert np.abs(cells[t:].astype(int) - 128).max() <= 2
            assert np.abs(cells[:t].astype(int) - 128).max() > 2
    sample.main(["--gpt-ckpt", ck["gpt"], "--vq-ckpt", ck["vq"], "--class", "3", "--per-class", "1", "--out", str(png),
                 "--progress", str(gif), "--progress-frames", "100", "--overwrite"])
    assert Image.open(gif).n_frames == GRID ** 2  # at most one frame per token


def test_npz_is_uint8_nhwc_with_the_official_random_labels_and_round_trips(ck, reference_npz, tmp_path):
    with np.load(reference_npz) as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (23, SIZE, SIZE, 3) and images.dtype == np.uint8
    # uniform labels over every class, all drawn from --seed before any batch
    np.testing.assert_array_equal(labels, torch.randint(CLASSES, (23,), generator=torch.Generator().manual_seed(0)).numpy())
    assert len(set(labels.tolist())) > 3
    assert not os.path.exists(str(reference_npz) + ".parts")
    gpt, vq = models(ck)
    for b in (0, 5):  # batch b = samples [4b, 4b + 4), seeded by (0, b)
        gen = torch.Generator().manual_seed(sample.batch_seed(0, b))
        np.testing.assert_array_equal(images[4 * b:4 * b + 4],
                                      sample.sample_images(gpt, vq, labels[4 * b:4 * b + 4], cfg_scale=2.0, generator=gen))
    again = tmp_path / "again.npz"
    sample.main(["--gpt-ckpt", ck["gpt"], "--vq-ckpt", ck["vq"], *EVAL, "--out", str(again)])
    assert again.read_bytes() == reference_npz.read_bytes()


def test_balanced_labels_cycle_through_the_classes(ck, tmp_path):
    argv = ["--gpt-ckpt", ck["gpt"], "--vq-ckpt", ck["vq"], *EVAL, "--labels", "balanced", "--class", "2", "7", "9"]
    out = tmp_path / "balanced.npz"
    sample.main(argv + ["--out", str(out)])
    with np.load(out) as z:
        np.testing.assert_array_equal(z["arr_1"], np.array([2, 7, 9] * 8)[:23])  # 8, 8 and 7 of each


def test_resume_after_interruption_gives_identical_bytes(ck, reference_npz, tmp_path, monkeypatch, capsys):
    out, calls, crash, real = tmp_path / "s.npz", [], [True], sample.sample_images

    class Crash(Exception):
        pass

    def counted(*a, **k):  # with `crash` set: a process killed while sampling its third batch
        calls.append(1)
        if crash and len(calls) == 3:
            raise Crash
        return real(*a, **k)

    argv = ["--gpt-ckpt", ck["gpt"], "--vq-ckpt", ck["vq"], *EVAL, "--out", str(out)]
    monkeypatch.setattr(sample, "sample_images", counted)
    with pytest.raises(Crash):
        sample.main(argv)
    parts = sorted(os.listdir(str(out) + ".parts"))
    assert not out.exists() and parts == ["000000.npz", "000001.npz", "settings.json"]
    # other settings must not mix with these parts
    code, err = cli_run(argv + ["--seed", "1"], capsys)
    assert code == 2 and "holds samples made with other settings (seed 0 -> 1)" in err
    calls.clear(), crash.clear()
    sample.main(argv)
    assert len(calls) == 4  # only the 4 unfinished batches were sampled
    assert out.read_bytes() == reference_npz.read_bytes()
    assert not os.path.exists(str(out) + ".parts")


def test_two_torchrun_processes_write_the_same_npz(ck, reference_npz, tmp_path):
    out = tmp_path / "ddp.npz"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "sample.py"), "--gpt-ckpt", ck["gpt"], "--vq-ckpt", ck["vq"], *EVAL, "--out", str(out)]
    r = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.read_bytes() == reference_npz.read_bytes()


def test_cli_bad_class_and_missing_file_exit_2_with_one_line(ck, tmp_path):
    out = tmp_path / "x.png"
    for extra, message in [(["--class", "10"], "class 10 is outside [0, 10)"),
                           (["--gpt-ckpt", str(tmp_path / "nope.pt")], "does not exist")]:
        argv = ["--gpt-ckpt", ck["gpt"], "--vq-ckpt", ck["vq"], "--out", str(out), *extra]
        r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *argv], cwd=tmp_path, env=ENV,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
        assert os.listdir(tmp_path) == []  # nothing written, not even a temporary file


def test_bad_inputs_are_one_line_errors_and_leave_nothing(ck, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(open(ck["gpt"], "rb").read()[:5000])  # an interrupted download
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    out = tmp_path / "o" / "x.png"
    base = ["--gpt-ckpt", ck["gpt"], "--vq-ckpt", ck["vq"]]
    cases = [
        (["--gpt-ckpt", str(junk), "--vq-ckpt", ck["vq"]], "cannot read checkpoint"),
        (["--gpt-ckpt", str(cut), "--vq-ckpt", ck["vq"]], "cannot read checkpoint"),
        (["--gpt-ckpt", ck["gpt"], "--vq-ckpt", ck["vq_64"]], "predicts 32 codes but the tokenizer"),
        (["--gpt-ckpt", ck["gpt"], "--vq-ckpt", ck["vq_ds8"]], "learned 4x4 grids of 16 px images, but the tokenizer"),
        (["--gpt-ckpt", ck["gpt"], "--vq-ckpt", ck["vq_other"]], "trained on the codes of another tokenizer"),
        (base + ["--image-size", "32"], "--image-size 32 means 8x8 tokens, but the GPT"),
        (base + ["--image-size", "18"], "not a multiple of the tokenizer's downsampling factor 4"),
        (base + ["--class", "-1"], "class -1 is outside [0, 10)"),
        (base + ["--num-samples", "10"], "need an explicit --cfg-scale"),
        (["--gpt-ckpt", ck["gpt"]], "pass both --gpt-ckpt and --vq-ckpt"),
        (base + ["--out", str(a_file / "x.png")], "cannot write to"),
        (base + ["--out", str(tmp_path)], "is a folder"),
    ]
    for argv, message in cases:
        if "--out" not in argv:
            argv = argv + ["--out", str(out)]
        code, err = cli_run(argv, capsys)
        assert code == 2 and err.startswith("error: ") and message in err, (argv, err)
        assert not out.exists() and not any(n.startswith(".tmp") for n in os.listdir(tmp_path))


def test_default_models_are_the_demos_else_where_to_download(ck, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = cli_run(["--class", "1"], capsys)
    assert code == 2 and sample.DEMO_GPT in err and len(err.splitlines()) == 1
    assert "(about 0.7 GB" in err and err.endswith(
        ": python sample.py --gpt-ckpt c2i_B_256.pt --vq-ckpt vq_ds16_c2i.pt --class 207\n")
    os.makedirs(os.path.dirname(sample.DEMO_GPT))
    shutil.copy(ck["gpt"], sample.DEMO_GPT)
    shutil.copy(ck["vq"], sample.DEMO_VQ)
    sample.main(["--class", "1", "--per-class", "1"])
    assert Image.open(tmp_path / "samples" / "class1.png").size == (SIZE + 4, SIZE + 4)


@pytest.mark.parametrize("extra,message", [
    (EVAL + ["--per-class", "2"], "--per-class only applies with pictures, not --num-samples"),
    (["--labels", "balanced"], "--labels only applies with --num-samples"),
    (["--progress-frames", "5"], "--progress-frames only applies with --progress"),
    (["--keep", "0"], "--keep only applies with --candidates N"),  # a 0 given is given
])
def test_flags_of_the_other_mode_are_refused(ck, tmp_path, capsys, extra, message):
    """A flag that cannot act in this mode is one line naming it and exit 2, never ignored."""
    out = tmp_path / ("x.npz" if "--num-samples" in extra else "x.png")
    code, err = cli_run(["--gpt-ckpt", ck["gpt"], "--vq-ckpt", ck["vq"], *extra, "--out", str(out)], capsys)
    assert code == 2 and err == f"error: {message}; drop it\n" and os.listdir(tmp_path) == []


def test_resume_stamp_keys_are_the_pixel_flags(ck, tmp_path, monkeypatch):
    """settings.json holds exactly sample.PIXEL_FLAGS, with the resolved values."""
    out = tmp_path / "s.npz"
    monkeypatch.setattr(sample, "gather_parts", lambda *a: None)  # keep the parts to read them
    sample.main(["--gpt-ckpt", ck["gpt"], "--vq-ckpt", ck["vq"], *EVAL, "--out", str(out)])
    with open(str(out) + ".parts/settings.json") as f:
        stamp = json.load(f)
    assert set(stamp) == {"num_samples", "classes", "labels", "batch_size", "seed", "cfg_scale",
                          "cfg_interval", "temperature", "top_k", "top_p", "image_size", "resize_to",
                          "precision", "gpt_ckpt", "vq_ckpt", "prompt", "prompts", "t5",
                          "candidates", "keep", "clip"} == set(sample.PIXEL_FLAGS)
    assert (stamp["labels"], stamp["top_k"], stamp["image_size"], stamp["precision"]) == ("random", 0, SIZE, "fp32")
    # inputs by their contents: a file edited or replaced under the same path is another input
    gpt, vq = sample.load_models(ck["gpt"], ck["vq"])[:2]
    assert stamp["classes"] == list(range(CLASSES)) and stamp["gpt_ckpt"] == weights_checksum(gpt)
    assert stamp["vq_ckpt"] == tokenizer_checksum(vq) and stamp["prompts"] == json_checksum([])
