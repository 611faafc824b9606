"""`edtalk import` on bad files: each refused with one line naming the file, the key and the expectation, and
nothing written; a crafted pickle never runs."""

from __future__ import annotations

import os

import pytest
import torch
from reference_kit import regenerate, run_import, write_pt


@pytest.fixture(scope="module")
def lip_pose_sd():
    return regenerate("lip_pose")[1]


def _refused(tmp_path, ckpt, *extra, expect: tuple[str, ...]):
    out = tmp_path / "model"
    result = run_import(ckpt, "--output", out, *extra)
    assert result.exit_code != 0, result.output
    msg = result.output.strip().splitlines()
    assert len(msg) == 1 and msg[0].startswith("Error: "), result.output
    for part in (str(ckpt), *expect):
        assert part in msg[0], (part, msg[0])
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".model")]
    return msg[0]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"gen": {"enc.x": torch.zeros(1)}, "args": _Evil(marker)}, tmp_path / "evil.pt")
    _refused(tmp_path, tmp_path / "evil.pt", expect=("refused to unpickle",))
    assert not marker.exists()


def test_truncated_file(tmp_path):
    good = write_pt(tmp_path / "Audio2Lip.pt", "audio2lip")
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    _refused(tmp_path, tmp_path / "cut.pt", expect=("truncated or corrupt",))


def test_lia_file_passed_as_edtalk(tmp_path):
    ckpt = write_pt(tmp_path / "vox.pt", "lia")
    _refused(tmp_path, ckpt, "--kind", "edtalk", expect=("expected EDTalk.pt", "LIA vox.pt", "--kind lia"))


def test_audio2lip_alone_points_to_audio2lip_option(tmp_path):
    ckpt = write_pt(tmp_path / "Audio2Lip.pt", "audio2lip", with_args=False)
    _refused(tmp_path, ckpt, expect=("--audio2lip",))


@pytest.mark.parametrize(
    "edit, expect",
    [
        ("missing", ("missing key 'pose_fc.2.bias'", "expected shape [6]")),
        ("unexpected", ("unexpected key 'extra.weight'",)),
        ("shape", ("key 'lip_fc.2.weight' has shape [21, 512], expected [20, 512]",)),
    ],
)
def test_key_errors(tmp_path, lip_pose_sd, edit, expect):
    sd = dict(lip_pose_sd)
    if edit == "missing":
        del sd["pose_fc.2.bias"]
    elif edit == "unexpected":
        sd["extra.weight"] = torch.zeros(2)
    else:
        sd["lip_fc.2.weight"] = torch.zeros(21, 512)
    torch.save({"gen": sd}, tmp_path / "EDTalk_lip_pose.pt")
    _refused(tmp_path, tmp_path / "EDTalk_lip_pose.pt", expect=expect)


def test_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_import(tmp_path / "whatever.pt", "--output", out)
    assert result.exit_code != 0 and "already exists" in result.output
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow  # logs a 180 MB model folder as an MLflow artifact
def test_import_registers_in_mlflow_with_the_source_hash(tmp_path, tracking):
    import hashlib

    from mlflow import MlflowClient

    ckpt = write_pt(tmp_path / "EDTalk_lip_pose.pt", "lip_pose")
    result = run_import(ckpt, "--output", tmp_path / "m", "--register", "edtalk-ref-lip-pose")
    assert result.exit_code == 0, result.output
    assert "registered edtalk-ref-lip-pose version 1" in result.output
    c = MlflowClient(tracking)
    version = c.get_model_version("edtalk-ref-lip-pose", "1")
    tags = c.get_run(version.run_id).data.tags
    assert tags["import.lip_pose.sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert "non-commercial" in tags["import.licence"]
