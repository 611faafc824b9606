"""VGG19 feature extractor Φ for the perceptual loss (Eq. 5).

Our own definition of the VGG19 convolutional trunk (Simonyan & Zisserman), laid out so its ``features.N`` indices
match torchvision's ``vgg19().features``: a torchvision-format state dict (``features.N.weight``/``.bias``) loads
directly, from a ``.pth`` (``torch.load(weights_only=True)``) or a ``.safetensors`` file. Only the layers up to
relu5_1 (index 29) are built, because the perceptual loss reads nothing deeper; deeper ``features.*`` keys and the
``classifier.*`` keys of a full checkpoint are ignored.

Where the weights come from, in order: the ``weights_path`` argument, the ``EDTALK_VGG19_WEIGHTS`` environment
variable, torchvision's own cache file ``<torch.hub.get_dir()>/checkpoints/vgg19-dcbb9e9d.pth`` if it is already on
disk. Nothing is downloaded. With none of them the network stays randomly initialised and says so loudly once per
process: a perceptual loss through a random VGG still trains, but it is not the paper's loss.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

ENV_WEIGHTS = "EDTALK_VGG19_WEIGHTS"
TORCHVISION_FILE = "vgg19-dcbb9e9d.pth"

# torchvision's configuration "E": channel counts, "M" = 2x2 max pool.
_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
# Indices in ``features`` of relu1_1, relu2_1, relu3_1, relu4_1, relu5_1.
RELU_INDICES = (1, 6, 11, 20, 29)
LAYER_NAMES = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_warned_random = False


def build_vgg_features(cfg: tuple, last_index: int | None = None) -> nn.Sequential:
    """A VGG convolutional trunk from a torchvision-style configuration (channel counts, "M" = 2x2 max pool),
    indexed like torchvision's ``vggNN().features``; built up to ``last_index`` (inclusive) or whole. VGG19 here
    and LPIPS' VGG16 (edtalk/metrics/lpips.py) are both built by it."""
    layers: list[nn.Module] = []
    in_ch = 3
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(in_ch, int(item), kernel_size=3, padding=1))
            # Not inplace: the returned relu outputs must stay intact while later layers run.
            layers.append(nn.ReLU(inplace=False))
            in_ch = int(item)
        if last_index is not None and len(layers) > last_index:
            break
    return nn.Sequential(*layers)


def relu_outputs(features: nn.Sequential, x: torch.Tensor, indices: tuple[int, ...]) -> list[torch.Tensor]:
    """Run ``features`` on x and return the activations after the layers at ``indices``."""
    outs: list[torch.Tensor] = []
    for i, layer in enumerate(features):
        x = layer(x)
        if i in indices:
            outs.append(x)
    return outs


def read_state_dict(path: str | os.PathLike, what: str, hint: str = "") -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt (``torch.load(weights_only=True)``: no pickle execution) or .safetensors file;
    ``what`` names it in errors, ``hint`` says what to do instead."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"{what} file {str(p)!r} does not exist: pass an existing .pth or .safetensors file{hint}"
        )
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p), device="cpu")
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{what} file {str(p)!r} holds a {type(state).__name__}, expected a state dict")
    return state


def load_torchvision_features(
    module: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str, other: str
) -> None:
    """Load the ``features.N.*`` keys of a torchvision checkpoint of architecture ``arch`` into ``module``
    (deeper features and the classifier are ignored); wrong keys or shapes fail naming the file and, through
    ``other``, the likely mix-up."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise KeyError(
            f"{arch.upper()} weights from {source} lack {len(missing)} keys (first: {missing[:3]}): expected a "
            f"torchvision-format {arch} state dict with keys like 'features.0.weight'"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{arch.upper()} weights from {source}: {k} has shape {tuple(state[k].shape)}, expected "
                f"{tuple(v.shape)} (is this a {other} or batch-norm variant, not a {arch}?)"
            )
    module.load_state_dict({k: state[k] for k in own}, strict=True)


def _default_weights_path() -> str | None:
    env = os.environ.get(ENV_WEIGHTS)
    if env:
        return env
    cached = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILE
    return str(cached) if cached.is_file() else None


def _warn_random_once() -> None:
    global _warned_random
    if _warned_random:
        return
    _warned_random = True
    msg = (
        "VGG19 has NO pretrained weights: the perceptual loss is running on a randomly initialised VGG19, which is "
        "not the paper's loss. Provide torchvision-format ImageNet weights (vgg19-dcbb9e9d.pth, keys "
        f"'features.N.weight') with the {ENV_WEIGHTS} environment variable, the model config's vgg_weights path, "
        f"or by placing the file in <torch.hub.get_dir()>/checkpoints/{TORCHVISION_FILE}."
    )
    log.warning(msg)
    warnings.warn(msg, UserWarning, stacklevel=3)


def load_vgg19_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a torchvision-format VGG19 state dict from a .pth/.pt or .safetensors file (no pickle execution)."""
    return read_state_dict(
        path, "VGG19 weights", f" (torchvision-format, or unset {ENV_WEIGHTS} to run with random weights)"
    )


class VGG19(nn.Module):
    """VGG19 trunk up to relu5_1; ``forward`` takes RGB images in [-1, 1] and returns the five relu_1 maps.

    Args:
        weights_path: torchvision-format weights file; None falls back to ``EDTALK_VGG19_WEIGHTS``, then the
            torchvision cache file, then random weights with a loud warning.
        requires_grad: False (the default) freezes the trunk, as a perceptual loss wants.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, requires_grad: bool = False) -> None:
        super().__init__()
        self.features = build_vgg_features(_CFG, RELU_INDICES[-1])
        # Non-persistent: the state dict stays exactly torchvision's key set.
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        path = str(weights_path) if weights_path is not None else _default_weights_path()
        self.pretrained = path is not None
        self.weights_path = path
        if path is not None:
            self.load_torchvision_state_dict(load_vgg19_state_dict(path), source=path)
            log.info("VGG19 weights loaded from %s", path)
        else:
            _warn_random_once()
        for p in self.parameters():
            p.requires_grad_(requires_grad)

    def load_torchvision_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load ``features.N.*`` keys (torchvision layout); deeper features and the classifier are ignored."""
        load_torchvision_features(self, state, source, "vgg19", "vgg16")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: [B,3,H,W] RGB in [-1,1], H and W >= 16 -> [relu1_1, relu2_1, relu3_1, relu4_1, relu5_1]."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"VGG19 input must be [B,3,H,W] RGB, got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < 16:
            raise ValueError(
                f"VGG19 input of size {tuple(x.shape[-2:])} is too small: relu5_1 needs at least 16x16 "
                "(drop the smallest scales of the perceptual pyramid)"
            )
        return relu_outputs(self.features, ((x + 1.0) * 0.5 - self.mean) / self.std, RELU_INDICES)
