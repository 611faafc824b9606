"""Semantically-aware expression prediction (Sec. 3.3, Eq. 15): speech + transcript -> expression weights Ŵ^e.

* Speech encoder E_S: a transformers ``HubertModel``; its CNN feature encoder is frozen, the transformer is
  fine-tuned (as the paper, after [54]). Input: 16 kHz mono waveform.
* Text encoder E_T: a transformers ``RobertaModel`` (RoBERTa family, e.g. an EmoBERTa checkpoint).
* Each encoder's last hidden states are mean-pooled over valid frames/tokens, the two vectors concatenated and
  MLP_A^e maps them to the n_e (10) expression weights.

Modality masking (Eq. 15): in training each sample draws p ~ U(0,1); p >= 0.5 keeps both, 0.25 <= p < 0.5 masks
speech, p < 0.25 masks text. A masked modality's pooled vector is REPLACED by a mask embedding (learned, one per
modality, initialised at zero; or fixed zeros, ``mask_embedding``), so a masked modality cannot leak into the
output. At inference ``modality`` ("both", "speech", "text") chooses explicitly. A missing input (None) or an
empty transcript also masks that modality for that sample.

Both encoders always run when their input is given, masked or not: under DeepSpeed ZeRO-3 every rank must gather
the same parameters in the same order, so nothing here skips work per sample or at random (for the same reason
HuBERT's layerdrop is set to ``speech_layerdrop``, 0 by default).

Encoders come from ``speech_model``/``text_model`` (a Hugging Face name in the local cache, or a local folder;
nothing downloads when HF_HUB_OFFLINE=1). When they are None, tiny random configs of the same classes are built
(the tiny preset and tests), with a byte-level BPE tokenizer made in code. ``save_components(dir)`` writes the two
encoder configs and the tokenizer so a trained model is rebuilt from disk without the original checkpoints
(``ExpressionPredictor.load_components(dir, config)``, then its state dict).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

MODALITIES = ("both", "speech", "text")
PAPER_SPEECH_MODEL = "facebook/hubert-base-ls960"
PAPER_TEXT_MODEL = "tae898/emoberta-base"
# RoBERTa's special tokens and their conventional ids (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=last).
_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


@dataclass
class ExpressionPredictorConfig:
    """E_S (HuBERT) + E_T (RoBERTa) + MLP_A^e -> expression weights."""

    n_out: int = 10  # expression bank size n_e (paper: 10); must equal the visual EXLN's
    speech_model: str | None = (
        None  # HF name or local folder of a HuBERT checkpoint; None: tiny random HuBERT
    )
    text_model: str | None = None  # HF name or local folder of a RoBERTa-family checkpoint; None: tiny random
    mlp_hidden: int = 256  # hidden width of MLP_A^e
    dropout: float = 0.1  # dropout inside MLP_A^e
    mask_embedding: str = "learned"  # what replaces a masked modality: "learned" vector or fixed "zeros"
    max_text_tokens: int = 128  # transcript tokens kept (truncated beyond)
    freeze_feature_encoder: bool = True  # freeze HuBERT's CNN feature encoder (paper: yes)
    speech_layerdrop: float = 0.0  # HuBERT layerdrop; > 0 desynchronises ZeRO-3 ranks, keep 0 there
    sample_rate: int = 16000  # waveform rate HuBERT expects (contract: 16 kHz)
    tiny_hidden: int = 32  # tiny random encoders: hidden size
    tiny_layers: int = 2  # tiny random encoders: transformer layers
    tiny_heads: int = 2  # tiny random encoders: attention heads
    tiny_intermediate: int = 64  # tiny random encoders: feed-forward width
    tiny_conv_dim: int = (
        32  # tiny random HuBERT: CNN feature-encoder channels (strides as HuBERT's, 320 total)
    )

    def __post_init__(self) -> None:
        if self.n_out <= 0 or self.mlp_hidden <= 0 or self.max_text_tokens < 4:
            raise ValueError(
                f"ExpressionPredictorConfig: n_out and mlp_hidden must be > 0 and max_text_tokens >= 4, got "
                f"{self.n_out}, {self.mlp_hidden}, {self.max_text_tokens}"
            )
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.speech_layerdrop < 1.0:
            raise ValueError("ExpressionPredictorConfig: dropout and speech_layerdrop must be in [0, 1)")
        if self.mask_embedding not in ("learned", "zeros"):
            raise ValueError(
                f"ExpressionPredictorConfig.mask_embedding must be 'learned' or 'zeros', got {self.mask_embedding!r}"
            )
        if self.sample_rate != 16000:
            raise ValueError(
                f"ExpressionPredictorConfig.sample_rate: HuBERT takes 16000 Hz, got {self.sample_rate}"
            )
        if self.tiny_hidden % self.tiny_heads or self.tiny_hidden % 4:
            raise ValueError(
                f"ExpressionPredictorConfig: tiny_hidden {self.tiny_hidden} must be divisible by tiny_heads "
                f"{self.tiny_heads} and by 4 (HuBERT positional conv groups)"
            )
        for name in ("speech_model", "text_model"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(
                    f"ExpressionPredictorConfig.{name} must be a model name/path or None, got {v!r}"
                )

    @classmethod
    def tiny(cls) -> ExpressionPredictorConfig:
        return cls(mlp_hidden=32, max_text_tokens=64)

    @classmethod
    def paper(cls) -> ExpressionPredictorConfig:
        return cls(speech_model=PAPER_SPEECH_MODEL, text_model=PAPER_TEXT_MODEL)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpressionPredictorConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"ExpressionPredictorConfig: unknown keys {unknown}; known keys are {sorted(names)}"
            )
        return cls(**data)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (the alphabet of byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def build_byte_tokenizer(max_length: int):
    """A byte-level BPE RoBERTa tokenizer with no merges: 4 specials + 256 byte symbols + <mask> (261 ids)."""
    from transformers import RobertaTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in _bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    vocab["<mask>"] = len(vocab)
    # vocab=/merges= objects: the vocab_file= form would be silently ignored
    return RobertaTokenizerFast(vocab=vocab, merges=[], model_max_length=max_length)


def _tiny_speech_config(cfg: ExpressionPredictorConfig):
    from transformers import HubertConfig

    return HubertConfig(
        hidden_size=cfg.tiny_hidden,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        intermediate_size=cfg.tiny_intermediate,
        conv_dim=(cfg.tiny_conv_dim,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        apply_spec_augment=False,
        mask_time_prob=0.0,
        layerdrop=cfg.speech_layerdrop,
    )


def _tiny_text_config(cfg: ExpressionPredictorConfig, vocab_size: int):
    from transformers import RobertaConfig

    return RobertaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.tiny_hidden,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        intermediate_size=cfg.tiny_intermediate,
        max_position_embeddings=cfg.max_text_tokens + 2,  # RoBERTa offsets positions by padding_idx + 1
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )


def _from_pretrained(cls, name: str, what: str, **kwargs):
    from preprocessing import hf_loading

    try:
        return hf_loading.load(cls, name, **kwargs)
    except OSError as exc:
        raise OSError(
            f"could not load the {what} {name!r}: give a local folder, or put the checkpoint in the Hugging Face "
            f"cache beforehand (nothing is downloaded at run time; HF_HUB_OFFLINE=1). Original error: {exc}"
        ) from exc


class ExpressionPredictor(nn.Module):
    """Ŵ^e = MLP_A^e([pool(E_S(speech)) ; pool(E_T(text))]) with the modality masking of Eq. 15."""

    def __init__(
        self, config: ExpressionPredictorConfig | None = None, components_dir: str | Path | None = None
    ):
        super().__init__()
        from transformers import HubertConfig, HubertModel, RobertaConfig, RobertaModel, RobertaTokenizerFast

        from preprocessing.hf_loading import load

        self.config = cfg = config or ExpressionPredictorConfig()
        if components_dir is not None:
            d = Path(components_dir)
            for sub in ("speech_encoder", "text_encoder", "tokenizer"):
                if not (d / sub).is_dir():
                    raise FileNotFoundError(
                        f"ExpressionPredictor components folder {str(d)!r} lacks {sub}/: it must be written by "
                        "save_components()"
                    )
            # Architecture only: the weights come with the caller's state dict. Concrete classes only: the
            # folder comes with a model someone handed over, and must not name code to run (hf_loading).
            self.speech_encoder = HubertModel(load(HubertConfig, d / "speech_encoder"))
            self.text_encoder = RobertaModel(load(RobertaConfig, d / "text_encoder"), add_pooling_layer=False)
            self.tokenizer = load(RobertaTokenizerFast, d / "tokenizer")
        else:
            if cfg.speech_model is None:
                self.speech_encoder = HubertModel(_tiny_speech_config(cfg))
            else:
                self.speech_encoder = _from_pretrained(
                    HubertModel, cfg.speech_model, "speech model (HuBERT)", layerdrop=cfg.speech_layerdrop
                )
            if cfg.text_model is None:
                self.tokenizer = build_byte_tokenizer(cfg.max_text_tokens)
                self.text_encoder = RobertaModel(
                    _tiny_text_config(cfg, len(self.tokenizer)), add_pooling_layer=False
                )
            else:
                self.tokenizer = _from_pretrained(RobertaTokenizerFast, cfg.text_model, "text tokenizer")
                self.text_encoder = _from_pretrained(
                    RobertaModel, cfg.text_model, "text model (RoBERTa)", add_pooling_layer=False
                )
        if cfg.freeze_feature_encoder:
            self.speech_encoder.feature_extractor._freeze_parameters()
        hs = self.speech_encoder.config.hidden_size
        ht = self.text_encoder.config.hidden_size
        learned = cfg.mask_embedding == "learned"
        self.speech_mask = nn.Parameter(torch.zeros(hs), requires_grad=learned)
        self.text_mask = nn.Parameter(torch.zeros(ht), requires_grad=learned)
        self.head = nn.Sequential(
            nn.Linear(hs + ht, cfg.mlp_hidden),
            nn.LeakyReLU(0.2),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.mlp_hidden, cfg.n_out),
        )

    # ------------------------------------------------------------------------------------------------ inputs

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Transcripts -> (input_ids [B,L], attention_mask [B,L], available [B] bool: transcript non-empty)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("ExpressionPredictor.tokenize takes a list of transcript strings")
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.config.max_text_tokens,
            return_tensors="pt",
        )
        available = torch.tensor([bool(t.strip()) for t in texts])
        return enc["input_ids"], enc["attention_mask"], available

    def _speech_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        c = self.speech_encoder.config
        out = lengths
        for k, s in zip(c.conv_kernel, c.conv_stride, strict=True):
            out = torch.div(out - k, s, rounding_mode="floor") + 1
        return out.clamp_min(1)

    def encode_speech(self, speech: torch.Tensor, speech_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Waveform [B,N] (16 kHz, zero-padded) -> pooled E_S(a) [B,H_s], mean over the valid HuBERT frames."""
        if speech.dim() != 2 or speech.shape[1] < 400:
            raise ValueError(
                f"ExpressionPredictor speech must be a 16 kHz waveform [B,N] with N >= 400 samples, got "
                f"{tuple(speech.shape)}"
            )
        b, n = speech.shape
        lengths = (
            torch.full((b,), n, device=speech.device)
            if speech_lengths is None
            else speech_lengths.to(speech.device)
        )
        attention = None
        if self.speech_encoder.config.feat_extract_norm == "layer":
            # Only layer-norm HuBERTs were trained with padding masks; group-norm ones (base) take zero padding.
            attention = (torch.arange(n, device=speech.device)[None] < lengths[:, None]).long()
        hidden = self.speech_encoder(speech, attention_mask=attention).last_hidden_state  # [B,F,H]
        frames = self._speech_frames(lengths).clamp_max(hidden.shape[1])
        valid = (torch.arange(hidden.shape[1], device=hidden.device)[None] < frames[:, None]).to(hidden.dtype)
        return (hidden * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token ids [B,L] -> pooled E_T(T) [B,H_t], mean over non-padding tokens."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.to(hidden.dtype)[..., None]
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    # ----------------------------------------------------------------------------------------------- masking

    @staticmethod
    def modality_keep(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 15 as (keep_speech, keep_text) from p in [0,1]: >= 0.5 both; [0.25, 0.5) speech masked; < 0.25 text."""
        keep_speech = ~((p >= 0.25) & (p < 0.5))
        keep_text = p >= 0.25
        return keep_speech, keep_text

    def forward(
        self,
        speech: torch.Tensor | None = None,
        speech_lengths: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        modality: str | None = None,
        p: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        text_available: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> expression weights [B, n_out].

        speech [B,N] 16 kHz waveform (+ speech_lengths [B] samples); input_ids/text_mask [B,L] from ``tokenize``;
        text_available [B] bool (False for empty transcripts). ``modality`` None: Eq. 15's random masking in
        training (``p`` [B] forces the draw, ``generator`` seeds it), both modalities in eval; "both", "speech",
        "text" choose explicitly (the others masked).
        """
        if speech is None and input_ids is None:
            raise ValueError("ExpressionPredictor needs speech and/or input_ids (transcript tokens)")
        if modality is not None and modality not in MODALITIES:
            raise ValueError(
                f"ExpressionPredictor modality must be one of {MODALITIES} or None, got {modality!r}"
            )
        if modality == "speech" and speech is None:
            raise ValueError("ExpressionPredictor: modality='speech' but no speech was given")
        if modality == "text" and input_ids is None:
            raise ValueError("ExpressionPredictor: modality='text' but no input_ids were given")
        b = speech.shape[0] if speech is not None else input_ids.shape[0]
        device = self.speech_mask.device

        if modality is None and self.training:
            if p is None:
                p = torch.rand(b, generator=generator, device=generator.device if generator else device)
            keep_speech, keep_text = self.modality_keep(p.to(device))
        elif p is not None:
            raise ValueError(
                "ExpressionPredictor: p forces the training draw; do not pass it with an explicit modality"
            )
        else:
            mode = modality or "both"
            keep_speech = torch.full((b,), mode in ("both", "speech"), device=device)
            keep_text = torch.full((b,), mode in ("both", "text"), device=device)

        if speech is not None:
            s = self.encode_speech(speech, speech_lengths)
        else:
            s = self.speech_mask.expand(b, -1)
            keep_speech = torch.zeros_like(keep_speech)
        if input_ids is not None:
            t = self.encode_text(input_ids, text_mask)
            if text_available is not None:
                keep_text = keep_text & text_available.to(device).bool()
        else:
            t = self.text_mask.expand(b, -1)
            keep_text = torch.zeros_like(keep_text)
        s = torch.where(keep_speech[:, None], s, self.speech_mask.to(s.dtype).expand_as(s))
        t = torch.where(keep_text[:, None], t, self.text_mask.to(t.dtype).expand_as(t))
        return self.head(torch.cat([s, t], dim=-1))

    # ------------------------------------------------------------------------------------------- persistence

    def save_components(self, path: str | Path) -> None:
        """Write speech_encoder/config.json, text_encoder/config.json and tokenizer/ (no weights) under path."""
        d = Path(path)
        self.speech_encoder.config.save_pretrained(d / "speech_encoder")
        self.text_encoder.config.save_pretrained(d / "text_encoder")
        self.tokenizer.save_pretrained(d / "tokenizer")

    @classmethod
    def load_components(cls, path: str | Path, config: ExpressionPredictorConfig) -> ExpressionPredictor:
        """Rebuild the architecture from ``save_components`` output (weights: load the state dict after)."""
        return cls(config, components_dir=path)
