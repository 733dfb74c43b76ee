"""fid.py: metrics against closed forms and brute force, the network against pytorch-fid's numbers.

tests/data/inception_keys.txt lists (key, shape) of pytorch-fid's FID Inception (torchvision's Inception3 with
the FID blocks swapped in), the model the standard pt_inception-2015-12-05-6726825d.pth file loads into.
tests/data/inception_parity.pt holds pytorch-fid 0.3.0's outputs (torch 2.14.1) for random_state_dict() on
two_images(): pool3, the fc logits WITH bias, and the first 7 channels of Mixed_6d.branch1x1 (N C H W). They
were generated once in a separate environment that had torchvision; nothing of pytorch-fid is imported here.
"""
import hashlib
import pathlib

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
import torch
from PIL import Image

import fid
from conftest import run_cli
from common import UserError

DATA = pathlib.Path(__file__).parent / "data"


# ---------------------------------------------------------------------------------------------- helpers


def reference_shapes():
    out = []
    for line in (DATA / "inception_keys.txt").read_text().splitlines():
        key, shape = line.split(" ", 1)
        out.append((key, tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())))
    return out


def random_state_dict(shapes):
    """Deterministic random weights (numpy RandomState, so any torch version agrees), in key order. He-scaled
    weights and near-identity batch norms keep activations O(1) through all 94 conv layers."""
    rng = np.random.RandomState(0)
    sd = {}
    for key, shape in shapes:
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.zeros((), dtype=torch.long)
            continue
        if key.endswith("running_var"):
            v = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("bn.weight"):
            v = 1 + 0.1 * rng.standard_normal(shape)
        elif key.endswith(("running_mean", "bias")):
            v = 0.1 * rng.standard_normal(shape)
        else:
            v = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        sd[key] = torch.from_numpy(v.astype(np.float32))
    return sd


def two_images():
    return np.random.RandomState(1).randint(0, 256, size=(2, 64, 80, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def weights():
    return random_state_dict(reference_shapes())


@pytest.fixture(scope="module")
def net(weights):
    net = fid.FIDInception()
    net.load_state_dict(weights)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def two_features(net):
    return fid.compute_features(net, two_images(), progress=False)


@pytest.fixture(scope="module")
def weights_file(weights, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(weights, path)
    return str(path)


def random_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d


# ---------------------------------------------------------------------------------------------- Frechet


def test_frechet_closed_form_for_commuting_gaussians():
    # diagonal covariances in a shared random basis: FD = |dmu|^2 + sum(s1 + s2 - 2 sqrt(s1 s2))
    rng = np.random.default_rng(0)
    d = 64
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s1, s2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    s1[:20] = 0  # and rank-deficient on one side
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    got = fid.frechet_distance(mu1, q @ np.diag(s1) @ q.T, mu2, q @ np.diag(s2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-12)
    # one dimension by hand: N(0, 1) vs N(3, 4) -> 9 + 1 + 4 - 2 * 2 = 10
    assert fid.frechet_distance([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(10.0, abs=1e-12)


def test_frechet_zero_for_identical_and_symmetric():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(50), rng.standard_normal(50)
    s1, s2 = random_cov(rng, 50), random_cov(rng, 50)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)
    forward, backward = fid.frechet_distance(mu1, s1, mu2, s2), fid.frechet_distance(mu2, s2, mu1, s1)
    assert forward > 1 and forward == pytest.approx(backward, rel=1e-10)


def test_frechet_equals_adm_sqrtm_formula():
    # the second code path: ADM / pytorch-fid's |dmu|^2 + tr(s1 + s2 - 2 sqrtm(s1 s2)) with scipy's sqrtm
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(80), rng.standard_normal(80)
    s1, s2 = random_cov(rng, 80), random_cov(rng, 80)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    adm = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(adm, rel=1e-9)


def test_frechet_near_singular_is_finite_and_accurate():
    # covariances of 10 points in 64-d (rank 9 after centring, like FID on fewer images than dimensions).
    # Reference: with sigma1 = B B^T, the nonzero eigenvalues of sigma1 sigma2 are those of B^T sigma2 B (r x r)
    rng = np.random.default_rng(3)
    d = 64
    x, y = rng.standard_normal((10, d)), rng.standard_normal((10, d)) * 2 + 1
    mu1, s1 = fid.statistics(x)
    mu2, s2 = fid.statistics(y)
    b = (x - x.mean(0)).T / 3.0  # s1 = b b^T, since 10 - 1 = 9 = 3^2
    np.testing.assert_allclose(b @ b.T, s1, atol=1e-12)
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(b.T @ s2 @ b), 0, None)).sum()
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-10)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-10)  # rank 9 against itself


def test_frechet_rejects_mismatched_statistics():
    with pytest.raises(UserError, match="do not match"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------------------------- IS, P/R


def test_inception_score_bounds():
    identical = np.tile(np.random.default_rng(0).standard_normal(1008), (40, 1))
    assert fid.inception_score(identical) == pytest.approx((1.0, 0.0), abs=1e-9)
    one_hot = 100.0 * np.eye(10)  # 10 images, each certain of a different class: IS = 10
    assert fid.inception_score(one_hot)[0] == pytest.approx(10.0, rel=1e-9)
    # splits: 4 splits of 5 images, each split 5 distinct classes -> every split scores 5
    labels = np.tile(np.arange(5), 4)
    mean, std = fid.inception_score(100.0 * np.eye(1008)[labels], split_size=5)
    assert mean == pytest.approx(5.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def brute_force_pr(real, fake, k=3):
    """Improved precision/recall straight from the definition, in float64."""
    def radii(x):
        d = scipy.spatial.distance.cdist(x, x, "sqeuclidean")
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself
    d = scipy.spatial.distance.cdist(fake, real, "sqeuclidean")
    return (d <= radii(real)[None]).any(1).mean(), (d <= radii(fake)[:, None]).any(0).mean()


def test_precision_recall():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((300, 16)).astype(np.float32)
    assert fid.precision_recall(real, real) == (1.0, 1.0)
    # samples collapsed onto one real image (mode collapse): all realistic, covering that image only
    collapsed = real[:1] + 1e-3 * rng.standard_normal((12, 16)).astype(np.float32)
    assert fid.precision_recall(real, collapsed) == pytest.approx((1.0, 1 / 300))
    # samples shifted far away: neither realistic nor covering
    assert fid.precision_recall(real, real + 100) == (0.0, 0.0)
    # a generic pair agrees with brute force, whatever the block size
    fake = (rng.standard_normal((250, 16)) * 1.3 + 0.3).astype(np.float32)
    expected = brute_force_pr(real.astype(np.float64), fake.astype(np.float64))
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert fid.precision_recall(real, fake) == pytest.approx(expected, abs=1 / 250)
    assert fid.precision_recall(real, fake, block_rows=7) == fid.precision_recall(real, fake)


# ---------------------------------------------------------------------------------------------- network


def test_state_dict_keys_and_shapes_are_the_standard_files(net):
    ours = [(k, tuple(v.shape)) for k, v in fid.FIDInception().state_dict().items()]
    assert ours == reference_shapes()
    assert len(ours) == 566 and ("fc.weight", (1008, 2048)) in ours


def test_forward_shapes(net):
    for size in [(299, 299), (64, 48)]:  # any input is resized to 299 first
        out = net(torch.rand(1, 3, *size))
        assert {k: tuple(v.shape) for k, v in out.items()} == {"pool": (1, 2048), "logits": (1, 1008),
                                                               "spatial": (1, 2023)}


def test_features_match_pytorch_fid(two_features, weights):
    ref = torch.load(DATA / "inception_parity.pt", weights_only=True)
    feats = two_features
    def close(ours, theirs):
        torch.testing.assert_close(torch.as_tensor(ours), theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())

    close(feats["pool"], ref["pool3"])
    close(torch.from_numpy(feats["logits"]) + weights["fc.bias"], ref["logits_with_bias"])  # ours: ADM's, no bias
    # sFID features: their N C H W map flattened in TF's H W C order
    close(feats["spatial"], ref["mixed_6d_branch1x1_first7"].permute(0, 2, 3, 1).reshape(2, -1))
    assert ref["pool3"].std() > 0.5  # the random net's features are not degenerate


def test_from_pretrained_loads_the_file_strictly(weights, weights_file, tmp_path):
    net = fid.FIDInception.from_pretrained(weights_file)
    assert torch.equal(net.Mixed_7c.branch_pool.conv.weight, weights["Mixed_7c.branch_pool.conv.weight"])
    old = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}  # pre-0.4.1 files
    torch.save(old, tmp_path / "old.pth")
    assert torch.equal(fid.FIDInception.from_pretrained(str(tmp_path / "old.pth")).fc.bias, weights["fc.bias"])
    bad = dict(weights, **{"fc.weight": torch.zeros(1000, 2048)})  # torchvision's ImageNet Inception
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(UserError, match=r"'fc.weight' expected shape \(1008, 2048\)"):
        fid.FIDInception.from_pretrained(str(tmp_path / "bad.pth"))


def test_download_checks_hash_and_fails_clearly(tmp_path):
    payload = b"not really weights"
    sha = hashlib.sha256(payload).hexdigest()[:8]
    src = tmp_path / "src" / f"pt_inception-{sha}.pth"
    src.parent.mkdir()
    src.write_bytes(payload)
    got = fid.download_weights(src.as_uri(), cache_dir=str(tmp_path / "cache"))
    assert got == str(tmp_path / "cache" / src.name) and open(got, "rb").read() == payload
    assert fid.download_weights(src.as_uri(), cache_dir=str(tmp_path / "cache")) == got  # cached: no fetch
    wrong = tmp_path / "src" / "pt_inception-00000000.pth"
    wrong.write_bytes(payload)
    with pytest.raises(UserError, match="--inception PATH"):
        fid.download_weights(wrong.as_uri(), cache_dir=str(tmp_path / "cache"))
    missing = (tmp_path / "nowhere" / "pt_inception-2015-12-05-6726825d.pth").as_uri()
    with pytest.raises(UserError, match=r"cannot download pt_inception-2015-12-05-6726825d\.pth .*place it at"):
        fid.download_weights(missing, cache_dir=str(tmp_path / "cache"))


def test_every_input_kind_gives_the_same_features(net, two_features, tmp_path):
    imgs = two_images()
    np.savez(tmp_path / "s.npz", imgs)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i}.png")
    expected = two_features["pool"]
    floats = torch.from_numpy(imgs[1:]).permute(0, 3, 1, 2).float() / 255
    for source, rows in [(str(tmp_path / "s.npz"), slice(None)), (str(folder), slice(None)),
                         (torch.from_numpy(imgs[:1]), slice(0, 1)), (floats, slice(1, 2)),
                         ([imgs[1:]], slice(1, 2))]:
        np.testing.assert_allclose(fid.compute_features(net, source, batch_size=1, progress=False)["pool"],
                                   expected[rows], rtol=1e-5, atol=1e-5)
    # a folder of mixed sizes: each image is resized on its own, as if it came alone
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(imgs[0]).save(mixed / "0.png")
    Image.fromarray(imgs[1, :, :60].copy()).save(mixed / "1.png")
    narrow = fid.compute_features(net, imgs[1:, :, :60], progress=False)["pool"]
    np.testing.assert_allclose(fid.compute_features(net, str(mixed), progress=False)["pool"],
                               np.concatenate([expected[:1], narrow]), rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="uint8 images must be N x H x W x 3"):
        fid.compute_features(net, imgs[..., 0], progress=False)


def test_rfid_and_sfid_compare_distributions(net):
    imgs = two_images()
    floats = torch.from_numpy(imgs[::-1].copy()).permute(0, 3, 1, 2).float() / 255
    assert fid.rfid(imgs, floats, net) == pytest.approx(0, abs=1e-6)  # same images, other order and format
    x = np.random.default_rng(0).standard_normal((50, 2023))
    assert fid.sfid(x, x[::-1]) == pytest.approx(0, abs=1e-9)
    assert fid.sfid(x, x + 1) == pytest.approx(2023, rel=1e-9)  # a shifted mean only: |dmu|^2


# ---------------------------------------------------------------------------------------------- CLI


def fid_cli(monkeypatch, capsys, *argv):
    """fid.py's command line in-process: (exit code, stdout, stderr)."""
    return run_cli(fid.main, argv, capsys)


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "does not exist"),
    (lambda d: np.savez(d / "x.npz", images=np.zeros((2, 8, 8, 3), np.uint8)), "neither images"),
    (lambda d: np.savez(d / "x.npz", np.zeros((2, 8, 8, 3), np.float32)), "arr_0 must hold uint8"),
    (lambda d: np.savez(d / "x.npz", np.zeros((2, 3, 8, 8), np.uint8)), "arr_0 must hold uint8"),
])
def test_cli_bad_input_is_one_line(make, message, tmp_path, monkeypatch, capsys, weights_file):
    make(tmp_path)
    code, out, err = fid_cli(monkeypatch, capsys, str(tmp_path / "x.npz"), str(tmp_path / "x.npz"),
                             "--inception", weights_file, "--device", "cpu")
    assert code == 2 and message in err and err.count("\n") == 1


def test_cli_metrics_and_saved_stats(net, tmp_path, monkeypatch, capsys, weights_file):
    imgs = np.random.RandomState(2).randint(0, 256, size=(4, 32, 32, 3)).astype(np.uint8)
    # an ADM-style reference: images plus stored statistics, which must be used as they are
    stored = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.ones(2023), "sigma_s": 2 * np.eye(2023)}
    np.savez(tmp_path / "ref.npz", imgs, **stored)
    np.savez(tmp_path / "samples.npz", imgs)
    calls = []  # which statistics reach the Frechet distance (tested above), without 2048-d eigensolves here
    monkeypatch.setattr(fid, "frechet_distance", lambda *a: calls.append(a) or float(len(calls)))
    args = ["--inception", weights_file, "--device", "cpu", "--batch-size", "3"]
    ref_stats, sample_stats = str(tmp_path / "ref_stats.npz"), str(tmp_path / "sample_stats.npz")

    code, out, _ = fid_cli(monkeypatch, capsys, str(tmp_path / "ref.npz"), "--save-stats", ref_stats, *args)
    assert code == 0 and out == f"statistics of {tmp_path / 'ref.npz'} saved to {ref_stats}\n" and not calls
    code, out, _ = fid_cli(monkeypatch, capsys, str(tmp_path / "samples.npz"), ref_stats, "--save-stats",
                           sample_stats, *args)
    assert code == 0
    f = fid.compute_features(net, imgs, progress=False)
    mu, sigma = fid.statistics(f["pool"])
    mu_s, sigma_s = fid.statistics(f["spatial"])
    for got, expected in zip(calls, [(mu, sigma, stored["mu"], stored["sigma"]),
                                     (mu_s, sigma_s, stored["mu_s"], stored["sigma_s"])]):
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    is_mean, is_std = fid.inception_score(f["logits"])
    assert out.splitlines()[1:] == [f"Inception Score: {is_mean:.4f} (std {is_std:.4f} over splits)",
                                    "FID: 1.0000", "sFID: 2.0000",  # the stub's call counts
                                    "Precision: 1.0000", "Recall: 1.0000"]  # same images: P = R = 1
    with np.load(sample_stats) as s:
        assert sorted(s.files) == sorted(fid.STAT_KEYS)
        np.testing.assert_allclose(s["pool"], f["pool"], rtol=1e-5, atol=1e-5)
    # two statistics files: no images, same numbers
    calls.clear()
    code, out2, _ = fid_cli(monkeypatch, capsys, sample_stats, ref_stats, *args)
    assert code == 0 and out2.splitlines() == out.splitlines()[1:]
