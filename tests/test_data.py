"""shapes.py, data.py, codes.py: the synthetic dataset, image folders and the ADM crop, code
extraction and its reader."""
import dataclasses
import json
import os
import pickle
import socket

import numpy as np
import pytest
import torch
from PIL import Image

import codes
import data
from codes import CodesReceipt
from common import UserError, save_grid
from conftest import HashTokenizer, Interrupted
from shapes import CLASS_NAMES, SyntheticShapes
from tokenizer import tokenizer_checksum


# ---------------------------------------------------------------------------------------------- synthetic

def test_synthetic_deterministic_per_seed_and_index():
    a, b = SyntheticShapes(50, 32, seed=0), SyntheticShapes(50, 32, seed=0)
    later = [b[i] for i in (7, 3, 7)]  # another instance, another access order
    assert torch.equal(a[7][0], later[0][0]) and torch.equal(a[7][0], later[2][0])
    assert torch.equal(a[3][0], later[1][0]) and a[3][1] == later[1][1] == 3
    assert not torch.equal(a[7][0], SyntheticShapes(50, 32, seed=1)[7][0])
    assert not torch.equal(a[7][0], a[17][0])  # same class, another image
    # the DataLoader's worker processes draw the very same images
    loader = torch.utils.data.DataLoader(a, batch_size=10, num_workers=2)
    x, y = next(iter(loader))
    assert torch.equal(x, torch.stack([a[i][0] for i in range(10)])) and y.tolist() == list(range(10))


@pytest.mark.parametrize("size", [16, 48])
def test_synthetic_shape_range_labels(size):
    ds = SyntheticShapes(30, size)
    assert len(ds) == 30 and len(CLASS_NAMES) == 10
    for i in range(30):
        x, y = ds[i]
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1 and y == i % 10
        # 8-bit images: every value is k / 127.5 - 1 for an integer k
        k = (x + 1) * 127.5
        assert torch.allclose(k, k.round(), atol=1e-4)
    with pytest.raises(IndexError):
        ds[30]


def _bright_colour_histograms(x):
    """[B, 3, H, W] -> [B, 64]: 4x4x4 RGB histograms of the pixels brighter than any background, normalised."""
    rgb = ((x + 1) * 127.5).permute(0, 2, 3, 1).reshape(len(x), -1, 3)
    bins = (rgb // 64).long().clamp(max=3)
    cell = bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2] + 64 * torch.arange(len(x))[:, None]
    bright = rgb.amax(-1) > 120
    h = torch.bincount(cell[bright], minlength=64 * len(x)).view(len(x), 64).float()
    return h / h.sum(1, keepdim=True).clamp(min=1)


def test_synthetic_classes_separable_by_nearest_class_mean():
    """A nearest-class-mean classifier on colour histograms of 300 images labels 200 held-out ones."""
    ds = SyntheticShapes(500, 32, seed=3)
    feats = _bright_colour_histograms(torch.stack([ds[i][0] for i in range(500)]))
    labels = torch.arange(500) % 10
    means = torch.stack([feats[:300][labels[:300] == c].mean(0) for c in range(10)])
    pred = torch.cdist(feats[300:], means).argmin(1)
    acc = (pred == labels[300:]).float().mean().item()
    assert acc > 0.9, acc


def test_synthetic_background_darker_than_every_foreground():
    """Corner pixels (almost always background) stay below 90/255; each class's brightest pixel is
    above 190/255 in some channel: the backgrounds never look like a foreground colour."""
    ds = SyntheticShapes(100, 32)
    for i in range(100):
        x = (ds[i][0] + 1) * 127.5
        assert x.max() > 190
    corners = torch.stack([((ds[i][0] + 1) * 127.5)[:, 0, 0] for i in range(100)])
    assert corners.max() < 90


def test_save_grid(tmp_path):
    imgs = torch.stack([torch.full((3, 4, 5), -1.0), torch.full((3, 4, 5), 1.0), torch.zeros(3, 4, 5)])
    save_grid(imgs, tmp_path / "g.png", nrow=2)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    # 2 per row, 2 rows, 2 px padding: height 2*(4+2)+2, width 2*(5+2)+2
    assert grid.shape == (14, 16, 3)
    assert (grid[2:6, 2:7] == 0).all() and (grid[2:6, 9:14] == 255).all() and (grid[8:12, 2:7] == 128).all()
    assert (grid[0:2] == 0).all() and (grid[8:12, 9:14] == 0).all()  # padding and the empty slot


# ---------------------------------------------------------------------------------------------- image folders

def _png(path, pil):
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
    return path


def _level(v):
    """The [-1, 1] value of the 8-bit level v."""
    return v / 127.5 - 1


def test_image_folder_modes_and_corrupt_files(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "b_cls" / "0_gray.png", Image.new("L", (8, 8), 100))
    _png(root / "b_cls" / "1_rgba.png", Image.new("RGBA", (8, 8), (255, 0, 0, 128)))
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.save(root / "b_cls" / "2_palette.png", transparency=1)  # index 1 (green) is transparent
    _png(root / "b_cls" / "3_cmyk.tif", Image.new("CMYK", (8, 8), (0, 255, 255, 0)))
    _png(root / "b_cls" / "4_gray16.png", Image.fromarray(np.full((8, 8), 257 * 40, np.uint16)))
    good = _png(root / "a_cls" / "0.png", Image.new("RGB", (8, 8), (10, 20, 30)))
    (root / "a_cls" / "1_truncated.png").write_bytes(good.read_bytes()[:40])
    (root / "a_cls" / "2_not_an_image.JPEG").write_bytes(b"hello")
    _png(root / "a_cls" / "3.png", Image.new("RGB", (8, 8), (200, 150, 100)))
    (root / "a_cls" / "notes.txt").write_text("not an image extension: ignored")

    ds = data.ImageFolder(root, 8, augment="center", flip=False)
    assert ds.classes == ["a_cls", "b_cls"] and len(ds) == 9
    with pytest.warns(UserWarning, match="unreadable image") as record:
        items = [ds[i] for i in range(len(ds))]
    assert len([w for w in record if "unreadable" in str(w.message)]) == 1 and ds.skipped == 2
    assert all(x.shape == (3, 8, 8) for x, _ in items)
    assert [y for _, y in items] == [0, 0, 0, 0, 1, 1, 1, 1, 1]

    def rgb(i, y=4, x=4):
        return items[i][0][:, y, x]
    expect = torch.tensor
    assert torch.allclose(rgb(0), _level(expect([10., 20, 30])))
    # both unreadable files are replaced by the next readable one, index 3
    assert torch.equal(items[1][0], items[3][0]) and torch.equal(items[2][0], items[3][0])
    assert torch.allclose(rgb(3), _level(expect([200., 150, 100])))
    assert torch.allclose(rgb(4), _level(expect([100., 100, 100])))  # grayscale -> 3 equal channels
    # red at alpha 128/255 over white: 255 in red, 255 * 127/255 = 127 in green and blue (+-1 rounding)
    assert torch.allclose(rgb(5), _level(expect([255., 127, 127])), atol=1.01 / 127.5)
    assert torch.allclose(rgb(6, 0, 0), _level(expect([0., 0, 255])))  # opaque palette entry
    assert torch.allclose(rgb(6), _level(expect([255., 255, 255])))  # transparent entry -> white
    assert torch.allclose(rgb(7), _level(expect([255., 0, 0])))  # CMYK (0, 255, 255, 0) is red
    assert torch.allclose(rgb(8), _level(expect([40., 40, 40])))  # 16-bit 257 * 40 -> 40, not clipped


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.ImageFolder(tmp_path / "nowhere", 8)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        data.ImageFolder(tmp_path / "empty", 8)
    _png(tmp_path / "flat" / "x.png", Image.new("RGB", (8, 8)))
    with pytest.raises(UserError, match="one sub-folder per class"):
        data.ImageFolder(tmp_path / "flat", 8)
    with pytest.raises(UserError, match="synthetic:N"):
        data.image_dataset("synthetic:lots", 8)
    assert len(data.image_dataset("synthetic:7", 8)) == 7 and len(data.image_dataset("synthetic", 8)) == 10000


def test_center_crop_geometry():
    # 512 x 256: red | green | blue bands at x < 128, 128 <= x < 384, x >= 384. To 64 px: BOX-halve twice
    # (shorter side 256 -> 128 -> 64, both >= 2 * 64 before halving), then keep the central 64 of 128
    # columns = original columns 128..383, the green band exactly.
    a = np.zeros((256, 512, 3), np.uint8)
    a[:, :128, 0], a[:, 128:384, 1], a[:, 384:, 2] = 255, 255, 255
    out = np.asarray(data.center_crop(Image.fromarray(a), 64))
    assert out.shape == (64, 64, 3) and (out == [0, 255, 0]).all()
    # 200 x 300 (portrait), markers: halve once to 100 x 150 (200 >= 128, 100 < 128), bicubic to 64 x 96,
    # keep rows 16..79 of 96 = original rows 50..249: a row band at y in [50, 250) survives whole
    a = np.zeros((300, 200, 3), np.uint8)
    a[50:250] = 255
    out = np.asarray(data.center_crop(Image.fromarray(a), 64)).astype(int)
    assert out.shape == (64, 64, 3)
    assert (out[2:-2] == 255).all() and out.min() >= 200  # only bicubic ringing at the cut edges
    # already the right size: untouched
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(data.center_crop(img, 32)), np.asarray(img))


def test_random_resize_crop():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    torch.manual_seed(0)
    first = [np.asarray(data.random_resize_crop(img, 32)) for _ in range(8)]
    torch.manual_seed(0)
    again = [np.asarray(data.random_resize_crop(img, 32)) for _ in range(8)]
    assert all(o.shape == (32, 32, 3) for o in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # torch's RNG governs it
    assert len({o.tobytes() for o in first}) > 4  # and it does vary
    # max_scale 1 on a square image of the final size: no resize, the only crop is the image itself
    sq = img.crop((0, 0, 32, 32))
    assert np.array_equal(np.asarray(data.random_resize_crop(sq, 32, max_scale=1.0)), np.asarray(sq))


def test_ten_crop_geometry():
    # a 7 x 7 image whose pixel value is its index y * 7 + x; crops of 4: corners at offsets 0 and 3,
    # centre at round(1.5) = 2; the second five are the same crops of the mirror image
    x = torch.arange(49.).view(7, 7).expand(3, 7, 7)
    v = data.code_views(x, 4, ten_crop=True)
    assert v.shape == (10, 3, 4, 4)
    mirror = x.flip(-1)
    for k, (y0, x0) in enumerate([(0, 0), (0, 3), (3, 0), (3, 3), (2, 2)]):
        assert torch.equal(v[k], x[:, y0:y0 + 4, x0:x0 + 4])
        assert torch.equal(v[5 + k], mirror[:, y0:y0 + 4, x0:x0 + 4])
    assert v[0, 0, 0, 0] == 0 and v[5, 0, 0, 0] == 6 and v[3, 0, 3, 3] == 48  # spot checks by hand
    two = data.code_views(x[:, :4, :4], 4)
    assert two.shape == (2, 3, 4, 4) and torch.equal(two[1], two[0].flip(-1)) and two[1, 0, 0, 0] == 3


# ---------------------------------------------------------------------------------------------- code extraction



def _expected_codes(vq, n, size, ten_crop=False, crop=None):
    ds = SyntheticShapes(n, crop or size)
    return torch.stack([vq.encode(data.code_views(ds[i][0], size, ten_crop)).flatten(1) for i in range(n)])


@pytest.mark.parametrize("vocab,dtype", [(65536, np.uint16), (70000, np.int32)])
def test_extract_codes_and_reader(tmp_path, vocab, dtype):
    vq = HashTokenizer(vocab)
    meta = codes.extract_codes(vq, "synthetic:10", tmp_path / "c", image_size=16, batch_size=4).to_dict()
    got, labels = np.load(tmp_path / "c" / "codes.npy"), np.load(tmp_path / "c" / "labels.npy")
    want = _expected_codes(vq, 10, 16)
    assert got.dtype == dtype and got.shape == (10, 2, 16) and labels.dtype == np.int16
    assert want.max() > 32767 and torch.equal(torch.from_numpy(got.astype(np.int64)), want)
    assert labels.tolist() == [i % 10 for i in range(10)]
    assert meta == json.loads((tmp_path / "c" / "meta.json").read_text())
    assert (meta["vocab_size"], meta["grid"], meta["n_aug"], meta["count"]) == (vocab, [4, 4], 2, 10)
    assert meta["tokenizer_checksum"] == tokenizer_checksum(vq) != tokenizer_checksum(HashTokenizer(vocab, 1))
    assert not (tmp_path / "c" / "parts").exists()

    ds = codes.CodesDataset(tmp_path / "c")
    ds = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker receives: a path, not the data
    torch.manual_seed(0)
    seen = set()
    for i in range(10):
        for _ in range(6):
            c, y = ds[i]
            assert c.dtype == torch.int64 and c.shape == (16,) and y.dtype == torch.int64 and y == i % 10
            view = [k for k in range(2) if torch.equal(c, want[i, k])]
            assert view, "a code row that the tokenizer did not produce"
            seen.add(view[0])
    assert seen == {0, 1}  # both the image and its mirror are drawn


def test_extract_ten_crop_codes(tmp_path):
    """Ten crops of the int(16 * 1.25) = 20 px centre crop; view 4 (the centre) is pixels 2..17."""
    vq = HashTokenizer()
    meta = codes.extract_codes(vq, "synthetic:4", tmp_path, image_size=16, ten_crop=True, crop_range=1.25,
                              batch_size=3).to_dict()
    got = torch.from_numpy(np.load(tmp_path / "codes.npy").astype(np.int64))
    assert meta["n_aug"] == 10 and got.shape == (4, 10, 16)
    assert torch.equal(got, _expected_codes(vq, 4, 16, ten_crop=True, crop=20))
    x = SyntheticShapes(4, 20)[1][0]
    assert torch.equal(got[1, 4], vq.encode(x[None, :, 2:18, 2:18]).flatten())
    assert torch.equal(got[1, 5], vq.encode(x.flip(-1)[None, :, :16, :16]).flatten())


def test_mixed_crop_folders_draw_from_both(tmp_path):
    """--data a,b: the official mix of ten-crop codes at crop_range 1.1 and 1.05, one folder per access."""
    vq = HashTokenizer()
    for name, crop in (("c110", 1.1), ("c105", 1.05)):
        codes.extract_codes(vq, "synthetic:3", tmp_path / name, image_size=16, ten_crop=True, crop_range=crop)
    mixed = codes.codes_dataset(f"{tmp_path / 'c110'},{tmp_path / 'c105'}")
    rows = {name: torch.from_numpy(np.load(tmp_path / name / "codes.npy").astype(np.int64)) for name in ("c110", "c105")}
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        c, y = mixed[1]
        assert y == 1
        seen |= {name for name, r in rows.items() if any(torch.equal(c, v) for v in r[1])}
    assert len(mixed) == 3 and seen == {"c110", "c105"} and not torch.equal(rows["c110"], rows["c105"])
    codes.extract_codes(vq, "synthetic:4", tmp_path / "other", image_size=16)
    with pytest.raises(UserError, match="do not hold codes of the same images"):
        codes.codes_dataset(f"{tmp_path / 'c110'},{tmp_path / 'other'}")
    with pytest.raises(UserError, match="names no codes folder"):
        codes.codes_dataset(",")
    os.rename(tmp_path / "c110", tmp_path / "c,110")  # a real folder with a comma is one folder
    assert len(codes.codes_dataset(tmp_path / "c,110")) == 3


def test_extract_resumes_after_interruption(tmp_path):
    codes.extract_codes(HashTokenizer(), "synthetic:10", tmp_path / "full", image_size=16, batch_size=3)
    # the grid probe encodes 1 image, each batch 3 images x 2 views: stop before the third batch
    with pytest.raises(Interrupted):
        codes.extract_codes(HashTokenizer(interrupt_after=1 + 2 * 6), "synthetic:10", tmp_path / "cut", 16,
                           batch_size=3)
    assert json.loads((tmp_path / "cut" / "parts" / "progress-0-of-1.json").read_text())["done"] == 6
    with pytest.raises(UserError, match="did not finish"):
        codes.CodesDataset(tmp_path / "cut")
    with pytest.raises(UserError, match="unfinished extraction with other settings"):
        codes.extract_codes(HashTokenizer(), "synthetic:10", tmp_path / "cut", image_size=32, batch_size=3)
    vq = HashTokenizer()
    codes.extract_codes(vq, "synthetic:10", tmp_path / "cut", image_size=16, batch_size=3)
    assert vq.encoded == 1 + 4 * 2  # the grid probe, then only the 4 missing images x 2 views
    for name in ("codes.npy", "labels.npy", "meta.json"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    vq = HashTokenizer()
    codes.extract_codes(vq, "synthetic:10", tmp_path / "cut", image_size=16, batch_size=3)
    assert vq.encoded == 1  # finished: nothing recomputed
    with pytest.raises(UserError, match="tokenizer_checksum"):
        codes.extract_codes(HashTokenizer(salt=1), "synthetic:10", tmp_path / "cut", image_size=16)


def test_codes_dataset_errors(tmp_path):
    codes.extract_codes(HashTokenizer(), "synthetic:3", tmp_path / "c", image_size=16)
    assert len(codes.CodesDataset(tmp_path / "c")) == 3
    with pytest.raises(UserError, match="does not exist"):
        codes.CodesDataset(tmp_path / "nowhere")
    with pytest.raises(UserError, match="holds no codes"):
        codes.CodesDataset(tmp_path)


def _extract_as_rank(rank, out, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    codes.extract_codes(HashTokenizer(), "synthetic:9", out, image_size=16, batch_size=2)


def test_extract_two_processes_equal_one(tmp_path):
    """torch.distributed (gloo): 2 ranks each encode a shard (rows 0-3 and 4-8) into one identical folder."""
    codes.extract_codes(HashTokenizer(), "synthetic:9", tmp_path / "one", image_size=16, batch_size=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_extract_as_rank, args=(str(tmp_path / "two"), port), nprocs=2)
    for name in ("codes.npy", "labels.npy", "meta.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert not (tmp_path / "two" / "parts").exists()


def test_extract_with_the_real_tokenizer(tmp_path):
    """The CLI on a saved random tiny VQModel: codes equal VQModel.encode of each view; the checksum is
    that of the weights, whichever file holds them."""
    import tokenizer
    from common import save_atomic
    torch.manual_seed(0)
    cfg = tokenizer.vq_config("VQ-tiny")
    vq = tokenizer.VQModel(cfg).eval()
    save_atomic({"model": vq.state_dict(), "config": dataclasses.asdict(cfg), "kind": "vq"}, tmp_path / "vq.pt")
    codes.main(["extract", "--vq-ckpt", str(tmp_path / "vq.pt"), "--data", "synthetic:5", "--out",
               str(tmp_path / "c"), "--image-size", "16", "--batch-size", "1", "--num-workers", "0", "--device", "cpu"])
    down = 16 // cfg.downsample
    ds = codes.CodesDataset(tmp_path / "c")
    got = torch.from_numpy(np.load(tmp_path / "c" / "codes.npy").astype(np.int64))
    with torch.no_grad():
        want = _expected_codes(vq, 5, 16)
    assert got.shape == (5, 2, down * down) and torch.equal(got, want)
    assert ds.receipt.vocab_size == cfg.codebook_size and ds.receipt.labels_dtype == "int16"
    assert ds.receipt.grid == (down, down) and ds.receipt.tokenizer_checksum == tokenizer_checksum(vq)


def test_codes_receipt_round_trip_and_checks(tmp_path):
    """meta.json <-> CodesReceipt is lossless; a missing or malformed field, or codes of another
    tokenizer, is one UserError naming the file or both checksums."""
    vq = HashTokenizer()
    receipt = codes.extract_codes(vq, "synthetic:3", tmp_path / "c", image_size=16)
    on_disk = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert receipt.to_dict() == on_disk and CodesReceipt.from_dict(on_disk, "meta.json") == receipt
    assert receipt.grid == (4, 4) and receipt.classes == tuple(CLASS_NAMES)
    assert codes.CodesDataset(tmp_path / "c").receipt == receipt
    with pytest.raises(UserError, match=r"^somewhere.json: the codes receipt lacks 'count'"):
        CodesReceipt.from_dict({k: v for k, v in on_disk.items() if k != "count"}, "somewhere.json")
    with pytest.raises(UserError, match="grid 'big' is not two numbers"):
        CodesReceipt.from_dict({**on_disk, "grid": "big"}, "x")
    receipt.check_same_tokenizer(receipt, "a", "b")  # the same tokenizer: no error
    other = codes.extract_codes(HashTokenizer(salt=1), "synthetic:3", tmp_path / "o", image_size=16)
    a, b = receipt.tokenizer_checksum[:12], other.tokenizer_checksum[:12]
    assert a != b
    with pytest.raises(UserError) as e:
        receipt.check_same_tokenizer(other, mine="ckpt.pt", theirs="codes/o")
    assert str(e.value).startswith(f"the codes of ckpt.pt come from another tokenizer than those in "
                                   f"codes/o (tokenizer checksum {a}")
    assert f" vs {b}" in str(e.value) and "vocab" not in str(e.value)  # only what differs
