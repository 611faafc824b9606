"""Model configs reproducing the authors' networks: the `reference` switches on top of the paper sizes."""

from __future__ import annotations

from edtalk.config import PAPER_CHANNELS, EEMConfig, GeneratorConfig, ModelConfig, NavigationConfig

# The four released files, by the name `--kind` takes.
KINDS: tuple[str, ...] = ("edtalk", "lip_pose", "lia", "audio2lip")


def reference_config(kind: str = "edtalk", audio2lip: bool = True) -> ModelConfig:
    """The config whose network is the reference's for `kind` ("edtalk": EDTalk.pt, no eye space; "lip_pose":
    EDTalk_lip_pose.pt, no expression space and no EEM; "lia": LIA vox.pt, its motion MLP in `lia`). With
    `audio2lip`, the mouth audio encoder is the reference Audio2Lip (Wav2Lip encoder + linear mapping)."""
    from edtalk.audio_encoder import AudioEncoderConfig, AudioToMouthConfig

    if kind not in ("edtalk", "lip_pose", "lia"):
        raise ValueError(f"reference_config: kind must be 'edtalk', 'lip_pose' or 'lia', got {kind!r}")
    no_exp = kind == "lip_pose"
    return ModelConfig(
        image_size=256,
        latent_dim=512,
        channels=PAPER_CHANNELS,
        generator=GeneratorConfig(to_rgb="reference", warp="reference"),
        navigation=NavigationConfig(eye=0, expression=0 if no_exp else 10, linear=True, qr="joint"),
        eem=EEMConfig(enabled=not no_exp, variant="reference"),
        audio_to_mouth=(
            AudioToMouthConfig(encoder=AudioEncoderConfig(architecture="wav2lip"), n_mouth=20)
            if audio2lip
            else None
        ),
    )
