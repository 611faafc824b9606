"""Helpers the test modules share (imported as `from testkit import ...`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_video(path: str | Path, frames, fps: int = 25) -> None:
    """RGB uint8 frames -> H.264 mp4 through PyAV (no system ffmpeg needed)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def save_tiny_hubert(path: str | Path, layers: int = 2, sample_rate: int = 16000, **extractor) -> Path:
    """A randomly initialised HuBERT of a few thousand weights (seed 0) and its feature extractor, saved as a
    local model folder that `from_pretrained` reads offline."""
    import torch
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    config = HubertConfig(
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    torch.manual_seed(0)
    HubertModel(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=sample_rate, **extractor).save_pretrained(path)
    return Path(path)
