"""The image tokenizer (paper 2.1-2.2): a VQGAN-style encoder cuts an image into a grid of vectors,
each is replaced by its nearest entry in a learned codebook, and the index of that entry is the
image token. The decoder turns a grid of codes back into pixels. Also here: the tokenizer's training
losses (L2, LPIPS, PatchGAN) and the reconstruction metrics (PSNR, SSIM, codebook usage).

Read top to bottom, smallest pieces first: blocks -> Encoder/Decoder -> VectorQuantizer ->
VQModel -> losses -> metrics -> named configs. Key names and shapes equal the official LlamaGen
checkpoints (vq_ds16_c2i.pt, vq_ds8_c2i.pt), which load with VQModel.from_pretrained."""
import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (UserError, attention, download, load_checkpoint, load_weights,
                    unwrap_state_dict, weights_checksum)


@dataclass
class VQConfig:
    """The tokenizer's topology and codebook; the defaults are VQ-16 (paper Table 2), field names
    as the official tokenizer/tokenizer_image/vq_model.py ModelArgs where they exist."""
    codebook_size: int = 16384  # K: the image vocabulary the GPT predicts over
    codebook_embed_dim: int = 8  # the low-dimensional lookup space (see the quantizer below)
    codebook_l2_norm: bool = True  # codes and encoder outputs on the unit sphere
    commit_loss_beta: float = 0.25  # weight of the commitment term, as VQ-VAE
    entropy_loss_ratio: float = 0.0  # weight of entropy_loss; the paper trains without it
    ch: int = 128  # width of the first level; GroupNorm(32) needs every width to divide by 32
    ch_mult: tuple = (1, 1, 2, 2, 4)  # width multiplier per level; len - 1 halvings: 16x downsample
    z_channels: int = 256  # the encoder's output width, before quant_conv takes it down to 8
    enc_num_res_blocks: int = 2
    dec_num_res_blocks: int = 3  # the official decoder has one more per level than the encoder
    dropout: float = 0.0

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)  # a list after a round trip through a checkpoint

    @property
    def downsample(self):
        return 2 ** (len(self.ch_mult) - 1)


# ------------------------------------------------------------------------------------------------
# Building blocks (the taming-transformers VQGAN layout that LlamaGen keeps)

def group_norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Two norm-swish-conv steps and a residual connection; a 1x1 conv on the shortcut when the
    width changes (its official name, nin_shortcut, is "network in network")."""

    def __init__(self, c_in, c_out, dropout=0.0):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))  # silu = swish, x * sigmoid(x)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions; only used at the lowest resolution, where
    h*w is small (16x16 for VQ-16 at 256 px)."""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        # 1x1 convolutions: per-position linear maps, stored as convs to keep the official keys
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))
        h = attention(q, k, v)  # [B, 1, HW, C], scale C^-0.5
        return x + self.proj_out(h.squeeze(1).transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)  # a learned 2x downsampling

    def forward(self, x):
        # pad right and bottom only: the official (taming) asymmetric padding, so weights transfer
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)  # smooths the nearest-neighbour 2x

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def run_level(level, h):
    """One resolution level of the encoder or decoder: its res blocks in turn, each followed by
    its attention block where the level has them (the lowest resolution only)."""
    for j, res in enumerate(level.res):
        h = res(h)
        if len(level.attn):
            h = level.attn[j](h)
    return h


class Encoder(nn.Module):
    """Image [B,3,H,W] -> features [B, z_channels, H/ds, W/ds]. One level per entry of ch_mult, each
    halving the resolution except the last; attention only in the last (lowest-resolution) level."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        width_in = cfg.ch
        for i, width in enumerate(widths):
            # a bare nn.Module as a namespace: its attribute names give the official keys
            # (encoder.conv_blocks.{i}.res.{j}, .attn.{j}, .downsample)
            level, last = nn.Module(), i == len(widths) - 1
            level.res = nn.ModuleList(ResnetBlock(width_in if j == 0 else width, width, cfg.dropout)
                                      for j in range(cfg.enc_num_res_blocks))
            level.attn = nn.ModuleList(AttnBlock(width)
                                       for _ in range(cfg.enc_num_res_blocks if last else 0))
            if not last:
                level.downsample = Downsample(width)
            self.conv_blocks.append(level)
            width_in = width
        self.mid = nn.ModuleList([ResnetBlock(width_in, width_in, cfg.dropout), AttnBlock(width_in),
                                  ResnetBlock(width_in, width_in, cfg.dropout)])
        self.norm_out = group_norm(width_in)
        self.conv_out = nn.Conv2d(width_in, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features [B, z_channels, h, w] -> image [B,3,h*ds,w*ds], the encoder's levels in reverse
    (deepest first), with one more res block per level than the encoder."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in reversed(cfg.ch_mult)]
        width_in = widths[0]
        self.conv_in = nn.Conv2d(cfg.z_channels, width_in, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(width_in, width_in, cfg.dropout), AttnBlock(width_in),
                                  ResnetBlock(width_in, width_in, cfg.dropout)])
        self.conv_blocks = nn.ModuleList()
        for i, width in enumerate(widths):
            level = nn.Module()
            level.res = nn.ModuleList(ResnetBlock(width_in if j == 0 else width, width, cfg.dropout)
                                      for j in range(cfg.dec_num_res_blocks))
            level.attn = nn.ModuleList(AttnBlock(width)
                                       for _ in range(cfg.dec_num_res_blocks if i == 0 else 0))
            if i != len(widths) - 1:
                level.upsample = Upsample(width)
            self.conv_blocks.append(level)
            width_in = width
        self.norm_out = group_norm(width_in)
        self.conv_out = nn.Conv2d(width_in, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # no tanh: about [-1, 1], see decode


# ------------------------------------------------------------------------------------------------
# Vector quantizer (paper 2.2)
#
# Why low-dimensional, l2-normalised codes: with the classic VQ-VAE codebook (256-d, Euclidean
# lookup) most entries are never the nearest neighbour of any encoder output, receive no gradient
# and die, and only about 50 of 16384 codes end up used (paper Table 2: 0.29% usage at 256-d).
# Projecting the encoder output down to 8 dimensions and putting both it and the codes on the unit
# sphere makes the lookup a cosine similarity over a small, bounded space that the codes cover
# densely, so almost every code is the winner somewhere (97% usage at 8-d) and reconstruction
# improves (rFID 2.19 vs 9.21 at 256-d).

def entropy_loss(distances, temperature=0.01):
    """Low entropy per vector (confident assignments) minus entropy of the batch-average assignment
    (spread over all codes); from MaskGIT. LlamaGen ships it with weight 0 (paper: not used)."""
    logits = -distances / temperature
    probs = logits.softmax(-1)
    sample_entropy = -(probs * logits.log_softmax(-1)).sum(-1).mean()
    avg_probs = probs.mean(0)
    avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()  # +1e-5 as the official code
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    """Nearest-code lookup, the codebook terms of the loss and the straight-through gradient."""
    usage_window = 65536  # the official usage statistic: distinct codes among the last 65536

    def __init__(self, cfg):
        super().__init__()
        self.l2_norm, self.beta = cfg.codebook_l2_norm, cfg.commit_loss_beta
        self.entropy_ratio = cfg.entropy_loss_ratio
        # FIFO of the most recent training indices; a float32 buffer in the official checkpoints
        self.register_buffer("codebook_used", torch.zeros(self.usage_window))
        # (given its tensor, so nn.Embedding skips its own normal init, overwritten at once)
        shape = (cfg.codebook_size, cfg.codebook_embed_dim)
        self.embedding = nn.Embedding(*shape, _weight=torch.empty(shape))
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        if self.l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)

    def codebook(self):
        """The code vectors as used: the raw parameter drifts off the sphere during training, so
        it is re-normalised at every use."""
        return F.normalize(self.embedding.weight, dim=-1) if self.l2_norm else self.embedding.weight

    def lookup(self, codes):
        """codes [B, h, w] -> code vectors [B, D, h, w]."""
        return F.embedding(codes, self.codebook()).permute(0, 3, 1, 2)

    def distances(self, z, e):
        """Squared distances [N, K] between vectors z [N, D] and codes e [K, D] (2 - 2cos when
        l2-normalised); written out like the official code so ties and rounding resolve the same
        way."""
        return z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()

    def nearest(self, z):
        """z [B, D, h, w] -> (the vectors as compared [N, D], distances [N, K], nearest codes
        [N]), N = B*h*w in raster order. In fp32 even under bf16 autocast: bf16 cosines (3
        digits) confuse nearby codes."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            if self.l2_norm:
                z = F.normalize(z, dim=-1)
            d = self.distances(z, self.codebook())
        return z, d, d.argmin(1)

    def forward(self, z):
        """z [B, D, h, w] -> (quantized [B, D, h, w] with straight-through gradient, codes [B, h,
        w], dict(vq, commit, entropy))."""
        B, D, h, w = z.shape
        z, d, idx = self.nearest(z)
        z_q = self.codebook()[idx]
        losses = dict(
            vq=F.mse_loss(z_q, z.detach()),  # moves the codes towards the encoder outputs
            commit=self.beta * F.mse_loss(z, z_q.detach()),  # keeps the encoder near its code
            entropy=self.entropy_ratio * entropy_loss(d) if self.entropy_ratio else d.new_zeros(()))
        if self.training:
            n = min(idx.numel(), self.usage_window)
            self.codebook_used.copy_(torch.cat([self.codebook_used[n:], idx[-n:].float()]))
        # straight-through estimator: the forward pass uses z_q, the backward pass hands the
        # decoder's gradient to z unchanged (argmin has no gradient)
        z_q = z + (z_q - z).detach()
        return z_q.view(B, h, w, D).permute(0, 3, 1, 2), idx.view(B, h, w), losses


def codebook_usage_of(codes, codebook_size):
    """Dataset-level usage for evaluation: the fraction of the codebook that occurs in `codes`
    (any shape, e.g. every code of a validation set)."""
    return torch.unique(codes).numel() / codebook_size


# ------------------------------------------------------------------------------------------------
# The tokenizer

def config_from_state_dict(sd):
    """Read the topology off the weight shapes; the official files carry no config. The number of
    downsample convs tells VQ-16 (4) from VQ-8 (3)."""
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.conv_blocks."))

        def blocks(prefix):
            return 1 + max(int(k.split(".")[4]) for k in sd if k.startswith(prefix))
        return VQConfig(
            codebook_size=sd["quantize.embedding.weight"].shape[0],
            codebook_embed_dim=sd["quantize.embedding.weight"].shape[1],
            ch=ch,
            ch_mult=tuple(sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch
                          for i in range(levels)),
            z_channels=sd["quant_conv.weight"].shape[1],
            enc_num_res_blocks=blocks("encoder.conv_blocks.0.res."),
            dec_num_res_blocks=blocks("decoder.conv_blocks.0.res."))
    except (KeyError, ValueError, IndexError):  # a missing weight name, or no levels at all
        raise UserError("not a VQ tokenizer state dict (its weight names lack the "
                        "encoder/decoder/quantize layout); pass a tokenizer checkpoint") from None


def config_name(cfg):
    """The registry name of a config, or its non-default fields, for messages."""
    for name in VQ_CONFIGS:
        if vq_config(name) == cfg:
            return name
    diff = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != f.default}
    return "VQConfig(" + ", ".join(f"{k}={v}" for k, v in diff.items()) + ")"


class VQModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        # 1x1 convolutions into and out of the low-dimensional code space (8-d for VQ-16)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    def encode(self, images):
        """images [B,3,H,W] in [-1,1] -> codes int64 [B, H/ds, W/ds] (no losses, no usage
        update)."""
        z = self.quant_conv(self.encoder(images))
        B, _, h, w = z.shape
        return self.quantize.nearest(z)[2].view(B, h, w)

    def decode(self, codes):
        """codes int64 [B, h, w] -> images [B, 3, h*ds, w*ds], about [-1, 1] but not clamped,
        like the official decode_code: pixels come from data.to_uint8, the one place that resizes,
        clamps and rounds."""
        if codes.dim() != 3:
            raise UserError(f"decode expects codes [B, h, w], got shape {tuple(codes.shape)}")
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes)))

    def forward(self, images):
        """Training path: images -> (reconstruction, unclamped; dict of codebook losses
        vq/commit/entropy)."""
        z_q, _, losses = self.quantize(self.quant_conv(self.encoder(images)))
        return self.decoder(self.post_quant_conv(z_q)), losses

    def codebook_usage(self):
        """Fraction of the codebook among the last 65536 training indices (paper Table 2's
        usage). Like the official statistic it counts the buffer's initial zeros as code 0 and is
        per process."""
        return codebook_usage_of(self.quantize.codebook_used, self.config.codebook_size)

    @classmethod
    def from_pretrained(cls, path, config=None):
        """Load our checkpoint ({"model", "config", "kind": "vq"}) or an official one
        (vq_ds16_c2i.pt, vq_ds8_c2i.pt: weights under "model", topology read from the shapes).
        `config` (a name or a VQConfig) forces a topology. Returns the model in eval mode on the
        CPU."""
        ckpt = load_checkpoint(path)
        if isinstance(ckpt, dict) and ckpt.get("kind", "vq") != "vq":
            raise UserError(f"{path} is a {ckpt['kind']!r} checkpoint, not a tokenizer; "
                            "pass a VQ checkpoint")
        sd = unwrap_state_dict(ckpt)
        fits = config_from_state_dict(sd)
        if isinstance(config, str):
            config = vq_config(config)
        elif config is None and isinstance(ckpt.get("config"), dict):
            try:
                config = VQConfig(**ckpt["config"])
            except TypeError as e:
                raise UserError(f"{path}: unreadable tokenizer config ({e}); "
                                "re-save the checkpoint") from None
        config = config or fits
        hint = f"its shapes fit {config_name(fits)}"
        model = cls(config)
        load_weights(model, sd, f"tokenizer {path}", hint=hint)
        return model.eval()


def tokenizer_checksum(vq):
    """sha256 of a tokenizer's weights (common.weights_checksum): the same for a model whichever
    file it came from (ours or an official release), so codes can be matched to the tokenizer that
    decodes them. data.py records it in every codes folder's receipt."""
    return weights_checksum(vq)


# ------------------------------------------------------------------------------------------------
# Training losses (paper 2.2: L2 + LPIPS + PatchGAN + codebook terms)

class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018), the perceptual loss: VGG16 features at five depths,
    unit-normalised over channels, squared differences weighted per channel by learned 1x1 heads
    lin0..lin4, averaged over space and summed. Weights: torchvision's VGG16 (key layout
    `features.N`) and LPIPS's vgg.pth."""
    vgg_layout = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
    taps = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in features
    # file name -> (address, sha256 prefix); vgg.pth is LPIPS v0.1's, byte-identical to LlamaGen's
    files = {"vgg16-397923af.pth": ("https://download.pytorch.org/models/vgg16-397923af.pth",
                                    "397923af"),
             "vgg.pth": ("https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/"
                         "weights/v0.1/vgg.pth", "a78928a0")}

    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for v in self.vgg_layout:  # a width: 3x3 conv + ReLU; "M": 2x2 max pool
            if v == "M":
                layers += [nn.MaxPool2d(2, 2)]
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        # Dropout(0.5) before each head, as in LPIPS: the official trainer keeps the loss module in
        # train mode, so half the channel differences are dropped (the rest doubled) at each step
        for i, width in enumerate((64, 128, 256, 512, 512)):
            head = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(width, 1, 1, bias=False))
            setattr(self, f"lin{i}", head)
        # LPIPS's ScalingLayer: [-1, 1] inputs to the ImageNet normalisation VGG was trained with
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        self.register_buffer("shift", shift, persistent=False)  # constants, not in the files
        self.register_buffer("scale", scale, persistent=False)
        self.requires_grad_(False)

    def load(self, folder):
        """Weights from `folder`/vgg16-397923af.pth (torchvision ImageNet VGG16) and
        `folder`/vgg.pth."""
        vgg = unwrap_state_dict(load_checkpoint(os.path.join(folder, "vgg16-397923af.pth")))
        lin = unwrap_state_dict(load_checkpoint(os.path.join(folder, "vgg.pth")))
        sd = {k: v for k, v in vgg.items() if k.startswith("features.")}
        sd.update({k.replace(".model.", "."): v for k, v in lin.items()})  # LPIPS: linN.model.1
        return load_weights(self, sd, "LPIPS")

    @classmethod
    def from_folder(cls, folder=None):
        """LPIPS from `folder`; with no folder, from torch's cache (downloading the files when
        online). A UserError names the missing files when the weights cannot be had: training on
        without the perceptual term would be a different recipe, so that is only done when asked
        for."""
        given = folder is not None
        folder = folder or os.path.join(torch.hub.get_dir(), "checkpoints")
        missing = [f for f in cls.files if not os.path.isfile(os.path.join(folder, f))]
        fix = (f"fetch {' and '.join(cls.files[f][0] for f in missing)} into a folder and pass "
               "--lpips FOLDER, or train without it: --perceptual-weight 0")
        if missing and given:  # a folder named by the user is never written to
            raise UserError(f"perceptual loss (LPIPS): {', '.join(missing)} not found in "
                            f"{folder!r}; {fix}")
        for name in missing:
            url, sha256_prefix = cls.files[name]
            try:
                download(url, os.path.join(folder, name), sha256_prefix, fix)
            except UserError as e:
                raise UserError(f"perceptual loss (LPIPS): {e}") from None
        return cls().load(folder)

    def forward(self, x, y):
        """x, y [B,3,H,W] in [-1,1] -> distance per image [B]."""
        h = (torch.cat([x, y]) - self.shift) / self.scale
        dist = 0
        for i, layer in enumerate(self.features[:self.taps[-1] + 1]):
            h = layer(h)
            if i in self.taps:
                f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fx, fy = f.chunk(2)
                dist = dist + getattr(self, f"lin{self.taps.index(i)}")((fx - fy) ** 2).mean((2, 3))
        return dist.flatten()


class PatchGAN(nn.Module):
    """pix2pix NLayer discriminator (3 layers, ndf 64): one real/fake logit per overlapping patch.
    Key layout `main.N` as the official trainer's "discriminator" state dict."""

    def __init__(self, ndf=64, n_layers=3):
        super().__init__()
        layers, width_in = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], ndf
        for n in range(1, n_layers + 1):  # widths double up to 8 x ndf; the last layer keeps size
            width = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(width_in, width, 4, stride, 1, bias=False),  # BN's shift instead
                       nn.BatchNorm2d(width), nn.LeakyReLU(0.2, True)]
            width_in = width
        layers.append(nn.Conv2d(width_in, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake):
    return -logits_fake.mean()


class VQLoss(nn.Module):
    """The tokenizer's objective. Generator: L2 + perceptual_weight * LPIPS + codebook terms,
    plus disc_weight * hinge GAN loss from step `disc_start` on. Discriminator: disc_weight *
    hinge loss from `disc_start` on (before then it is multiplied by 0, so train.py skips that
    step: see gan_active). Perceptual term: LPIPS weights from `lpips_path` (a folder with
    vgg16-397923af.pth and vgg.pth) or, without it, from torch's cache / a download; an error
    when unavailable (perceptual_weight 0: not used)."""

    def __init__(self, disc_start=20000, disc_weight=0.5, perceptual_weight=1.0, lpips_path=None):
        super().__init__()
        self.disc_start, self.disc_weight = disc_start, disc_weight
        self.perceptual_weight = perceptual_weight
        self.discriminator = PatchGAN()
        self.lpips = LPIPS.from_folder(lpips_path) if perceptual_weight > 0 else None

    def gan_active(self, step):
        """step counts from 0; the official trainer counts the step being taken from 1, so
        disc_start 20000 makes the 20,000th step the first adversarial one, as there."""
        return self.disc_weight > 0 and step + 1 >= self.disc_start

    def generator_loss(self, images, recon, codebook_losses, step):
        """-> (loss, logs of detached scalars). The discriminator's parameters get gradients here
        too: zero them before its own step."""
        logs = dict(rec=F.mse_loss(recon, images), **codebook_losses)
        loss = sum(logs.values())
        if self.lpips is not None:
            logs["perceptual"] = self.lpips(images, recon).mean()
            loss = loss + self.perceptual_weight * logs["perceptual"]
        if self.gan_active(step):
            logs["gen_adv"] = hinge_g_loss(self.discriminator(recon))
            loss = loss + self.disc_weight * logs["gen_adv"]
        logs["loss"] = loss
        return loss, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(self, images, recon_detached, step, discriminator=None):
        """-> (loss, logs). Real and fake go through D separately, so BatchNorm sees each on its
        own. `discriminator`: self.discriminator wrapped for data parallelism (DDP), if it is."""
        if not self.gan_active(step):
            return images.new_zeros(()), {}
        d = discriminator or self.discriminator
        logits_real, logits_fake = d(images.detach()), d(recon_detached.detach())
        loss = self.disc_weight * hinge_d_loss(logits_real, logits_fake)
        return loss, dict(disc=loss.detach(), logits_real=logits_real.detach().mean(),
                          logits_fake=logits_fake.detach().mean())


# ------------------------------------------------------------------------------------------------
# Reconstruction metrics, per image, with the conventions of the official evaluation (LlamaGen
# tokenizer/tokenizer_image/reconstruction_vq_ddp.py). Inputs are images in [-1, 1]; they are
# mapped to [0, 1] first. To reproduce the paper's numbers, pass the reconstruction as the pixels
# data.to_uint8 gives, back through data.from_uint8 (fid.tokenizer_metrics does).

def precise(t):
    """float64 for the metrics (SSIM's variances are differences of close numbers); float32 on
    Apple's MPS, which has no float64."""
    return t.to(torch.float32 if t.device.type == "mps" else torch.float64)


def psnr(x, y):
    """Peak signal-to-noise ratio in dB per image [B], data range 1 on [0, 1] (inf for identical
    images)."""
    mse = ((precise(x) - precise(y)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def ssim(x, y, gaussian=False):
    """Structural similarity per image [B], averaged over channels and over the windows that fit
    inside the image. Default = the official evaluation (scikit-image's defaults): a uniform 7x7
    window with sample (N-1) covariances. gaussian=True = Wang et al. 2004: Gaussian window (11
    taps, sigma 1.5), population covariances. K1 0.01, K2 0.03. Quirk kept on purpose: the
    official evaluation measures [0, 1] images with data_range=2.0, as if they spanned [-1, 1];
    this quadruples C1 and C2 and raises SSIM, so our numbers compare with the paper's."""
    x, y = (precise(x) + 1) / 2, (precise(y) + 1) / 2
    channels = x.shape[1]
    maps = torch.cat([x, y, x * x, y * y, x * y], 1)  # every local mean below, in one pass
    if gaussian:  # the 2-D Gaussian is separable: one 11-tap pass down the columns, one along rows
        t = torch.arange(11, dtype=x.dtype, device=x.device) - 5
        g = torch.exp(-t ** 2 / (2 * 1.5 ** 2))
        g = (g / g.sum()).expand(maps.shape[1], 1, 11)
        maps = F.conv2d(F.conv2d(maps, g[..., None], groups=maps.shape[1]), g[:, :, None],
                        groups=maps.shape[1])
        cov_norm = 1.0
    else:  # the uniform window is a plain 7x7 mean; stride 1, no padding: windows inside the image
        maps, cov_norm = F.avg_pool2d(maps, 7, stride=1), 49 / 48  # 49 / 48: N / (N - 1), N = 7 x 7
    mx, my, xx, yy, xy = maps.split(channels, 1)  # local means of x, y, x^2, y^2, xy
    vx, vy, vxy = cov_norm * (xx - mx * mx), cov_norm * (yy - my * my), cov_norm * (xy - mx * my)
    c1, c2 = (0.01 * 2.0) ** 2, (0.03 * 2.0) ** 2  # (K * data_range)^2 with data_range 2.0
    # luminance x contrast-structure comparison, per window
    ssim_map = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return ssim_map.mean((2, 3)).mean(1)


# ------------------------------------------------------------------------------------------------
# Configs by name (paper Table 2). The small ones train on a CPU in minutes.

VQ_CONFIGS = {
    "VQ-16": dict(ch_mult=(1, 1, 2, 2, 4)),  # 71,883,403 parameters, 256 px -> 16x16 codes
    "VQ-8": dict(ch_mult=(1, 2, 2, 4)),  # 70,109,835 parameters, 256 px -> 32x32 codes
    # CPU demo / tests: 64 px -> 16x16 codes (the same 256-token grid as VQ-16 at 256 px)
    "VQ-tiny": dict(ch=32, ch_mult=(1, 2, 2), z_channels=64, codebook_size=512,
                    enc_num_res_blocks=1, dec_num_res_blocks=2),
    # a little wider and downsampling 8: 64 px -> 8x8 codes
    "VQ-small": dict(ch=64, ch_mult=(1, 1, 2, 2), z_channels=128, codebook_size=1024,
                     enc_num_res_blocks=1, dec_num_res_blocks=2),
}


def vq_config(name, **overrides):
    if name not in VQ_CONFIGS:
        raise UserError(f"unknown tokenizer config {name!r}; choose one of {list(VQ_CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(VQConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise UserError(f"unknown tokenizer setting(s) {bad}; valid: {sorted(fields)}")
    return VQConfig(**{**VQ_CONFIGS[name], **overrides})
