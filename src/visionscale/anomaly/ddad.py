"""DDAD: anomaly detection by conditioned denoising, DDAD-10 inference graph.

Paper: A. Mousakhan, T. Brox, J. Tayyub, "Anomaly Detection with Conditioned Denoising
Diffusion Models", arXiv:2305.15956, 2023. Official code: https://github.com/arimousa/DDAD
(``reconstruction.py: Reconstruction``, ``anomaly_map.py: heat_map``, ``config.yaml``,
``main.py: build_model``).

Input: images scaled to [-1, 1] (the official ``Dataset_maker`` maps ToTensor's [0, 1]
with ``2t - 1``). Pipeline, with the official ``config.yaml`` defaults:

1. Noise the image to step 250 of a 1000-step linear beta schedule (1e-4 .. 0.02):
   ``x_T = sqrt(a_250) y + sqrt(1 - a_250) n`` (``a`` = cumulative alpha product).
2. Ten DDIM steps over ``range(0, 250, 25)`` reversed: t = 225, 200, ..., 0, each to the
   previous element (-1 = clean, a = 1). Note the trajectory starts at t = 225 although
   the image was noised to 250; that is what the official loop does. Each step
   conditions the noise estimate on the input ``y`` (paper Sec. 3, conditioned
   denoising):

       y_t     = sqrt(a_t) y + sqrt(1 - a_t) eps            (eps = U-Net(x_t, t))
       eps_hat = eps - w sqrt(1 - a_t) (y_t - x_t)
       x0_t    = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t)
       x_next  = sqrt(a_next) x0_t + c1 z + c2 eps_hat,
       c1 = eta sqrt((1 - a_t / a_next)(1 - a_next) / (1 - a_t)),  c2 = sqrt(1 - a_next - c1^2)

   with w = 2 and eta = 1 (config defaults; the README tunes w per category, 0..11).
3. Anomaly map (``heat_map``): pixel distance ``D_p`` = mean over channels of
   ``|x0 - y|``; feature distance ``D_f`` = sum over layer2 and layer3 of
   ``1 - cos`` between 3x3-averaged features of input and reconstruction, each
   bilinearly upsampled (align_corners=True) to the input size;
   ``map = D_f + v * max(D_f) / max(D_p) * D_p`` with v = 1 (MVTec), then a Gaussian
   blur with sigma 4 (kernel 33, reflected border, as kornia's ``gaussian_blur2d``).
   Image score = max of the map.

Deviations from the official code, all on purpose:

* ``max(D_f) / max(D_p)`` is taken per image, not over the whole test batch, so a
  score does not depend on which images share its batch (identical for batch size 1).
* The 3x3 feature averaging is ``avg_pool2d`` (zero padding counted, as with the
  official ``Unfold`` + mean) instead of materialising 9x the features, and works for
  non-square maps.
* The official feature extractor also runs (and discards) layer4, and keeps the fc
  head. Here layer4 and fc are dropped; ``run_layer4=True`` keeps and runs layer4 to
  reproduce that cost.
* The official evaluation center-crops maps to 224 px before taking the max; the map
  here covers the whole input.
* Noise comes from a ``torch.Generator`` seeded with ``seed + step`` on the image's
  device, so ``forward`` is reproducible (the official code uses the global RNG). Step 0
  draws the initial noise, then that step's ``z``. No ``z`` is drawn when c1 = 0.

Components: ``denoiser`` (the U-Net plus one conditioned DDIM step, ``repeats`` = 10)
and ``feature_extractor`` (backbone on input and reconstruction, plus the map). The
step index lives in the state as a CPU int64 scalar under ``"ddad_step"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionscale.components import Component, State, run_components
from visionscale.modelinfo import IMAGENET_MEAN, IMAGENET_STD, ModelInfo
from visionscale.nn import resnet
from visionscale.nn.filters import gaussian_blur, gaussian_kernel1d
from visionscale.nn.unet import UNet, UNetConfig
from visionscale.registry import register_model

__all__ = ["DDAD", "DDADConfig", "conditioned_ddim_step", "ddad", "ddad_tiny", "ddim_timesteps", "linear_beta_schedule"]

_BACKBONES = {
    "wide_resnet101_2": resnet.wide_resnet101_2,  # official config.yaml default
    "wide_resnet50_2": resnet.wide_resnet50_2,
    "resnet50": resnet.resnet50,
    "resnet_tiny": resnet.resnet_tiny,
}

STEP_KEY = "ddad_step"


def linear_beta_schedule(start: float, end: float, n: int) -> list[float]:
    """``np.linspace(start, end, n)`` in Python floats (official ``_compute_alpha``)."""
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def ddim_timesteps(noise_step: int, skip: int) -> tuple[tuple[int, int], ...]:
    """Official trajectory: ``seq = range(0, noise_step, skip)`` walked backwards, each
    step going to the previous element (-1 = clean image). (250, 25) -> (225, 200) .. (0, -1)."""
    seq = list(range(0, noise_step, skip))
    nxt = [-1] + seq[:-1]
    return tuple(zip(reversed(seq), reversed(nxt)))


def conditioned_ddim_step(
    x_t: Tensor, y: Tensor, eps: Tensor, at: float, an: float, w: float, eta: float, z: Tensor | None
) -> Tensor:
    """One conditioned DDIM step (paper Sec. 3; official ``Reconstruction.__call__``).

    ``x_t`` is the current sample, ``y`` the condition (target) image, ``eps`` the U-Net's
    noise estimate at step t, ``at`` / ``an`` the cumulative alpha products at t and at
    the next step. ``z`` is the fresh noise (only used when c1 > 0, i.e. ``eta`` > 0).
    Inference conditions on the input itself (``y`` = input); domain adaptation
    reconstructs one training image conditioned on another (``w_DA``).
    """
    y_t = math.sqrt(at) * y + math.sqrt(1 - at) * eps  # the condition, noised with eps
    eps_hat = eps - (w * math.sqrt(1 - at)) * (y_t - x_t)
    x0 = (x_t - math.sqrt(1 - at) * eps_hat) / math.sqrt(at)
    c1 = eta * math.sqrt((1 - at / an) * (1 - an) / (1 - at))
    c2 = math.sqrt(max(1 - an - c1**2, 0.0))
    x_next = math.sqrt(an) * x0 + c2 * eps_hat
    if c1 > 0:
        if z is None:
            raise ValueError("conditioned_ddim_step: eta > 0 needs the noise z")
        x_next = x_next + c1 * z
    return x_next


@dataclass(frozen=True)
class DDADConfig:
    """DDAD inference settings (defaults: official ``config.yaml``).

    Attributes:
        unet: Denoiser architecture (official 256 px DDAD model by default).
        backbone: Feature extractor factory in ``visionscale.nn.resnet``.
        backbone_weights: None (random init), ``"DEFAULT"``, a weights name or a path.
        feature_layers: Layers compared feature-wise (official: layer2, layer3).
        num_train_steps: Diffusion steps of the schedule (``trajectory_steps``).
        beta_start: First beta.
        beta_end: Last beta.
        noise_step: Step the input is noised to (``test_trajectoy_steps``).
        skip: Stride of the denoising trajectory (``skip``); 250 / 25 = 10 steps.
        eta: DDIM stochasticity (1 = DDPM-like variance).
        w: Conditioning weight; larger stays closer to the input.
        v: Weight of the pixel distance against the feature distance.
        sigma: Gaussian blur of the map.
        seed: Seed of the noise generators.
        run_layer4: Keep and run the backbone's unused layer4 like the official code.
    """

    unet: UNetConfig = field(default_factory=UNetConfig)
    backbone: str = "wide_resnet101_2"
    backbone_weights: str | None = None
    feature_layers: tuple[str, ...] = ("layer2", "layer3")
    num_train_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    noise_step: int = 250
    skip: int = 25
    eta: float = 1.0
    w: float = 2.0
    v: float = 1.0
    sigma: float = 4.0
    seed: int = 42
    run_layer4: bool = False

    def __post_init__(self) -> None:
        if self.backbone not in _BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(_BACKBONES)}, got {self.backbone!r}")
        if not 0 < self.noise_step < self.num_train_steps:
            raise ValueError(f"noise_step must be in (0, {self.num_train_steps}), got {self.noise_step}")
        if self.skip < 1:
            raise ValueError(f"skip must be >= 1, got {self.skip}")


class GaussianBlur(nn.Module):
    """Separable Gaussian blur with reflected borders (kornia ``gaussian_blur2d`` defaults)."""

    def __init__(self, sigma: float):
        super().__init__()
        kernel = gaussian_kernel1d(sigma)  # official kernel_size = 2 * int(4 sigma + 0.5) + 1
        self.radius = kernel.numel() // 2
        self.register_buffer("kernel", kernel.float(), persistent=False)  # (2r+1,)

    def forward(self, x: Tensor) -> Tensor:
        return gaussian_blur(x, self.kernel, border="reflect")


class DDAD(nn.Module):
    """DDAD inference: conditioned DDIM reconstruction, then pixel + feature distance.

    ``forward(x)`` with ``x`` (B, 3, H, W) in [-1, 1] returns ``anomaly_map`` (B, 1, H, W),
    ``pred_score`` (B,) and ``reconstruction`` (B, 3, H, W); it equals running
    :meth:`components` with :func:`visionscale.components.run_components`.
    """

    def __init__(self, config: DDADConfig | None = None):
        super().__init__()
        cfg = self.config = config or DDADConfig()
        self.unet = UNet(cfg.unet)
        backbone = _BACKBONES[cfg.backbone](weights=cfg.backbone_weights, num_classes=0)
        self._backbone_layers = cfg.feature_layers + (("layer4",) if cfg.run_layer4 else ())
        last = max(resnet.STAGES.index(n) for n in self._backbone_layers)
        for name in resnet.STAGES[last + 1 :]:
            delattr(backbone, name)  # stages that never run hold no parameters
        self.backbone = backbone

        # Schedule in Python floats: the step arithmetic uses them, so it needs no
        # host-device sync and also runs on the meta device. Buffers mirror it.
        betas = linear_beta_schedule(cfg.beta_start, cfg.beta_end, cfg.num_train_steps)
        alpha_bar, prod = [1.0], 1.0  # index t + 1; t = -1 (clean image) -> 1
        for b in betas:
            prod *= 1.0 - b
            alpha_bar.append(prod)
        self._alpha_bar = alpha_bar
        self.register_buffer("betas", torch.tensor(betas, dtype=torch.float32), persistent=False)
        self.register_buffer("alphas_cumprod", torch.tensor(alpha_bar[1:], dtype=torch.float32), persistent=False)

        # Official: seq = range(0, noise_step, skip), walked backwards, next = previous or -1.
        self.timesteps: tuple[tuple[int, int], ...] = ddim_timesteps(cfg.noise_step, cfg.skip)

        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.blur = GaussianBlur(cfg.sigma)
        # Input in [-1, 1] (the official Dataset_maker's 2 x [0, 1] - 1), trained at 256 px.
        # Batch 1 for export: the graph holds the sampling noise of one shape (for_export),
        # and a Runner scores any batch image by image.
        # Tiles: starts on the U-Net's size multiple; the margin (its receptive field is wider)
        # keeps the blur's reflected border and most of the conditioning context out of the
        # stitched map. The map's per-image scale (max D_f / max D_p) is per tile when tiled.
        self.model_info = ModelInfo(input_size=(256, 256), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), export_batch=1,
                                    tile_align=self.unet.config.size_multiple, tile_margin=max(32, self.blur.radius))

    @property
    def num_steps(self) -> int:
        """Denoising steps per image (10 for DDAD-10)."""
        return len(self.timesteps)

    def alpha_bar(self, t: int) -> float:
        """Cumulative alpha product at step ``t`` (0-based); ``t = -1`` gives 1."""
        return self._alpha_bar[t + 1]

    def validate_input_size(self, h: int, w: int) -> None:
        """U-Net divisibility, and a map larger than the blur radius (reflected border)."""
        self.unet.validate_input_size(h, w)
        r = self.blur.radius
        if h <= r or w <= r:
            raise ValueError(
                f"DDAD's Gaussian blur (sigma {self.config.sigma}) reflects a {r} px border, "
                f"so height and width must exceed {r}, got {h}x{w}"
            )

    def _randn(self, like: Tensor, gen: torch.Generator | None) -> Tensor:
        return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)

    def _generator(self, device: torch.device, step: int) -> torch.Generator | None:
        if device.type == "meta":  # shapes only: nothing to seed
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self.config.seed + step)
        return gen

    def _draws(self, y: Tensor, step: int, gen: torch.Generator | None) -> tuple[Tensor | None, Tensor | None]:
        """The Gaussian draws of denoising step ``step``, in the order forward() makes them:
        the initial noise (step 0 only), then the DDIM noise z (when the step's sigma > 0)."""
        init = self._randn(y, gen) if step == 0 else None
        t, t_next = self.timesteps[step]
        at, an = self.alpha_bar(t), self.alpha_bar(t_next)
        c1 = self.config.eta * math.sqrt((1 - at / an) * (1 - an) / (1 - at))
        z = self._randn(y, gen) if c1 > 0 else None
        return init, z

    def _ddim(self, y: Tensor, x_t: Tensor | None, step: int, init: Tensor | None, z: Tensor | None) -> Tensor:
        """Step ``step`` of the conditioned DDIM walk; step 0 noises ``y`` with ``init`` first."""
        cfg = self.config
        if step == 0:
            a = self.alpha_bar(cfg.noise_step)
            x_t = math.sqrt(a) * y + math.sqrt(1 - a) * init
        t, t_next = self.timesteps[step]
        eps = self.unet(x_t, torch.full((y.shape[0],), float(t), device=y.device))  # (B, 3, H, W)
        return conditioned_ddim_step(x_t, y, eps, self.alpha_bar(t), self.alpha_bar(t_next), cfg.w, cfg.eta, z)

    @torch.no_grad()
    def denoise_step(self, state: State) -> State:
        """One conditioned DDIM step; step 0 also noises the input to ``noise_step``."""
        y = state["image"]  # (B, 3, H, W) in [-1, 1]: the condition (target) image
        step = int(state[STEP_KEY]) if STEP_KEY in state else 0
        if step >= self.num_steps:
            raise RuntimeError(f"DDAD denoiser already ran all {self.num_steps} steps")
        if step == 0:
            self.validate_input_size(*y.shape[-2:])
        init, z = self._draws(y, step, self._generator(y.device, step))
        x_next = self._ddim(y, state.get("x_t"), step, init, z)

        out: State = {"x_t": x_next, STEP_KEY: torch.tensor(step + 1, dtype=torch.int64, device="cpu")}
        # On the meta device (the profiler's shape-only pass) the later steps are skipped,
        # as they allocate exactly what the first did; the reconstruction's shape is known now.
        if step + 1 == self.num_steps or x_next.device.type == "meta":
            out["reconstruction"] = x_next
        return out

    def sampling_noise(self, like: Tensor) -> list[tuple[Tensor | None, Tensor | None]]:
        """Every Gaussian draw :meth:`forward` makes for an input shaped and placed like ``like``,
        per step ``(initial noise or None, z or None)``: with them, :meth:`forward_with_noise`
        gives exactly what :meth:`forward` gives."""
        return [self._draws(like, s, self._generator(like.device, s)) for s in range(self.num_steps)]

    @torch.no_grad()
    def forward_with_noise(self, x: Tensor, noise: list[tuple[Tensor | None, Tensor | None]]) -> dict[str, Tensor]:
        """:meth:`forward` with the sampling noise given (see :meth:`sampling_noise`): no
        generator and no step counter in the graph, so ``torch.export`` can trace it."""
        self.validate_input_size(*x.shape[-2:])
        x_t = None
        for step, (init, z) in enumerate(noise):
            x_t = self._ddim(x, x_t, step, init, z)
        out = self.anomaly_map({"image": x, "reconstruction": x_t})
        return {**out, "reconstruction": x_t}

    def _normalize(self, x: Tensor) -> Tensor:
        # [-1, 1] -> [0, 1] -> ImageNet statistics (official feature_distance transform).
        return ((x + 1) / 2 - self.mean) / self.std

    def anomaly_map(self, state: State) -> State:
        """Pixel + feature distance between input and reconstruction, blurred; score = max."""
        cfg = self.config
        x, rec = state["image"], state["reconstruction"]
        size = tuple(x.shape[-2:])
        d_pix = (rec - x).abs().mean(dim=1, keepdim=True)  # (B, 1, H, W)
        # Two backbone passes as in the official code (input first, then reconstruction).
        f_in = self.backbone.features(self._normalize(x), self._backbone_layers)
        f_rec = self.backbone.features(self._normalize(rec), self._backbone_layers)
        d_feat = torch.zeros_like(d_pix)
        for name in cfg.feature_layers:
            a = F.avg_pool2d(f_in[name], 3, stride=1, padding=1)  # (B, C_l, h_l, w_l)
            b = F.avg_pool2d(f_rec[name], 3, stride=1, padding=1)
            dist = 1 - F.cosine_similarity(a, b, dim=1)[:, None]  # (B, 1, h_l, w_l)
            d_feat = d_feat + F.interpolate(dist, size=size, mode="bilinear", align_corners=True)
        max_pix = d_pix.amax(dim=(1, 2, 3), keepdim=True).clamp_min(torch.finfo(d_pix.dtype).tiny)
        amap = d_feat + cfg.v * d_feat.amax(dim=(1, 2, 3), keepdim=True) / max_pix * d_pix
        amap = self.blur(amap)  # (B, 1, H, W)
        return {"anomaly_map": amap, "pred_score": amap.amax(dim=(1, 2, 3))}

    def components(self) -> list[Component]:
        """The U-Net step (x ``num_steps``), then the feature extractor with the map."""
        return [
            Component("denoiser", self.unet, self.denoise_step, repeats=self.num_steps),
            Component("feature_extractor", self.backbone, self.anomaly_map),
        ]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        state = run_components(self.components(), x)
        return {k: state[k] for k in ("anomaly_map", "pred_score", "reconstruction")}

    def for_export(self, batch: int, height: int, width: int) -> tuple[nn.Module, str]:
        """The module a graph export holds instead of this one, and a note saying why.

        ``forward`` samples Gaussian noise from seeded generators at each DDIM step; a graph
        cannot hold torch's generator (ONNX RandomNormal uses the runtime's own), so the export
        holds the very draws this model makes for ``(batch, 3, height, width)``: outputs match
        eager exactly, at that shape only.
        """
        note = (f"DDAD's sampling noise is frozen into the graph for inputs ({batch}, 3, {height}, {width}) (the "
                "draws of its seeded generators, so outputs equal eager ones); the graph accepts that shape only")
        return DDADFixedNoise(self, batch, height, width), note


class DDADFixedNoise(nn.Module):
    """DDAD with its sampling noise frozen for one input shape: a deterministic graph that
    ONNX export can hold, equal to ``ddad(x)`` for inputs of that shape on the CPU.

    The noise comes from DDAD's own seeded generators, so the exported model's outputs match
    the eager model's exactly at ``(batch, 3, height, width)``; other shapes are refused. Its
    size: (num_steps + 1) noise tensors of the input's size (DDAD-10 at 256 px: 8.6 MB per image).
    """

    def __init__(self, ddad: DDAD, batch: int, height: int, width: int):
        super().__init__()
        self.ddad = ddad
        self.shape = (batch, 3, height, width)
        ddad.validate_input_size(height, width)
        like = torch.zeros(self.shape)
        self._layout: list[tuple[bool, bool]] = []
        for step, (init, z) in enumerate(ddad.sampling_noise(like)):
            self._layout.append((init is not None, z is not None))
            if init is not None:
                self.register_buffer(f"init_{step}", init, persistent=False)
            if z is not None:
                self.register_buffer(f"z_{step}", z, persistent=False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if tuple(x.shape) != self.shape:
            raise ValueError(f"this DDAD graph holds sampling noise for inputs {self.shape}, got {tuple(x.shape)}")
        noise = [(getattr(self, f"init_{s}") if has_init else None, getattr(self, f"z_{s}") if has_z else None)
                 for s, (has_init, has_z) in enumerate(self._layout)]
        return self.ddad.forward_with_noise(x, noise)


_UNET_FIELDS = {f.name for f in fields(UNetConfig)}


def _build(unet: UNetConfig, **kw) -> DDAD:
    # U-Net keywords (e.g. attention="sdpa", dropout) go to its config, the rest to DDADConfig.
    unet_kw = {k: kw.pop(k) for k in list(kw) if k in _UNET_FIELDS}
    if unet_kw:
        unet = replace(unet, **unet_kw)
    return DDAD(DDADConfig(unet=unet, **kw)).eval()


@register_model()
def ddad(image_size: int | tuple[int, int] = 256, backbone: str = "wide_resnet101_2",
         attention: str = "math", **kw) -> DDAD:
    """DDAD-10 as in the official code: 256 px U-Net (base 64), Wide-ResNet-101-2 features.

    ``image_size`` is unused: the network is the one the official code trains at 256 px,
    run at any H, W divisible by 32 (see :meth:`DDAD.validate_input_size`; the first
    denoising step checks it). The official ``UNetModel`` would build a different
    network for ``img_size=512``. Returned in eval mode, random weights unless
    ``backbone_weights`` is given (the U-Net always starts random).

    Args:
        image_size: Unused; accepted so the profiler can build any model per resolution.
        backbone: ``wide_resnet101_2`` (official default), ``wide_resnet50_2``, ``resnet50``.
        attention: ``"math"`` (reference: explicit tokens x tokens weights) or ``"sdpa"``.
        **kw: :class:`DDADConfig` fields (``w``, ``v``, ``eta``, ``seed``...) or
            :class:`UNetConfig` fields (``dropout``, ``num_heads``...).
    """
    return _build(UNetConfig(attention=attention), backbone=backbone, **kw)


@register_model()
def ddad_tiny(image_size: int | tuple[int, int] = 256, backbone: str = "resnet_tiny",
              attention: str = "math", **kw) -> DDAD:
    """Tiny DDAD for CPU tests: 3-level U-Net (8-16-16 channels, 4 groups), resnet_tiny.

    Same code and the same 10-step trajectory; H, W must be multiples of 4 and > 16.
    ``image_size`` is unused.
    """
    unet = UNetConfig(base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1, attention_ds=(2, 4),
                      num_heads=2, norm_groups=4, attention=attention)
    return _build(unet, backbone=backbone, **kw)
