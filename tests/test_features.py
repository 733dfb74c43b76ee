"""data.py and codes.py, captions: caption folders, COCO captions, scenes; captions beside codes;
caption features extracted once (valid tokens only, 16-bit, sharded, resumable) and read back by CaptionFeatures."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import codes
import data
import scenes
from codes import CaptionFeatures, FeaturesReceipt
from common import UserError, to_uint8
from conftest import ENV, ROOT, PatchColours, run_cli
from t2i import left_pad_caption
from text import T5Encoder, TextEncoder, UnigramTokenizer, t5_config, write_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = list(dict.fromkeys([*scenes.VOCABULARY, "cat", "sits", "on", "mat", "dog", "runs", "in", "park"]))
CAPTIONS = ["a red circle", "two green squares to the left of a blue star", "cat", "a dog runs in a park",
            "three yellow triangles", "a cat sits on a mat and a dog runs", "a magenta star at the top left",
            "an unknown word here", "a small cyan circle above a large red square", "dog"]


def tiny_encoder(seed=0, dtype=torch.float32):
    """t5-nano with random weights and a word-list tokenizer: an encoder with no file."""
    tok = UnigramTokenizer.from_words(WORDS)
    torch.manual_seed(seed)
    return TextEncoder(tok, T5Encoder(t5_config("t5-nano", vocab_size=len(tok), dropout_rate=0.0)), "cpu", dtype)


def write_t5_folder(folder, seed=0):
    """The same tiny encoder as a Hugging Face folder: config.json, tokenizer.json, model.safetensors."""
    os.makedirs(folder, exist_ok=True)
    vocab = [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0]] + [["\u2581" + w, -1.0] for w in WORDS]
    added = [{"id": i, "content": p, "special": True} for i, (p, _) in enumerate(vocab[:3])]
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump({"added_tokens": added, "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab}}, f)
    enc = tiny_encoder(seed).encoder
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "t5", **vars(enc.config)}, f)
    write_safetensors(enc.state_dict(), os.path.join(folder, "model.safetensors"))
    return str(folder)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return write_t5_folder(tmp_path_factory.mktemp("t5") / "t5-tiny")


def png(path, seed, size=(16, 16)):
    """A random RGB picture saved as PNG; returns its pixels."""
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return a


def pixels(x):
    """[3, H, W] in [-1, 1] -> the uint8 [H, W, 3] it was read from (exact on the 256 levels)."""
    return to_uint8(x[None])[0]


# ------------------------------------------------------------------------------------------ caption readers
def test_caption_folder_reads_captions_and_pixels(tmp_path):
    (tmp_path / "sub").mkdir()
    want = {"b.png": png(tmp_path / "b.png", 0), "a.png": png(tmp_path / "a.png", 1),
            "sub/c.png": png(tmp_path / "sub" / "c.png", 2)}
    (tmp_path / "b.txt").write_text("a  dog\nruns in a park\n")  # several lines: one caption
    (tmp_path / "a.txt").write_text("  a cat  ")
    (tmp_path / "sub" / "c.txt").write_text("three yellow triangles")
    (tmp_path / "notes.txt").write_text("not a caption: no image of this name")
    ds = data.caption_dataset(tmp_path, 16)
    assert data.captions_of(ds) == ["a cat", "a dog runs in a park", "three yellow triangles"]  # sorted paths
    for i, name in enumerate(["a.png", "b.png", "sub/c.png"]):
        x, caption = ds[i]
        assert x.shape == (3, 16, 16) and np.array_equal(pixels(x), want[name]) and caption == ds.captions[i]
    assert ds.spec == f"captions:{tmp_path}"
    labelled = data.image_dataset(f"captions:{tmp_path}", 16, augment="center", flip=False)
    x, label = labelled[1]
    assert label == 0 and labelled.num_classes == 1 and np.array_equal(pixels(x), want["b.png"])
    assert data.captions_of(labelled) == data.captions_of(ds)


def test_coco_captions_every_caption_per_image(tmp_path):
    (tmp_path / "img").mkdir()
    b, a = png(tmp_path / "img" / "b.png", 3, (20, 16)), png(tmp_path / "img" / "a.png", 4)
    png(tmp_path / "img" / "c.png", 5)
    ann = {"images": [{"id": 7, "file_name": "b.png"}, {"id": 3, "file_name": "a.png"},
                      {"id": 5, "file_name": "c.png"}],
           "annotations": [{"image_id": 3, "id": 1, "caption": "A cat\n on a mat."},
                           {"image_id": 7, "id": 2, "caption": "a dog"},
                           {"image_id": 3, "id": 0, "caption": "a second caption of the cat"}]}
    (tmp_path / "captions.json").write_text(json.dumps(ann))
    ds = data.caption_dataset(f"coco:{tmp_path}/captions.json:{tmp_path}/img", 16)
    # in the file's order of images, each with its captions in the file's order; c.png has none
    assert ds.captions == [["a dog"], ["A cat on a mat.", "a second caption of the cat"]]
    assert len(ds) == 2
    x, caption = ds[0]
    # b.png is 20 x 16: the ADM centre crop keeps its central 16 columns
    assert caption == ["a dog"] and np.array_equal(pixels(x), b[:, 2:18])
    assert np.array_equal(pixels(ds[1][0]), a)
    assert data.captions_of(data.image_dataset(ds.spec, 16)) == ds.captions


def test_bad_caption_inputs_are_one_line(tmp_path, t5_dir, capsys):
    (tmp_path / "f").mkdir()
    png(tmp_path / "f" / "a.png", 0)
    png(tmp_path / "f" / "b.png", 1)
    (tmp_path / "f" / "a.txt").write_text("a cat")
    good_json = json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                            "annotations": [{"image_id": 1, "caption": "a cat"}]})
    (tmp_path / "cut.json").write_text(good_json[:-9])
    (tmp_path / "other.json").write_text(json.dumps({"info": {}, "licenses": []}))
    (tmp_path / "ghost.json").write_text(good_json.replace("a.png", "ghost.png"))
    cases = [(str(tmp_path / "f"), "has no caption"),
             (f"coco:{tmp_path}/cut.json:{tmp_path}/f", "not valid JSON"),
             (f"coco:{tmp_path}/other.json:{tmp_path}/f", "not a COCO captions file"),
             (f"coco:{tmp_path}/ghost.json:{tmp_path}/f", "ghost.png (named in ghost.json) does not exist"),
             (f"coco:{tmp_path}/cut.json", "write coco:ANNOTATIONS.json:IMAGES_DIR"),
             ("scenes:0", "write scenes:N"),
             (str(tmp_path / "nowhere"), "does not exist")]
    for spec, words in cases:
        code, out, err = run_cli(codes.main, ["features", "--data", spec, "--t5", t5_dir, "--out", tmp_path / "x"],
                                 capsys)
        assert code == 2 and words in err and err.count("\n") == 1 and err.startswith("error: "), (spec, err)
    (tmp_path / "f" / "b.txt").write_text("a dog")
    code, _, err = run_cli(codes.main, ["features", "--data", tmp_path / "f", "--t5", tmp_path / "no-t5",
                                       "--out", tmp_path / "x"], capsys)
    assert code == 2 and "is not a folder" in err and err.count("\n") == 1
    # an undecodable image stops the extraction with its name (a substitute would carry a wrong caption),
    # in one line even when a DataLoader worker met it
    (tmp_path / "f" / "b.png").write_bytes(b"\x89PNG not really")
    code, _, err = run_cli(codes.main, ["extract", "--vq-config", "VQ-tiny", "--data", f"captions:{tmp_path}/f",
                                       "--image-size", 16, "--out", tmp_path / "codes", "--num-workers", 2,
                                       "--device", "cpu"], capsys)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1
    assert lines[0].startswith(f"error: unreadable image {tmp_path}/f/b.png (")
    assert not (tmp_path / "x").exists()


def test_extract_scenes_writes_captions_in_row_order(tmp_path):
    receipt = codes.extract_codes(PatchColours(), "scenes:7", tmp_path / "c", image_size=32, batch_size=3)
    world = scenes.CaptionedScenes(7, 32)
    captions, checksum = codes.read_captions(tmp_path / "c")
    assert captions == [world.caption(i) for i in range(7)] and checksum == codes.captions_checksum(captions)
    assert receipt.data == "scenes:7" and receipt.num_classes == 1 and receipt.classes == ("captioned",)
    rows = np.load(tmp_path / "c" / "codes.npy")
    assert np.load(tmp_path / "c" / "labels.npy").tolist() == [0] * 7
    for i in (0, 4, 6):  # codes row i is the image of caption i (view 0: unflipped)
        assert np.array_equal(rows[i, 0], PatchColours().encode(world[i][0][None])[0].flatten().numpy())
    assert codes.load_captions(tmp_path / "c") == (captions, str(tmp_path / "c"))
    assert codes.load_captions("scenes:7") == (captions, "scenes:7")


# ------------------------------------------------------------------------------------------ features
@pytest.mark.parametrize("dtype, rel", [("bfloat16", 2 ** -8), ("float16", 2 ** -11)])
def test_features_round_trip_valid_tokens_only(tmp_path, dtype, rel):
    """Item i = encode_captions' output for caption i rounded to 16 bits, padded with zeros; only the
    valid tokens are on disk."""
    enc = tiny_encoder()
    receipt = codes.extract_features(enc, CAPTIONS, tmp_path, length=8, batch_size=4, dtype=dtype)
    ds = CaptionFeatures(tmp_path)
    assert ds.receipt == receipt and len(ds) == 10 and receipt.dtype == dtype and receipt.length == 8
    want, mask = enc.encode_captions(CAPTIONS, length=8)
    got = torch.stack([ds[i][0] for i in range(10)])
    got_mask = torch.stack([ds[i][1] for i in range(10)])
    assert got.shape == (10, 8, 64) and got.dtype == torch.float32 and torch.equal(got_mask, mask)
    assert mask.sum(1).max() == 8 and mask.sum(1).min() == 2  # a truncated caption, a one-word one
    assert got[~mask].abs().sum() == 0
    # within half a 16-bit step of the value, plus the float32 noise of a shorter padded length
    assert ((got - want).abs() <= rel * want.abs() + 1e-5).all()
    assert (got - want).abs().max() > 0  # really rounded: not stored in float32
    # exact at the length each batch ran at (its longest caption): the rounding is all that differs
    for lo in (0, 4, 8):
        n = int(mask[lo:lo + 4].sum(1).max())
        f, _ = enc.encode_captions(CAPTIONS[lo:lo + 4], length=n)
        assert torch.equal(got[lo:lo + 4, :n], f.to(getattr(torch, dtype)).float())
    lengths = np.load(tmp_path / "lengths.npy")
    assert lengths.tolist() == mask.sum(1).tolist()
    assert os.path.getsize(tmp_path / "features.bin") == int(lengths.sum()) * 64 * 2
    x, m = left_pad_caption(got, got_mask)  # the GPT's layout, unchanged
    # DataLoader workers reopen the memory map and read the same items
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=1 if dtype == "float16" else 0)
    assert all(torch.equal(f, got[i * 5:i * 5 + 5]) for i, (f, _) in enumerate(loader))
    assert torch.equal(m[:, -1], torch.ones(10, dtype=torch.bool))


class Killed(Exception):
    pass


def counting(enc, stop_after=None):
    """enc whose encode_captions counts the captions it encodes and dies after `stop_after` of them."""
    real, enc.encoded = enc.encode_captions, 0

    def encode(texts, length=120, batch_size=32):
        if stop_after is not None and enc.encoded >= stop_after:
            raise Killed
        enc.encoded += len(texts)
        return real(texts, length, batch_size)
    enc.encode_captions = encode
    return enc


def test_features_resume_after_kill_byte_identical(tmp_path):
    codes.extract_features(tiny_encoder(), CAPTIONS, tmp_path / "full", batch_size=3)
    with pytest.raises(Killed):
        codes.extract_features(counting(tiny_encoder(), stop_after=6), CAPTIONS, tmp_path / "cut", batch_size=3)
    progress = json.loads((tmp_path / "cut" / "parts" / "progress-0-of-1.json").read_text())
    assert progress["done"] == 6
    with open(tmp_path / "cut" / "parts" / "features-0-of-1.bin", "ab") as f:
        f.write(b"half a batch the kill left behind")  # past what the progress vouches for
    with pytest.raises(UserError, match="did not finish"):
        CaptionFeatures(tmp_path / "cut")
    with pytest.raises(UserError, match="resume it with that batch size"):
        codes.extract_features(tiny_encoder(), CAPTIONS, tmp_path / "cut", batch_size=4)
    with pytest.raises(UserError, match="other settings"):
        codes.extract_features(tiny_encoder(), CAPTIONS, tmp_path / "cut", batch_size=3, dtype="float16")
    enc = counting(tiny_encoder())
    codes.extract_features(enc, CAPTIONS, tmp_path / "cut", batch_size=3)
    assert enc.encoded == 4  # only the missing captions
    for name in ("features.bin", "lengths.npy", "features.json"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    assert not (tmp_path / "cut" / "parts").exists()
    enc = counting(tiny_encoder())
    codes.extract_features(enc, CAPTIONS, tmp_path / "cut", batch_size=3)
    assert enc.encoded == 0  # finished: nothing recomputed
    with pytest.raises(UserError, match="already holds finished caption features with captions_checksum"):
        codes.extract_features(tiny_encoder(), CAPTIONS[::-1], tmp_path / "cut", batch_size=3)


@pytest.mark.subprocess
def test_two_ranks_under_torchrun_equal_one_process(tmp_path, t5_dir, capsys):
    """torchrun, 2 processes (gloo): each encodes its batches, rank 0 joins; the folder is byte-identical to
    one process's. 11 captions in batches of 3: rank 0 takes 6, rank 1 the other 5."""
    codes.extract_codes(PatchColours(), "scenes:11", tmp_path / "codes", image_size=32)
    args = ["features", "--data", tmp_path / "codes", "--t5", t5_dir, "--batch-size", 3, "--device", "cpu"]
    code, out, _ = run_cli(codes.main, args + ["--out", tmp_path / "one"], capsys)
    assert code == 0 and "11 captions" in out
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "codes.py", *map(str, args + ["--out", tmp_path / "two"])],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("wrote") == 1  # rank 0 speaks for both
    for name in ("features.bin", "lengths.npy", "features.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert not (tmp_path / "two" / "parts").exists()
    CaptionFeatures(tmp_path / "two").check_codes(tmp_path / "codes")


# ------------------------------------------------------------------------------------------ receipts
def test_receipt_checks_name_both_checksums(tmp_path, t5_dir):
    enc = TextEncoder.from_pretrained(t5_dir, "cpu")
    mine = codes.extract_features(enc, CAPTIONS, tmp_path / "a", name="t5-tiny")
    on_disk = json.loads((tmp_path / "a" / "features.json").read_text())
    assert mine.to_dict() == on_disk and FeaturesReceipt.from_dict(on_disk, "x") == mine
    # one encoder loaded in float32 or bfloat16 has one checksum; other weights or words another
    assert codes.encoder_checksum(TextEncoder.from_pretrained(t5_dir, "cpu", torch.bfloat16)) == mine.encoder_checksum
    other_words = TextEncoder(UnigramTokenizer.from_words(WORDS[::-1]), tiny_encoder().encoder)
    assert codes.encoder_checksum(other_words) != mine.encoder_checksum
    assert codes.encoder_checksum(tiny_encoder(seed=1)) != mine.encoder_checksum  # other weights
    with pytest.raises(UserError, match="lacks 'length'"):
        FeaturesReceipt.from_dict({k: v for k, v in on_disk.items() if k != "length"}, "x")
    # the features pair with the codes of the same captions only
    codes.extract_codes(PatchColours(), "scenes:10", tmp_path / "codes", image_size=32)
    with pytest.raises(UserError) as e:
        CaptionFeatures(tmp_path / "a").check_codes(tmp_path / "codes")
    codes_sum = codes.read_captions(tmp_path / "codes")[1][:12]
    assert f"(captions {mine.captions_checksum[:12]})" in str(e.value) and f"(captions {codes_sum})" in str(e.value)
    paired = codes.extract_features(enc, codes.load_captions(tmp_path / "codes")[0], tmp_path / "p")
    CaptionFeatures(tmp_path / "p").check_codes(tmp_path / "codes")
    assert paired.count == 10


def test_features_reader_errors_and_fp16_range(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        CaptionFeatures(tmp_path / "nowhere")
    with pytest.raises(UserError, match="holds no caption features"):
        CaptionFeatures(tmp_path)
    codes.extract_features(tiny_encoder(), CAPTIONS[:3], tmp_path / "f")
    with open(tmp_path / "f" / "features.bin", "ab") as f:
        f.write(b"xx")
    with pytest.raises(UserError, match="damaged"):
        CaptionFeatures(tmp_path / "f")
    loud = tiny_encoder()
    with torch.no_grad():
        loud.encoder.encoder.final_layer_norm.weight.mul_(1e6)  # features far beyond 65504
    with pytest.raises(UserError, match=r"caption 0 .* exceed float16's range"):
        codes.extract_features(loud, CAPTIONS[:3], tmp_path / "g", dtype="float16")
    codes.extract_features(loud, CAPTIONS[:3], tmp_path / "h", dtype="bfloat16")  # bf16: float32's range
    assert CaptionFeatures(tmp_path / "h")[0][0].abs().max() > 65504
    with pytest.raises(UserError, match="non-empty list of captions"):
        codes.extract_features(loud, [], tmp_path / "i")


def test_joined_specs_train_a_tokenizer_but_extract_nothing(tmp_path):
    """"A+B" is the items of A then B, labels dropped (a tokenizer reads none); extract refuses it,
    since codes carry one world's labels or captions."""
    joined = data.image_dataset("synthetic:3+scenes:2", 32)
    shapes, scenes_ = data.image_dataset("synthetic:3", 32), data.image_dataset("scenes:2", 32)
    assert len(joined) == 5 and joined.spec == "synthetic:3+scenes:2"
    for i, (x, y) in enumerate([joined[k] for k in range(5)]):
        ref = shapes[i][0] if i < 3 else scenes_[i - 3][0]
        assert y == 0 and torch.equal(x, ref)
    with pytest.raises(UserError, match="only a tokenizer trains on"):
        codes.extract_codes(None, "synthetic:3+scenes:2", tmp_path / "c", image_size=32)
