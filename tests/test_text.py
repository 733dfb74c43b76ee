"""text.py: safetensors I/O, Hugging Face folders, T5 encoder, unigram tokenizer, caption cleaning.

Fixtures in tests/data/, recorded once in a scratch virtual environment outside the project:
- t5_tiny*/ and t5_tiny_expected.pt: transformers 5.24.0 (torch 2.13 CPU), torch.manual_seed(0),
  T5Config(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=40, num_layers=2,
  num_decoder_layers=1, feed_forward_proj="gated-gelu", 32 buckets, max_distance 128);
  relative_attention_bias re-drawn N(0, 1) and layer norms U(0.5, 1.5) so that both matter.
  t5_tiny/ is T5ForConditionalGeneration.save_pretrained (decoder included; lm_head is tied to
  shared.weight, so not stored; one model.safetensors). t5_tiny_sharded/ is T5EncoderModel
  .save_pretrained(max_shard_size="30KB") (3 shards + index). t5_tiny_bin/ is torch.save of the
  T5EncoderModel state dict (shared.weight and encoder.embed_tokens.weight both present).
  Expected: T5EncoderModel last_hidden_state in eval mode for ids from
  torch.Generator().manual_seed(1) randint(3, 64), 3 x 150 tokens, valid lengths 150, 97, 5
  (pad id 0 after), attention_mask 1/0.
- spm_tiny/: sentencepiece 0.2.3 SentencePieceTrainer (unigram, vocab 300, pad 0, </s> 1, unk 2,
  no bos, nmt_nfkc, character_coverage 1.0) on 4000 synthetic captions (random.Random(0):
  article + adjective + object + verb + place, made-up syllable words, a few accented words).
  tokenizer.json: transformers 5.24.0 T5TokenizerFast.from_pretrained on that spiece.model, then
  save_pretrained (tokenizers 0.23.3; its 100 <extra_id_*> tokens included). Its normalizer's
  240 KB "precompiled_charsmap" string was emptied before committing: text.py never reads it (it
  applies NFKC itself). expected.json: ids from sentencepiece encode() + [1] and from the HF
  tokenizer, plus HF padding="max_length", max_length=16, truncation=True, on 40 hard strings.
- clean_caption_expected.json: LlamaGen language/t5.py T5Embedder.clean_caption applied twice (as
  its text_preprocessing does), with ftfy 6.3.1 and beautifulsoup4 4.15.0, on 26 captions.
"""
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

import text
from common import UserError
from text import (T5_CONFIGS, T5Encoder, TextEncoder, UnigramTokenizer, clean_caption,
                  load_hf_state_dict, nmt_nfkc, read_safetensors, relative_position_bucket,
                  t5_config, write_safetensors)

DATA = os.path.join(os.path.dirname(__file__), "data")
T5_DIRS = ["t5_tiny", "t5_tiny_sharded", "t5_tiny_bin"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def expected():
    return torch.load(os.path.join(DATA, "t5_tiny_expected.pt"), weights_only=True)


# --------------------------------------------------------------------------------------- T5 shapes
def test_flan_t5_xl_parameter_count_and_official_keys():
    with torch.device("meta"):
        model = T5Encoder(t5_config("flan-t5-xl"))
    assert sum(p.numel() for p in model.parameters()) == 1_223_527_424
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 2 + 24 * 9 + 1  # shared, final norm, 9 per block, block 0's bias table
    assert shapes["shared.weight"] == [32128, 2048]
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert shapes[bias] == [32, 32]
    assert shapes["encoder.final_layer_norm.weight"] == [2048]
    for i in (0, 23):
        b = f"encoder.block.{i}.layer."
        for proj in "qkvo":
            assert shapes[f"{b}0.SelfAttention.{proj}.weight"] == [2048, 2048]
        assert shapes[f"{b}0.layer_norm.weight"] == shapes[f"{b}1.layer_norm.weight"] == [2048]
        ffn = f"{b}1.DenseReluDense."
        assert shapes[ffn + "wi_0.weight"] == shapes[ffn + "wi_1.weight"] == [5120, 2048]
        assert shapes[ffn + "wo.weight"] == [2048, 5120]
    assert [k for k in shapes if "relative_attention_bias" in k] == [bias]


@pytest.mark.parametrize("name", list(T5_CONFIGS))
def test_parameter_count_closed_form(name):
    """V d + L (4 d H d_kv + 3 d d_ff + 2 d) + 32 H + d, the count read off the architecture."""
    c = t5_config(name)
    with torch.device("meta"):
        model = T5Encoder(c)
    inner = c.num_heads * c.d_kv
    block = 4 * c.d_model * inner + 3 * c.d_model * c.d_ff + 2 * c.d_model
    closed = (c.vocab_size * c.d_model + c.num_layers * block
              + c.relative_attention_num_buckets * c.num_heads + c.d_model)
    assert sum(p.numel() for p in model.parameters()) == closed


def test_relative_position_buckets_by_hand():
    """16 buckets per sign; |offset| < 8 exact; else 8 + floor(log(|d| / 8) / log(16) * 8), at most
    15. E.g. 12: log(1.5) / log(16) * 8 = 1.17 -> 9; 31: 3.91 -> 11; 32: exactly 4 -> 12."""
    offsets = torch.tensor([0, 1, -1, 7, -7, 8, -8, 12, -12, 31, 32, -32, 127, 128, 1000, -1000])
    want = [0, 17, 1, 23, 7, 24, 8, 25, 9, 27, 28, 12, 31, 31, 31, 15]
    assert relative_position_bucket(offsets).tolist() == want


# ------------------------------------------------------------------------------ T5 vs transformers
@pytest.mark.parametrize("folder", T5_DIRS)
def test_t5_encoder_matches_transformers(folder, expected):
    """Single file (with a decoder to skip), 3 shards + index, and a .bin: transformers' outputs to
    1e-5, over 150 tokens (offsets beyond max_distance 128) with two padded rows."""
    model = T5Encoder.from_pretrained(os.path.join(DATA, folder))
    with torch.no_grad():
        h = model(expected["ids"], expected["mask"])
    torch.testing.assert_close(h, expected["hidden"], atol=1e-5, rtol=0)


def test_three_layouts_give_identical_weights():
    sds = [T5Encoder.from_pretrained(os.path.join(DATA, d)).state_dict() for d in T5_DIRS]
    assert set(sds[0]) == set(sds[1]) == set(sds[2])
    assert all(torch.equal(sds[0][k], sd[k]) for sd in sds[1:] for k in sds[0])


def test_sharded_bin_with_index(tmp_path):
    """pytorch_model-0000N-of-00002.bin + pytorch_model.bin.index.json (DeepFloyd's T5 layout, which
    LlamaGen downloads): the single .bin's weights, each key read from the shard the index names."""
    sd = torch.load(os.path.join(DATA, "t5_tiny_bin", "pytorch_model.bin"), weights_only=True)
    names = sorted(sd)
    weight_map = {}
    for i, part in enumerate([names[::2], names[1::2]]):
        file = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, tmp_path / file)
        weight_map.update({k: file for k in part})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got = load_hf_state_dict(str(tmp_path), keep=lambda k: "block.1" in k)
    assert set(got) == {k for k in sd if "block.1" in k}
    assert all(torch.equal(got[k], sd[k]) for k in got)


def test_decoder_skipped_and_weights_memory_mapped():
    path = os.path.join(DATA, "t5_tiny", "model.safetensors")
    header, _, _, _ = text.read_safetensors_header(path)
    assert any(k.startswith("decoder.") for k in header)
    sd = load_hf_state_dict(os.path.join(DATA, "t5_tiny"),
                            keep=lambda k: not k.startswith(("decoder.", "lm_head")))
    assert sd and not any(k.startswith(("decoder.", "lm_head")) for k in sd)
    model = T5Encoder.from_pretrained(os.path.join(DATA, "t5_tiny"))
    # float32 file, float32 model: every parameter is a view into the one mapping of the whole file
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1
    assert model.shared.weight.untyped_storage().nbytes() == os.path.getsize(path)


def test_padding_is_invisible_to_valid_tokens(expected):
    """A 5-token caption padded to 150 gives, on its 5 tokens, what it gives alone; padding ids do
    not matter."""
    model = T5Encoder.from_pretrained(os.path.join(DATA, "t5_tiny"))
    ids, mask = expected["ids"][2:3], expected["mask"][2:3]
    other = torch.where(mask.bool(), ids, torch.full_like(ids, 17))
    with torch.no_grad():
        alone = model(ids[:, :5])
        padded, padded2 = model(ids, mask)[:, :5], model(other, mask)[:, :5]
    torch.testing.assert_close(padded, alone, atol=1e-6, rtol=0)
    assert torch.equal(padded, padded2)


def test_bf16_close_to_fp32_and_dropout_only_in_training(expected):
    model = T5Encoder.from_pretrained(os.path.join(DATA, "t5_tiny"), dtype=torch.bfloat16)
    assert model.shared.weight.dtype == torch.bfloat16
    with torch.no_grad():
        h = model(expected["ids"], expected["mask"])
        ref = expected["hidden"]
        assert h.dtype == torch.bfloat16
        assert ((h.float() - ref).norm() / ref.norm()).item() < 0.05
        model.float().train()
        a, b = model(expected["ids"], expected["mask"]), model(expected["ids"], expected["mask"])
    assert not torch.equal(a, b)  # dropout 0.1 (config.json) draws new masks each call


# ------------------------------------------------------------------------------------- safetensors
def test_safetensors_round_trip_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g) * 20
    tensors = {str(d).removeprefix("torch."): base.to(d) for d in text.ST_DTYPES.values()
               if d not in (torch.complex64, getattr(torch, "float8_e8m0fnu", None))}
    tensors["complex"] = torch.complex(base, -base)
    tensors["scalar"], tensors["empty"] = torch.tensor(2.5), torch.zeros(0, 7)
    path = str(tmp_path / "x.safetensors")
    write_safetensors(tensors, path, metadata={"format": "pt"})
    back = read_safetensors(path)
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        as_bytes = back[k].reshape(-1).view(torch.uint8)
        assert torch.equal(as_bytes, t.reshape(-1).view(torch.uint8)), k
    assert text.read_safetensors_header(path)[1] == {"format": "pt"}
    assert read_safetensors(path, keep=lambda k: k == "bfloat16").keys() == {"bfloat16"}


def _header_bytes(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    return raw, n


def test_bad_safetensors_files(tmp_path):
    good = str(tmp_path / "good.safetensors")
    write_safetensors({"a": torch.ones(4, 4), "b": torch.zeros(8)}, good)
    raw, n = _header_bytes(good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:-10])
    with pytest.raises(UserError, match=r"cut.safetensors: tensor '\w' ends at byte .* truncated"):
        read_safetensors(str(cut))
    (tmp_path / "stub.safetensors").write_bytes(raw[:5])
    with pytest.raises(UserError, match="stub.safetensors: truncated"):
        read_safetensors(str(tmp_path / "stub.safetensors"))
    header = json.loads(raw[8: 8 + n])
    header["a"]["shape"] = [4, 5]  # 80 bytes claimed, 64 stored
    lie = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    (tmp_path / "lie.safetensors").write_bytes(struct.pack("<Q", n) + lie + raw[8 + n:])
    with pytest.raises(UserError, match=r"lie.safetensors: tensor 'a'.*\[4, 5\].*lies about the"):
        read_safetensors(str(tmp_path / "lie.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 4) + b"{{{{" + raw[8 + n:])
    with pytest.raises(UserError, match="junk.safetensors: bad safetensors header"):
        read_safetensors(str(tmp_path / "junk.safetensors"))


def test_missing_shard_and_wrong_shape(tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(os.path.join(DATA, "t5_tiny_sharded"), folder)
    os.remove(folder / "model-00002-of-00003.safetensors")
    with pytest.raises(UserError, match=r"names shard 'model-00002-of-00003.safetensors', which "
                                        "is missing"):
        T5Encoder.from_pretrained(str(folder))
    single = tmp_path / "single"
    shutil.copytree(os.path.join(DATA, "t5_tiny"), single)
    cfg = json.loads((single / "config.json").read_text())
    (single / "config.json").write_text(json.dumps({**cfg, "d_ff": 48}))
    with pytest.raises(UserError, match=r"model.safetensors: tensor 'encoder.block.0.layer.1."
                                        r"DenseReluDense.wi_0.weight' has shape \[40, 32\], "
                                        r"config.json implies \[48, 32\]"):
        T5Encoder.from_pretrained(str(single))


# --------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def spm_cases():
    with open(os.path.join(DATA, "spm_tiny", "expected.json"), encoding="utf-8") as f:
        return json.load(f)["cases"]


def test_tokenizer_matches_sentencepiece_and_hugging_face(spm_cases):
    """Ours from spiece.model = sentencepiece, ours from tokenizer.json = Hugging Face, on 40
    strings. The libraries agree on all but one: HF recognises its special tokens ("</s>", "<pad>",
    "<unk>") written in the text, sentencepiece spells them out; each file is held to its own
    library."""
    sp = UnigramTokenizer.from_file(os.path.join(DATA, "spm_tiny", "spiece.model"))
    hf = UnigramTokenizer.from_file(os.path.join(DATA, "spm_tiny", "tokenizer.json"))
    assert len(spm_cases) >= 30 and len(sp) == 300 and len(hf) == 400
    disagree = []
    for case in spm_cases:
        assert sp.encode(case["text"]) == case["sentencepiece"], case["text"]
        assert hf.encode(case["text"]) == case["hf"], case["text"]
        ids, mask = hf(case["text"], length=16)
        assert ids[0].tolist() == case["hf_16"] and mask[0].long().tolist() == case["hf_16_mask"]
        if case["sentencepiece"] != case["hf"]:
            disagree.append(case["text"])
    assert disagree == ["</s> <pad> <unk> as text"]


def test_tokenizer_batch_padding_truncation_and_unknowns():
    tok = UnigramTokenizer.from_words(["a", "red", "cat", "on", "mat"])  # ids 3..7
    ids, mask = tok(["a red cat", "a blue cat on a mat", ""], length=6)
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert ids.tolist() == [[3, 4, 5, 1, 0, 0],
                            [3, 2, 5, 6, 3, 1],  # "blue": one <unk>; truncated, </s> kept last
                            [1, 0, 0, 0, 0, 0]]
    assert mask.long().sum(1).tolist() == [4, 6, 1]
    assert tok.encode("  a\t\tCAT  ") == [3, 2, 1]  # whitespace collapses; no lower-casing here
    assert tok.decode(tok.encode("a red cat")) == "a red cat"


def test_unknown_characters_merge_like_sentencepiece():
    """In "▁a✓✓b" with pieces ▁a and b only, the two ✓ become one <unk> (score: min -5, less 10)."""
    tok = UnigramTokenizer([("<pad>", 0, False), ("</s>", 0, False), ("<unk>", 0, False),
                            ("\u2581a", -1.0, True), ("b", -2.0, True), ("\u2581ab", -5.0, True)])
    assert tok.unk_score == -15.0
    assert tok.segment("\u2581a\u2713\u2713b") == [3, 2, 4]
    assert tok.segment("\u2581ab") == [3, 4]  # -1 - 2 = -3 beats the whole piece's -5


def test_nmt_nfkc_rules_by_hand():
    assert nmt_nfkc("\uff26\uff55\uff4c\uff4c \ufb01\ufb02") == "Full fifl"  # full-width, ligatures
    assert nmt_nfkc("a\tb\nc\u200bd\u2581e") == "a b c d e"  # whitespace-like characters -> space
    assert nmt_nfkc("a\x01b\x7fc") == "abc"  # control characters deleted
    assert nmt_nfkc("e\u0301 \uff5e") == "\u00e9 \uff5e"  # composed; the full-width tilde kept


def test_protobuf_wire_format_by_hand():
    buf = b"\x08\xac\x02" + b"\x12\x03abc" + b"\x1d" + struct.pack("<f", 0.5)  # 300, "abc", 0.5
    assert text._protobuf(buf, "x") == [(1, 300), (2, b"abc"), (3, 0.5)]
    with pytest.raises(UserError, match="truncated protobuf"):
        text._protobuf(b"\x08\xac", "x")


def test_tokenizer_files_of_another_kind(tmp_path):
    bpe = tmp_path / "tokenizer.json"
    bpe.write_text(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}}))
    with pytest.raises(UserError, match="a BPE tokenizer, not a SentencePiece unigram one"):
        UnigramTokenizer.from_file(str(bpe))
    with pytest.raises(UserError, match="not a Hugging Face tokenizer.json"):
        UnigramTokenizer.from_file(os.path.join(DATA, "t5_tiny", "config.json"))
    with pytest.raises(UserError, match="spiece.model|protobuf"):
        UnigramTokenizer.from_file(os.path.join(DATA, "t5_tiny", "model.safetensors"))
    with open(os.path.join(DATA, "spm_tiny", "spiece.model"), "rb") as f:
        spiece = f.read()
    # a later TrainerSpec record {3: model_type 2} (protobuf merges repeated messages): a BPE model
    (tmp_path / "bpe.model").write_bytes(spiece + b"\x12\x02\x18\x02")
    with pytest.raises(UserError, match="bpe.model: a SentencePiece model of type 2"):
        UnigramTokenizer.from_file(str(tmp_path / "bpe.model"))
    # the one check of the CLI's exit code: one line on stderr, status 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "text.py"), "tokenize", "--tokenizer", str(bpe), "x"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "BPE tokenizer" in run.stderr


def test_clean_caption_matches_llamagen():
    with open(os.path.join(DATA, "clean_caption_expected.json"), encoding="utf-8") as f:
        cases = json.load(f)["cases"]
    for case in cases:
        assert clean_caption(case["text"]) == case["clean"], case["text"]


# ------------------------------------------------------------------------------------- TextEncoder
def test_text_encoder_features_and_mask(tmp_path):
    """A HF-style folder with a hand-written tokenizer.json and the tiny T5: features equal the
    encoder's own output on valid tokens, zero on padding, whatever the batch size; bf16 in, out."""
    words = ["a", "red", "cat", "sitting", "on", "mat"]
    folder = tmp_path / "t5"
    shutil.copytree(os.path.join(DATA, "t5_tiny"), folder)
    vocab = [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0]] + [["\u2581" + w, -1.0] for w in words]
    added = [{"id": i, "content": p, "special": True} for i, (p, _) in enumerate(vocab[:3])]
    (folder / "tokenizer.json").write_text(json.dumps(
        {"added_tokens": added, "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab}}))
    enc = TextEncoder.from_pretrained(str(folder), device="cpu")
    caps = ["A red cat sitting on a mat", "cat"]
    feats, mask = enc.encode_captions(caps)
    assert feats.shape == (2, 120, 32) and mask.shape == (2, 120) and feats.dtype == torch.float32
    assert mask.sum(1).tolist() == [8, 2]
    ids = torch.tensor([[3, 4, 5, 6, 7, 3, 8, 1], [5, 1] + [0] * 6])
    with torch.no_grad():
        direct = enc.encoder(ids[:1])
    # to float32 rounding: the matrix library may block a batch of two otherwise than one caption
    torch.testing.assert_close(feats[0, :8], direct[0], atol=1e-5, rtol=1e-5)
    assert feats[0, 8:].abs().sum() == 0 and feats[1, 2:].abs().sum() == 0
    one_by_one, _ = enc.encode_captions(caps, batch_size=1)
    torch.testing.assert_close(one_by_one, feats, atol=1e-5, rtol=1e-5)
    bf = TextEncoder.from_pretrained(str(folder), device="cpu", dtype=torch.bfloat16)
    f16, m16 = bf.encode_captions(caps, length=16)
    assert f16.dtype == torch.bfloat16 and f16.shape == (2, 16, 32)
    assert torch.equal(m16, mask[:, :16])
    assert ((f16[0, :8].float() - direct[0]).norm() / direct[0].norm()).item() < 0.05
