"""The image tokenizer (paper 2.1-2.2): a VQGAN-style encoder cuts an image into a grid of vectors,
each replaced by its nearest entry in a learned codebook, whose index is the image token; the
decoder turns codes back into pixels, under the official checkpoints' key names and shapes. Also
here: its training losses (L2, LPIPS, PatchGAN), metrics (paper Table 2) and named configs.

    python tokenizer.py --vq-ckpt vq_ds16_c2i.pt --data imagenet/val   # rFID, PSNR, SSIM, usage
"""
import argparse
import dataclasses
import functools
import itertools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import fid
from common import (UserError, at_least, attention, check_flags, cli, download, from_uint8,
                    load_checkpoint, load_weights, pick_device, progress, to_uint8,
                    unwrap_state_dict, weights_checksum, weights_file)
from data import check_image_size, image_dataset


@dataclasses.dataclass
class VQConfig:
    """VQ-16 by default (paper Table 2); field names of the official vq_model.py ModelArgs."""
    codebook_size: int = 16384  # K: the image vocabulary the GPT predicts over
    codebook_embed_dim: int = 8  # the low-dimensional lookup space (see the quantizer)
    codebook_l2_norm: bool = True  # codes and encoder outputs on the unit sphere
    commit_loss_beta: float = 0.25  # weight of the commitment term, as VQ-VAE
    entropy_loss_ratio: float = 0.0  # the paper trains without it
    ch: int = 128  # width of the first level; GroupNorm(32) needs widths divisible by 32
    ch_mult: tuple = (1, 1, 2, 2, 4)  # width multiplier per level; len - 1 halvings
    z_channels: int = 256  # the encoder's output width, before quant_conv takes it down
    enc_num_res_blocks: int = 2
    dec_num_res_blocks: int = 3
    dropout: float = 0.0
    local: bool = False  # ours: patch MLPs (local_halves) in place of the VQGAN encoder/decoder

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)  # also given as a list (the official ModelArgs)

    @property
    def downsample(self):
        return 2 ** (len(self.ch_mult) - 1)


# ------------------------------------------------------------------------------------------------
# Building blocks (the taming-transformers VQGAN layout that LlamaGen keeps)
group_norm = functools.partial(nn.GroupNorm, 32, eps=1e-6)  # group_norm(channels)


class ResnetBlock(nn.Module):
    """Two norm-swish-conv steps and a residual; a 1x1 conv (nin_shortcut) if the width changes."""
    def __init__(self, c_in, c_out, dropout=0.0):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, at the lowest resolution only."""
    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))
        h = attention(q, k, v)  # [B, 1, HW, C], scale C^-0.5
        return x + self.proj_out(h.squeeze(1).transpose(1, 2).reshape(B, C, H, W))


class Resample(nn.Module):
    """Learned 2x resampling: a stride-2 conv after taming's right-and-bottom pad, or nearest 2x."""
    def __init__(self, channels, down):
        super().__init__()
        self.down, self.conv = down, nn.Conv2d(channels, channels, 3, *((2, 0) if down else (1, 1)))

    def forward(self, x):
        x = F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0)
        return self.conv(x)


class Level(nn.Module):
    """Res blocks, each followed by attention if `attn`, then "downsample", "upsample" or None."""
    def __init__(self, width_in, width, blocks, attn, resample, dropout):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(width_in if j == 0 else width, width, dropout)
                                 for j in range(blocks))
        self.attn = nn.ModuleList(AttnBlock(width) for _ in range(blocks if attn else 0))
        self.resample = resample
        if resample:
            setattr(self, resample, Resample(width, down=resample == "downsample"))

    def forward(self, h):
        for j, res in enumerate(self.res):
            h = self.attn[j](res(h)) if len(self.attn) else res(h)
        return getattr(self, self.resample)(h) if self.resample else h


def mid_blocks(width, dropout):  # res, attention, res at the lowest resolution
    return nn.ModuleList([ResnetBlock(width, width, dropout), AttnBlock(width),
                          ResnetBlock(width, width, dropout)])


class Encoder(nn.Module):
    """Image [B,3,H,W] -> features [B, z_channels, H/ds, W/ds]; attention in the last level only."""
    def __init__(self, cfg):
        super().__init__()
        widths, n = [cfg.ch * m for m in cfg.ch_mult], len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList(
            Level(w_in, w, cfg.enc_num_res_blocks, i == n - 1,
                  None if i == n - 1 else "downsample", cfg.dropout)
            for i, (w_in, w) in enumerate(zip([cfg.ch] + widths, widths)))
        self.mid = mid_blocks(widths[-1], cfg.dropout)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in [*self.conv_blocks, *self.mid]:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features [B, z_channels, h, w] -> image [B,3,h*ds,w*ds]: the encoder's levels in reverse."""
    def __init__(self, cfg):
        super().__init__()
        widths, n = [cfg.ch * m for m in reversed(cfg.ch_mult)], len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[0], 3, padding=1)
        self.mid = mid_blocks(widths[0], cfg.dropout)
        self.conv_blocks = nn.ModuleList(
            Level(w_in, w, cfg.dec_num_res_blocks, i == 0,
                  None if i == n - 1 else "upsample", cfg.dropout)
            for i, (w_in, w) in enumerate(zip(widths[:1] + widths, widths)))
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for block in [*self.mid, *self.conv_blocks]:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # no tanh: about [-1, 1], see decode


# ------------------------------------------------------------------------------------------------
# A local tokenizer (ours, not in LlamaGen): a code sees its own ds x ds patch and nothing else.
# Through VQGAN's 3x3 convs, GroupNorm statistics and attention a code's meaning depends on the
# whole picture: on a flat world one background takes different codes in different trainings, and
# a red patch's colour may be read from its neighbours' codes. With 1x1 convs between a ds-strided
# patch embedding and its transpose, equal patches get equal codes and a code draws the same patch
# wherever it stands: a code names a colour and an edge, in place.
class PatchMLP(nn.Module):
    """conv_in, residual blocks of two 1x1 convs, conv_out: either half of the local tokenizer."""
    def __init__(self, conv_in, width, blocks, conv_out):
        super().__init__()
        self.conv_in, self.conv_out = conv_in, conv_out
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.SiLU(), nn.Conv2d(width, width, 1), nn.SiLU(), nn.Conv2d(width, width, 1))
            for _ in range(blocks))

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.blocks:
            h = h + block(h)
        return self.conv_out(F.silu(h))


def local_halves(cfg):
    """(encoder, decoder) of the local tokenizer, width ch * ch_mult[-1]."""
    width, ds, z = cfg.ch * cfg.ch_mult[-1], cfg.downsample, cfg.z_channels
    return (PatchMLP(nn.Conv2d(3, width, ds, ds), width, cfg.enc_num_res_blocks,
                     nn.Conv2d(width, z, 1)),
            PatchMLP(nn.Conv2d(z, width, 1), width, cfg.dec_num_res_blocks,
                     nn.ConvTranspose2d(width, 3, ds, ds)))


# ------------------------------------------------------------------------------------------------
# Vector quantizer (paper 2.2). In the classic VQ-VAE codebook (256-d, Euclidean lookup) most codes
# are never any encoder output's nearest, get no gradient and die (paper Table 2: 0.29% used). In 8
# dimensions on the unit sphere, a cosine lookup over a small, densely covered space: 97% used.
def entropy_loss(distances, temperature=0.01):
    """Entropy per vector (confident) minus entropy of the mean assignment (spread); MaskGIT's."""
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
        self.register_buffer("codebook_used", torch.zeros(self.usage_window))  # float32: official
        shape = (cfg.codebook_size, cfg.codebook_embed_dim)
        self.embedding = nn.Embedding(*shape, _weight=torch.empty(shape))  # no normal init
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        if self.l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)

    def codebook(self):
        """The code vectors, re-normalised at every use: the parameter drifts off the sphere."""
        return F.normalize(self.embedding.weight, dim=-1) if self.l2_norm else self.embedding.weight

    def lookup(self, codes):  # codes [B, h, w] -> code vectors [B, D, h, w]
        return F.embedding(codes, self.codebook()).permute(0, 3, 1, 2)

    def nearest(self, z):
        """z [B, D, h, w] -> (vectors, squared distances, codes), fp32: bf16 confuses near codes."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            if self.l2_norm:
                z = F.normalize(z, dim=-1)
            e = self.codebook()
            d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()  # as official
        return z, d, d.argmin(1)

    def forward(self, z):
        """z [B, D, h, w] -> (quantized z, codes [B, h, w], codebook losses vq, commit, entropy)."""
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
        z_q = z + (z_q - z).detach()  # straight-through: argmin has no gradient, z gets z_q's
        return z_q.view(B, h, w, D).permute(0, 3, 1, 2), idx.view(B, h, w), losses


def codebook_usage_of(codes, codebook_size):
    """The fraction of the codebook occurring in `codes` (any shape)."""
    return torch.unique(codes).numel() / codebook_size


# ------------------------------------------------------------------------------------------------
# The tokenizer: encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder
def config_from_state_dict(sd):
    """The topology read off the weight shapes (the official files carry no config)."""
    def count(prefix, part):  # 1 + the largest index at `part` among the keys under `prefix`
        return 1 + max(int(k.split(".")[part]) for k in sd if k.startswith(prefix))
    try:
        size, dim = sd["quantize.embedding.weight"].shape
        ch, z = sd["encoder.conv_in.weight"].shape[0], sd["quant_conv.weight"].shape[1]
        if "encoder.blocks.0.1.weight" in sd:  # local_halves: a ds x ds patch embedding
            ds = sd["encoder.conv_in.weight"].shape[-1]
            return VQConfig(codebook_size=size, codebook_embed_dim=dim, ch=ch, z_channels=z,
                            ch_mult=(1,) * ds.bit_length(), local=True,
                            enc_num_res_blocks=count("encoder.blocks.", 2),
                            dec_num_res_blocks=count("decoder.blocks.", 2))
        mult = tuple(sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch
                     for i in range(count("encoder.conv_blocks.", 2)))
        return VQConfig(codebook_size=size, codebook_embed_dim=dim, ch=ch, ch_mult=mult,
                        z_channels=z, enc_num_res_blocks=count("encoder.conv_blocks.0.res.", 4),
                        dec_num_res_blocks=count("decoder.conv_blocks.0.res.", 4))
    except (KeyError, ValueError, IndexError):  # a missing weight name, or no levels at all
        raise UserError("not a VQ tokenizer state dict (its weight names lack the "
                        "encoder/decoder/quantize layout); pass a tokenizer checkpoint") from None


class VQModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = (local_halves(config) if config.local else
                                      (Encoder(config), Decoder(config)))
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    def encode(self, images):
        """images [B,3,H,W] in [-1,1] -> codes int64 [B, H/ds, W/ds] (no losses, no usage)."""
        z = self.quant_conv(self.encoder(images))
        return self.quantize.nearest(z)[2].view(z.shape[0], *z.shape[2:])

    def decode(self, codes):
        """codes int64 [B, h, w] -> images about [-1, 1], not clamped (common.to_uint8 does it)."""
        if codes.dim() != 3:
            raise UserError(f"decode expects codes [B, h, w], got shape {tuple(codes.shape)}")
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes)))

    def forward(self, images):  # training: -> (reconstruction, codebook losses)
        z_q, _, losses = self.quantize(self.quant_conv(self.encoder(images)))
        return self.decoder(self.post_quant_conv(z_q)), losses

    def codebook_usage(self):  # share of the codebook in the last 65536 training indices
        return codebook_usage_of(self.quantize.codebook_used, self.config.codebook_size)

    @classmethod
    def from_pretrained(cls, path, config=None):
        """Ours or an official checkpoint (also by name); topology from the shapes or `config`."""
        ckpt = load_checkpoint(weights_file(path))
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
        diff = ", ".join(f"{f.name}={getattr(fits, f.name)}" for f in dataclasses.fields(fits)
                         if getattr(fits, f.name) != f.default)
        name = next((n for n in VQ_CONFIGS if vq_config(n) == fits), f"VQConfig({diff})")
        model = cls(config or fits)
        return load_weights(model, sd, f"tokenizer {path}", hint=f"its shapes fit {name}").eval()


# sha256 of a tokenizer's weights, whichever file held them: codes name their tokenizer by it
tokenizer_checksum = weights_checksum


# ------------------------------------------------------------------------------------------------
# Training losses (paper 2.2: L2 + LPIPS + PatchGAN + codebook terms)
class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018), the perceptual loss: VGG16 features at five depths, each
    normalised over channels; squared differences weighted by 1x1 heads, averaged, summed."""
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
        # Dropout(0.5) before each head, as in LPIPS; the official trainer leaves it in train mode
        for i, width in enumerate((64, 128, 256, 512, 512)):
            head = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(width, 1, 1, bias=False))
            setattr(self, f"lin{i}", head)
        # LPIPS's ScalingLayer: [-1, 1] inputs to VGG's ImageNet normalisation (not in the files)
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1), False)
        self.register_buffer("scale", torch.tensor([.458, .448, .450]).view(1, 3, 1, 1), False)
        self.requires_grad_(False)

    @classmethod
    def from_folder(cls, folder=None):
        """LPIPS from `folder`, or torch's cache (downloaded there); else a UserError naming it."""
        given = folder is not None
        folder = folder or os.path.join(torch.hub.get_dir(), "checkpoints")
        missing = [f for f in cls.files if not os.path.isfile(os.path.join(folder, f))]
        fix = (f"fetch {' and '.join(cls.files[f][0] for f in missing)} into a folder and pass "
               "--lpips FOLDER, or train without it: --perceptual-weight 0")
        if missing and given:  # a folder named by the user is never written to
            raise UserError(f"perceptual loss (LPIPS): {', '.join(missing)} not found in "
                            f"{folder!r}; {fix}")
        for name in missing:
            try:
                download(cls.files[name][0], os.path.join(folder, name), cls.files[name][1], fix)
            except UserError as e:
                raise UserError(f"perceptual loss (LPIPS): {e}") from None
        vgg, lin = (unwrap_state_dict(load_checkpoint(os.path.join(folder, f))) for f in cls.files)
        sd = {k: v for k, v in vgg.items() if k.startswith("features.")}
        sd.update({k.replace(".model.", "."): v for k, v in lin.items()})  # LPIPS: linN.model.1
        return load_weights(cls(), sd, "LPIPS")

    def forward(self, x, y):  # x, y [B,3,H,W] in [-1,1] -> distance per image [B]
        h = (torch.cat([x, y]) - self.shift) / self.scale
        dist = 0
        for i, layer in enumerate(self.features[:self.taps[-1] + 1]):
            h = layer(h)
            if i in self.taps:
                fx, fy = (h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)).chunk(2)
                dist = dist + getattr(self, f"lin{self.taps.index(i)}")((fx - fy) ** 2).mean((2, 3))
        return dist.flatten()


class PatchGAN(nn.Module):
    """pix2pix NLayer discriminator (3 layers, ndf 64): a real/fake logit per overlapping patch."""
    def __init__(self, ndf=64, n_layers=3):
        super().__init__()
        layers, width_in = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], ndf
        for n in range(1, n_layers + 1):  # widths double up to 8 x ndf; the last layer keeps size
            width = ndf * min(2 ** n, 8)
            layers += [nn.Conv2d(width_in, width, 4, 2 if n < n_layers else 1, 1, bias=False),
                       nn.BatchNorm2d(width), nn.LeakyReLU(0.2, True)]  # BN's shift, no bias
            width_in = width
        self.main = nn.Sequential(*layers, nn.Conv2d(width_in, 1, 4, 1, 1))
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
    """L2 + perceptual_weight * LPIPS + codebook terms (+ disc_weight * GAN from disc_start)."""
    def __init__(self, disc_start=20000, disc_weight=0.5, perceptual_weight=1.0, lpips_path=None):
        super().__init__()
        self.disc_start, self.disc_weight, self.perceptual_weight = (disc_start, disc_weight,
                                                                     perceptual_weight)
        self.discriminator = PatchGAN()
        self.lpips = LPIPS.from_folder(lpips_path) if perceptual_weight > 0 else None

    def gan_active(self, step):
        """step counts from 0, the official trainer's from 1: the same first adversarial step."""
        return self.disc_weight > 0 and step + 1 >= self.disc_start

    def generator_loss(self, images, recon, codebook_losses, step):
        """-> (loss, detached logs). D's parameters get gradients too: zero them before its step."""
        logs = dict(rec=F.mse_loss(recon, images), **codebook_losses)
        loss = sum(logs.values())
        if self.lpips is not None:
            logs["perceptual"] = self.lpips(images, recon).mean()
            loss = loss + self.perceptual_weight * logs["perceptual"]
        if self.gan_active(step):
            logs["gen_adv"] = hinge_g_loss(self.discriminator(recon))
            loss = loss + self.disc_weight * logs["gen_adv"]
        return loss, {k: v.detach() for k, v in {**logs, "loss": loss}.items()}

    def discriminator_loss(self, images, recon_detached, step, discriminator=None):
        """-> (loss, logs); real and fake through D (maybe DDP-wrapped) apart, for BatchNorm."""
        if not self.gan_active(step):
            return images.new_zeros(()), {}
        d = discriminator or self.discriminator
        logits_real, logits_fake = d(images.detach()), d(recon_detached.detach())
        loss = self.disc_weight * hinge_d_loss(logits_real, logits_fake)
        return loss, dict(disc=loss.detach(), logits_real=logits_real.detach().mean(),
                          logits_fake=logits_fake.detach().mean())


# ------------------------------------------------------------------------------------------------
# Evaluation, as the official tokenizer/tokenizer_image/reconstruction_vq_ddp.py: images in
# [-1, 1], scored on [0, 1]; the reconstruction as the pixels common.to_uint8 gives.
def precise(t):
    """float64 (SSIM's variances are differences of close numbers); float32 on MPS, lacking it."""
    return t.to(torch.float32 if t.device.type == "mps" else torch.float64)


def psnr(x, y):
    """Peak signal-to-noise ratio in dB per image [B] on [0, 1] (inf for identical images)."""
    return 10 * torch.log10(1.0 / ((precise(x) - precise(y)) / 2).pow(2).flatten(1).mean(1))


def ssim(x, y, gaussian=False):
    """SSIM per image [B] as the official evaluation (scikit-image: a uniform 7x7 window, sample
    covariances) or gaussian=True (Wang et al. 2004); its quirk kept: data_range=2 on [0, 1]."""
    x, y = (precise(x) + 1) / 2, (precise(y) + 1) / 2
    maps = torch.cat([x, y, x * x, y * y, x * y], 1)  # every local mean below, in one pass
    if gaussian:  # the 2-D Gaussian is separable: one 11-tap pass down the columns, one along rows
        t = torch.arange(11, dtype=x.dtype, device=x.device) - 5
        g = torch.exp(-t ** 2 / (2 * 1.5 ** 2))
        g = (g / g.sum()).expand(maps.shape[1], 1, 11)
        maps, cov_norm = F.conv2d(F.conv2d(maps, g[..., None], groups=maps.shape[1]),
                                  g[:, :, None], groups=maps.shape[1]), 1.0
    else:  # the uniform window is a plain 7x7 mean; stride 1, no padding: windows inside the image
        maps, cov_norm = F.avg_pool2d(maps, 7, stride=1), 49 / 48  # 49 / 48: N / (N - 1), N = 7 x 7
    mx, my, xx, yy, xy = maps.split(x.shape[1], 1)  # local means of x, y, x^2, y^2, xy
    vx, vy, vxy = cov_norm * (xx - mx * mx), cov_norm * (yy - my * my), cov_norm * (xy - mx * my)
    c1, c2 = (0.01 * 2.0) ** 2, (0.03 * 2.0) ** 2  # (K * data_range)^2 with data_range 2.0
    ssim_map = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return ssim_map.mean((2, 3)).mean(1)


@torch.inference_mode()
def tokenizer_metrics(vq, images, net=None, batch_size=64, device="cpu", num_workers=0,
                      resize_to=None):
    """rFID (with `net`), PSNR, SSIM and codebook usage of `vq` on ([-1, 1] image, label) pairs."""
    vq = vq.to(device).eval()
    loader = torch.utils.data.DataLoader(images, batch_size, num_workers=num_workers)
    psnrs, ssims, used = [], [], []

    def pairs():  # (originals, reconstructions) as uint8 per batch; with rFID, fid draws the bar
        for x, _ in progress(loader, desc="reconstructions", unit="batch", show=net is None):
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

    # full fp32 convolutions, as fid runs them: the same codes with or without rFID
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        if net is None:
            rfid = None
            for _ in pairs():
                pass
        else:  # fid.rfid reads one batch of each stream in turn, so tee holds at most one pair
            originals, reconstructions = itertools.tee(pairs())
            rfid = fid.rfid((r for _, r in reconstructions), (o for o, _ in originals), net,
                            device=device)
    return dict(rfid=rfid, psnr=torch.cat(psnrs).mean().item(), ssim=torch.cat(ssims).mean().item(),
                codebook_usage=codebook_usage_of(torch.cat(used), vq.config.codebook_size))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vq-ckpt", required=True, help="ours or the official vq_ds16_c2i.pt")
    parser.add_argument("--data", required=True, help="images in class folders, or synthetic:N")
    parser.add_argument("--image-size", type=int, default=256, help="ADM centre crop size")
    parser.add_argument("--resize-to", type=int, help="measure at this size (paper Table 3: 256)")
    parser.add_argument("--num-images", type=int, help="only N images, spread evenly over --data")
    parser.add_argument("--num-workers", type=int, default=4, help="image-decoding processes")
    parser.add_argument("--no-rfid", action="store_true", help="no Inception weights needed")
    parser.add_argument("--inception", help="the FID Inception weights (default: torch's cache)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="cuda, mps or cpu (default: the best)")
    args = parser.parse_args(argv)
    check_flags(args, dict(batch_size=at_least(1), num_images=at_least(1), resize_to=at_least(1),
                           image_size=at_least(1), num_workers=at_least(0)),
                [("inception", "rFID (not with --no-rfid)", lambda a: not a.no_rfid)])
    device = pick_device(args.device)
    vq = VQModel.from_pretrained(args.vq_ckpt)
    check_image_size(args.image_size, vq.config.downsample)
    images = image_dataset(args.data, args.image_size, augment="center", flip=False)
    if args.num_images is not None:
        n = min(args.num_images, len(images))
        # evenly spread, so a class-sorted folder (ImageNet val) keeps every class in a subset
        images = torch.utils.data.Subset(images, [i * len(images) // n for i in range(n)])
    net = None if args.no_rfid else fid.FIDInception.from_pretrained(args.inception)
    metrics = tokenizer_metrics(vq, images, net, args.batch_size, device, args.num_workers,
                                args.resize_to)
    print(f"{len(images)} images of {args.data} at {args.image_size} px through {args.vq_ckpt}"
          + (f", measured at {args.resize_to} px:" if args.resize_to else ":"))
    if metrics["rfid"] is not None:
        print(f"rFID: {metrics['rfid']:.4f}")
    print(f"PSNR: {metrics['psnr']:.4f} dB\nSSIM: {metrics['ssim']:.4f}\n"
          f"codebook usage: {100 * metrics['codebook_usage']:.2f}% of {vq.config.codebook_size}")


# ------------------------------------------------------------------------------------------------
# Configs by name (paper Table 2). The small ones train on a CPU in minutes.
VQ_CONFIGS = {
    "VQ-16": dict(ch_mult=(1, 1, 2, 2, 4)),  # 71,883,403 parameters, 256 px -> 16x16 codes
    "VQ-8": dict(ch_mult=(1, 2, 2, 4)),  # 70,109,835 parameters, 256 px -> 32x32 codes
    "VQ-tiny": dict(ch=32, ch_mult=(1, 2, 2), z_channels=64, codebook_size=512,  # 64 px -> 16x16
                    enc_num_res_blocks=1, dec_num_res_blocks=2),
    "VQ-small": dict(ch=64, ch_mult=(1, 1, 2, 2), z_channels=128, codebook_size=1024,  # -> 8x8
                     enc_num_res_blocks=1, dec_num_res_blocks=2),
    "VQ-patch": dict(local=True, ch=64, ch_mult=(1, 1, 1), z_channels=64, codebook_size=256,
                     enc_num_res_blocks=1, dec_num_res_blocks=2),  # 4x4 px patches, the scenes'
}


def vq_config(name, **overrides):
    if name not in VQ_CONFIGS:
        raise UserError(f"unknown tokenizer config {name!r}; choose one of {list(VQ_CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(VQConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise UserError(f"unknown tokenizer setting(s) {bad}; valid: {sorted(fields)}")
    return VQConfig(**{**VQ_CONFIGS[name], **overrides})


if __name__ == "__main__":
    cli(main)
