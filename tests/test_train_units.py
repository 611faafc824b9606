"""Fast checks of the training runtime's parts: params, data split and sample builders, batches, lineage helpers."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipelines.train import data
from pipelines.train.config import TrainParams, fingerprint, load_train_params, semantic_train_params
from preprocessing.params import ParamsError
from preprocessing.schema import encode_jpeg


def test_train_params_validate_and_override(tmp_path):
    with pytest.raises(ParamsError, match="zero_stage"):
        TrainParams(zero_stage=4)
    with pytest.raises(ParamsError, match="fail_rank"):
        TrainParams(workers=2, fail_rank=2)
    p = tmp_path / "p.yaml"
    p.write_text("train:\n  batch_size: 3\n")
    tp = load_train_params(p, ["train.workers=3", "other.x=1"])
    assert (tp.batch_size, tp.workers) == (3, 3)
    with pytest.raises(ParamsError, match="unknown key"):
        load_train_params(p, ["train.bogus=1"])
    assert TrainParams(precision="auto").compute_dtype == "fp32"
    assert TrainParams(precision="auto", use_gpu=True).compute_dtype == "bf16"


def test_fingerprint_ignores_runtime_only_keys():
    a = semantic_train_params(TrainParams())
    b = semantic_train_params(TrainParams(fail_at_step=3, log_every=1, storage_path="elsewhere"))
    c = semantic_train_params(TrainParams(seed=1))
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_val_split_uses_column_else_stable_hash():
    splits = {"a": "train", "b": "val", "c": "test", "d": "train"}
    train, val, how = data.train_val_ids(splits, 0.5)
    assert (train, val, how) == (["a", "d"], ["b"], "split column")
    only_train = {f"s{i}": "train" for i in range(10)}
    t1, v1, how = data.train_val_ids(only_train, 0.2)
    t2, v2, _ = data.train_val_ids(dict(reversed(list(only_train.items()))), 0.2)
    assert (t1, v1) == (t2, v2) and len(v1) == 2 and not set(t1) & set(v1) and "hash" in how
    assert data.train_val_ids({"x": "train"}, 0.2)[:2] == (["x"], ["x"])
    with pytest.raises(data.DataError, match="test split"):
        data.train_val_ids({"x": "test"}, 0.2)


def _segment(seg_id: str, t: int = 6, size: int = 16) -> dict:
    frames = [encode_jpeg(np.full((size, size, 3), 20 * i, np.uint8)) for i in range(t)]
    return {"segment_id": seg_id, "num_frames": t, "frames": frames}


def test_frame_pairs_are_seeded_and_bad_rows_are_skipped(caplog):
    row = _segment("seg-1")
    a = data.frame_pairs(4, seed=7)(row)
    b = data.frame_pairs(4, seed=7)(row)
    c = data.frame_pairs(4, seed=8)(row)
    assert len(a) == 4 and a[0]["source"].shape == (16, 16, 3) and a[0]["source"].dtype == np.uint8
    assert all(
        (x["source"] == y["source"]).all() and (x["driving"] == y["driving"]).all()
        for x, y in zip(a, b, strict=True)
    )
    assert any((x["source"] != y["source"]).any() for x, y in zip(a, c, strict=True))
    bad = {**row, "segment_id": "seg-bad", "frames": [b"not a jpeg"] * 6}
    assert data.frame_pairs(2, seed=0)(bad) == []
    assert "seg-bad" in caplog.text


def test_frame_pairs_mouth_mask_covers_the_driving_mouth():
    from preprocessing.schema import f32_array

    t, size = 6, 32
    lm = np.zeros((t, 68, 2), np.float32)
    lm[:] = 4.0  # everything but the mouth far away in a corner
    for k in range(t):  # mouth landmarks: a ring around (16 + k, 20)
        ang = np.linspace(0, 2 * np.pi, 20, endpoint=False)
        lm[k, 48:68] = np.stack([16 + k + 4 * np.cos(ang), 20 + 2 * np.sin(ang)], 1)
    row = {**_segment("seg-m", t=t, size=size), "landmarks": lm.tobytes()}
    assert (f32_array(row["landmarks"], (t, 68, 2)) == lm).all()
    plain = data.frame_pairs(3, seed=1)(row)
    masked = data.frame_pairs(3, seed=1, mouth_mask=True)(row)
    assert "mouth_mask" not in plain[0]
    for p, m in zip(plain, masked, strict=True):
        assert (p["driving"] == m["driving"]).all()  # the same pairs, with a mask added
        mask = m["mouth_mask"]
        assert mask.shape == (size, size) and mask.dtype == np.uint8
        j = int(round(m["driving"][0, 0, 0] / 20))  # frame j is filled with 20 * j
        assert mask[20, 16 + j] > 128 and mask[4, 4] == 0 and mask[20, 2] == 0  # feathered edge


def test_frame_pairs_mouth_contrast_pairs_closed_with_open_mouths():
    t = 9
    lm = np.zeros((t, 68, 2), np.float32)
    opening = np.array([5, 0, 8, 1, 7, 2, 6, 3, 4], np.float32)  # frame k's inner-lip gap (62 -> 66)
    lm[:, 66, 1] = opening
    row = {**_segment("seg-c", t=t), "landmarks": lm.tobytes()}
    assert (data.mouth_opening(lm) == opening).all()

    def frame(img: np.ndarray) -> int:
        return int(round(img[0, 0, 0] / 20))  # frame k is filled with 20 * k

    pairs = data.frame_pairs(12, seed=3, mouth_contrast=1.0)(row)
    closed, opened = {1, 3, 5}, {2, 4, 6}  # the 3 smallest / largest gaps
    assert len(pairs) == 12
    for p in pairs:
        ij = {frame(p["source"]), frame(p["driving"])}
        assert ij & closed and ij & opened, ij
    assert {frame(p["source"]) for p in pairs} & closed and {frame(p["source"]) for p in pairs} & opened
    # off: the uniform pairs, unchanged; half: the first 6 of 12 contrasted, the rest uniform
    plain = data.frame_pairs(12, seed=3)(row)
    off = data.frame_pairs(12, seed=3, mouth_contrast=0.0)(row)
    assert all((a["driving"] == b["driving"]).all() for a, b in zip(plain, off, strict=True))
    half = data.frame_pairs(12, seed=3, mouth_contrast=0.5)(row)
    for p in half[:6]:
        ij = {frame(p["source"]), frame(p["driving"])}
        assert ij & closed and ij & opened, ij
    with pytest.raises(ValueError, match="mouth_contrast"):
        data.frame_pairs(4, seed=0, mouth_contrast=1.5)


def test_frame_pairs_mouth_swap_changes_only_the_mouth():
    t, size = 6, 32
    rng = np.random.default_rng(0)
    lm = np.zeros((t, 68, 2), np.float32)
    ang = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    for k in range(t):  # eyes at (10, 10) and (22, 10), a mouth ring around (16, 22) opening with k
        lm[k, 36:42] = [10, 10]
        lm[k, 42:48] = [22, 10]
        lm[k, 48:68] = np.stack([16 + 4 * np.cos(ang), 22 + (1 + k) * 0.5 * np.sin(ang)], 1)
    frames = [encode_jpeg(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(t)]
    row = {"segment_id": "seg-s", "num_frames": t, "frames": frames, "landmarks": lm.tobytes()}
    plain = data.frame_pairs(4, seed=2, mouth_mask=True)(row)
    swapped = data.frame_pairs(4, seed=2, mouth_mask=True, mouth_swap=0.5)(row)
    for p, q in zip(plain[:2], swapped[:2], strict=True):  # the first half: unchanged pairs
        assert (p["driving"] == q["driving"]).all() and (p["mouth_mask"] == q["mouth_mask"]).all()
    for p, q in zip(plain[2:], swapped[2:], strict=True):  # the last half: the source with a pasted mouth
        assert (p["source"] == q["source"]).all()
        mask = q["mouth_mask"]
        assert mask[22, 16] > 128 and mask[2, 2] == 0
        out = mask == 0
        assert (q["driving"][out] == q["source"][out]).all()  # outside the mouth: the source itself
        assert np.abs(q["driving"][~out].astype(int) - q["source"][~out]).mean() > 10  # inside: another mouth
    with pytest.raises(ValueError, match="mouth_swap"):
        data.frame_pairs(4, seed=0, mouth_swap=-0.1)


def _face_landmarks(opening: float, smile: float = 0.0) -> np.ndarray:
    """68 points: eye centres at (-1, 0) and (1, 0), a 20-point mouth ring 1.5 below them, `opening` tall."""
    lm = np.zeros((68, 2))
    lm[36:42], lm[42:48] = [-1.0, 0.0], [1.0, 0.0]
    ang = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    lm[48:68] = np.stack([(0.8 + smile) * np.cos(ang), 1.5 + opening * np.sin(ang)], 1)
    return lm


def test_mouth_shape_keeps_the_mouth_and_drops_the_head():
    base = data.mouth_shape(_face_landmarks(0.1))
    assert base.shape == (40,) and base.dtype == np.float32
    # the same face moved, turned 30 degrees and scaled 3x in the image: the same shape
    th = np.deg2rad(30.0)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    moved = 3.0 * _face_landmarks(0.1) @ rot.T + [40.0, 25.0]
    np.testing.assert_allclose(data.mouth_shape(moved), base, atol=1e-5)
    # opening the mouth (by 0.3, eye distance 2, times 4) moves only the vertical coordinates in the eye-line
    # frame, widening it only the horizontal ones
    opened = data.mouth_shape(_face_landmarks(0.4)).reshape(20, 2)
    wide = data.mouth_shape(_face_landmarks(0.1, smile=0.3)).reshape(20, 2)
    b = base.reshape(20, 2)
    assert (
        np.abs(opened[:, 1] - b[:, 1]).max() == pytest.approx(4 * 0.3 / 2, abs=1e-5)
        and np.abs(opened[:, 0] - b[:, 0]).max() < 1e-5
    )
    assert (
        np.abs(wide[:, 0] - b[:, 0]).max() == pytest.approx(4 * 0.3 / 2, abs=1e-5)
        and np.abs(wide[:, 1] - b[:, 1]).max() < 1e-5
    )
    # degenerate landmarks (both eyes on one point): zeros, not NaN
    assert (data.mouth_shape(np.zeros((68, 2))) == 0).all()
    # frame_pairs hands the driving frame's shape (frame k's mouth opens with k)
    t = 5
    lm = np.stack([_face_landmarks(0.1 * (k + 1)) * 4 + 16 for k in range(t)]).astype(np.float32)
    row = {**_segment("seg-shape", t=t, size=32), "landmarks": lm.tobytes()}
    for p in data.frame_pairs(4, seed=0, with_mouth_shape=True)(row):
        k = int(round(p["driving"][0, 0, 0] / 20))  # frame k is filled with 20 * k
        np.testing.assert_allclose(p["mouth_shape"], data.mouth_shape(lm[k]), atol=1e-6)
    assert "mouth_shape" not in data.frame_pairs(1, seed=0)(row)[0]


def test_autoencoder_shape_head_trains_with_the_model_and_is_not_exported(tmp_path):
    from safetensors.torch import load_file

    from edtalk import EDTalk
    from pipelines.train.stages import AUX_PREFIX, autoencoder, export_edtalk

    torch.manual_seed(0)
    p = autoencoder.AutoencoderParams(perceptual_scales=(0.5,), w_shape=2.0)
    nets = autoencoder.build({"preset": "tiny"}, p, {})
    head = getattr(nets.model, AUX_PREFIX + autoencoder.SHAPE_HEAD)
    assert all(any(q is h for q in nets.trainable) for h in head.parameters())
    s = nets.model.config.image_size
    batch = {"source": torch.rand(3, 3, s, s) * 2 - 1, "driving": torch.rand(3, 3, s, s) * 2 - 1}
    batch["mouth_shape"] = torch.randn(3, 40)
    out = autoencoder.step(nets, batch, p)
    plain = {k: v for k, v in out.logs.items() if k != "shape"}
    total = plain["rec"] + plain["per"] + plain["adv"] + 2 * out.logs["shape"]
    assert float(out.loss) == pytest.approx(float(total))
    # centred in the batch: a shape offset shared by the whole batch costs nothing
    shifted = autoencoder.step(nets, {**batch, "mouth_shape": batch["mouth_shape"] + 5.0}, p)
    assert float(shifted.logs["shape"]) == pytest.approx(float(out.logs["shape"]), rel=1e-5)
    # the shape term alone trains the head, E and the LIA bank's weight head, not G
    out.logs["shape"].backward()

    def grad(module) -> float:
        return sum(float(q.grad.abs().sum()) for q in module.parameters() if q.grad is not None)

    assert grad(head) > 0 and grad(nets.model.encoder) > 0 and grad(nets.model.lia) > 0
    assert grad(nets.model.generator) == 0
    export_edtalk(nets, tmp_path / "ae")
    assert not any(k.startswith(AUX_PREFIX) for k in load_file(tmp_path / "ae" / "model.safetensors"))
    EDTalk.from_pretrained(tmp_path / "ae")  # loads with the edtalk API alone
    with pytest.raises(ValueError, match="batch_size >= 2"):
        autoencoder.step(nets, {k: v[:1] for k, v in batch.items()}, p)
    with pytest.raises(ValueError, match="loss weights"):
        autoencoder.AutoencoderParams(w_shape=-1.0)


def test_region_l1_loss_is_the_mean_error_inside_the_mask():
    from edtalk.losses import region_l1_loss

    a, b = torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)
    b[:, :, :4] = 1.0  # error 1 in the top half, 0 below
    top = torch.zeros(2, 1, 8, 8)
    top[:, :, :4] = 1.0
    assert float(region_l1_loss(a, b, top)) == pytest.approx(1.0)
    assert float(region_l1_loss(a, b, 1.0 - top)) == pytest.approx(0.0)
    assert float(region_l1_loss(a, b, torch.ones(2, 1, 8, 8))) == pytest.approx(0.5)  # = the plain L1
    with pytest.raises(ValueError, match="mask"):
        region_l1_loss(a, b, top[:, 0])


def test_motion_spread_and_the_swap_stages_spread_logs():
    from pipelines.train.stages import mouth_pose
    from pipelines.train.stages.swap import motion_spread, swap_losses

    f = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0], [1.0, -3.0]])  # mean (1, 0)
    assert float(motion_spread(f)) == pytest.approx((1 + 1 + 3 + 3) / 4)
    assert float(motion_spread(f[:1].expand(5, -1))) == 0.0
    with pytest.raises(ValueError, match="batch"):
        motion_spread(f[:1])

    # A real mouth_pose step's logs: one spread per space; an MLN whose head gives every frame the same weights
    # (its last layer zeroed) logs a mouth spread of 0 while the pose spread stays.
    torch.manual_seed(0)
    p = mouth_pose.MouthPoseParams(perceptual_scales=(0.5,))
    nets = mouth_pose.build({"preset": "tiny"}, p, {"autoencoder": ""})
    s = nets.model.config.image_size
    batch = {
        k: torch.rand(2, 3, s, s) * 2 - 1 for k in ("frame_a", "frame_b", "frame_id", "a_on_b", "b_on_a")
    }
    batch.update({k: torch.rand(2, 1, s, s) for k in ("mask_on_a", "mask_on_b")})
    t = swap_losses(nets, batch, mouth_pose.SWAPPED, mouth_pose.KEPT, (*mouth_pose.SWAPPED, *mouth_pose.KEPT))
    assert float(t["spread_mouth"]) > 0 and float(t["spread_pose"]) > 0
    last = nets.model.navigation.mouth.head[-1]
    with torch.no_grad():
        last.weight.zero_()
    t = swap_losses(nets, batch, mouth_pose.SWAPPED, mouth_pose.KEPT, (*mouth_pose.SWAPPED, *mouth_pose.KEPT))
    assert float(t["spread_mouth"]) == pytest.approx(0.0, abs=1e-6) and float(t["spread_pose"]) > 0
    assert set(mouth_pose.step(nets, batch, p).logs) >= {"spread_mouth", "spread_pose", "loss"}


def test_to_model_inputs_scales_and_resizes():
    batch = {
        "img": torch.full((2, 32, 32, 3), 255, dtype=torch.uint8),
        "mask": torch.zeros((2, 32, 32), dtype=torch.uint8),
        "w": torch.ones(2, 3),
    }
    out = data.to_model_inputs(batch, "cpu", image_size=16)
    assert out["img"].shape == (2, 3, 16, 16) and torch.allclose(out["img"], torch.ones(()))
    assert out["mask"].shape == (2, 1, 16, 16) and out["mask"].max() == 0
    assert torch.equal(out["w"], batch["w"])


def test_grid_image_layout():
    from pipelines.train.runner import GRID_MIN_SIDE, grid_image

    cols = {"a": torch.zeros(3, 3, 8, 8), "b": torch.ones(3, 3, 8, 8)}
    img = grid_image(cols)
    side = 8 * -(-GRID_MIN_SIDE // 8)  # cells enlarged by whole pixels to at least GRID_MIN_SIDE
    body = img[-3 * side :]  # below the white band of column titles
    assert img.shape[0] > 3 * side and img.shape[1:] == (2 * side, 3) and img.dtype == np.uint8
    assert body[:, :side].max() == 128 and body[:, side:].min() == 255


def test_stage_registry_and_cli_errors():
    from pipelines.cli import cli
    from pipelines.train import stages

    assert stages.get("autoencoder").adversarial and stages.get("mouth_pose").upstream == ("autoencoder",)
    with pytest.raises(KeyError, match="known stages"):
        stages.get("nope")
    result = CliRunner().invoke(cli, ["train", "nope"])
    assert result.exit_code != 0 and "nope" in result.output


def test_mlflow_run_is_resumed_from_the_run_dir(tmp_path):
    from pipelines import lineage

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    run_dir = str(tmp_path / "ray" / "run-x")
    rid, exp, resumed = lineage.start_or_resume(run_dir, "exp", "autoencoder", uri)
    assert not resumed
    lineage.end_run(rid, uri, "FAILED")
    rid2, exp2, resumed = lineage.start_or_resume(run_dir, "exp", "autoencoder", uri)
    assert (rid2, exp2, resumed) == (rid, exp, True)
    assert lineage.client(uri).get_run(rid).info.status == "RUNNING"
    assert json.loads((tmp_path / "ray" / "run-x" / lineage.RUN_ID_FILE).read_text())["run_id"] == rid


def test_dvc_md5_of_files_and_dirs(tmp_path):
    from pipelines import lineage

    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "x.bin").write_bytes(b"abc")
    (tmp_path / "d" / "sub" / "y.bin").write_bytes(b"def")
    assert lineage.dvc_md5(tmp_path / "d" / "x.bin") == hashlib.md5(b"abc").hexdigest()
    listing = [
        {"md5": hashlib.md5(b"def").hexdigest(), "relpath": "sub/y.bin"},
        {"md5": hashlib.md5(b"abc").hexdigest(), "relpath": "x.bin"},
    ]
    expected = hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"
    assert lineage.dvc_md5(tmp_path / "d") == expected
    with pytest.raises(FileNotFoundError):
        lineage.dvc_md5(tmp_path / "missing")


def test_zero3_is_refused_with_the_reason_for_a_listed_stage(monkeypatch):
    from pipelines.train import stages
    from pipelines.train.runner import run_stage

    # The flow stages run under ZeRO-3 now (tests/test_train_zero3.py); the refusal stays for any stage listed.
    assert "audio_pose" not in stages.ZERO3_UNSUPPORTED and "audio_eye" not in stages.ZERO3_UNSUPPORTED
    monkeypatch.setitem(stages.ZERO3_UNSUPPORTED, "audio_pose", "it reads a parameter outside a forward")
    with pytest.raises(ParamsError, match="ZeRO-3: it reads a parameter outside a forward"):
        run_stage("audio_pose", None, ["train.zero_stage=3"])
    with pytest.raises(ParamsError, match="autoencoder.w_local > 0 is not supported yet"):
        run_stage("autoencoder", None, ["train.zero_stage=3", "autoencoder.w_local=0.1"])


def test_lineage_tag_keys_are_valid_for_any_uri(tmp_path):
    from mlflow import MlflowClient
    from mlflow.utils.validation import _validate_tag_name

    from pipelines import lineage

    assert lineage.tag_key("dvc.md5", "data/processed") == "dvc.md5.data/processed"  # local: readable
    assert lineage.tag_key("dvc.md5", "s3://bucket/run") == "dvc.md5.s3/bucket/run"
    paths = ["s3://b/x/", "gs://b/../x", "/abs/a+b@c/d", ".", "a//b", "C:\\x\\y", "https://h:9000/p?q=1"]
    keys = {lineage.tag_key("dvc.md5", p) for p in paths}
    for key in keys:
        _validate_tag_name(key)
    # And the store accepts them.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _, _ = lineage.start_or_resume(str(tmp_path / "run"), "tags", "tags", uri)
    lineage.set_tags(run_id, dict.fromkeys(keys, "remote"), uri)
    assert keys <= set(MlflowClient(uri).get_run(run_id).data.tags)


def test_worker_env_carries_tracking_and_storage_settings(monkeypatch, tmp_path):
    from pipelines.train.runner import PASSTHROUGH_ENV, _worker_env

    for key in PASSTHROUGH_ENV:
        monkeypatch.delenv(key, raising=False)
    tp = TrainParams()
    env = _worker_env(tp)
    # Nothing invented when the driver has none.
    assert not any(k.startswith(("MLFLOW_", "AWS_")) for k in env)
    assert env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == str(tp.torch_threads)

    driver = {
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "pw",
        "MLFLOW_S3_ENDPOINT_URL": "http://s3:9000",
        "AWS_ENDPOINT_URL": "http://s3:9000",
        "AWS_ENDPOINT_URL_S3": "http://s3:9000",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_SESSION_TOKEN": "token",
        "AWS_REGION": "eu-west-1",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    for k, v in driver.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_PROFILE", "not-passed")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    env = _worker_env(tp)
    assert {k: env.get(k) for k in driver} == driver
    assert "AWS_PROFILE" not in env
    # Workers run in other directories: a relative sqlite store reaches them as an absolute path.
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert _worker_env(tp)["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


class _PartlyFrozen(torch.nn.Module):
    """A trained head (with dropout) on a frozen BatchNorm trunk, like E_a under the audio stages."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(
            torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5)
        )
        self.head = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(4, 1))
        self.act = torch.nn.ReLU()

    def forward(self, x):
        return self.head(self.act(self.trunk(x)))


def _train_step(model, trainable, mode) -> None:
    from pipelines.train.stages import Nets

    nets = Nets(model=model, trainable=trainable, extras={"helper": torch.nn.BatchNorm1d(4)})
    mode(nets)
    opt = torch.optim.Adam(trainable, lr=0.1)
    x = torch.randn(8, 4) * 3 + 2
    loss = model(x).pow(2).mean() + nets.extras["helper"](x).mean()
    loss.backward()
    opt.step()


def test_runner_keeps_frozen_modules_in_eval_mode_while_training():
    from pipelines.train.runner import frozen_modules, train_mode

    torch.manual_seed(0)
    model = _PartlyFrozen()
    model.trunk.requires_grad_(False)
    trainable = list(model.head.parameters())
    assert frozen_modules(model, trainable) == [model.trunk]  # parameter-free modules follow their parent
    bn = model.trunk[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}

    frozen = frozen_modules(model, trainable)
    _train_step(model, trainable, lambda nets: train_mode(nets, frozen))
    assert all(torch.equal(v, bn.state_dict()[k]) for k, v in before.items()), (
        "a frozen BatchNorm's stats moved"
    )
    assert not model.trunk.training and not model.trunk[2].training  # no dropout in frozen modules
    assert model.training and model.head.training and model.head[0].training  # the trained part trains
    # The check can fail: train() on the whole model (what the runner did before) moves the frozen statistics.
    _train_step(model, trainable, lambda nets: nets.model.train())
    assert not torch.equal(before["running_mean"], bn.running_mean)


def test_every_stage_keeps_its_frozen_batchnorms_in_eval_mode():
    from conftest import TRAIN_PARAMS

    from edtalk import EDTalk, ModelConfig
    from edtalk.stages import STAGES, apply_stage
    from pipelines.train.runner import frozen_modules, train_mode
    from pipelines.train.stages import Nets
    from preprocessing.params import load_section

    model = EDTalk(ModelConfig.from_params(load_section(TRAIN_PARAMS, "model", [])))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms, "the model has no BatchNorm: this test checks nothing"
    frozen_bn_seen = set()
    for name in STAGES:
        trainable = apply_stage(model, name)
        train_mode(Nets(model=model, trainable=trainable), frozen_modules(model, trainable))
        ids = {id(p) for p in trainable}
        for m in norms:
            trained = any(id(p) in ids for p in m.parameters())
            assert m.training == trained, (
                f"stage {name}: trained={trained} but BatchNorm training={m.training}"
            )
            if not trained:
                frozen_bn_seen.add(name)
    assert {"audio_pose", "audio_expression"} <= frozen_bn_seen


def test_sample_size_estimate_counts_matching_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "segments").mkdir()
    rows = [_segment(f"seg-{i}", size=16) for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "segments" / "part-0.parquet")
    fn = data.frame_pairs(3, seed=0)
    n, size = data.estimate_bytes(
        str(tmp_path), "segments", ["seg-1", "seg-3", "seg-4"], {}, fn, probe_rows=2
    )
    assert (n, size) == (3, 3 * 3 * 2 * 16 * 16 * 3)  # rows x pairs x 2 images of 16x16x3 uint8
    assert data.fits_cache(size, 1) and not data.fits_cache(size, 0) and not data.fits_cache(2**30, 1)


def test_local_directions_rank_latent_moves_by_their_share_inside_the_mask():
    from edtalk import EDTalk, ModelConfig
    from pipelines.train.local_directions import generator_jacobian, local_directions

    torch.manual_seed(0)
    model = EDTalk(ModelConfig.from_params({"preset": "tiny"}))
    s, d = model.config.image_size, model.config.latent_dim
    ids, frames = torch.rand(2, 3, s, s) * 2 - 1, torch.rand(2, 3, s, s) * 2 - 1
    mask = torch.zeros(2, 1, s, s)
    mask[:, :, s // 2 :, s // 4 : 3 * s // 4] = 1.0  # a lower-centre block, where a mouth would be
    dirs, shares = local_directions(model, ids, frames, mask)
    assert dirs.shape == (d, d) and shares.shape == (d,)
    assert torch.allclose(dirs.norm(dim=0), torch.ones(d), atol=1e-5)
    assert (
        bool((shares[:-1] >= shares[1:]).all())
        and float(shares[-1]) >= -1e-6
        and float(shares[0]) <= 1 + 1e-6
    )

    # the shares are what they say: re-measured from the Jacobians, the first direction's pooled in-mask share,
    # and it beats random directions
    def pooled_share(v: torch.Tensor) -> float:
        inside = total = 0.0
        for k in range(2):
            latent, feats = model.encoder(ids[k : k + 1])
            drv, _ = model.encoder(frames[k : k + 1])
            code = (latent + model.lia.motion(model.lia.weights(drv)))[0].detach()
            change = (generator_jacobian(model, code, feats) @ v).reshape(3, s, s)
            inside += float((change**2 * mask[k]).sum())
            total += float((change**2).sum())
        return inside / total

    with torch.no_grad():
        assert pooled_share(dirs[:, 0]) == pytest.approx(float(shares[0]), rel=1e-3)
        assert max(pooled_share(torch.randn(d)) for _ in range(3)) < float(shares[0])
        # the whole frame as the mask: every move is all inside; an empty mask: none is
        assert torch.allclose(
            local_directions(model, ids, frames, torch.ones_like(mask))[1], torch.ones(d).double(), atol=1e-4
        )
        assert float(local_directions(model, ids, frames, torch.zeros_like(mask))[1].abs().max()) < 1e-6
    with pytest.raises(ValueError, match="masks"):
        local_directions(model, ids, frames, mask[:, 0])


def test_autoencoder_locality_term_renews_its_directions_and_trains_g_to_keep_them_in_the_mouth(tmp_path):
    from safetensors.torch import load_file

    from pipelines.train.local_directions import local_directions
    from pipelines.train.stages import AUX_PREFIX, autoencoder, export_edtalk

    torch.manual_seed(0)
    p = autoencoder.AutoencoderParams(
        perceptual_scales=(0.5,),
        w_local=2.0,
        local_start=1,
        local_every=3,
        local_batches=2,
        local_k=2,
        w_adv=0.0,
    )
    nets = autoencoder.build({"preset": "tiny"}, p, {})
    state = getattr(nets.model, AUX_PREFIX + autoencoder.LOCAL_STATE)
    s = nets.model.config.image_size
    mask = torch.zeros(2, 1, s, s)
    mask[:, :, s // 2 :, s // 4 : 3 * s // 4] = 1.0
    first = {"source": torch.rand(2, 3, s, s) * 2 - 1, "driving": torch.rand(2, 3, s, s) * 2 - 1}
    batch = {"source": torch.rand(2, 3, s, s) * 2 - 1, "driving": torch.rand(2, 3, s, s) * 2 - 1}
    first["mouth_mask"] = batch["mouth_mask"] = mask
    nets.model.train()
    assert "local" not in autoencoder.step(nets, first, p).logs  # micro-step 0 < local_start: pooled only
    assert int(state.micro) == 1 and not bool(state.directions.any()) and int(state.sums["frames"]) == 2
    # the pool between two renewals is extra state: a checkpoint holds it, and a fresh module takes it back
    saved = nets.model.state_dict()
    restored = autoencoder.LocalState(nets.model.config.latent_dim, 2)
    restored.load_state_dict(
        {
            k.split(".", 1)[1]: v
            for k, v in saved.items()
            if k.startswith(AUX_PREFIX + autoencoder.LOCAL_STATE)
        }
    )
    assert torch.equal(restored.sums["a"], state.sums["a"]) and restored.sums["a"].dtype == torch.float64
    out = autoencoder.step(nets, batch, p)  # micro-step 1: renewed from both batches' Jacobian sums
    assert state.sums is None
    both = {k: torch.cat([first[k], batch[k]]) for k in ("source", "driving", "mouth_mask")}
    want = local_directions(nets.model, both["source"], both["driving"], both["mouth_mask"])[0][:, :2]
    assert torch.allclose(state.directions, want, atol=1e-5)
    alone = local_directions(nets.model, batch["source"], batch["driving"], mask)[0][:, :2]
    assert not torch.allclose(state.directions, alone, atol=1e-3)  # the pool is not the last batch alone
    total = out.logs["rec"] + out.logs["per"] + 2.0 * out.logs["local"]
    assert float(out.loss.detach()) == pytest.approx(float(total.detach()), rel=1e-5)
    # only G gets the term's gradient (the codes are taken without autograd)
    out.logs["local"].backward()

    def grad(module) -> float:
        return sum(float(q.grad.abs().sum()) for q in module.parameters() if q.grad is not None)

    assert grad(nets.model.generator) > 0 and grad(nets.model.encoder) == 0 and grad(nets.model.lia) == 0
    # validation neither counts nor renews; the term is still scored with the held directions
    nets.model.eval()
    with torch.no_grad():
        assert "local" in autoencoder.step(nets, batch, p).logs
    assert int(state.micro) == 2
    # a few steps of the term alone move G's change along the held directions into the mask
    nets.model.train()
    opt = torch.optim.Adam(nets.model.generator.parameters(), lr=3e-3)
    before = float(autoencoder.local_term(nets, batch, p))
    for _ in range(4):
        opt.zero_grad()
        autoencoder.local_term(nets, batch, p).backward()
        opt.step()
    assert int(state.micro) == 7  # renewed at micro-steps 1 and 4
    with torch.no_grad():
        nets.model.eval()
        after = float(autoencoder.local_term(nets, batch, p))
    assert after < before - 0.05, (before, after)
    export_edtalk(nets, tmp_path / "ae")
    assert not any(k.startswith(AUX_PREFIX) for k in load_file(tmp_path / "ae" / "model.safetensors"))
    with pytest.raises(ValueError, match="local_every"):
        autoencoder.AutoencoderParams(w_local=1.0, local_every=0)
    with pytest.raises(ValueError, match="local_batches=5"):
        autoencoder.AutoencoderParams(w_local=1.0, local_every=4, local_batches=5)
    # renewals at local_start + j * local_every, each pooling the local_batches micro-steps up to it
    sched = autoencoder.AutoencoderParams(w_local=1.0, local_start=5, local_every=10, local_batches=3)
    plan = [autoencoder.schedule(m, sched) for m in range(27)]
    assert [m for m, (pool, _) in enumerate(plan) if pool] == [3, 4, 5, 13, 14, 15, 23, 24, 25]
    assert [m for m, (_, renew) in enumerate(plan) if renew] == [5, 15, 25]
    with pytest.raises(ValueError, match="local_k"):
        autoencoder.build({"preset": "tiny"}, autoencoder.AutoencoderParams(w_local=1.0, local_k=10_000), {})


def test_mouth_pose_holds_its_mouth_bases_at_the_stored_local_directions(tmp_path):
    from edtalk import EDTalk, ModelConfig
    from pipelines.train import local_directions
    from pipelines.train.stages import autoencoder, mouth_pose

    torch.manual_seed(0)
    ae = EDTalk(ModelConfig.from_params({"preset": "tiny"}))
    ae.save_pretrained(tmp_path / "ae")
    d = ae.config.latent_dim
    dirs = torch.randn(d, d)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    local_directions.save(tmp_path / "ae", dirs, torch.linspace(0.9, 0.1, d).double(), frames=4)
    p = mouth_pose.MouthPoseParams(mouth_bases="local", perceptual_scales=(0.5,))
    nets = mouth_pose.build({"preset": "tiny"}, p, {"autoencoder": str(tmp_path / "ae")})
    nav = nets.model.navigation
    bank = nav.space("mouth").bank
    n = bank.shape[1]
    assert torch.equal(bank, dirs[:, :n]) and not bank.requires_grad
    assert all(q is not bank for q in nets.trainable) and any(
        q is nav.space("mouth").head[0].weight for q in nets.trainable
    )
    with torch.no_grad():
        q = nav.bases()
    held = dirs[:, :n]
    # Q^m spans exactly the held directions (mouth comes first in the Gram-Schmidt order); Q^p is orthogonal to them
    assert torch.allclose(q["mouth"] @ (q["mouth"].t() @ held), held, atol=1e-4)
    assert float((q["pose"].t() @ held).abs().max()) < 1e-4
    # a training step leaves the bank alone
    s = nets.model.config.image_size
    batch = {
        k: torch.rand(2, 3, s, s) * 2 - 1 for k in ("frame_a", "frame_b", "frame_id", "a_on_b", "b_on_a")
    }
    batch.update(mask_on_a=torch.rand(2, 1, s, s), mask_on_b=torch.rand(2, 1, s, s))
    mouth_pose.step(nets, batch, p).loss.backward()
    assert bank.grad is None and nav.space("mouth").head[0].weight.grad is not None

    (tmp_path / "bare").mkdir()
    ae.save_pretrained(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="local_frames"):
        mouth_pose.build({"preset": "tiny"}, p, {"autoencoder": str(tmp_path / "bare")})
    local_directions.save(tmp_path / "bare", dirs[: d // 2], torch.ones(d).double(), frames=4)
    with pytest.raises(ValueError, match="retrain the autoencoder"):
        mouth_pose.build({"preset": "tiny"}, p, {"autoencoder": str(tmp_path / "bare")})
    with pytest.raises(ValueError, match="mouth_bases"):
        mouth_pose.MouthPoseParams(mouth_bases="frozen")
    with pytest.raises(ValueError, match="local_frames"):
        autoencoder.AutoencoderParams(local_frames=-1)
