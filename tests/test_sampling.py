"""decoding.py: the fixed-shape decode step and speculative Jacobi decoding.

Greedy runs must reproduce the sequential sampler code for code; sampled runs must keep its
distribution, checked by enumerating every sequence of a tiny model."""
import itertools
import math
import os

import pytest
import torch
import torch.nn as nn
from scipy.stats import chi2

import decoding
from common import UserError, load_weights
from decoding import static_caches
from model import GPT, GPTConfig, filter_logits, rope_2d_table


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second thread costs more in hand-offs than it saves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed=0, token_scale=0.1, **overrides):
    """A random 2-layer model, 16 codes of 32. Token embeddings are shrunk so that, as in images, a
    code depends weakly on distant codes: drafts made from a partly wrong prefix then survive, and
    Jacobi decoding really accepts several codes per pass (at full scale it almost never does)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=32, block_size=16, n_layer=2, n_head=4, dim=32, num_classes=5,
               multiple_of=16)
    model = GPT(GPTConfig(**{**cfg, **overrides}))
    with torch.no_grad():
        model.output.weight.normal_(0, 0.5)
        model.tok_embeddings.weight.mul_(token_scale)
    return model.eval()


CFGS = [dict(cfg_scale=1.0), dict(cfg_scale=3.0), dict(cfg_scale=3.0, cfg_interval=4)]


class PrefixTable(nn.Module):
    """Stands in for a caption: each label maps to its own N random condition embeddings."""

    def __init__(self, rows, n, dim):
        super().__init__()
        self.table = nn.Parameter(torch.randn(rows, n, dim))

    def null(self, labels):  # GPT.generate asks the condition for its null: the last row
        return torch.full_like(labels, len(self.table) - 1)

    def forward(self, labels):
        return self.table[labels]


def with_prefix(model, n):
    """The model conditioned on N-token prefixes: config, RoPE table (N zero rows) and embedding."""
    c = model.config
    c.cls_token_num = n  # set after construction: GPTConfig admits one class token only
    model.freqs_cis = rope_2d_table(math.isqrt(c.block_size), c.dim // c.n_head, c.rope_base, n)
    model.cls_embedding = PrefixTable(c.num_classes + 1, n, c.dim)
    return model


# -------------------------------------------------------------------- KV cache, windows, positions
@pytest.mark.parametrize("n_prefix,n_kv_head", [(1, None), (3, 2)])
def test_windows_at_per_row_positions_equal_the_full_forward(n_prefix, n_kv_head):
    """Windows of W=4 codes scored against the cache after an N-token prefix, rows at their own
    positions, stale drafts overwritten: logits equal the full causal forward to 1e-5."""
    model = tiny(n_kv_head=n_kv_head)
    if n_prefix > 1:
        model = with_prefix(model, n_prefix)
    N, L = n_prefix, 16
    codes, cond = torch.randint(0, 32, (2, L)), torch.tensor([1, 4])
    with torch.no_grad():
        full, _ = model(codes, cond)  # full[:, t] predicts code t
        static_caches(model, 2, N + L + 3)
        try:
            first = model.forward_cached(model.cls_embedding(cond), 0)
            assert (first - full[:, 0]).abs().max() <= 1e-5

            def window(starts, tokens):  # tokens (2, 4) at code indices starts .. starts+3
                index = torch.tensor(starts)[:, None] + torch.arange(4)
                return decoding.decode_step(model, model.tok_embeddings(tokens), N + index), index

            junk = (codes[1, 1:4] + 1) % 32  # row 1: code 0 right, three wrong drafts after it
            row1 = torch.cat([codes[1, :1], junk])
            out, index = window([0, 0], torch.stack([codes[0, :4], row1]))
            assert (out[0] - full[0, 1:5]).abs().max() <= 1e-5
            assert (out[1, 0] - full[1, 1]).abs().max() <= 1e-5  # before the first wrong draft
            assert (out[1, 1:] - full[1, 2:5]).abs().max() > 1e-3  # after it: a different prefix
            # row 0 moves on to codes 4..7; row 1 rewrites codes 1..4 over its wrong drafts
            out, _ = window([4, 1], torch.stack([codes[0, 4:8], codes[1, 1:5]]))
            assert (out[0] - full[0, 5:9]).abs().max() <= 1e-5
            assert (out[1] - full[1, 2:6]).abs().max() <= 1e-5
            out, _ = window([8, 5], torch.stack([codes[0, 8:12], codes[1, 5:9]]))
            # the cache has 3 slots of slack past the image: row 0's window may overhang its end
            out, _ = window([12, 9], torch.stack([codes[0, 12:16], codes[1, 9:13]]))
            assert (out[0, :3] - full[0, 13:16]).abs().max() <= 1e-5
            assert (out[1] - full[1, 10:14]).abs().max() <= 1e-5
            cache = model.layers[0].attention.kv_cache
            assert cache.k.shape == (2, n_kv_head or 4, N + L + 3, 8)  # one buffer, never grown
        finally:
            for layer in model.layers:
                layer.attention.kv_cache = None


# ---------------------------------------------------------------------- the fixed-shape decode step
@pytest.mark.parametrize("cfg", CFGS)
def test_static_step_gives_the_eager_codes(cfg):
    model = tiny(token_scale=1.0)
    cond = torch.tensor([0, 3, 4])
    eager = model.generate(cond, greedy=True, **cfg)
    shapes = []

    def spy(model, x, positions):
        shapes.append((tuple(x.shape), tuple(positions.shape)))
        return decoding.decode_step(model, x, positions)
    model.decode_step = spy  # as compile_step installs a compiled step
    static, passes = decoding.generate(model, cond, greedy=True, static=True, return_passes=True,
                                       **cfg)
    assert torch.equal(static, eager) and passes == 16  # one pass per code, the prefill included
    rows = [6 if cfg["cfg_scale"] != 1.0 else 3]
    if "cfg_interval" in cfg:  # guided codes 0..5 come from the prefill and steps 1..5, then 3 rows
        rows = [6] * 5 + [3] * 10
    assert shapes == [((r, 1, 32), (r, 1)) for r in (rows * 15 if len(rows) == 1 else rows)]
    # seeded sampling: the same draws from the same generator, so the same codes
    kw = dict(temperature=1.3, top_k=10, top_p=0.9, **cfg)
    a = model.generate(cond, generator=torch.Generator().manual_seed(5), **kw)
    b = decoding.generate(model, cond, generator=torch.Generator().manual_seed(5), static=True,
                          **kw)
    assert torch.equal(a, b) and len(a.unique()) > 4
    # the Jacobi sampler with a window of one code IS the sequential static sampler
    c = decoding.generate(model, cond, generator=torch.Generator().manual_seed(5), sampler="jacobi",
                          window=1, **kw)
    assert torch.equal(a, c)


def test_static_step_compiles_once_for_the_whole_image():
    """torch.compile sees one graph for every token (positions are tensors, the cache has its full
    length): traced once, never recompiled, also not for a second image."""
    from torch._dynamo.testing import CompileCounter
    model = tiny(token_scale=1.0, n_layer=1)  # one layer: less to trace
    cond = torch.tensor([2, 1])
    eager = model.generate(cond, cfg_scale=2.0, greedy=True)
    counter = CompileCounter()
    model.decode_step = torch.compile(decoding.decode_step, backend=counter, fullgraph=True,
                                      dynamic=False)
    assert torch.equal(decoding.generate(model, cond, cfg_scale=2.0, greedy=True, static=True),
                       eager)
    decoding.generate(model, cond.flip(0), cfg_scale=2.0, greedy=True, static=True)
    assert counter.frame_count == 1


def test_bf16_model_through_every_sampler():
    """A bf16 model on a CPU (its KV caches hold float32, common.attention): the static step and
    greedy Jacobi decoding give the sequential sampler's greedy codes, with and without guidance."""
    model = tiny(token_scale=1.0).to(torch.bfloat16)
    cond = torch.tensor([0, 3, 4])
    for cfg in (dict(cfg_scale=1.0), dict(cfg_scale=3.0)):
        eager = model.generate(cond, greedy=True, **cfg)
        assert len(eager.unique()) > 4
        assert torch.equal(decoding.generate(model, cond, greedy=True, static=True, **cfg), eager)
        jacobi = decoding.generate(model, cond, greedy=True, sampler="jacobi", window=4, **cfg)
        assert torch.equal(jacobi, eager)


# -------------------------------------------------------------------------- greedy Jacobi decoding
@pytest.mark.parametrize("cfg", CFGS)
def test_greedy_jacobi_is_the_greedy_sequence(cfg):
    model = tiny()
    cond = torch.tensor([0, 3, 4, 1])
    sequential = model.generate(cond, greedy=True, **cfg)
    assert len(sequential.unique()) > 4
    for window in (2, 4, 16):
        codes, passes = decoding.generate(model, cond, greedy=True, sampler="jacobi",
                                          window=window, return_passes=True, **cfg)
        assert torch.equal(codes, sequential), window
        assert passes < 16  # fewer passes than codes: several drafts were accepted in one pass
        # each row accepts its own count: alone it needs at most as many passes as in the batch
        alone = [decoding.generate(model, cond[i:i + 1], greedy=True, sampler="jacobi",
                                   window=window, return_passes=True, **cfg) for i in range(4)]
        assert all(torch.equal(c[0], sequential[i]) for i, (c, _) in enumerate(alone))
        assert max(p for _, p in alone) == passes
    assert not model.training and all(layer.attention.kv_cache is None for layer in model.layers)


def test_greedy_jacobi_and_static_step_reproduce_the_official_codes():
    """tests/data/official_gpt_tiny.pt holds the official LlamaGen generate(top_k=1) codes of a tiny
    random model (recorded for test_model.py): both new paths must give them unchanged."""
    fx = torch.load(os.path.join(os.path.dirname(__file__), "data", "official_gpt_tiny.pt"),
                    map_location="cpu", weights_only=True)
    ref = fx["mha"]
    model = load_weights(GPT(GPTConfig(**ref["config"])), ref["state_dict"], "fixture").eval()
    for name, kw in {"cfg1": dict(cfg_scale=1.0), "cfg4": dict(cfg_scale=4.0),
                     "cfg4_interval3": dict(cfg_scale=4.0, cfg_interval=3)}.items():
        expected = ref[f"generate_{name}"]
        for options in (dict(static=True), dict(sampler="jacobi", window=4),
                        dict(sampler="jacobi", window=16)):
            codes = decoding.generate(model, fx["gen_labels"], greedy=True, **options, **kw)
            assert torch.equal(codes, expected), (name, options)


def test_greedy_jacobi_after_a_multi_token_prefix():
    """A 3-token condition prefix (as a caption's embeddings) enters through the prefill."""
    model = with_prefix(tiny(seed=1), 3)
    cond = torch.tensor([1, 2, 0])
    for cfg in (dict(cfg_scale=1.0), dict(cfg_scale=2.0), dict(cfg_scale=2.0, cfg_interval=2)):
        sequential = model.generate(cond, greedy=True, **cfg)
        codes, passes = decoding.generate(model, cond, greedy=True, sampler="jacobi", window=8,
                                          return_passes=True, **cfg)
        assert torch.equal(codes, sequential) and passes < 16 and len(sequential.unique()) > 4
    # the prefix really conditions: other embeddings, other codes
    with torch.no_grad():
        model.cls_embedding.table.mul_(-1)
    other = decoding.generate(model, cond, greedy=True, sampler="jacobi", window=8)
    assert not torch.equal(other, sequential)


def test_progress_callback_and_bad_options():
    model = tiny()
    seen = []
    codes = decoding.generate(model, torch.tensor([1, 2]), greedy=True, sampler="jacobi", window=4,
                              callback=lambda t, c: seen.append((t, c.clone())))
    steps = [t for t, _ in seen]
    assert steps[0] == 1 and steps[-1] == 16 and steps == sorted(steps)
    assert all(torch.equal(c, codes[:, :t]) for t, c in seen)
    with pytest.raises(UserError, match="unknown sampler 'beam'"):
        decoding.generate(model, torch.tensor([1]), sampler="beam")
    with pytest.raises(UserError, match="window 0 is not a whole number >= 1"):
        decoding.generate(model, torch.tensor([1]), sampler="jacobi", window=0)


# ------------------------------------------------------------------- the distribution is unchanged
def enumerable_model():
    """Vocabulary 4, a 2 x 2 grid: 4^4 = 256 sequences, few enough to list them all."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=4, block_size=4, n_layer=2, n_head=2, dim=16, num_classes=3,
                          multiple_of=16))
    with torch.no_grad():
        model.output.weight.normal_(0, 1.0)
    return model.eval()


SETTING = dict(cfg_scale=2.5, cfg_interval=0, temperature=1.3, top_k=3)  # codes 0, 1 guided
SEQUENCES = torch.tensor(list(itertools.product(range(4), repeat=4)))


@torch.no_grad()
def exact_probabilities(model, label):
    """P(sequence) for all 256 sequences under SETTING, by the chain rule over the full forward:
    guided logits uncond + s (cond - uncond) for codes 0..cfg_interval+1, conditional after, then
    temperature and top-k, a softmax per code, the product over the 4 codes."""
    cond = torch.full((len(SEQUENCES),), label)
    logits_c, _ = model(SEQUENCES, cond)
    logits_u, _ = model(SEQUENCES, torch.full_like(cond, 3))  # the null class
    guided = logits_u + SETTING["cfg_scale"] * (logits_c - logits_u)
    inside = (torch.arange(4) <= SETTING["cfg_interval"] + 1)[None, :, None]
    logits = torch.where(inside, guided, logits_c)
    probs = filter_logits(logits, SETTING["temperature"], SETTING["top_k"]).softmax(-1)
    return probs.gather(-1, SEQUENCES[..., None])[..., 0].double().prod(-1)


def tv_bound(p, n, seed=1):
    """The TV distance of n EXACT draws from p fluctuates too: its 99.9% quantile over 1000 seeded
    batches of n draws."""
    draws = torch.multinomial(p.float(), 1000 * n, replacement=True,
                              generator=torch.Generator().manual_seed(seed)).view(1000, n)
    draws = draws + 256 * torch.arange(1000)[:, None]  # one block of 256 cells per batch
    freq = torch.bincount(draws.flatten(), minlength=1000 * 256).view(1000, 256).double() / n
    return torch.quantile(0.5 * (freq - p).abs().sum(-1), 0.999).item()


def fit(model, exact, n, seed=0):
    """n Jacobi samples (window 3: a pass scores 3 of the 4 codes) per label 0 and 2, in ONE batch
    of 2n rows that accept independently; per label: (TV distance, chi-square p-value)."""
    labels = torch.tensor([0, 2]).repeat_interleave(n)
    codes, passes = decoding.generate(model, labels, sampler="jacobi", window=3, return_passes=True,
                                      generator=torch.Generator().manual_seed(seed), **SETTING)
    index = (codes * torch.tensor([64, 16, 4, 1])).sum(-1)
    results = []
    for k, p in enumerate(exact):
        counts = torch.bincount(index[k * n:(k + 1) * n], minlength=256).double()
        tv = 0.5 * (counts / n - p).abs().sum().item()
        # Pearson chi-square over the cells expected >= 5 times, the rest pooled into one cell
        expected = p * n
        big = expected >= 5
        e = torch.cat([expected[big], expected[~big].sum()[None]])
        o = torch.cat([counts[big], counts[~big].sum()[None]])
        results.append((tv, chi2.sf(((o - e) ** 2 / e).sum().item(), len(e) - 1)))
    return results, passes


def test_jacobi_samples_follow_the_exact_distribution(monkeypatch):
    """4000 seeded samples per label against the enumerated distribution (CFG with an interval,
    temperature, top-k). Passes: chi-square p-value > 1e-3 (a fit this bad happens by chance for one
    seed in a thousand) and TV below the 99.9% quantile of the TV of 4000 exact draws (about 0.03).
    The same check must fail, p-value < 1e-6 and TV above that quantile, for wrong acceptance rules:
    always keeping the draft and min(1, q/p) (500 samples show them: copy drafts flood in), and
    min(1, p), which ignores q (right only for the one-hot copy drafts, wrong for the re-drawn ones;
    4000 samples: TV ~0.07-0.11 against a bound of ~0.04, p-values < 1e-10)."""
    model = enumerable_model()
    exact = [exact_probabilities(model, label) for label in (0, 2)]
    for p in exact:
        assert abs(p.sum().item() - 1) < 1e-6 and (p > 0).sum() == 81  # top-3 of 4 codes: 3^4 left
    results, passes = fit(model, exact, 4000)
    assert passes <= 4  # the prefill, then windows of 3: each pass accepts >= 1 code in every row
    bounds = {n: [tv_bound(p, n) for p in exact] for n in (500, 4000)}
    for (tv, pvalue), bound in zip(results, bounds[4000]):
        assert pvalue > 1e-3 and tv < bound < 0.05, (tv, pvalue, bound)
    wrong = {"always": (500, lambda p, q: torch.ones_like(p)),  # gross errors show in 500 samples
             "q/p": (500, lambda p, q: (q / p).clamp(max=1.0)),
             "p only": (4000, lambda p, q: p.clamp(max=1.0))}
    for name, (n, rule) in wrong.items():
        monkeypatch.setattr(decoding, "acceptance_probability", rule)
        results, _ = fit(model, exact, n)
        for (tv, pvalue), bound in zip(results, bounds[n]):
            assert pvalue < 1e-6 and tv > bound, (name, tv, pvalue, bound)


def test_caption_condition_through_jacobi_and_the_static_step():
    """A caption model (features embedded by cap_proj inside jacobi_generate, in eval mode): greedy
    Jacobi and the static step give the sequential codes, with and without guidance."""
    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=4, dim=32,
                          caption_dim=8, cls_token_num=3, multiple_of=16))
    with torch.no_grad():
        model.output.weight.normal_(0, 0.5)
        model.tok_embeddings.weight.mul_(0.1)
    model.train()  # generate must switch condition dropout off on every path
    caption = torch.randn(2, 3, 8)
    for cfg in (dict(cfg_scale=1.0), dict(cfg_scale=2.0, cfg_interval=2)):
        sequential = model.generate(caption, greedy=True, **cfg)
        assert len(sequential.unique()) > 4
        for options in (dict(static=True), dict(sampler="jacobi", window=8)):
            codes, passes = decoding.generate(model, caption, greedy=True, return_passes=True,
                                              **options, **cfg)
            assert torch.equal(codes, sequential), options
            assert passes == 16 if "static" in options else passes < 16
    assert model.training


def caption_model(seed=2, n=4):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=4, dim=32,
                          caption_dim=8, cls_token_num=n, multiple_of=16))
    with torch.no_grad():
        model.output.weight.normal_(0, 0.5)
        model.tok_embeddings.weight.mul_(0.1)
    return model.eval()


def test_padded_captions_through_jacobi_and_the_static_step():
    """Left-padded captions of 4, 2, 3 and 1 valid tokens in one batch (the official key-padding
    mask): greedy Jacobi and the static step give the sequential codes, with guidance (also with
    an interval) and without. The mask really acts: junk in the padded slots changes nothing,
    while the same junk read as caption tokens (no mask) gives other codes."""
    model = caption_model()
    caption = torch.randn(4, 4, 8)
    mask = torch.arange(4)[None, :] >= torch.tensor([0, 2, 1, 3])[:, None]  # valid tokens last
    caption = caption * mask[..., None]  # padded features zeroed, as left_pad_caption leaves them
    junk = torch.where(mask[..., None], caption, torch.randn(4, 4, 8) * 5)
    for cfg in CFGS:
        sequential = model.generate(caption, greedy=True, cond_mask=mask, **cfg)
        assert len(sequential.unique()) > 4
        unpadded = model.generate(junk, greedy=True, **cfg)  # the junk read as caption tokens
        assert torch.equal(unpadded[0], sequential[0])  # row 0 has no padding
        assert all(not torch.equal(unpadded[i], sequential[i]) for i in (1, 2, 3))
        for options in (dict(static=True), dict(sampler="jacobi", window=4),
                        dict(sampler="jacobi", window=16)):
            codes, passes = decoding.generate(model, caption, greedy=True, cond_mask=mask,
                                              return_passes=True, **options, **cfg)
            assert torch.equal(codes, sequential), (cfg, options)
            assert passes == 16 if "static" in options else passes < 16
            assert torch.equal(decoding.generate(model, junk, greedy=True, cond_mask=mask,
                                                 **options, **cfg), sequential)
    # seeded sampling: the static step draws exactly what the eager sampler draws
    kw = dict(cfg_scale=3.0, temperature=1.3, top_k=10, cond_mask=mask)
    a = model.generate(caption, generator=torch.Generator().manual_seed(3), **kw)
    b = decoding.generate(model, caption, generator=torch.Generator().manual_seed(3), static=True,
                          **kw)
    assert torch.equal(a, b)
    with pytest.raises(UserError, match="not left padded"):
        decoding.generate(model, caption, sampler="jacobi", cond_mask=mask.flip(1))


# ---------------------------------------------------------------------- sample.py's speed flags
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny GPT (tiny(): Jacobi accepts several codes per pass) and a VQ-tiny tokenizer of 32
    codes in train.py's format: 16 px pictures of 4x4 codes, 5 classes."""
    import dataclasses

    from common import save_atomic
    from codes import CodesReceipt
    from tokenizer import VQModel, tokenizer_checksum, vq_config
    d = tmp_path_factory.mktemp("speed")
    torch.manual_seed(0)
    vq = VQModel(vq_config("VQ-tiny", codebook_size=32))
    save_atomic(dict(model=vq.state_dict(), config=dataclasses.asdict(vq.config), kind="vq"),
                d / "vq.pt")
    gpt = tiny()
    meta = CodesReceipt(vocab_size=32, grid=(4, 4), image_size=16, n_aug=2, count=10,
                        tokenizer_checksum=tokenizer_checksum(vq), ten_crop=False,
                        crop_range=None, codes_dtype="uint16", labels_dtype="int16",
                        data="synthetic:10", num_classes=5, classes=tuple("abcde")).to_dict()
    save_atomic(dict(model=gpt.state_dict(), config=dataclasses.asdict(gpt.config), kind="gpt",
                     meta=meta), d / "gpt.pt")
    return ["--gpt-ckpt", str(d / "gpt.pt"), "--vq-ckpt", str(d / "vq.pt")], gpt, vq


def draw(checkpoints, tmp_path, capsys, *flags):
    """sample.py with the tiny models, 3 classes x 2 pictures in batches of 4, top-k 1 (the greedy
    choice: the filtered distribution is one-hot) -> (exit code, stdout, stderr, pixels)."""
    import numpy as np
    from PIL import Image

    import sample
    from conftest import run_cli
    out = tmp_path / f"{len(os.listdir(tmp_path))}.png"
    argv = [*checkpoints[0], "--class", 0, 3, 4, "--per-class", 2, "--batch-size", 4,
            "--top-k", 1, "--out", out, *flags]
    code, stdout, err = run_cli(sample.main, argv, capsys)
    return code, stdout, err, np.asarray(Image.open(out)) if code == 0 else None


def test_sample_cli_jacobi_draws_the_greedy_pictures_in_fewer_passes(checkpoints, tmp_path,
                                                                     capsys):
    """--sampler jacobi with top-k 1 gives the pictures of --sampler sequential, pixel for pixel,
    and those are the pictures of GPT.generate's greedy codes; it reports fewer forward passes
    per image than the 16 codes."""
    import re

    import numpy as np

    from common import make_grid
    from sample import decode
    code, _, _, sequential = draw(checkpoints, tmp_path, capsys)
    assert code == 0
    for window in ("4", "16"):
        code, out, _, jacobi = draw(checkpoints, tmp_path, capsys, "--sampler", "jacobi",
                                    "--window", window)
        assert code == 0 and np.array_equal(jacobi, sequential)
        found = re.search(r"jacobi, window (\d+): ([\d.]+) forward passes per image \(min (\d+), "
                          r"max (\d+) over 2 batches; sequential: 16\)", out)
        assert found and found[1] == window and float(found[2]) < 16, out
        assert float(found[2]) == (int(found[3]) + int(found[4])) / 2
    _, gpt, vq = checkpoints
    labels = torch.tensor([0, 0, 3, 3, 4, 4])
    codes = torch.cat([gpt.generate(labels[:4], cfg_scale=4.0, greedy=True),
                       gpt.generate(labels[4:], cfg_scale=4.0, greedy=True)])
    expected = np.asarray(make_grid(torch.from_numpy(decode(vq, codes)).permute(0, 3, 1, 2)
                                    .float() / 127.5 - 1, 2))
    assert np.array_equal(sequential, expected)
    _, out, _, _ = draw(checkpoints, tmp_path, capsys)
    assert "forward passes" not in out  # the sequential sampler's count is the code count


def test_sample_cli_jacobi_progress_gif_has_every_frame(checkpoints, tmp_path, capsys):
    """Jacobi decoding reports several codes at once, yet every frame's step is captured: with
    top-k 1 its animation is the sequential sampler's, frame for frame (one per code)."""
    import numpy as np
    from PIL import Image, ImageSequence
    frames = {}
    for sampler in ("sequential", "jacobi"):
        gif = tmp_path.parent / f"{tmp_path.name}-{sampler}.gif"  # outside the pictures' folder
        code, _, err, _ = draw(checkpoints, tmp_path, capsys, "--sampler", sampler,
                               "--progress", gif, "--progress-frames", 16)
        assert code == 0, err
        frames[sampler] = [np.asarray(f.convert("RGB"))
                           for f in ImageSequence.Iterator(Image.open(gif))]
    assert len(frames["jacobi"]) == 16
    assert all(np.array_equal(a, b) for a, b in zip(frames["jacobi"], frames["sequential"]))
    assert not np.array_equal(frames["jacobi"][3], frames["jacobi"][4])  # frames differ


def test_sample_cli_compile_compiles_the_static_step(checkpoints, tmp_path, capsys,
                                                     monkeypatch):
    """--compile hands decoding.decode_step to torch.compile (fixed shapes: dynamic=False; CUDA
    graphs only on CUDA), and sequential sampling runs through it: one call per code after the
    prefill, the same pictures."""
    import numpy as np
    seen, calls = [], []

    def fake_compile(fn, **kw):
        seen.append((fn.__name__, kw))
        return lambda *a: calls.append(1) or fn(*a)
    code, _, _, plain = draw(checkpoints, tmp_path, capsys)
    monkeypatch.setattr(torch, "compile", fake_compile)
    for flags in ([], ["--sampler", "jacobi"]):
        calls.clear()
        code, _, err, compiled = draw(checkpoints, tmp_path, capsys, "--compile", *flags)
        assert code == 0 and np.array_equal(compiled, plain), err
        assert seen.pop() == ("decode_step", dict(mode=None, dynamic=False))
        assert len(calls) == 2 * 15 if not flags else 0 < len(calls) < 2 * 15


@pytest.mark.parametrize("flags,message", [
    (["--window", "4"], "--window only applies with --sampler jacobi; drop it"),
    (["--sampler", "jacobi", "--window", "0"], "--window must be at least 1, got 0"),
])
def test_sample_cli_refuses_bad_speed_flags(checkpoints, tmp_path, capsys, flags, message):
    code, _, err, _ = draw(checkpoints, tmp_path, capsys, *flags)
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


# -------------------------------------------------------------- bench.py's peer and jacobi rows
@pytest.mark.parametrize("argv,message", [
    (["--only", "peer"], "--only peer needs --peer PATH"),
    (["--only", "vq", "--peer", "x"], "--peer only applies with --only peer; drop it"),
    (["--only", "vq", "--repeat", "2"], "--repeat only applies with --only peer or jacobi"),
    (["--only", "vq", "--window", "4"], "--window only applies with --only jacobi; drop it"),
    (["--only", "jacobi", "--repeat", "0"], "--repeat must be at least 1, got 0"),
    (["--peer", "{tmp}"], "no autoregressive/models/gpt.py there; pass a checkout of"),
    (["--peer", "{broken}"], "importing autoregressive/models/gpt.py failed "
                             "(ModuleNotFoundError: No module named 'nowhere_to_be_found')"),
])
def test_bench_sampling_flags_are_checked(tmp_path, capsys, argv, message):
    """Flags without their benchmark, and checkouts that are not LlamaGen's, are one line each;
    a failed import leaves sys.path and any `utils` module of the caller as they were."""
    import sys
    import types

    import bench
    from conftest import run_cli
    broken = tmp_path / "broken"
    for file in bench.PEER_FILES.values():
        (broken / file).parent.mkdir(parents=True, exist_ok=True)
        (broken / file).write_text("import nowhere_to_be_found\n")
    argv = [a.format(tmp=tmp_path / "empty", broken=broken) for a in argv]
    path, theirs = list(sys.path), types.ModuleType("utils")
    sys.modules["utils"] = theirs
    try:
        code, out, err = run_cli(bench.main, argv, capsys)
        assert sys.path == path and sys.modules["utils"] is theirs
    finally:
        del sys.modules["utils"]
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1 and "== " not in out  # refused before any benchmark ran


def test_bench_jacobi_rows_on_a_trained_checkpoint(checkpoints, capsys):
    """`bench.py --only jacobi --gpt-ckpt`: per batch, the sequential pass count (one per code)
    and a Jacobi count below it, whose ratio is the one printed."""
    import re

    import bench
    from conftest import run_cli
    code, out, err = run_cli(bench.main, ["--only", "jacobi", "--gpt-ckpt",
                                          checkpoints[0][1], "--quick", "--window", "8"], capsys)
    assert code == 0, err
    rows = re.findall(r"batch (\d), CFG 4.0: sequential +\d+ ms/image, 16 passes; jacobi window "
                      r"8 +\d+ ms/image, ([\d.]+) passes \(([\d.]+)x fewer\)", out)
    assert [r[0] for r in rows] == ["1", "2"], out
    for _, passes, fewer in rows:
        assert 16 / 8 < float(passes) < 16 and float(fewer) == round(16 / float(passes), 2)
