"""LPIPS, the learned perceptual image patch similarity (Zhang, Isola, Efros, Shechtman & Wang, CVPR 2018), VGG16.

d(x, y) = sum over five VGG16 layers l of mean_{h,w} || w_l * (n(f_l(x)) - n(f_l(y))) ||^2, where f_l are the
relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 activations, n() divides each spatial position's feature vector by
its L2 norm, and w_l are the learned non-negative per-channel weights (the "lin" layers: 1x1 convolutions without
bias). Inputs are RGB in [-1, 1], first shifted and scaled per channel by the constants of the paper's release.

Two local files are needed, nothing is downloaded:
  backbone  torchvision-format VGG16 ImageNet weights (vgg16-397923af.pth, keys "features.N.weight"): the
            `backbone_path` argument, $EDTALK_LPIPS_VGG16_WEIGHTS, or torchvision's cache file
            <torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth;
  lin       the LPIPS v0.1 linear weights for VGG (the release's vgg.pth, keys "lin0.model.1.weight".."lin4..."):
            the `lin_path` argument or $EDTALK_LPIPS_LIN_WEIGHTS.
Without them `lpips_distance()` returns None and warns once why: an LPIPS from random weights would be a different number.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edtalk.vgg19 import build_vgg_features, load_torchvision_features, read_state_dict, relu_outputs

log = logging.getLogger(__name__)

ENV_BACKBONE = "EDTALK_LPIPS_VGG16_WEIGHTS"
ENV_LIN = "EDTALK_LPIPS_LIN_WEIGHTS"
TORCHVISION_FILE = "vgg16-397923af.pth"

# torchvision's VGG16 configuration "D" up to conv5_3; "M" = 2x2 max pool.
_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
RELU_INDICES = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in `features`
CHANNELS = (64, 128, 256, 512, 512)
# Input normalisation of the LPIPS release: (x - SHIFT) / SCALE on [-1, 1] RGB (ImageNet statistics rescaled).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # in the channel normalisation, so an all-zero feature vector stays zero

_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason in _warned:
        return
    _warned.add(reason)
    msg = f"LPIPS is not computed: {reason}"
    log.warning(msg)
    warnings.warn(msg, UserWarning, stacklevel=3)


class VGG16Features(nn.Module):
    """VGG16 convolutional trunk up to relu5_3, indexed like torchvision's ``vgg16().features``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = build_vgg_features(_CFG)

    def load_torchvision_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load the ``features.N.*`` keys of a torchvision vgg16 checkpoint; the classifier is ignored."""
        load_torchvision_features(self, state, source, "vgg16", "vgg19")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return relu_outputs(self.features, x, RELU_INDICES)


def _lin_key_index(key: str) -> int | None:
    """The layer index of a lin weight key in any of the layouts we accept."""
    for pattern in (r"^lin(\d)\.model\.1\.weight$", r"^lin(\d)\.weight$", r"^lins\.(\d)\.weight$"):
        m = re.match(pattern, key)
        if m:
            return int(m.group(1))
    return None


class LPIPS(nn.Module):
    """LPIPS-VGG16 distance. ``forward(x, y)`` takes [N, 3, H, W] RGB in [-1, 1] and returns [N] distances.

    Built with random weights; use ``LPIPS.from_files`` (or ``load_lpips``) for the real metric.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = VGG16Features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, backbone_path: str | os.PathLike, lin_path: str | os.PathLike) -> LPIPS:
        model = cls()
        model.net.load_torchvision_state_dict(
            read_state_dict(backbone_path, "VGG16 weights"), str(backbone_path)
        )
        model.load_lin_state_dict(read_state_dict(lin_path, "LPIPS lin weights"), str(lin_path))
        return model

    def load_lin_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        found: dict[int, torch.Tensor] = {}
        for key, value in state.items():
            idx = _lin_key_index(key)
            if idx is not None:
                found[idx] = value
        if sorted(found) != list(range(len(CHANNELS))):
            raise KeyError(
                f"LPIPS lin weights from {source}: expected keys lin0..lin4 ('lin0.model.1.weight' as in the LPIPS "
                f"release's vgg.pth), found layers {sorted(found)} among {list(state)[:6]}"
            )
        for idx, lin in enumerate(self.lins):
            w = found[idx]
            if w.numel() != CHANNELS[idx]:
                raise ValueError(
                    f"LPIPS lin weights from {source}: layer {idx} has {w.numel()} weights, the VGG variant needs "
                    f"{CHANNELS[idx]} (are these AlexNet or SqueezeNet lin weights?)"
                )
            lin.weight.data.copy_(w.reshape(lin.weight.shape))

    def layer_distances(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer contributions, each [N]; their sum is the distance."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS needs two [N, 3, H, W] batches of one shape, got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        if min(x.shape[-2:]) < 16:
            raise ValueError(f"LPIPS-VGG needs images of at least 16x16, got {tuple(x.shape[-2:])}")
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        out = []
        for a, b, lin in zip(fx, fy, self.lins, strict=True):
            na = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)
            nb = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)
            out.append(lin((na - nb) ** 2).mean(dim=(1, 2, 3)))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.layer_distances(x, y)).sum(dim=0)


def _resolve_paths(backbone_path, lin_path) -> tuple[str | None, str | None]:
    backbone = backbone_path or os.environ.get(ENV_BACKBONE)
    if backbone is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILE
        backbone = str(cached) if cached.is_file() else None
    return (str(backbone) if backbone else None), (str(lin_path or os.environ.get(ENV_LIN) or "") or None)


_cache: dict[tuple[str, str], LPIPS] = {}


def load_lpips(
    backbone_path: str | os.PathLike | None = None, lin_path: str | os.PathLike | None = None
) -> LPIPS | None:
    """The LPIPS-VGG16 model from local files (see the module doc), or None with a one-time warning saying why."""
    backbone, lin = _resolve_paths(backbone_path, lin_path)
    if backbone is None:
        _warn_once(
            f"no VGG16 backbone weights (torchvision-format {TORCHVISION_FILE}): pass backbone_path, set "
            f"${ENV_BACKBONE}, or put the file in <torch.hub.get_dir()>/checkpoints/"
        )
        return None
    if lin is None:
        _warn_once(
            f"no LPIPS lin weights (the LPIPS v0.1 release's vgg.pth): pass lin_path or set ${ENV_LIN}"
        )
        return None
    for path, what in ((backbone, "VGG16 backbone"), (lin, "LPIPS lin")):
        if not Path(path).is_file():
            _warn_once(f"the {what} weights file {path!r} does not exist")
            return None
    key = (backbone, lin)
    if key not in _cache:
        _cache[key] = LPIPS.from_files(backbone, lin)
        log.info("LPIPS-VGG16 loaded from %s and %s", backbone, lin)
    return _cache[key]


def _to_model_range(x) -> torch.Tensor:
    """uint8 frames (N, H, W, 3) or (H, W, 3) -> float [N, 3, H, W] in [-1, 1]; float tensors pass as NCHW."""
    if (
        isinstance(x, np.ndarray)
        and x.dtype == np.uint8
        or isinstance(x, torch.Tensor)
        and x.dtype == torch.uint8
    ):
        t = torch.as_tensor(x)
        t = t[None] if t.dim() == 3 else t
        return t.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    t = torch.as_tensor(x, dtype=torch.float32)
    return t[None] if t.dim() == 3 else t


def lpips_distance(
    a,
    b,
    backbone_path: str | os.PathLike | None = None,
    lin_path: str | os.PathLike | None = None,
    model: LPIPS | None = None,
    batch_size: int = 16,
) -> np.ndarray | None:
    """LPIPS per frame -> (N,) float64, or None when the weights are not available (warned once).

    a, b: uint8 frames (N, H, W, 3) / (H, W, 3), or float [N, 3, H, W] in [-1, 1] (the model's tensors).
    """
    model = model if model is not None else load_lpips(backbone_path, lin_path)
    if model is None:
        return None
    x, y = _to_model_range(a), _to_model_range(b)
    if x.shape != y.shape:
        raise ValueError(f"LPIPS inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            out.append(
                model(x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)).double().cpu()
            )
    return torch.cat(out).numpy()
