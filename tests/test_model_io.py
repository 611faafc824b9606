"""save_pretrained / from_pretrained: equal outputs, safetensors + JSON only (never unpickles), clear errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from edtalk import EDTalk, ModelConfig


@pytest.fixture(scope="module")
def model() -> EDTalk:
    torch.manual_seed(0)
    m = EDTalk(ModelConfig.preset("tiny")).eval()
    with torch.no_grad():  # make the zero-initialised flow heads matter, so the round trip covers them
        for head in m.generator.flows:
            head.conv.weight.normal_(0, 0.1)
    m.emotion_means = {"happy": [0.5] * 10}
    m.active_spaces = ("mouth", "pose", "expression")
    return m


def test_round_trip_equal_outputs_without_unpickling(
    model: EDTalk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = model.save_pretrained(tmp_path / "m")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", "expression_predictor", "meta.json", "model.safetensors"]
    # The predictor's encoder configs and tokenizer travel as JSON: loading needs no HuBERT/RoBERTa checkpoint.
    assert (folder / "expression_predictor" / "speech_encoder" / "config.json").is_file()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["emotion_means"] == {"happy": [0.5] * 10}

    def forbidden(*args, **kwargs):
        raise AssertionError("from_pretrained must not unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    loaded = EDTalk.from_pretrained(folder).eval()
    monkeypatch.undo()

    assert loaded.config == model.config
    assert loaded.active_spaces == ("mouth", "pose", "expression")
    assert loaded.emotion_means == model.emotion_means
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    g = torch.Generator().manual_seed(1)
    src, drv = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1, torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(src, drv), loaded(src, drv))


def test_missing_or_invalid_files_name_the_folder(model: EDTalk, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere lacks \['model.safetensors', 'config.json'\]"):
        EDTalk.from_pretrained(tmp_path / "nowhere")
    folder = model.save_pretrained(tmp_path / "bad")
    (folder / "config.json").write_text(json.dumps({"image_size": 48}))
    with pytest.raises(ValueError, match=r"invalid .*bad/config.json: .*power of two"):
        EDTalk.from_pretrained(folder)
    cfg = ModelConfig.preset("tiny").to_dict()
    cfg["latent_dim"] = 96  # a valid config that does not match the stored weights
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        EDTalk.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['config.json'\]"):
        EDTalk.from_pretrained(folder)
