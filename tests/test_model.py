"""model.py: parameter counts, official key names and weights, 2D RoPE, KV-cache decoding, sampling."""
import argparse
import copy
import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

import decoding
import model as model_module
import train
from common import UserError, attention, load_weights
from model import (GPT, GPT_CONFIGS, GPTConfig, KVCache, apply_rope, drop_path, filter_logits, gpt_config,
                   rope_2d_table, sample_logits)

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "official_gpt_tiny.pt")

# REFERENCE 3.2, c2i at vocab 16384, 1000 classes
OFFICIAL_PARAMS = {"B": 110_888_448, "L": 342_910_976, "XL": 774_699_520, "XXL": 1_410_972_672,
                   "XXXL": 3_893_027_840, "1B": 1_199_616_000, "3B": 3_096_659_200, "7B": 6_614_589_440}
OFFICIAL_FFN = {"B": 2048, "L": 2816, "XL": 3584, "XXL": 4096, "XXXL": 6912, "1B": 5632, "3B": 8704, "7B": 11008}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0, **overrides):
    """A random 2-layer model; the output layer is re-drawn (the official init zeroes it) so logits differ."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=32, block_size=16, n_layer=2, n_head=4, dim=32, num_classes=5, multiple_of=16)
    model = GPT(GPTConfig(**{**cfg, **overrides}))
    with torch.no_grad():
        model.output.weight.normal_(0, 0.5)
    return model.eval()


def record_steps(model):
    """Wrap model.forward_cached so every decode step's logits (rows [cond ; uncond]) are kept."""
    steps, inner = [], model.forward_cached

    def hook(*args):
        out = inner(*args)
        steps.append(out.clone())
        return out
    model.forward_cached = hook
    return steps


def load_fixture():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------ sizes and key names
def test_param_counts_match_reference_and_closed_form():
    for name in GPT_CONFIGS:
        cfg = gpt_config(name)
        with torch.device("meta"):
            n = sum(p.numel() for p in GPT(cfg).parameters())
        d, f = cfg.dim, cfg.ffn_dim
        per_layer = d * 3 * d + d * d + 3 * d * f + 2 * d  # wqkv, wo, w1/w2/w3, two norms
        assert n == 2 * 16384 * d + 1001 * d + cfg.n_layer * per_layer + d, name
        if name in OFFICIAL_PARAMS:
            assert n == OFFICIAL_PARAMS[name], name
            assert f == OFFICIAL_FFN[name], name
    assert gpt_config("3B").dim // gpt_config("3B").n_head == 100
    assert gpt_config("GPT-B") == gpt_config("B")
    with pytest.raises(UserError, match="unknown GPT config 'Z'.*B, L, XL"):
        gpt_config("Z")
    with pytest.raises(UserError, match="not a square"):
        GPTConfig(block_size=200)


def test_state_dict_keys_are_the_official_ones():
    with torch.device("meta"):
        sd = GPT(gpt_config("B")).state_dict()
    expected = {"cls_embedding.embedding_table.weight": (1001, 768), "tok_embeddings.weight": (16384, 768),
                "norm.weight": (768,), "output.weight": (16384, 768)}
    for i in range(12):
        p = f"layers.{i}."
        expected.update({p + "attention.wqkv.weight": (2304, 768), p + "attention.wo.weight": (768, 768),
                         p + "feed_forward.w1.weight": (2048, 768), p + "feed_forward.w3.weight": (2048, 768),
                         p + "feed_forward.w2.weight": (768, 2048), p + "attention_norm.weight": (768,),
                         p + "ffn_norm.weight": (768,)})
    assert len(expected) == 88
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


# --------------------------------------------------------------------------- parity with the official code
def test_official_model_logits_and_greedy_codes():
    """tests/data/official_gpt_tiny.pt was written by the official LlamaGen gpt.py / generate.py (tiny random
    models): its train-mode logits and its generate(top_k=1) codes must come out of ours unchanged."""
    fx = load_fixture()
    for tag in ("mha", "gqa"):  # gqa: n_head 4 sharing 2 k/v heads
        ref = fx[tag]
        model = load_weights(GPT(GPTConfig(**ref["config"])), ref["state_dict"], "fixture")
        for training in (False, True):
            model.train(training)
            model.cls_embedding.dropout_prob = 0.0  # keep the labels in train mode too
            logits, loss = model(fx["codes"], fx["labels"], targets=fx["codes"])
            assert logits.dtype == torch.float32 and logits.shape == (3, 16, 64)
            assert (logits - ref["logits"]).abs().max() <= 1e-5
            assert abs(loss.item() - ref["loss"].item()) <= 1e-5
    model.eval()  # generate() is only runnable officially without GQA
    ref = fx["mha"]
    model = load_weights(GPT(GPTConfig(**ref["config"])), ref["state_dict"], "fixture").eval()
    for name, kw in {"cfg1": dict(cfg_scale=1.0), "cfg4": dict(cfg_scale=4.0),
                     "cfg4_interval3": dict(cfg_scale=4.0, cfg_interval=3)}.items():
        expected = ref[f"generate_{name}"]
        assert torch.equal(model.generate(fx["gen_labels"], greedy=True, **kw), expected), name
        g = torch.Generator().manual_seed(0)  # top-k 1 leaves one token: sampling is deterministic too
        assert torch.equal(model.generate(fx["gen_labels"], top_k=1, generator=g, **kw), expected), name
    # the interval matters: with it, the codes part from the always-guided ones after token cfg_interval+1
    a, b = ref["generate_cfg4"], ref["generate_cfg4_interval3"]
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.equal(a, b)


def test_official_checkpoint_containers_load_and_reproduce_logits(tmp_path):
    fx = load_fixture()
    ref = fx["mha"]
    sd = dict(ref["state_dict"])
    stray = {"layers.0.attention.kv_cache.k_cache": torch.zeros(2, 2, 24, 16), "freqs_cis": torch.zeros(17, 8, 2)}
    containers = {
        "ddp.pt": {"model": {**sd, **stray}, "optimizer": {}, "steps": 7, "args": argparse.Namespace(lr=1e-4)},
        "deepspeed.pt": {"module": sd},
        "lightning.pt": {"state_dict": sd},
        "c2i_tiny_256.pt": {**sd, **stray},  # a bare FSDP consolidated dict
    }
    for fname, ckpt in containers.items():
        path = str(tmp_path / fname)
        torch.save(ckpt, path)
        # n_head and the FFN rounding of a non-registry shape are not in the tensors: pass them
        # official files carry no grid: the caller (sample.py, from the image size) gives it
        model = GPT.from_pretrained(path, block_size=16, n_head=2, multiple_of=32)
        assert not model.training and model.config.block_size == 16 and model.config.num_classes == 10
        logits, _ = model(fx["codes"], fx["labels"])
        assert (logits - ref["logits"]).abs().max() <= 1e-5, fname
        assert "freqs_cis" not in model.state_dict() and not any("kv_cache" in k for k in model.state_dict())

    ours = str(tmp_path / "ours.pt")  # our own checkpoints carry their config: nothing to pass
    cfg = dataclasses.asdict(GPTConfig(**ref["config"]))
    torch.save({"model": sd, "config": cfg, "kind": "gpt"}, ours)
    model = GPT.from_pretrained(ours)
    assert dataclasses.asdict(model.config) == cfg
    assert (model(fx["codes"], fx["labels"])[0] - ref["logits"]).abs().max() <= 1e-5


def test_wrong_or_incomplete_checkpoint_gives_one_clear_error(tmp_path):
    nano = GPT(gpt_config("nano", vocab_size=32, num_classes=5))
    path = str(tmp_path / "nano.pt")
    torch.save({"model": nano.state_dict()}, path)
    micro = {k: v for k, v in GPT_CONFIGS["micro"].items()}
    with pytest.raises(UserError) as e:  # ask for the micro shape explicitly
        GPT.from_pretrained(path, **micro)
    msg = str(e.value)
    assert "'cls_embedding.embedding_table.weight'" in msg and "expected shape (6, 256)" in msg
    assert "found (6, 128)" in msg and "fit GPT-nano" in msg
    assert GPT.from_pretrained(path).config.n_layer == 4  # without the request it loads

    broken = {k: v for k, v in nano.state_dict().items() if k != "norm.weight"}
    torch.save(broken, str(tmp_path / "broken.pt"))
    with pytest.raises(UserError, match="'norm.weight' missing"):
        GPT.from_pretrained(str(tmp_path / "broken.pt"))
    torch.save({"model": {"cls_embedding.cap_proj.fc1.weight": torch.zeros(2, 2)}}, str(tmp_path / "t2i.pt"))
    with pytest.raises(UserError, match="not a class-conditional"):
        GPT.from_pretrained(str(tmp_path / "t2i.pt"))
    torch.save({"model": {}, "config": {}, "kind": "vq"}, str(tmp_path / "vq.pt"))
    with pytest.raises(UserError, match="is a 'vq' checkpoint, not a GPT"):
        GPT.from_pretrained(str(tmp_path / "vq.pt"))


# -------------------------------------------------------------------------------------------------- 2D RoPE
def test_rope_table_layout_rows_first_and_zero_condition_rows():
    grid, d, base = 4, 16, 10000.0
    table = rope_2d_table(grid, d, base, n_cond=1)
    assert table.shape == (1 + grid * grid, d // 2, 2) and table.dtype == torch.float32
    assert torch.count_nonzero(table[0]) == 0
    f = [base ** (-2 * k / (d // 2)) for k in range(d // 4)]
    r, c = 2, 3  # image token 2*4+3 = 11 sits at sequence index 12
    angles = [r * fk for fk in f] + [c * fk for fk in f]
    expected = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
    assert torch.allclose(table[1 + r * grid + c], expected, atol=1e-6)
    # adjacent pairs: a unit vector on element 0 (pair 0 = row, frequency 1) turns into (cos r, sin r)
    x = torch.zeros(1, 1, 1, d)
    x[..., 0] = 1.0
    out = apply_rope(x, table[12:13])
    assert torch.allclose(out[0, 0, 0, :2], torch.tensor([math.cos(r), math.sin(r)]), atol=1e-6)
    assert torch.count_nonzero(out[0, 0, 0, 2:]) == 0


def test_rope_score_depends_only_on_grid_offsets_and_condition_qk_are_zero():
    grid, d = 8, 16
    table = rope_2d_table(grid, d, n_cond=1)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def score(cell_q, cell_k):
        iq, ik = 1 + cell_q[0] * grid + cell_q[1], 1 + cell_k[0] * grid + cell_k[1]
        return (apply_rope(q, table[iq:iq + 1]) * apply_rope(k, table[ik:ik + 1])).sum().item()

    base = score((3, 5), (1, 2))
    for dr, dc in [(1, 0), (0, 2), (-1, -2), (4, 1)]:
        assert abs(score((3 + dr, 5 + dc), (1 + dr, 2 + dc)) - base) <= 1e-5
    assert abs(score((4, 5), (1, 2)) - base) > 1e-3  # a different offset, a different score
    assert abs(score((1, 0), (0, 0)) - score((0, 1), (0, 0))) > 1e-3  # rows and columns are not the same
    # condition position: q and k come out exactly zero, whatever the input
    x = torch.randn(2, 1, 3, d)
    assert torch.count_nonzero(apply_rope(x, table[:1])) == 0


# ---------------------------------------------------------------------------------------- forward and init
def test_forward_semantics_loss_and_init():
    model = tiny()
    idx, cond = torch.randint(0, 32, (2, 16)), torch.tensor([1, 4])
    logits, loss = model(idx, cond, targets=idx)
    assert logits.shape == (2, 16, 32) and logits.dtype == torch.float32
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 32), idx.reshape(-1)))
    shorter, _ = model(idx[:, :7], cond)  # fewer codes than block_size: same prefix logits
    assert shorter.shape == (2, 7, 32) and (shorter - logits[:, :7]).abs().max() <= 1e-5
    changed = idx.clone()
    changed[:, 5] = (idx[:, 5] + 1) % 32  # logit t sees codes < t only
    new, _ = model(changed, cond)
    assert (new[:, :6] - logits[:, :6]).abs().max() <= 1e-6 and (new[:, 6] - logits[:, 6]).abs().max() > 1e-4

    fresh = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=4, dim=32, num_classes=5))
    logits, loss = fresh(idx, cond, targets=idx)  # zero output layer: uniform prediction
    assert torch.count_nonzero(logits) == 0 and abs(loss.item() - math.log(32)) < 1e-6
    assert all(torch.equal(m.weight, torch.ones(32)) for n, m in fresh.named_modules() if n.endswith("norm"))
    assert abs(fresh.tok_embeddings.weight.std().item() - 0.02) < 0.002

    dropped = tiny(class_dropout_prob=1.0).train()  # every label becomes the null class 5 in training
    null = tiny().eval()
    for mod in (dropped, null):
        mod.tok_dropout.p = 0.0
        for layer in mod.layers:
            layer.attention.resid_dropout.p = layer.feed_forward.ffn_dropout.p = 0.0
    assert torch.allclose(dropped(idx, cond)[0], null(idx, torch.tensor([5, 5]))[0], atol=1e-6)


def test_drop_path_and_dtype_behaviour():
    x = torch.ones(1000, 3, 4)
    y = drop_path(x, 0.25, training=True)
    per_sample = y[:, 0, 0]
    assert torch.allclose(per_sample[per_sample != 0], torch.tensor(4 / 3))  # survivors scaled by 1/(1-p)
    assert torch.equal(y, per_sample[:, None, None].expand_as(y))  # whole samples are dropped
    assert 0.15 < (per_sample == 0).float().mean() < 0.35
    assert torch.equal(drop_path(x, 0.25, training=False), x)
    model = tiny().to(torch.bfloat16)
    assert model.freqs_cis.dtype == torch.float32 and model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model(torch.randint(0, 32, (1, 16)), torch.tensor([0]))[0].dtype == torch.float32


def test_cpu_bf16_attention_runs_in_float32_with_gradients_or_a_float32_cache():
    """common.attention: a bf16 CPU training step attends in float32 (the bf16 flash backward is
    ~4x slower), so output and gradient equal the float32 ones rounded once to bf16; so does a bf16
    query against the float32 KV cache a CPU keeps; other bf16 attention without gradients runs
    the bf16 kernel unchanged."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))
    bias = torch.randn(1, 4, 9, 9)  # an additive float mask, as T5's position bias
    for mask, kw in ((None, dict(is_causal=True)), (bias, dict(scale=1.0))):
        qb, kb, vb = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
        y = attention(qb, kb, vb, attn_mask=mask if mask is None else mask.to(torch.bfloat16), **kw)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (qb, kb, vb))
        m32 = None if mask is None else mask.to(torch.bfloat16).float()
        y32 = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=m32, **kw)
        assert y.dtype == torch.bfloat16 and torch.equal(y, y32.to(torch.bfloat16))
        g = torch.randn(y.shape)
        y.backward(g.to(torch.bfloat16))
        y32.backward(g.to(torch.bfloat16).float())
        assert torch.equal(qb.grad, q32.grad.to(torch.bfloat16))
        assert torch.equal(vb.grad, v32.grad.to(torch.bfloat16))
    with torch.no_grad():
        qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
        assert torch.equal(attention(qb, kb, vb, is_causal=True),
                           F.scaled_dot_product_attention(qb, kb, vb, is_causal=True))
        y = attention(qb[:, :, -1:], k, v)  # a decode step's query, the cache in float32
        assert y.dtype == torch.bfloat16 and torch.equal(
            y, F.scaled_dot_product_attention(qb[:, :, -1:].float(), k, v).to(torch.bfloat16))
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    # the cache a CPU keeps for a bf16 model is float32
    cache = model_module.KVCache(2, 9)
    cache.update(0, kb, vb)
    assert cache.k.dtype == cache.v.dtype == torch.float32


@pytest.mark.skipif(not decoding.ONEDNN, reason="this torch has no oneDNN packed linear")
def test_cpu_sampling_matmuls_equal_f_linear(monkeypatch):
    """decoding.onednn_weights: for one sampling call on a CPU, linear layers multiply through a
    oneDNN copy of W, giving F.linear's numbers, bf16 bit for bit and float32 to rounding; the
    copies are dropped when sampling ends and never deep-copied; whole GPTs draw the same greedy
    codes with and without them."""
    torch.manual_seed(0)
    big, lin = model_module.Linear(512, 256), model_module.Linear(64, 96)
    packed = lambda m: isinstance(m, decoding.PackedLinear) and "packed" in vars(m)  # noqa: E731
    with torch.no_grad():
        with decoding.onednn_weights(big):
            for rows in (1, 2, 16, 128):
                x = torch.randn(rows, 512)
                assert torch.allclose(big(x), F.linear(x, big.weight), atol=1e-6, rtol=1e-5)
            assert packed(big)
        assert not packed(big) and type(big) is torch.nn.Linear
        with decoding.onednn_weights(lin):
            assert not packed(lin)  # a small float32 matrix: F.linear is quicker
        lin.bfloat16()
        with decoding.onednn_weights(lin):
            x = torch.randn(2, 1, 64, dtype=torch.bfloat16)  # a decode step's (rows, 1, dim)
            assert torch.equal(lin(x), F.linear(x, lin.weight)) and packed(lin)
            assert not packed(copy.deepcopy(lin))
        with torch.autocast("cpu", dtype=torch.bfloat16), decoding.onednn_weights(big):
            assert not packed(big)  # autocast keeps F.linear's dtype
    gpt = tiny().to(torch.bfloat16)
    labels = torch.tensor([1, 3])
    seen = []
    for cls in (torch.nn.Linear, decoding.PackedLinear):
        monkeypatch.setattr(cls, "forward", lambda self, x: seen.append(
            packed(self)) or F.linear(x, self.weight))
    decoding.generate(gpt, labels, "jacobi", 4, cfg_scale=2.0, greedy=True)
    decoding.generate(gpt, labels, cfg_scale=2.0, greedy=True)
    assert seen and all(seen)  # every product of both samplers had its copy ...
    assert not any(packed(m) or isinstance(m, decoding.PackedLinear) for m in gpt.modules())
    monkeypatch.undo()  # ... and none is left behind
    for gpt in (tiny(dim=256), tiny().to(torch.bfloat16)):  # float32 dim 256: wqkv has 2^17.6
        monkeypatch.setattr(decoding, "ONEDNN", True)
        with_copies = decoding.generate(gpt, labels, cfg_scale=2.0, greedy=True)
        monkeypatch.setattr(decoding, "ONEDNN", False)
        assert torch.equal(with_copies, decoding.generate(gpt, labels, cfg_scale=2.0, greedy=True))


# ------------------------------------------------------------------------------------ KV cache generation
@pytest.mark.parametrize("n_kv_head,cfg", [(None, dict(cfg_scale=1.0)), (None, dict(cfg_scale=3.0)),
                                             (2, dict(cfg_scale=1.0)), (2, dict(cfg_scale=3.0, cfg_interval=4))])
def test_kv_cache_decoding_equals_full_forward(n_kv_head, cfg):
    model = tiny(n_kv_head=n_kv_head)
    cond = torch.tensor([0, 3, 4])
    steps = record_steps(model)
    codes = model.generate(cond, generator=torch.Generator().manual_seed(1), **cfg)
    assert codes.dtype == torch.int64 and codes.shape == (3, 16)
    assert len(codes.unique()) > 4  # a varied sequence, not one token repeated
    full_cond, _ = model(codes, cond)
    full_null, _ = model(codes, torch.full_like(cond, 5))
    guided = cfg["cfg_scale"] != 1.0
    for t, step in enumerate(steps):
        doubled = guided and (cfg.get("cfg_interval", -1) < 0 or t <= cfg.get("cfg_interval", -1) + 1)
        assert step.shape == ((6 if doubled else 3), 32)
        assert (step[:3] - full_cond[:, t]).abs().max() <= 1e-5
        if doubled:
            assert (step[3:] - full_null[:, t]).abs().max() <= 1e-5
    assert all(layer.attention.kv_cache is None for layer in model.layers)


def test_kv_cache_is_exact_length_and_shrinks_to_the_cond_half():
    cache = KVCache(batch=4, length=5)
    k = torch.randn(4, 2, 1, 3)
    keys, _ = cache.update(0, k, k)
    assert cache.k.shape == (4, 2, 5, 3) and keys.shape == (4, 2, 1, 3)
    k2 = torch.randn(2, 2, 2, 3)
    keys, values = cache.update(1, k2, k2)
    assert keys.shape == (2, 2, 3, 3) and torch.equal(keys[:, :, 0:1], k[:2]) and torch.equal(keys[:, :, 1:], k2)
    assert keys.data_ptr() == cache.k.data_ptr()  # a view, not a copy


def test_greedy_row_alone_equals_row_in_batch_and_callback():
    model = tiny(seed=3)
    cond = torch.tensor([2, 0, 4, 1])
    seen = []
    batch = model.generate(cond, cfg_scale=2.0, greedy=True, callback=lambda t, c: seen.append((t, c.clone())))
    for i in range(4):
        assert torch.equal(model.generate(cond[i:i + 1], cfg_scale=2.0, greedy=True)[0], batch[i])
    assert [t for t, _ in seen] == list(range(1, 17))
    assert all(c.shape == (4, t) and torch.equal(c, batch[:, :t]) for t, c in seen)


def test_seeded_sampling_is_reproducible_and_cfg_scale_one_is_unguided():
    model = tiny(seed=4)
    cond = torch.tensor([1, 2, 3])

    def run(seed, **kw):
        return model.generate(cond, temperature=1.5, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(7, cfg_scale=2.0), run(7, cfg_scale=2.0))
    assert not torch.equal(run(7, cfg_scale=2.0), run(8, cfg_scale=2.0))
    # the guided path with s -> 1 reduces to the conditional model: same logits, same codes
    steps_one, unguided = record_steps(model), run(5, cfg_scale=1.0)
    steps_near = record_steps(model)
    nearly = run(5, cfg_scale=1.0 + 1e-7)
    assert torch.equal(unguided, nearly)
    assert all(a.shape == (3, 32) and b.shape == (6, 32) for a, b in zip(steps_one, steps_near))
    mixed = [b[3:] + (1.0 + 1e-7) * (b[:3] - b[3:]) for b in steps_near]
    assert max((a - m).abs().max().item() for a, m in zip(steps_one, mixed)) <= 1e-5
    assert not model.training and all(layer.attention.kv_cache is None for layer in model.layers)


# ------------------------------------------------------------------------------------------------ sampling
def test_top_k_top_p_temperature_on_hand_built_logits():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.3, 0.05, 0.15, 0.5]])
    logits = probs.log()
    inf = float("-inf")

    def kept(x):
        return (x > inf).tolist()
    assert kept(filter_logits(logits, top_k=2)) == [[False, True, False, True], [True, False, False, True]]
    assert kept(filter_logits(logits, top_k=1)) == [[False, True, False, False], [False, False, False, True]]
    assert kept(filter_logits(logits, top_k=100)) == [[True] * 4] * 2
    # cumulative sorted mass 0.5, 0.8, 0.95, 1.0: top-p keeps up to the first token that crosses p
    assert kept(filter_logits(logits, top_p=0.7)) == [[False, True, False, True], [True, False, False, True]]
    assert kept(filter_logits(logits, top_p=0.9)) == [[False, True, True, True], [True, False, True, True]]
    assert kept(filter_logits(logits, top_p=0.2)) == [[False, True, False, False], [False, False, False, True]]
    assert kept(filter_logits(logits, top_k=3, top_p=0.99)) == [[False, True, True, True], [True, False, True, True]]
    assert torch.allclose(filter_logits(logits, temperature=2.0), logits / 2)
    assert torch.allclose(filter_logits(logits, temperature=0.0), logits / 1e-5)  # no division by zero
    kept_values = filter_logits(logits, top_p=0.7)
    assert torch.equal(kept_values[kept_values > inf], logits[kept_values > inf])  # survivors unchanged

    assert sample_logits(logits, greedy=True).tolist() == [1, 3]
    g = torch.Generator().manual_seed(0)
    many = logits.repeat(4000, 1)  # 4000 draws of each row at once
    draws = sample_logits(many, top_p=0.7, generator=g).view(4000, 2)
    assert set(draws[:, 0].tolist()) == {1, 3} and set(draws[:, 1].tolist()) == {0, 3}
    assert abs((draws[:, 0] == 1).float().mean().item() - 0.5 / 0.8) < 0.03  # renormalised nucleus
    hot = sample_logits(many, temperature=1e9, generator=g).view(4000, 2)
    assert abs((hot[:, 0] == 0).float().mean().item() - 0.25) < 0.03  # high temperature: uniform
    assert torch.equal(sample_logits(logits, temperature=1e-6, generator=g), torch.tensor([1, 3]))


# ------------------------------------------------------------------------------------ optimiser and FLOPs
def test_optimizer_groups_flops_and_mfu():
    model = tiny()
    opt = train.configure_optimizers(model, 0.05, 1e-4, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert len(no_decay["params"]) == 2 * 2 + 1  # two norms per layer + the final norm
    c = model.config
    matmul_weights = sum(p.numel() for p in model.parameters()) - 32 * 32 - 6 * 32
    assert model.flops_per_token() == 6 * matmul_weights + 12 * c.n_layer * c.dim * 16
    assert model.estimate_mfu(1e6, "cpu") is None
