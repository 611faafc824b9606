"""The tensor layout of each released file and where each tensor goes in our modules.

`layout(kind, config)` lists every key the reference's `state_dict()` holds (a strict load needs them all) with
its shape and its targets: our parameter names, each with the columns it takes (the reference keeps the mouth and
pose banks in one [D, 26] tensor). Keys with no target have no effect on any output (FIR kernel buffers fixed by
the architecture, noise weights never used, `dec.to_rgb1` never called, the EEM's overwritten conv1/norm1 branch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edtalk.audio_encoder import WAV2LIP_LAYERS
from edtalk.config import ModelConfig


@dataclass(frozen=True)
class Entry:
    shape: tuple[int, ...]
    # (our parameter name, (first, last) column of the reference tensor or None for all of it)
    targets: tuple[tuple[str, tuple[int, int] | None], ...] = field(default=())


Layout = dict[str, Entry]


def _add(out: Layout, key: str, shape: tuple[int, ...], target: str | None = None) -> None:
    out[key] = Entry(tuple(shape), () if target is None else ((target, None),))


def _equal_linear(out: Layout, ref: str, ours: str, n_in: int, n_out: int) -> None:
    _add(out, f"{ref}.weight", (n_out, n_in), f"{ours}.weight")
    _add(out, f"{ref}.bias", (n_out,), f"{ours}.bias")


def _encoder(out: Layout, chans: tuple[int, ...], latent: int) -> None:
    c = chans[::-1]  # S .. 4
    p = "enc.net_app.convs"
    _add(out, f"{p}.0.0.weight", (c[0], 3, 1, 1), "encoder.stem.0.weight")
    _add(out, f"{p}.0.1.bias", (1, c[0], 1, 1), "encoder.stem.1.bias")
    for j in range(1, len(c)):
        cin, cout, o = c[j - 1], c[j], f"encoder.blocks.{j - 1}"
        _add(out, f"{p}.{j}.conv1.0.weight", (cin, cin, 3, 3), f"{o}.conv1.0.weight")
        _add(out, f"{p}.{j}.conv1.1.bias", (1, cin, 1, 1), f"{o}.conv1.1.bias")
        _add(out, f"{p}.{j}.conv2.0.kernel", (4, 4))
        _add(out, f"{p}.{j}.conv2.1.weight", (cout, cin, 3, 3), f"{o}.conv2.1.weight")
        _add(out, f"{p}.{j}.conv2.2.bias", (1, cout, 1, 1), f"{o}.conv2.2.bias")
        _add(out, f"{p}.{j}.skip.0.kernel", (4, 4))
        _add(out, f"{p}.{j}.skip.1.weight", (cout, cin, 1, 1), f"{o}.skip.1.weight")
    _add(out, f"{p}.{len(c)}.weight", (latent, c[-1], 4, 4), "encoder.to_latent.weight")


def _styled(out: Layout, ref: str, ours: str | None, cin: int, cout: int, style: int, up: bool) -> None:
    def t(name: str) -> str | None:
        return None if ours is None else f"{ours}.{name}"

    _add(out, f"{ref}.conv.weight", (1, cout, cin, 3, 3), t("conv.weight"))
    if up:
        _add(out, f"{ref}.conv.blur.kernel", (4, 4))
    _add(out, f"{ref}.conv.modulation.weight", (cin, style), t("conv.modulation.weight"))
    _add(out, f"{ref}.conv.modulation.bias", (cin,), t("conv.modulation.bias"))
    _add(out, f"{ref}.noise.weight", (1,))
    _add(out, f"{ref}.activate.bias", (1, cout, 1, 1), t("activate.bias"))


def _decoder(out: Layout, chans: tuple[int, ...], style: int, eem: bool, hidden: int) -> None:
    _add(out, "dec.input.input", (1, chans[0], 4, 4), "generator.input.input")
    _styled(out, "dec.conv1", "generator.conv1", chans[0], chans[0], style, False)
    for name, shape in (
        ("bias", (1, 3, 1, 1)),
        ("conv.0.weight", (3, chans[0], 1, 1)),
        ("conv.1.bias", (1, 3, 1, 1)),
    ):
        _add(out, f"dec.to_rgb1.{name}", shape)
    for i in range(1, len(chans)):
        cin, cout, k = chans[i - 1], chans[i], i - 1
        _styled(out, f"dec.convs.{2 * k}", f"generator.up_convs.{k}", cin, cout, style, True)
        _styled(out, f"dec.convs.{2 * k + 1}", f"generator.convs.{k}", cout, cout, style, False)
        rgb, flow = f"generator.to_rgbs.{k}", f"generator.flows.{k}"
        _add(out, f"dec.to_rgbs.{k}.bias", (1, 3, 1, 1), f"{rgb}.bias")
        _add(out, f"dec.to_rgbs.{k}.upsample.kernel", (4, 4))
        _add(out, f"dec.to_rgbs.{k}.conv.0.weight", (3, cout, 1, 1), f"{rgb}.conv.0.weight")
        _add(out, f"dec.to_rgbs.{k}.conv.1.bias", (1, 3, 1, 1), f"{rgb}.conv.1.bias")
        _add(out, f"dec.to_flows.{k}.bias", (1, 3, 1, 1), f"{flow}.bias")
        _add(out, f"dec.to_flows.{k}.upsample.kernel", (4, 4))
        _add(out, f"dec.to_flows.{k}.conv.weight", (1, 3, cout, 1, 1), f"{flow}.conv.weight")
        _add(out, f"dec.to_flows.{k}.conv.modulation.weight", (cout, style), f"{flow}.conv.modulation.weight")
        _add(out, f"dec.to_flows.{k}.conv.modulation.bias", (cout,), f"{flow}.conv.modulation.bias")
        if eem:
            ref, ours = f"dec.fineadainresblock.{k}", f"eem.blocks.{k}"
            for conv in ("conv1", "conv2"):
                mine = ours if conv == "conv2" else None
                _add(out, f"{ref}.{conv}.weight", (cout, cout, 3, 3), mine and f"{mine}.conv2.weight")
                _add(out, f"{ref}.{conv}.bias", (cout,), mine and f"{mine}.conv2.bias")
            for norm in ("norm1", "norm2"):
                mine = f"{ours}.norm2" if norm == "norm2" else None
                for lin, n_in, n_out in (
                    ("mlp_shared.0", style, hidden),
                    ("mlp_gamma", hidden, cout),
                    ("mlp_beta", hidden, cout),
                ):
                    _add(out, f"{ref}.{norm}.{lin}.weight", (n_out, n_in), mine and f"{mine}.{lin}.weight")
                    _add(out, f"{ref}.{norm}.{lin}.bias", (n_out,), mine and f"{mine}.{lin}.bias")


def _navigation(out: Layout, cfg: ModelConfig) -> None:
    d, nav = cfg.latent_dim, cfg.navigation
    n_m, n_p, n_e = nav.mouth, nav.pose, nav.expression
    out["direction_lipnonlip.weight"] = Entry(
        (d, n_m + n_p), (("navigation.mouth.bank", (0, n_m)), ("navigation.pose.bank", (n_m, n_m + n_p)))
    )
    if n_e:
        _add(out, "direction_exp.weight", (d, n_e), "navigation.expression.bank")
    for k in range(nav.trunk_layers):
        _equal_linear(out, f"fc.{k}", f"navigation.trunk.{k}", d, d)
    heads = [("lip_fc", "mouth", n_m), ("pose_fc", "pose", n_p)] + (
        [("exp_fc", "expression", n_e)] if n_e else []
    )
    for ref, space, n in heads:
        for k in range(nav.head_layers):
            last = k == nav.head_layers - 1
            _equal_linear(out, f"{ref}.{k}", f"navigation.{space}.head.{k}", d, n if last else d)


def _lia_motion(out: Layout, cfg: ModelConfig) -> None:
    d, nav = cfg.latent_dim, cfg.navigation
    for k in range(nav.trunk_layers):
        _equal_linear(out, f"enc.fc.{k}", f"lia.trunk.{k}", d, d)
    _equal_linear(out, f"enc.fc.{nav.trunk_layers}", "lia.motion_bank.head.0", d, nav.lia_bases)
    _add(out, "dec.direction.weight", (d, nav.lia_bases), "lia.motion_bank.bank")


def _audio2lip(out: Layout, n_mouth: int) -> None:
    for i, (cin, cout, k, _, _, _) in enumerate(WAV2LIP_LAYERS):
        ref, ours = f"audio_encoder.{i}.conv_block", f"audio_to_mouth.encoder.convs.{i}.conv_block"
        _add(out, f"{ref}.0.weight", (cout, cin, k, k), f"{ours}.0.weight")
        _add(out, f"{ref}.0.bias", (cout,), f"{ours}.0.bias")
        for name in ("weight", "bias", "running_mean", "running_var"):
            _add(out, f"{ref}.1.{name}", (cout,), f"{ours}.1.{name}")
        _add(out, f"{ref}.1.num_batches_tracked", (), f"{ours}.1.num_batches_tracked")
    _equal_linear(out, "mapping", "audio_to_mouth.head.0", 512, n_mouth)


def layout(kind: str, cfg: ModelConfig) -> Layout:
    """Every key of the released file of `kind` ("edtalk", "lip_pose", "lia", "audio2lip") -> Entry."""
    out: Layout = {}
    if kind == "audio2lip":
        _audio2lip(out, cfg.navigation.mouth)
        return out
    _encoder(out, cfg.channels, cfg.latent_dim)
    if kind == "lia":
        _lia_motion(out, cfg)
    _decoder(out, cfg.channels, cfg.latent_dim, kind == "edtalk", cfg.eem.hidden)
    if kind != "lia":
        _navigation(out, cfg)
    return out
