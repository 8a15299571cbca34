"""The fp32 reference and the tolerance policy, checked on their own (PEFT used only as an oracle here)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from peft.tuners.lora import LoraLayer
from test_properties_merge import Scenario, adapter_of, base_model, peft_model, prop_settings, scenarios  # noqa: E402

from fixtures.judging import build_reference, compare_module_deltas, greedy_tokens
from harness.numerics.compare import compare
from harness.numerics.probes import make_probe
from harness.numerics.reference import ModuleDelta, apply_adapter_reference, expected_deltas, probe_logits
from harness.numerics.tolerances import TOLERANCE_TABLE, policy_for, tolerance_for

torch.set_num_threads(1)


@prop_settings(25)
@given(sc=scenarios(dtypes=("float32",), masks=("spans",)))
def test_expected_deltas_match_peft_scaling_and_delta(sc: Scenario) -> None:
    """alpha/r, rsLoRA alpha/sqrt(r), rank_pattern, alpha_pattern: the hand-made ΔW is PEFT's, module by module."""
    model = peft_model(sc)
    config, tensors = adapter_of(model)
    deltas = expected_deltas(config, tensors)
    layers = {n.replace("base_model.model.", "", 1): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert set(deltas) == set(layers)
    for name, layer in layers.items():
        want = deltas[name]
        assert want.rank == layer.r["default"], name
        assert math.isclose(want.scaling, layer.scaling["default"], rel_tol=1e-12), (name, want.scaling, layer.scaling)
        torch.testing.assert_close(want.delta, layer.get_delta_weight("default").float(), rtol=1e-5, atol=1e-6)


def test_scaling_rules_by_hand() -> None:
    a, b = torch.ones(4, 3), torch.ones(5, 4)
    tensors = {"base_model.model.m.layers.0.attention.wqkv.lora_A.weight": a,
               "base_model.model.m.layers.0.attention.wqkv.lora_B.weight": b,
               "base_model.model.m.layers.0.attention.wo.lora_A.weight": a[:2],
               "base_model.model.m.layers.0.attention.wo.lora_B.weight": b[:, :2]}
    plain = expected_deltas({"r": 4, "lora_alpha": 8}, tensors)
    assert plain["m.layers.0.attention.wqkv"].scaling == 2.0
    assert plain["m.layers.0.attention.wo"].scaling == 4.0  # the saved rank (2) wins over r
    rs = expected_deltas({"r": 4, "lora_alpha": 8, "use_rslora": True}, tensors)
    assert rs["m.layers.0.attention.wqkv"].scaling == 4.0  # 8 / sqrt(4)
    patterned = expected_deltas({"r": 4, "lora_alpha": 8, "rank_pattern": {"wo": 2}, "alpha_pattern": {"wqkv": 2}},
                                tensors)
    assert patterned["m.layers.0.attention.wqkv"].scaling == 0.5
    assert patterned["m.layers.0.attention.wo"].scaling == 4.0
    torch.testing.assert_close(plain["m.layers.0.attention.wqkv"].delta, torch.full((5, 3), 8.0))


def test_reference_touches_only_target_weights(default_bundle) -> None:
    from harness.loading.base import load_base

    reference = build_reference(default_bundle.base_dir, default_bundle.adapter_dir)
    base = load_base(default_bundle.base_dir, dtype=torch.float32)
    got, want = reference.model.state_dict(), base.state_dict()
    changed = {k for k in want if not torch.equal(got[k], want[k])}
    assert changed == {f"{m}.weight" for m in reference.deltas}
    assert not any(".Plora_" in k or k.startswith("plora_") for k in changed)
    assert all(".lora_" not in k for k in got)  # a plain model, no PEFT wrappers
    assert set(reference.base_state) == changed
    assert next(reference.model.parameters()).dtype == torch.float32 and not reference.model.training


def test_apply_adapter_reference_skips_modules_the_base_lacks() -> None:
    model = base_model(Scenario())
    tensors = {"base_model.model.nowhere.lora_A.weight": torch.ones(2, 3),
               "base_model.model.nowhere.lora_B.weight": torch.ones(3, 2)}
    assert apply_adapter_reference(model, {"r": 2, "lora_alpha": 2}, tensors) == []


# ---------------------------------------------------------------------------------------------
# Tolerance policy


def test_tolerance_table_is_documented_and_ordered() -> None:
    assert set(TOLERANCE_TABLE) == {"float32", "bfloat16", "float16"}
    for name, policy in TOLERANCE_TABLE.items():
        dtype = getattr(torch, name)
        assert policy.why and policy.atol > 0 and policy.weight_eps >= torch.finfo(dtype).eps
        assert tolerance_for(dtype) == tolerance_for(name) == policy.rel
        assert policy.merged_rel >= torch.finfo(dtype).eps  # merged weights: a few roundings of the dtype
        assert policy.rel < 0.1  # a doubled scaling moves logits by O(0.1-1): always caught at fp32, visible above
    assert tolerance_for(torch.float32) < tolerance_for(torch.float16) < tolerance_for(torch.bfloat16)
    assert policy_for(torch.float64) == TOLERANCE_TABLE["float32"]


# ---------------------------------------------------------------------------------------------
# compare(): row classes, worst position, padding, NaN


@pytest.fixture
def probe():
    embedding = torch.nn.Embedding(32, 8)
    return make_probe(embedding, batch_size=2, seq_len=6, image_spans=[(2, 4)], left_padding=[0, 1], seed=0)


def test_compare_separates_image_and_text_rows(probe) -> None:
    ref = torch.randn(2, 6, 5)
    got = ref.clone()
    got[1, 5, 3] += 0.5  # a text row
    result = compare(got, ref, probe, dtype=torch.float32, label="pathX")
    assert not result.ok
    assert result.image_max_abs == 0.0 and result.text_max_abs == pytest.approx(0.5)
    assert result.worst_row == ("text", 1, 5)
    summary = result.summary()
    assert summary.startswith("pathX:") and "text row batch 1 position 5" in summary and "OUTSIDE" in summary
    got = ref.clone()
    got[0, 3, 0] -= 0.5  # an image row
    result = compare(got, ref, probe, dtype=torch.float32, label="pathY")
    assert result.worst_row == ("image", 0, 3) and result.text_max_abs == 0.0 and not result.ok


def test_compare_ignores_padding_and_fails_on_nan(probe) -> None:
    ref = torch.randn(2, 6, 5)
    got = ref.clone()
    got[1, 0] = 1e6  # padding (left_padding=[0, 1])
    assert compare(got, ref, probe, dtype=torch.float32, label="pad").ok
    got[0, 1, 0] = float("nan")
    assert not compare(got, ref, probe, dtype=torch.float32, label="nan").ok


def test_compare_uses_the_dtype_policy(probe) -> None:
    ref = torch.ones(2, 6, 5)
    got = ref + 3e-3  # bf16-sized rounding: within bf16, outside fp32
    assert compare(got, ref, probe, dtype=torch.bfloat16, label="bf16").ok
    assert not compare(got, ref, probe, dtype=torch.float32, label="fp32").ok


# ---------------------------------------------------------------------------------------------
# compare_module_deltas(): names the worst module and layer


def test_compare_module_deltas_names_the_bad_module() -> None:
    sc = Scenario(layers=2)
    model = peft_model(sc)
    config, tensors = adapter_of(model)
    base = base_model(sc)
    base_state = base.state_dict()
    expected = expected_deltas(config, tensors)
    good = compare_module_deltas(model, base_state, expected, label="peft")
    assert good.ok, good.summary()
    merged = model.merge_and_unload()
    assert compare_module_deltas(merged, base_state, expected, label="merged").ok
    with torch.no_grad():
        merged.model.layers[1].feed_forward.w2.weight.add_(expected["model.layers.1.feed_forward.w2"].delta * 0.5)
    bad = compare_module_deltas(merged, base_state, expected, label="merged")
    assert not bad.ok
    assert bad.worst_module == "model.layers.1.feed_forward.w2" and bad.worst_layer == 1
    assert bad.worst_error == pytest.approx(0.5, rel=1e-3)
    assert "model.layers.1.feed_forward.w2 (layer 1)" in bad.summary()


def test_compare_module_deltas_reports_missing_modules() -> None:
    sc = Scenario()
    expected = {"model.layers.9.attention.wo": ModuleDelta("model.layers.9.attention.wo", torch.ones(2, 2), 1.0, 1)}
    result = compare_module_deltas(base_model(sc), base_model(sc).state_dict(), expected)
    assert not result.ok and result.missing == ["model.layers.9.attention.wo"]


def test_module_delta_dora_rescales_rows() -> None:
    base = torch.randn(4, 3)
    delta = ModuleDelta("m", torch.zeros(4, 3), 1.0, 1, magnitude=torch.full((4,), 2.0))
    merged = delta.merged_weight(base)
    torch.testing.assert_close(merged.norm(dim=1), torch.full((4,), 2.0))


def test_greedy_tokens_shape_and_determinism() -> None:
    sc = Scenario()
    model = peft_model(sc)
    probe = make_probe(model.get_input_embeddings(), batch_size=2, seq_len=6, image_spans=[(1, 3)], seed=2)
    first = greedy_tokens(model, probe, max_new_tokens=3)
    assert first.shape == (2, 3) and first.dtype == torch.long
    assert torch.equal(first, greedy_tokens(model, probe, max_new_tokens=3))
    assert torch.equal(first[:, 0], probe_logits(model, probe)[:, -1].argmax(-1))


# ---------------------------------------------------------------------------------------------
# What PEFT will apply (harness.numerics.applied): the reference and merged-matches read adapters through it


def _plan(config: dict, tensors: dict, **where):
    from harness.numerics.applied import plan_adapter

    return plan_adapter(config, tensors, lambda key: tensors[key].shape, **where)


def test_plan_applies_only_what_peft_loads() -> None:
    from harness.model.layer_kinds import EMBEDDING, LINEAR

    p = "base_model.model."
    tensors = {f"{p}m.q.lora_A.weight": torch.ones(2, 4), f"{p}m.q.lora_B.weight": torch.ones(3, 2),
               f"{p}m.v.lora_A.weight": torch.ones(2, 4), f"{p}m.v.lora_B.weight": torch.ones(3, 2),
               f"{p}m.emb.lora_A.weight": torch.ones(2, 4), f"{p}m.emb.lora_B.weight": torch.ones(3, 2),
               f"{p}lm_head.weight": torch.ones(5, 4), f"{p}score.weight": torch.ones(2, 4),
               f"{p}m.k.lora_A.default.weight": torch.ones(2, 4)}
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["q", "emb"], "modules_to_save": ["lm_head"]}
    kinds = {"m.q": LINEAR, "m.v": LINEAR, "m.k": LINEAR, "m.emb": EMBEDDING, "lm_head": LINEAR, "score": LINEAR}
    plan = _plan(config, tensors, kinds=kinds, targets={"m.q", "m.emb"})
    assert [(m.module, m.kind, m.rank, m.scaling) for m in plan.lora] == [("m.q", LINEAR, 2, 2.0)]
    assert [(c.param, c.role) for c in plan.copies] == [("lm_head.weight", "modules_to_save")]
    why = plan.ignored
    assert "target_modules does not name" in why[f"{p}m.v.lora_A.weight"]
    assert "saved as lora_embedding_A/lora_embedding_B" in why[f"{p}m.emb.lora_A.weight"]
    assert "modules_to_save" in why[f"{p}score.weight"] or "not applied" in why[f"{p}score.weight"]
    assert "adapter name 'default'" in why[f"{p}m.k.lora_A.default.weight"]
    assert any("target_modules does not name" in line for line in plan.notes(limit=10))


def test_plan_applies_trainable_tokens_where_the_config_puts_them() -> None:
    """A list of trainable_token_indices goes to the input embedding, a dict to the modules it names (as
    modules_to_save names them); rows for any other module, or with no indices in the config, are not applied."""
    from harness.model.layer_kinds import EMBEDDING, LINEAR

    p, part = "base_model.model.", "token_adapter.trainable_tokens_delta"
    tensors = {f"{p}m.emb.{part}": torch.ones(3, 4), f"{p}lm_head.{part}": torch.ones(2, 4),
               f"{p}m.q.lora_A.weight": torch.ones(2, 4), f"{p}m.q.lora_B.weight": torch.ones(3, 2)}
    kinds = {"m.emb": EMBEDDING, "m.q": LINEAR, "lm_head": LINEAR}
    config = {"r": 2, "lora_alpha": 2, "target_modules": ["q"], "trainable_token_indices": [3, 5, 7]}
    plan = _plan(config, tensors, kinds=kinds, input_embedding="m.emb")
    assert [(t.module, t.indices, t.weight) for t in plan.tokens] == [("m.emb", (3, 5, 7), "m.emb.weight")]
    assert "input embedding m.emb only" in plan.ignored[f"{p}lm_head.{part}"]
    plan = _plan({**config, "trainable_token_indices": {"emb": [3, 5, 7], "lm_head": [1, 2]}}, tensors, kinds=kinds,
                 input_embedding="m.emb")
    assert sorted((t.module, t.indices) for t in plan.tokens) == [("lm_head", (1, 2)), ("m.emb", (3, 5, 7))]
    plan = _plan({**config, "trainable_token_indices": [3, 5]}, tensors, kinds=kinds, input_embedding="m.emb")
    assert not plan.tokens and "expected [2, 4] (one row per token index" in plan.ignored[f"{p}m.emb.{part}"]
    plan = _plan({k: v for k, v in config.items() if k != "trainable_token_indices"}, tensors, kinds=kinds)
    assert not plan.tokens and "not set" in plan.ignored[f"{p}m.emb.{part}"]


def test_reference_writes_trainable_token_rows_into_a_tied_embedding_and_head() -> None:
    """The saved rows replace those rows of the embedding; with tied embeddings PEFT ties the head's token adapter,
    so the head sees the same rows (the tie is kept, unlike LoRA on a tied embedding)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt2", n_embd=8, n_layer=1, n_head=2, n_positions=16, vocab_size=20)).eval()
    base = model.transformer.wte.weight.detach().clone()
    rows = torch.full((2, 8), 0.5)
    changed = apply_adapter_reference(model, {"r": 2, "lora_alpha": 2, "trainable_token_indices": [4, 9]},
                                      {"base_model.model.transformer.wte.token_adapter.trainable_tokens_delta": rows})
    assert changed == ["transformer.wte"]
    want = base.clone()
    want[[4, 9]] = 0.5
    assert torch.equal(model.transformer.wte.weight, want) and model.lm_head.weight is model.transformer.wte.weight
    notes: list[str] = []
    wide = {"base_model.model.transformer.wte.token_adapter.trainable_tokens_delta": torch.ones(2, 9)}
    assert apply_adapter_reference(model, {"r": 2, "lora_alpha": 2, "trainable_token_indices": [4, 9]}, wide,
                                   notes=notes) == []
    assert notes and "expected [2, 8] (one row as wide as the weight [20, 8]" in notes[0]


def test_reference_ignores_tensors_of_untargeted_modules() -> None:
    model = base_model(Scenario())
    name = next(n for n, m in model.named_modules() if n.endswith("attention.wo"))
    weight = dict(model.named_modules())[name].weight
    tensors = {f"base_model.model.{name}.lora_A.weight": torch.ones(2, weight.shape[1]),
               f"base_model.model.{name}.lora_B.weight": torch.ones(weight.shape[0], 2)}
    notes: list[str] = []
    assert apply_adapter_reference(model, {"r": 2, "lora_alpha": 2, "target_modules": ["wqkv"]}, tensors,
                                   notes=notes) == []
    assert notes and "target_modules does not name" in notes[0]
    assert apply_adapter_reference(model, {"r": 2, "lora_alpha": 2, "target_modules": ["wo"]}, tensors) == [name]


def test_reference_unties_a_tied_embedding_it_changes() -> None:
    """LoRA on a tied input embedding: PEFT's unmerged model changes the input side only, so must the reference."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt2", n_embd=8, n_layer=1, n_head=2, n_positions=16, vocab_size=20)).eval()
    head_before = model.lm_head.weight.detach().clone()
    tensors = {"base_model.model.transformer.wte.lora_embedding_A": torch.ones(2, 20),
               "base_model.model.transformer.wte.lora_embedding_B": torch.ones(8, 2)}
    changed = apply_adapter_reference(model, {"r": 2, "lora_alpha": 2, "target_modules": ["wte"]}, tensors)
    assert changed == ["transformer.wte"]
    assert torch.equal(model.lm_head.weight, head_before)
    assert torch.equal(model.transformer.wte.weight, head_before + 2.0)  # ΔE = s·(B@A)ᵀ: r=2 ones, s=1


# ---------------------------------------------------------------------------------------------
# Non-finite values: loaded NaN is loaded, NaN outputs are named by module, no placeholder positions


def test_a_loaded_nan_is_loaded() -> None:
    from harness.loading.records import same_values

    a = torch.tensor([1.0, float("nan"), 3.0])
    assert same_values(a, a.clone()) and not torch.equal(a, a.clone())
    assert not same_values(a, torch.tensor([1.0, 2.0, 3.0]))
    assert not same_values(a, torch.tensor([1.0, float("nan")]))


def test_first_non_finite_module_is_named(probe) -> None:
    from harness.numerics.reference import first_non_finite_module

    sc = Scenario(layers=2)
    model = base_model(sc)
    probe_ = make_probe(model.get_input_embeddings(), batch_size=2, seq_len=6, image_spans=[(2, 4)], seed=0)
    assert first_non_finite_module(model, probe_) is None
    with torch.no_grad():
        model.model.layers[1].feed_forward.w3.weight[0, 0] = float("nan")
    assert first_non_finite_module(model, probe_) == "model.layers.1.feed_forward.w3"
    logits = probe_logits(model, probe_)
    result = compare(logits, logits.nan_to_num(), probe_, dtype=torch.float32, label="p",
                     non_finite="first produced by model.layers.1.feed_forward.w3")
    assert not result.ok and result.summary().startswith("p: non-finite outputs")
    assert "model.layers.1.feed_forward.w3" in result.summary()


def test_compare_names_no_placeholder_position(probe) -> None:
    """A NaN reference (no finite scale) still gives a position, or none at all: never 'none row batch -1'."""
    ref = torch.full((2, 6, 5), float("nan"))
    result = compare(torch.zeros(2, 6, 5), ref, probe, dtype=torch.float32, label="x")
    assert not result.ok
    assert "-1" not in result.summary() and "none" not in result.summary()
    got = torch.zeros(2, 6, 5)
    got[0, 2, 0] = float("inf")
    auto = compare(got, torch.zeros(2, 6, 5), probe, dtype=torch.float32, label="y")
    assert not auto.ok and auto.non_finite == "source not located" and "non-finite outputs" in auto.summary()


def test_reference_modules_to_save_on_a_tied_embedding_keeps_the_head() -> None:
    """modules_to_save=[wte] on tied embeddings: PEFT trains a copy of the embedding; the head keeps the base."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt2", n_embd=8, n_layer=1, n_head=2, n_positions=16, vocab_size=20)).eval()
    base = model.transformer.wte.weight.detach().clone()
    trained = base + 0.5
    changed = apply_adapter_reference(model, {"r": 2, "lora_alpha": 2, "modules_to_save": ["wte"]},
                                      {"base_model.model.transformer.wte.weight": trained})
    assert changed == ["transformer.wte.weight"]
    assert torch.equal(model.transformer.wte.weight, trained) and torch.equal(model.lm_head.weight, base)


def _wo(model):
    name = next(n for n, m in model.named_modules() if n.endswith("attention.wo"))
    return name, dict(model.named_modules())[name]


def test_a_lora_bias_on_a_layer_without_bias_folds_the_weight_only_and_says_so() -> None:
    model = base_model(Scenario())
    name, module = _wo(model)
    if module.bias is not None:
        module.bias = None
    before = module.weight.detach().clone()
    a, b = torch.full((2, before.shape[1]), 0.5), torch.full((before.shape[0], 2), 0.25)
    tensors = {f"base_model.model.{name}.lora_A.weight": a, f"base_model.model.{name}.lora_B.weight": b,
               f"base_model.model.{name}.lora_B.bias": torch.ones(before.shape[0])}
    notes: list[str] = []
    assert apply_adapter_reference(model, {"r": 2, "lora_alpha": 4, "target_modules": ["wo"], "lora_bias": True},
                                   tensors, notes=notes) == [name]
    assert module.bias is None
    torch.testing.assert_close(module.weight.detach(), before + 2.0 * (b @ a))
    assert f"reference: {name}: lora_B.bias but the base layer has no bias (PEFT refuses to merge it)" in notes


def test_a_delta_that_does_not_fit_its_weight_is_noted_and_left_out() -> None:
    model = base_model(Scenario())
    name, module = _wo(model)
    out_features, in_features = module.weight.shape
    tensors = {f"base_model.model.{name}.lora_A.weight": torch.ones(2, in_features + 1),
               f"base_model.model.{name}.lora_B.weight": torch.ones(out_features, 2)}
    notes: list[str] = []
    before = module.weight.detach().clone()
    assert apply_adapter_reference(model, {"r": 2, "lora_alpha": 2, "target_modules": ["wo"]}, tensors,
                                   notes=notes) == []
    assert torch.equal(module.weight.detach(), before)
    assert any(line.startswith(f"reference: {name}: ΔW [{out_features}, {in_features + 1}] does not fit its ")
               and line.endswith("PEFT cannot load it either (see base-match)") for line in notes), notes
