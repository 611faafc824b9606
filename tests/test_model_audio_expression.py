"""Expression predictor (Eq. 15): HuBERT + RoBERTa encoders (tiny random configs), modality masking, freezing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from edtalk.expression_predictor import ExpressionPredictor, ExpressionPredictorConfig


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    model = ExpressionPredictor(ExpressionPredictorConfig(mlp_hidden=32, max_text_tokens=64, dropout=0.0))
    with (
        torch.no_grad()
    ):  # move the mask embeddings off zero so "masked" is distinguishable from "zero features"
        model.speech_mask.normal_()
        model.text_mask.normal_()
    ids, am, avail = model.tokenize(["I am so happy today", "this is terrible", "well, fine"])
    speech = torch.randn(3, 8000)
    return model, speech, ids, am, avail


def _train_without_dropout(model: ExpressionPredictor) -> None:
    """Training mode (Eq. 15's random masking is on) with the encoders' own dropout off, so outputs compare."""
    model.train()
    model.speech_encoder.eval()
    model.text_encoder.eval()


def test_eq15_branches_from_p():
    p = torch.tensor([0.0, 0.2499, 0.25, 0.4999, 0.5, 1.0])
    keep_s, keep_t = ExpressionPredictor.modality_keep(p)
    assert keep_s.tolist() == [True, True, False, False, True, True]
    assert keep_t.tolist() == [False, False, True, True, True, True]


def test_training_masking_follows_p(inputs):
    model, speech, ids, am, _ = inputs
    _train_without_dropout(model)
    p = torch.tensor([0.9, 0.3, 0.1])  # both, speech masked, text masked
    out = model(speech, None, ids, am, p=p)
    both = model(speech, None, ids, am, modality="both")
    text_only = model(speech, None, ids, am, modality="text")
    speech_only = model(speech, None, ids, am, modality="speech")
    assert torch.allclose(out[0], both[0], atol=1e-6)
    assert torch.allclose(out[1], text_only[1], atol=1e-6)
    assert torch.allclose(out[2], speech_only[2], atol=1e-6)
    assert not torch.allclose(both[1], text_only[1], atol=1e-4)  # the mask really changes something
    # which input each sample still sees
    out_new_speech = model(speech + torch.randn_like(speech), None, ids, am, p=p)
    changed = (out_new_speech - out).abs().amax(-1)
    assert changed[0] > 1e-5 and changed[1] < 1e-7 and changed[2] > 1e-5
    ids2 = ids.clone()
    ids2[:, 1:4] = torch.tensor([70, 80, 90])
    out_new_text = model(speech, None, ids2, am, p=p)
    changed = (out_new_text - out).abs().amax(-1)
    assert changed[0] > 1e-5 and changed[1] > 1e-5 and changed[2] < 1e-7


def test_random_draw_uses_all_three_branches(inputs):
    model, speech, ids, am, _ = inputs
    _train_without_dropout(model)
    g = torch.Generator().manual_seed(0)
    p = torch.rand(4000, generator=g)
    keep_s, keep_t = ExpressionPredictor.modality_keep(p)
    assert abs((keep_s & keep_t).float().mean().item() - 0.5) < 0.03
    assert abs((~keep_s).float().mean().item() - 0.25) < 0.03
    assert abs((~keep_t).float().mean().item() - 0.25) < 0.03
    a = model(speech, None, ids, am, generator=torch.Generator().manual_seed(5))
    b = model(speech, None, ids, am, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_text_modality_ignores_speech(inputs):
    model, speech, ids, am, _ = inputs
    model.eval()
    sp = speech.clone().requires_grad_(True)
    out = model(sp, None, ids, am, modality="text")
    other = model(torch.randn_like(speech), None, ids, am, modality="text")
    assert torch.equal(out, other)
    out.sum().backward()
    assert sp.grad is None or sp.grad.abs().max() == 0
    assert torch.equal(model(None, None, ids, am), model(speech, None, ids, am, modality="text"))
    with pytest.raises(ValueError, match="modality='speech'"):
        model(None, None, ids, am, modality="speech")


def test_empty_transcript_masks_text(inputs):
    model, speech, _, _, _ = inputs
    model.eval()
    ids, am, avail = model.tokenize(["", "hello there", ""])
    assert avail.tolist() == [False, True, False]
    out = model(speech, None, ids, am, text_available=avail)
    speech_only = model(speech, None, ids, am, modality="speech")
    assert torch.allclose(out[0], speech_only[0], atol=1e-6) and torch.allclose(
        out[2], speech_only[2], atol=1e-6
    )
    assert not torch.allclose(out[1], speech_only[1], atol=1e-4)


def test_speech_padding_is_not_pooled(inputs):
    model, speech, ids, am, _ = inputs
    model.eval()
    lengths = torch.tensor([8000, 4800, 8000])
    padded = speech.clone()
    padded[1, 4800:] = 0.0
    noisy = padded.clone()
    noisy[1, 6400:] = 5.0  # garbage well past the valid part (beyond the receptive field's reach)
    a = model.encode_speech(padded, lengths)
    b = model.encode_speech(noisy, lengths)
    assert a.shape == (3, model.speech_encoder.config.hidden_size)
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[2], b[2])


def test_hubert_cnn_frozen_transformer_trainable(inputs):
    model, speech, ids, am, _ = inputs
    model.train()
    model.zero_grad(set_to_none=True)
    model(speech, None, ids, am, modality="both").pow(2).sum().backward()
    fe = list(model.speech_encoder.feature_extractor.parameters())
    assert fe and all(not p.requires_grad and p.grad is None for p in fe)
    layer_grads = [p.grad for p in model.speech_encoder.encoder.layers.parameters()]
    assert all(g is not None for g in layer_grads) and sum(g.abs().sum() for g in layer_grads) > 0
    assert model.speech_encoder.feature_projection.projection.weight.grad is not None
    assert model.text_encoder.encoder.layer[0].attention.self.query.weight.grad is not None
    assert model.speech_mask.requires_grad and model.text_mask.requires_grad
    zeros = ExpressionPredictor(
        ExpressionPredictorConfig.from_dict(
            {**ExpressionPredictorConfig.tiny().to_dict(), "mask_embedding": "zeros"}
        )
    )
    assert not zeros.speech_mask.requires_grad and zeros.speech_mask.abs().sum() == 0


def test_state_dict_roundtrips_from_config_alone(tmp_path, inputs):
    model, speech, ids, am, _ = inputs
    model.eval()
    cfg = ExpressionPredictorConfig.from_dict(json.loads(json.dumps(model.config.to_dict())))
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    again = ExpressionPredictor(cfg)
    again.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    again.eval()
    assert torch.equal(again.tokenize(["I am so happy today"])[0], model.tokenize(["I am so happy today"])[0])
    assert torch.allclose(again(speech, None, ids, am), model(speech, None, ids, am), atol=1e-6)
    # and through the written components (the path used for checkpoints built from named models)
    model.save_components(tmp_path / "components")
    rebuilt = ExpressionPredictor.load_components(tmp_path / "components", cfg)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval()
    assert torch.allclose(rebuilt(speech, None, ids, am), model(speech, None, ids, am), atol=1e-6)


def test_local_checkpoint_folders_load(tmp_path, inputs):
    """speech_model/text_model given as local folders (what a user's downloaded checkpoint looks like)."""
    model, speech, ids, am, _ = inputs
    model.speech_encoder.save_pretrained(tmp_path / "hubert")
    model.text_encoder.save_pretrained(tmp_path / "roberta")
    model.tokenizer.save_pretrained(tmp_path / "roberta")
    cfg = ExpressionPredictorConfig(
        speech_model=str(tmp_path / "hubert"), text_model=str(tmp_path / "roberta")
    )
    loaded = ExpressionPredictor(cfg).eval()
    model.eval()
    assert torch.allclose(loaded.encode_speech(speech), model.encode_speech(speech), atol=1e-6)
    assert torch.allclose(loaded.encode_text(ids, am), model.encode_text(ids, am), atol=1e-6)
    assert all(not p.requires_grad for p in loaded.speech_encoder.feature_extractor.parameters())
    with pytest.raises(OSError, match="nothing is downloaded"):
        ExpressionPredictor(ExpressionPredictorConfig(speech_model=str(tmp_path / "missing")))


def test_config_presets():
    paper, tiny = ExpressionPredictorConfig.paper(), ExpressionPredictorConfig.tiny()
    assert paper.n_out == 10 and tiny.n_out == 10
    assert paper.speech_model == "facebook/hubert-base-ls960" and paper.text_model == "tae898/emoberta-base"
    assert tiny.speech_model is None and tiny.text_model is None
    assert ExpressionPredictorConfig.from_dict(paper.to_dict()) == paper
    with pytest.raises(ValueError, match="mask_embedding"):
        ExpressionPredictorConfig(mask_embedding="noise")
    with pytest.raises(ValueError, match="unknown keys"):
        ExpressionPredictorConfig.from_dict({"n_outs": 3})
