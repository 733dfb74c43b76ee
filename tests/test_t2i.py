"""model.py, text-to-image: the caption prefix, its mask, the null caption, t2i checkpoints, parity.

tests/data/official_gpt_t2i_tiny.pt was recorded once, outside the project, from the official LlamaGen
code (FoundationVision/LlamaGen @ ce98ec4, autoregressive/models/gpt.py and generate.py with
model_type='t2i', dataset/t2i.py for the left-padded captions and the training mask), torch 2.13 CPU
float32, one thread: a 2-layer dim-32 model (4 heads, vocab 64, 4x4 codes, caption_dim 16) with every
weight re-drawn from torch.manual_seed(0) (norms 1 + 0.2 N(0,1), output N(0, 0.2), the rest N(0, 0.3):
the official init would make the mask nearly invisible), captions of 8, 5 and 1 valid tokens in a
prefix of N = 8 (the null caption re-drawn as randn(8, 16) / 4, since the official CaptionEmbedder is
always 120 rows), and the same weights unpatched at N = 120 (captions of 120, 37 and 3 tokens).
It holds train-mode logits and losses (valid = 1,1,1 and 1,0,1; caption dropout forced on) and, from
generate(top_k=1), the codes and every step's last-position logits at cfg 1, cfg 4 and cfg 4 with
cfg_interval 3 (N = 120: cfg 4).
"""
import os

import pytest
import torch

import model as M
from common import UserError, load_weights
from model import GPT, GPTConfig, gpt_config, prefix_mask
from t2i import left_pad_caption

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "official_gpt_t2i_tiny.pt")

# REFERENCE 3.2, t2i at vocab 16384, caption_dim 2048, N = 120 (the null caption is a buffer: not counted)
OFFICIAL_T2I_PARAMS = {"B": 112_282_368, "L": 345_031_680, "XL": 777_678_080, "XXL": 1_414_940_160}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


def official(fx, n120=False):
    """Our GPT with the fixture's official weights, as (model, the fixture part it belongs to)."""
    ref = fx["n120"] if n120 else fx
    sd = dict(fx["state_dict"])
    if n120:
        sd["cls_embedding.uncond_embedding"] = ref["uncond_embedding"]
    cfg = {k: v for k, v in ref["config"].items() if k != "model_type"}
    return load_weights(GPT(GPTConfig(**cfg)), sd, "fixture").eval(), ref


def tiny_t2i(seed=0, n=6):
    """A random 2-layer caption model, weights N(0, 0.1) (the official init hardly uses the prefix)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=4, dim=32, multiple_of=16,
                          caption_dim=8, cls_token_num=n))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.1)
    return model.eval()


def left_padded(lens, n, d, seed):
    """Random captions (B, n, d) with lens[b] valid tokens at the end, zeros before, and their mask."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.stack([torch.arange(n) >= n - k for k in lens])
    return torch.randn(len(lens), n, d, generator=g) * mask[..., None], mask


def record_steps(model):
    """Wrap model.forward_cached so every decode step's logits (rows [cond ; uncond]) are kept."""
    steps, inner = [], model.forward_cached

    def hook(*args):
        out = inner(*args)
        steps.append(out.clone())
        return out
    model.forward_cached = hook
    return steps


# ------------------------------------------------------------------------------------ sizes and key names
def test_t2i_param_counts_and_state_dict_match_reference():
    for name, expected in OFFICIAL_T2I_PARAMS.items():
        cfg = gpt_config(name, caption_dim=2048, cls_token_num=120)
        with torch.device("meta"):
            model = GPT(cfg)
        n = sum(p.numel() for p in model.parameters())
        d, f = cfg.dim, cfg.ffn_dim
        per_layer = d * 3 * d + d * d + 3 * d * f + 2 * d  # wqkv, wo, w1/w2/w3, two norms
        # c2i's class table (1001, d) gives way to cap_proj fc1 (d, 2048) and fc2 (d, d)
        assert n == expected == 2 * 16384 * d + 2048 * d + d * d + cfg.n_layer * per_layer + d, name
        sd = model.state_dict()
        assert sd["cls_embedding.uncond_embedding"].shape == (120, 2048)  # a buffer: in the state dict
        assert "cls_embedding.uncond_embedding" not in dict(model.named_parameters())
        assert sd["cls_embedding.cap_proj.fc1.weight"].shape == (d, 2048)
        assert sd["cls_embedding.cap_proj.fc2.weight"].shape == (d, d)
        assert not any("embedding_table" in k or "bias" in k for k in sd)
        assert model.freqs_cis.shape == (120 + 256, cfg.dim // cfg.n_head // 2, 2)
        # what from_pretrained reads off an official t2i_*.pt: the condition kind, caption_dim and N
        assert M.config_from_state_dict(sd) == dict(vocab_size=16384, dim=d, n_layer=cfg.n_layer,
                                                    n_head=cfg.n_head, n_kv_head=None,
                                                    caption_dim=2048, cls_token_num=120)
    # per-token FLOPs: the matmul weights of the layers and output; cap_proj runs on the prefix only
    m = tiny_t2i()
    c = m.config
    layers = sum(p.numel() for p in m.layers.parameters()) + m.norm.weight.numel() + m.output.weight.numel()
    assert m.flops_per_token() == 6 * layers + 12 * c.n_layer * c.dim * (6 + 16 - 1)
    with pytest.raises(UserError, match="class condition is a prefix of exactly one token"):
        GPTConfig(cls_token_num=120)
    small = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=4, dim=32, caption_dim=2048,
                          cls_token_num=120))
    assert torch.count_nonzero(small.freqs_cis[:120]) == 0 and torch.count_nonzero(small.freqs_cis[120]) > 0
    buffer = small.cls_embedding.uncond_embedding  # randn / sqrt(caption_dim), 245,760 draws
    assert abs(buffer.std().item() - 2048 ** -0.5) < 2e-4 and abs(buffer.mean().item()) < 2e-4


# --------------------------------------------------------------------------- parity with the official code
@pytest.mark.parametrize("n120", [False, True])
def test_official_t2i_training_logits_and_losses(fx, n120):
    model, ref = official(fx, n120)
    codes, captions, mask = fx["codes"], ref["captions"], ref["emb_masks"]
    for training in (False, True):  # training semantics in both modes (no dropout in the fixture config)
        model.train(training)
        model.cls_embedding.dropout_prob = 0.0  # keep the captions in train mode
        logits, loss = model(codes, captions, targets=codes, cond_mask=mask)
        assert logits.dtype == torch.float32 and logits.shape == (3, 16, 64)
        assert (logits - ref["logits"]).abs().max() <= 1e-5
        assert abs(loss.item() - ref["loss"].item()) <= 1e-5
        # valid 1,0,1: the mean CE of samples 0 and 2 only, as the official sum(CE*valid)/max(sum(valid),1)
        _, loss101 = model(codes, captions, targets=codes, cond_mask=mask, valid=torch.tensor([1, 0, 1]))
        assert abs(loss101.item() - ref["loss_valid_101"].item()) <= 1e-5
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), codes.flatten(), reduction="none")
        assert abs(loss101.item() - ce.view(3, 16)[[0, 2]].mean().item()) <= 1e-6
        _, none_valid = model(codes, captions, targets=codes, cond_mask=mask, valid=torch.zeros(3))
        assert none_valid.item() == 0.0
    # caption dropout forced on every sample: the whole caption becomes the null caption, mask kept
    model.train()
    model.cls_embedding.dropout_prob = 1.0
    null_logits, null_loss = model(codes, captions, targets=codes, cond_mask=mask)
    assert abs(null_loss.item() - ref["null_loss"].item()) <= 1e-5
    if "null_logits" in ref:
        assert (null_logits - ref["null_logits"]).abs().max() <= 1e-5
    model.eval()  # eval mode never drops: the null caption passed explicitly gives the same logits
    explicit, _ = model(codes, model.cls_embedding.null(captions), cond_mask=mask)
    assert (explicit - null_logits).abs().max() <= 1e-6


@pytest.mark.parametrize("name,n120", [("cfg1", False), ("cfg4", False), ("cfg4_interval3", False),
                                       ("cfg4", True)])
def test_official_t2i_generation_step_logits_and_greedy_codes(fx, name, n120):
    model, ref = official(fx, n120)
    kw = {"cfg1": dict(cfg_scale=1.0), "cfg4": dict(cfg_scale=4.0),
          "cfg4_interval3": dict(cfg_scale=4.0, cfg_interval=3)}[name]
    expected = ref[f"gen_{name}"]
    steps = record_steps(model)
    codes = model.generate(ref["captions"], greedy=True, cond_mask=ref["emb_masks"], **kw)
    assert torch.equal(codes, expected["codes"])
    assert len(steps) == 16
    for t, step in enumerate(steps):
        official_rows = expected["step_logits"][t]  # [cond ; uncond], or the cond rows only
        guided = kw["cfg_scale"] > 1 and t <= kw.get("cfg_interval", 99) + 1
        assert step.shape == ((6 if guided else 3), 64)  # after the interval only the cond half runs
        rows = min(len(step), len(official_rows))
        assert (step[:rows] - official_rows[:rows]).abs().max() <= 1e-5, t
    g = torch.Generator().manual_seed(0)  # top-k 1 leaves one token: sampling gives the same codes
    assert torch.equal(model.generate(ref["captions"], top_k=1, generator=g, cond_mask=ref["emb_masks"], **kw),
                       expected["codes"])


def test_official_t2i_checkpoint_key_names_load(fx, tmp_path):
    stray = {"freqs_cis": torch.zeros(24, 4, 2), "layers.0.attention.kv_cache.k_cache": torch.zeros(2, 4, 24, 8)}
    for n120 in (False, True):
        model, ref = official(fx, n120)
        sd = model.state_dict()
        assert {"cls_embedding.cap_proj.fc1.weight", "cls_embedding.cap_proj.fc2.weight",
                "cls_embedding.uncond_embedding"} <= set(sd) and len(sd) == 20
        for fname, ckpt in {"t2i_tiny_64.pt": {**sd, **stray}, "ddp.pt": {"model": sd, "steps": 3}}.items():
            path = str(tmp_path / fname)
            torch.save(ckpt, path)
            # n_head and the FFN rounding of a non-registry shape are not in the tensors: pass them
            loaded = GPT.from_pretrained(path, block_size=16, n_head=4, multiple_of=32)
            c = loaded.config
            assert (c.caption_dim, c.cls_token_num, c.vocab_size) == (16, 120 if n120 else 8, 64)
            assert torch.equal(loaded.cls_embedding.uncond_embedding, sd["cls_embedding.uncond_embedding"])
            logits, _ = loaded(fx["codes"], ref["captions"], cond_mask=ref["emb_masks"])
            assert (logits - ref["logits"]).abs().max() <= 1e-5, fname


def test_wrong_condition_or_checkpoint_refuses_with_one_line(fx, tmp_path):
    model, ref = official(fx)
    with pytest.raises(UserError, match="text-conditional: pass caption features of shape \\(3, 8, 16\\)"):
        model(fx["codes"], torch.tensor([1, 2, 3]))
    with pytest.raises(UserError, match="text-conditional"):
        model.generate(torch.tensor([1, 2, 3]))
    with pytest.raises(UserError, match="shape \\(2, 8, 16\\)"):
        model.generate(ref["captions"][:2, :5])  # a caption not padded to N
    right = ref["emb_masks"].flip(1)
    with pytest.raises(UserError, match="not left padded.*left_pad_caption"):
        model.generate(ref["captions"], cond_mask=right)
    c2i = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=4, dim=32, num_classes=5)).eval()
    with pytest.raises(UserError, match="class-conditional: pass class labels"):
        c2i(torch.zeros(3, 16, dtype=torch.long), ref["captions"])
    with pytest.raises(UserError, match="class-conditional"):
        c2i.generate(torch.tensor([1, 2]), cond_mask=torch.ones(2, 1))
    no_null = {k: v for k, v in fx["state_dict"].items() if k != "cls_embedding.uncond_embedding"}
    torch.save(no_null, str(tmp_path / "no_null.pt"))
    with pytest.raises(UserError, match="without its null caption cls_embedding.uncond_embedding"):
        GPT.from_pretrained(str(tmp_path / "no_null.pt"), block_size=16, n_head=4, multiple_of=32)


# ------------------------------------------------------------------------------- the mask and left padding
def test_prefix_mask_is_the_official_mask_rows():
    # N = 3 caption positions, the first one padded, then 2 image positions
    key_ok = torch.tensor([[False, True, True, True, True]])
    expected = torch.tensor([[1, 0, 0, 0, 0],  # the pad sees only itself
                             [0, 1, 0, 0, 0],  # nobody sees the pad ...
                             [0, 1, 1, 0, 0],
                             [0, 1, 1, 1, 0],  # ... image tokens included
                             [0, 1, 1, 1, 1]], dtype=torch.bool)
    full = prefix_mask(key_ok, 0, 5)
    assert full.shape == (1, 1, 5, 5) and torch.equal(full[0, 0], expected)
    assert torch.equal(prefix_mask(key_ok, 0, 3)[0, 0], expected[:3, :3])  # the prefill
    assert torch.equal(prefix_mask(key_ok, 3, 1)[0, 0], expected[3:4, :4])  # one decode step
    assert torch.equal(prefix_mask(key_ok, 3, 2)[0, 0], expected[3:, :])  # two tokens at once
    # the official construction (LlamaGen dataset/t2i.py): tril, padded columns zeroed, diagonal set
    emb_mask = torch.tensor([0.0, 0.0, 1.0, 1.0])
    S = 7
    attn = torch.tril(torch.ones(S, S))
    attn[:, :4] *= emb_mask[None]
    attn = (attn * (1 - torch.eye(S)) + torch.eye(S)).bool()
    ours = prefix_mask(torch.nn.functional.pad(emb_mask.bool(), (0, 3), value=True)[None], 0, S)[0, 0]
    assert torch.equal(ours, attn)


def test_left_pad_caption_reproduces_the_official_conversion(fx):
    for ref in (fx, fx["n120"]):
        left, mask = ref["captions"], ref["emb_masks"]
        B, N, d = left.shape
        # a T5-style right-padded output: valid tokens first, non-zero rows at the pads
        right = torch.randn(B, N, d, generator=torch.Generator().manual_seed(3))
        right_mask = torch.zeros(B, N, dtype=torch.long)
        for b, n in enumerate(ref["caption_lens"]):
            right[b, :n] = left[b, N - n:]
            right_mask[b, :n] = 1
        features, new_mask = left_pad_caption(right, right_mask)
        assert new_mask.dtype == torch.bool and torch.equal(new_mask, mask.bool())
        assert torch.equal(features, left)  # valid rows moved to the end in order, pads exactly zero
    x = torch.arange(1.0, 5.0)[None, :, None]  # by hand: tokens 1, 2 valid of 4
    features, m = left_pad_caption(x, torch.tensor([[1, 1, 0, 0]]))
    assert features.flatten().tolist() == [0, 0, 1, 2] and m.tolist() == [[False, False, True, True]]


def test_padded_caption_positions_change_nothing_and_the_mask_matters(fx):
    model, ref = official(fx)
    captions, mask = ref["captions"], ref["emb_masks"]
    noise = torch.randn(captions.shape, generator=torch.Generator().manual_seed(0))
    noisy = captions + 5 * noise * (1 - mask[..., None])  # only the padded rows change
    assert (noisy - captions).abs().max() > 1
    base, _ = model(fx["codes"], captions, cond_mask=mask)
    changed, _ = model(fx["codes"], noisy, cond_mask=mask)
    assert torch.equal(base, changed)  # nobody attends to a pad: exactly the same logits
    steps_a, codes_a = record_steps(model), model.generate(captions, cfg_scale=4.0, greedy=True, cond_mask=mask)
    steps_b, codes_b = record_steps(model), model.generate(noisy, cfg_scale=4.0, greedy=True, cond_mask=mask)
    assert torch.equal(codes_a, codes_b) and all(torch.equal(a, b) for a, b in zip(steps_a, steps_b))
    unmasked, _ = model(fx["codes"], noisy)  # without the mask the pads do leak in
    assert (unmasked - base)[1:].abs().max() > 0.5
    alone, _ = model(fx["codes"][:1], captions[:1])  # a full caption needs no mask
    assert (alone - base[:1]).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------ KV cache generation
@pytest.mark.parametrize("kw", [dict(cfg_scale=1.0), dict(cfg_scale=3.0), dict(cfg_scale=3.0, cfg_interval=2),
                                dict(cfg_scale=0.5)])
def test_t2i_kv_cache_decoding_equals_full_forward_with_padding(kw):
    model = tiny_t2i()
    captions, mask = left_padded([6, 3, 1], 6, 8, seed=1)
    captions = captions + (~mask[..., None]) * 3.0  # non-zero pads: isolated all the same
    steps = record_steps(model)
    codes = model.generate(captions, cond_mask=mask, generator=torch.Generator().manual_seed(2), **kw)
    assert codes.dtype == torch.int64 and codes.shape == (3, 16) and len(codes.unique()) > 4
    full_cond, _ = model(codes, captions, cond_mask=mask)
    # the null half runs the null caption under the CAPTION's mask (the official generate)
    full_null, _ = model(codes, model.cls_embedding.null(captions), cond_mask=mask)
    guided = kw["cfg_scale"] != 1.0  # ours: any s != 1 is guided, 0.5 included (officially only s > 1)
    for t, step in enumerate(steps):
        doubled = guided and (kw.get("cfg_interval", -1) < 0 or t <= kw.get("cfg_interval", -1) + 1)
        assert step.shape == ((6 if doubled else 3), 32)
        assert (step[:3] - full_cond[:, t]).abs().max() <= 1e-5
        if doubled:
            assert (step[3:] - full_null[:, t]).abs().max() <= 1e-5
    assert (full_cond - full_null).abs().max() > 0.1  # the two halves do differ
    assert all(layer.attention.kv_cache is None for layer in model.layers)


def test_no_mask_reaches_attention_without_padding(monkeypatch):
    """The class path (and a caption without a mask) keeps plain causal attention: no mask tensor."""
    seen, sdpa = [], M.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((attn_mask is None, is_causal, q.shape[2]))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)
    monkeypatch.setattr(M.F, "scaled_dot_product_attention", spy)
    c2i = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=4, dim=32, num_classes=5)).eval()
    c2i(torch.randint(0, 32, (2, 16)), torch.tensor([0, 1]))
    c2i.generate(torch.tensor([0, 1]), cfg_scale=2.0)
    t2i = tiny_t2i()
    captions, mask = left_padded([6, 2], 6, 8, seed=0)
    t2i.generate(captions, cfg_scale=2.0)
    assert len(seen) == 1 + 16 + 2 * 16  # one layer, then two
    assert all(no_mask and causal == (T > 1) for no_mask, causal, T in seen)
    seen.clear()
    t2i.generate(captions, cfg_scale=2.0, cond_mask=mask)  # padding: a mask, never is_causal
    assert len(seen) == 2 * 16 and not any(no_mask or causal for no_mask, causal, _ in seen)


def test_bf16_model_takes_float32_captions():
    """Text-encoder features arrive in float32; a bf16 model casts them (cap_proj's dtype) and its
    logits stay float32 and near the float32 model's."""
    model = tiny_t2i()
    captions, mask = left_padded([6, 3], 6, 8, seed=4)
    codes = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    ref, _ = model(codes, captions, cond_mask=mask)
    half = model.to(torch.bfloat16)
    assert half.cls_embedding.uncond_embedding.dtype == torch.bfloat16
    logits, _ = half(codes, captions, cond_mask=mask)
    assert logits.dtype == torch.float32 and (logits - ref).abs().max() <= 0.05 * ref.abs().max()
    out = half.generate(captions, cfg_scale=3.0, cond_mask=mask, generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 16) and out.dtype == torch.int64 and 0 <= out.min() and out.max() < 32
