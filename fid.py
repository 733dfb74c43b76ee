"""FID, sFID, Inception Score, precision and recall: the ADM evaluator's numbers, in PyTorch.

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz    # IS, FID, sFID, precision, recall
    python fid.py reference.npz --save-stats reference_stats.npz # cache statistics for later runs
    python fid.py --vq-ckpt vq_ds16_c2i.pt --data imagenet/val   # rFID, PSNR, SSIM, usage
    python fid.py samples.npz --clip-score clip-vit-base-patch32 --captions prompts.txt # CLIP score

The paper's ImageNet metrics (paper 3.2) come from ADM's TensorFlow evaluator
(guided-diffusion evaluations/evaluator.py), which runs the 2015-12-05 Inception-v3 graph. Below is
that graph written out in PyTorch, loading the standard port of its weights
(pt_inception-2015-12-05-6726825d.pth, the file pytorch-fid uses) unchanged, then the metrics
computed from its features the way ADM computes them. Inputs: an .npz with uint8 N x H x W x 3
images under `arr_0` (the ADM sample format), a folder of images, a statistics .npz (ADM's reference
batches, or our --save-stats), or, from Python, arrays, tensors or an iterable of batches.

Read top to bottom: the network, its weights, inputs -> image batches -> features, the metrics,
the command line. This file is a leaf: it needs only the tokenizer (for rFID), the pixel rule
(data.to_uint8), the project's image reader (data.read_image) and, for the CLIP score of
text-to-image samples, clip.py.
"""
import argparse
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

import clip
from common import (UserError, cli, download, first_line, load_checkpoint, load_weights,
                    pick_device, save_atomic, say, unwrap_state_dict)
from common import progress as progress_bar  # batch_features' `progress` is its on/off flag
from data import (IMAGE_EXTENSIONS, UNREADABLE, check_image_size, from_uint8, image_dataset,
                  read_image, to_uint8)
from tokenizer import VQModel, codebook_usage_of, psnr, ssim

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")

# ------------------------------------------------------------------------------------------------
# The network: Inception-v3 as frozen in the 2015-12-05 TensorFlow graph. Module and parameter names
# follow torchvision's Inception3, which is what the standard weight file's keys were written from
# (pytorch-fid inception.py swaps its FID blocks into that model). Each block is four or so branches
# run side by side on the same input and concatenated along the channels: wide 1x1 convolutions
# mix channels cheaply, stacked small kernels (3x3 twice, 1x7 then 7x1) see far at a low cost.


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm, ReLU: every conv of the graph. eps 0.001 is the graph's
    own (PyTorch's default is 1e-5)."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    # TensorFlow's 'SAME' average pool divides each window by the number of real pixels under it;
    # PyTorch by default also counts the zero padding, which dims every border pixel.
    # count_include_pad=False is TF's rule.
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
        self.branch_pool = BasicConv2d(cin, pool_features, 1)  # the one width that varies

    def forward(self, x):  # 1x1, 5x5, two 3x3 in a row, pool: 64 + 64 + 96 + pool_features channels
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


class InceptionC(nn.Module):  # 17x17 blocks with factorised 7x7 convolutions: TF mixed_4 .. mixed_7
    """A 7x7 kernel as a 1x7 then a 7x1 (14 weights per channel pair instead of 49), once in one
    branch and twice in another; `mid` is the width inside those branches (128 to 192)."""

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
        b7dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):  # 17 -> 8 reduction: TF mixed_8
    """The second grid reduction, like InceptionB but with a factorised 7x7 before its stride."""

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
        b7 = self.branch7x7x3_1(x)
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(b7)))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # 8x8 blocks with split 1x3 / 3x1 outputs: TF mixed_9, mixed_10
    """At 8x8 the branches widen instead of deepen: a 1x3 and a 3x1 side by side, concatenated."""

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
        # The 2015 graph's last block (mixed_10) pools with a 3x3 MAX pool where the paper and the
        # other blocks average: a quirk of that graph, kept as the reference statistics use it.
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
        # 1008 outputs, not 1000: the 2015 graph's classifier has 1008 rows (the 1000 ImageNet
        # classes plus unused padding entries of its label map). IS uses all of them, as ADM.
        self.fc = nn.Linear(2048, 1008)

    def logits(self, pool):
        # ADM takes the graph's softmax/logits/MatMul, i.e. pool_3 times the weights BEFORE the bias
        # is added; the bias is loaded (the file has it) but IS never uses it.
        return pool @ self.fc.weight.T

    def forward(self, x):
        # The standard port's input convention: bilinear resize to 299 (align_corners False, no
        # antialias), then [0, 1] -> [-1, 1]. TF's own resize differs slightly: a known tiny gap
        # of every PyTorch port.
        x = resize299(x) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 299 -> 149 -> 147
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))  # -> 73 -> 71
        x = F.max_pool2d(x, 3, stride=2)  # -> 35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # 35x35
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # 17x17
        # sFID's features are TF's 'mixed_6/conv': the 1x1 branch of Mixed_6d (conv+BN+ReLU), first
        # 7 of its 192 channels, 17x17 -> 2023 numbers, flattened in TF's N H W C order so that
        # mu_s / sigma_s of the ADM reference batches line up coordinate by coordinate. (The branch
        # is a 1x1 conv: recomputing it here costs ~1% of the forward.)
        spatial = self.Mixed_6d.branch1x1(x)[:, :7].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))))  # 8x8
        pool = x.mean((2, 3))  # TF 'pool_3': the 8x8 average, 2048-d
        return {"pool": pool, "logits": self.logits(pool), "spatial": spatial}

    @classmethod
    def from_pretrained(cls, path=None):
        """The net with the standard weights: the file at `path`, else the cached or downloaded
        one."""
        state_dict = unwrap_state_dict(load_checkpoint(path or download_weights()))
        net = cls()
        # BatchNorm's num_batches_tracked counts training steps and is never read at evaluation; a
        # file written before torch 0.4.1 lacks it, so absent counters are filled in; every real
        # weight stays strict
        for key, value in net.state_dict().items():
            if key.endswith("num_batches_tracked"):
                state_dict.setdefault(key, value)
        load_weights(net, state_dict, "Inception",
                     hint=f"expected the FID Inception file {os.path.basename(WEIGHTS_URL)}")
        return net.eval().requires_grad_(False)


def resize299(x):
    """N x 3 x H x W floats -> N x 3 x 299 x 299, the standard port's input resize (see forward).
    Applying it twice is harmless: a bilinear resize from 299 to 299 (align_corners False) is the
    identity, so batches resized early (mixed-size folders, rfid) give the features they would
    give unresized."""
    return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)  # see forward


def download_weights(url=WEIGHTS_URL, cache_dir=None):
    """Path of the weight file in torch's hub cache (where pytorch-fid keeps it too), downloaded if
    absent. The file name carries the first digits of its SHA-256 (after its last '-'), which
    common.download checks."""
    cache_dir = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
    name = os.path.basename(urllib.parse.urlparse(url).path)
    path = os.path.join(cache_dir, name)
    sha = re.search(r"-([a-f0-9]+)\.", name)
    return download(url, path, sha.group(1) if sha else None,
                    fix=f"fetch {url} by hand and pass --inception PATH or place it at {path}")


# ------------------------------------------------------------------------------------------------
# Inputs -> batches of float images in [0, 1], N x 3 x H x W


def to_float_images(batch, what="images"):
    """A uint8 N x H x W x 3 array/tensor (ADM's format) or a float N x 3 x H x W tensor in [0, 1].
    The network's input adapter, not data.from_uint8: Inception takes pytorch-fid's [0, 1]
    (x / 255), the scale of the float images callers pass; the pixel rule's inverse gives
    [-1, 1]."""
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not torch.is_tensor(batch):
        raise UserError(f"{what}: expected an array or tensor of images, "
                        f"got {type(batch).__name__}")
    if batch.dtype == torch.uint8:
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise UserError(f"{what}: uint8 images must be N x H x W x 3, "
                            f"got shape {tuple(batch.shape)}")
        return batch.permute(0, 3, 1, 2).float().div(255)  # N H W C -> N C H W
    if batch.is_floating_point():
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise UserError(f"{what}: float images must be N x 3 x H x W in [0, 1], "
                            f"got shape {tuple(batch.shape)}")
        return batch.float()
    raise UserError(f"{what}: images must be uint8 (N x H x W x 3) or float in [0, 1] "
                    f"(N x 3 x H x W), got {batch.dtype}")


def _npz_images(path, batch_size, sizes=None):
    """(count, batches) of arr_0, streamed from the zip member: 50k ImageNet samples are ~10 GB in
    memory. np.load would read the whole array; the .npy header says where the pixels start."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path!r} as an .npz file ({e}); check the file") from None
    if "arr_0.npy" not in archive.namelist():
        archive.close()
        raise UserError(f"{path!r} has no 'arr_0' array; "
                        "save samples with np.savez(path, uint8_nhwc_images)")
    member = archive.open("arr_0.npy")
    version = np.lib.format.read_magic(member)  # 1.0 or 2.0: a 2- or 4-byte header length
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}
    # 3.0 (UTF-8 field names) keeps 2.0's 4-byte header length, so the fallback reads it too
    shape, fortran, dtype = read_header.get(version, np.lib.format.read_array_header_2_0)(member)
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
    """(count, batches) of the images in one folder, in sorted file-name order (pytorch-fid's
    extensions; sub-folders are not read), each decoded only when its batch is drawn, by the
    project's one reader (data.read_image: 16-bit and transparent images as training sees them).
    A file that cannot be decoded (corrupt, empty, a decompression bomb) is left out and counted
    in one line at the end, never a crash: a metric over N - 1 images beats no metric."""
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith(IMAGE_EXTENSIONS))

    def readable(chunk, skipped):
        for p in chunk:
            try:
                yield np.array(read_image(p))
            except UNREADABLE as e:
                skipped.append(f"{os.path.basename(p)}: {first_line(e)}")

    def batches():
        skipped = []
        for start in range(0, len(files), batch_size):
            imgs = list(readable(files[start:start + batch_size], skipped))
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
    """(count or None, iterator of image batches) for a path (.npz or folder), one array/tensor
    holding all images, or an iterable of such batches (for example a decoder's outputs,
    streamed). sizes: a set that collects the (H, W) of a path's images as they are read."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            return _folder_images(path, batch_size, sizes)
        if not os.path.isfile(path):
            raise UserError(f"{path!r} does not exist; "
                            "give an .npz of samples or a folder of images")
        if not path.endswith(".npz"):
            raise UserError(f"{path!r} is neither an .npz file nor a folder of images")
        return _npz_images(path, batch_size, sizes)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return len(source), (source[i:i + batch_size] for i in range(0, len(source), batch_size))
    return None, iter(source)  # a generator's length is unknown until it is read


def compute_features(net, source, batch_size=64, device="cpu", progress=True):
    """Inception features of every image in `source`: a dict of float32 numpy arrays pool
    (N x 2048), logits (N x 1008) and spatial (N x 2023), from one pass through the net."""
    return batch_features(net, *image_batches(source, batch_size), device, progress)


@torch.inference_mode()
def batch_features(net, count, batches, device="cpu", progress=True):
    """compute_features on batches already drawn: `count` (or None) only sizes the progress bar.
    Features go to the CPU as numpy after each batch, so 50k images never sit on the GPU."""
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
    # an empty folder or stream: one line, not numpy's "need at least one array to concatenate"
    if not out["pool"]:
        raise UserError("no images found in the input")
    return {k: np.concatenate(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# Metrics


def statistics(features):
    """Mean and covariance (float64) of N x D features: the Gaussian that FID fits to a set of
    images."""
    # float64 before the sums: the mean of 50k vectors keeps its digits, and np.cov (ADM's call)
    # computes in float64 whatever it is given
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise UserError("need at least 2 feature vectors for a covariance, "
                        f"got shape {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)  # N - 1 normalisation, as ADM


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr( (sigma1 sigma2)^(1/2) ).
    On pool_3 features this is FID (paper 3.2; on the 2023-d spatial features, sFID): lower is
    better, 0 for identical statistics, no upper bound, in squared Inception-feature units.
    ImageNet 256 (50k samples vs ADM's reference): BigGAN ~7, LlamaGen-B 5.46, LlamaGen-3B 2.18;
    rFID of VQ-16 2.19 against the val set.

    The square-root trace is the sum of the square roots of the eigenvalues of sigma1 sigma2.
    Writing sigma1 = b b^T (from its eigendecomposition), those are the eigenvalues of the symmetric
    b^T sigma2 b, so two symmetric eigensolves give them. ADM (and pytorch-fid) run scipy's general
    sqrtm on the non-symmetric product instead: it leaves complex round-off, fails on singular
    products (hence their eps * I retry) and took ~6x longer at 2048-d here. Both covariances are
    positive semi-definite, so every eigenvalue is real and >= 0 up to round-off; zeroing that
    round-off keeps rank-deficient covariances (fewer images than dimensions) exact with no eps. The
    result equals ADM's up to rounding (tests/test_fid.py)."""
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise UserError(f"statistics do not match: means {mu1.shape} vs {mu2.shape}, covariances "
                        f"{sigma1.shape} vs {sigma2.shape}; compare features of the same kind")
    w, v = np.linalg.eigh(sigma1)  # sigma1 = v diag(w) v^T
    b = v * np.sqrt(_drop_round_off(w))  # sigma1 = b b^T
    m = b.T @ sigma2 @ b  # symmetric, with the eigenvalues of sigma1 sigma2 = b (b^T sigma2)
    # (m + m^T) / 2: exactly symmetric, as eigvalsh reads only one triangle
    tr_covmean = np.sqrt(_drop_round_off(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _drop_round_off(eigenvalues):
    # A symmetric eigensolver's error is ~ n * machine eps * the largest eigenvalue; anything below
    # that is a zero (or a negative) made of round-off. Its square root would add sqrt(round-off)
    # ~ 1e-8 per eigenvalue.
    floor = len(eigenvalues) * np.finfo(np.float64).eps * max(eigenvalues.max(initial=0.0), 0.0)
    return np.where(eigenvalues > floor, eigenvalues, 0.0)


def _gaussian(features_or_statistics):
    # N x D features, or a (mean, covariance) pair already fitted (a statistics file, ADM's batches)
    if isinstance(features_or_statistics, tuple):
        return features_or_statistics
    return statistics(features_or_statistics)


def sfid(spatial1, spatial2):
    """sFID (Nash et al. 2021, used in paper 3.2): FID on the 2023-d mixed_6/conv spatial features,
    which keep where things are in the image and so also penalise wrong layouts. Same units as FID;
    lower is better. Each argument: N x 2023 features, or their (mu_s, sigma_s)."""
    return frechet_distance(*_gaussian(spatial1), *_gaussian(spatial2))


def rfid(reconstructions, originals, net, batch_size=64, device="cpu", progress=True):
    """rFID of a tokenizer (paper 3.1): FID of its reconstructions against the very images it
    encoded (for ImageNet, the 50k val crops, not ADM's reference batch). VQ-16: 2.19. Either
    argument is anything compute_features accepts. Both go through the net in one pass, a batch of
    originals and the next batch of reconstructions together, so two streams (a tokenizer's
    outputs and its inputs) need never be held in memory."""
    _, original_batches = image_batches(originals, batch_size)
    _, reconstruction_batches = image_batches(reconstructions, batch_size)
    # which stream each row of the joint batches came from: the two streams' batches may differ
    # in size (a short last batch) or in number
    is_original = []

    def together():
        for pair in itertools.zip_longest(original_batches, reconstruction_batches):
            parts = [(b, what) for b, what in zip(pair, ("originals", "reconstructions"))
                     if b is not None]
            is_original.extend(np.full(len(b), what == "originals") for b, what in parts)
            if all(isinstance(b, np.ndarray) for b, _ in parts) and \
                    len({b.shape[1:] for b, _ in parts}) == 1:
                # uint8 arrays of one size are joined before conversion: the batch keeps the
                # N H W C memory layout of one array, and with it the conv kernels, bit for bit
                yield np.concatenate([b for b, _ in parts])
                continue
            floats = [to_float_images(b, what) for b, what in parts]
            if len({tuple(images.shape[2:]) for images in floats}) > 1:
                floats = [resize299(images) for images in floats]  # as the net would
            yield torch.cat(floats)

    pool = batch_features(net, None, together(), device, progress)["pool"]  # in stream order
    is_original = np.concatenate(is_original)
    return frechet_distance(*statistics(pool[~is_original]), *statistics(pool[is_original]))


@torch.inference_mode()
def tokenizer_metrics(vq, images, net=None, batch_size=64, device="cpu", num_workers=0,
                      resize_to=None):
    """The tokenizer's figures on `images` (a dataset of ([-1, 1] image, label), e.g. the ImageNet
    val crops from data.image_dataset), measured as the official evaluation does (LlamaGen
    tokenizer/tokenizer_image/reconstruction_vq_ddp.py): each reconstruction through the pixel rule
    (data.to_uint8), then rFID against the originals, mean PSNR and SSIM, and codebook usage.
    resize_to: originals and reconstructions measured at that size (paper Table 3 measures its 384
    and 512 px tokenizers at 256). One pass over the images, nothing written to disk; net=None
    skips rFID."""
    vq = vq.to(device).eval()
    loader = torch.utils.data.DataLoader(images, batch_size, num_workers=num_workers)
    psnrs, ssims, used = [], [], []

    def pairs():  # per batch: (originals, reconstructions) as uint8, the images rFID compares
        # with rFID, batch_features draws the bar for this same stream: one bar, not two
        for x, _ in progress_bar(loader, desc="reconstructions", unit="batch", show=net is None):
            x = x.to(device)
            codes = vq.encode(x)
            recon = to_uint8(vq.decode(codes), resize_to)
            if resize_to:  # the bicubic resize to_uint8 gives the reconstructions: both alike
                x = F.interpolate(x, size=(resize_to, resize_to), mode="bicubic")
            rounded = from_uint8(recon).to(device)  # PSNR/SSIM of the pixels a PNG would hold
            psnrs.append(psnr(x, rounded).cpu())
            ssims.append(ssim(x, rounded).cpu())
            used.append(codes.unique().cpu())  # distinct codes per batch; their union at the end
            yield to_uint8(x), recon

    # full fp32 convolutions, as batch_features runs them: the same codes with or without rFID
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        if net is None:
            rfid_value = None
            for _ in pairs():
                pass
        else:  # rfid reads one batch of each stream in turn, so tee holds at most one pair
            for_originals, for_reconstructions = itertools.tee(pairs())
            rfid_value = rfid((recon for _, recon in for_reconstructions),
                              (original for original, _ in for_originals), net,
                              device=device)
    return dict(rfid=rfid_value, psnr=torch.cat(psnrs).mean().item(),
                ssim=torch.cat(ssims).mean().item(),
                codebook_usage=codebook_usage_of(torch.cat(used), vq.config.codebook_size))


def inception_score(logits, split_size=5000):
    """Inception Score exp(E_x KL(p(y|x) || p(y))): high when each image is confidently one class
    and the classes are diverse. Between 1 (every prediction identical) and the number of classes
    (1008). Computed over splits of 5000 as ADM does (10 splits for the standard 50k samples);
    returns (mean, std) over splits. ImageNet 256 with CFG: LlamaGen-B 193.61, LlamaGen-3B 263.33
    (paper Table 6)."""
    logits = np.asarray(logits, np.float64)
    scores = []
    for start in range(0, len(logits), split_size):
        # a last, shorter split (N not a multiple of 5000) is scored as it is, as ADM does
        part = logits[start:start + split_size]
        log_p = part - _logsumexp(part, axis=1)  # log p(y|x), in log space: one-hot stays exact
        log_marginal = _logsumexp(log_p, axis=0) - math.log(len(part))  # log p(y)
        kl = (np.exp(log_p) * (log_p - log_marginal)).sum(1).mean()  # E_x KL(p(y|x) || p(y))
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _logsumexp(x, axis):
    # log sum exp without overflow: the largest term is factored out first
    top = x.max(axis=axis, keepdims=True)
    return top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))


def _squared_distances(a, b):
    # |a|^2 - 2 a.b + |b|^2 as one matrix product; clamped, as round-off can dip below 0
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min_(0)


def _rows_per_block(n_cols, block_rows):
    return block_rows or max(1, (1 << 26) // max(n_cols, 1))  # 2^26 floats: a 256 MB distance block


def manifold_radii(features, k=3, block_rows=None):
    """Squared distance from each feature vector to its k-th nearest neighbour in the same set
    (itself excluded): the radius of its ball in the k-NN estimate of the set's manifold."""
    n = len(features)
    if n <= k:
        raise UserError(f"precision/recall need more than k={k} images per set, got {n}")
    rows = _rows_per_block(n, block_rows)
    # the (k+1)-th smallest: the smallest is the point to itself, as in ADM (a duplicate counts)
    return torch.cat([_squared_distances(features[i:i + rows], features)
                      .topk(k + 1, dim=1, largest=False).values[:, k] for i in range(0, n, rows)])


def precision_recall(real, fake, k=3, block_rows=None, device="cpu"):
    """Improved precision and recall (Kynkaanniemi et al. 2019) on pool_3 features, as ADM computes
    them. precision: share of generated images inside the real images' manifold (a union of k-NN
    balls), i.e. fidelity; recall: share of real images inside the generated manifold, i.e.
    coverage/diversity. Both in [0, 1], higher is better. ImageNet 256 vs ADM's 10k reference:
    LlamaGen-B 0.83 / 0.45, LlamaGen-3B 0.81 / 0.58. Distances are computed in row blocks (at most
    ~256 MB each), so 50k x 10k fits in memory. ADM uses float16 distances where they are finite;
    these are float32, so a point on a ball's very edge may land differently."""
    real = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    r_real, r_fake = manifold_radii(real, k, block_rows), manifold_radii(fake, k, block_rows)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=device)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=device)
    rows = _rows_per_block(len(real), block_rows)
    for i in range(0, len(fake), rows):
        d = _squared_distances(fake[i:i + rows], real)  # block of fake rows x all real columns
        fake_in[i:i + rows] = (d <= r_real[None]).any(1)  # precision: inside some real ball
        real_in |= (d <= r_fake[i:i + rows, None]).any(0)  # recall: inside some generated ball
    return fake_in.float().mean().item(), real_in.float().mean().item()


# ------------------------------------------------------------------------------------------------
# Statistics files and the command line

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "pool")  # ADM's reference-batch names, plus pool


def load_input(path, get_net, batch_size, device):
    """Everything the metrics need from one CLI argument, as a dict with some of mu, sigma, mu_s,
    sigma_s, pool: from images (an .npz with arr_0, or a folder), from precomputed statistics, or
    both. An ADM reference batch has both: its stored mu/sigma (over the whole train set) are used
    as they are, and its arr_0 images give the pool features for precision/recall."""
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
        check_statistics(found, path)
        if not has_images and "mu" not in found:
            raise UserError(f"{path!r} holds neither images ('arr_0') nor statistics ('mu', "
                            "'sigma'); give an ADM sample/reference .npz or one written by "
                            "--save-stats")
        if "mu" in found and "sigma" not in found:
            raise UserError(f"{path!r} has 'mu' but no 'sigma'; re-create the statistics file")
        if not has_images:
            return found
    sizes = set()  # (H, W) of every image read, for the size check in score_samples
    # bad input fails here, before the weights load
    count, batches = image_batches(path, batch_size, sizes=sizes)
    feats = batch_features(get_net(), count, batches, device)
    stats = dict(zip(("mu", "sigma"), statistics(feats["pool"])))
    stats.update(zip(("mu_s", "sigma_s"), statistics(feats["spatial"])))
    # stored statistics win over recomputed ones; "sizes" is bookkeeping, never saved
    return {**stats, **found, "pool": feats["pool"], "sizes": sizes}


def check_statistics(found, path):
    """Stored statistics must be finite numbers: a NaN passes through every formula and prints
    as `FID: nan` with exit code 0, and an infinity stops the eigensolver with LinAlgError."""
    for key, value in found.items():
        if not np.issubdtype(value.dtype, np.number):
            raise UserError(f"{path!r}: '{key}' is {value.dtype}, not numbers; re-create the "
                            "statistics file")
        if not np.isfinite(value).all():
            what = "NaN" if np.isnan(value).any() else "infinite values"
            raise UserError(f"{path!r}: '{key}' holds {what}; the statistics are damaged, "
                            "re-create them from the images (--save-stats)")


def check_sizes(samples, ref, names):
    """One warning line when the two sides' images differ in size. Inception resizes both to
    299 px, so FID is still computed, but a 384 px sample set is sharper than 256 px references
    after that resize and scores worse for it: the official evaluation resizes 384 px samples to
    256 first (sample.py --resize-to 256). A warning, not a refusal: comparing sizes can be the
    point of a run; statistics files carry no size, so they are not checked."""
    a, b = samples.get("sizes"), ref.get("sizes")
    if a and b and a != b:
        show = [", ".join(f"{h}x{w}" for h, w in sorted(s)) for s in (a, b)]
        say(f"warning: the images of {names[0]} are {show[0]} px but those of {names[1]} "
            f"{show[1]} px; FID compares them after resizing both to 299 px (resize the samples to "
            "the reference size, e.g. sample.py --resize-to 256)")


# The tokenizer evaluation's own flags, with the defaults they stand for. They default to None so
# that giving one while scoring sample files (where it would do nothing) can be refused.
TOKENIZER_DEFAULTS = dict(image_size=256, resize_to=None, num_images=None, num_workers=4,
                          no_rfid=False)


def build_parser():
    """Both modes' flags, with this module's docstring as the description (so --help shows the
    usage above); main fills in the defaults that depend on the mode."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", nargs="?", help="generated images: .npz with uint8 "
                        "N x H x W x 3 'arr_0', a folder of images, or a statistics .npz")
    parser.add_argument("reference", nargs="?", help="reference: ADM batch such as "
                        "VIRTUAL_imagenet256_labeled.npz (its stored statistics are used), images, "
                        "or a statistics .npz; omit it with --save-stats to only cache the "
                        "statistics of the first argument")
    parser.add_argument("--inception", help="pt_inception-2015-12-05-6726825d.pth (default: "
                        "torch's hub cache, downloaded there when missing)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64, "
                        "ADM's)")
    parser.add_argument("--device", default="auto", help="cuda, mps or cpu (default: the best "
                        "available)")
    parser.add_argument("--save-stats", metavar="OUT.npz", help="write the first argument's mu, "
                        "sigma, mu_s, sigma_s and pool features here, reusable in place of its "
                        "images; an existing file is kept unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="with --save-stats: replace an "
                        "existing file")
    group = parser.add_argument_group("a tokenizer instead of samples (paper Table 2: rFID, PSNR, "
                                      "SSIM, codebook usage)")
    group.add_argument("--vq-ckpt", help="tokenizer checkpoint (ours or the official "
                       "vq_ds16_c2i.pt) to evaluate on --data")
    group.add_argument("--data", help="images it reconstructs, in class sub-folders (the paper: "
                       "the 50k ImageNet val images), or synthetic:N (./synthetic for a folder of "
                       "that name)")
    group.add_argument("--image-size", type=int, help="ADM centre crop size in pixels, a multiple "
                       "of the tokenizer's downsampling factor (default 256)")
    group.add_argument("--resize-to", type=int, help="measure at this size: originals and "
                       "reconstructions resized bicubically, as paper Table 3 measures 384/512 px "
                       "at 256")
    group.add_argument("--num-images", type=int, help="only N images, spread evenly over --data")
    group.add_argument("--num-workers", type=int, help="image-decoding processes (default 4)")
    group.add_argument("--no-rfid", action="store_true", default=None,
                       help="PSNR, SSIM and usage only: no Inception weights needed")
    add_clip_score_flags(parser)
    return parser


def main(argv=None):
    """fid.py's command line (argv: the arguments after the program name, default sys.argv's).
    Two modes: sample files scored against a reference, or --vq-ckpt/--data for a tokenizer. A flag
    of the other mode is refused with one line rather than silently ignored."""
    args = build_parser().parse_args(argv)
    if args.vq_ckpt or args.data:
        if args.clip_score or args.captions or args.clip_prefix is not None:
            raise UserError("--clip-score scores sample images against captions; drop it with "
                            "--vq-ckpt/--data")
        for name, default in TOKENIZER_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, default)  # the defaults users have always had
        return report_tokenizer(args)
    for name in TOKENIZER_DEFAULTS:
        if getattr(args, name) is not None:  # given, even with its default value
            raise UserError(f"--{name.replace('_', '-')} applies to a tokenizer evaluation "
                            "(--vq-ckpt, --data) only; drop it when scoring samples")
    if args.samples is None:
        raise UserError("give the samples to score (an .npz or a folder), or --vq-ckpt and --data "
                        "for a tokenizer")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if report_clip_score(args) and args.reference is None and not args.save_stats:
        return  # text-image alignment alone; with a reference, FID follows as ever
    if args.reference is None and not args.save_stats:
        raise UserError("give a reference to compare against, or --save-stats OUT.npz to cache "
                        "statistics")
    check_save_stats(args)
    score_samples(args)


def check_save_stats(args):
    """--save-stats keeps an existing file unless --overwrite; --overwrite alone does nothing and
    is refused (the statistics of 50,000 images are minutes of Inception time)."""
    if args.overwrite and not args.save_stats:
        raise UserError("--overwrite only applies with --save-stats; drop it")
    if args.save_stats and os.path.exists(args.save_stats) and not args.overwrite:
        raise UserError(f"--save-stats {args.save_stats} already exists; pass --overwrite to "
                        "replace it, or choose another file")


def score_samples(args):
    """The sample mode: IS, FID, sFID, precision and recall of `samples` against `reference`."""
    device = pick_device(args.device)
    net = None

    def get_net():  # loaded once, and only if images are embedded or pool features scored (IS)
        nonlocal net
        net = net or FIDInception.from_pretrained(args.inception)
        return net

    samples = load_input(args.samples, get_net, args.batch_size, device)
    if args.save_stats:
        stats = {k: v for k, v in samples.items() if k in STAT_KEYS}
        save_atomic(lambda f: np.savez(f, **stats), args.save_stats)
        print(f"statistics of {args.samples} saved to {args.save_stats}")
    if args.reference is None:
        return
    ref = load_input(args.reference, get_net, args.batch_size, device)
    check_sizes(samples, ref, (args.samples, args.reference))
    if "pool" in samples:
        inception = get_net()
        # IS from the pool features already at hand: the logits are one matrix product away
        pool = torch.from_numpy(samples["pool"]).to(inception.fc.weight.device)
        is_mean, is_std = inception_score(inception.logits(pool).cpu().numpy())
        print(f"Inception Score: {is_mean:.4f} (std {is_std:.4f} over splits)")
    else:
        print("Inception Score: skipped (needs the samples' images or pool features)")
    print(f"FID: {frechet_distance(samples['mu'], samples['sigma'], ref['mu'], ref['sigma']):.4f}")
    if "mu_s" in samples and "mu_s" in ref:
        spatial = [(stats["mu_s"], stats["sigma_s"]) for stats in (samples, ref)]
        print(f"sFID: {sfid(*spatial):.4f}")
    if "pool" in samples and "pool" in ref:
        precision, recall = precision_recall(ref["pool"], samples["pool"], device=device)
        print(f"Precision: {precision:.4f}\nRecall: {recall:.4f}")
    else:
        print("Precision/Recall: skipped (needs images or pool features on both sides)")


def report_tokenizer(args):
    """The --vq-ckpt mode: tokenizer_metrics of one checkpoint on --data, printed."""
    if not (args.vq_ckpt and args.data):
        raise UserError("a tokenizer evaluation needs both --vq-ckpt and --data")
    if args.samples or args.reference or args.save_stats or args.overwrite:
        raise UserError("--vq-ckpt evaluates a tokenizer on --data alone; drop the "
                        "sample/reference arguments (and --save-stats, --overwrite)")
    for name in ("batch_size", "num_images", "resize_to", "image_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, "
                            f"got {getattr(args, name)}")
    device = pick_device(args.device)
    vq = VQModel.from_pretrained(args.vq_ckpt)  # ours or an official file, topology from shapes
    check_image_size(args.image_size, vq.config.downsample)
    images = image_dataset(args.data, args.image_size, augment="center", flip=False)
    if args.num_images is not None:
        n = min(args.num_images, len(images))
        # evenly spread, so a class-sorted folder (ImageNet val) keeps every class in a subset
        images = torch.utils.data.Subset(images, [i * len(images) // n for i in range(n)])
    net = None if args.no_rfid else FIDInception.from_pretrained(args.inception)
    metrics = tokenizer_metrics(vq, images, net, args.batch_size, device, args.num_workers,
                                args.resize_to)
    print(f"{len(images)} images of {args.data} at {args.image_size} px through {args.vq_ckpt}"
          + (f", measured at {args.resize_to} px:" if args.resize_to else ":"))
    if metrics["rfid"] is not None:
        print(f"rFID: {metrics['rfid']:.4f}")
    print(f"PSNR: {metrics['psnr']:.4f} dB\nSSIM: {metrics['ssim']:.4f}\n"
          f"codebook usage: {100 * metrics['codebook_usage']:.2f}% of {vq.config.codebook_size}")


# ------------------------------------------------------------------------------------------------
# CLIP score: how well text-to-image samples agree with their captions (clip.clip_score says how
# it is computed); LlamaGen's t2i table reports it beside FID, with ViT-B/32 and "A photo depicts"


def add_clip_score_flags(parser):
    """The --clip-score flags, in their own group. --clip-prefix defaults to None rather than to
    the prefix itself, so that main can tell one given (refused with --vq-ckpt) from one left
    alone; '' means no prefix."""
    g = parser.add_argument_group("CLIP score of text-to-image samples (with or without a "
                                  "reference for FID)")
    g.add_argument("--clip-score", metavar="CLIP", help="our CLIP checkpoint (train.py --model "
                   "CLIP-tiny) or a Hugging Face CLIP folder; LlamaGen's protocol: "
                   "openai/clip-vit-base-patch32")
    g.add_argument("--captions", metavar="FILE", help="with --clip-score: a text file with one "
                   "caption per line, line i for image i of the samples")
    g.add_argument("--clip-prefix", default=None, help="with --clip-score: text put before every "
                   f"caption (default {clip.PHOTO_DEPICTS!r}, as CLIPScore and LlamaGen; '' for "
                   "none)")


def read_captions(path):
    """One caption per line (a trailing newline is not one more caption)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read captions {path!r} ({e}); give a UTF-8 text file, one "
                        "caption per line") from None
    return lines[:-1] if lines and lines[-1] == "" else lines


def report_clip_score(args):
    """The --clip-score mode: prints both CLIP scores of args.samples; False when not asked."""
    if not (args.clip_score or args.captions or args.clip_prefix is not None):
        return False
    if not (args.clip_score and args.captions):
        raise UserError("a CLIP score needs both --clip-score CLIP and --captions FILE")
    captions = read_captions(args.captions)
    count, batches = image_batches(args.samples, args.batch_size)
    if count is not None and count != len(captions):
        raise UserError(f"{args.captions} has {len(captions)} captions for {count} images in "
                        f"{args.samples}; give one caption per image, in order")
    model, tokenizer = clip.load(args.clip_score)
    model = model.to(pick_device(args.device))
    prefix = clip.PHOTO_DEPICTS if args.clip_prefix is None else args.clip_prefix
    # uint8 batches are the samples' own pixels; a folder of mixed sizes arrives as floats in [0, 1]
    floats = (from_uint8(b) if isinstance(b, np.ndarray) else b * 2 - 1 for b in batches)
    got = clip.clip_score(model, progress_bar(floats, desc="CLIP"), captions, tokenizer,
                          prefix)
    print(f"CLIP score ({got['count']} images, prefix {prefix!r}, {args.clip_score}):\n"
          f"  mean cosine x 100 (LlamaGen, GigaGAN): {got['clip_score']:.4f}\n"
          f"  CLIPScore x 100 (Hessel et al. 2021, 2.5 max(cos, 0)): {got['clipscore']:.4f}")
    return True


if __name__ == "__main__":
    cli(main)
