"""The FLUX.1 autoencoder that BAGEL uses for image generation: a frozen encoder and decoder that load
the published ``ae.safetensors`` as it is.

Math (as black-forest-labs' ``AutoEncoder``)::

    moments = encoder(x)                        x: [B, 3, H, W] in [-1, 1], H and W multiples of 8
    mean, logvar = moments.chunk(2, dim=1)      [B, 16, H/8, W/8] each
    z = mean + exp(logvar / 2) * eps            sample=True (eps ~ N(0, 1)); z = mean with sample=False
    latent = scale_factor * (z - shift_factor)  scale 0.3611, shift 0.1159
    image = decoder(latent / scale_factor + shift_factor)   [B, 3, H, W], not clamped

``logvar`` is clamped to ``[-30, 20]`` before the exponential, as diffusers' and the LDM
``DiagonalGaussianDistribution`` do (BFL's ``DiagonalGaussian`` does not; the two differ only where
``|logvar|`` leaves that range, which a trained encoder does not reach). The decoder's output is
returned as it comes: like upstream it is *not* clamped to [-1, 1]; clamp before turning it into pixels.

Why our own module and not diffusers' ``AutoencoderKL``: the published file uses BFL's key layout
(``encoder.down.{i}.block.{j}.norm1``, ``encoder.mid.attn_1.q`` as 1x1 convolutions, ...), which
``AutoencoderKL`` does not load without renaming every key and reshaping the attention weights. A
module whose ``state_dict`` *is* the file's layout loads it directly, strictly, one tensor at a time in
the target dtype, and needs no diffusers at run time. diffusers' ``AutoencoderKL``, configured for FLUX
(16 latent channels, no quant convs) and loaded through :func:`to_diffusers_state_dict`, is the
independent implementation the tests compare against.

Layout (key prefix, shapes for the published config ``ch=128, ch_mult=(1, 2, 4, 4)``, 244 tensors)::

    encoder.conv_in                          3 -> 128, 3x3
    encoder.down.{i}.block.{j}               ResnetBlock (norm1, conv1, norm2, conv2[, nin_shortcut])
    encoder.down.{i}.downsample.conv         3x3 stride 2, zero pad right/bottom (i < 3)
    encoder.mid.{block_1, attn_1, block_2}   attn_1: norm, q, k, v, proj_out (1x1 convs, one head)
    encoder.norm_out, encoder.conv_out       512 -> 2 * 16
    decoder.conv_in                          16 -> 512
    decoder.mid.{block_1, attn_1, block_2}
    decoder.up.{i}.block.{j}                 j < num_res_blocks + 1; level i runs from 3 down to 0
    decoder.up.{i}.upsample.conv             nearest 2x, then 3x3 (i > 0)
    decoder.norm_out, decoder.conv_out       128 -> 3

Every GroupNorm has 32 groups and eps 1e-6; the nonlinearity is SiLU.

Public API: :class:`FluxVAEConfig` (``FluxVAEConfig()`` is FLUX.1's, :meth:`FluxVAEConfig.tiny` a small
one for tests), :class:`FluxVAE` (``from_pretrained``, ``initialize_weights``, ``encode``, ``decode``,
``encode_images``, ``encode_to_pack_layout``), :func:`pad_latents` (per-image latents -> the
``padded_latent`` / ``patchified_vae_latent_shapes`` pair of ``BagelForUnifiedMultimodal.forward``),
:func:`to_diffusers_state_dict` and :func:`diffusers_config` (for the diffusers comparison), and
:func:`encode_main` (the ``bagel-encode`` command).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bagel.extras import needs_extra

__all__ = [
    "AE_KEY_COUNT",
    "FluxVAE",
    "FluxVAEConfig",
    "diffusers_config",
    "encode_main",
    "pad_latents",
    "to_diffusers_state_dict",
]

AE_KEY_COUNT = 244  # tensors in FLUX.1's ae.safetensors (106 encoder + 138 decoder), all of them loaded
_GROUPS = 32  # GroupNorm groups, fixed in the published architecture
_EPS = 1e-6
_LOGVAR_RANGE = (-30.0, 20.0)
_PIXEL_SLACK = 1e-2  # images may exceed [-1, 1] by this much (rounding, a clamped resize)


@dataclass(frozen=True)
class FluxVAEConfig:
    """The autoencoder's hyper-parameters. The defaults are FLUX.1's (``ae.safetensors``).

    ``ch * m`` must be a multiple of 32 (the GroupNorm groups) for every ``m`` in ``ch_mult``; the
    spatial downsampling factor is ``2 ** (len(ch_mult) - 1)`` (8 for FLUX). ``resolution`` is the
    training resolution, kept for the record: any multiple of the downsampling factor is accepted.
    """

    resolution: int = 256
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        for name in ("resolution", "in_channels", "out_channels", "ch", "num_res_blocks", "z_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"FluxVAEConfig.{name} must be a positive int, got {value!r}")
        if not self.ch_mult or any(
            isinstance(m, bool) or not isinstance(m, int) or m <= 0 for m in self.ch_mult
        ):
            raise ValueError(
                f"FluxVAEConfig.ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult!r}"
            )
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % _GROUPS]
        if bad:
            raise ValueError(
                f"FluxVAEConfig.ch * ch_mult gives channel counts {bad} that are not multiples of the "
                f"{_GROUPS} GroupNorm groups (ch={self.ch}, ch_mult={self.ch_mult})"
            )
        for name in ("scale_factor", "shift_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"FluxVAEConfig.{name} must be a finite number, got {value!r}")
        if self.scale_factor == 0:
            raise ValueError("FluxVAEConfig.scale_factor must not be 0 (decode divides by it)")

    @classmethod
    def tiny(cls, **overrides: Any) -> FluxVAEConfig:
        """A small config for tests and demos: ``ch=32`` (channels 32, 64, 128, 128), the same 8x
        downsampling, 16 latent channels, scale and shift as FLUX."""
        return cls(**{"ch": 32, **overrides})

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each side (8 for FLUX)."""
        return 2 ** (len(self.ch_mult) - 1)


# ---------------------------------------------------------------------------------------------- blocks
def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_GROUPS, channels, eps=_EPS, affine=True)


class _ResnetBlock(nn.Module):
    """``x + conv2(silu(norm2(conv1(silu(norm1(x))))))``, the skip through a 1x1 ``nin_shortcut`` when
    the channel count changes."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class _AttnBlock(nn.Module):
    """Single-head self-attention over the ``H*W`` positions, projections as 1x1 convolutions (the
    file's layout), with a residual connection."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # [B, C, H, W] -> [B, 1, H*W, C]: one head whose dimension is the channel count
        q, k, v = (proj(h).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)  # [B, 1, H*W, C]
        a = a.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(a)


class _Downsample(nn.Module):
    """Halve H and W: pad one zero row/column at the bottom/right, then a 3x3 stride-2 convolution."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 convolution."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (a list of ResnetBlocks), then an optional resampler stored
    under ``downsample`` or ``upsample`` (the file's key names)."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(_ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(n_blocks))
        if resample == "down":
            self.downsample = _Downsample(c_out)
        elif resample == "up":
            self.upsample = _Upsample(c_out)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class _Mid(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1 = _ResnetBlock(c, c)
        self.attn_1 = _AttnBlock(c)
        self.block_2 = _ResnetBlock(c, c)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Encoder(nn.Module):
    """``[B, in_channels, H, W] -> [B, 2 * z_channels, H/f, W/f]`` (mean and logvar)."""

    def __init__(self, cfg: FluxVAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        n = len(widths)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            _Level(
                cfg.ch if i == 0 else widths[i - 1],
                widths[i],
                cfg.num_res_blocks,
                "down" if i < n - 1 else None,
            )
            for i in range(n)
        )
        self.mid = _Mid(widths[-1])
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Decoder(nn.Module):
    """``[B, z_channels, h, w] -> [B, out_channels, h*f, w*f]``; ``up[i]`` is level ``i`` (widest
    last) and runs from the last level to the first."""

    def __init__(self, cfg: FluxVAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        n = len(widths)
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = _Mid(widths[-1])
        # level i takes the width of level i + 1 (the one run before it) and gives widths[i]
        self.up = nn.ModuleList(
            _Level(widths[min(i + 1, n - 1)], widths[i], cfg.num_res_blocks + 1, "up" if i > 0 else None)
            for i in range(n)
        )
        self.norm_out = _norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------- the autoencoder
def _check_sample_args(sample: Any, generator: Any) -> None:
    if not isinstance(sample, bool):  # sample="no" would be truthy
        raise TypeError(f"sample must be a bool, got {sample!r} ({type(sample).__name__})")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _positive_int_or_none(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


class FluxVAE(nn.Module):
    """The frozen FLUX autoencoder. ``FluxVAE(config)`` builds it with PyTorch's default random init
    (``initialize_weights(seed)`` for reproducible random weights), :meth:`from_pretrained` loads
    ``ae.safetensors``. Parameters never require grad and the module stays in eval mode; ``encode`` and
    ``decode`` run under ``torch.no_grad()`` (not ``inference_mode``, so that their outputs may enter
    autograd later, e.g. as training targets).

    Inputs are moved to the module's device and dtype; outputs are on that device in that dtype.
    """

    def __init__(
        self,
        config: FluxVAEConfig | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if config is None:
            config = FluxVAEConfig()
        if not isinstance(config, FluxVAEConfig):
            raise TypeError(f"config must be a FluxVAEConfig, got {type(config).__name__}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.config = config
        try:
            device = torch.device(device if device is not None else "cpu")
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"device {device!r} is not a device ({e})") from None
        with device:
            self.encoder = _Encoder(config)
            self.decoder = _Decoder(config)
        if dtype is not None:
            self.to(dtype)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FluxVAE:
        """The autoencoder is frozen: it stays in eval mode whatever is asked (it has no dropout or
        batch-norm, so this only keeps ``training`` honest)."""
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    # -------------------------------------------------------------------------------------- weights
    @torch.no_grad()
    def initialize_weights(self, seed: int = 0) -> FluxVAE:
        """Random weights drawn from ``seed`` on the CPU in fp32 (the same values on every device and in
        every dtype, up to rounding): convolutions ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for weight and
        bias, GroupNorm ``weight = 1 + 0.1 N(0, 1)``, ``bias = 0.1 N(0, 1)`` (not the identity, so that a
        test notices a norm loaded into the wrong place). Returns ``self``."""
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        gen = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                for p in (module.weight, module.bias):
                    p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
            elif isinstance(module, nn.GroupNorm):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
        return self

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        config: FluxVAEConfig | None = None,
    ) -> FluxVAE:
        """Load FLUX.1's ``ae.safetensors`` (or a folder holding it) strictly: every tensor the module
        has must be in the file with its shape, and the file may hold nothing else. Each tensor is read
        on its own and converted to ``dtype`` on ``device`` straight away, so loading bf16 never holds
        an fp32 copy of the model. ``config`` defaults to FLUX.1's.

        Raises FileNotFoundError for a path that does not exist, ValueError for a path that is not a
        safetensors file and for missing, unexpected or mis-shaped keys (each named)."""
        with needs_extra():
            from safetensors import SafetensorError, safe_open
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        try:
            target = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"device {device!r} is not a device ({e})") from None
        if target.type == "meta":  # nothing would be read: a "loaded" model without weights
            raise ValueError("device='meta' loads no weights; build FluxVAE(config, device='meta') instead")
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be ae.safetensors or its folder, got {type(path).__name__}")
        file = os.fspath(path)
        if os.path.isdir(file):
            inner = os.path.join(file, "ae.safetensors")
            if not os.path.isfile(inner):
                raise ValueError(f"{file} is a folder without ae.safetensors; pass the ae.safetensors file")
            file = inner
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file}: no such file (expected FLUX.1's ae.safetensors)")
        if not os.path.isfile(file):
            raise ValueError(f"{file} is not a regular file (expected FLUX.1's ae.safetensors)")

        model = cls(config, device="meta")
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        try:
            handle = safe_open(file, framework="pt", device="cpu")
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{file} is not a readable safetensors file: {exc}") from None
        with handle as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            missing = sorted(set(expected) - set(found))
            unexpected = sorted(set(found) - set(expected))
            misshaped = [
                f"{k}: file {list(found[k])}, model {list(expected[k])}"
                for k in sorted(set(expected) & set(found))
                if found[k] != expected[k]
            ]
            problems = []
            if missing:
                problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
            if unexpected:
                problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
            if misshaped:
                problems.append(f"{len(misshaped)} mis-shaped key(s): {_listing(misshaped)}")
            if problems:
                raise ValueError(
                    f"{file} does not match the FLUX VAE (ch={model.config.ch}, ch_mult={model.config.ch_mult}): "
                    + "; ".join(problems)
                )
            state = {}
            for k in expected:
                t = f.get_tensor(k)
                if not t.is_floating_point():
                    raise ValueError(f"{file}: {k} has dtype {t.dtype}, expected a floating dtype")
                if not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    raise ValueError(f"{file}: {k} holds {bad} NaN/inf value(s): the file is corrupt")
                state[k] = t.to(device=device, dtype=dtype)
                del t
        model.load_state_dict(state, strict=True, assign=True)
        model.requires_grad_(False)
        return model

    # -------------------------------------------------------------------------------------- encode / decode
    def _check_images(self, images: Any, name: str) -> Tensor:
        if not isinstance(images, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor with values in [-1, 1], got {images.dtype}")
        c, f = self.config.in_channels, self.config.downsample_factor
        if images.dim() != 4 or images.shape[1] != c:
            raise ValueError(f"{name} must be [B, {c}, H, W], got {list(images.shape)}")
        H, W = images.shape[2:]
        if H == 0 or W == 0 or H % f or W % f or images.shape[0] == 0:
            raise ValueError(
                f"{name} has shape {list(images.shape)}: B must be >= 1 and H, W positive multiples of {f} "
                f"(the VAE's downsampling factor)"
            )
        x = images.to(device=self.device, dtype=self.dtype)
        # pixels in [0, 255] or [0, 1]-then-shifted-twice encode to plausible-looking wrong latents; NaN
        # pixels to NaN latents: both are refused (a small slack for rounding in low precision)
        lo, hi = torch.aminmax(images.detach().float())
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1 - _PIXEL_SLACK or hi > 1 + _PIXEL_SLACK:
            raise ValueError(
                f"{name} must hold finite values in [-1, 1], got values in [{lo:g}, {hi:g}] "
                "(uint8 pixels map as x / 127.5 - 1)"
            )
        return x

    @torch.no_grad()
    def encode(
        self,
        images: Tensor,
        *,
        sample: bool = True,
        generator: torch.Generator | None = None,
        micro_batch_size: int | None = None,
    ) -> Tensor:
        """``images [B, 3, H, W]`` in [-1, 1] -> ``latents [B, 16, H/8, W/8]`` =
        ``scale_factor * (z - shift_factor)``, ``z`` a posterior sample (``sample=True``; noise drawn
        from ``generator``, on the generator's device, for the whole batch at once) or the posterior
        mean (``sample=False``). ``micro_batch_size`` encodes ``B`` in chunks of that many images; the
        result does not depend on it."""
        _check_sample_args(sample, generator)
        x = self._check_images(images, "images")
        mbs = _positive_int_or_none(micro_batch_size, "micro_batch_size")
        f, zc = self.config.downsample_factor, self.config.z_channels
        shape = (x.shape[0], zc, x.shape[2] // f, x.shape[3] // f)
        noise = self._noise(shape, generator) if sample else None
        return self._encode(x, noise, mbs)

    def _noise(self, shape: Sequence[int], generator: torch.Generator | None) -> Tensor:
        # drawn the way diffusers' DiagonalGaussianDistribution.sample does (in the model dtype, on the
        # generator's device), so that one seed gives both implementations the same noise
        device = generator.device if generator is not None else self.device
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=self.dtype).to(self.device)

    def _encode(self, x: Tensor, noise: Tensor | None, mbs: int | None) -> Tensor:
        out = []
        step = mbs or x.shape[0]
        for i in range(0, x.shape[0], step):
            moments = self.encoder(x[i : i + step])
            mean, logvar = moments.chunk(2, dim=1)
            if noise is None:
                z = mean
            else:
                std = torch.exp(0.5 * logvar.clamp(*_LOGVAR_RANGE))
                z = mean + std * noise[i : i + step]
            out.append(self.config.scale_factor * (z - self.config.shift_factor))
        return torch.cat(out) if len(out) > 1 else out[0]

    @torch.no_grad()
    def decode(self, latents: Tensor, *, micro_batch_size: int | None = None) -> Tensor:
        """``latents [B, 16, h, w]`` (scaled and shifted, as :meth:`encode` returns them) ->
        ``images [B, 3, 8h, 8w]``, nominally in [-1, 1] but not clamped (as upstream)."""
        if not isinstance(latents, Tensor):
            raise TypeError(f"latents must be a torch.Tensor [B, C, h, w], got {type(latents).__name__}")
        zc = self.config.z_channels
        if latents.dim() != 4 or latents.shape[1] != zc or 0 in latents.shape:
            raise ValueError(f"latents must be [B, {zc}, h, w] with B, h, w >= 1, got {list(latents.shape)}")
        if not latents.is_floating_point():
            raise TypeError(f"latents must be a floating tensor, got {latents.dtype}")
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("latents hold NaN or inf values")
        mbs = _positive_int_or_none(micro_batch_size, "micro_batch_size")
        z = (
            latents.to(device=self.device, dtype=self.dtype) / self.config.scale_factor
            + self.config.shift_factor
        )
        step = mbs or z.shape[0]
        out = [self.decoder(z[i : i + step]) for i in range(0, z.shape[0], step)]
        return torch.cat(out) if len(out) > 1 else out[0]

    def forward(self, images: Tensor) -> Tensor:
        """Reconstruction ``decode(encode(images, sample=False))``."""
        return self.decode(self.encode(images, sample=False))

    # -------------------------------------------------------------------------------------- packing
    @torch.no_grad()
    def encode_images(
        self,
        images: Sequence[Tensor],
        *,
        sample: bool = True,
        generator: torch.Generator | None = None,
        micro_batch_size: int | None = None,
        multiple_of: int = 1,
    ) -> list[Tensor]:
        """A list of ``[3, H_i, W_i]`` images (sizes may differ) -> a list of ``[16, H_i/8, W_i/8]``
        latents, e.g. for ``bagel.data.packing.VaeImage``. Images of one size are encoded together (in
        chunks of ``micro_batch_size``); with ``sample=True`` each image's noise is drawn in list order,
        so the result equals encoding the images one by one with the same generator. ``multiple_of``:
        the latent sides must be multiples of it (the latent patch size)."""
        if isinstance(images, Tensor) or not isinstance(images, Sequence) or len(images) == 0:
            raise ValueError("images must be a non-empty list of [3, H, W] tensors")
        _check_sample_args(sample, generator)
        mbs = _positive_int_or_none(micro_batch_size, "micro_batch_size")
        if _positive_int_or_none(multiple_of, "multiple_of") is None:
            raise ValueError("multiple_of must be a positive int, got None")
        f, zc = self.config.downsample_factor, self.config.z_channels
        side = f * multiple_of
        checked = []
        for i, img in enumerate(images):
            if not isinstance(img, Tensor) or img.dim() != 3:
                got = list(img.shape) if isinstance(img, Tensor) else type(img).__name__
                raise ValueError(f"images[{i}] must be a [3, H, W] tensor, got {got}")
            if img.shape[1] % side or img.shape[2] % side:
                raise ValueError(
                    f"images[{i}] is {img.shape[1]}x{img.shape[2]}: H and W must be multiples of {side} "
                    f"(downsampling {f} x latent patch size {multiple_of})"
                )
            checked.append(self._check_images(img.unsqueeze(0), f"images[{i}]"))
        noises = [
            self._noise((1, zc, x.shape[2] // f, x.shape[3] // f), generator) if sample else None
            for x in checked
        ]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, x in enumerate(checked):
            groups.setdefault(tuple(x.shape[2:]), []).append(i)
        latents: list[Tensor | None] = [None] * len(checked)
        for idx in groups.values():
            x = torch.cat([checked[i] for i in idx])
            noise = torch.cat([noises[i] for i in idx]) if sample else None
            for i, lat in zip(idx, self._encode(x, noise, mbs), strict=True):
                latents[i] = lat
        return latents

    @torch.no_grad()
    def encode_to_pack_layout(
        self,
        images: Sequence[Tensor],
        *,
        latent_patch_size: int = 2,
        sample: bool = True,
        generator: torch.Generator | None = None,
        micro_batch_size: int | None = None,
    ) -> dict[str, Any]:
        """Images of any sizes (multiples of ``8 * latent_patch_size``) -> ``{"padded_latent": [n, 16,
        Hmax/8, Wmax/8], "patchified_vae_latent_shapes": [(H_i/8/p, W_i/8/p), ...]}``, the pair
        ``BagelForUnifiedMultimodal.forward`` takes (see :func:`pad_latents`)."""
        p = _positive_int_or_none(latent_patch_size, "latent_patch_size")
        if p is None:
            raise ValueError("latent_patch_size must be a positive int, got None")
        latents = self.encode_images(
            images, sample=sample, generator=generator, micro_batch_size=micro_batch_size, multiple_of=p
        )
        return pad_latents(latents, latent_patch_size=p)


def _listing(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def pad_latents(latents: Sequence[Tensor], *, latent_patch_size: int = 2) -> dict[str, Any]:
    """Per-image latents ``[C, h_i * p, w_i * p]`` -> ``padded_latent [n, C, max h*p, max w*p]`` (zero
    padded, each latent in the top-left corner: ``padded_latent[i, :, :h_i*p, :w_i*p]`` is image ``i``,
    the crop ``bagel.model.prepare.patchify_latents`` takes) and ``patchified_vae_latent_shapes
    [(h_i, w_i)]`` in latent patches, as BAGEL's data pipeline lays them out."""
    p = latent_patch_size
    if isinstance(p, bool) or not isinstance(p, int) or p <= 0:
        raise ValueError(f"latent_patch_size must be a positive int, got {p!r}")
    if isinstance(latents, Tensor) or not isinstance(latents, Sequence) or len(latents) == 0:
        raise ValueError("latents must be a non-empty list of [C, h, w] tensors")
    shapes = []
    for i, lat in enumerate(latents):
        if not isinstance(lat, Tensor) or lat.dim() != 3:
            got = list(lat.shape) if isinstance(lat, Tensor) else type(lat).__name__
            raise ValueError(f"latents[{i}] must be a [C, h, w] tensor, got {got}")
        if (
            lat.shape[0] != latents[0].shape[0]
            or lat.dtype != latents[0].dtype
            or lat.device != latents[0].device
        ):
            raise ValueError(
                f"latents[{i}] is {lat.shape[0]} channels {lat.dtype} on {lat.device} but latents[0] is "
                f"{latents[0].shape[0]} channels {latents[0].dtype} on {latents[0].device}: one padded tensor"
            )
        h, w = lat.shape[1:]
        if h == 0 or w == 0 or h % p or w % p:
            raise ValueError(
                f"latents[{i}] is {h}x{w}: sides must be positive multiples of latent_patch_size {p}"
            )
        shapes.append((h // p, w // p))
    H = max(h for h, _ in shapes) * p
    W = max(w for _, w in shapes) * p
    first = latents[0]
    padded = first.new_zeros(len(latents), first.shape[0], H, W)
    for i, lat in enumerate(latents):
        padded[i, :, : lat.shape[1], : lat.shape[2]] = lat
    return {"padded_latent": padded, "patchified_vae_latent_shapes": shapes}


# ---------------------------------------------------------------------------------------------- diffusers
_LEVEL_KEYS = {"nin_shortcut": "conv_shortcut"}
_ATTN_KEYS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def diffusers_config(config: FluxVAEConfig | None = None) -> dict[str, Any]:
    """The ``diffusers.AutoencoderKL`` keyword arguments of the same architecture (FLUX.1's
    ``vae/config.json`` for the default config): 16 latent channels, no quant convs."""
    cfg = config or FluxVAEConfig()
    n = len(cfg.ch_mult)
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        act_fn="silu",
        latent_channels=cfg.z_channels,
        norm_num_groups=_GROUPS,
        sample_size=cfg.resolution,
        scaling_factor=cfg.scale_factor,
        shift_factor=cfg.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


def _diffusers_key(key: str, n_levels: int) -> str:
    parts = key.split(".")
    side, rest = parts[0], parts[1:]
    if side not in ("encoder", "decoder") or len(rest) < 2:
        raise ValueError(f"{key!r} is not a key of the FLUX VAE's state dict (encoder.* / decoder.*)")
    if rest[0] in ("down", "up"):
        i, kind = int(rest[1]), rest[2]
        # diffusers numbers decoder blocks in the order they run (widest first)
        blocks = f"down_blocks.{i}" if rest[0] == "down" else f"up_blocks.{n_levels - 1 - i}"
        if kind == "block":
            j, name = rest[3], rest[4]
            return ".".join([side, blocks, "resnets", j, _LEVEL_KEYS.get(name, name), *rest[5:]])
        sampler = "downsamplers" if kind == "downsample" else "upsamplers"
        return ".".join([side, blocks, sampler, "0", *rest[3:]])
    if rest[0] == "mid":
        if rest[1].startswith("block_"):
            return ".".join([side, "mid_block.resnets", str(int(rest[1][-1]) - 1), *rest[2:]])
        return ".".join([side, "mid_block.attentions.0", _ATTN_KEYS[rest[2]], *rest[3:]])
    if rest[0] == "norm_out":
        return ".".join([side, "conv_norm_out", *rest[1:]])
    return key  # conv_in, conv_out


def to_diffusers_state_dict(
    state_dict: dict[str, Tensor], config: FluxVAEConfig | None = None
) -> dict[str, Tensor]:
    """A state dict in BFL's layout (``ae.safetensors``, :class:`FluxVAE`) -> the same weights under
    ``diffusers.AutoencoderKL``'s names; the attention projections become ``[C, C]`` linears."""
    n = len((config or FluxVAEConfig()).ch_mult)
    out = {}
    for key, value in state_dict.items():
        new = _diffusers_key(key, n)
        if ".mid_block.attentions.0." in new and value.dim() == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    return out


# ---------------------------------------------------------------------------------------------- bagel-encode
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_MAX_IMAGE_SIDE = 8192  # --image-size: larger sides only exhaust memory in the encoder


@dataclass
class _EncodeArgs:
    source: str
    output: str
    ae: str | None
    tiny_random: int | None
    dtype: torch.dtype
    device: str
    image_size: tuple[int, int] | None
    sample: bool
    seed: int
    batch_size: int
    column: str


def _rgb(img: Any) -> Any:
    """An opened PIL image -> RGB, the way the data pipeline does it (``bagel.data.transforms``):
    16-bit samples scaled to 8 bits (PIL's convert clips them, whitening the image), transparent
    pixels over white; a float (mode F) image has no pixel range and is refused."""
    import numpy as np
    from PIL import Image

    img.load()
    if img.mode == "F":
        raise ValueError("a floating-point image (mode F) has no defined pixel range")
    if img.mode == "I" or img.mode.startswith("I;16"):
        arr = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return img.convert("RGB")


def _iter_images(source: str, column: str) -> Iterator[tuple[str, Any]]:
    """``(name, PIL image or the reason it is unusable)`` for every image file of a folder (sorted by
    name) or every row of a parquet file's ``column`` (bytes, or a ``{"bytes": ...}`` struct as Hugging
    Face datasets write). An unreadable image comes as a string (it is skipped and counted)."""
    import io

    with needs_extra():
        from PIL import Image

    def opened(fp: Any) -> Any:
        try:
            with Image.open(fp) as img:
                return _rgb(img)
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ...
            return f"{type(e).__name__}: {e}"

    if os.path.isdir(source):
        for name in sorted(os.listdir(source)):
            if name.lower().endswith(_IMAGE_SUFFIXES):
                path = os.path.join(source, name)
                stem = os.path.splitext(name)[0]
                yield stem, opened(path) if os.path.isfile(path) else "not a regular file"
        return
    with needs_extra():
        import pyarrow as pa
        import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(source)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{source} is not a readable parquet file ({e})") from None
    if column not in pf.schema_arrow.names:
        raise ValueError(f"{source} has no column {column!r} (columns: {pf.schema_arrow.names})")
    row = 0
    for rg in range(pf.num_row_groups):  # one row group in memory at a time
        for value in pf.read_row_group(rg, columns=[column]).column(column).to_pylist():
            if isinstance(value, dict):
                value = value.get("bytes")
            name = f"{row:08d}"
            row += 1
            if not isinstance(value, (bytes, bytearray)) or not value:
                yield name, f"row {name} of column {column!r} holds no image bytes"
            else:
                yield name, opened(io.BytesIO(value))


def _to_tensor(img: Any, size: tuple[int, int] | None, multiple: int) -> Tensor:
    """PIL RGB -> ``[3, H, W]`` in [-1, 1]: resized to ``size`` (H, W) when given, otherwise center-cropped
    down to multiples of ``multiple``."""
    import numpy as np

    if size is not None:
        img = img.resize((size[1], size[0]))
    W, H = img.size
    h, w = H - H % multiple, W - W % multiple
    if h == 0 or w == 0:
        raise ValueError(f"an image of {H}x{W} pixels is smaller than {multiple} pixels")
    top, left = (H - h) // 2, (W - w) // 2
    img = img.crop((left, top, left + w, top + h))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return x.float() / 127.5 - 1.0


def _parse_encode_args(argv: Sequence[str] | None) -> _EncodeArgs:
    parser = argparse.ArgumentParser(
        prog="bagel-encode",
        description="Precompute FLUX VAE latents of a folder of images or a parquet file into one "
        "safetensors file (one [16, H/8, W/8] tensor per image, keyed by file stem or row number).",
    )
    parser.add_argument("source", help="a folder of images (.png/.jpg/.jpeg/.webp/.bmp) or a .parquet file")
    parser.add_argument("output", help="the .safetensors file to write")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--ae", help="FLUX.1's ae.safetensors (or a folder holding it)")
    weights.add_argument(
        "--tiny-random", type=int, metavar="SEED", help="a tiny random VAE (for smoke tests, no download)"
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--image-size", type=int, nargs=2, metavar=("H", "W"), help="resize every image to H x W"
    )
    parser.add_argument("--mean", action="store_true", help="store the posterior mean instead of a sample")
    parser.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    parser.add_argument("--batch-size", type=int, default=8, help="images per encoder call")
    parser.add_argument(
        "--column", default=None, help="the parquet column that holds the image bytes (default: image)"
    )
    ns = parser.parse_args(argv)
    for flag, value in (("--seed", ns.seed), ("--tiny-random", ns.tiny_random)):
        if value is not None and not 0 <= value < 2**64:
            parser.error(f"{flag} must be in [0, 2**64), got {value}")
    try:
        device = torch.device(ns.device)
    except (RuntimeError, ValueError) as e:
        parser.error(f"--device {ns.device!r} is not a device ({e})")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {ns.device!r}: CUDA is not available on this machine")
    if ns.image_size is not None and max(ns.image_size) > _MAX_IMAGE_SIDE:
        parser.error(f"--image-size sides must be at most {_MAX_IMAGE_SIDE}, got {ns.image_size}")
    out_dir = os.path.dirname(os.path.abspath(ns.output))
    if os.path.isdir(ns.output):
        parser.error(f"output {ns.output!r} is a folder")
    if not os.path.isdir(out_dir):  # found before encoding, not after
        parser.error(f"the folder of output {ns.output!r} does not exist")
    if not os.path.exists(ns.source):
        parser.error(f"source {ns.source!r} does not exist")
    if not os.path.isdir(ns.source) and not ns.source.endswith(".parquet"):
        parser.error(f"source {ns.source!r} is neither a folder nor a .parquet file")
    if ns.column is not None and os.path.isdir(ns.source):
        parser.error("--column names a parquet column; the source is a folder of images")
    if not ns.output.endswith(".safetensors"):
        parser.error(f"output {ns.output!r} must end in .safetensors")
    if ns.batch_size <= 0:
        parser.error(f"--batch-size must be positive, got {ns.batch_size}")
    if ns.image_size is not None and min(ns.image_size) <= 0:
        parser.error(f"--image-size must be positive, got {ns.image_size}")
    if ns.image_size is not None and any(v % 8 for v in ns.image_size):
        parser.error(
            f"--image-size sides must be multiples of 8 (the VAE's downsampling), got {ns.image_size}"
        )
    return _EncodeArgs(
        source=ns.source,
        output=ns.output,
        ae=ns.ae,
        tiny_random=ns.tiny_random,
        dtype=getattr(torch, ns.dtype),
        device=ns.device,
        image_size=tuple(ns.image_size) if ns.image_size else None,
        sample=not ns.mean,
        seed=ns.seed,
        batch_size=ns.batch_size,
        column=ns.column or "image",
    )


def encode_main(argv: Sequence[str] | None = None) -> int:
    """``bagel-encode SOURCE OUTPUT (--ae FILE | --tiny-random SEED) [...]``: encode every image of a
    folder or parquet file and write the latents (scaled and shifted, as :meth:`FluxVAE.encode` returns
    them) to one safetensors file, with the VAE config and scale/shift in its metadata. Images are
    resized to ``--image-size`` when given, else center-cropped to multiples of 8; an image that does
    not decode (or is smaller than 8 pixels) is skipped and counted. Returns 0, 1 when encoding fails
    (one line on stderr), exits 2 on a usage error."""
    args = _parse_encode_args(argv)
    try:
        return _encode(args)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"bagel-encode: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


def _encode(args: _EncodeArgs) -> int:
    with needs_extra():
        from safetensors.torch import save_file
    if args.ae is not None:
        vae = FluxVAE.from_pretrained(args.ae, dtype=args.dtype, device=args.device)
    else:
        vae = FluxVAE(FluxVAEConfig.tiny(), dtype=args.dtype, device=args.device)
        vae.initialize_weights(args.tiny_random)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    f = vae.config.downsample_factor
    out: dict[str, Tensor] = {}
    batch: list[tuple[str, Tensor]] = []
    skipped: list[str] = []

    def flush() -> None:
        names, imgs = zip(*batch, strict=True)
        lats = vae.encode_images(list(imgs), sample=args.sample, generator=gen)
        out.update((n, lat.contiguous().cpu()) for n, lat in zip(names, lats, strict=True))
        batch.clear()

    seen: set[str] = set()
    for name, img in _iter_images(args.source, args.column):
        if name in seen:
            raise ValueError(f"{args.source}: two images share the name {name!r}")
        seen.add(name)
        if isinstance(img, str):
            skipped.append(f"{name} ({img})")
            continue
        W, H = img.size if args.image_size is None else args.image_size[::-1]
        if min(H, W) < f:
            skipped.append(f"{name} ({W}x{H} pixels, a side below {f})")
            continue
        batch.append((name, _to_tensor(img, args.image_size, f)))
        if len(batch) == args.batch_size:
            flush()
    if batch:
        flush()
    if skipped:
        print(
            f"bagel-encode: skipped {len(skipped)} unusable image(s): {_listing(skipped, 5)}",
            file=sys.stderr,
        )
    if not out:
        raise ValueError(f"{args.source}: no usable images found")
    meta = {k: str(v) for k, v in asdict(vae.config).items()}
    meta["sampled"] = str(args.sample)
    meta["skipped"] = str(len(skipped))
    tmp = f"{args.output}.tmp-{os.getpid()}"
    try:  # written whole, then renamed: an interrupted run never leaves a half file under the name
        save_file(out, tmp, metadata=meta)
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"bagel-encode: {len(out)} latents -> {args.output}", file=sys.stderr)
    return 0
