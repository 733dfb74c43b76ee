"""clip.py against the references it reimplements.

Fixtures in tests/data, recorded once outside the project with transformers 4.57.6 (tokenizers
0.22.2, safetensors 0.8.0, ftfy 6.3.1, torch 2.13 CPU) and OpenAI's CLIP repository
(clip/simple_tokenizer.py, clip/bpe_simple_vocab_16e6.txt.gz):
- clip_hf_tiny/ (config.json + model.safetensors): transformers' CLIPModel with a small random
  config (vision: 16 px, patch 4, width 32, 2 layers, 4 heads, MLP 37; text: vocab 99, context 12,
  width 24, 2 layers, 3 heads, MLP 40, eos_token_id 2 as OpenAI's config.json; projection 20;
  quick_gelu), torch.manual_seed(0), then every parameter plus 0.1 * randn so that no LayerNorm or
  bias is trivial, saved with save_pretrained. clip_parity.pt: its inputs (torch.Generator seed 1)
  and get_image_features, get_text_features and logits_per_image, fp32.
- clip_bpe/: the first 2000 merges of OpenAI's bpe_simple_vocab_16e6.txt.gz as HF's merges.txt +
  vocab.json (the vocabulary rebuilt as simple_tokenizer.py does) and as bpe_tiny.txt.gz.
  clip_tokens.json: 41 strings; "hf": ids of transformers' slow CLIPTokenizer on that vocabulary
  (ftfy installed, padding="max_length", max_length=77, truncation=True); "openai":
  SimpleTokenizer(bpe_tiny.txt.gz).encode (no specials).
- clip_released_keys.json: parameter count and state-dict keys/shapes of transformers' CLIPModel
  built on the meta device from the config.json values of openai/clip-vit-base-patch32 (the
  defaults of CLIPTextConfig / CLIPVisionConfig, projection 512) and openai/clip-vit-large-patch14
  (text width 768, 12 heads, MLP 3072; vision width 1024, 24 layers, 16 heads, MLP 4096, patch 14;
  projection 768).
- clip_preprocess.pt: CLIPImageProcessor(shortest_edge 16, crop 16) pixel_values of the 45 x 30
  test image made below (a crop margin of 8 px, where HF's and torchvision's offsets agree).
"""
import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

import clip
from common import UserError
from conftest import run_cli

DATA = os.path.join(os.path.dirname(__file__), "data")
BPE = os.path.join(DATA, "clip_bpe")


@pytest.fixture(scope="module")
def hf_tiny():
    return clip.CLIP.from_pretrained(os.path.join(DATA, "clip_hf_tiny"))


@pytest.fixture(scope="module")
def tokens():
    with open(os.path.join(DATA, "clip_tokens.json"), encoding="utf-8") as f:
        return json.load(f)


def test_hf_clipmodel_parity(hf_tiny):
    ref = torch.load(os.path.join(DATA, "clip_parity.pt"), weights_only=True)
    with torch.no_grad():
        image = hf_tiny.encode_image(ref["pixels"])
        text = hf_tiny.encode_text(ref["ids"])
        logits = hf_tiny(ref["pixels"], ref["ids"])
    torch.testing.assert_close(image, ref["image_embeds"], atol=1e-5, rtol=0)
    torch.testing.assert_close(text, ref["text_embeds"], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, ref["logits_per_image"], atol=1e-4, rtol=1e-5)
    assert hf_tiny.config.vision_mlp_dim == 37 and hf_tiny.config.text_mlp_dim == 40
    # the three rows end at positions 11, 5, 1: pooling must read exactly there, not at the last
    # slot
    changed = ref["ids"].clone()
    changed[2, 2:] = 7  # tokens after row 2's end cannot change its embedding (causal attention)
    with torch.no_grad():
        torch.testing.assert_close(hf_tiny.encode_text(changed)[2], text[2], atol=1e-6, rtol=0)
        hf_tiny.text_model.eot_id = 98  # naming the end id finds the same positions here
        try:
            torch.testing.assert_close(hf_tiny.encode_text(ref["ids"]), text, atol=0, rtol=0)
        finally:
            hf_tiny.text_model.eot_id = None


def test_tokenizer_matches_hf_and_openai(tokens):
    hf_layout = clip.Tokenizer.from_pretrained(BPE)
    openai_layout = clip.Tokenizer.from_pretrained(os.path.join(BPE, "bpe_tiny.txt.gz"))
    assert hf_layout.encoder == openai_layout.encoder  # vocab.json == the vocab rebuilt from merges
    # 512 byte symbols, 2000 merges, then the specials; with all 48894 merges they are 49406, 49407
    assert (hf_layout.sot, hf_layout.eot) == (2512, 2513)
    assert 2 * 256 + clip.MAX_MERGES == 49406
    assert len(tokens["strings"]) >= 30
    ids = hf_layout(tokens["strings"])
    for text, got, want in zip(tokens["strings"], ids.tolist(), tokens["hf"]):
        assert got == want, text
    for text, want in zip(tokens["strings"], tokens["openai"]):
        assert openai_layout.encode(text) == want, text


def test_tokenizer_padding_and_truncation(tokens):
    tok = clip.Tokenizer.from_pretrained(BPE)
    empty = tok("")[0].tolist()
    assert empty == [tok.sot] + [tok.eot] * 76  # HF pads with <|endoftext|>
    assert tok("", pad_id=0)[0].tolist() == [tok.sot, tok.eot] + [0] * 75  # OpenAI's padding
    long = next(s for s in tokens["strings"] if len(s) > 300)
    n = len(tok.encode(long))
    assert n > 75
    row = tok(long)[0].tolist()
    assert row[0] == tok.sot and row[-1] == tok.eot and row[1:-1] == tok.encode(long)[:75]
    with pytest.raises(UserError, match="over CLIP's context of 77"):
        tok(long, truncate=False)
    assert tok.decode(tok.encode("A red  Square, next to 2 circles!")) == \
        "a red square , next to 2 circles !"


def test_word_split_rules():
    """The stdlib pattern on the cases where \\w / \\d differ from \\p{L} / \\p{N}."""
    split = clip.word_pattern().findall
    assert split("x² ½ Ⅻ ① 12") == ["x", "²", "½", "Ⅻ", "①", "1", "2"]
    assert split("snake_case _!_ it's") == ["snake", "_", "case", "_!_", "it", "'s"]
    assert split("<|endoftext|>!") == ["<|endoftext|>", "!"]
    assert clip.clean_text("  it’s  “A&amp;amp;B”\n") == "it's \"a&b\""
    assert clip.clean_text("ﬁne ＡＢＣ\u3000x ǅ") == "fine abc x dž"  # ftfy 6.3's output


def test_ascii_separators_are_tokens_not_whitespace():
    """U+001C-U+001F are no Unicode White_Space, though Python's \\s and str.isspace() count them:
    Hugging Face's CLIPTokenizerFast (Rust regex) keeps U+001F as a token of its own between the two
    words of 'unit\\x1fseparator' (as reported in issue 28, point 8), and so does clip.py. The
    expected ids are read from the fixture's vocab.json: with its 2000 merges "unit" is spelt
    un + it</w> and "separator" se + par + ator</w>."""
    tok = clip.Tokenizer.from_pretrained(BPE)
    with open(os.path.join(BPE, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    sep = clip.byte_to_unicode()[0x1F] + "</w>"  # the byte-level symbol of 0x1f, ending a word
    want = [vocab["un"], vocab["it</w>"], vocab[sep], vocab["se"], vocab["par"], vocab["ator</w>"]]
    assert sep == "\u011f</w>" and tok.encode("unit\x1fseparator") == want
    # the old reading, U+001F as a space, is gone
    assert tok.encode("unit\x1fseparator") != tok.encode("unit separator") == want[:2] + want[3:]
    assert tok.encode("unit\u2003separator") == tok.encode("unit separator")  # an em space is one
    assert clip.clean_text(" \x1c a\u00a0\tb \x1f") == "\x1c a b \x1f"


def test_score_command_checks_its_flags(capsys):
    code, _, err = run_cli(clip.main, ["score", "s.npz", "--clip", "c.pt", "--captions", "c.txt",
                                       "--batch-size", 0], capsys)
    assert code == 2 and err == "error: --batch-size must be at least 1, got 0\n"


def test_released_configs_shapes():
    """Counts from transformers' CLIPModel built from the released config.json values (fixture)."""
    with open(os.path.join(DATA, "clip_released_keys.json")) as f:
        released = json.load(f)
    counts = {"ViT-B/32": 151_277_313, "ViT-L/14": 427_616_513}
    for name, count in counts.items():
        with torch.device("meta"):
            model = clip.CLIP(clip.clip_config(name))
        assert sum(p.numel() for p in model.parameters()) == count == released[name]["parameters"]
        ours = {k: list(v.shape) for k, v in model.state_dict().items()}
        theirs = {k: v for k, v in released[name]["keys"].items() if "position_ids" not in k}
        assert ours == theirs


def _test_image():
    from PIL import Image
    yy, xx = np.mgrid[0:30, 0:45]
    arr = np.stack([(xx * 7 + yy * 13) % 256, (xx * xx + yy * 3) % 256, (xx * yy) % 256], -1)
    return Image.fromarray(arr.astype(np.uint8))


def test_preprocess_matches_hf_and_tensor_path():
    image = _test_image()
    ref = torch.load(os.path.join(DATA, "clip_preprocess.pt"), weights_only=True)["pixel_values"]
    got = clip.preprocess(image, 16)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # the in-memory path on the same picture as [-1, 1] floats: only 8-bit rounding separates them
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    tensor = clip.preprocess_tensor(x, 16)[0]
    grey_level = 1 / 255 / min(clip.STD)
    assert (tensor - got).abs().mean() < 0.5 * grey_level
    assert (tensor - got).abs().max() < 6 * grey_level  # PIL clips overshoot at sharp edges
    torch.testing.assert_close(clip.preprocess_tensor(x[..., :16, :16], 16)[0],
                               clip.preprocess(image.crop((0, 0, 16, 16)), 16), atol=1e-5, rtol=0)


def test_contrastive_loss_closed_form():
    """Orthonormal pairs, scale s: each row's correct logit is s, the other N - 1 are 0, so both
    cross-entropies are log(1 + (N - 1) e^-s); past ln 100 the temperature is capped."""
    n, emb = 5, torch.eye(5, 8) * 3.0
    for s in (1.0, 3.0, 6.0):
        loss = clip.contrastive_loss(emb, emb, torch.tensor(math.log(s)))
        assert loss.item() == pytest.approx(math.log(1 + (n - 1) * math.exp(-s)), rel=1e-5)
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    scale = torch.tensor(math.log(500), requires_grad=True)
    capped = clip.contrastive_loss(a, b, scale)
    at_cap = clip.contrastive_loss(a, b, torch.tensor(math.log(100)))
    assert capped.item() == pytest.approx(at_cap.item())
    capped.backward()
    assert scale.grad.item() == 0.0  # no push beyond 100
    swapped = clip.contrastive_loss(emb, emb[[1, 0, 2, 3, 4]], torch.tensor(0.0))
    row = math.log(math.e + n - 1) - 0.0  # rows 0, 1 get their correct logit 0 instead of 1
    expect = (2 * row + 3 * math.log(1 + (n - 1) / math.e)) / n
    assert swapped.item() == pytest.approx(expect, rel=1e-5)


def test_rank_and_rerank(hf_tiny):
    torch.manual_seed(0)
    images = torch.rand(2 * 4, 3, 16, 16) * 2 - 1  # 2 prompts x 4 candidates, sampler's range
    ids = torch.load(os.path.join(DATA, "clip_parity.pt"), weights_only=True)["ids"][:2]
    scores = clip.rank(hf_tiny, images, ids, batch_size=3)
    with torch.no_grad():
        pixels = clip.preprocess_tensor(images, 16)
        img = nn.functional.normalize(hf_tiny.encode_image(pixels), dim=-1)
        txt = nn.functional.normalize(hf_tiny.encode_text(ids), dim=-1)
    torch.testing.assert_close(scores, 100 * (img.view(2, 4, -1) @ txt[:, :, None])[..., 0])
    fixed = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.7, 0.2, 0.7, 0.8]])
    start = torch.tensor([[0], [4]])  # kept row numbers: prompt p's candidate j is row p * 4 + j
    order, best = clip.keep_best(torch.arange(8), fixed, 1)
    assert (order - start).tolist() == [[1], [3]]
    assert best.flatten().tolist() == [pytest.approx(0.9), pytest.approx(0.8)]
    order, best = clip.keep_best(torch.arange(8), fixed, 4)  # N = K: all, ties in drawing order
    assert (order - start).tolist() == [[1, 2, 3, 0], [3, 0, 2, 1]]
    assert sorted(best.flatten().tolist()) == sorted(fixed.flatten().tolist())
    kept, kept_scores = clip.keep_best(images, fixed, 2)
    assert kept.shape == (2, 2, 3, 16, 16)
    assert torch.equal(kept[0, 0], images[1]) and torch.equal(kept[1, 1], images[4 + 0])
    assert torch.equal(clip.keep_best(images, fixed, 4)[0][0][[3, 0, 1, 2]], images[:4])
    with pytest.raises(UserError, match="--keep 5"):
        clip.keep_best(images, fixed, 5)


def test_own_checkpoint_round_trip(hf_tiny, tmp_path):
    path = str(tmp_path / "clip.pt")
    torch.save({"model": hf_tiny.state_dict(), "config": dataclasses.asdict(hf_tiny.config),
                "kind": "clip"}, path)
    again = clip.CLIP.from_pretrained(path)
    ids = torch.load(os.path.join(DATA, "clip_parity.pt"), weights_only=True)["ids"]
    # the .bin flavour of a HF folder, with the position_ids buffers older exports carry
    folder = tmp_path / "hf_bin"
    folder.mkdir()
    shutil.copy(os.path.join(DATA, "clip_hf_tiny", "config.json"), folder)
    sd = {**hf_tiny.state_dict(), "text_model.embeddings.position_ids": torch.arange(12)[None]}
    torch.save(sd, folder / "pytorch_model.bin")
    from_bin = clip.CLIP.from_pretrained(str(folder / "pytorch_model.bin"))
    with torch.no_grad():
        assert torch.equal(again.encode_text(ids), hf_tiny.encode_text(ids))
        assert torch.equal(from_bin.encode_text(ids), hf_tiny.encode_text(ids))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit, only to make the bad file
def test_bad_files_one_line(tmp_path):
    script = str(tmp_path / "ViT-B-32.pt")
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), script)
    gpt = str(tmp_path / "gpt.pt")
    torch.save({"model": {"w": torch.zeros(1)}, "config": {}, "kind": "gpt"}, gpt)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text('{"model_type": "t5"}')
    bare = str(tmp_path / "bare.pt")
    torch.save({"kind": "clip", "config": {}, "model": {"w": torch.zeros(1)}}, bare)
    cases = [(script, "TorchScript archive"), (gpt, "a 'gpt' checkpoint"),
             (str(junk), "cannot read"), (str(t5), "not CLIP"), (str(tmp_path), "no config.json"),
             (bare, "holds no CLIP weights"),
             (os.path.join(BPE), "no config.json")]
    for path, message in cases:
        with pytest.raises(UserError, match=message) as e:
            clip.CLIP.from_pretrained(path)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="vocab.json"):
        clip.Tokenizer.from_pretrained(str(tmp_path))


def test_hf_config_defaults(tmp_path):
    """Keys a config.json leaves out take transformers' defaults (ViT-B/32's; eos_token_id 49407 in
    transformers 4.57), so a bare file describes B/32 pooled at the first <|endoftext|>."""
    (tmp_path / "config.json").write_text('{"model_type": "clip"}')
    assert clip.hf_config(str(tmp_path)) == clip.clip_config("ViT-B/32", eot_id=49407,
                                                             vision_mlp=3072, text_mlp=2048)
    tiny = clip.hf_config(os.path.join(DATA, "clip_hf_tiny"))
    assert (tiny.eot_id, tiny.context_length, tiny.patch_size, tiny.embed_dim) == (None, 12, 4, 20)
