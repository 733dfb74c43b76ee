"""The built-in CLIP: its tokenizer, its training stage (negatives gathered across ranks), and what
uses it: DALL-E's re-ranking in sample.py and the CLIP score of clip.py."""
import dataclasses
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import clip
import sample
import scenes
import train
from codes import CodesReceipt
from common import UserError, from_uint8, save_atomic, to_uint8
from conftest import ENV, ROOT, run_cli
from model import GPT, gpt_config
from shapes import CLASS_NAMES
from tokenizer import VQModel, tokenizer_checksum, vq_config

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ the tokenizer
def test_word_level_bpe_of_the_built_in_world():
    tok = clip.Tokenizer.from_words(scenes.VOCABULARY)
    again = clip.Tokenizer.from_words(reversed(scenes.VOCABULARY))
    assert tok.merges == again.merges  # a function of the word set, not of its order
    # 512 byte symbols, one symbol per merge, the two specials last: <|endoftext|> is the top id
    assert len(tok.encoder) == 512 + len(tok.merges) + 2 and tok.eot == len(tok.encoder) - 1
    for word in scenes.VOCABULARY:  # every word of the world is one token
        assert len(tok.encode(word)) == 1, word
    caption = "a red circle to the left of three yellow triangles at the top right"
    assert len(tok.encode(caption)) == len(caption.split())
    odd = "A photo depicts: 2 Purple hexagons!"  # outside the vocabulary: byte pieces, not errors
    assert tok.decode(tok.encode(odd)) == "a photo depicts : 2 purple hexagons !"
    assert len(tok.encode("hexagon")) > 1


# -------------------------------------------------------------------------- training (one minute)
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """CLIP-tiny trained by train.py in-process: 150 steps of 32 scenes (half a minute on an idle
    2-core VM)."""
    out = tmp_path_factory.mktemp("clip") / "run"
    train.main(["--model", "CLIP-tiny", "--data", "scenes:5000", "--max-steps", "150",
                "--batch-size", "32", "--lr", "1e-3", "--warmup-steps", "20", "--val-size", "100",
                "--eval-interval", "150", "--log-interval", "50", "--num-workers", "0",
                "--out-dir", str(out)])
    return str(out / "ckpt.pt")


def test_trained_clip_picks_the_right_caption_among_ten(trained):
    """Fresh scenes (another seed), in 20 groups of 10: the image's most similar caption of its
    group is its own (or spelt the same) for at least 30% of them, three times chance (10%);
    captions such as "a star" fit several scenes, so the ceiling is well under 100%. It trains on
    the pixels rank() gives it (CLIP's normalisation): on raw [-1, 1] ones it does worse."""
    model, tok = clip.load(trained)
    world = scenes.CaptionedScenes(200, 32, seed=123)
    images = torch.stack([world[i][0] for i in range(200)])
    ids = tok([world.caption(i) for i in range(200)], context_length=model.config.context_length)
    with torch.no_grad():
        text = model.encode_text(ids)
        acc = clip.retrieval_accuracy(model.encode_image(clip.preprocess_tensor(images, 32)),
                                      text, ids)
        raw = clip.retrieval_accuracy(model.encode_image(images), text, ids)
    print(f"right caption among 10: {acc.item():.0%} ([-1, 1] pixels: {raw.item():.0%})")
    assert acc.item() >= 0.30 and acc.item() > raw.item()
    # the checkpoint is what sample.py and clip.py score load: a CLIP with its own tokenizer
    assert tok.merges == clip.Tokenizer.from_words(scenes.VOCABULARY).merges
    assert model.config.vocab_size == len(tok.encoder)


def test_clip_score_cli_prefers_the_true_captions(trained, tmp_path, capsys):
    """clip.py score on renders of the built-in world: their own captions score higher than the
    same captions shuffled; both figures equal clip.clip_score on the same pixels."""
    world = scenes.CaptionedScenes(60, 32, seed=7)
    images = torch.stack([world[i][0] for i in range(60)])
    captions = [world.caption(i) for i in range(60)]
    np.savez(tmp_path / "s.npz", to_uint8(images))
    (tmp_path / "true.txt").write_text("\n".join(captions) + "\n")
    shuffled = captions[1:] + captions[:1]
    (tmp_path / "shuffled.txt").write_text("\n".join(shuffled))
    got = {}
    for name in ("true", "shuffled"):
        code, out, _ = run_cli(clip.main, ["score", str(tmp_path / "s.npz"), "--clip", trained,
                                           "--captions", str(tmp_path / f"{name}.txt"),
                                           "--prefix", "", "--batch-size", 16], capsys)
        assert code == 0, out
        got[name] = float(out.split("LlamaGen, GigaGAN): ")[1].split()[0])
    assert got["true"] > got["shuffled"] + 5
    model, tok = clip.load(trained)
    ref = clip.clip_score(model, from_uint8(to_uint8(images)), captions, tok, prefix="")
    assert got["true"] == pytest.approx(ref["clip_score"], abs=1e-3)
    code, _, err = run_cli(clip.main, ["score", str(tmp_path / "s.npz"), "--clip", trained,
                                       "--captions", str(tmp_path / "short.txt")], capsys)
    assert code == 2 and "short.txt: cannot read it" in err
    (tmp_path / "short.txt").write_text("a star\n")
    code, _, err = run_cli(clip.main, ["score", str(tmp_path / "s.npz"), "--clip", trained,
                                       "--captions", str(tmp_path / "short.txt")], capsys)
    assert code == 2 and "1 captions for 60 images" in err and err.count("\n") == 1
    code, _, err = run_cli(clip.main, ["score", str(tmp_path / "s.npz"), "--clip", trained], capsys)
    assert code == 2 and "the following arguments are required: --captions" in err


def test_clip_stage_refuses_other_data_and_flags(tmp_path, capsys):
    cases = [(["--model", "CLIP-tiny", "--data", "synthetic:100"], "CLIP trains on the built-in"),
             (["--model", "CLIP-tiny", "--data", "scenes", "--image-size", "32"],
              "--image-size only applies to the tokenizer stage"),
             (["--model", "VQ-tiny", "--data", "synthetic:100", "--with-heldout"],
              "--with-heldout only applies with --data scenes[:N]"),
             (["--model", "CLIP-tiny", "--data", "scenes", "--fsdp"], "drop --fsdp")]
    for argv, message in cases:
        code, _, err = run_cli(train.main, [*argv, "--out-dir", tmp_path / "o"], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_clip_stage_resumes_exactly(tmp_path):
    """Stopped at step 2 and resumed to 4: the same weights as 4 steps in one go."""
    base = ["--model", "CLIP-tiny", "--data", "scenes:200", "--batch-size", "10", "--val-size",
            "20", "--num-workers", "0", "--log-interval", "1", "--ckpt-interval", "2"]
    train.main(base + ["--max-steps", "4", "--out-dir", str(tmp_path / "whole")])
    train.main(base + ["--max-steps", "2", "--out-dir", str(tmp_path / "cut")])
    train.main(base + ["--max-steps", "4", "--out-dir", str(tmp_path / "cut"), "--resume"])
    a = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 4 and a["meta"] == b["meta"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=0)


# ------------------------------------------------------------------ negatives gathered across ranks
TINY = """
import sys
import torch
sys.path.insert(0, {root!r})
import clip


def tiny_clip():
    torch.manual_seed(0)
    return clip.CLIP(clip.CLIPConfig(embed_dim=8, image_size=8, patch_size=4, vision_width=16,
                                     vision_layers=1, vision_heads=2, context_length=6,
                                     vocab_size=20, text_width=16, text_layers=1, text_heads=2))


def batch():
    g = torch.Generator().manual_seed(1)
    pixels, ids = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 18, (8, 6), generator=g)
    ids[:, 4] = 19  # <|endoftext|>, the highest id, where the text tower pools
    return pixels, ids
"""

RANK = """
import os
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
torch.set_num_threads(1)
dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR/PORT from the environment
rank = dist.get_rank()
model = DDP(tiny_clip())
pixels, ids = batch()
mine = slice(4 * rank, 4 * rank + 4)  # rank r holds pairs 4r..4r+3 of the global batch
loss = clip.distributed_contrastive_loss(*model(pixels[mine], ids[mine], return_embeddings=True))
loss.backward()  # DDP averages the two ranks' gradients, as in training
if rank == 0:
    torch.save({{"loss": loss.detach(), "grads": {{n: p.grad for n, p in
                                                 model.module.named_parameters()}}}}, {out!r})
dist.barrier()  # neither rank closes its connections while the other still uses them
dist.destroy_process_group()
os._exit(0)  # skip interpreter teardown, where gloo's threads can abort a finished rank
"""


@pytest.mark.subprocess
def test_two_ranks_gathered_loss_and_gradients_equal_one_process(tmp_path):
    """2 gloo ranks of 4 pairs each, negatives gathered, under DDP: the loss and every gradient
    equal one process's over the 8 pairs. (Detaching the other rank's embeddings instead would
    leave the towers 1/2 of their gradient after DDP's average.)"""
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    script = tmp_path / "rank.py"
    script.write_text(TINY.format(root=ROOT) + RANK.format(out=out))
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r)},
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in ranks]
    assert all(p.returncode == 0 for p in ranks), errors
    got = torch.load(out, weights_only=True)
    here = {}
    exec(TINY.format(root=ROOT), here)
    model = here["tiny_clip"]()
    pixels, ids = here["batch"]()
    loss = clip.contrastive_loss(*model(pixels, ids, return_embeddings=True))
    loss.backward()
    assert got["loss"].item() == pytest.approx(loss.item(), abs=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert model.logit_scale.grad.abs().item() > 1e-4  # the temperature's gradient is compared too


# ------------------------------------------------------------ fixed embeddings: score and re-rank
class FixedCLIP(nn.Module):
    """A stand-in CLIP with embeddings set by hand: an image's is its three normalised channel
    means (constant-colour images make them exact), a text's the row of `texts` its first token
    names. The tokenizer records what it was asked to encode."""

    def __init__(self, texts):
        super().__init__()
        self.config = clip.CLIPConfig(image_size=8, patch_size=4, context_length=4)
        self.table = nn.Parameter(torch.tensor(list(texts.values()), dtype=torch.float32))
        self.names, self.seen = list(texts), []

    def encode_image(self, pixels):
        return pixels.mean((2, 3))

    def encode_text(self, ids):
        return self.table[ids[:, 0]]

    def tokenizer(self, texts, context_length):
        self.seen += texts
        return torch.tensor([[self.names.index(t), 0, 0, 0][:context_length] for t in texts])


def constant(colours):
    """uint8 images (n, 8, 8, 3) of one colour each, and their CLIP-normalised channel values."""
    u8 = np.array(colours, np.uint8)[:, None, None, :].repeat(8, 1).repeat(8, 2)
    # from_uint8 puts level v at v / 127.5 - 1; CLIP maps [-1, 1] back to [0, 1] (v / 255), then
    # takes (x - mean) / std per channel
    return u8, (np.array(colours) / 255 - np.array(clip.MEAN)) / np.array(clip.STD)


def test_clip_score_equals_the_hand_computation():
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120)]
    u8, feats = constant(colours)
    texts = {"A photo depicts red": [1.0, -0.5, -0.5], "A photo depicts green": [-0.5, 1.0, -0.5],
             "A photo depicts blue": [0.2, 0.1, 1.0], "A photo depicts grey": [-1.0, -1.0, -1.0]}
    model = FixedCLIP(texts)
    got = clip.clip_score(model, from_uint8(u8), ["red", "green", "blue", "grey"],
                          model.tokenizer, batch_size=3)
    vectors = np.array(list(texts.values()))
    cos = (feats * vectors).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(vectors, axis=1)
    assert cos.min() < 0  # the grey pair is anti-aligned: CLIPScore clips it to 0
    assert got["count"] == 4 and model.seen == list(texts)  # the prefix, then the caption
    assert got["clip_score"] == pytest.approx(100 * cos.mean(), abs=1e-4)
    assert got["clipscore"] == pytest.approx(100 * np.mean(2.5 * np.maximum(cos, 0)), abs=1e-4)
    with pytest.raises(UserError, match="3 captions for 4 images"):
        clip.clip_score(model, torch.zeros(4, 3, 8, 8), ["red", "green", "blue"], model.tokenizer)


def test_rerank_candidates_keeps_the_top_scoring():
    """2 prompts x 4 candidates. K = 1: each prompt's best by hand-computed cosine; K = N: all four,
    pixels untouched, best first; the scores are 100 x those cosines."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (150, 150, 40),  # prompt 0's
               (40, 40, 40), (30, 220, 60), (220, 220, 30), (200, 30, 200)]  # prompt 1's
    u8, feats = constant(colours)
    texts = {"a red thing": [1.0, -0.5, -0.5], "a green thing": [-0.5, 1.0, -0.5]}
    model = FixedCLIP(texts)
    vectors = np.array(list(texts.values()))
    cos = np.stack([[f @ vectors[p] / np.linalg.norm(f) / np.linalg.norm(vectors[p])
                     for f in feats[4 * p:4 * p + 4]] for p in range(2)])
    kept, scores = clip.rerank_candidates(u8, list(texts), model, 1)
    best = cos.argmax(1)
    assert kept.shape == (2, 8, 8, 3) and (best == [0, 1]).all()
    np.testing.assert_array_equal(kept, u8[[best[0], 4 + best[1]]])
    np.testing.assert_allclose(scores.numpy()[:, 0], 100 * cos.max(1), atol=1e-3)
    everything, all_scores = clip.rerank_candidates(u8, list(texts), model, 4)
    for p in range(2):
        order = np.argsort(-cos[p], kind="stable")
        np.testing.assert_array_equal(everything[4 * p:4 * p + 4], u8[4 * p + order])
        np.testing.assert_allclose(all_scores.numpy()[p], 100 * cos[p][order], atol=1e-3)
    with pytest.raises(UserError, match="do not split evenly"):
        clip.rerank_candidates(u8[:7], list(texts), model, 1)


# --------------------------------------------------------------------- sample.py --candidates
@pytest.fixture(scope="module")
def class_models(tmp_path_factory):
    """A random tiny tokenizer + class GPT whose receipt names the built-in classes, and the same
    GPT saved as an official file (no names)."""
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    vq = VQModel(vq_config("VQ-tiny", codebook_size=32))
    save_atomic(dict(model=vq.state_dict(), config=dataclasses.asdict(vq.config), kind="vq"),
                d / "vq.pt")
    gpt = GPT(gpt_config("nano", n_layer=1, dim=32, n_head=1, vocab_size=32, block_size=64,
                         num_classes=10))
    meta = CodesReceipt(vocab_size=32, grid=(8, 8), image_size=32, n_aug=2, count=100,
                        tokenizer_checksum=tokenizer_checksum(vq), ten_crop=False,
                        crop_range=None, codes_dtype="uint16", labels_dtype="int16",
                        data="synthetic:100", num_classes=10, classes=tuple(CLASS_NAMES)).to_dict()
    save_atomic(dict(model=gpt.state_dict(), config=dataclasses.asdict(gpt.config), kind="gpt",
                     meta=meta), d / "gpt.pt")
    save_atomic(dict(model=gpt.state_dict(), config=dataclasses.asdict(gpt.config), kind="gpt",
                     meta={}), d / "nameless.pt")
    return {p.stem: str(p) for p in d.iterdir()}


def test_sample_candidates_grid_keeps_the_best_in_rank_order(class_models, trained, tmp_path,
                                                             capsys):
    m = class_models
    base = ["--gpt-ckpt", m["gpt"], "--vq-ckpt", m["vq"], "--class", "0", "1", "--batch-size", 6]
    code, out, err = run_cli(sample.main, [*base, "--candidates", 3, "--keep", 2, "--clip", trained,
                                           "--out", tmp_path / "g.png"], capsys)
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("  a ")]
    assert [r.split(":")[0].strip() for r in rows] == ["a red circle", "a green square"]
    for r in rows:  # two kept per class, best first
        s = [float(v) for v in r.split(":")[1].split()]
        assert len(s) == 2 and s[0] >= s[1]
    from PIL import Image
    assert np.asarray(Image.open(tmp_path / "g.png")).shape[:2] == (2 * 34 + 2, 2 * 34 + 2)
    refused = [(["--keep", 2], "--keep only applies with --candidates"),
               (["--candidates", 2, "--keep", 3, "--clip", trained], "--keep 3 must be between"),
               (["--candidates", 2, "--per-class", 2, "--clip", trained], "--per-class and"),
               (["--candidates", 2, "--num-samples", 4, "--cfg-scale", 1, "--keep", 2,
                 "--clip", trained], "each sample is the best 1")]
    for extra, message in refused:
        code, _, err = run_cli(sample.main, [*base, *extra, "--out", tmp_path / "x.png"], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
    code, _, err = run_cli(sample.main, ["--gpt-ckpt", m["nameless"], "--vq-ckpt", m["vq"],
                                         "--image-size", 32, "--candidates", 2, "--clip", trained,
                                         "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "carries no class names" in err
    assert sorted(os.listdir(tmp_path)) == ["g.png"]


def test_sample_npz_keeps_the_best_of_n_per_sample(class_models, trained, tmp_path, capsys):
    """--num-samples with --candidates 3: each stored image is the CLIP-best of the 3 drawn for its
    label from that batch's generator."""
    m = class_models
    argv = ["--gpt-ckpt", m["gpt"], "--vq-ckpt", m["vq"], "--num-samples", 4, "--cfg-scale", 1,
            "--batch-size", 4, "--class", 0, 1, "--labels", "balanced", "--candidates", 3,
            "--clip", trained, "--out", tmp_path / "s.npz"]
    code, _, err = run_cli(sample.main, argv, capsys)
    assert code == 0, err
    with np.load(tmp_path / "s.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (4, 32, 32, 3) and labels.tolist() == [0, 1, 0, 1]
    gpt, vq = GPT.from_pretrained(m["gpt"]).eval(), VQModel.from_pretrained(m["vq"]).eval()
    gen = torch.Generator().manual_seed(sample.batch_seed(0, 0))
    many = torch.tensor(labels).repeat_interleave(3)
    drawn = np.concatenate([sample.sample_images(gpt, vq, many[i:i + 4], generator=gen,
                                                 top_k=0) for i in range(0, 12, 4)])
    model, tok = clip.load(trained)
    texts = [f"a {CLASS_NAMES[k]}" for k in labels]
    best, _ = clip.rerank_candidates(drawn, texts, model, 1, tok)
    np.testing.assert_array_equal(images, best)


def test_rerank_sweep_best_of_one_is_the_first_draw(trained):
    """bench.py's DALL-E figure at a tiny size: N = 1 grades each prompt's first candidate as
    drawn; every row has the six tasks, and the cost per kept image grows with N."""
    import bench
    prompts = scenes.benchmark_prompts(1)
    def generate(prompts, n, seed):  # true renders of each prompt, seeded
        rng = np.random.default_rng(seed)
        return np.stack([np.asarray(scenes.render(scenes.scene_for(p["spec"], 32, rng), 32))
                         for p in prompts for _ in range(n)])
    model, tok = clip.load(trained)
    rows = bench.rerank_sweep(generate, model, tok, prompts, ns=(1, 4))
    first = generate(prompts, 4, 0)[::4]  # the same draws: candidate 0 of each prompt
    assert rows[0]["overall"] == pytest.approx(scenes.score(list(first), prompts)["overall"])
    assert [r["n"] for r in rows] == [1, 4] and all(set(scenes.TASKS) <= set(r) for r in rows)
    assert rows[1]["s_per_kept"] > rows[0]["s_per_kept"]
