"""Code named by a model folder never runs (issue 23 item 1).

A transformers folder can carry an `auto_map` that points the Auto* classes at a .py file beside it; transformers
then asks "Do you wish to run the custom code? [y/N]" and runs it on 'y'. These tests tamper real folders that way
(the .py writes a marker file when imported), run the loading command with 'y' piped to stdin, and check that the
marker is absent and that no prompt was printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edtalk import EDTalk, ModelConfig

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Do you wish to run the custom code"


def _plant(folder: Path, config_name: str, auto_map: dict, marker: Path, **changes) -> None:
    """Add `auto_map` (and `changes`) to folder/config_name and put evil.py beside it, which writes `marker`."""
    path = folder / config_name
    config = json.loads(path.read_text())
    config.update(changes, auto_map=auto_map)
    for key in [k for k, v in changes.items() if v is None]:
        config.pop(key)
    path.write_text(json.dumps(config))
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code from the folder ran')\n"
        "from transformers import HubertConfig, HubertModel, RobertaTokenizerFast\n"
        "class EvilTokenizer(RobertaTokenizerFast):\n    pass\n"
        "class EvilConfig(HubertConfig):\n    model_type = 'evilnet'\n"
        "class EvilModel(HubertModel):\n    config_class = EvilConfig\n"
    )


def _run(args: list[str]) -> subprocess.CompletedProcess:
    """A command with 'y' on stdin, the answer a careless pipeline would give the prompt."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], input="y\ny\ny\n", capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)  # fmt: skip


@pytest.mark.slow
def test_generate_with_a_tampered_model_folder_runs_no_code(tmp_path, media_dir):
    """`edtalk generate` on a model folder whose tokenizer and encoder configs name code: it generates, the code
    does not run and nothing asks."""
    torch.manual_seed(0)
    model = tmp_path / "model"
    EDTalk(ModelConfig.preset("tiny")).save_pretrained(model)
    parts = model / "expression_predictor"
    marker = tmp_path / "MARKER"
    # the tokenizer without a tokenizer_class: Auto* classes can only follow the auto_map
    token_map = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    _plant(parts / "tokenizer", "tokenizer_config.json", token_map, marker, tokenizer_class=None)
    config_map = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    for sub in ("speech_encoder", "text_encoder"):
        _plant(parts / sub, "config.json", config_map, marker)
    out = tmp_path / "out.mp4"
    res = _run(["-m", "pipelines.cli", "generate", "--model", str(model), "--identity",
                str(media_dir / "images" / "SadTalker__happy.png"), "--audio",
                str(media_dir / "audio" / "SadTalker__RD_Radio34_002.wav"), "-o", str(out),
                "--set", "generate.max_seconds=0.2", "--set", "preprocess.landmark_backend=dlib"])  # fmt: skip
    log = res.stdout + res.stderr
    assert not marker.exists(), f"code from the model folder ran:\n{log[-2000:]}"
    assert PROMPT not in log, log[-2000:]
    assert res.returncode == 0 and out.is_file(), log[-2000:]


def test_speech_encoder_folder_with_an_unknown_model_type_is_refused(tmp_path):
    """preprocessing's speech encoder folder: config.json names its own architecture and code -> refused with
    one line naming the model_type; a tampered HuBERT folder loads as HubertModel without running the code."""
    from transformers import HubertConfig, HubertModel

    folder = tmp_path / "speech"
    HubertModel(HubertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             conv_dim=(16,) * 7)).save_pretrained(folder)  # fmt: skip
    marker = tmp_path / "MARKER"
    config_map = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    _plant(folder, "config.json", config_map, marker, model_type="evilnet")
    probe = "from preprocessing.audio import SpeechEncoder; print(type(SpeechEncoder({!r}).model).__name__)"
    res = _run(["-c", probe.format(str(folder))])
    log = res.stdout + res.stderr
    assert not marker.exists(), f"code from the folder ran:\n{log[-2000:]}"
    assert PROMPT not in log, log[-2000:]
    assert res.returncode != 0 and "model_type 'evilnet' is not one of" in log, log[-2000:]
    _plant(folder, "config.json", config_map, marker, model_type="hubert")
    res = _run(["-c", probe.format(str(folder))])
    assert not marker.exists() and res.stdout.strip() == "HubertModel", res.stdout + res.stderr[-2000:]
