"""Bad input and faults of the file system for sample.py, fid.py, shapes.py and codes.py (issue 12): a
finished output is never replaced without --overwrite, bad numbers and damaged files are one line and exit
code 2, a full disk is "no space left on <path>", never a traceback or a silent wrong result.

The table CASES holds (name, command, expected exit code, words expected in the one line); each
row sets up its files with a `make` function. A simulated full disk is a writer patched to raise
ENOSPC; a real one is a small tmpfs, where the test can mount one (root), else skipped."""
import dataclasses
import errno
import json
import os
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import codes
import fid
import sample
import shapes
import tokenizer
from codes import CodesReceipt
from common import UserError, save_atomic
from conftest import HashTokenizer, run_cli
from model import GPT, gpt_config
from tokenizer import VQModel, tokenizer_checksum, vq_config

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, GRID, SIZE, CLASSES = 32, 4, 16, 10  # VQ-tiny downsamples by 4: 16 px <-> 4x4 codes
EVAL = ["--num-samples", "10", "--batch-size", "4", "--cfg-scale", "2"]  # 3 batches: 4, 4, 2


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """A tokenizer and a GPT on its codes in train.py's format, the same GPT as a bare state dict
    (no config, no size in its name), and a codes folder."""
    d = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    vq = VQModel(vq_config("VQ-tiny", codebook_size=VOCAB))
    save_atomic(dict(model=vq.state_dict(), config=dataclasses.asdict(vq.config), kind="vq"),
                d / "vq.pt")
    gpt = GPT(gpt_config("nano", n_layer=1, dim=64, n_head=1, vocab_size=VOCAB,
                         block_size=GRID ** 2, num_classes=CLASSES))
    meta = CodesReceipt(vocab_size=VOCAB, grid=(GRID, GRID), image_size=SIZE, n_aug=2, count=10,
                        tokenizer_checksum=tokenizer_checksum(vq), ten_crop=False,
                        crop_range=None, codes_dtype="uint16", labels_dtype="int16",
                        data="synthetic:10", num_classes=CLASSES,
                        classes=tuple(map(str, range(CLASSES)))).to_dict()
    save_atomic(dict(model=gpt.state_dict(), config=dataclasses.asdict(gpt.config), kind="gpt",
                     meta=meta), d / "gpt.pt")
    torch.save(gpt.state_dict(), d / "bare.pt")
    codes.extract_codes(HashTokenizer(64), "synthetic:6", d / "codes", image_size=16, batch_size=4)
    return {p.stem: str(p) for p in d.iterdir()}


class StubInception(torch.nn.Module):
    """FIDInception's interface at a fraction of its cost: features are pooled pixels, tiled to
    the real widths (2048 pool, 2023 spatial), so they follow the images exactly."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2048, 1008, bias=False)
        torch.nn.init.normal_(self.fc.weight, std=0.01, generator=torch.Generator().manual_seed(0))
        self.requires_grad_(False)

    def logits(self, pool):
        return pool @ self.fc.weight.T

    def forward(self, x):
        cells = F.adaptive_avg_pool2d(x, 4).flatten(1)  # 48 numbers per image
        pool = cells.repeat(1, 43)[:, :2048]
        return {"pool": pool, "logits": self.logits(pool), "spatial": cells.repeat(1, 43)[:, :2023]}


@pytest.fixture
def stub_net(monkeypatch):
    monkeypatch.setattr(fid.FIDInception, "from_pretrained", staticmethod(lambda p=None: StubInception()))
    # 2048-d eigensolves cost seconds and are tested in test_fid.py; here only their inputs matter
    monkeypatch.setattr(fid, "frechet_distance", lambda *a: 1.0)


def images(n, size, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3)).astype(np.uint8)


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def write(path, content=b"old"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)


def damage_json(path, text):
    with open(path, "w") as f:
        f.write(text)


# --------------------------------------------------------------------------------- the case table
# make(d, ck, mp): files the case needs in the folder d (mp: pytest's monkeypatch); it returns the
# paths whose bytes the failing command must leave as they were.
def finished_npz(d, ck, mp):
    write(f"{d}/x.npz")
    return [f"{d}/x.npz"]


def finished_png(d, ck, mp):
    write(f"{d}/x.png")
    return [f"{d}/x.png"]


def finished_gif(d, ck, mp):
    write(f"{d}/p.gif")
    return [f"{d}/p.gif"]


def parts_with_damaged_settings(d, ck, mp):
    write(f"{d}/x.npz.parts/settings.json", b'{"seed": 0, "cfg_')
    return [f"{d}/x.npz.parts/settings.json"]


def nan_stats(d, ck, mp):
    np.savez(f"{d}/s.npz", mu=np.full(4, np.nan), sigma=np.eye(4))
    np.savez(f"{d}/r.npz", mu=np.zeros(4), sigma=np.eye(4))


def inf_stats(d, ck, mp):
    np.savez(f"{d}/s.npz", mu=np.zeros(4), sigma=np.eye(4))
    np.savez(f"{d}/r.npz", mu=np.zeros(4), sigma=np.diag([1, np.inf, 1, 1]))


def pickled_stats(d, ck, mp):
    np.savez(f"{d}/s.npz", mu=np.array([{"x": 1}], dtype=object), sigma=np.eye(1))
    np.savez(f"{d}/r.npz", mu=np.zeros(1), sigma=np.eye(1))


def existing_stats(d, ck, mp):
    np.savez(f"{d}/s.npz", images(4, 8))
    write(f"{d}/stats.npz")
    return [f"{d}/stats.npz"]


def synthetic_folder(d, ck, mp):
    os.makedirs(f"{d}/synthetic/a")
    Image.fromarray(images(1, 16)[0]).save(f"{d}/synthetic/a/0.png")
    mp.chdir(d)


def finished_codes(d, ck, mp):
    codes.extract_codes(HashTokenizer(64), "synthetic:4", f"{d}/c", image_size=16)
    return [f"{d}/c/meta.json", f"{d}/c/codes.npy"]


def a_file(d, ck, mp):
    write(f"{d}/f")


def full_png_writer(d, ck, mp):
    mp.setattr(Image.Image, "save", enospc)


def full_npz_writer(d, ck, mp):
    mp.setattr(sample, "write_npz", enospc)


def full_stats_writer(d, ck, mp):
    np.savez(f"{d}/s.npz", images(4, 8))
    mp.setattr(np, "savez", enospc)


def full_fallocate(d, ck, mp):
    mp.setattr(os, "posix_fallocate", enospc)


def nothing(d, ck, mp):
    pass


def S(*extra):  # sample.py with the test models
    return ("sample", lambda d, ck: ["--gpt-ckpt", ck["gpt"], "--vq-ckpt", ck["vq"],
                                     *[e.format(d=d) for e in extra]])


def FID(*extra):
    return ("fid", lambda d, ck: [e.format(d=d, **ck) for e in extra])


def CODES(*extra):
    return ("codes", lambda d, ck: [e.format(d=d, **ck) for e in extra])


def SHAPES(*extra):
    return ("shapes", lambda d, ck: [e.format(d=d, **ck) for e in extra])


EXTRACT = ("extract", "--vq-config", "VQ-tiny", "--data", "synthetic:4", "--num-workers", "0")

CASES = [
    # 1. a finished output is kept; both ways out are named
    ("finished npz kept", S(*EVAL, "--out", "{d}/x.npz"), finished_npz, 2,
     ["--out {d}/x.npz already exists; pass --overwrite to replace it, or choose another --out"]),
    ("finished png kept", S("--out", "{d}/x.png"), finished_png, 2,
     ["--out {d}/x.png already exists; pass --overwrite"]),
    ("finished gif kept", S("--out", "{d}/x.png", "--progress", "{d}/p.gif"), finished_gif, 2,
     ["--progress {d}/p.gif already exists; pass --overwrite"]),
    ("stats kept", FID("{d}/s.npz", "--save-stats", "{d}/stats.npz"), existing_stats, 2,
     ["--save-stats {d}/stats.npz already exists; pass --overwrite"]),
    ("--overwrite alone", FID("{d}/s.npz", "{d}/s.npz", "--overwrite"), nothing, 2,
     ["--overwrite only applies with --save-stats"]),
    ("preview kept", SHAPES("preview", "--out", "{d}/x.png"), finished_png, 2,
     ["--out {d}/x.png already exists; pass --overwrite"]),
    ("other codes kept", CODES(*EXTRACT[:4], "synthetic:5", "--image-size", "16", "--out", "{d}/c",
                              "--num-workers", "0"), finished_codes, 2,
     ["already holds finished codes with", "pass --overwrite to replace them, or choose another"]),
    # 2. silent wrong results
    ("nan statistics", FID("{d}/s.npz", "{d}/r.npz"), nan_stats, 2, ["'mu' holds NaN"]),
    ("inf statistics", FID("{d}/s.npz", "{d}/r.npz"), inf_stats, 2,
     ["r.npz': 'sigma' holds infinite values"]),
    ("synthetic beside a folder", CODES(*EXTRACT[:4], "synthetic", "--out", "{d}/c"),
     synthetic_folder, 2, ["--data 'synthetic' is ambiguous", "./synthetic", "synthetic:N"]),
    ("bare state dict", ("sample", lambda d, ck: ["--gpt-ckpt", ck["bare"], "--vq-ckpt",
                                                  ck["vq"], "--out", f"{d}/x.png"]),
     nothing, 2, ["does not say which image size", "pass --image-size"]),
    ("cfg -1", S("--cfg-scale", "-1", "--out", "{d}/x.png"), nothing, 2,
     ["--cfg-scale must be in [0, 1000] (1 = no guidance, 0 = unconditional), got -1"]),
    ("cfg nan", S("--cfg-scale", "nan", "--out", "{d}/x.png"), nothing, 2,
     ["--cfg-scale must be in [0, 1000] (1 = no guidance, 0 = unconditional), got nan"]),
    ("temperature inf", S("--temperature", "inf", "--out", "{d}/x.png"), nothing, 2,
     ["--temperature must be in [0.01, 100], got inf"]),
    ("top-p nan", S("--top-p", "nan", "--out", "{d}/x.png"), nothing, 2,
     ["--top-p must be in (0, 1], got nan"]),
    ("top-k -1", S("--top-k", "-1", "--out", "{d}/x.png"), nothing, 2,
     ["--top-k must be at least 0 (0 = every code), got -1"]),
    ("seed -1", S("--seed", "-1", "--out", "{d}/x.png"), nothing, 2,
     ["--seed must be in [0, 16777215], got -1"]),
    # 3. one line instead of a traceback
    ("full disk png", S("--out", "{d}/x.png"), full_png_writer, 2, ["no space left on {d}"]),
    ("full disk npz", S(*EVAL, "--out", "{d}/x.npz"), full_npz_writer, 2,
     ["no space left on {d}/x.npz.parts"]),
    ("full disk stats", FID("{d}/s.npz", "--save-stats", "{d}/stats.npz"), full_stats_writer, 2,
     ["no space left on {d}"]),
    ("full disk preview", SHAPES("preview", "--out", "{d}/x.png", "--per-class", "1"),
     full_png_writer, 2, ["no space left on {d}"]),
    ("full disk extract", CODES(*EXTRACT, "--image-size", "16", "--out", "{d}/c"), full_fallocate,
     2, ["no space left on {d}/c/parts/codes-0-of-1.npy"]),
    ("extract under a file", CODES(*EXTRACT, "--out", "{d}/f/c"), a_file, 2,
     ["cannot write {d}/f/c: part of that path is a file"]),
    ("extract into a file", CODES(*EXTRACT, "--out", "{d}/f"), a_file, 2,
     ["--out {d}/f is a file; codes go into a folder"]),
    ("damaged settings.json", S(*EVAL, "--out", "{d}/x.npz"), parts_with_damaged_settings, 2,
     ["{d}/x.npz.parts/settings.json cannot be read", "delete that folder"]),
    ("tokenizer size", ("tokenizer", lambda d, ck: ["--vq-ckpt", ck["vq"], "--data", "synthetic:2",
                                                    "--image-size", "30", "--no-rfid"]), nothing, 2,
     ["--image-size 30 is not a multiple of the tokenizer's downsampling factor 4; use 28 or 32"]),
    # 4. misleading lines
    ("pickled statistics", FID("{d}/s.npz", "{d}/r.npz"), pickled_stats, 2,
     ["holds pickled Python objects, which are never unpickled here"]),
    ("extract size 30", CODES(*EXTRACT, "--image-size", "30", "--out", "{d}/c"), nothing, 2,
     ["--image-size 30 is not a multiple of the tokenizer's downsampling factor 4; use 28 or 32"]),
    ("extract size 2", CODES(*EXTRACT, "--image-size", "2", "--out", "{d}/c"), nothing, 2,
     ["--image-size 2 is not a multiple of the tokenizer's downsampling factor 4; use 4"]),
]

MAINS = {"sample": sample.main, "fid": fid.main, "codes": codes.main, "shapes": shapes.main,
         "tokenizer": tokenizer.main}


@pytest.mark.parametrize("name, command, make, code, words", CASES, ids=[c[0] for c in CASES])
def test_case_table(name, command, make, code, words, ck, tmp_path, monkeypatch, capsys, stub_net):
    d = str(tmp_path)
    kept = make(d, ck, monkeypatch) or []
    before = {p: open(p, "rb").read() for p in kept}
    tool, argv = command
    got, out, err = run_cli(MAINS[tool], argv(d, ck), capsys)
    assert got == code, err
    # one line, no traceback; before it only the progress bars of work done (tqdm's \r lines)
    assert "Traceback" not in err and err.endswith("\n"), err
    line = err.splitlines()[-1]
    assert line.startswith("error: ") and not [x for x in err.splitlines()[:-1] if "error" in x]
    for w in words:
        assert w.format(d=d) in line, err
    assert "allow_pickle" not in err and "weights_only" not in err
    for p, content in before.items():
        assert open(p, "rb").read() == content  # the finished file is untouched
    for folder, _, files in os.walk(d):  # nor is a temporary file left behind
        assert not [f for f in files if f.startswith(".tmp-")], (folder, files)


# ------------------------------------------------------------------------ what still works, exactly
def sample_argv(ck, *extra):
    return ["--gpt-ckpt", ck["gpt"], "--vq-ckpt", ck["vq"], *extra]


def test_overwrite_replaces_and_unfinished_npz_resumes(ck, tmp_path, monkeypatch):
    png = tmp_path / "x.png"
    write(str(png))
    sample.main(sample_argv(ck, "--class", "1", "--per-class", "1", "--out", str(png),
                            "--overwrite"))
    assert Image.open(png).size == (SIZE + 4, SIZE + 4)  # a real grid replaced the 3 bytes
    # an evaluation run stopped with one batch done: rerunning it is a resume, not an overwrite
    reference, out = tmp_path / "ref.npz", tmp_path / "s.npz"
    sample.main(sample_argv(ck, *EVAL, "--out", str(reference)))
    monkeypatch.setattr(sample, "gather_parts", lambda *a: None)  # keep the parts
    sample.main(sample_argv(ck, *EVAL, "--out", str(out)))
    monkeypatch.undo()
    os.remove(str(out) + ".parts/000001.npz")
    os.remove(str(out) + ".parts/000002.npz")
    assert not out.exists()
    sample.main(sample_argv(ck, *EVAL, "--out", str(out)))
    assert out.read_bytes() == reference.read_bytes()


def test_a_damaged_part_is_sampled_again_before_the_others(ck, tmp_path, monkeypatch, capsys):
    """A part cut short is found when the run resumes, before any sampling, and drawn again: the
    .npz equals an uninterrupted run's, and only the missing and the damaged batches are sampled.
    """
    reference, out = tmp_path / "ref.npz", tmp_path / "s.npz"
    sample.main(sample_argv(ck, *EVAL, "--out", str(reference)))
    monkeypatch.setattr(sample, "gather_parts", lambda *a: None)  # keep every part
    sample.main(sample_argv(ck, *EVAL, "--out", str(out)))
    monkeypatch.undo()
    parts = str(out) + ".parts"
    os.remove(f"{parts}/000002.npz")
    whole = open(f"{parts}/000000.npz", "rb").read()
    write(f"{parts}/000000.npz", whole[:len(whole) // 2])  # cut short
    order = []
    real = sample.sample_images
    monkeypatch.setattr(sample, "sample_images", lambda *a, **k: order.append(len(a[2])) or real(*a, **k))
    code, _, err = run_cli(sample.main, sample_argv(ck, *EVAL, "--out", str(out)), capsys)
    assert code == 0 and f"{parts}/000000.npz is damaged" in err
    assert order == [4, 2]  # batch 0 (4 images) again, then batch 2 (2 images); batch 1 kept
    assert out.read_bytes() == reference.read_bytes()


def test_bare_state_dict_samples_with_image_size(ck, tmp_path, capsys):
    ours, bare = tmp_path / "ours.png", tmp_path / "bare.png"
    sample.main(sample_argv(ck, "--class", "2", "--per-class", "2", "--out", str(ours)))
    sample.main(["--gpt-ckpt", ck["bare"], "--vq-ckpt", ck["vq"], "--image-size", str(SIZE),
                 "--class", "2", "--per-class", "2", "--out", str(bare)])
    assert bare.read_bytes() == ours.read_bytes()


def test_cfg_between_0_and_1_blends_and_0_is_unconditional(ck, tmp_path):
    """The decided range: every finite s >= 0 is taken at its word (0 = the null class alone)."""
    out = tmp_path / "x.png"
    for s in ("0", "0.5"):
        sample.main(sample_argv(ck, "--class", "1", "--per-class", "1", "--cfg-scale", s,
                                "--out", str(out), "--overwrite"))
        assert Image.open(out).size == (SIZE + 4, SIZE + 4)


def _png16(path, value):
    Image.fromarray(np.full((8, 8), value, np.uint16)).save(path)


def test_fid_folders_use_the_project_reader(tmp_path):
    """16-bit grey at half scale is mid-grey (convert("RGB") made it 255), a transparent pixel is
    white, as data.read_image composites it for training."""
    _png16(tmp_path / "a16.png", 32768)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red under full transparency
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b.png")
    assert Image.open(tmp_path / "a16.png").mode.startswith("I")
    count, batches = fid.image_batches(str(tmp_path), 8)
    batch = next(batches)
    assert count == 2 and batch.shape == (2, 8, 8, 3)
    assert np.all(batch[0] == 128)  # 32768 / 257 = 127.5 -> 128
    assert np.all(batch[1] == 255)


def test_fid_folder_skips_corrupt_empty_and_bomb_files(tmp_path, monkeypatch, capsys, stub_net):
    good = images(2, 16, seed=3)
    for i, im in enumerate(good):
        Image.fromarray(im).save(tmp_path / f"g{i}.png")
    write(str(tmp_path / "empty.png"), b"")
    write(str(tmp_path / "corrupt.png"), open(tmp_path / "g0.png", "rb").read()[:60])
    Image.fromarray(images(1, 64)[0]).save(tmp_path / "z_bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 > 2 x 1000: a "bomb"
    stats = tmp_path / "out" / "stats.npz"
    code, out, err = run_cli(fid.main, [str(tmp_path), "--save-stats", str(stats)], capsys)
    assert code == 0 and "skipped 3 unreadable image(s) of 5 in" in err, err
    with np.load(stats) as s:
        expected = StubInception()(fid.to_float_images(good))["pool"].numpy()
        np.testing.assert_allclose(s["pool"], expected, rtol=1e-6)
        assert sorted(s.files) == sorted(fid.STAT_KEYS)


def test_fid_warns_when_image_sizes_differ(tmp_path, capsys, stub_net):
    np.savez(tmp_path / "a.npz", images(4, 8))
    np.savez(tmp_path / "b.npz", images(4, 16, seed=1))
    np.savez(tmp_path / "c.npz", images(4, 8, seed=2))
    code, out, err = run_cli(fid.main, [str(tmp_path / "a.npz"), str(tmp_path / "b.npz")], capsys)
    assert code == 0 and "FID: 1.0000" in out
    warnings = [x for x in err.splitlines() if "warning" in x]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: the images of {tmp_path}/a.npz"
                                                         " are 8x8 px but those of")
    assert f"{tmp_path}/b.npz 16x16 px" in warnings[0]
    code, out, err = run_cli(fid.main, [str(tmp_path / "a.npz"), str(tmp_path / "c.npz")], capsys)
    assert code == 0 and "FID: 1.0000" in out and "warning" not in err


def test_extract_overwrite_starts_over(tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["extract", "--vq-config", "VQ-tiny", "--image-size", "16", "--num-workers", "0",
            "--out", str(out)]
    codes.main(argv + ["--data", "synthetic:4"])
    code, _, err = run_cli(codes.main, argv + ["--data", "synthetic:6"], capsys)
    assert code == 2 and "count=4 (this run: 6)" in err
    codes.main(argv + ["--data", "synthetic:6", "--overwrite"])
    assert json.load(open(out / "meta.json"))["count"] == 6
    assert np.load(out / "codes.npy").shape == (6, 2, GRID * GRID)


@pytest.mark.parametrize("damage, words", [
    (lambda c: damage_json(c / "meta.json", '{"vocab_size": 64,'), "meta.json cannot be read"),
    (lambda c: damage_json(c / "meta.json", "[1, 2]"), "meta.json holds no JSON object"),
    (lambda c: damage_json(c / "meta.json", json.dumps(
        {k: v for k, v in json.load(open(c / "meta.json")).items() if k != "grid"})),
     "the codes receipt lacks 'grid'"),
    (lambda c: np.save(c / "codes.npy", np.where(np.arange(6 * 2 * 16).reshape(6, 2, 16) == 100,
                                                 64, np.load(c / "codes.npy")).astype(np.uint16)),
     "codes.npy row 3 holds code 64, outside the vocabulary of 64 codes"),
    (lambda c: np.save(c / "labels.npy", np.array([0, 1, 2, 3, 4, 10], np.int16)),
     "labels.npy holds labels outside [0, 10)"),
    (lambda c: np.save(c / "codes.npy", np.array([None] * 6, object), allow_pickle=True),
     "cannot read the codes (it holds Python objects, not codes)"),
])
def test_damaged_codes_folders_are_one_line(ck, tmp_path, damage, words):
    import shutil
    folder = tmp_path / "codes"
    shutil.copytree(ck["codes"], folder)
    damage(folder)
    with pytest.raises(UserError) as e:
        codes.CodesDataset(folder)
    assert words in str(e.value) and "\n" not in str(e.value) and "allow_pickle" not in str(e.value)


# ---------------------------------------------------------------------------- a real full disk
@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs, where mounting works (root on Linux); skipped elsewhere."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(disk):
    """Every free block of `disk` taken by one file (a full disk that still has the folder)."""
    with open(disk / "filler", "wb", buffering=0) as f:  # unbuffered: close has nothing left
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_real_full_disk(ck, tiny_disk, capsys, monkeypatch):
    # extract: 200 images x 2 views x 64 codes x 2 bytes = 51 KB of codes do not fit beside the
    # receipt in 64 KiB once a third is taken: refused up front, where a memory map died of SIGBUS
    write(str(tiny_disk / "third"), b"\0" * 24 * 1024)
    code, _, err = run_cli(codes.main, ["extract", "--vq-config", "VQ-tiny", "--data",
                                       "synthetic:200", "--image-size", "32", "--num-workers", "0",
                                       "--out", str(tiny_disk / "c")], capsys)
    assert code == 2 and err.startswith(f"error: no space left on {tiny_disk}/c/parts/codes-0"), err
    fill(tiny_disk)
    code, _, err = run_cli(sample.main, sample_argv(ck, "--out", str(tiny_disk / "x.png")), capsys)
    assert code == 2 and err.splitlines()[-1].startswith(f"error: no space left on {tiny_disk}")
    assert not os.path.exists(tiny_disk / "x.png")
    assert not [f for f in os.listdir(tiny_disk) if f.startswith(".tmp-")]
