"""train.py's text-to-image stage and sample.py --prompt: a caption-conditional GPT trained on the
built-in captioned world (scenes.py) with its own small T5 (--text t5-nano), or on frozen caption
features; sampled from prompts; its pictures scored by the world's exact checker."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sample
import scenes
import t2i
import train
import common
from common import load_checkpoint
from conftest import ENV, ROOT, run_cli
from codes import (CaptionFeatures, CodesReceipt, FeaturesReceipt, captions_checksum, extract_codes,
                   extract_features, read_captions, write_json)
from model import GPT
from scenes import COLOURS
from text import T5Encoder, TextEncoder, UnigramTokenizer, t5_config
from tokenizer import VQModel, vq_config

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ a fixed tokenizer
class SceneCodes(torch.nn.Module):
    """A fixed, non-learned tokenizer made for the built-in world, so that a test can train the
    GPT without first training a VQ: each 4x4 patch of a 32 px scene -> one of 486 codes, its
    palette colour (6) x the coverage of its four 2x2 sub-blocks, each 0, 1/2 or 1 (3^4 = 81;
    no coverage is code 0, the background). decode paints the sub-blocks back on a flat dark
    background: the round trip keeps what the checker reads."""
    levels, patch = 3, 4
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
    background = 40.0

    def __init__(self):
        super().__init__()
        self.codebook_size = len(self.palette) * self.levels ** 4
        self.config = type("Config", (), {"codebook_size": self.codebook_size})

    def encode(self, x):
        """[B, 3, H, W] in [-1, 1] -> codes [B, H/4, W/4]."""
        rgb = (x + 1) * 127.5
        bright = rgb.amax(1)
        bg = bright.flatten(1).median(1).values[:, None, None]
        P = self.patch
        patches = rgb.unfold(2, P, P).unfold(3, P, P)  # B, 3, h, w, P, P
        lit = (bright.unfold(1, P, P).unfold(2, P, P) > bg[..., None, None] + 60).float()
        mean = (patches * lit[:, None]).sum((-1, -2)) / lit.sum((-1, -2)).clamp(min=1)[:, None]
        # the palette colour of the patch's lit pixels: nearest in chroma (grey removed)
        mean = mean.permute(0, 2, 3, 1)
        chroma = F.normalize(mean - mean.mean(-1, True), dim=-1)
        pal = F.normalize(self.palette - self.palette.mean(-1, True), dim=-1)
        colour = (chroma @ pal.T).argmax(-1)  # B, h, w
        top = self.palette[colour].amax(-1).repeat_interleave(P, 1).repeat_interleave(P, 2)
        cover = ((bright - bg) / (top - bg).clamp(min=1)).clamp(0, 1)
        cover = F.avg_pool2d(cover[:, None], 2)[:, 0]  # per 2x2 sub-block
        q = (cover * (self.levels - 1) + 0.5).floor().long().clamp(max=self.levels - 1)
        digits = q.unfold(1, 2, 2).unfold(2, 2, 2).flatten(-2)  # B, h, w, 4
        pattern = (digits * self.levels ** torch.arange(4)).sum(-1)
        return torch.where(pattern == 0, 0, colour * self.levels ** 4 + pattern)

    def decode(self, codes):
        """codes [B, h, w] -> [B, 3, 4h, 4w] in [-1, 1]."""
        n = self.levels ** 4
        colour, pattern = codes // n, codes % n
        digits = torch.stack([(pattern // self.levels ** k) % self.levels for k in range(4)], -1)
        B, h, w = codes.shape
        cover = (digits.float() / (self.levels - 1)).view(B, h, w, 2, 2).permute(0, 1, 3, 2, 4)
        cover = cover.reshape(B, 2 * h, 2 * w).repeat_interleave(2, 1).repeat_interleave(2, 2)
        rgb = self.palette[colour].permute(0, 3, 1, 2)
        rgb = rgb.repeat_interleave(self.patch, 2).repeat_interleave(self.patch, 3)
        return (self.background * (1 - cover[:, None]) + rgb * cover[:, None]) / 127.5 - 1


def scene_codes(tokenizer, n, out, seed=0, checksum=None):
    """A codes folder of n CaptionedScenes as codes.py extract lays one out (codes.npy, labels.npy,
    meta.json) plus captions.json, item by item. One view per image: a mirror would contradict
    the captions' left and right."""
    ds = scenes.CaptionedScenes(n, 32, seed)
    os.makedirs(out, exist_ok=True)
    codes, captions = [], []
    for b in range(0, n, 500):
        items = [ds[i] for i in range(b, min(n, b + 500))]
        with torch.no_grad():
            codes.append(tokenizer.encode(torch.stack([x for x, _ in items])).flatten(1).numpy())
        captions += [c for _, c in items]
    codes = np.concatenate(codes).astype(np.uint16)[:, None]
    np.save(os.path.join(out, "codes.npy"), codes)
    np.save(os.path.join(out, "labels.npy"), np.zeros(n, np.int16))
    receipt = CodesReceipt(
        vocab_size=tokenizer.config.codebook_size, grid=(8, 8), image_size=32, n_aug=1, count=n,
        tokenizer_checksum=checksum or "scene-codes", ten_crop=False, crop_range=None,
        codes_dtype="uint16", labels_dtype="int16", data=f"scenes:{n}", num_classes=1,
        classes=("scene",))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(receipt.to_dict(), f)
    write_captions(out, captions)
    return str(out)


def write_captions(folder, captions):
    """captions.json as codes.extract_codes writes it beside captioned codes."""
    write_json(os.path.join(folder, "captions.json"),
               dict(count=len(captions), checksum=captions_checksum(captions), captions=captions))


def train_args(codes, out, steps, *extra):
    return ["--model", "nano", "--data", codes, "--text", "t5-nano", "--caption-len", 16,
            "--batch-size", 8, "--max-steps", steps, "--val-size", 16, "--num-workers", 0,
            "--eval-interval", steps, "--log-interval", 1, "--out-dir", out, *extra]


def train_main(argv):
    train.main([str(a) for a in argv])


# ---------------------------------------------------------------------------- small worlds on disk
@pytest.fixture(scope="module")
def vq_world(tmp_path_factory):
    """A random-weight VQ-tiny (32 px -> 8x8 of 512 codes) saved as ours, the codes of 120 scenes
    it made, and a t2i GPT trained 2 steps on them: what sample.py's command line needs."""
    root = tmp_path_factory.mktemp("vq_world")
    torch.manual_seed(0)
    vq = VQModel(vq_config("VQ-tiny")).eval()
    vq_path = root / "vq.pt"
    import dataclasses
    torch.save({"model": vq.state_dict(), "config": dataclasses.asdict(vq.config), "kind": "vq"},
               vq_path)
    # codes.py.s own extraction, captions.json included: the path a user's codes take
    codes = str(root / "codes")
    extract_codes(vq, "scenes:120", codes, image_size=32, batch_size=64)
    train_main(train_args(codes, root / "t2i", 2))
    return dict(root=root, vq=str(vq_path), codes=codes, gpt=str(root / "t2i" / "ckpt.pt"))


# ---------------------------------------------------------------------------------------- the stage
def test_captioned_images_are_encoded_as_themselves_alone(vq_world, tmp_path):
    """A captioned image has one view, itself (the official extract_codes_t2i.py): its mirror,
    which class codes add, would contradict "to the left of"; --ten-crop (half mirrors) is
    refused with one line."""
    meta = json.load(open(os.path.join(vq_world["codes"], "meta.json")))
    codes = np.load(os.path.join(vq_world["codes"], "codes.npy"))
    assert meta["n_aug"] == 1 and codes.shape == (120, 1, 64)
    vq = VQModel.from_pretrained(vq_world["vq"]).eval()
    world = scenes.CaptionedScenes(120, 32)
    with torch.no_grad():
        want = vq.encode(torch.stack([world[i][0] for i in (0, 7)])).flatten(1).numpy()
    assert np.array_equal(codes[[0, 7], 0], want)
    with pytest.raises(common.UserError, match="--ten-crop is for class labels"):
        extract_codes(vq, "scenes:120", tmp_path / "crops", image_size=32, ten_crop=True)


def test_joint_checkpoint_is_self_contained(vq_world):
    """--text t5-nano: the checkpoint holds the GPT (caption_dim = T5's width, N = --caption-len),
    the T5's weights under text_encoder.*, its config and the tokenizer's words; GPT.from_pretrained
    loads the GPT alone; caption dropout is the official 0.1."""
    ckpt = load_checkpoint(vq_world["gpt"])
    info = ckpt["meta"]["text"]
    assert info["kind"] == "joint" and info["encoder"] == "t5-nano" and info["length"] == 16
    assert info["words"][:len(scenes.VOCABULARY)] == list(scenes.VOCABULARY)
    assert info["config"]["vocab_size"] == 3 + len(info["words"])
    assert info["config"]["d_model"] == 64
    assert ckpt["config"]["caption_dim"] == 64 and ckpt["config"]["cls_token_num"] == 16
    assert ckpt["config"]["class_dropout_prob"] == 0.1 and ckpt["config"]["vocab_size"] == 512
    t5_keys = [k for k in ckpt["model"] if k.startswith("text_encoder.")]
    assert "text_encoder.shared.weight" in t5_keys and len(t5_keys) == 1 + 1 + 2 * 9 + 1
    gpt = GPT.from_pretrained(vq_world["gpt"])
    assert gpt.config.caption_dim == 64 and not any("text_encoder" in k for k in gpt.state_dict())
    assert CodesReceipt.from_dict(gpt.meta, "x").tokenizer_checksum == \
        json.load(open(os.path.join(vq_world["codes"], "meta.json")))["tokenizer_checksum"]


def test_caption_items_are_right_padded_token_ids(vq_world, monkeypatch):
    """An item: codes [64], the caption's ids right-padded to N with </s> last, its mask, valid 1;
    a caption is cleaned and tokenized once, later accesses are the same tensors; the joint
    model's forward equals GPT.forward on its own T5's left-padded features."""
    import text
    captions = read_captions(vq_world["codes"])[0]
    args = train.get_args([str(a) for a in train_args(vq_world["codes"], "/tmp/unused", 1)])
    recipe = train.resolve_recipe(args, train.T2IStage, "/tmp/unused", None, 1, "cpu")
    stage = train.T2IStage(recipe, None)
    codes, ids, mask, valid = stage.dataset[5]
    words = captions[5].split()
    assert codes.shape == (64,) and ids.shape == mask.shape == (16,) and valid.item() == 1.0
    assert mask.tolist() == [True] * (len(words) + 1) + [False] * (15 - len(words))
    assert ids[len(words)].item() == 1 and (ids[~mask] == 0).all()  # </s>, then <pad>
    vocab = stage.meta["text"]["words"]
    assert [vocab[i - 3] for i in ids[:len(words)].tolist()] == words
    cleaned = []
    monkeypatch.setattr(t2i, "clean_caption",
                        lambda t: cleaned.append(t) or text.clean_caption(t))
    again, other = stage.dataset[5], stage.dataset[7]  # the caption's part of each item
    assert all(torch.equal(a, b) for a, b in zip(again[1:], (ids, mask, valid)))
    assert cleaned == [captions[7]] and not torch.equal(other[1], ids)
    model = stage.model.eval()
    b = torch.utils.data.default_collate([stage.dataset[i] for i in (0, 5, 9)])
    feats, m = text.TextEncoder(text.UnigramTokenizer.from_words(vocab), model.text_encoder
                                ).encode_captions([captions[i] for i in (0, 5, 9)], 16)
    from t2i import left_pad_caption
    f2, m2 = left_pad_caption(feats, m)
    want = GPT.forward(model, b[0], f2, targets=b[0], cond_mask=m2)[1]
    assert model(b[0], b[1], targets=b[0], cond_mask=b[2], valid=b[3])[1].item() == \
        pytest.approx(want.item(), abs=1e-6)


def test_frozen_features_train_and_record_their_encoder(vq_world, tmp_path, monkeypatch, capsys):
    """--text FEATURES_DIR: the GPT alone on stored features (N and width from them), the
    encoder's receipt kept in the checkpoint, and sample.py asks for --t5 to draw it."""
    class Features(CaptionFeatures):  # its checks, made-up features of the codes' captions
        receipt = FeaturesReceipt(
            encoder="flan-t5-tiny", encoder_checksum="abc", length=12, d_model=24,
            dtype="bfloat16", compute_dtype="float32", clean=True, count=120,
            captions_checksum=read_captions(vq_world["codes"])[1], data=vq_world["codes"])

        def __init__(self, folder):
            self.folder = folder

        def __len__(self):
            return 120

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            mask = torch.arange(12) < 3 + i % 7
            return torch.randn(12, 24, generator=g) * mask[:, None], mask
    monkeypatch.setattr("codes.CaptionFeatures", Features)
    out = tmp_path / "frozen"
    argv = train_args(vq_world["codes"], out, 2)
    argv[argv.index("--text") + 1] = str(tmp_path)
    i = argv.index("--caption-len")
    code, _, err = run_cli(train.main, argv[:i] + argv[i + 2:], capsys)
    assert code == 0, err
    ckpt = load_checkpoint(out / "ckpt.pt")
    info = ckpt["meta"]["text"]
    assert info["kind"] == "frozen" and info["receipt"] == Features.receipt.to_dict()
    assert ckpt["config"]["caption_dim"] == 24 and ckpt["config"]["cls_token_num"] == 12
    assert not any(k.startswith("text_encoder.") for k in ckpt["model"])
    code, _, err = run_cli(sample.main, ["--gpt-ckpt", out / "ckpt.pt", "--vq-ckpt", vq_world["vq"],
                                         "--prompt", "a red circle", "--out", tmp_path / "x.png"],
                           capsys)
    assert code == 2 and "(flan-t5-tiny): pass its folder with --t5" in err
    assert len(err.splitlines()) == 1
    # --caption-len belongs to a trained encoder; frozen features keep their length
    code, _, err = run_cli(train.main, argv[:-1] + [tmp_path / "o2"], capsys)
    assert code == 2 and "--caption-len only applies with a text encoder trained along" in err


def test_features_of_other_captions_are_refused(vq_world, tmp_path, capsys):
    """Frozen features pair with codes by their captions' checksum, never by count: features of
    another folder's captions (the same number, in another order) are one line naming both."""
    captions = read_captions(vq_world["codes"])[0]
    tok = UnigramTokenizer.from_words(scenes.VOCABULARY)
    torch.manual_seed(0)
    encoder = TextEncoder(tok, T5Encoder(t5_config("t5-nano", vocab_size=len(tok))), "cpu",
                          torch.float32)
    feats, other = tmp_path / "featsA", tmp_path / "codesB"
    extract_features(encoder, captions, feats, length=8, batch_size=120)
    shutil.copytree(vq_world["codes"], other)
    write_captions(other, captions[::-1])
    argv = train_args(other, tmp_path / "o", 1)
    argv[argv.index("--text") + 1] = feats
    i = argv.index("--caption-len")
    argv = argv[:i] + argv[i + 2:]
    code, _, err = run_cli(train.main, argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"features in {feats} were made from other captions" in err and str(other) in err
    assert not (tmp_path / "o").exists()
    argv[argv.index("--data") + 1] = vq_world["codes"]  # the features' own codes: accepted
    args = train.get_args([str(a) for a in argv])
    stage = train.T2IStage(train.resolve_recipe(args, train.T2IStage, tmp_path / "o", None, 1,
                                                "cpu"), None)
    assert stage.meta["text"]["kind"] == "frozen" and stage.config.cls_token_num == 8


REFUSED = [
    (["--model", "VQ-tiny", "--text", "t5-nano"],
     "--text only applies to the text-to-image GPT stage"),
    (["--model", "nano", "--caption-len", 16],
     "--caption-len only applies to the text-to-image GPT stage"),
    (["--model", "nano", "--text", "t5-nano", "--caption-len", 1],
     "--caption-len must be in [2, 1024], got 1"),
]


@pytest.mark.parametrize("flags, message", REFUSED, ids=[" ".join(map(str, f)) for f, _ in REFUSED])
def test_text_flags_that_do_not_apply_are_refused(flags, message, vq_world, tmp_path, capsys):
    code, _, err = run_cli(train.main, ["--data", vq_world["codes"], "--num-workers", 0,
                                        "--out-dir", tmp_path / "o", *flags], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def resumes_exactly(args_of, codes, tmp_path):
    """Asserts 2 + 2 resumed steps end with the weights of 4 straight ones (dropout off); returns
    the resumed run's folder."""
    a, b = tmp_path / "a", tmp_path / "b"
    train_main(args_of(codes, a, 2, "--dropout", 0))
    train_main(args_of(codes, a, 4, "--dropout", 0, "--resume"))
    train_main(args_of(codes, b, 4, "--dropout", 0))
    wa, wb = load_checkpoint(a / "ckpt.pt")["model"], load_checkpoint(b / "ckpt.pt")["model"]
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    return a


def test_resume_keeps_the_text_encoder(vq_world, tmp_path, capsys):
    """A t2i checkpoint resumes only as one (with its --text); a resumed run continues exactly:
    2 + 2 steps end with the weights of 4 straight ones (dropout off)."""
    a = resumes_exactly(train_args, vq_world["codes"], tmp_path)
    code, _, err = run_cli(train.main, ["--model", "nano", "--data", vq_world["codes"],
                                        "--num-workers", 0, "--out-dir", a, "--max-steps", 5,
                                        "--resume"], capsys)
    assert code == 2 and "is a text-to-image GPT; resume it with the --text" in err


def test_init_from_starts_a_run_from_another_gpt(vq_world, tmp_path, capsys):
    """--init-from: a text GPT started from a class GPT on the same tokenizer's codes begins with
    its code embedding, blocks, norm and head, and a fresh caption side (the one a run without
    the flag draws from the same seed); a class GPT from a class GPT, or from the same weights as
    an official file (no receipt), begins with every weight. At --lr 1e-12 a step moves no weight
    by more than 1e-9, so the saved weights are the starting ones. A GPT of another --model, a
    tokenizer's checkpoint, another tokenizer's codes and a resumed run told another --init-from
    are refused with one line."""
    c2i = tmp_path / "c2i"
    c2i_args = ["--model", "nano", "--data", vq_world["codes"], "--batch-size", 8,
                "--val-size", 16, "--num-workers", 0]
    train_main([*c2i_args, "--max-steps", 1, "--out-dir", c2i])
    src = load_checkpoint(c2i / "ckpt.pt")["model"]
    still = ["--lr", "1e-12", "--weight-decay", 0]
    train_main(train_args(vq_world["codes"], tmp_path / "t2i", 1, *still,
                          "--init-from", c2i / "ckpt.pt"))
    assert "all but the condition embedding, which starts afresh" in capsys.readouterr().err
    train_main(train_args(vq_world["codes"], tmp_path / "fresh", 1, *still))
    got = load_checkpoint(tmp_path / "t2i" / "ckpt.pt")["model"]
    fresh = load_checkpoint(tmp_path / "fresh" / "ckpt.pt")["model"]
    body = [k for k in src if not k.startswith("cls_embedding.")]
    assert len(body) > 20 and all(torch.allclose(got[k], src[k], atol=1e-9) for k in body)
    new = [k for k in got if k.startswith(("cls_embedding.", "text_encoder."))]
    assert all(torch.allclose(got[k], fresh[k], atol=1e-9) for k in new)
    emb = "tok_embeddings.weight"  # random in both (the head starts at zero, as officially)
    assert not torch.allclose(fresh[emb], src[emb], atol=1e-3)
    torch.save({"model": src}, tmp_path / "official.pt")  # weights only, as LlamaGen releases them
    for start in (c2i / "ckpt.pt", tmp_path / "official.pt"):
        out = tmp_path / f"again_{start.stem}"
        train_main([*c2i_args, "--max-steps", 1, *still, "--init-from", start, "--out-dir", out])
        again = load_checkpoint(out / "ckpt.pt")["model"]
        assert again.keys() == src.keys()
        assert all(torch.allclose(again[k], src[k], atol=1e-9) for k in src)
    assert capsys.readouterr().err.count(": every weight") == 2
    other = load_checkpoint(c2i / "ckpt.pt")
    other["meta"]["tokenizer_checksum"] = "0" * 64
    torch.save(other, tmp_path / "other_tokenizer.pt")
    for start, model, message in (
            (c2i / "ckpt.pt", "pico", "expected shape .*--init-from takes a GPT of --model pico"),
            (vq_world["vq"], "nano", "is a 'vq' checkpoint, not a GPT"),
            (tmp_path / "other_tokenizer.pt", "nano", "come from another tokenizer")):
        code, _, err = run_cli(train.main, [*c2i_args, "--model", model, "--max-steps", 1,
                                            "--init-from", start, "--out-dir", tmp_path / "x"],
                               capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert re.search(message, err), err
    code, _, err = run_cli(train.main, [*c2i_args, "--max-steps", 2, "--resume", "--out-dir", c2i,
                                        "--init-from", tmp_path / "official.pt"], capsys)
    assert code == 2 and "--init-from" in err and "a resumed run keeps it" in err


@pytest.mark.subprocess
def test_ddp_and_fsdp_match_one_process(vq_world, tmp_path):
    """Dropout off (caption dropout too): 2-rank DDP and 2-rank FSDP (the T5 in the root unit)
    train the joint model exactly as one process does."""
    outs = {}
    for name, launcher in (("one", [sys.executable]),
                           ("ddp", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2"])):
        for fsdp in ([[]] if name == "one" else [[], ["--fsdp"]]):
            out = tmp_path / (name + "".join(fsdp))
            argv = train_args(vq_world["codes"], out, 3, "--dropout", 0, "--class-dropout", 0,
                              *fsdp)
            p = subprocess.run(launcher + ["train.py", *map(str, argv)], cwd=ROOT, env=ENV,
                               capture_output=True, text=True)
            assert p.returncode == 0, p.stderr[-3000:]
            outs[out.name] = load_checkpoint(out / "ckpt.pt")["model"]
    ref = outs.pop("one")
    for name, w in outs.items():
        assert w.keys() == ref.keys()
        worst = max((w[k] - ref[k]).abs().max().item() for k in ref)
        assert worst < 1e-5, (name, worst)


# -------------------------------------------------------------------------------------- sampling
def test_prompts_draw_a_grid_an_npz_and_refuse_the_wrong_condition(vq_world, tmp_path, capsys):
    """sample.py --prompt (repeatable) and --prompts FILE: one row per prompt; the evaluation .npz
    draws prompt i for sample i (arr_1 = prompt index); a class flag with a t2i model, --t5 with a
    model that has its own encoder, and a prompt for a class model: one line each."""
    base = ["--gpt-ckpt", vq_world["gpt"], "--vq-ckpt", vq_world["vq"]]
    png = tmp_path / "grid.png"
    code, out, err = run_cli(sample.main, base + ["--prompt", "a red circle", "--prompt",
                                                  "two blue stars", "--per-prompt", 3,
                                                  "--out", png], capsys)
    assert code == 0, err
    from PIL import Image
    assert Image.open(png).size == (3 * 34 + 2, 2 * 34 + 2)  # 3 columns, 2 rows of 32 px, 2 px gaps
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na green cross\n")
    npz = tmp_path / "eval.npz"
    code, _, err = run_cli(sample.main, base + ["--prompts", prompts, "--num-samples", 5,
                                                "--cfg-scale", 1, "--batch-size", 2,
                                                "--out", npz], capsys)
    assert code == 0, err
    with np.load(npz) as z:
        assert z["arr_0"].shape == (5, 32, 32, 3) and z["arr_1"].tolist() == [0, 1, 0, 1, 0]
    for flags, message in (
            (["--class", 1, "--prompt", "a star"], "--class is for class-conditional GPTs"),
            (["--class", 1], "is text-conditional: give --prompt"),
            (["--prompt", "a star", "--t5", tmp_path], "learned its own text side"),
            (["--t5", tmp_path], "--t5 only applies with --prompt"),
            (["--prompt", "a star", "--per-class", 2], "--per-class only applies with class-conditional GPTs")):
        code, _, err = run_cli(sample.main, base + flags + ["--out", tmp_path / "r.png"], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (flags, err)
    c2i = tmp_path / "c2i"
    train_main(["--model", "nano", "--data", vq_world["codes"], "--batch-size", 8, "--max-steps", 1,
                "--val-size", 16, "--num-workers", 0, "--out-dir", c2i])
    code, _, err = run_cli(sample.main, ["--gpt-ckpt", c2i / "ckpt.pt", "--vq-ckpt", vq_world["vq"],
                                         "--prompt", "a star", "--out", tmp_path / "r.png"], capsys)
    assert code == 2 and "is class-conditional: draw it with --class" in err


def test_prompts_rerank_by_clip_keeps_each_prompts_best(vq_world, tmp_path, capsys):
    """--prompt with --candidates 3 --keep 2: each prompt's row holds the 2 of its 3 candidates
    that CLIP scores highest against that prompt, best first; the same 6 candidates drawn with
    --per-prompt 3 and ranked here by clip.rank give the same rows and scores. With --num-samples
    each stored sample is its prompt's best of 3."""
    import clip
    train_main(["--model", "CLIP-tiny", "--data", "scenes:64", "--max-steps", 2, "--batch-size",
                10, "--val-size", 16, "--num-workers", 0, "--out-dir", tmp_path / "clip"])
    ckpt, texts = tmp_path / "clip" / "ckpt.pt", ["a red circle", "two blue stars"]
    base = ["--gpt-ckpt", vq_world["gpt"], "--vq-ckpt", vq_world["vq"],
            *(a for p in texts for a in ("--prompt", p))]
    code, out, err = run_cli(sample.main, base + ["--candidates", 3, "--keep", 2, "--clip", ckpt,
                                                  "--out", tmp_path / "kept.png"], capsys)
    assert code == 0, err
    printed = [[float(v) for v in line.split(":")[1].split()]
               for line in out.splitlines() if line.startswith("  ")]
    code, _, err = run_cli(sample.main, base + ["--per-prompt", 3, "--out", tmp_path / "all.png"],
                           capsys)
    assert code == 0, err
    from PIL import Image

    def cells(path, cols):  # the grid's 32 px pictures, row-major, 2 px gaps
        g = np.asarray(Image.open(path))
        return np.stack([g[2 + 34 * r:34 + 34 * r, 2 + 34 * c:34 + 34 * c]
                         for r in range(2) for c in range(cols)])
    every, kept = cells(tmp_path / "all.png", 3), cells(tmp_path / "kept.png", 2)
    model, tok = clip.load(str(ckpt))
    scores = clip.rank(model, common.from_uint8(torch.from_numpy(every.copy())), texts, tok)
    best = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :2]
    assert np.array_equal(kept, every.reshape(2, 3, 32, 32, 3)[[[0], [1]], best.numpy()]
                          .reshape(4, 32, 32, 3))
    assert np.allclose(printed, scores.gather(1, best).numpy(), atol=0.05)  # printed to 0.1
    code, _, err = run_cli(sample.main, base + ["--candidates", 3, "--per-prompt", 2, "--clip",
                                                ckpt, "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "--per-prompt and --candidates" in err
    # the evaluation .npz: sample i is the CLIP-best of the 3 candidates drawn for prompt i
    code, _, err = run_cli(sample.main, base + ["--num-samples", 2, "--cfg-scale", 1,
                                                "--batch-size", 6, "--candidates", 3, "--clip",
                                                ckpt, "--out", tmp_path / "s.npz"], capsys)
    assert code == 0, err
    with np.load(tmp_path / "s.npz") as z:
        stored = z["arr_0"]
    gpt, vq = GPT.from_pretrained(vq_world["gpt"]).eval(), VQModel.from_pretrained(vq_world["vq"])
    condition = t2i.joint_condition(gpt, vq_world["gpt"], texts, "cpu")
    drawn = sample.sample_images(gpt, vq.eval(), torch.tensor([0, 0, 0, 1, 1, 1]), top_k=0,
                                 generator=torch.Generator().manual_seed(sample.batch_seed(0, 0)),
                                 condition=condition)
    np.testing.assert_array_equal(stored, clip.rerank_candidates(drawn, texts, model, 1, tok)[0])


def test_prompt_condition_is_the_trained_models_left_padded_t5_output(vq_world):
    """PromptCondition: the checkpoint's own T5 and words, captions left padded to N = 16."""
    gpt = GPT.from_pretrained(vq_world["gpt"])
    enc = t2i.joint_text_encoder(vq_world["gpt"], gpt.meta["text"], "cpu", torch.float32)
    condition = t2i.PromptCondition(["a red circle", "three green crosses at the top left"], enc, 16)
    feats, mask = condition(torch.tensor([1, 0]))
    assert feats.shape == (2, 16, 64) and mask.sum(1).tolist() == [7 + 1, 3 + 1]
    assert mask[:, -1].all() and not mask[:, 0].any()  # valid tokens last
    assert (feats[~mask] == 0).all() and (feats[mask].abs().sum(-1) > 0).all()


def test_bench_model_generator_draws_candidates_prompt_major(vq_world):
    """bench.model_generator, the re-ranking sweep's source of candidates: n per prompt, prompt
    by prompt, exactly what sample_images draws for those prompt indices from the same seed;
    a class-conditional checkpoint is refused."""
    import bench
    prompts = scenes.benchmark_prompts(1)[:2]
    got = bench.model_generator(vq_world["gpt"], vq_world["vq"], 3.0, "cpu")(prompts, 3, 7)
    gpt = GPT.from_pretrained(vq_world["gpt"]).eval()
    condition = t2i.joint_condition(gpt, vq_world["gpt"], [p["prompt"] for p in prompts], "cpu")
    want = sample.sample_images(gpt, VQModel.from_pretrained(vq_world["vq"]).eval(),
                                [0, 0, 0, 1, 1, 1], cfg_scale=3.0,
                                generator=torch.Generator().manual_seed(7), condition=condition)
    assert got.shape == (6, 32, 32, 3) and got.dtype == np.uint8
    assert np.array_equal(got, np.asarray(want)) and not np.array_equal(got[0], got[1])
    c2i = vq_world["root"] / "c2i_for_bench"
    train_main(["--model", "nano", "--data", vq_world["codes"], "--batch-size", 8, "--max-steps",
                1, "--val-size", 16, "--num-workers", 0, "--out-dir", c2i])
    with pytest.raises(Exception, match="needs a text-to-image GPT that learned its own text side"):
        bench.model_generator(str(c2i / "ckpt.pt"), vq_world["vq"], 3.0, "cpu")


# ------------------------------------------------------------------ a model that learns from text
def test_a_small_model_trained_here_draws_the_colours_it_is_asked_for(tmp_path):
    """GPT-pico and T5-nano trained together for 400 steps of 64 on 5,000 scenes (SceneCodes,
    about a minute on two cores), then 40 "a red circle" prompts (the benchmark's colours task,
    half of them naming held-out pairs) at cfg 5, top-k 20. Chance is what the training world
    itself scores on those prompts: 10 true renders of random captions per prompt. Asserted: at
    least 4x chance and 0.2 on the task, twice chance plus 0.1 on the colour alone (the figures
    of a run: BENCHMARKS.md, "The tests")."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))  # a real training run: a second core pays
    try:
        learn_colours(tmp_path)
    finally:
        torch.set_num_threads(1)  # this module's setting (one_thread)


def learn_colours(tmp_path):
    codes = scene_codes(SceneCodes(), 5000, tmp_path / "codes")
    train_main(["--model", "pico", "--data", codes, "--text", "t5-nano", "--caption-len", 16,
                "--batch-size", 64, "--lr", "3e-3", "--dropout", 0, "--max-steps", 400,
                "--val-size", 200, "--num-workers", 0, "--eval-interval", 400,
                "--log-interval", 100, "--out-dir", tmp_path / "run"])
    path = str(tmp_path / "run" / "ckpt.pt")
    gpt = GPT.from_pretrained(path).eval()
    prompts = [p for p in scenes.benchmark_prompts(40) if p["task"] == "colours"]
    condition = t2i.joint_condition(gpt, path, [p["prompt"] for p in prompts], "cpu")
    images = sample.sample_images(gpt, SceneCodes(), list(range(len(prompts))), cfg_scale=5.0,
                                  top_k=20, generator=torch.Generator().manual_seed(0),
                                  condition=condition)
    world = scenes.CaptionedScenes(10 * len(prompts), 32, seed=1)
    renders = [world[i][0] for i in range(len(world))]

    def colour_named(pictures, asked):
        found = [scenes.detect(x) for x in pictures]
        return np.mean([bool(f) and f[0]["colour"] == p["spec"]["include"][0]["colour"]
                        for f, p in zip(found, asked)])
    model = scenes.score(list(images), prompts)["colours"]
    chance = scenes.score(renders, prompts * 10)["colours"]
    assert model >= max(4 * chance, 0.2), (model, chance)
    own, by_chance = colour_named(images, prompts), colour_named(renders, prompts * 10)
    assert own >= 2 * by_chance + 0.1, (own, by_chance)
