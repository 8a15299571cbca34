"""The layer-kind table (``harness.model.layer_kinds``) against PEFT itself, kind by kind.

PEFT is the oracle here: for a Linear, a transformers Conv1D and an Embedding wrapped by PEFT's LoRA (DoRA and
``lora_bias`` where the installed PEFT has them), the table's ΔW, merged weight and merged bias must equal what
``merge_and_unload`` produces, and the reference folded by hand must equal PEFT's unmerged forward. A config with
the wrong ``fan_in_fan_out`` changes nothing: PEFT goes by the module type, and so does the table.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from transformers.pytorch_utils import Conv1D

from harness.model.layer_kinds import (
    CONV1D,
    EMBEDDING,
    LINEAR,
    TOKENS,
    Dims,
    fan_in_fan_out_correction,
    kind_of_module,
    kind_of_parts,
)
from harness.numerics.reference import apply_adapter_reference, expected_deltas, layer_kinds_of

PEFT_FIELDS = {f.name for f in dataclasses.fields(LoraConfig)}
HAS_DORA = "use_dora" in PEFT_FIELDS
HAS_LORA_BIAS = "lora_bias" in PEFT_FIELDS
NO_TOKENS = pytest.mark.skipif("trainable_token_indices" not in PEFT_FIELDS,
                               reason="this PEFT has no trainable_token_indices (peft >= 0.15)")
VOCAB, HIDDEN, OUT = 11, 6, 7


class Tiny(torch.nn.Module):
    """One module of each kind: emb [vocab, hidden], lin (nn.Linear [out, in]), conv (Conv1D [in, out])."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, HIDDEN)
        self.lin = torch.nn.Linear(HIDDEN, OUT)
        self.conv = Conv1D(OUT, HIDDEN)  # transformers' Conv1D(nf=out, nx=in): weight [in, out]
        torch.nn.init.normal_(self.conv.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.emb(ids)
        return torch.cat([self.lin(hidden), self.conv(hidden)], dim=-1)


def peft_tiny(targets: list[str], **config) -> tuple[torch.nn.Module, torch.nn.Module, dict, dict]:
    """(base, PEFT model with random non-zero LoRA weights, saved config, saved tensors)."""
    base = Tiny().eval()
    lora = LoraConfig(r=3, lora_alpha=6, target_modules=targets, init_lora_weights=False, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own fan_in_fan_out correction warning, asserted below
        model = get_peft_model(copy.deepcopy(base), lora).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    saved = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return base, model, {**lora.to_dict(), "target_modules": targets}, saved


IDS = torch.tensor([[1, 4, 7, 10, 2]])
VARIANTS = [pytest.param({}, id="lora")]
NO_DORA = [] if HAS_DORA else [pytest.mark.skip(reason="this PEFT has no DoRA (peft >= 0.9)")]
VARIANTS.append(pytest.param({"use_dora": True}, id="dora", marks=NO_DORA))


@pytest.mark.parametrize("variant", VARIANTS)
def test_table_matches_peft_merge_for_every_kind(variant):
    """ΔW orientation, DoRA renormalisation and merged weight per kind equal PEFT's merge_and_unload, even with
    fan_in_fan_out=False in the config (PEFT corrects it for the Conv1D; the table never read it)."""
    base, model, config, saved = peft_tiny(["emb", "lin", "conv"], fan_in_fan_out=False, **variant)
    deltas = expected_deltas(config, saved, kinds=layer_kinds_of(base))
    assert {m: d.kind for m, d in deltas.items()} == {"emb": EMBEDDING, "lin": LINEAR, "conv": CONV1D}
    merged = model.merge_and_unload()
    for name, delta in deltas.items():
        want = getattr(merged, name).weight.detach()
        got = delta.merged_weight(getattr(base, name).weight.detach())
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_fold_is_peft_unmerged_forward(variant):
    base, model, config, saved = peft_tiny(["emb", "lin", "conv"], **variant)
    reference = copy.deepcopy(base)
    changed = apply_adapter_reference(reference, config, saved)
    assert sorted(changed) == ["conv", "emb", "lin"]
    with torch.no_grad():
        torch.testing.assert_close(reference(IDS), model(IDS), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_LORA_BIAS, reason="this PEFT has no lora_bias (peft >= 0.14)")
def test_lora_bias_merges_into_the_base_bias():
    base, model, config, saved = peft_tiny(["lin", "conv"], lora_bias=True)
    assert any(k.endswith("lora_B.bias") for k in saved)
    deltas = expected_deltas(config, saved, kinds=layer_kinds_of(base))
    merged = model.merge_and_unload()
    for name, delta in deltas.items():
        want = getattr(merged, name).bias.detach()
        torch.testing.assert_close(getattr(base, name).bias.detach() + delta.bias_delta, want, msg=name)
    reference = copy.deepcopy(base)
    apply_adapter_reference(reference, config, saved)
    with torch.no_grad():
        torch.testing.assert_close(reference(IDS), merged(IDS), rtol=1e-5, atol=1e-6)


def _with_trained_tokens(base: torch.nn.Module, targets: list[str], indices) -> tuple[torch.nn.Module, dict, dict]:
    """(PEFT model with LoRA on ``targets`` and trainable tokens ``indices``, both trained at random; config; saved)."""
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False,
                      trainable_token_indices=indices)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base), lora).eval()
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "trainable_tokens_delta" in name:
                param.add_(torch.randn_like(param) * 0.3)
    saved = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return model, {**lora.to_dict(), "target_modules": targets}, saved


@NO_TOKENS
@pytest.mark.parametrize("tied", [False, True], ids=["dict-untied", "list-tied-head"])
def test_trainable_tokens_are_rows_written_over_the_weight(tied):
    """The saved trainable_tokens_delta holds the new rows (not a difference): the merged weight is the base with
    those rows replaced, and the reference (rows written into the embedding; a tied head shares them, as PEFT ties
    its token adapter) equals PEFT's unmerged forward."""
    if tied:
        base, indices, ids = _tiny_hf("gpt2", n_embd=16, n_layer=1, n_head=2, n_positions=32, vocab_size=40), [3, 9], \
            torch.tensor([[3, 1, 9, 4, 3]])
        embedding, targets = "transformer.wte", ["c_attn"]
    else:
        base, indices, ids, embedding, targets = Tiny().eval(), {"emb": [1, 7]}, IDS, "emb", ["lin"]
    model, config, saved = _with_trained_tokens(base, targets, indices)
    key = next(k for k in saved if k.endswith(".token_adapter.trainable_tokens_delta"))
    assert key == f"base_model.model.{embedding}.token_adapter.trainable_tokens_delta"
    rows = saved[key]
    rows_at = [3, 9] if tied else [1, 7]
    assert tuple(rows.shape) == TOKENS.rows_shape(rows_at, rows.shape[1])
    reference = copy.deepcopy(base)
    changed = apply_adapter_reference(reference, config, saved)
    assert embedding in changed
    with torch.no_grad():
        want = model(ids)
        got = reference(ids)
        torch.testing.assert_close(getattr(got, "logits", got), getattr(want, "logits", want), rtol=1e-5, atol=1e-6)
    base_weight = base.get_submodule(embedding).weight.detach()
    merged = model.merge_and_unload()
    torch.testing.assert_close(TOKENS.merged_weight(base_weight, rows_at, rows),
                               merged.get_submodule(embedding).weight.detach())
    if tied:  # the head still shares the weight, now with the trained rows
        assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight


def test_token_index_rule():
    assert TOKENS.index_problem([3, 5], 8) is None and TOKENS.index_problem([3, 5], None) is None
    assert "[8]" in TOKENS.index_problem([3, 8], 8)  # outside the vocab
    assert "[-1]" in TOKENS.index_problem([-1], None)
    assert "repeat" in TOKENS.index_problem([2, 2], None)
    assert "not a non-empty list" in TOKENS.index_problem([], None)


def test_shape_rule_per_kind():
    dims = Dims(in_features=HIDDEN, out_features=OUT)
    assert LINEAR.weight_shape(dims) == (OUT, HIDDEN) and CONV1D.weight_shape(dims) == (HIDDEN, OUT)
    assert LINEAR.lora_shapes(dims, 3)["lora_A"] == (3, HIDDEN) == CONV1D.lora_shapes(dims, 3)["lora_A"]
    vocab = Dims(in_features=VOCAB, out_features=HIDDEN)
    assert EMBEDDING.weight_shape(vocab) == (VOCAB, HIDDEN)
    assert EMBEDDING.lora_shapes(vocab, 3) == {"lora_embedding_A": (3, VOCAB), "lora_embedding_B": (HIDDEN, 3),
                                               "lora_magnitude_vector": (HIDDEN,)}
    assert CONV1D.dims_from_weight((HIDDEN, OUT)) == dims == LINEAR.dims_from_weight((OUT, HIDDEN))


def test_kind_comes_from_the_module_type():
    tiny = Tiny()
    assert [kind_of_module(m) for m in (tiny.emb, tiny.lin, tiny.conv, tiny)] == [EMBEDDING, LINEAR, CONV1D, None]
    assert kind_of_parts(["lora_embedding_A", "lora_embedding_B"]) is EMBEDDING
    assert kind_of_parts(["lora_A", "lora_B"]) is LINEAR  # Conv1D saves the same parts: only the base tells


def test_fan_in_fan_out_correction_says_what_peft_does():
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["conv"], fan_in_fan_out=False))
    assert "Setting fan_in_fan_out to True" in fan_in_fan_out_correction(CONV1D, False)
    assert "Setting fan_in_fan_out to False" in fan_in_fan_out_correction(LINEAR, True)
    assert fan_in_fan_out_correction(CONV1D, True) is None and fan_in_fan_out_correction(LINEAR, False) is None
    assert fan_in_fan_out_correction(EMBEDDING, False) is None  # PEFT's Embedding always transposes


# ---------------------------------------------------------------------------------------------
# The base's module tree: kinds and dims, ties, checkpoint keys (harness.model.structure)


def _tiny_hf(model_type: str, **config):
    from transformers import AutoConfig, AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).eval()


def test_module_tree_reads_conv1d_as_in_out_and_records_ties():
    from harness.model.structure import describe_model

    gpt2 = _tiny_hf("gpt2", n_embd=16, n_layer=1, n_head=2, n_positions=32, vocab_size=40)
    info = describe_model(gpt2)
    kind, dims = info.layer("transformer.h.0.attn.c_attn")
    assert kind is CONV1D and dims == Dims(16, 48)  # weight [16, 48]: in 16, out 3·16
    assert info.modules["transformer.h.0.attn.c_attn"].is_linear  # PEFT's "all-linear" includes Conv1D
    assert info.layer("transformer.wte") == (EMBEDDING, Dims(40, 16))
    assert info.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert info.tied_partners("transformer.wte.weight") == ["lm_head.weight"]
    assert info.checkpoint_key("lm_head.weight") == "transformer.wte.weight"
    assert info.input_embedding == "transformer.wte" and info.output_head == "lm_head"


def test_checkpoint_keys_follow_the_models_own_save_names(tmp_path):
    """GPT-NeoX's head: transformers 5 names the module lm_head and saves embed_out.weight; 4.x names both
    embed_out. Either way the key ``save_pretrained`` writes is the one the tree records."""
    from safetensors import safe_open

    from harness.model.structure import describe_model

    neox = _tiny_hf("gpt_neox", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=40, tie_word_embeddings=False)
    head = next(n for n, m in neox.named_modules() if m is neox.get_output_embeddings())
    neox.save_pretrained(tmp_path, safe_serialization=True)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as saved:
        keys = set(saved.keys())
    info = describe_model(neox)
    assert info.own_key(f"{head}.weight") in keys
    assert {info.own_key(n) for n, _ in neox.named_parameters()} <= keys  # (4.33 also saves rotary buffers)
