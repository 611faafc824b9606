"""Loading Hugging Face transformers folders without running code from them.

A transformers folder can name Python code to import: an `auto_map` in config.json or tokenizer_config.json points
the Auto* classes at a .py file beside it (or in another Hub repo). transformers then asks on the terminal whether
to run it, and runs it on 'y'. Folders we load are not always ours: a model folder or MLflow artifact someone
handed over, a Hub checkpoint in the cache. So every transformers load in the project goes through here:

- a concrete class, never an Auto* class: a concrete class reads the files as data and ignores `auto_map`;
- where the architecture is a choice (the speech encoder of preprocessing), config.json's `model_type` is read as
  JSON and looked up in SPEECH_MODELS, an allowlist of classes that ship with transformers;
- `trust_remote_code=False` on every call as well, so a future fallback to dynamic code fails instead of asking;
- model weights through transformers' own loader, which reads safetensors or `torch.load(weights_only=True)`.

tests/test_security_model_folders.py runs `edtalk generate` on tampered folders (a tokenizer_config.json and a
config.json with an auto_map to a .py that writes a marker file) with 'y' piped in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

NO_REMOTE_CODE = {"trust_remote_code": False}

# config.json model_type -> transformers class of a speech encoder (hidden states of 16 kHz audio)
SPEECH_MODELS = {
    "hubert": "HubertModel",
    "wav2vec2": "Wav2Vec2Model",
    "wavlm": "WavLMModel",
    "data2vec-audio": "Data2VecAudioModel",
}


def load(cls, name_or_path: str | os.PathLike, **kwargs):
    """`cls.from_pretrained(name_or_path, trust_remote_code=False, **kwargs)` for a concrete transformers class."""
    if cls.__name__.startswith("Auto"):
        raise TypeError(
            f"{cls.__name__}: load a concrete class (Auto* classes can import code from the folder)"
        )
    return cls.from_pretrained(name_or_path, **NO_REMOTE_CODE, **kwargs)


def speech_model_class(folder: str | os.PathLike):
    """The concrete class of the speech encoder in `folder`, from its config.json's model_type (allowlisted)."""
    import transformers

    path = Path(folder) / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(
            f"speech encoder folder {folder}: cannot read {path} as a JSON object ({exc})"
        ) from exc
    if model_type not in SPEECH_MODELS:
        raise ValueError(
            f"speech encoder folder {folder}: model_type {model_type!r} is not one of {sorted(SPEECH_MODELS)}; "
            "use a HuBERT/wav2vec 2.0/WavLM/data2vec-audio checkpoint"
        )
    return getattr(transformers, SPEECH_MODELS[model_type])
