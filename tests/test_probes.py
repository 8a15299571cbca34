"""mask_kwarg: image rows reach PLoRA whichever way a model's forward takes its family's mask keyword."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from harness.numerics.probes import make_probe, mask_kwarg
from harness.numerics.reference import probe_logits
from harness.synthetic import build_model
from harness.synthetic.modeling.modeling_internlm_xcomposer2 import InternLMXComposer2ForCausalLM


class KwargsForward(InternLMXComposer2ForCausalLM):
    """The real remote code's signature: ``forward(self, input_ids=None, ..., **kwargs)``, im_mask from kwargs."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               im_mask=kwargs.pop("im_mask", None), **kwargs)


def kwargs_model() -> torch.nn.Module:
    model = build_model("ixc2.5")
    model.__class__ = KwargsForward
    return model


def test_named_parameter_and_kwargs_forms_both_get_im_mask():
    model = kwargs_model()
    assert mask_kwarg(build_model("ixc2.5")) == mask_kwarg(model) == "im_mask"
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["wqkv"]))
    assert mask_kwarg(peft_model) == "im_mask"  # looked through the PEFT wrapper
    probe = make_probe(model.get_input_embeddings())
    with_mask = probe_logits(model, probe)  # the detected family's keyword
    assert torch.equal(with_mask, probe_logits(model, probe, mask="im_mask"))
    assert not torch.allclose(with_mask, probe_logits(model, probe, mask=None))  # PLoRA acts on image rows


def test_plain_causal_lm_gets_no_im_mask():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    assert mask_kwarg(LlamaForCausalLM(config)) is None  # **kwargs, but not of a family with a mask keyword


def test_reached_modules_names_what_the_probes_never_run():
    """Probes feed embeddings, not images: a LoRA on the vision tower is never reached, and the run says so."""
    from harness.numerics.probes import reached_modules

    model = build_model("ixc2.5")
    vision = next(n for n, m in model.named_modules() if "vit" in n and isinstance(m, torch.nn.Linear))
    language = next(n for n, _ in model.named_modules() if n.endswith("attention.wqkv"))
    for feed in ("model-embeds", "input_ids"):
        probe = make_probe(model.get_input_embeddings(), image_spans=[] if feed == "input_ids" else None, feed=feed)
        with reached_modules(model, [vision, language]) as reached:
            probe_logits(model, probe)
        assert reached == {language}, feed


def test_model_embeds_probe_embeds_text_rows_with_the_model_under_test():
    """``model-embeds``: an adapted input embedding changes text rows, image rows stay the probe's own vectors."""
    model = build_model("ixc2.5")
    probe = make_probe(model.get_input_embeddings(), image_spans=[(2, 5)], feed="model-embeds")
    from harness.numerics.reference import probe_inputs

    before = probe_inputs(model, probe)["inputs_embeds"].clone()
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    after = probe_inputs(model, probe)["inputs_embeds"]
    assert torch.equal(after[probe.im_mask], before[probe.im_mask])
    assert torch.allclose(after[~probe.im_mask], before[~probe.im_mask] + 1.0)
    assert torch.equal(before, probe.inputs_embeds)  # the base model embeds exactly as the stored probe


def test_probe_holds_the_trainable_token_ids_on_real_text_rows():
    """Trainable tokens change only their own rows of the embedding: the probe must hold those ids (a random draw
    of 16 ids from ~120 often misses three), on text rows that are not padding, with other ids left between them."""
    embedding = torch.nn.Embedding(128, 8)
    kwargs = dict(batch_size=2, seq_len=16, left_padding=[0, 3], seed=1234)
    plain = make_probe(embedding, image_spans=[(4, 11)], feed="model-embeds", **kwargs)
    probe = make_probe(embedding, image_spans=[(4, 11)], feed="model-embeds", token_ids=[3, 5, 7, 500], **kwargs)
    placed = probe.input_ids != plain.input_ids
    assert set(probe.input_ids[placed].tolist()) == {3, 5, 7}  # 500 is outside the vocab: left out
    assert not (placed & ~probe.text_rows).any()  # never on image rows or padding
    assert (probe.text_rows & ~placed).sum(dim=1).min() > 0  # the random ids stay too
    text = make_probe(embedding, image_spans=[], feed="input_ids", token_ids=[3, 5, 7], **kwargs)
    assert {3, 5, 7} <= set(text.input_ids[text.attention_mask.bool()].tolist())
    assert "token_ids=[3, 5, 7]" in text.description
