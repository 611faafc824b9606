"""Per-frame rendering latency of the paper preset on this CPU (random weights): naive path vs fast path.

naive: for every frame, re-encode the identity image and render that one frame (batch 1, fp32, no_grad) — what the
       reference demo does (the plain eager model).
fast:  the identity encoded and prepared once (cached, as for a clip; its one-off cost is measured apart:
       identity_encode_ms, identity_prepare_ms, and spread over a clip in ms_per_frame_fast_with_identity), then all
       frames in one call of the inference fast path `model.fast_renderer()` (edtalk/fast.py: channels-last memory
       throughout, folded scales and gains, oneDNN convs and transposed convs on prepacked weights with bias +
       leaky ReLU fused, styles folded into small weights, Winograd F(4x4, 3x3) in cache-sized chunks for the
       3x3 convs with >= 128 channels at 16..128 px, the warp as a sparse product, fewer elementwise passes; the
       frames in concurrent groups, one per torch thread, each with its coarse levels as one batch and its fine
       ones frame by frame). fp32.
fast_eager: the previous fast path, for reference: identity cached, EDTalk.render under inference_mode, one frame
       per call.
fast_bf16: fast_eager under CPU bf16 autocast (AMX/AVX512-BF16 where present), reported with its own error.

Two driving scenarios, both rendering all four spaces: `per_frame_expression` (expression weights change every
frame: video-driven) and `clip_expression` (one expression per clip: the audio-driven predictor of Eq. 15, or an
emotion's mean weights). Rounds alternate the paths so all see the same machine load; medians are reported.
The fast renderer's one-off costs (building the weight snapshot, the first call's oneDNN weight prepacking) are
measured separately (`prepare_ms`, `first_render_ms`) and not in the per-frame times.

--variant reference: the same measurements for the imported reference variant (`edtalk import` of the authors'
EDTalk.pt, ModelConfig.preset("reference"): non-linear ToRGB, align_corners=False warp, the released EEM, no eye
space), on EDTalk.pt's layout with the fixture weights regenerated from ../shared/reference's manifest
(tests/reference_kit.py); naive and fast then run the same imported weights.

Usage: python bench/model.py [--frames 8] [--rounds 5] [--variant paper|reference]
Writes bench/results/model.json (paper) or bench/results/model_reference.json (reference).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
IDENTITY_IMAGE = ROOT.parent / "shared" / "media" / "images" / "SadTalker__happy.png"


def _log(msg: str) -> None:
    print(f"[bench/model {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _identity_image(size: int) -> tuple[torch.Tensor, str]:
    if IDENTITY_IMAGE.is_file():
        import cv2

        bgr = cv2.imread(str(IDENTITY_IMAGE))
        rgb = cv2.resize(bgr[:, :, ::-1], (size, size), interpolation=cv2.INTER_AREA)
        img = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        return img.unsqueeze(0), IDENTITY_IMAGE.name
    return torch.rand(1, 3, size, size) * 2 - 1, "random"


def _bf16_supported() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _slice(weights: dict[str, torch.Tensor], a: int, b: int) -> dict[str, torch.Tensor]:
    return {k: v[a:b] for k, v in weights.items()}


def run_naive(model, img, weights) -> tuple[torch.Tensor, float, float]:
    n = next(iter(weights.values())).shape[0]
    outs = []
    c0, t0 = time.process_time(), time.perf_counter()
    with torch.no_grad():
        for t in range(n):
            ident = model.encode_identity(img)
            outs.append(model.render(ident, _slice(weights, t, t + 1)))
    return torch.cat(outs), (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def run_fast(renderer, ident, weights) -> tuple[torch.Tensor, float, float]:
    """Identity cached (encoded and prepared once, outside the timing: see identity_ms); all frames in one call
    (the renderer batches the coarse levels and runs the fine ones frame by frame)."""
    n = next(iter(weights.values())).shape[0]
    c0, t0 = time.process_time(), time.perf_counter()
    out = renderer.render(ident, weights)
    return out, (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def run_eager(model, ident, weights, batch: int, bf16: bool = False) -> tuple[torch.Tensor, float, float]:
    n = next(iter(weights.values())).shape[0]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    outs = []
    c0, t0 = time.process_time(), time.perf_counter()
    with torch.inference_mode(), ctx:
        for a in range(0, n, batch):
            outs.append(model.render(ident, _slice(weights, a, a + batch)))
    return torch.cat(outs).float(), (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def gflops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    # With autograd on: FlopCounterMode's module tracker trips over no_grad outputs in this torch version.
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def build_model(variant: str):
    """(model in eval mode, config): the paper preset with seeded random weights, or an imported EDTalk.pt."""
    from edtalk import EDTalk, ModelConfig

    if variant == "reference":
        sys.path.insert(0, str(ROOT / "tests"))
        from reference_kit import (  # the manifest's weights, imported as `edtalk import` does
            run_import,
            write_pt,
        )

        with tempfile.TemporaryDirectory(prefix="bench_reference_") as tmp:
            ckpt = write_pt(Path(tmp) / "EDTalk.pt", "edtalk")
            result = run_import(ckpt, "--output", Path(tmp) / "model")
            if result.exit_code != 0:
                raise SystemExit(f"bench/model.py: edtalk import failed: {result.output.strip()}")
            model = EDTalk.from_pretrained(Path(tmp) / "model").eval()
        return model, model.config
    torch.manual_seed(0)
    cfg = ModelConfig.preset("paper")
    cfg.expression_predictor = None  # not on the rendering path (and its checkpoints are not on this machine)
    return EDTalk(cfg).eval(), cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8, help="frames rendered per round and path")
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternating rounds of all paths (median reported)"
    )
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast path")
    parser.add_argument(
        "--variant",
        choices=("paper", "reference"),
        default="paper",
        help="paper preset or imported EDTalk.pt",
    )
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/model[_reference].json")
    args = parser.parse_args()
    if args.out is None:
        suffix = "" if args.variant == "paper" else f"_{args.variant}"
        args.out = ROOT / "bench" / "results" / f"model{suffix}.json"

    from edtalk.fast import prepared_conv_available

    model, cfg = build_model(args.variant)
    counts = model.parameter_counts()
    img, img_name = _identity_image(cfg.image_size)
    _log(
        f"{args.variant} model built: generator+EEM {counts['generator_with_eem']:,} params; identity {img_name}"
    )

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        own = model.encode_identity(img).weights
    per_frame = {s: w + 0.3 * torch.randn(args.frames, w.shape[1], generator=g) for s, w in own.items()}
    clip = {**per_frame, "expression": per_frame["expression"][:1].expand(args.frames, -1).contiguous()}
    scenarios = {"per_frame_expression": per_frame, "clip_expression": clip}
    bf16 = _bf16_supported() and not args.no_bf16

    flops_encode = gflops(lambda: model.encode_identity(img))
    with torch.no_grad():
        ident = model.encode_identity(img)
    flops_render = gflops(lambda: model.render(ident, _slice(per_frame, 0, 1)))
    flops_decoder = gflops(lambda: model.generator(ident.latent, ident.features))
    _log(
        f"GFLOPs per frame: encode {flops_encode:.1f}, render {flops_render:.1f} (G alone {flops_decoder:.1f})"
    )

    # One-off costs of the fast path, outside the per-frame times: the weight snapshot, then the first render
    # (oneDNN weight prepacking per layer, Winograd weight transforms were done in the snapshot).
    t0 = time.perf_counter()
    renderer = model.fast_renderer()
    prepare_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    renderer.render(ident, _slice(per_frame, 0, 1))
    first_render_ms = (time.perf_counter() - t0) * 1e3
    _log(f"fast renderer: prepare {prepare_ms:.0f} ms, first render {first_render_ms:.0f} ms")

    # The identity-only work of the cached paths, once per identity (per clip): E on the portrait, then the fast
    # renderer's channels-last copies and the EEM's identity-only halves.
    identity_ms = []
    renderer.encode_identity(img)  # warm-up (the encoder's oneDNN prepacking)
    for _ in range(3):
        t0 = time.perf_counter()
        fresh = renderer.encode_identity(img)
        t1 = time.perf_counter()
        renderer.prepare_identity(fresh)
        identity_ms.append(((t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3))
    encode_ms = statistics.median(a for a, _ in identity_ms)
    prepare_identity_ms = statistics.median(b for _, b in identity_ms)
    _log(
        f"identity once per clip: encode {encode_ms:.0f} ms, fast-path preparation {prepare_identity_ms:.0f} ms"
    )

    # Video-driven generation runs E on every driving frame: EDTalk.extract against the fast path's, 8 frames.
    drive = torch.cat([img, torch.flip(img, [3])] * (args.frames // 2 or 1))[: max(args.frames, 1)]
    renderer.extract(drive)
    extract_ms: dict[str, list[float]] = {"eager": [], "fast": []}
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        with torch.no_grad():
            w_eager = model.extract(drive)
        t1 = time.perf_counter()
        w_fast = renderer.extract(drive)
        extract_ms["eager"].append((t1 - t0) * 1e3 / len(drive))
        extract_ms["fast"].append((time.perf_counter() - t1) * 1e3 / len(drive))
    extract = {
        "ms_per_frame_eager": round(statistics.median(extract_ms["eager"]), 1),
        "ms_per_frame_fast": round(statistics.median(extract_ms["fast"]), 1),
        "max_abs_diff": max(float((w_fast[k] - w_eager[k]).abs().max()) for k in w_eager),
    }
    extract["speedup"] = round(extract["ms_per_frame_eager"] / extract["ms_per_frame_fast"], 2)
    _log(f"driving frames through E: {json.dumps(extract)}")

    def cached_identity():
        with torch.inference_mode():
            return model.encode_identity(img)  # eager E: the cached paths differ in rendering only

    # One cached Identity per path (each path keeps its own memo on it).
    idents = {k: cached_identity() for k in ("fast", "fast_eager", "fast_bf16")}
    renderer.prepare_identity(idents["fast"])

    paths = ["naive", "fast", "fast_eager"] + (["fast_bf16"] if bf16 else [])
    load_before = os.getloadavg()
    results = {}
    for name, weights in scenarios.items():
        times: dict[str, list[float]] = {k: [] for k in paths}
        cpu: dict[str, list[float]] = {k: [] for k in paths}
        outs = {}
        runners = {
            "naive": lambda w: run_naive(model, img, w),
            "fast": lambda w: run_fast(renderer, idents["fast"], w),
            "fast_eager": lambda w: run_eager(model, idents["fast_eager"], w, 1),
            "fast_bf16": lambda w: run_eager(model, idents["fast_bf16"], w, 1, bf16=True),
        }
        for (
            k
        ) in paths:  # warm-up (first-call allocations, oneDNN primitive creation and prepacking), not timed
            runners[k](weights if k == "fast" else _slice(weights, 0, 1))
        for r in range(args.rounds):
            for k in paths:
                outs[k], t, c = runners[k](weights)
                times[k].append(t)
                cpu[k].append(c)
            _log(
                f"{name} round {r + 1}/{args.rounds}: "
                + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms/frame" for k, v in times.items() if v)
            )
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        once = encode_ms + prepare_identity_ms
        res = {
            "ms_per_frame_naive": round(med["naive"], 1),
            "ms_per_frame_fast": round(med["fast"], 1),
            "speedup": round(med["naive"] / med["fast"], 2),
            # the identity's one-off cost spread over a clip: this run's frames, and a 4 s clip at 25 fps
            "ms_per_frame_fast_with_identity": {
                str(args.frames): round(med["fast"] + once / args.frames, 1),
                "100": round(med["fast"] + once / 100, 1),
            },
            "speedup_with_identity": {
                str(args.frames): round(med["naive"] / (med["fast"] + once / args.frames), 2),
                "100": round(med["naive"] / (med["fast"] + once / 100), 2),
            },
            "max_abs_diff": float((outs["fast"] - outs["naive"]).abs().max()),
            "mean_abs_diff": float((outs["fast"] - outs["naive"]).abs().mean()),
            "output_abs_max": float(outs["naive"].abs().max()),
            "ms_per_frame_fast_eager": round(med["fast_eager"], 1),
            "speedup_fast_eager": round(med["naive"] / med["fast_eager"], 2),
            "max_abs_diff_fast_eager": float((outs["fast_eager"] - outs["naive"]).abs().max()),
            "fast_vs_fast_eager": round(med["fast_eager"] / med["fast"], 2),
        }
        if bf16:
            res["ms_per_frame_fast_bf16"] = round(med["fast_bf16"], 1)
            res["speedup_bf16"] = round(med["naive"] / med["fast_bf16"], 2)
            res["max_abs_diff_bf16"] = float((outs["fast_bf16"].float() - outs["naive"]).abs().max())
            res["mean_abs_diff_bf16"] = float((outs["fast_bf16"].float() - outs["naive"]).abs().mean())
        # Process CPU time (all threads): robust to other processes sharing the cores, unlike wall time.
        cmed = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}
        res["cpu_ms_per_frame"] = {k: round(v, 1) for k, v in cmed.items()}
        res["speedup_cpu_time"] = round(cmed["naive"] / cmed["fast"], 2)
        res["all_ms_per_frame"] = {k: [round(x * 1e3, 1) for x in v] for k, v in times.items()}
        results[name] = res
        _log(f"{name}: {json.dumps({k: v for k, v in res.items() if k != 'all_ms_per_frame'})}")

    head = results["per_frame_expression"]
    report = {
        "params_generator": counts["generator_with_eem"],
        "params_discriminator": counts["discriminator"],
        "params": {k: v for k, v in counts.items() if v},
        "ms_per_frame_naive": head["ms_per_frame_naive"],
        "ms_per_frame_fast": head["ms_per_frame_fast"],
        "speedup": head["speedup"],
        "max_abs_diff": head["max_abs_diff"],
        "speedup_cpu_time": head["speedup_cpu_time"],
        "fast_prepare_ms": round(prepare_ms, 1),
        "identity_encode_ms": round(encode_ms, 1),
        "identity_prepare_ms": round(prepare_identity_ms, 1),
        "extract_driving_frames": extract,
        "fast_first_render_ms": round(first_render_ms, 1),
        "scenarios": results,
        "gflops_per_frame": {
            "encode_identity": round(flops_encode, 1),
            "render": round(flops_render, 1),
            "generator_only": round(flops_decoder, 1),
            "eem": round(flops_render - flops_decoder, 1),
        },
        "settings": {
            "preset": args.variant,
            "frames": args.frames,
            "rounds": args.rounds,
            "identity_image": img_name,
            "bf16_autocast": bf16,
            "fast_options": renderer.options,
            "onednn_prepacked_conv": prepared_conv_available(),
        },
        "conditions": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    _log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
