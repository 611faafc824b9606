"""The paper preset: parameter counts against the reference implementation, shapes through every network.

The model is built once for this file (a few seconds); one batch-1 forward, no backward.
"""

from __future__ import annotations

import pytest
import torch

from edtalk import EDTalk, ModelConfig

# DESIGN.md section 2: the published reference implementation's counts.
REFERENCE = {
    "generator_with_eem": 64.2e6,  # E + G + navigation MLPs/banks + EEM
    "encoder": 21.6e6,
    "decoder_with_eem": 39.9e6,
    "eem": 17.5e6,
    "discriminator": 24.0e6,
}


@pytest.fixture(scope="module")
def paper() -> EDTalk:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("paper")
    # The paper's expression predictor loads HuBERT/RoBERTa checkpoints that are not on a test machine.
    cfg.expression_predictor = None
    return EDTalk(cfg).eval()


def test_parameter_counts_match_the_reference(paper: EDTalk) -> None:
    counts = paper.parameter_counts()
    for name, ref in REFERENCE.items():
        assert abs(counts[name] / ref - 1) <= 0.15, f"{name}: {counts[name]:,} vs reference {ref:,.0f}"
    # The navigation: shared trunk (4 x 512x512) plus one head per space and the four banks.
    nav = paper.navigation
    assert sum(p.numel() for p in nav.trunk.parameters()) == 4 * (512 * 512 + 512)
    assert {s: tuple(nav.space(s).bank.shape) for s in ("mouth", "pose", "eye", "expression")} == {
        "mouth": (512, 20),
        "pose": (512, 6),
        "eye": (512, 6),
        "expression": (512, 10),
    }


def test_shapes_through_every_network_paper(paper: EDTalk) -> None:
    img = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.inference_mode():
        ident = paper.encode_identity(img)
        assert ident.latent.shape == (1, 512)
        assert [tuple(f.shape[1:]) for f in ident.features] == [
            (512, 8, 8),
            (512, 16, 16),
            (512, 32, 32),
            (256, 64, 64),
            (128, 128, 128),
            (64, 256, 256),
        ]
        assert {s: tuple(w.shape) for s, w in ident.weights.items()} == {
            "mouth": (1, 20),
            "pose": (1, 6),
            "eye": (1, 6),
            "expression": (1, 10),
        }
        out = paper.render(ident, {})
        assert out.shape == (1, 3, 256, 256) and torch.isfinite(out).all()
        assert paper.discriminator(out).shape == (1, 1)
    assert paper.orthogonality_error() <= 1e-5
