"""FID, sFID, Inception Score, precision and recall: the ADM evaluator's numbers, in PyTorch.

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz    # IS, FID, sFID, precision, recall
    python fid.py reference.npz --save-stats reference_stats.npz # cache statistics for later runs

The paper's ImageNet metrics (paper 3.2) come from ADM's TensorFlow evaluator (guided-diffusion
evaluations/evaluator.py) and its 2015-12-05 Inception-v3 graph: below, that graph in PyTorch with
the standard port of its weights (pt_inception-2015-12-05-6726825d.pth, pytorch-fid's file), then
the metrics as ADM computes them. Inputs: ADM's .npz (uint8 N x H x W x 3 under `arr_0`), a folder
of images, a statistics .npz, or arrays, tensors and batches. A leaf, like pytorch-fid: it needs
only common.py. (A tokenizer's rFID: `python tokenizer.py --vq-ckpt ... --data ...`.)
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

from common import (IMAGE_EXTENSIONS, UNREADABLE, UserError, at_least, check_flags,
                    check_writable, cli, download, first_line, load_checkpoint, load_weights,
                    pick_device, read_image, save_atomic, say, unwrap_state_dict)
from common import progress as progress_bar  # batch_features' `progress` is its on/off flag

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
        # the stem: 299 -> 35 px in five plain convolutions and two max pools
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        # then 3 blocks at 35x35, a reduction, 4 at 17x17, a reduction, 2 at 8x8: 2048 channels
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, mid=128)
        self.Mixed_6c = InceptionC(768, mid=160)
        self.Mixed_6d = InceptionC(768, mid=160)
        self.Mixed_6e = InceptionC(768, mid=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        # 1008 outputs: the 1000 classes and unused padding entries of the graph's label map
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        # the standard port's input (TF's own resize differs slightly: a gap of every port)
        x = resize299(x) * 2 - 1
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
        load_weights(net, state_dict, "Inception",
                     hint=f"expected the FID Inception file {os.path.basename(WEIGHTS_URL)}")
        return net.eval().requires_grad_(False)


def resize299(x):
    """N x 3 x H x W -> N x 3 x 299 x 299, bilinear (align_corners False, no antialias). From 299 to
    299 it is the identity, so batches resized early (mixed sizes) give the same features."""
    return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)


def download_weights(url=WEIGHTS_URL, cache_dir=None):
    """The weight file in torch's hub cache, downloaded if absent, its name's SHA-256 checked."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    path = os.path.join(cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints"), name)
    sha = re.search(r"-([a-f0-9]+)\.", name)
    return download(url, path, sha.group(1) if sha else None,
                    fix=f"fetch {url} by hand and pass --inception PATH or place it at {path}")


# ------------------------------------------------------------------------------------------------
# Inputs -> batches of images -> features
def to_float_images(batch, what="images"):
    """A uint8 N x H x W x 3 array/tensor (ADM's format) or a float N x 3 x H x W tensor in [0, 1]
    -> float N x 3 x H x W in [0, 1], pytorch-fid's scale (x / 255), the network's input."""
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


def _npz_images(path, batch_size, sizes=None):
    """(count, batches) of arr_0, streamed from the zip member (np.load would read all of it: 50k
    ImageNet samples are ~10 GB); the .npy header says where the pixels start."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path!r} as an .npz file ({e}); check the file") from None
    if "arr_0.npy" not in archive.namelist():
        archive.close()
        raise UserError(f"{path!r} has no 'arr_0' array; "
                        "save samples with np.savez(path, uint8_nhwc_images)")
    member = archive.open("arr_0.npy")
    fmt = np.lib.format  # a 2-byte header length in version 1.0, 4 bytes in 2.0 and 3.0
    read = fmt.read_array_header_1_0 if fmt.read_magic(member) == (1, 0) else \
        fmt.read_array_header_2_0
    shape, fortran, dtype = read(member)
    # the pixels are read below as raw C-order bytes: a Fortran-ordered array would be scrambled
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
        member.close(), archive.close()
        raise UserError(f"{path!r}: arr_0 must hold uint8 images N x H x W x 3 (ADM's format), "
                        f"found {dtype} {tuple(shape)}")
    per_image = int(np.prod(shape[1:]))
    if sizes is not None:
        sizes.add(tuple(shape[1:3]))

    def batches():
        with archive, member:
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                data = member.read(n * per_image)
                if len(data) != n * per_image:
                    raise UserError(f"{path!r} is truncated at image {start}; re-save it")
                # a bytearray, so the array is writable (torch.from_numpy warns on read-only)
                yield np.frombuffer(bytearray(data), np.uint8).reshape(n, *shape[1:])

    return shape[0], batches()


def _folder_images(path, batch_size, sizes=None):
    """(count, batches) of one folder's images (pytorch-fid's extensions, sorted names); one that
    cannot be decoded is left out and counted at the end: a metric of N - 1 images beats none."""
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
            if sizes is not None:
                sizes.update(im.shape[:2] for im in imgs)
            if not imgs:
                continue
            if len({im.shape for im in imgs}) == 1:
                yield np.stack(imgs)
            else:  # mixed sizes cannot be stacked; the net resizes each to 299 anyway: do it first
                yield torch.cat([resize299(to_float_images(im[None])) for im in imgs])
        if skipped:
            say(f"skipped {len(skipped)} unreadable image(s) of {len(files)} in {path} (first: "
                f"{skipped[0]})")

    return len(files), batches()


def image_batches(source, batch_size, sizes=None):
    """(count or None, iterator of batches: uint8 N x H x W x 3 or float N x 3 x H x W in [0, 1])
    of a path (.npz or folder), one array/tensor of all images, or an iterable of batches (a
    decoder's outputs, streamed). sizes: a set that collects the (H, W) of a path's images."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
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


# ------------------------------------------------------------------------------------------------
# Metrics
def statistics(features):
    """Mean and covariance (float64, N - 1 as ADM's np.cov) of N x D features: FID's Gaussian."""
    features = np.asarray(features, dtype=np.float64)  # before the sums: the mean keeps its digits
    if features.ndim != 2 or len(features) < 2:
        raise UserError("need at least 2 feature vectors for a covariance, "
                        f"got shape {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)) of
    two Gaussians; on pool_3 features, FID (paper 3.2; LlamaGen-B 5.46 on ImageNet 256, Table 6).
    The square-root trace sums the square roots of the eigenvalues of sigma1 sigma2, which with
    sigma1 = b b^T are those of the symmetric b^T sigma2 b: two symmetric eigensolves. ADM and
    pytorch-fid run scipy's sqrtm on the non-symmetric product, which fails on singular ones
    (hence their eps * I retry); zeroing the round-off keeps rank-deficient ones exact, no eps."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise UserError(f"statistics do not match: means {mu1.shape} vs {mu2.shape}, covariances "
                        f"{sigma1.shape} vs {sigma2.shape}; compare features of the same kind")
    w, v = np.linalg.eigh(sigma1)  # sigma1 = v diag(w) v^T
    b = v * np.sqrt(_drop_round_off(w))  # sigma1 = b b^T
    m = b.T @ sigma2 @ b  # (m + m^T) / 2 below: exactly symmetric, as eigvalsh reads one triangle
    tr_covmean = np.sqrt(_drop_round_off(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _drop_round_off(eigenvalues):
    """Eigenvalues under a symmetric eigensolver's error (n eps max) are round-off: zero them."""
    floor = len(eigenvalues) * np.finfo(np.float64).eps * max(eigenvalues.max(initial=0.0), 0.0)
    return np.where(eigenvalues > floor, eigenvalues, 0.0)


def sfid(spatial1, spatial2):
    """sFID (Nash et al. 2021, paper 3.2): FID on the 2023-d spatial features, which also penalise
    wrong layouts. Each argument: N x 2023 features, or their (mu_s, sigma_s)."""
    fit = lambda s: s if isinstance(s, tuple) else statistics(s)  # noqa: E731
    return frechet_distance(*fit(spatial1), *fit(spatial2))


def rfid(reconstructions, originals, net, batch_size=64, device="cpu", progress=True):
    """rFID of a tokenizer (paper 3.1): FID of its reconstructions against the very images it
    encoded (ImageNet val crops), one batch of each through the net at a time: two streams."""
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
    n = len(features)
    if n <= k:
        raise UserError(f"precision/recall need more than k={k} images per set, got {n}")
    rows = block_rows or max(1, (1 << 26) // n)  # blocks of 2^26 distances: 256 MB
    # the (k+1)-th smallest: the smallest is the point to itself, as in ADM (a duplicate counts)
    return torch.cat([_squared_distances(features[i:i + rows], features)
                      .topk(k + 1, dim=1, largest=False).values[:, k] for i in range(0, n, rows)])


def precision_recall(real, fake, k=3, block_rows=None, device="cpu"):
    """Improved precision and recall (Kynkaanniemi et al. 2019) on pool_3 features, as ADM:
    precision (fidelity), the share of generated images inside the real images' manifold (a union
    of k-NN balls); recall (coverage), the share of real images inside the generated one. ADM's
    distances are float16, these float32: a point on a ball's very edge may land differently."""
    real, fake = (torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)
                  for x in (real, fake))
    r_real, r_fake = manifold_radii(real, k, block_rows), manifold_radii(fake, k, block_rows)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=device)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=device)
    rows = block_rows or max(1, (1 << 26) // len(real))
    for i in range(0, len(fake), rows):
        d = _squared_distances(fake[i:i + rows], real)  # block of fake rows x all real columns
        fake_in[i:i + rows] = (d <= r_real[None]).any(1)  # precision: inside some real ball
        real_in |= (d <= r_fake[i:i + rows, None]).any(0)  # recall: inside some generated ball
    return fake_in.float().mean().item(), real_in.float().mean().item()


# ------------------------------------------------------------------------------------------------
# Statistics files and the command line
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
    stats = dict(zip(("mu", "sigma"), statistics(feats["pool"])))
    stats.update(zip(("mu_s", "sigma_s"), statistics(feats["spatial"])))
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
    # loaded once, and only if images are embedded or pool features scored (IS)
    get_net = functools.cache(lambda: FIDInception.from_pretrained(args.inception))
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
