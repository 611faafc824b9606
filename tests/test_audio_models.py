"""SpeechEncoder (tiny random HuBERT), Transcriber (tiny random Whisper + a tokenizer built here) and transcripts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from testkit import save_tiny_hubert

from preprocessing.audio import SAMPLE_RATE, SpeechEncoder, Transcriber
from preprocessing.transcripts import TranscriptError, resolve_transcript, sidecar_path

WHISPER_SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]


@pytest.fixture(scope="module")
def hubert_dir(tmp_path_factory):
    return save_tiny_hubert(
        tmp_path_factory.mktemp("hubert"), layers=2, sample_rate=SAMPLE_RATE, do_normalize=True
    )


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (bytes that print as themselves keep their character)."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    """A random 1-layer Whisper with a byte-level vocabulary (256 bytes + Whisper's special tokens, no merges)."""
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    path = tmp_path_factory.mktemp("whisper")
    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    for token in WHISPER_SPECIALS:
        vocab[token] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    eot = "<|endoftext|>"
    tokenizer = WhisperTokenizer(
        str(path / "vocab.json"),
        str(path / "merges.txt"),
        unk_token=eot,
        bos_token=eot,
        eos_token=eot,
        pad_token=eot,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": WHISPER_SPECIALS[1:]})
    assert tokenizer.decode(tokenizer("hi there", add_special_tokens=False).input_ids) == "hi there"
    processor = WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer
    )
    config = WhisperConfig(
        vocab_size=len(vocab),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_mel_bins=80,
        max_target_positions=64,
        decoder_start_token_id=vocab["<|startoftranscript|>"],
        eos_token_id=vocab[eot],
        pad_token_id=vocab[eot],
        bos_token_id=vocab[eot],
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config.decoder_start_token_id = vocab["<|startoftranscript|>"]
    model.generation_config.no_timestamps_token_id = vocab["<|notimestamps|>"]
    # Never end or emit a special token, so the random model's output is non-empty text of byte tokens.
    model.generation_config.suppress_tokens = [vocab[t] for t in WHISPER_SPECIALS]
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_speech_encoder_states_at_25fps(hubert_dir):
    encoder = SpeechEncoder(hubert_dir)
    rng = np.random.default_rng(0)
    wave = rng.standard_normal(2 * SAMPLE_RATE).astype(np.float32) * 0.1
    states = encoder.states(wave, 50)
    assert states.shape == (50, encoder.dim) == (50, 16) and states.dtype == np.float32
    assert np.isfinite(states).all() and states.std() > 0
    assert encoder.states(wave, 7).shape == (7, 16)  # trimmed to 7 frames
    # Interpolation keeps time: the first half of the states depends on the first half of the audio only roughly,
    # but changing the audio must change the states (the model really runs on it).
    assert not np.allclose(encoder.states(wave * 0.5 + 0.01, 50), states)
    middle = SpeechEncoder(hubert_dir, layer=1).states(wave, 50)
    assert middle.shape == (50, 16) and not np.allclose(middle, states)


def test_speech_encoder_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        SpeechEncoder(tmp_path / "hubert-large")


def test_transcriber_runs_and_returns_text(whisper_dir):
    transcriber = Transcriber(whisper_dir, max_new_tokens=6)
    rng = np.random.default_rng(0)
    text = transcriber.transcribe(rng.standard_normal(SAMPLE_RATE).astype(np.float32) * 0.1)
    assert isinstance(text, str) and text  # random bytes, but text
    assert transcriber.transcribe(np.zeros(0, np.float32)) == ""


def test_transcriber_missing_folder_and_processor(tmp_path, whisper_dir):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Transcriber(tmp_path / "whisper-small")
    broken = tmp_path / "no-tokenizer"
    broken.mkdir()
    (broken / "config.json").write_text((whisper_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="processor"):
        Transcriber(broken)


def test_transcript_order(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")
    assert sidecar_path(video, ".txt") == str(tmp_path / "clip.txt")
    assert resolve_transcript(video) == ("", "none")
    assert resolve_transcript(video, sidecar_json={"transcript": " from json "}) == (
        "from json",
        "sidecar_json",
    )
    (tmp_path / "clip.txt").write_text("from the txt\n", encoding="utf-8")
    assert resolve_transcript(video, sidecar_json={"transcript": "x"}) == ("from the txt", "sidecar_txt")
    assert resolve_transcript(video, manifest_text="from manifest") == ("from manifest", "manifest")
    assert resolve_transcript(video, manifest_text="   ") == ("from the txt", "sidecar_txt")


def test_transcript_json_path_and_bad_sidecars(tmp_path):
    video = tmp_path / "clip.mp4"
    side = tmp_path / "clip.json"
    side.write_text(json.dumps({"speaker": "a", "transcript": "hello"}))
    assert resolve_transcript(video, sidecar_json=side) == ("hello", "sidecar_json")
    side.write_text("{not json")
    with pytest.raises(TranscriptError, match="clip.json"):
        resolve_transcript(video, sidecar_json=side)
    with pytest.raises(TranscriptError, match="must be a string"):
        resolve_transcript(video, sidecar_json={"transcript": 3})
    (tmp_path / "clip.txt").write_bytes(b"\xff\xfe\xfa bad")
    with pytest.raises(TranscriptError, match="UTF-8"):
        resolve_transcript(video)


def test_transcript_falls_back_to_asr(tmp_path, whisper_dir, media_dir):
    transcriber = Transcriber(whisper_dir, max_new_tokens=4)
    video = media_dir / "videos" / "EDTalk__mouth_source_muxed.mp4"
    text, source = resolve_transcript(video, transcriber=transcriber)
    assert source == "asr" and text
    # A silent video with a .wav sidecar: ASR reads the sidecar.
    silent = tmp_path / "silent.mp4"
    silent.write_bytes((media_dir / "edge_cases" / "DPE__s.mp4").read_bytes())
    sf.write(tmp_path / "silent.wav", np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    text, source = resolve_transcript(silent, transcriber=transcriber)
    assert source == "asr" and text
    # No audio anywhere: nothing to recognise.
    (tmp_path / "silent.wav").unlink()
    assert resolve_transcript(silent, transcriber=transcriber) == ("", "none")
