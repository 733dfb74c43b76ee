"""FID, sFID, Inception Score, precision and recall: the ADM evaluator's numbers, in PyTorch.

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz    # IS, FID, sFID, precision, recall
    python fid.py reference.npz --save-stats reference_stats.npz # cache statistics for later runs

The paper's ImageNet metrics (paper 3.2) come from ADM's TensorFlow evaluator (guided-diffusion
evaluations/evaluator.py) on its 2015-12-05 Inception-v3 graph: below, that graph in PyTorch with
pytorch-fid's port of its weights, then the metrics as ADM computes them, on ADM's .npz (uint8
N x H x W x 3 under `arr_0`), a folder of images, a statistics .npz, arrays, tensors or batches.
"""
import argparse
import functools
import itertools
import math
import os
import re
import urllib.parse
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (IMAGE_EXTENSIONS, UNREADABLE, UserError, at_least, check_flags, check_writable,
                    cli, download, first_line, load_checkpoint, load_weights, pick_device,
                    progress as progress_bar, read_image, save_atomic, say, unwrap_state_dict)

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")


# ------------------------------------------------------------------------------------------------
# The network, with the names of torchvision's Inception3 that the weight file's keys follow
# (pytorch-fid inception.py). Each block concatenates four or so branches along the channels.
class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (the graph's eps 0.001), ReLU: every conv there is."""
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    # TensorFlow's 'SAME' average pool divides each window by the number of real pixels under it;
    # PyTorch's default also counts the zero padding, which dims every border pixel
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # 35x35 blocks: TF mixed, mixed_1, mixed_2
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):  # 1x1, 5x5, two 3x3 in a row, pool: 64 + 64 + 96 + pool_features
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):  # 35 -> 17 reduction: TF mixed_3
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)  # no padding: (35 - 3) / 2 + 1 = 17
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):  # every branch strides by 2; the pool branch has no conv at all
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # 17x17 blocks, TF mixed_4 .. mixed_7: 7x7 kernels as 1x7 then 7x1
    def __init__(self, cin, mid):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, mid, 1)
        self.branch7x7_2 = BasicConv2d(mid, mid, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(mid, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, mid, 1)
        self.branch7x7dbl_2 = BasicConv2d(mid, mid, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(mid, mid, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(mid, mid, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(mid, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        b7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(b7dbl))
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):  # 17 -> 8 reduction: TF mixed_8, a factorised 7x7 before its stride
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # 8x8 blocks: TF mixed_9, mixed_10; a 1x3 and a 3x1 side by side
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)
        # a quirk of the 2015 graph, kept as the reference statistics use it: its last block
        # (mixed_10) pools with a 3x3 MAX pool where the paper and the other blocks average
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, b3dbl, self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """The FID Inception-v3. forward(images in [0, 1], N x 3 x H x W, any size) returns the three
    feature sets the metrics use: pool (N x 2048), logits (N x 1008) and spatial (N x 2023)."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        # then 3 blocks at 35x35, a reduction, 4 at 17x17, a reduction, 2 at 8x8: 2048 channels
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = (
            InceptionA(cin, pool_features=p) for cin, p in ((192, 32), (256, 64), (288, 64)))
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (
            InceptionC(768, mid=m) for m in (128, 160, 160, 192))
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, pool="avg"), InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # the 1000 classes and unused entries of the label map

    def forward(self, x):
        x = resize299(x) * 2 - 1  # the port's input; TF's own resize differs a little
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 299 -> 149 -> 147
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))  # -> 73 -> 71
        x = F.max_pool2d(x, 3, stride=2)  # -> 35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # 35x35
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # 17x17
        # sFID's features, TF's 'mixed_6/conv': the 1x1 branch of Mixed_6d, first 7 channels,
        # 17x17x7 = 2023 numbers in TF's N H W C order, as ADM's mu_s / sigma_s line up
        spatial = self.Mixed_6d.branch1x1(x)[:, :7].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))))  # 8x8
        pool = x.mean((2, 3))  # TF 'pool_3': the 8x8 average, 2048-d
        # logits: ADM's softmax/logits/MatMul, pool_3 times the weights BEFORE the bias (unused)
        return {"pool": pool, "logits": pool @ self.fc.weight.T, "spatial": spatial}

    @classmethod
    def from_pretrained(cls, path=None):
        """The net with the standard weights: the file at `path`, else the cached/downloaded one."""
        net, state_dict = cls(), unwrap_state_dict(load_checkpoint(path or download_weights()))
        # BatchNorm's step counters, never read here, are absent from files of torch < 0.4.1
        state_dict = {**{k: v for k, v in net.state_dict().items()
                         if k.endswith("num_batches_tracked")}, **state_dict}
        return load_weights(net, state_dict, "Inception", hint="expected the FID Inception file "
                            f"{os.path.basename(WEIGHTS_URL)}").eval().requires_grad_(False)


def resize299(x):
    """N x 3 x H x W -> 299 x 299, bilinear, no antialias; the identity at 299 (so safe early)."""
    return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)


def download_weights(url=WEIGHTS_URL, cache_dir=None):
    """The weight file in torch's hub cache, downloaded if absent, its name's SHA-256 checked."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    path = os.path.join(cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints"), name)
    sha = re.search(r"-([a-f0-9]+)\.", name)
    return download(url, path, sha.group(1) if sha else None,
                    fix=f"fetch {url} by hand and pass --inception PATH or place it at {path}")


# ---------------------------------------------------------- Inputs -> batches of images -> features
def to_float_images(batch, what="images"):
    """uint8 N x H x W x 3 (ADM's) or float N x 3 x H x W -> float N x 3 x H x W in [0, 1]."""
    batch = torch.from_numpy(batch) if isinstance(batch, np.ndarray) else batch
    if not torch.is_tensor(batch):
        raise UserError(f"{what}: expected an array or tensor of images, "
                        f"got {type(batch).__name__}")
    uint8 = batch.dtype == torch.uint8
    if not (uint8 or batch.is_floating_point()):
        raise UserError(f"{what}: images must be uint8 (N x H x W x 3) or float in [0, 1] "
                        f"(N x 3 x H x W), got {batch.dtype}")
    if batch.ndim != 4 or batch.shape[-1 if uint8 else 1] != 3:
        shape = "uint8 images must be N x H x W x 3" if uint8 else \
            "float images must be N x 3 x H x W in [0, 1]"
        raise UserError(f"{what}: {shape}, got shape {tuple(batch.shape)}")
    return batch.permute(0, 3, 1, 2).float().div(255) if uint8 else batch.float()


def _npz_images(path, batch_size, sizes):
    """(count, batches) of arr_0, streamed from the zip member (np.load would read all of it)."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path!r} as an .npz file ({e}); check the file") from None
    if "arr_0.npy" not in archive.namelist():
        archive.close()
        raise UserError(f"{path!r} has no 'arr_0' array; "
                        "save samples with np.savez(path, uint8_nhwc_images)")
    member = archive.open("arr_0.npy")
    v = "1" if np.lib.format.read_magic(member) == (1, 0) else "2"  # header length: 2 or 4 bytes
    shape, fortran, dtype = getattr(np.lib.format, f"read_array_header_{v}_0")(member)
    # the pixels are read below as raw C-order bytes: a Fortran-ordered array would be scrambled
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
        member.close(), archive.close()
        raise UserError(f"{path!r}: arr_0 must hold uint8 images N x H x W x 3 (ADM's format), "
                        f"found {dtype} {tuple(shape)}")
    per_image = int(np.prod(shape[1:]))
    sizes.add(tuple(shape[1:3]))

    def batches():
        with archive, member:
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                if len(data := member.read(n * per_image)) != n * per_image:
                    raise UserError(f"{path!r} is truncated at image {start}; re-save it")
                # a bytearray, so the array is writable (torch.from_numpy warns on read-only)
                yield np.frombuffer(bytearray(data), np.uint8).reshape(n, *shape[1:])
    return shape[0], batches()


def _folder_images(path, batch_size, sizes):
    """(count, batches) of a folder's images, by name; an undecodable one is skipped, counted."""
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith(IMAGE_EXTENSIONS))

    def batches():
        skipped = []
        for start in range(0, len(files), batch_size):
            imgs = []
            for p in files[start:start + batch_size]:
                try:
                    imgs.append(np.array(read_image(p)))
                except UNREADABLE as e:
                    skipped.append(f"{os.path.basename(p)}: {first_line(e)}")
            sizes.update(im.shape[:2] for im in imgs)
            if len({im.shape for im in imgs}) == 1:
                yield np.stack(imgs)
            elif imgs:  # mixed sizes cannot be stacked; the net resizes each to 299: do it first
                yield torch.cat([resize299(to_float_images(im[None])) for im in imgs])
        if skipped:
            say(f"skipped {len(skipped)} unreadable image(s) of {len(files)} in {path} (first: "
                f"{skipped[0]})")
    return len(files), batches()


def image_batches(source, batch_size, sizes=None):
    """(count or None, batches for to_float_images) of a path (.npz or folder), an array/tensor,
    or an iterable of batches (a decoder's, streamed); `sizes` collects a path's image sizes."""
    if isinstance(source, (str, os.PathLike)):
        path, sizes = os.fspath(source), set() if sizes is None else sizes
        if os.path.isdir(path):
            return _folder_images(path, batch_size, sizes)
        if not os.path.isfile(path):
            raise UserError(f"{path!r} does not exist; give an .npz of samples or a folder")
        if not path.endswith(".npz"):
            raise UserError(f"{path!r} is neither an .npz file nor a folder of images")
        return _npz_images(path, batch_size, sizes)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return len(source), (source[i:i + batch_size] for i in range(0, len(source), batch_size))
    return None, iter(source)  # a generator's length is unknown until it is read


def compute_features(net, source, batch_size=64, device="cpu", progress=True):
    """Inception features of the images in `source`: float32 numpy pool, logits and spatial."""
    return batch_features(net, *image_batches(source, batch_size), device, progress)


@torch.inference_mode()
def batch_features(net, count, batches, device="cpu", progress=True):
    """compute_features on batches already drawn (`count`, or None, sizes the progress bar)."""
    net = net.to(device).eval()
    out = {"pool": [], "logits": [], "spatial": []}
    bar = progress_bar(total=count, unit="img", desc="Inception features", show=progress)
    # cuDNN would run these fp32 convolutions in TF32 on recent GPUs; the references are full fp32
    with bar, torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for batch in batches:
            x = to_float_images(batch).to(device)
            for k, v in net(x).items():
                out[k].append(v.float().cpu().numpy())
            bar.update(len(x))
    if not out["pool"]:
        raise UserError("no images found in the input")
    return {k: np.concatenate(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------ Metrics
def statistics(features):
    """Mean and covariance (float64, N - 1 as ADM's np.cov) of N x D features: FID's Gaussian."""
    features = np.asarray(features, dtype=np.float64)  # before the sums: the mean keeps its digits
    if features.ndim != 2 or len(features) < 2:
        raise UserError("need at least 2 feature vectors for a covariance, "
                        f"got shape {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)) of two
    Gaussians: FID on pool_3 (paper 3.2). The trace sums the square roots of the eigenvalues of
    sigma1 sigma2, those of the symmetric b^T sigma2 b for sigma1 = b b^T: unlike ADM's scipy sqrtm
    (and its eps * I retry), two symmetric eigensolves stay exact for singular covariances."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise UserError(f"statistics do not match: means {mu1.shape} vs {mu2.shape}, covariances "
                        f"{sigma1.shape} vs {sigma2.shape}; compare features of the same kind")

    def sqrt_eig(w):  # eigenvalues under a symmetric eigensolver's error (n eps max) are round-off
        floor = len(w) * np.finfo(np.float64).eps * max(w.max(initial=0.0), 0.0)
        return np.sqrt(np.where(w > floor, w, 0.0))
    w, v = np.linalg.eigh(sigma1)  # sigma1 = v diag(w) v^T
    b = v * sqrt_eig(w)  # sigma1 = b b^T
    m = b.T @ sigma2 @ b  # (m + m^T) / 2 below: exactly symmetric, as eigvalsh reads one triangle
    tr_covmean = sqrt_eig(np.linalg.eigvalsh((m + m.T) / 2)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def sfid(spatial1, spatial2):
    """sFID (Nash et al. 2021): FID of the spatial features (N x 2023, or (mu_s, sigma_s))."""
    fit = lambda s: s if isinstance(s, tuple) else statistics(s)  # noqa: E731
    return frechet_distance(*fit(spatial1), *fit(spatial2))


def rfid(reconstructions, originals, net, batch_size=64, device="cpu", progress=True):
    """rFID (paper 3.1): FID of a tokenizer's reconstructions against the images it encoded."""
    streams = [image_batches(images, batch_size)[1] for images in (originals, reconstructions)]
    is_original = []  # per row of the joint batches: the two streams' batches may differ in size

    def together():
        for pair in itertools.zip_longest(*streams):
            parts = [(b, what) for b, what in zip(pair, ("originals", "reconstructions"))
                     if b is not None]
            is_original.extend(np.full(len(b), what == "originals") for b, what in parts)
            if all(isinstance(b, np.ndarray) for b, _ in parts) and \
                    len({b.shape[1:] for b, _ in parts}) == 1:
                # joined as uint8: the N H W C layout of one array, its conv kernels bit for bit
                yield np.concatenate([b for b, _ in parts])
                continue
            floats = [to_float_images(b, what) for b, what in parts]
            if len({tuple(images.shape[2:]) for images in floats}) > 1:
                floats = [resize299(images) for images in floats]  # as the net would
            yield torch.cat(floats)

    pool = batch_features(net, None, together(), device, progress)["pool"]  # in stream order
    is_original = np.concatenate(is_original)
    return frechet_distance(*statistics(pool[~is_original]), *statistics(pool[is_original]))


def inception_score(logits, split_size=5000):
    """Inception Score exp(E_x KL(p(y|x) || p(y))), 1 to 1008: high when each image is surely one
    class and the classes are diverse. (mean, std) over splits of 5000 as ADM (paper Table 6)."""
    scores = []
    for part in torch.as_tensor(np.asarray(logits, np.float64)).split(split_size):
        log_p = part.log_softmax(1)  # log p(y|x), in log space: a one-hot stays exact
        log_marginal = log_p.logsumexp(0) - math.log(len(part))  # log p(y)
        scores.append(math.exp((log_p.exp() * (log_p - log_marginal)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a, b):
    """|a|^2 - 2 a.b + |b|^2 as one matrix product; clamped, as round-off can dip below 0."""
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min_(0)


def manifold_radii(features, k=3, block_rows=None):
    """Squared distance of each vector to its k-th nearest neighbour in the set: its k-NN ball."""
    if (n := len(features)) <= k:
        raise UserError(f"precision/recall need more than k={k} images per set, got {n}")
    rows = block_rows or max(1, (1 << 26) // n)  # blocks of 2^26 distances: 256 MB
    # the (k+1)-th smallest: the smallest is the point to itself, as in ADM (a duplicate counts)
    return torch.cat([_squared_distances(features[i:i + rows], features)
                      .topk(k + 1, dim=1, largest=False).values[:, k] for i in range(0, n, rows)])


def precision_recall(real, fake, k=3, block_rows=None, device="cpu"):
    """Improved precision and recall (Kynkaanniemi et al. 2019), as ADM but float32 (not float16):
    precision, the share of generated images in the real k-NN balls' union; recall, the converse."""
    real, fake = (torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)
                  for x in (real, fake))
    r_real, r_fake = manifold_radii(real, k, block_rows), manifold_radii(fake, k, block_rows)
    fake_in, real_in = (torch.zeros(len(x), dtype=torch.bool, device=device) for x in (fake, real))
    rows = block_rows or max(1, (1 << 26) // len(real))
    for i in range(0, len(fake), rows):
        d = _squared_distances(fake[i:i + rows], real)  # block of fake rows x all real columns
        fake_in[i:i + rows] = (d <= r_real[None]).any(1)  # precision: inside some real ball
        real_in |= (d <= r_fake[i:i + rows, None]).any(0)  # recall: inside some generated ball
    return fake_in.float().mean().item(), real_in.float().mean().item()


# ------------------------------------------------------------ Statistics files and the command line
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "pool")  # ADM's reference-batch names, plus pool


def load_input(path, get_net, batch_size, device):
    """STAT_KEYS (and "sizes") of one CLI argument: from images, stored statistics, or both (ADM's
    reference batches: their mu/sigma of the whole train set win, their images give pool)."""
    found = {}
    if os.path.isfile(path) and path.endswith(".npz"):
        try:
            with np.load(path) as npz:
                found = {k: npz[k] for k in STAT_KEYS if k in npz.files}
                has_images = "arr_0" in npz.files
        except Exception as e:
            # numpy's own advice for object arrays (allow_pickle=True) would run code from the file
            why = ("it holds pickled Python objects, which are never unpickled here; save plain "
                   "numeric arrays" if "pickle" in str(e) else f"{first_line(e)}; check the file")
            raise UserError(f"cannot read {path!r} as an .npz file ({why})") from None
        for key, value in found.items():  # a NaN would print `FID: nan`, an infinity stop eigh
            if not np.issubdtype(value.dtype, np.number):
                raise UserError(f"{path!r}: '{key}' is {value.dtype}, not numbers; re-create the "
                                "statistics file")
            if not np.isfinite(value).all():
                what = "NaN" if np.isnan(value).any() else "infinite values"
                raise UserError(f"{path!r}: '{key}' holds {what}; the statistics are damaged, "
                                "re-create them from the images (--save-stats)")
        if not has_images and "mu" not in found:
            raise UserError(f"{path!r} holds neither images ('arr_0') nor statistics ('mu', "
                            "'sigma'); give an ADM .npz or one written by --save-stats")
        if "mu" in found and "sigma" not in found:
            raise UserError(f"{path!r} has 'mu' but no 'sigma'; re-create the statistics file")
        if not has_images:
            return found
    sizes = set()
    count, batches = image_batches(path, batch_size, sizes=sizes)  # bad input fails before weights
    feats = batch_features(get_net(), count, batches, device)
    stats = dict(zip(STAT_KEYS, (*statistics(feats["pool"]), *statistics(feats["spatial"]))))
    return {**stats, **found, "pool": feats["pool"], "sizes": sizes}  # stored statistics win


def main(argv=None):
    """The command line: IS, FID, sFID, precision and recall of samples against a reference."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", help="an .npz of images (arr_0), a folder or a statistics .npz")
    parser.add_argument("reference", nargs="?", help="the same, or an ADM batch such as "
                        "VIRTUAL_imagenet256_labeled.npz (its stored statistics are used)")
    parser.add_argument("--inception", help="pt_inception-2015-12-05-6726825d.pth (default: "
                        "torch's hub cache, downloaded there)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (ADM's 64)")
    parser.add_argument("--device", default="auto", help="cuda, mps or cpu (default: the best)")
    parser.add_argument("--save-stats", metavar="OUT.npz", help="write the samples' mu, sigma, "
                        "mu_s, sigma_s and pool features here, reusable in place of the images")
    parser.add_argument("--overwrite", action="store_true", help="replace the --save-stats file")
    args = parser.parse_args(argv)
    check_flags(args, {"batch_size": at_least(1)},
                [("overwrite", "--save-stats", lambda a: a.save_stats)])
    if args.reference is None and not args.save_stats:
        raise UserError("give a reference to compare against, or --save-stats OUT.npz to cache "
                        "statistics")
    if args.save_stats:
        check_writable(args.save_stats, args.overwrite, "--save-stats")
    device = pick_device(args.device)
    get_net = functools.cache(lambda: FIDInception.from_pretrained(args.inception))  # if needed
    samples = load_input(args.samples, get_net, args.batch_size, device)
    if args.save_stats:
        stats = {k: v for k, v in samples.items() if k in STAT_KEYS}
        save_atomic(lambda f: np.savez(f, **stats), args.save_stats)
        print(f"statistics of {args.samples} saved to {args.save_stats}")
    if args.reference is None:
        return
    ref = load_input(args.reference, get_net, args.batch_size, device)
    sizes = [", ".join(f"{h}x{w}" for h, w in sorted(x.get("sizes", ()))) for x in (samples, ref)]
    if all(sizes) and sizes[0] != sizes[1]:  # 384 px samples score worse against 256 px references
        say(f"warning: the images of {args.samples} are {sizes[0]} px but those of "
            f"{args.reference} {sizes[1]} px; FID compares them after resizing both to 299 px "
            "(resize the samples to the reference size, e.g. sample.py --resize-to 256)")
    if "pool" in samples:  # IS from the pool features at hand: the logits are one product away
        w = get_net().fc.weight
        pool = torch.from_numpy(samples["pool"]).to(w.device)
        is_mean, is_std = inception_score((pool @ w.T).cpu().numpy())
        print(f"Inception Score: {is_mean:.4f} (std {is_std:.4f} over splits)")
    else:
        print("Inception Score: skipped (needs the samples' images or pool features)")
    print(f"FID: {frechet_distance(samples['mu'], samples['sigma'], ref['mu'], ref['sigma']):.4f}")
    if "mu_s" in samples and "mu_s" in ref:
        print(f"sFID: {sfid(*[(s['mu_s'], s['sigma_s']) for s in (samples, ref)]):.4f}")
    if "pool" in samples and "pool" in ref:
        precision, recall = precision_recall(ref["pool"], samples["pool"], device=device)
        print(f"Precision: {precision:.4f}\nRecall: {recall:.4f}")
    else:
        print("Precision/Recall: skipped (needs images or pool features on both sides)")


if __name__ == "__main__":
    cli(main)
