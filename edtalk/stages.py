"""Training stages as data: what each stage trains, what it uses frozen, which latent spaces take part.

Names are submodule paths of `EDTalk` (e.g. "navigation.mouth" = MLN's head and bank). `apply_stage` sets
requires_grad accordingly and returns the trainable parameters; everything not trainable is frozen, and a name in
`frozen` overrides a `trainable` parent, and so do the parameters the model's config fixes for good
(`EDTalk.fixed_parameter_names`: the HuBERT CNN feature encoder inside the expression predictor, paper: frozen).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from edtalk.navigation import SPACES

VISUAL = ("encoder", "generator", "navigation", "eem")


@dataclass(frozen=True)
class Stage:
    """One training stage."""

    name: str  # stage id, as in dvc.yaml and params.yaml
    trainable: tuple[str, ...]  # submodules whose parameters this stage updates
    frozen: tuple[str, ...]  # submodules the stage runs but keeps fixed (nested names override trainable)
    adversarial: bool  # whether the discriminator and the adversarial loss take part
    spaces: tuple[str, ...]  # latent spaces summed into f^{r->d} while training this stage
    description: str  # one line for logs and docs


_STAGE_LIST = (
    Stage(
        "autoencoder",
        ("encoder", "generator", "lia", "discriminator"),
        (),
        True,
        (),
        "E, G and one LIA motion bank learn to reconstruct a frame from another frame of the same segment",
    ),
    Stage(
        "mouth_pose",
        ("navigation.trunk", "navigation.mouth", "navigation.pose", "discriminator"),
        ("encoder", "generator"),
        True,
        ("mouth", "pose"),
        "MLN and PLN (with the shared trunk) by cross-reconstruction of mouth-swapped pairs (Eq. 3-7)",
    ),
    Stage(
        "eye",
        ("navigation.eye", "discriminator"),
        ("encoder", "generator", "navigation.trunk", "navigation.mouth", "navigation.pose"),
        True,
        ("mouth", "pose", "eye"),
        "EYLN (EDTalk++) by cross-reconstruction of eye-swapped pairs; mouth and pose fixed",
    ),
    Stage(
        "expression",
        ("navigation.expression", "eem", "discriminator"),
        ("encoder", "generator", "navigation.trunk", "navigation.mouth", "navigation.pose", "navigation.eye"),
        True,
        SPACES,
        "EXLN and EEM by self-reconstruction complementary learning (Eq. 8-10)",
    ),
    Stage(
        "syncnet",
        ("syncnet",),
        (),
        False,
        (),
        "the lip-sync expert on in-sync vs shifted mouth/mel pairs",
    ),
    Stage(
        "audio_lip",
        ("audio_to_mouth",),
        (*VISUAL, "syncnet"),
        False,
        SPACES,
        "E_a + mouth head: audio -> mouth weights with feature, reconstruction and sync losses (Eq. 11-12)",
    ),
    Stage(
        "audio_pose",
        ("pose_flow",),
        ("encoder", "navigation", "audio_to_mouth"),
        False,
        SPACES,
        "the conditional flow audio features f^a (frozen E_a) -> pose weights (Eq. 13-14)",
    ),
    Stage(
        "audio_eye",
        ("eye_flow",),
        ("encoder", "navigation", "audio_to_mouth"),
        False,
        SPACES,
        "the conditional flow audio -> eye weights, so audio-driven videos blink",
    ),
    Stage(
        "audio_expression",
        ("expression_predictor",),
        ("encoder", "navigation"),
        False,
        SPACES,
        "HuBERT + RoBERTa + MLP -> expression weights with modality masking (Eq. 15); HuBERT CNN frozen",
    ),
)

STAGES: dict[str, Stage] = {s.name: s for s in _STAGE_LIST}


def get_stage(stage: str | Stage) -> Stage:
    if isinstance(stage, Stage):
        return stage
    if stage not in STAGES:
        raise KeyError(f"unknown training stage {stage!r}; the stages are {list(STAGES)}")
    return STAGES[stage]


def _submodule(model: nn.Module, name: str, stage: str) -> nn.Module | None:
    obj: object = model
    for part in name.split("."):
        if obj is None or not hasattr(obj, part):
            raise ValueError(f"stage {stage!r}: the model has no submodule {name!r}")
        obj = getattr(obj, part)
    if obj is not None and not isinstance(obj, nn.Module):
        raise ValueError(f"stage {stage!r}: {name!r} is a {type(obj).__name__}, not a module")
    return obj


def apply_stage(model: nn.Module, stage: str | Stage) -> list[nn.Parameter]:
    """Freeze everything, unfreeze the stage's trainable modules, re-freeze its nested frozen ones.

    Parameters in `model.fixed_parameter_names()` stay frozen. Also sets `model.active_spaces` to the stage's
    spaces when it has any. Returns the trainable parameters (in module order, no duplicates). A trainable module
    that is not built (config None) is an error.
    """
    st = get_stage(stage)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in st.trainable:
        mod = _submodule(model, name, st.name)
        if mod is None:
            raise ValueError(
                f"stage {st.name!r} trains {name!r}, but the model was built without it (config None)"
            )
        for p in mod.parameters():
            p.requires_grad_(True)
    present = getattr(getattr(model, "navigation", None), "spaces", SPACES)
    for name in st.frozen:
        parts = name.split(".")
        if parts[0] == "navigation" and len(parts) == 2 and parts[1] in SPACES and parts[1] not in present:
            continue  # a space this model does not have (the authors' EDTalk.pt has no eye space): nothing to freeze
        mod = _submodule(model, name, st.name)
        if mod is not None:
            for p in mod.parameters():
                p.requires_grad_(False)
    fixed = getattr(model, "fixed_parameter_names", None)
    if callable(fixed):  # parameters the model's config keeps fixed in every stage (e.g. HuBERT's CNN)
        names = set(fixed())
        for n, p in model.named_parameters():
            if n in names:
                p.requires_grad_(False)
    if st.spaces and hasattr(model, "active_spaces"):
        model.active_spaces = st.spaces
    return [p for p in model.parameters() if p.requires_grad]
