"""Parameter counts per network of a preset (default: paper), against the reference implementation's.

Usage: python bench/param_count.py [--preset paper|tiny] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# The published reference implementation's counts (DESIGN.md section 2), for the paper preset.
REFERENCE = {
    "generator_with_eem": 64.2e6,
    "encoder": 21.6e6,
    "decoder_with_eem": 39.9e6,
    "eem": 17.5e6,
    "discriminator": 24.0e6,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=["paper", "tiny"])
    parser.add_argument("--json", type=Path, default=None, help="also write the counts as JSON here")
    args = parser.parse_args()

    from edtalk import EDTalk, ModelConfig

    cfg = ModelConfig.preset(args.preset)
    if cfg.expression_predictor is not None and cfg.expression_predictor.speech_model is not None:
        # The paper's predictor wraps pretrained HuBERT/RoBERTa checkpoints (not downloaded here); the visual
        # networks, the subject of the comparison, do not depend on it.
        print(
            f"expression_predictor: {cfg.expression_predictor.speech_model} + "
            f"{cfg.expression_predictor.text_model} (pretrained, not counted here)"
        )
        cfg.expression_predictor = None
    counts = EDTalk(cfg).parameter_counts()
    print(f"preset {args.preset}")
    print(f"{'network':22s} {'params':>14s} {'reference':>12s} {'ratio':>7s}")
    for name, n in counts.items():
        ref = REFERENCE.get(name) if args.preset == "paper" else None
        extra = f"{ref / 1e6:11.1f}M {n / ref:7.3f}" if ref else ""
        print(f"{name:22s} {n:14,d} {extra}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"preset": args.preset, "counts": counts}, indent=2) + "\n")


if __name__ == "__main__":
    main()
