"""VGG19 of the perceptual loss: torchvision-format weights load exactly; running without them is loud."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from edtalk import vgg19 as vgg_mod
from edtalk.vgg19 import VGG19


def _torchvision_format_state(seed: int) -> dict[str, torch.Tensor]:
    """A full torchvision vgg19 key set (features 0..34 and classifier) with random values."""
    torch.manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    in_ch, idx = 3, 0
    for item in vgg_mod._CFG:
        if item == "M":
            idx += 1
            continue
        state[f"features.{idx}.weight"] = torch.randn(item, in_ch, 3, 3)
        state[f"features.{idx}.bias"] = torch.randn(item)
        in_ch, idx = item, idx + 2
    state["classifier.0.weight"] = torch.randn(8, 4)  # present in real files, ignored by us
    state["classifier.0.bias"] = torch.randn(8)
    return state


@pytest.fixture()
def no_default_weights(monkeypatch, tmp_path):
    monkeypatch.delenv(vgg_mod.ENV_WEIGHTS, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(vgg_mod, "_warned_random", False)


def test_layer_indices_match_torchvision_layout(no_default_weights):
    with pytest.warns(UserWarning):
        net = VGG19()
    convs = [i for i, m in enumerate(net.features) if isinstance(m, torch.nn.Conv2d)]
    # torchvision vgg19().features conv indices up to conv5_1
    assert convs == [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28]
    assert all(isinstance(net.features[i], torch.nn.ReLU) for i in vgg_mod.RELU_INDICES)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_torchvision_key_state_dict_loads_exactly(tmp_path, fmt, no_default_weights):
    state = _torchvision_format_state(seed=3)
    path = tmp_path / f"vgg19.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    net = VGG19(path)
    assert net.pretrained
    own = net.state_dict()
    assert set(own) == {k for k in state if k.startswith("features.") and int(k.split(".")[1]) <= 28}
    for k, v in own.items():
        assert torch.equal(v, state[k]), k
    assert not any(p.requires_grad for p in net.parameters())


def test_env_variable_path_is_used(tmp_path, monkeypatch, no_default_weights):
    state = _torchvision_format_state(seed=5)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    monkeypatch.setenv(vgg_mod.ENV_WEIGHTS, str(path))
    net = VGG19()
    assert torch.equal(net.features[28].weight, state["features.28.weight"])


def test_random_init_warns_loudly_once(no_default_weights, caplog):
    with (
        caplog.at_level(logging.WARNING, logger="edtalk.vgg19"),
        pytest.warns(UserWarning, match="NO pretrained"),
    ):
        net = VGG19()
    assert not net.pretrained
    assert any(vgg_mod.ENV_WEIGHTS in r.getMessage() for r in caplog.records)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VGG19()  # second time: no new warning


def test_bad_weights_are_named(tmp_path, no_default_weights):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VGG19(tmp_path / "missing.pth")
    state = _torchvision_format_state(seed=1)
    state["features.0.weight"] = torch.randn(64, 3, 5, 5)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="features.0.weight"):
        VGG19(tmp_path / "bad.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(KeyError, match="torchvision-format"):
        VGG19(tmp_path / "wrong.pth")


def test_forward_returns_five_relu_maps(no_default_weights):
    with pytest.warns(UserWarning):
        net = VGG19()
    outs = net(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert [tuple(o.shape[1:]) for o in outs] == [
        (64, 32, 32),
        (128, 16, 16),
        (256, 8, 8),
        (512, 4, 4),
        (512, 2, 2),
    ]
    assert all((o >= 0).all() for o in outs)
    with pytest.raises(ValueError, match="too small"):
        net(torch.zeros(1, 3, 8, 8))
