"""t2i.StreamT2I, DALL-E's one stream (train.py --text stream): the caption's tokens first in the
GPT's own sequence, a padding token per slot and no mask, the loss (text + 7 image) / 8, sampling
through GPT.generate, its KV cache and decoding.py, and its checkpoints kept apart from prefix
ones."""
import numpy as np
import pytest
import torch

import decoding
import model as M
import sample
import t2i
import train
from common import UserError, load_checkpoint
from conftest import run_cli
from model import GPT, gpt_config
from test_t2i_train import (resumes_exactly, train_args, train_main,  # noqa: F401
                             vq_world)  # vq_world: a fixture

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS, N = 12, 6  # ids 0..11 are words, 12..17 the pads of slots 0..5


def tiny_stream(seed=0):
    """A 2-layer stream GPT, weights N(0, 0.1) so that the caption visibly steers the codes."""
    torch.manual_seed(seed)
    model = t2i.StreamT2I(gpt_config("pico", vocab_size=32, block_size=16, stream_words=WORDS,
                                     cls_token_num=N))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.1)
    return model.eval()


def captions():
    """Two right-padded captions (3 and 6 tokens) -> their stream ids."""
    ids = torch.tensor([[5, 7, 1, 0, 0, 0], [4, 9, 3, 8, 6, 1]])
    return t2i.stream_ids(ids, ids > 0, WORDS)


def test_pads_are_a_token_per_slot_and_attention_has_no_mask(monkeypatch):
    """Slot i's pad is id WORDS + i; every attention call is the plain causal kernel, no mask; a
    pad is an input like a word: changing its embedding row changes the logits of the captions
    padded there, and only theirs; the text positions are rotated by the identity, not zeroed."""
    ids = captions()
    assert ids[0].tolist() == [5, 7, 1, 15, 16, 17] and ids[1].tolist() == [4, 9, 3, 8, 6, 1]
    model, calls = tiny_stream(), []
    real = M.attention
    monkeypatch.setattr(M, "attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    codes = torch.randint(32, (2, 16), generator=torch.Generator().manual_seed(0))
    before = model(codes, ids)[0]
    assert len(calls) == 2 and all(c["attn_mask"] is None and c["is_causal"] for c in calls)
    with torch.no_grad():
        model.cls_embedding.embedding_table.weight[WORDS + 4] += 1.0
    after = model(codes, ids)[0]
    assert (after[0] - before[0]).abs().max() > 1e-3 and torch.equal(after[1], before[1])
    assert (model.freqs_cis[:N, :, 0] == 1).all() and (model.freqs_cis[:N, :, 1] == 0).all()
    assert torch.equal(model.freqs_cis[N:], M.rope_2d_table(4, 32, n_cond=N)[N:])  # 2D RoPE


def test_loss_is_text_and_image_weighted_one_and_seven_eighths():
    """Training's loss = (mean CE of caption tokens 1..N-1 from text positions 0..N-2, by the text
    head + 7 x mean CE of the codes) / 8, recomputed here from log-softmaxes; validation's is the
    codes' alone; right-padded ids with their mask give the same loss as stream ids; training
    drops whole captions to the pads."""
    model, ids = tiny_stream().train(), captions()
    model.config.class_dropout_prob, model.tok_dropout.p = 0.0, 0.0
    for layer in model.layers:
        layer.attention.resid_dropout.p = layer.feed_forward.ffn_dropout.p = 0.0
    codes = torch.randint(32, (2, 16), generator=torch.Generator().manual_seed(1))
    logits, loss = model(codes, ids, targets=codes)
    x = model.hidden(codes, ids)
    text_logp = model.cls_embedding.head(model.norm(x[:, :N - 1])).log_softmax(-1)
    ce_text = -text_logp.gather(-1, ids[:, 1:, None]).sum() / (2 * (N - 1))
    ce_image = -logits.log_softmax(-1).gather(-1, codes[..., None]).sum() / (2 * 16)
    assert ce_text.item() > 0.5 and abs(ce_text.item() - ce_image.item()) > 0.01
    assert loss.item() == pytest.approx((ce_text.item() + 7 * ce_image.item()) / 8, abs=1e-5)
    raw = torch.tensor([[5, 7, 1, 0, 0, 0], [4, 9, 3, 8, 6, 1]])
    assert model(codes, raw, targets=codes, cond_mask=raw > 0)[1].item() == loss.item()
    assert model.eval()(codes, ids, targets=codes)[1].item() == pytest.approx(ce_image.item(),
                                                                              abs=1e-5)
    model.train().config.class_dropout_prob = 1.0
    null = model.cls_embedding.null(ids)
    assert null[0].tolist() == list(range(WORDS, WORDS + N))
    assert model(codes, ids, targets=codes)[1].item() == pytest.approx(
        model(codes, null, targets=codes)[1].item(), abs=1e-6)
    assert model(codes, ids, targets=codes)[1].item() != pytest.approx(loss.item(), abs=1e-3)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_kv_cache_decoding_is_the_full_forward_and_greedy_is_reproducible(cfg_scale):
    """Greedy GPT.generate: every step's logits (conditional and null-caption rows) equal the full
    forward's over the codes it drew, each code is that forward's argmax, two calls agree, and
    decoding.py's fixed-shape step (compiled, whole graph) and Jacobi windows draw the same."""
    model, ids = tiny_stream(), captions()
    steps, inner = [], model.forward_cached
    model.forward_cached = lambda *a: steps.append(inner(*a)) or steps[-1]
    codes = model.generate(ids, cfg_scale=cfg_scale, greedy=True)
    del model.forward_cached
    assert len(codes.unique()) > 3
    cached = torch.stack(steps, 1)  # (rows, 16, vocab)
    full = model(codes, ids)[0]
    assert torch.allclose(cached[:2], full, atol=1e-5)
    if cfg_scale != 1.0:
        assert torch.allclose(cached[2:], model(codes, model.cls_embedding.null(ids))[0], atol=1e-5)
        full = cached[2:] + cfg_scale * (full - cached[2:])
    assert torch.equal(full.argmax(-1), codes)
    assert torch.equal(model.generate(ids, cfg_scale=cfg_scale, greedy=True), codes)
    model.decode_step = torch.compile(decoding.decode_step, backend="eager", fullgraph=True)
    for kw in (dict(static=True), dict(sampler="jacobi", window=4)):
        assert torch.equal(decoding.generate(model, ids, cfg_scale=cfg_scale, greedy=True, **kw),
                           codes)


def test_condition_checks_and_checkpoint_kinds(tmp_path):
    """The stream takes caption ids (B, N) and no mask (sampling); a stream checkpoint is refused
    by GPT.from_pretrained and a prefix one by StreamT2I.from_pretrained, one line each naming
    the kind and the loader to use; each loads with its own."""
    model, ids = tiny_stream(), captions()
    for cond, mask in ((ids[:, :4], None), (ids.float(), None), (ids, ids > 0)):
        with pytest.raises(UserError, match=r"DALL-E's one stream: pass caption ids \(B, 6\)"):
            model.generate(cond, cond_mask=mask)
    stream, prefix = tmp_path / "stream.pt", tmp_path / "prefix.pt"
    torch.save({"model": model.state_dict(), "config": vars(model.config), "kind": "gpt"}, stream)
    c2i = GPT(gpt_config("pico", vocab_size=32, block_size=16))
    torch.save({"model": c2i.state_dict(), "config": vars(c2i.config), "kind": "gpt"}, prefix)
    for cls, path, message in ((GPT, stream, "is a DALL-E stream GPT; load it with "
                                "t2i.StreamT2I.from_pretrained"),
                               (t2i.StreamT2I, prefix, "is a prefix GPT; load it with "
                                "GPT.from_pretrained")):
        with pytest.raises(UserError, match=message) as e:
            cls.from_pretrained(path)
        assert len(str(e.value).splitlines()) == 1
    again = t2i.StreamT2I.from_pretrained(stream)
    assert torch.equal(again(torch.zeros(2, 16, dtype=torch.long), ids)[0],
                       model(torch.zeros(2, 16, dtype=torch.long), ids)[0])


# ------------------------------------------------------------------- train.py and sample.py
@pytest.fixture(scope="module")
def stream_run(vq_world, tmp_path_factory):
    """train.py --text stream, 2 steps on vq_world's codes of 120 scenes."""
    out = tmp_path_factory.mktemp("stream") / "run"
    train_main(stream_args(vq_world["codes"], out, 2))
    return str(out / "ckpt.pt")


def stream_args(codes, out, steps, *extra):
    argv = train_args(codes, out, steps, *extra)
    argv[argv.index("--text") + 1] = "stream"
    return argv


def test_train_stream_records_its_kind_and_resumes_exactly(vq_world, stream_run, tmp_path,
                                                           capsys):
    """The checkpoint: config stream_words = the tokenizer's size, N = --caption-len, meta text
    kind "stream" with its words, no T5; 2 + 2 steps resumed end as 4 straight ones; a stream run
    resumed with --text t5-nano is one line; --init-from a class GPT copies its codes' side."""
    ckpt = load_checkpoint(stream_run)
    info = ckpt["meta"]["text"]
    assert info["kind"] == "stream" and info["length"] == 16 and "circle" in info["words"]
    assert ckpt["config"]["stream_words"] == 3 + len(info["words"])
    assert ckpt["config"]["cls_token_num"] == 16 and ckpt["config"]["caption_dim"] == 0
    assert ckpt["model"]["cls_embedding.head.weight"].shape == (3 + len(info["words"]) + 16, 128)
    assert not any(k.startswith("text_encoder.") for k in ckpt["model"])
    a = resumes_exactly(stream_args, vq_world["codes"], tmp_path)
    code, _, err = run_cli(train.main, [*train_args(vq_world["codes"], a, 5), "--resume"], capsys)
    assert code == 2 and "--text t5-nano differs from the checkpoint's stream" in err
    c2i = tmp_path / "c2i"
    train_main(["--model", "nano", "--data", vq_world["codes"], "--batch-size", 8, "--max-steps",
                1, "--val-size", 16, "--num-workers", 0, "--out-dir", c2i])
    capsys.readouterr()
    train_main(stream_args(vq_world["codes"], tmp_path / "s", 1, "--lr", "1e-12",
                           "--weight-decay", 0, "--init-from", c2i / "ckpt.pt"))
    assert "all but the condition embedding" in capsys.readouterr().err
    src, got = (load_checkpoint(p)["model"] for p in (c2i / "ckpt.pt", tmp_path / "s/ckpt.pt"))
    body = [k for k in src if not k.startswith("cls_embedding.")]
    assert len(body) > 20 and all(torch.allclose(got[k], src[k], atol=1e-9) for k in body)


def test_sample_draws_prompts_from_a_stream_checkpoint(vq_world, stream_run, tmp_path, capsys):
    """sample.py --prompt with a stream checkpoint writes the grid of what GPT.generate draws
    from the StreamCondition; --candidates keeps CLIP's best of them; --t5 is one line."""
    import clip
    from PIL import Image
    base = ["--gpt-ckpt", stream_run, "--vq-ckpt", vq_world["vq"], "--prompt", "a red circle",
            "--prompt", "two blue stars"]
    code, _, err = run_cli(sample.main, base + ["--per-prompt", 3, "--out", tmp_path / "g.png"],
                           capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "g.png").size == (3 * 34 + 2, 2 * 34 + 2)
    gpt, vq = sample.load_models(stream_run, vq_world["vq"])[:2]
    condition = t2i.joint_condition(gpt, stream_run, ["a red circle", "two blue stars"], "cpu")
    ids, mask = condition(torch.tensor([0, 1]))
    assert mask is None and ids[0, 4:].tolist() == list(range(gpt.config.stream_words + 4,
                                                               gpt.config.stream_words + 16))
    drawn = sample.sample_images(gpt, vq.eval(), [0, 0, 0, 1, 1, 1], cfg_scale=7.5, top_k=1000,
                                 generator=torch.Generator().manual_seed(sample.batch_seed(0, 0)),
                                 condition=condition)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png"))[2:34, 2:34], drawn[0])
    train_main(["--model", "CLIP-tiny", "--data", "scenes:64", "--max-steps", 1, "--batch-size",
                10, "--val-size", 20, "--num-workers", 0, "--out-dir", tmp_path / "clip"])
    code, _, err = run_cli(sample.main, base + ["--candidates", 3, "--keep", 1, "--clip",
                                                tmp_path / "clip/ckpt.pt", "--out",
                                                tmp_path / "k.png"], capsys)
    assert code == 0, err
    model, tok = clip.load(str(tmp_path / "clip/ckpt.pt"))
    best = clip.rerank_candidates(drawn, ["a red circle", "two blue stars"], model, 1, tok)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "k.png"))[2:34, 2:34], best[0])
    code, _, err = run_cli(sample.main, base + ["--t5", tmp_path, "--out", tmp_path / "x.png"],
                           capsys)
    assert code == 2 and "learned its own text side (--text stream): drop --t5" in err
