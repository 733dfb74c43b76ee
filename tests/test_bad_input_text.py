"""Bad input on the text side (issue 30): captions, tokenizer files, prompts files, CLIP and the
flags of every CLI. Each row of CASES is (name, command, make, expected exit code, words): make
sets up the row's files in a fresh folder, the command runs in-process through common.cli, and the
one line it ends with (code 2: "error: ..."; code 0: a "warning: ..." line) holds every word.

The tiny artefacts are made once for the module, by the project's own commands: a random VQ-tiny,
the codes of 40 scenes, a text GPT trained one step with its own T5 (joint), the features of a
tiny T5 folder and a GPT trained one step on them (frozen), a CLIP-tiny trained one step, and
test_faults_io's class GPT."""
import argparse
import dataclasses
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import clip
import codes
import common
import demo
import bench
import fid
import sample
import scenes
import shapes
import text
import tokenizer
import train
from conftest import HashTokenizer, run_cli
from test_faults_io import ck  # noqa: F401  (the class GPT, its VQ and codes: a fixture)
from test_features import write_t5_folder
from tokenizer import VQModel, vq_config

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = os.path.join(os.path.dirname(__file__), "data")
SHORT = ["--batch-size", "10", "--max-steps", "1", "--val-size", "10", "--num-workers", "0"]


@pytest.fixture(scope="module")
def w(tmp_path_factory, ck):  # noqa: F811
    d = str(tmp_path_factory.mktemp("text_world"))
    torch.manual_seed(0)
    vq = VQModel(vq_config("VQ-tiny")).eval()
    torch.save({"model": vq.state_dict(), "config": dataclasses.asdict(vq.config), "kind": "vq"},
               f"{d}/vq.pt")
    codes.extract_codes(vq, "scenes:40", f"{d}/codes", image_size=32, batch_size=40)
    train.main(["--model", "nano", "--data", f"{d}/codes", "--text", "t5-nano", "--caption-len",
                "8", "--out-dir", f"{d}/joint", *SHORT])
    t5 = write_t5_folder(f"{d}/t5")
    codes.main(["features", "--data", f"{d}/codes", "--t5", t5, "--out", f"{d}/feats",
                "--length", "8"])
    train.main(["--model", "nano", "--data", f"{d}/codes", "--text", f"{d}/feats", "--out-dir",
                f"{d}/frozen", *SHORT])
    train.main(["--model", "CLIP-tiny", "--data", "scenes:40", "--out-dir", f"{d}/clip", *SHORT])
    codes.extract_codes(HashTokenizer(64), "synthetic:20", f"{d}/class_codes", image_size=16)
    np.savez(f"{d}/two.npz", np.zeros((2, 32, 32, 3), np.uint8))
    return dict(d=d, vq=f"{d}/vq.pt", codes=f"{d}/codes", joint=f"{d}/joint/ckpt.pt", t5=t5,
                feats=f"{d}/feats", frozen=f"{d}/frozen/ckpt.pt", clip=f"{d}/clip/ckpt.pt",
                class_codes=f"{d}/class_codes", two=f"{d}/two.npz", gpt=ck["gpt"],
                class_vq=ck["vq"])


# ------------------------------------------------------------------------- what each row sets up
def nothing(d, w, mp):
    pass


def write(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))


def prompts(*lines):
    return lambda d, w, mp: write(f"{d}/p.txt", "\n".join(lines) + "\n")


def other_captions(d, w, mp):  # codes whose captions are the features' in another order
    shutil.copytree(w["codes"], f"{d}/codesB")
    raw = json.load(open(f"{d}/codesB/captions.json"))
    c = raw["captions"][::-1]
    write(f"{d}/codesB/captions.json", dict(count=len(c), checksum=codes.captions_checksum(c),
                                             captions=c))


def coco(images, annotations):
    def make(d, w, mp):
        os.makedirs(f"{d}/img")
        for name in ("a.png", "b.png"):
            Image.new("RGB", (16, 16), (200, 30, 30)).save(f"{d}/img/{name}")
        write(f"{d}/ann.json", {"images": images, "annotations": annotations})
    return make


def edited_prompts(d, w, mp):
    """A --num-samples run left its parts; then the prompts file was edited (same line count)."""
    write(f"{d}/p.txt", "a red circle\na blue star\n")
    mp.setattr(sample, "gather_parts", lambda *a: None)
    sample.main(["--gpt-ckpt", w["joint"], "--vq-ckpt", w["vq"], "--prompts", f"{d}/p.txt",
                 "--num-samples", "4", "--batch-size", "2", "--cfg-scale", "1", "--out",
                 f"{d}/x.npz"])
    mp.undo()
    write(f"{d}/p.txt", "a green cross\na yellow square\n")


def t5_with(edit):
    """A copy of the tiny T5 folder whose tokenizer.json `edit` changed."""
    def make(d, w, mp):
        shutil.copytree(w["t5"], f"{d}/t5")
        tok = json.load(open(f"{d}/t5/tokenizer.json"))
        edit(tok)
        write(f"{d}/t5/tokenizer.json", tok)
    return make


def hf_clip(vocab=None, merges=None):
    """A Hugging Face CLIP folder: the tiny one's weights, the 2000-merge BPE files (edited)."""
    def make(d, w, mp):
        shutil.copytree(os.path.join(DATA, "clip_hf_tiny"), f"{d}/hf")
        v = json.load(open(os.path.join(DATA, "clip_bpe", "vocab.json")))
        write(f"{d}/hf/vocab.json", vocab(v) if vocab else v)
        m = open(os.path.join(DATA, "clip_bpe", "merges.txt"), encoding="utf-8").read()
        write(f"{d}/hf/merges.txt", merges(m) if merges else m)
        write(f"{d}/p.txt", "a red circle\na blue star\n")
    return make


def clip_meta(edit):
    def make(d, w, mp):
        ckpt = torch.load(w["clip"], weights_only=True)
        edit(ckpt["meta"])
        torch.save(ckpt, f"{d}/clip.pt")
        write(f"{d}/c.txt", "a red circle\na blue star\n")
    return make


def joint_meta(edit):
    def make(d, w, mp):
        ckpt = torch.load(w["joint"], weights_only=True)
        edit(ckpt["meta"]["text"])
        torch.save(ckpt, f"{d}/gpt.pt")
    return make


def swap_first_two(words):
    words[0], words[1] = words[1], words[0]


def copy_run(name):
    return lambda d, w, mp: shutil.copytree(os.path.dirname(w[name]), f"{d}/run")


def existing_png(d, w, mp):
    write(f"{d}/x.png", "precious")


def damaged(path, content):
    return lambda d, w, mp: write(f"{d}/{path}", content)


def damaged_features_json(d, w, mp):
    shutil.copytree(w["feats"], f"{d}/f")
    write(f"{d}/f/features.json", '{"encoder": "t5", ')


class System:
    """A pickle that would run a command when loaded."""

    def __reduce__(self):
        return os.system, ("touch /tmp/issue30-pwned",)


def evil_pickle(d, w, mp):
    with open(f"{d}/evil.pt", "wb") as f:
        pickle.dump({"model": System()}, f)
    torch.save({"model": System()}, f"{d}/evil2.pt")


def lengths_is_a_folder(d, w, mp):
    os.makedirs(f"{d}/f/lengths.npy")


# ------------------------------------------------------------------------------------- the table
def S(*a, gpt="joint", vq="vq"):
    return ("sample", lambda d, w: ["--gpt-ckpt", w[gpt] if gpt in w else gpt.format(d=d),
                                    "--vq-ckpt", w[vq], *[x.format(**{**w, "d": d}) for x in a]])


def C(tool, *a):
    return (tool, lambda d, w: [x.format(**{**w, "d": d}) for x in a])


PNG = ["--out", "{d}/x.png"]
PROMPT = ["--prompt", "a red circle", *PNG]
FEATURES = ["features", "--data", "{codes}", "--t5", "{d}/t5", "--out", "{d}/f", "--length", "8"]
TRAIN_JOINT = ["--model", "nano", "--data", "{codes}", "--text", "t5-nano", *SHORT]
TRAIN_CLIP = ["--model", "CLIP-tiny", "--data", "scenes:40", "--num-workers", "0",
              "--max-steps", "2", "--val-size", "10"]

CASES = [
    # 1. silent wrong training data
    ("features of other captions", C("train", "--model", "nano", "--data", "{d}/codesB",
                                     "--text", "{feats}", *SHORT, "--out-dir", "{d}/o"),
     other_captions, 2, ["features in", "were made from other captions", "codesB"]),
    ("coco duplicate image id", C("codes", "features", "--data", "coco:{d}/ann.json:{d}/img",
                                  "--t5", "{t5}", "--out", "{d}/f"),
     coco([{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}],
          [{"image_id": 1, "caption": "a red square"}]), 2,
     ["ann.json", "image id 1 is listed twice"]),
    # 2. silent wrong evaluation
    ("blank line in --prompts", S("--prompts", "{d}/p.txt", *PNG),
     prompts("a red circle", "", "a blue star"), 2, ["p.txt line 2 is blank"]),
    ("blank line in --captions", C("clip", "score", "{two}", "--clip", "{clip}", "--captions",
                                   "{d}/p.txt"), prompts("a red circle", ""), 2,
     ["p.txt line 2 is blank"]),
    ("resume after the prompts changed", S("--prompts", "{d}/p.txt", "--num-samples", "4",
                                           "--batch-size", "2", "--cfg-scale", "1", "--out",
                                           "{d}/x.npz"), edited_prompts, 2,
     ["holds samples made with other settings (prompts"]),
    # 3. tokenizer files are validated where they are parsed, and against their weights
    ("tokenizer.json score 'x'", S("--gpt-ckpt", "{frozen}", "--t5", "{d}/t5", *PROMPT),
     t5_with(lambda t: t["model"]["vocab"][3].__setitem__(1, "x")), 2,
     ["t5/tokenizer.json", "'vocab' entry 3", "[piece, score]"]),
    ("tokenizer.json without vocab", C("codes", *FEATURES),
     t5_with(lambda t: t["model"].pop("vocab")), 2, ["t5/tokenizer.json", "'vocab'"]),
    ("tokenizer.json vocab a map", C("text", "encode", "--t5", "{d}/t5", "a red circle"),
     t5_with(lambda t: t["model"].__setitem__("vocab", {"a": 1})), 2,
     ["t5/tokenizer.json", "'vocab'"]),
    ("tokenizer.json empty vocab", C("text", "tokenize", "--tokenizer", "{d}/t5", "a red circle"),
     t5_with(lambda t: t["model"].__setitem__("vocab", [])), 2,
     ["t5/tokenizer.json", "'vocab'"]),
    ("tokenizer.json unk_id 999", C("text", "encode", "--t5", "{d}/t5", "a zebra"),
     t5_with(lambda t: t["model"].__setitem__("unk_id", 999)), 2,
     ["t5/tokenizer.json", "unk_id 999"]),
    ("tokenizer beyond the embedding", C("text", "encode", "--t5", "{d}/t5", "a zebra"),
     t5_with(lambda t: t["model"]["vocab"].extend([["\u2581zebra", -1.0]] * 2000)), 2,
     ["the tokenizer of {d}/t5", "2041 pieces, more than the 41 rows"]),
    ("vocab.json a list", C("clip", "score", "{two}", "--clip", "{d}/hf", "--captions",
                            "{d}/p.txt"), hf_clip(vocab=lambda v: list(v)), 2,
     ["vocab.json", "symbol -> id"]),
    ("merges.txt beyond vocab.json", C("clip", "score", "{two}", "--clip", "{d}/hf",
                                       "--captions", "{d}/p.txt"),
     hf_clip(merges=lambda m: m + "q z\n"), 2, ["merges.txt", "'qz'", "not in vocab.json"]),
    ("CLIP tokenizer beyond the embedding", C("clip", "score", "{two}", "--clip", "{d}/hf",
                                              "--captions", "{d}/p.txt"), hf_clip(), 2,
     ["{d}/hf", "2514 ids", "99"]),
    ("bad CLIP before sampling", S("--prompt", "a red circle", "--candidates", "2", "--clip",
                                   "{d}/hf", *PNG), hf_clip(vocab=lambda v: list(v)), 2,
     ["vocab.json", "symbol -> id"]),
    ("damaged stored BPE merges", C("clip", "score", "{two}", "--clip", "{d}/clip.pt",
                                    "--captions", "{d}/c.txt"),
     clip_meta(lambda m: swap_first_two(m["bpe_merges"])), 2,
     ["clip.pt", "bpe_merges", "checksum"]),
    ("damaged stored word list", S(*PROMPT, gpt="{d}/gpt.pt"),
     joint_meta(lambda t: swap_first_two(t["words"])), 2, ["gpt.pt", "words", "checksum"]),
    ("no stored word list", S(*PROMPT, gpt="{d}/gpt.pt"), joint_meta(lambda t: t.pop("words")),
     2, ["gpt.pt", "words"]),
    # 4. unknown words: a warning naming them
    ("unknown words", S("--prompt", "a purple elephant dancing in tuxedo", *PNG), nothing, 0,
     ["'purple'", "'elephant'", "'tuxedo'", "<unk>"]),
    ("unknown full stop", S("--prompt", "A red circle.", *PNG), nothing, 0, ["'circle.'"]),
    # 5. flags and numbers
    ("cfg 1e308 text", S("--cfg-scale", "1e308", *PROMPT), nothing, 2,
     ["--cfg-scale must be in [0, 1000]", "got 1e+308"]),
    ("cfg 1e40 class", S("--cfg-scale", "1e40", "--class", "1", *PNG, gpt="gpt", vq="class_vq"),
     nothing, 2, ["--cfg-scale must be in [0, 1000]"]),
    ("fp16 on a CPU text", S("--precision", "fp16", "--device", "cpu", *PROMPT), nothing, 2,
     ["--precision fp16", "CPU"]),
    ("fp16 on a CPU class", S("--precision", "fp16", "--device", "cpu", "--class", "1", *PNG,
                              gpt="gpt", vq="class_vq"), nothing, 2, ["--precision fp16", "CPU"]),
    ("caption-len 100000", C("train", *TRAIN_JOINT, "--caption-len", "100000", "--out-dir",
                             "{d}/o"), nothing, 2, ["--caption-len must be in [2, 1024]"]),
    ("scenes seed -1", C("scenes", "preview", "--seed", "-1", *PNG), nothing, 2,
     ["--seed must be in [0, "]),
    ("scenes size 100000", C("scenes", "preview", "--image-size", "100000", *PNG), nothing, 2,
     ["--image-size must be in [24, 1024]"]),
    ("damaged progress file", C("codes", "features", "--data", "{codes}", "--t5", "{t5}",
                                "--out", "{d}/f", "--length", "8"),
     damaged("f/parts/progress-0-of-1.json", '{"done": 3'), 2,
     ["progress-0-of-1.json cannot be read"]),
    ("damaged features.json", C("train", "--model", "nano", "--data", "{codes}", "--text",
                                "{d}/f", *SHORT, "--out-dir", "{d}/o"),
     damaged_features_json, 2, ["features.json cannot be read"]),
    # 6. CLIP below ten captions
    ("CLIP batch 1", C("train", *TRAIN_CLIP, "--batch-size", "1", "--out-dir", "{d}/o"), nothing,
     2, ["--batch-size 1", "10"]),
    ("CLIP batch 2", C("train", *TRAIN_CLIP, "--batch-size", "2", "--out-dir", "{d}/o"), nothing,
     2, ["--batch-size 2", "10"]),
    # 7. a file replaced
    ("scenes preview kept", C("scenes", "preview", *PNG), existing_png, 2,
     ["--out {d}/x.png already exists; pass --overwrite"]),
    # 8. lines that mislead: each says what is true
    ("empty prompt, cfg 0", S("--prompt", "", "--cfg-scale", "0", *PNG), nothing, 0, []),
    ("empty prompt", S("--prompt", "", *PNG), nothing, 2, ["an empty prompt", "--cfg-scale 0"]),
    ("per-prompt 0", S("--per-prompt", "0", *PROMPT), nothing, 2,
     ["--per-prompt must be at least 1, got 0"]),
    ("class codes with --text", C("train", "--model", "nano", "--data", "{class_codes}",
                                  "--text", "t5-nano", *SHORT, "--out-dir", "{d}/o"), nothing, 2,
     ["holds no captions.json"]),
    ("resume joint with features", C("train", "--model", "nano", "--data", "{codes}", "--text",
                                     "{feats}", "--resume", "--out-dir", "{d}/run",
                                     "--max-steps", "2", "--num-workers", "0"),
     copy_run("joint"), 2, ["--text", "differs from the checkpoint's t5-nano"]),
    ("--text t5-gigantic", C("train", *TRAIN_JOINT[:4], "--text", "t5-gigantic", *SHORT,
                             "--out-dir", "{d}/o"), nothing, 2,
     ["features folder 't5-gigantic' does not exist", "or name a T5 config: t5-nano"]),
    ("os.system pickle", S(*PNG, gpt="{d}/evil.pt"), evil_pickle, 2,
     ["evil.pt", "code", "was not run"]),
    ("os.system in torch.save", S(*PNG, gpt="{d}/evil2.pt"), evil_pickle, 2,
     ["evil2.pt", "code", "was not run"]),
    ("error names --out, not a temporary", C("codes", "features", "--data", "{codes}", "--t5",
                                             "{t5}", "--out", "{d}/f", "--length", "8"),
     lengths_is_a_folder, 2, ["{d}/f/lengths.npy"]),
    ("CLIP resume with other --data", C("train", *TRAIN_CLIP, "--batch-size", "10", "--data",
                                        "scenes:50", "--resume", "--out-dir", "{d}/run"),
     copy_run("clip"), 2, ["trains on --data scenes:40 (--with-heldout False)"]),
    ("CLIP resume with --with-heldout", C("train", *TRAIN_CLIP, "--batch-size", "10",
                                          "--with-heldout", "--resume", "--out-dir", "{d}/run"),
     copy_run("clip"), 2, ["--with-heldout"]),
]

MAINS = {"sample": sample.main, "train": train.main, "codes": codes.main, "clip": clip.main,
         "text": text.main, "scenes": scenes.main}


@pytest.mark.parametrize("name, command, make, code, words", CASES, ids=[c[0] for c in CASES])
def test_case_table(name, command, make, code, words, w, tmp_path, monkeypatch, capsys):
    d = str(tmp_path)
    make(d, w, monkeypatch)
    capsys.readouterr()
    tool, argv = command
    got, out, err = run_cli(MAINS[tool], argv(d, w), capsys)
    lines = [x for x in err.splitlines() if x.startswith(("error", "warning"))]
    line = lines[-1] if lines else ""
    outcome = f"OUTCOME code {got}: {line or err.strip()[-150:]!r}"
    assert got == code and "Traceback" not in err, outcome
    if code:  # one line, and nothing before it but progress bars
        assert line.startswith("error: ") and err.endswith(line + "\n") and len(lines) == 1, outcome
    assert all(x.format(d=d) in line for x in words), outcome
    assert not os.path.exists("/tmp/issue30-pwned")


# ------------------------------------------------------------------------------ the general rules
def parsers_of(main, argv):
    """The argparse parsers `main(argv)` builds, and the ranges it gives check_flags."""
    seen, ranges = [], {}
    real_parse, real_check = argparse.ArgumentParser.parse_args, common.check_flags

    class Stop(Exception):
        pass

    def parse(self, *a, **k):
        seen.append(self)
        return real_parse(self, *a, **k)

    def check(args, r=None, only_with=()):
        ranges.update(r or {})
        raise Stop
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", parse)
        for module in (sample, train, codes, clip, text, scenes, shapes, fid, demo, bench,
                       tokenizer):
            mp.setattr(module, "check_flags", check, raising=False)
        mp.setattr("sys.argv", ["x", *(argv or [])])
        with pytest.raises(Stop):
            main(argv) if argv is not None else main()
    numeric = set()
    for p in seen:
        for a in p._actions:
            subs = a.choices.values() if isinstance(a, argparse._SubParsersAction) else []
            numeric |= {b.dest for s in subs for b in s._actions if b.type in (int, float)
                        and b.nargs is None}
            if a.type in (int, float) and a.nargs is None:
                numeric.add(a.dest)
    return numeric, ranges


CLIS = [("sample", sample.main, []), ("train", train.main, ["--model", "nano", "--data", "x"]),
        ("codes", codes.main, ["features", "--data", "x", "--t5", "x", "--out", "x"]),
        ("clip", clip.main, ["score", "x", "--clip", "x", "--captions", "x"]),
        ("text", text.main, ["tokenize", "--tokenizer", "x", "a"]),
        ("scenes", scenes.main, ["check"]), ("shapes", shapes.main, ["preview"]),
        ("fid", fid.main, ["x", "y"]), ("demo", demo.main, None),
        ("bench", bench.main, []),
        ("tokenizer", tokenizer.main, ["--vq-ckpt", "x", "--data", "x"])]


@pytest.mark.parametrize("name, main, argv", CLIS, ids=[c[0] for c in CLIS])
def test_every_numeric_flag_has_a_range(name, main, argv, tmp_path, monkeypatch):
    """Every int or float flag of every CLI is a row of the ranges its check_flags call checks."""
    monkeypatch.chdir(tmp_path)
    numeric, ranges = parsers_of(main, argv)
    assert numeric and not numeric - set(ranges), numeric - set(ranges)


@pytest.mark.parametrize("argv, line", [
    (["--scenes", "5"], "--scenes only applies with --only t2i; drop it"),
    (["--only", "t2i", "--per-class", "3"], "--per-class only applies with --only c2i; drop it"),
])
def test_demo_refuses_the_other_halfs_knobs(argv, line, monkeypatch, capsys):
    """Each half's knobs only with that half: one line before anything trains."""
    monkeypatch.setattr("sys.argv", ["demo.py", *argv])
    code, out, err = run_cli(lambda _: demo.main(), [], capsys)
    assert (code, out, err) == (2, "", f"error: {line}\n")


def test_clip_validation_groups_are_exactly_ten(tmp_path, monkeypatch):
    """The CLIP figure "picks its caption among 10" is computed over groups of exactly ten: with
    15 held-out items and batches of 12, one group of ten is scored (the 5 others cannot be)."""
    groups = []
    real = clip.retrieval_accuracy

    def spy(image, text, ids, group=10):
        groups.extend(min(group, len(ids) - g) for g in range(0, len(ids), group))
        return real(image, text, ids, group)
    monkeypatch.setattr(clip, "retrieval_accuracy", spy)
    train.main([*TRAIN_CLIP[:-1], "15", "--batch-size", "12", "--max-steps", "1", "--out-dir",
                str(tmp_path / "o")])
    assert groups == [10]
