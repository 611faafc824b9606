"""Speech-like audio: words of the transcript become syllables, each a vowel over a glottal pulse train.

The same syllable timeline drives the mouth (open and width per frame), so lips and sound agree to the frame. The
clip's emotion is audible (pitch level and range, loudness, tempo) and present in the words chosen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

from preprocessing.synthtalk.template import EMOTIONS

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640, the project's audio/video contract

# Vowel: formants F1-F3 (Hz, adult average), mouth openness [0, 1], mouth width [-1 round, 1 spread].
VOWELS: dict[str, tuple[float, float, float, float, float]] = {
    "a": (730.0, 1090.0, 2440.0, 1.0, 0.15),
    "e": (530.0, 1840.0, 2480.0, 0.6, 0.6),
    "i": (300.0, 2290.0, 3010.0, 0.3, 0.9),
    "o": (570.0, 840.0, 2410.0, 0.7, -0.6),
    "u": (320.0, 870.0, 2240.0, 0.35, -0.9),
}

NEUTRAL_WORDS = [
    "the",
    "table",
    "is",
    "near",
    "the",
    "window",
    "we",
    "walked",
    "along",
    "the",
    "river",
    "today",
    "and",
    "the",
    "paper",
    "came",
    "later",
    "this",
    "morning",
    "seven",
    "people",
    "met",
    "in",
    "the",
    "city",
    "garden",
    "to",
    "read",
    "a",
    "letter",
    "about",
    "a",
    "simple",
    "yellow",
    "door",
    "number",
    "open",
    "station",
    "market",
    "over",
    "under",
    "before",
    "after",
    "travel",
    "water",
    "bottle",
    "summer",
    "winter",
    "doctor",
    "pencil",
    "corner",
]
EMOTION_WORDS: dict[str, tuple[str, ...]] = {
    "neutral": (),
    "happy": ("happy", "wonderful", "great", "love", "smile", "joy", "delighted", "glad", "fantastic", "lovely"),
    "sad": ("sad", "sorry", "lonely", "miss", "tears", "lost", "gloomy", "grief", "unhappy", "alone"),
    "angry": ("angry", "furious", "hate", "unfair", "annoyed", "outrage", "mad", "terrible", "enough", "stupid"),
    "surprised": ("wow", "really", "unexpected", "amazing", "sudden", "shocked", "unbelievable", "astonished",
                  "what", "incredible"),
}  # fmt: skip

# Voice per emotion at full intensity: pitch multiplier, pitch range (fraction), loudness gain, tempo multiplier.
VOICES: dict[str, tuple[float, float, float, float]] = {
    "neutral": (1.0, 0.1, 1.0, 1.0),
    "happy": (1.2, 0.25, 1.25, 1.08),
    "sad": (0.85, 0.04, 0.55, 0.85),
    "angry": (1.08, 0.16, 1.7, 1.12),
    "surprised": (1.3, 0.32, 1.3, 1.0),
}


@dataclass
class Speech:
    """One clip's audio and the mouth motion it implies, on the 25 fps timeline."""

    waveform: np.ndarray  # (T * 640,) float32 in [-1, 1], 16 kHz
    mouth_open: np.ndarray  # (T,) in [0, 1]
    mouth_width: np.ndarray  # (T,) in [-1, 1]
    energy: np.ndarray  # (T,) loudness envelope per frame (drives head motion a little)
    transcript: str  # the words spoken, in order


def word_vowels(word: str) -> list[str]:
    """The word's syllable vowels: one per vowel group, a silent final e dropped, y read as i."""
    groups = re.findall(r"[aeiouy]+", word.lower())
    if len(groups) > 1 and word.lower().endswith("e") and groups[-1] == "e":
        groups = groups[:-1]
    vowels = [("i" if g[0] == "y" else g[0]) for g in groups]
    return vowels or ["a"]


def _voice(emotion: int, intensity: float) -> tuple[float, float, float, float]:
    neutral = np.array(VOICES["neutral"])
    target = np.array(VOICES[EMOTIONS[emotion]])
    return tuple(float(v) for v in neutral + intensity * (target - neutral))


def _pick_words(rng: np.random.Generator, emotion: int, intensity: float, count: int) -> list[str]:
    pool = EMOTION_WORDS[EMOTIONS[emotion]]
    p_emotion = (0.15 + 0.35 * intensity) if pool else 0.0
    words = [
        str(rng.choice(pool)) if rng.random() < p_emotion else str(rng.choice(NEUTRAL_WORDS))
        for _ in range(count)
    ]
    if pool and not any(w in pool for w in words[:2]):  # early, so that even a short clip says one
        words[int(rng.integers(2))] = str(rng.choice(pool))
    return words


def synthesize(
    rng: np.random.Generator, n_frames: int, emotion: int, intensity: float, f0: float, formant_scale: float
) -> Speech:
    """Plan words and syllables over n_frames, synthesize them, and derive the per-frame mouth."""
    n = n_frames * SAMPLES_PER_FRAME
    pitch_mult, pitch_range, gain, tempo = _voice(emotion, intensity)
    words = _pick_words(rng, emotion, intensity, 40)

    # Timeline: (start sample, length, vowel, accent) per syllable, with gaps between words and phrase pauses.
    syllables: list[tuple[int, int, str, float]] = []
    spoken: list[str] = []
    t = rng.uniform(0.15, 0.5)
    end = n / SAMPLE_RATE - 0.15
    words_in_phrase, phrase_len = 0, int(rng.integers(3, 7))
    for word in words:
        vowels = word_vowels(word)
        durations = rng.uniform(0.14, 0.26, len(vowels)) / tempo
        if t + durations.sum() > end:
            break
        for k, (v, d) in enumerate(zip(vowels, durations, strict=True)):
            accent = 1.0 if k == 0 else rng.uniform(0.6, 0.9)
            syllables.append((int(t * SAMPLE_RATE), int(d * SAMPLE_RATE), v, accent))
            t += d
        spoken.append(word)
        words_in_phrase += 1
        if words_in_phrase >= phrase_len:
            t += rng.uniform(0.3, 0.7)
            words_in_phrase, phrase_len = 0, int(rng.integers(3, 7))
        else:
            t += rng.uniform(0.03, 0.12)

    env = np.zeros(n)
    openness = np.zeros(n)
    width = np.zeros(n)
    f1 = np.full(n, VOWELS["a"][0])
    f2 = np.full(n, VOWELS["a"][1])
    f3 = np.full(n, VOWELS["a"][2])
    bursts = np.zeros(n)
    for start, length, v, accent in syllables:
        u = np.linspace(0, 1, length, endpoint=False)
        shape = np.sin(np.pi * u) ** 0.7 * accent
        sl = slice(start, start + length)
        fv = VOWELS[v]
        env[sl] = shape * (0.3 + 0.7 * fv[3])  # open vowels are louder, as in speech
        openness[sl] = shape * fv[3]
        width[sl] = shape * fv[4]
        f1[sl], f2[sl], f3[sl] = fv[0], fv[1], fv[2]
        # A consonant-like noise burst just before the vowel: speech is not vowels only.
        blen = int(rng.uniform(0.02, 0.045) * SAMPLE_RATE)
        b0 = max(0, start - blen // 2)
        noise = np.diff(rng.standard_normal(blen + 1)) * np.exp(-np.linspace(0, 4, blen))
        bursts[b0 : b0 + blen] += 0.08 * noise[: len(bursts[b0 : b0 + blen])]

    # Pitch: speaker level x emotion, a falling line over each phrase-ish span, accents lift it.
    time = np.arange(n) / SAMPLE_RATE
    slow = np.sin(2 * np.pi * (0.35 * time + rng.uniform())) * 0.5 + np.sin(
        2 * np.pi * (1.1 * time + rng.uniform())
    )
    f0_track = f0 * pitch_mult * (1 + pitch_range * 0.5 * slow + 0.15 * pitch_range * env)
    phase = np.cumsum(f0_track / SAMPLE_RATE)
    frac = phase % 1.0
    open_q = 0.6  # open quotient of the glottal cycle
    flow = np.where(
        frac < open_q,
        0.5 - 0.5 * np.cos(np.pi * frac / open_q),
        0.5 + 0.5 * np.cos(np.pi * (frac - open_q) / (1 - open_q)),
    )
    source = np.diff(flow, prepend=flow[0]) * 20 + 0.03 * rng.standard_normal(n)
    carrier = _vocal_tract(source, f1 * formant_scale, f2 * formant_scale, f3 * formant_scale)
    # Level the carrier (a harmonic landing on a narrow formant would otherwise spike), so loudness is the envelope.
    win = np.ones(320) / 320  # 20 ms
    level = np.sqrt(np.convolve(carrier**2, win, mode="same")) + 1e-6
    voiced = carrier / level * env
    audio = 0.12 * gain * voiced + 0.1 * gain * bursts
    audio = np.tanh(audio * 1.2) / 1.2  # a soft limit, never a hard clip
    audio += 0.0005 * rng.standard_normal(n)  # room noise: real silence is never digital zero

    per_frame = lambda x: x.reshape(n_frames, SAMPLES_PER_FRAME).mean(axis=1)  # noqa: E731
    return Speech(
        waveform=audio.astype(np.float32),
        mouth_open=np.clip(per_frame(openness), 0, 1),
        mouth_width=np.clip(per_frame(width), -1, 1),
        energy=per_frame(env) * gain,
        transcript=" ".join(spoken),
    )


def _resonator(freq: float, bandwidth: float) -> tuple[np.ndarray, np.ndarray]:
    """Second-order all-pole resonator with unit gain at its centre frequency."""
    r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
    theta = 2 * np.pi * freq / SAMPLE_RATE
    a = np.array([1.0, -2 * r * np.cos(theta), r * r])
    z = np.exp(-1j * theta)
    b = np.array([abs(a[0] + a[1] * z + a[2] * z * z)])
    return b, a


def _vocal_tract(x: np.ndarray, f1: np.ndarray, f2: np.ndarray, f3: np.ndarray, hop: int = 160) -> np.ndarray:
    """Three cascaded formant resonators, re-tuned every `hop` samples with their state carried over."""
    out = np.empty_like(x)
    zi = [np.zeros(2), np.zeros(2), np.zeros(2)]
    for s in range(0, len(x), hop):
        seg = x[s : s + hop]
        for k, (fk, bw) in enumerate(((f1, 90.0), (f2, 110.0), (f3, 170.0))):
            b, a = _resonator(float(fk[s]), bw)
            seg, zi[k] = lfilter(b, a, seg, zi=zi[k])
        out[s : s + hop] = seg
    return out
