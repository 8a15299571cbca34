"""``merged-matches`` on the zoo's tiny architectures, called directly (milliseconds a case), so the mutation run
(scripts/mutation-test.sh) can judge the ``_Merge`` comparison: modules_to_save copies, trainable tokens (untied and
tied), tied pairs the adapter changes on one side, lora_bias, DoRA, Conv1D without a module tree, saved base
overrides (bias="all"), ΔW below the dtype's resolution, and what the report says for each (message, fix, details).
test_merged_verdicts.py covers the XComposer cases (scaling, PLoRA, missing tensors) on the cached official merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file, save_file

from fixtures import zoo
from harness import compat
from harness.checks.context import CheckContext
from harness.checks.registry import get_check, run_check
from harness.inputs.adapter_dir import read_adapter
from harness.model.structure import inspect_base

# Written against the current stack's behaviour (the mutation run's); the oldest stack differs in the marked tests:
# PEFT 0.8.2 refuses config fields it does not know and has no DoRA, transformers 4.33 keeps or omits the tie flag.
OLDEST_STACK = Version(str(compat.PEFT_VERSION)) < Version("0.14")
CURRENT_STACK_ONLY = pytest.mark.skipif(OLDEST_STACK, reason=f"PEFT {compat.PEFT_VERSION}: the oldest stack behaves "
                                        "differently here (see OLDEST_STACK)")

_BUILT: dict = {}


@pytest.fixture(scope="module")
def arch(synthetic_cache):
    """``arch(name, kind=None)`` → (the built zoo architecture, its base inspected once); skips where the
    installed transformers or PEFT lacks it."""

    def get(name: str, kind: str | None = None):
        if reason := zoo.arch_unavailable(name) or (kind and zoo.feature_unavailable(kind)):
            pytest.skip(reason)
        if name not in _BUILT:
            built = zoo.build_arch(name, synthetic_cache)
            _BUILT[name] = (built, inspect_base(built.base))
        return _BUILT[name]

    return get


def verdict(adapter: Path, info, merged: Path, progress=None):
    ctx = CheckContext(adapter=read_adapter(adapter), base=info, merged=merged, progress=progress)
    return run_check(get_check("merged-matches"), ctx)


def edited(src: Path, out: Path, change=None, config=None) -> Path:
    """A copy of model or adapter directory ``src`` with its safetensors and/or its JSON config changed."""
    out = Path(shutil.copytree(src, out))
    if change is not None:
        path = next(out.glob("*.safetensors"))
        tensors = load_file(path)
        change(tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    if config is not None:
        path = out / ("adapter_config.json" if (out / "adapter_config.json").exists() else "config.json")
        data = json.loads(path.read_text())
        config(data)
        path.write_text(json.dumps(data))
    return out


def base_tensors(built) -> dict:
    return load_file(built.base / "model.safetensors")


def noise_like(t: torch.Tensor, scale: float, seed: int = 0) -> torch.Tensor:
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)) * scale


# ---------------------------------------------------------------------------------------------
# the official merges pass, and say so with the tensor count and the progress line


@pytest.mark.parametrize("name, kind", [("llama", "modules_to_save"), ("llama", "tokens"), ("llama", "dora"),
                                        ("opt", "tokens"), ("opt", "lora_bias"), ("gpt2", "modules_to_save")])
def test_official_merges_of_every_feature_pass(arch, name, kind):
    if (name, kind) == ("gpt2", "modules_to_save") and OLDEST_STACK:
        pytest.skip("transformers 4.33's merge keeps GPT-2's tie flag true, so the head copy is lost on reload: "
                    "merged-matches fails it, rightly")
    built, info = arch(name, kind)
    said = []
    got = verdict(built.adapter(kind), info, built.merged(kind), progress=said.append)
    assert got.status == "pass", got.message
    n = len(load_file(built.merged(kind) / "model.safetensors"))
    assert got.message == f"{n} tensors match base + adapter (max rel error {got.details['max_rel_error']:.1e})"
    assert said == ["comparing the merged checkpoint with base + adapter, tensor by tensor"]
    assert got.details["problems"] == [] and got.details["max_rel_error"] < 1e-5
    if got.details["max_rel_error"] == 0:  # an exact merge names no worst tensor
        assert got.details["worst_tensor"] == ""


# ---------------------------------------------------------------------------------------------
# modules_to_save: the trained copy, not the base


def test_a_dropped_modules_to_save_copy_is_named(arch):
    built, info = arch("llama")
    got = verdict(built.adapter("modules_to_save"), info, built.broken("modules-to-save-dropped"))
    assert got.status == "fail"
    assert got.message == ("1 trained modules_to_save tensor(s) not merged, e.g. lm_head.weight (modules_to_save "
                           "lm_head: the base value, not the trained copy)")
    assert got.details["copies_dropped"] == ["lm_head.weight (modules_to_save lm_head: the base value, not the "
                                             "trained copy)"]
    assert got.details["copies_wrong"] == [] and got.details["worst_tensor"] == "lm_head.weight"
    assert got.details["max_rel_error"] > 0.1
    assert got.fix == ("write the trained modules_to_save copies into the merged model (merge_and_unload does; a hand "
                       "merge must copy them)")


def test_a_modules_to_save_copy_that_is_neither_is_wrong_with_its_error(arch, tmp_path):
    built, info = arch("llama")
    merged = edited(built.merged("modules_to_save"), tmp_path / "m",
                    lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + noise_like(t["lm_head.weight"], 0.05)}))
    got = verdict(built.adapter("modules_to_save"), info, merged)
    assert got.status == "fail" and got.details["copies_dropped"] == []
    (entry,) = got.details["copies_wrong"]
    err = got.details["max_rel_error"]
    assert entry == f"lm_head.weight (modules_to_save lm_head: error {err:.2e} of max|W|)"
    assert got.message == f"1 modules_to_save tensor(s) differ from the trained copy, e.g. {entry}"
    assert "modules_to_save copies" in got.fix


def test_a_modules_to_save_copy_of_another_shape_is_wrong(arch, tmp_path):
    built, info = arch("llama")
    merged = edited(built.merged("modules_to_save"), tmp_path / "m",
                    lambda t: t.update({"lm_head.weight": t["lm_head.weight"][:-1]}))
    got = verdict(built.adapter("modules_to_save"), info, merged)
    trained = list(base_tensors(built)["lm_head.weight"].shape)
    assert got.details["copies_wrong"] == [f"lm_head.weight (shape {[trained[0] - 1, trained[1]]}, the trained "
                                           f"lm_head.weight is {trained})"]


def test_a_copy_within_tolerance_passes_and_records_the_worst(arch, tmp_path):
    built, info = arch("llama")
    merged = edited(built.merged("modules_to_save"), tmp_path / "m",
                    lambda t: t["lm_head.weight"].__setitem__((0, 0), t["lm_head.weight"][0, 0] * (1 + 1e-7)))
    got = verdict(built.adapter("modules_to_save"), info, merged)
    assert got.status == "pass", got.message
    assert got.details["worst_tensor"] == "lm_head.weight" and 0 < got.details["max_rel_error"] < 1e-6


# ---------------------------------------------------------------------------------------------
# trainable tokens: the base with the trained rows written in


def test_dropped_token_rows_are_named(arch):
    built, info = arch("llama", "tokens")
    got = verdict(built.adapter("tokens"), info, built.broken("tokens-dropped"))
    entry = ("model.embed_tokens.weight (trainable tokens of model.embed_tokens: rows [3, 5, 7] hold the base values, "
             "not the trained ones)")
    assert got.details["tokens_dropped"] == [entry] and got.details["tokens_wrong"] == []
    assert got.message == f"1 weight(s) with trainable tokens not merged, e.g. {entry}"
    assert got.fix == ("write the trained token rows into the embedding (merge_and_unload does; a hand merge must copy "
                       "exactly those rows)")
    assert got.details["worst_tensor"] == "model.embed_tokens.weight"


def test_token_rows_written_one_row_off_name_both_row_sets(arch):
    built, info = arch("llama", "tokens")
    got = verdict(built.adapter("tokens"), info, built.broken("tokens-wrong-rows"))
    (entry,) = got.details["tokens_wrong"]
    err = got.details["max_rel_error"]
    assert entry == ("model.embed_tokens.weight (trainable tokens of model.embed_tokens [3, 5, 7]: rows [3, 5, 7] are "
                     "not the trained values; rows [4, 6, 8] changed that the adapter does not train; error "
                     f"{err:.2e} of max|W|)")
    assert got.message == ("1 weight(s) with trainable tokens differ from the base with the trained rows written in, "
                           f"e.g. {entry}")
    assert got.details["tokens_dropped"] == []


def test_only_untrained_rows_changed_names_those_rows_alone(arch, tmp_path):
    built, info = arch("llama", "tokens")
    key = "model.embed_tokens.weight"
    rows = list(range(9, 19))  # ten untrained rows: the entry lists eight

    def change(t):
        t[key] = t[key].clone()
        t[key][rows] += 0.5

    got = verdict(built.adapter("tokens"), info, edited(built.merged("tokens"), tmp_path / "m", change))
    (entry,) = got.details["tokens_wrong"]
    assert entry.startswith(f"{key} (trainable tokens of model.embed_tokens [3, 5, 7]: rows {rows[:8]} changed that "
                            "the adapter does not train; error ")
    assert "are not the trained values" not in entry


def test_trained_rows_half_written_are_wrong_not_dropped(arch, tmp_path):
    built, info = arch("llama", "tokens")
    key = "model.embed_tokens.weight"
    base = base_tensors(built)[key]

    def change(t):
        t[key] = t[key].clone()
        t[key][3] = base[3]  # one trained row left at the base, the others trained

    got = verdict(built.adapter("tokens"), info, edited(built.merged("tokens"), tmp_path / "m", change))
    (entry,) = got.details["tokens_wrong"]
    assert "[3, 5, 7]: rows [3] are not the trained values; error " in entry and got.details["tokens_dropped"] == []


def test_an_embedding_of_another_shape_with_tokens_is_wrong(arch, tmp_path):
    built, info = arch("llama", "tokens")
    key = "model.embed_tokens.weight"
    merged = edited(built.merged("tokens"), tmp_path / "m", lambda t: t.update({key: t[key][:, :-1]}))
    got = verdict(built.adapter("tokens"), info, merged)
    vocab, hidden = base_tensors(built)[key].shape
    assert got.details["tokens_wrong"] == [f"{key} (trainable tokens of model.embed_tokens: shape [{vocab}, "
                                           f"{hidden - 1}], base [{vocab}, {hidden}])"]


def test_token_rows_that_do_not_fit_the_base_point_to_base_match(arch, tmp_path):
    built, info = arch("llama", "tokens")
    key = "model.embed_tokens.weight"
    base = edited(built.base, tmp_path / "base", lambda t: t.update({key: t[key][:, :-2]}))
    merged = edited(built.merged("tokens"), tmp_path / "m", lambda t: t.update({key: t[key][:, :-2]}))
    narrow = inspect_base(base)
    got = verdict(built.adapter("tokens"), narrow, merged)
    (entry,) = got.details["tokens_wrong"]
    assert entry.startswith(f"{key} (trainable tokens of model.embed_tokens: trainable_tokens_delta ")
    assert entry.endswith(", see base-match)")


def test_a_tied_head_left_at_the_base_drops_the_trained_rows(arch, tmp_path):
    """opt ties lm_head to the embedding: PEFT's token adapter reaches the head too, so an untied head at the base
    values is a dropped token merge, named by the head's key."""
    built, info = arch("opt", "tokens")
    base = base_tensors(built)
    head, embedding = built.info["head_module"] + ".weight", built.info["embedding_key"]
    merged = edited(built.merged("tokens"), tmp_path / "m", lambda t: t.update({head: base[embedding].clone()}),
                    config=lambda c: c.update(tie_word_embeddings=False))
    got = verdict(built.adapter("tokens"), info, merged)
    assert got.details["tokens_dropped"] == [f"{head} (trainable tokens of {built.info['embedding_module']}: rows "
                                             "[3, 5, 7] hold the base values, not the trained ones)"]
    assert got.details["untie_expected"] is False


# ---------------------------------------------------------------------------------------------
# tied pairs the adapter changes on one side


def tie_problem(module: str, partner: str, key: str, separate: str) -> str:
    return (f"{module} is tied to {partner} (tie_word_embeddings) and the adapter changes only {module}, but the "
            f"merged checkpoint keeps one shared tensor ({key}), so it cannot hold both the adapter's {module} and "
            f"the base {partner} as the unmerged adapter does; save them untied (tie_word_embeddings: false, "
            f"separate {separate})")


def test_a_tied_embedding_merged_into_one_shared_tensor_fails(arch):
    built, info = arch("gpt2")
    got = verdict(built.adapter("embedding"), info, built.merged("embedding"))
    problem = tie_problem("transformer.wte", "lm_head", "transformer.wte.weight",
                          "transformer.wte.weight and lm_head.weight")
    assert got.details["ties"] == [problem] and got.details["untie_expected"] is True
    assert got.message == problem and got.details["problems"] == [problem]
    assert got.fix == "save the tied pair untied (tie_word_embeddings: false and a separate weight for each)"


@CURRENT_STACK_ONLY
def test_an_untied_head_copy_with_the_tie_flag_still_true_is_lost_on_reload(arch, tmp_path):
    built, info = arch("gpt2")
    assert built.info["merged_tie_word_embeddings"]["modules_to_save"] is False
    good = built.merged("modules_to_save")
    assert verdict(built.adapter("modules_to_save"), info, good).status == "pass"  # untied is right here
    merged = edited(good, tmp_path / "true", config=lambda c: c.update(tie_word_embeddings=True))
    got = verdict(built.adapter("modules_to_save"), info, merged)
    problem = ("lm_head.weight holds the adapter's lm_head but config.json keeps tie_word_embeddings true: on reload "
               "transformers re-ties lm_head to transformer.wte and the adapter's lm_head is lost; set "
               "tie_word_embeddings: false")
    assert got.details["ties"] == [problem] and got.message == problem and got.details["untie_expected"] is True
    merged = edited(good, tmp_path / "default", config=lambda c: c.pop("tie_word_embeddings"))
    got = verdict(built.adapter("modules_to_save"), info, merged)
    assert got.details["ties"] == [problem.replace("tie_word_embeddings true:", "tie_word_embeddings true (the "
                                                   "default):")]


def test_an_untied_merge_of_a_tied_base_that_the_adapter_keeps_tied_fails_on_the_flag(arch, tmp_path):
    built, info = arch("gpt2")
    merged = edited(built.merged("plain"), tmp_path / "m", config=lambda c: c.update(tie_word_embeddings=False))
    got = verdict(built.adapter("plain"), info, merged)
    base_flag = json.loads((built.base / "config.json").read_text()).get("tie_word_embeddings")
    assert got.details["problems"] == [f"config tie_word_embeddings is False, base has {base_flag!r}"]
    assert got.details["untie_expected"] is False and got.details["ties"] == []


# ---------------------------------------------------------------------------------------------
# lora_bias, DoRA, Conv1D, saved base overrides


def test_a_lora_bias_off_by_twice_is_wrong_without_a_scaling_story(arch, tmp_path):
    built, info = arch("opt", "lora_bias")
    key = "model.decoder.layers.0.fc1.bias"
    base = base_tensors(built)
    merged = edited(built.merged("lora_bias"), tmp_path / "m",
                    lambda t: t.update({key: 2 * t[key] - base[key]}))
    got = verdict(built.adapter("lora_bias"), info, merged)
    (entry,) = got.details["wrong_delta"]
    assert entry.startswith(f"{key} (error ") and got.details["delta_ratios"] == {}
    assert got.details["unmerged"] == [] and got.details["worst_tensor"] == key


def test_a_dropped_lora_bias_is_an_unmerged_layer(arch):
    built, info = arch("gpt2", "lora_bias")
    got = verdict(built.adapter("lora_bias"), info, built.broken("lora-bias-dropped"))
    assert got.details["unmerged"] == sorted(built.info["broken"]["lora-bias-dropped"])
    assert got.message == f"8 adapted weight(s) equal the base (layer not merged), e.g. {got.details['unmerged'][0]}"


def test_a_dora_weight_off_by_twice_the_delta_gets_no_ratio(arch, tmp_path):
    built, info = arch("llama", "dora")
    key = "model.layers.0.self_attn.q_proj.weight"
    base = base_tensors(built)
    merged = edited(built.merged("dora"), tmp_path / "m", lambda t: t.update({key: 2 * t[key] - base[key]}))
    got = verdict(built.adapter("dora"), info, merged)
    assert [e.split(" (")[0] for e in got.details["wrong_delta"]] == [key] and got.details["delta_ratios"] == {}
    assert "lora_alpha" not in got.message


def test_conv1d_is_told_apart_by_shape_without_a_module_tree(arch, tmp_path):
    """Without a module tree (a meta build that failed) only the weight's shape says a GPT-2 Conv1D stores
    [in, out]: the non-square ones (c_attn, c_fc, mlp.c_proj) of the official merge match; a square one (attn.c_proj,
    32x32) cannot be told apart and is reported; a skipped Conv1D layer is still named."""
    built, _ = arch("gpt2")
    flat = inspect_base(built.base, build_tree=False)
    assert flat.modules is None
    got = verdict(built.adapter("plain"), flat, built.merged("plain"))
    assert [e.split(" (")[0] for e in got.details["wrong_delta"]] == [f"transformer.h.{i}.attn.c_proj.weight"
                                                                      for i in (0, 1)], got.details
    got = verdict(built.adapter("plain"), flat, built.broken("layer-skipped"))
    assert got.details["unmerged"] == ["transformer.h.1.attn.c_attn.weight"]


def test_a_delta_that_does_not_fit_the_base_weight_points_to_base_match(arch, tmp_path):
    built, _ = arch("llama")
    flat = inspect_base(built.base, build_tree=False)
    module = "model.layers.0.self_attn.q_proj"
    key = f"base_model.model.{module}.lora_B.weight"
    adapter = edited(built.adapter("plain"), tmp_path / "a", lambda t: t.update({key: t[key][:-1]}))
    got = verdict(adapter, flat, built.merged("plain"))
    rows, cols = base_tensors(built)[f"{module}.weight"].shape
    assert got.details["wrong_delta"] == [f"{module}.weight (ΔW {[rows - 1, cols]} does not fit the base weight "
                                          f"{[rows, cols]}, see base-match)"]


def test_an_adapted_weight_of_another_shape_is_wrong(arch, tmp_path):
    built, info = arch("llama")
    key = "model.layers.0.self_attn.q_proj.weight"
    merged = edited(built.merged("plain"), tmp_path / "m", lambda t: t.update({key: t[key][:-1]}))
    got = verdict(built.adapter("plain"), info, merged)
    rows, cols = base_tensors(built)[key].shape
    assert got.details["wrong_delta"] == [f"{key} (shape {[rows - 1, cols]}, expected {[rows, cols]})"]


def test_a_saved_bias_is_the_base_value_the_merge_must_keep(arch, tmp_path):
    """bias="all" saves the trained biases: PEFT loads them over the base's, so the merged bias is the saved one."""
    built, info = arch("opt")
    key = "model.decoder.layers.0.self_attn.k_proj.bias"
    trained = base_tensors(built)[key] + 0.5
    adapter = edited(built.adapter("plain"), tmp_path / "a",
                     lambda t: t.update({f"base_model.model.{key}": trained.clone()}),
                     config=lambda c: c.update(bias="all"))
    got = verdict(adapter, info, built.merged("plain"))
    assert got.details["changed"] == [key], got.details
    merged = edited(built.merged("plain"), tmp_path / "m", lambda t: t.update({key: trained.clone()}))
    assert verdict(adapter, info, merged).status == "pass"


# ---------------------------------------------------------------------------------------------
# tensors the adapter does not touch; ΔW below the resolution


def test_untouched_tensors_changed_by_shape_inf_or_beyond_the_tolerance(arch, tmp_path):
    built, info = arch("llama")
    a, b, c = "model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"

    def change(t):
        t[a] = t[a][:-1]
        t[b] = t[b].clone()
        t[b][0] = float("inf")
        t[c] = t[c] * (1 + 1e-3)

    got = verdict(built.adapter("plain"), info, edited(built.merged("plain"), tmp_path / "m", change))
    assert sorted(got.details["changed"]) == sorted([a, b, c])
    near = edited(built.merged("plain"), tmp_path / "near", lambda t: t.update({c: t[c] * (1 + 1e-7)}))
    assert verdict(built.adapter("plain"), info, near).status == "pass"


def test_inf_in_both_base_and_merged_is_no_change(arch, tmp_path):
    built, info = arch("llama")
    key = "model.norm.weight"

    def change(t):
        t[key] = t[key].clone()
        t[key][0] = float("inf")

    base = edited(built.base, tmp_path / "base", change)
    merged = edited(built.merged("plain"), tmp_path / "m", change)
    assert verdict(built.adapter("plain"), inspect_base(base), merged).status == "pass"


def test_a_bfloat16_merge_equal_to_the_cast_base_passes(arch, tmp_path):
    built, info = arch("llama")
    merged = edited(built.merged("plain"), tmp_path / "m",
                    lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    got = verdict(built.adapter("plain"), info, merged)
    assert got.status == "pass", got.message and got.details["dtypes"] == ["bfloat16"]


def tiny_delta_adapter(built, out: Path) -> Path:
    """The plain adapter with every lora_B scaled down until s·B·A is below float32's resolution of the weights."""
    return edited(built.adapter("plain"), out,
                  lambda t: t.update({k: v * 1e-12 for k, v in t.items() if ".lora_B." in k}))


def test_delta_below_the_resolution_everywhere_warns(arch, tmp_path):
    built, info = arch("llama")
    adapter = tiny_delta_adapter(built, tmp_path / "a")
    got = verdict(adapter, info, built.base)  # the base itself is base + a ΔW it cannot hold
    assert got.status == "warn"
    assert got.message == ("ΔW is below the ['float32'] resolution in every adapted weight; the merge cannot be "
                           "verified from weights alone")
    assert got.details["problems"] == []


def test_delta_below_the_resolution_in_some_weights_passes(arch, tmp_path):
    built, info = arch("llama")
    module = "model.layers.0.self_attn.q_proj"
    adapter = edited(built.adapter("plain"), tmp_path / "a",
                     lambda t: t.update({k: v * 1e-12 for k, v in t.items() if ".lora_B." in k and module not in k}))
    merged = edited(built.base, tmp_path / "m",
                    lambda t: t.update({f"{module}.weight": load_file(built.merged("plain") / "model.safetensors")[
                        f"{module}.weight"]}))
    got = verdict(adapter, info, merged)
    assert got.status == "pass", got.message


def test_delta_below_the_resolution_with_a_trained_copy_passes(arch, tmp_path):
    built, info = arch("llama")
    adapter = edited(built.adapter("modules_to_save"), tmp_path / "a",
                     lambda t: t.update({k: v * 1e-12 for k, v in t.items() if ".lora_B." in k}))
    trained = {k: v for k, v in load_file(built.merged("modules_to_save") / "model.safetensors").items()
               if k == "lm_head.weight"}
    merged = edited(built.base, tmp_path / "m", lambda t: t.update(trained))
    assert verdict(adapter, info, merged).status == "pass"


def test_delta_below_the_resolution_with_trained_tokens_passes(arch, tmp_path):
    built, info = arch("llama", "tokens")
    adapter = edited(built.adapter("tokens"), tmp_path / "a",
                     lambda t: t.update({k: v * 1e-12 for k, v in t.items() if ".lora_B." in k}))
    key = "model.embed_tokens.weight"
    rows = load_file(built.merged("tokens") / "model.safetensors")[key]
    merged = edited(built.base, tmp_path / "m", lambda t: t.update({key: rows}))
    assert verdict(adapter, info, merged).status == "pass"


# ---------------------------------------------------------------------------------------------
# merged-matches' inputs and the merged-whole progress line


def test_merged_matches_skips_a_packed_quantized_base(arch, tmp_path):
    built, info = arch("llama")
    merged = edited(built.merged("plain"), tmp_path / "m", config=lambda c: c.update(
        quantization_config={"quant_method": "gptq", "bits": 4}))
    got = verdict(built.adapter("plain"), info, merged)
    assert got.status == "skip"
    assert got.message.startswith(f"the merged checkpoint {merged} is saved quantized (")
    assert "comparing merged weights with W + ΔW tensor by tensor cannot be checked on it" in got.message


def test_merged_matches_skips_an_adapter_without_tensors(arch):
    from types import SimpleNamespace

    built, info = arch("llama")
    adapter = SimpleNamespace(primary=None, config={}, tensors={})
    got = run_check(get_check("merged-matches"), CheckContext(adapter=adapter, base=info, merged=built.merged("plain")))
    assert (got.status, got.message) == ("skip", "the adapter's tensors or config are unreadable (see the static "
                                                 "checks)")
    got = run_check(get_check("merged-matches"), CheckContext(adapter=None, base=info, merged=built.merged("plain")))
    assert got.status == "skip" and got.message.startswith("the adapter's tensors or config are unreadable")


def test_merged_whole_says_what_it_reads(arch):
    built, info = arch("llama")
    said = []
    ctx = CheckContext(adapter=read_adapter(built.adapter("plain")), base=info, merged=built.merged("plain"),
                       progress=said.append)
    assert run_check(get_check("merged-whole"), ctx).status == "pass"
    assert said == ["reading the merged directory's files as from_pretrained will"]


def test_without_a_usable_target_modules_every_module_with_tensors_counts(arch, tmp_path, monkeypatch):
    """No target_modules, or one that cannot be resolved (targets-resolve reports it): merged-matches compares
    every module the adapter has tensors for, as PEFT would apply them, and does not crash."""
    built, info = arch("llama")
    adapter = edited(built.adapter("plain"), tmp_path / "a", config=lambda c: c.pop("target_modules"))
    got = verdict(adapter, info, built.broken("layer-skipped"))
    assert got.details["unmerged"] == ["model.layers.1.self_attn.q_proj.weight"]
    assert got.details["ignored_adapter_tensors"] == []
    from harness.checks import against_base

    def unresolvable(ctx):
        raise ValueError("catastrophic backtracking")

    monkeypatch.setattr(against_base, "target_resolution", unresolvable)
    got = verdict(built.adapter("plain"), info, built.broken("layer-skipped"))
    assert got.details["unmerged"] == ["model.layers.1.self_attn.q_proj.weight"]


def test_untargeted_tensors_are_ignored_and_listed(synthetic_cache):
    if reason := zoo.arch_unavailable("llama"):
        pytest.skip(reason)
    built, adapter = zoo.derived_adapter("untargeted-tensors", synthetic_cache)
    got = verdict(adapter, inspect_base(built.base), built.base)
    (note,) = got.details["ignored_adapter_tensors"]
    assert note == ("4 saved tensor(s) get no effect in the reference: target_modules does not name the module, so "
                    "PEFT gives it no LoRA layer and drops the tensors (e.g. base_model.model.model.layers.0.self_attn."
                    "v_proj.lora_A.weight)")
    assert got.status == "pass", got.message


# ---------------------------------------------------------------------------------------------
# zero-checkpoint: the conversion's report


def zero(n_tensors: int = 3):
    from harness.inputs.deepspeed import ZeroConversion

    return ZeroConversion(checkpoint_dir=Path("ckpt"), tag="global_step5", tag_dir=Path("ckpt/global_step5"), stage=3,
                          world_size=2, ds_version="0.14", n_tensors=n_tensors, output_dir=Path("out"),
                          adapter_config_source="beside", dtype="float32", log="long log")


def test_zero_checkpoint_reports_the_conversion():
    check = get_check("zero-checkpoint")
    got = run_check(check, CheckContext(deepspeed=zero()))
    assert (got.status, got.message) == ("pass", "ZeRO-3 checkpoint, world size 2, tag global_step5: 3 adapter tensors "
                                                 "converted with zero_to_fp32 (float32)")
    assert "log" not in got.details and got.details["tag"] == "global_step5" and got.details["checkpoint_dir"] == "ckpt"
    got = run_check(check, CheckContext(deepspeed=zero(0)))
    assert (got.status, got.message) == ("fail", "ZeRO-3 checkpoint global_step5: no LoRA tensors converted")
    assert "log" not in got.details and got.details["n_tensors"] == 0 and got.fix == check.fix
    got = run_check(check, CheckContext(deepspeed=zero(), deepspeed_error="refused: a pickle global"))
    assert (got.status, got.message) == ("fail", "refused: a pickle global")
    got = run_check(check, CheckContext())
    assert (got.status, got.message) == ("skip", "the adapter is not a DeepSpeed checkpoint")


# ---------------------------------------------------------------------------------------------
# registry and context


def test_results_get_the_check_id_and_the_default_fix_only_when_they_fail_or_warn():
    from harness.checks.registry import Check, failed, passed, skipped, warned

    def check_of(result):
        return Check(id="toy", group="static", summary="s", why="w", fix="the default fix", func=lambda ctx: result)

    ctx = CheckContext()
    for make, status, fix in ((passed, "pass", None), (skipped, "skip", None), (warned, "warn", "the default fix"),
                              (failed, "fail", "the default fix")):
        got = run_check(check_of(make("m", a=1)), ctx)
        assert (got.id, got.status, got.message, got.details, got.fix) == ("toy", status, "m", {"a": 1}, fix)
    got = run_check(check_of(failed("m", fix="own")), ctx)
    assert got.fix == "own"
    got = run_check(check_of(warned("m", fix="own")), ctx)
    assert got.fix == "own"


def test_an_exception_in_a_check_is_one_line_with_its_type():
    from harness.checks.registry import Check

    def boom(ctx):
        raise KeyError("x" * 400 + "\nsecond line")

    got = run_check(Check(id="toy", group="static", summary="s", why="w", fix="f", func=boom), CheckContext())
    assert got.id == "toy" and got.details == {"exception": "KeyError"}
    assert got.message == "internal error in check: KeyError: '" + "x" * 299
    assert got.fix == ("this is a harness bug or an input it does not understand; please report it with the JSON "
                       "report")

    def empty(ctx):
        raise RuntimeError("")

    got = run_check(Check(id="toy", group="static", summary="s", why="w", fix="f", func=empty), CheckContext())
    assert got.message == "internal error in check: RuntimeError:"
    got = run_check(Check(id="toy", group="static", summary="s", why="w", fix="f", func=lambda ctx: "pass"),
                    CheckContext())
    assert got.message == "internal error in check: TypeError: check returned str, not CheckResult"


def test_unusable_input_inside_a_check_is_not_swallowed():
    from harness.checks.registry import Check
    from harness.inputs.errors import UnusableInput

    def unusable(ctx):
        raise UnusableInput("the base needs the network")

    with pytest.raises(UnusableInput):
        run_check(Check(id="toy", group="static", summary="s", why="w", fix="f", func=unusable), CheckContext())


def test_run_checks_runs_the_selected_ids_in_order_and_says_each():
    from harness.checks.registry import checks, run_checks

    said = []
    ctx = CheckContext(progress=said.append)
    got = run_checks(ctx, "merged", only=["merged-whole"])
    assert [r.id for r in got] == ["merged-whole"] and said == ["check merged-whole"]
    said.clear()
    got = run_checks(ctx, "merged")
    assert [r.id for r in got] == [c.id for c in checks("merged")] == ["merged-matches", "merged-whole"]
    assert said == ["check merged-matches", "check merged-whole"]


def test_registering_the_same_function_again_is_allowed_and_replaces_the_record():
    from harness.checks.registry import REGISTRY, register

    original = get_check("zero-checkpoint")  # imports its module, wherever this test runs first
    try:
        func = original.func
        assert register(id="zero-checkpoint", group="deepspeed", summary="S", why="W", fix="F")(func) is func
        again = REGISTRY["zero-checkpoint"]
        assert (again.id, again.group, again.summary, again.why, again.fix, again.func) == (
            "zero-checkpoint", "deepspeed", "S", "W", "F", func)
        with pytest.raises(ValueError, match="check id 'zero-checkpoint' registered twice"):
            register(id="zero-checkpoint", group="deepspeed", summary="S", why="W", fix="F")(lambda ctx: None)
    finally:
        REGISTRY["zero-checkpoint"] = original
    with pytest.raises(ValueError) as err:
        register(id="x", group="nope", summary="", why="", fix="")
    assert str(err.value) == ("unknown check group 'nope'; one of ('deepspeed', 'static', 'against-base', 'dynamic', "
                              "'serving', 'merged', 'quantized', 'trained')")
    from harness.checks.registry import checks

    with pytest.raises(ValueError) as err:
        checks("nope")
    assert str(err.value).startswith("unknown check group 'nope'; one of ('deepspeed'")


def test_get_check_loads_the_module_of_its_group(monkeypatch):
    import sys

    from harness.checks import registry

    get_check("zero-checkpoint")  # loaded first, wherever this test runs first, so that both can be taken away
    monkeypatch.delitem(registry.REGISTRY, "zero-checkpoint")
    monkeypatch.delitem(sys.modules, "harness.checks.deepspeed")
    assert get_check("zero-checkpoint").group == "deepspeed"
    monkeypatch.delitem(registry.REGISTRY, "zero-checkpoint")
    monkeypatch.delitem(sys.modules, "harness.checks.deepspeed")
    assert [c.id for c in registry.checks("deepspeed")] == ["zero-checkpoint"]


def test_a_missing_dependency_of_a_check_module_is_not_hidden(monkeypatch):
    import builtins
    import sys

    from harness.checks import registry

    real = builtins.__import__

    def without_dependency(name, *args, **kwargs):
        if name == "harness.checks.deepspeed":
            raise ModuleNotFoundError("No module named 'somedep'", name="somedep")
        return real(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "harness.checks.deepspeed")
    monkeypatch.setattr(builtins, "__import__", without_dependency)
    import importlib

    monkeypatch.setattr(importlib, "import_module", lambda name: without_dependency(name))
    with pytest.raises(ModuleNotFoundError, match="somedep"):
        registry._load_builtin_checks("deepspeed")

    def group_module_gone(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(importlib, "import_module", group_module_gone)
    registry._load_builtin_checks("deepspeed")  # a group whose module is gone has no checks: no error


def test_context_caches_once_and_logs_shared_work():
    from harness import worklog

    ctx = CheckContext()
    calls = []
    log = worklog.WorkLog()
    with worklog.recording(log):
        with log.check("first"):
            assert ctx.cached("g.thing", lambda: calls.append(1) or "value", "the thing") == "value"
        with log.check("second"):
            assert ctx.cached("g.thing", lambda: calls.append(2) or "other") == "value"
            ctx.cached("g.other", lambda: 1)
    assert calls == [1] and ctx.cache["g.thing"] == "value"
    (thing, other) = log.entries()
    assert (thing.key, thing.name, thing.checks) == ("g.thing", "the thing", ["first", "second"])
    assert (other.key, other.name) == ("g.other", "g.other")


def test_context_notes_once_and_says_only_with_a_listener():
    from harness.checks.context import CheckOptions
    from harness.dtypes import DType

    ctx = CheckContext()
    ctx.say("nobody listens")
    ctx.note("a")
    ctx.note("b")
    ctx.note("a")
    assert ctx.notes == ["a", "b"]
    assert CheckOptions(dtype="torch.bfloat16").dtype is DType.bfloat16
    assert CheckOptions(dtype=DType.float16).dtype is DType.float16
    assert CheckOptions().dtype is None
    options = CheckOptions()
    assert (options.allow_plora_targets, options.device, options.max_memory, options.trained_on_quantized,
            options.layers) == (False, "cpu", None, None, None)
    with pytest.raises(ValueError):
        CheckOptions(dtype="int8")


# ---------------------------------------------------------------------------------------------
# serving-vllm: the judgement of a served outcome (the measurement faked: vLLM is not in the fast tier)


class _Family:
    def __init__(self, branch: bool) -> None:
        self.branch = branch

    def branch_modules_from_keys(self, weights):
        return {"m.Plora_A"} if self.branch else set()


def serving_ctx(said=None, branch=False):
    from types import SimpleNamespace

    return CheckContext(adapter=SimpleNamespace(root=Path("adapter")),
                        base=SimpleNamespace(family=_Family(branch), weights={}, base_dir=Path("base")),
                        run_adapters=(Path("adapter"), Path("other")), progress=(said.append if said is not None
                                                                                 else None))


def text_run():
    """A dynamic run's text probe: two rows, the second padded by two positions."""
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    return SimpleNamespace(text_probe=SimpleNamespace(input_ids=ids, attention_mask=mask),
                           text_reference_logits=torch.randn(2, 4, 16, generator=gen),
                           text_base_logits=torch.randn(2, 4, 16, generator=gen) * 3)


def served_from(logits_rows, ids, shift=0.0):
    """vLLM's answer as if it served ``logits_rows``: per row and position, the logprob of the next probe token."""
    out = []
    for row, tokens in zip(logits_rows, ids):
        lp = torch.log_softmax(row.float(), dim=-1)
        out.append([{tokens[j + 1] if j + 1 < len(tokens) else 1: float(lp[j, tokens[j + 1] if j + 1 < len(tokens)
                                                                            else 1]) + shift}
                    for j in range(len(tokens))])
    return out


@pytest.fixture
def served(monkeypatch):
    """Fake vLLM: ``served(outcome, run)`` makes serve() answer ``outcome`` and dynamic_run() return ``run``."""
    from harness.checks import dynamic
    from harness.checks.measure import serving_vllm

    calls = []
    monkeypatch.setattr(serving_vllm, "vllm_missing", lambda: None)

    def setup(outcome, run):
        monkeypatch.setattr(dynamic, "dynamic_run", lambda ctx: run)
        monkeypatch.setattr(serving_vllm, "serve", lambda base, adapter, prompts, siblings: calls.append(
            (base, adapter, prompts, siblings)) or outcome)
        return calls

    return setup


def test_serving_skips_without_a_base_for_xcomposer_and_without_vllm(monkeypatch):
    from harness.checks import serving
    from harness.checks.measure import serving_vllm

    check = get_check("serving-vllm")
    assert run_check(check, CheckContext()).message == "no --base-model given"
    got = run_check(check, serving_ctx(branch=True))
    assert (got.status, got.message) == ("skip", serving.XCOMPOSER_SKIP)
    monkeypatch.setattr(serving_vllm, "vllm_missing", lambda: "vLLM is not installed")
    got = run_check(check, serving_ctx())
    assert (got.status, got.message) == ("skip", "vLLM is not installed")


def test_serving_refusals_and_errors_fail_with_vllms_words(served):
    from harness.checks.dynamic import Unavailable
    from harness.checks.measure.serving_vllm import Refusal, ServingOutcome

    check = get_check("serving-vllm")
    refusals = [Refusal("rank 128 > max_lora_rank 64.", "start vLLM with --max-lora-rank 128", True),
                Refusal("modules_to_save is not supported.", "drop modules_to_save", False)]
    said = []
    calls = served(ServingOutcome(vllm_version="0.9", refusals=refusals, seconds={"total": 1.0}),
                   Unavailable("no base load"))
    got = run_check(check, serving_ctx(said))
    assert got.status == "fail"
    assert got.message == ("vLLM 0.9 refuses this adapter at its default settings: rank 128 > max_lora_rank 64. "
                           "modules_to_save is not supported.")
    assert got.fix == "start vLLM with --max-lora-rank 128; drop modules_to_save"
    assert got.details == {"refusals": [r.message for r in refusals], "vllm": "0.9", "seconds": {"total": 1.0}}
    assert calls == [(Path("base"), Path("adapter"), None, (Path("adapter"), Path("other")))]
    assert said == ["serving the adapter in a vLLM engine (a process of its own, shared by the run's adapters)"]
    served(ServingOutcome(vllm_version="0.9", error="KeyError: lm_head"), Unavailable("no base load"))
    got = run_check(check, serving_ctx())
    assert got.status == "fail" and got.message == "vLLM 0.9 admits the adapter but cannot serve it: KeyError: lm_head"
    assert got.fix.startswith("target only modules vLLM supports LoRA on for this architecture (its message lists "
                              "them) and leave out weights it cannot load")
    assert got.details == {"vllm": "0.9", "seconds": {}}
    served(ServingOutcome(error="crashed"), Unavailable("no base load"))
    assert run_check(check, serving_ctx()).message == "vLLM admits the adapter but cannot serve it: crashed"


def test_serving_without_a_reference_or_an_architecture_skips(served):
    from harness.checks.dynamic import Unavailable
    from harness.checks.measure.serving_vllm import ServingOutcome

    check = get_check("serving-vllm")
    served(ServingOutcome(vllm_version="0.9"), Unavailable("the base does not load"))
    got = run_check(check, serving_ctx())
    assert (got.status, got.message) == ("skip", "vLLM 0.9 admits the adapter; its logprobs are not compared: the "
                                                 "base does not load")
    assert got.details == {"vllm": "0.9", "seconds": {}}
    run = text_run()
    calls = served(ServingOutcome(vllm_version="0.9", unsupported="InternLM2ForCausalLM"), run)
    got = run_check(check, serving_ctx())
    assert (got.status, got.message) == ("skip", "InternLM2ForCausalLM: vLLM does not serve this architecture")
    assert calls[-1][2] == [[5, 6, 7, 8], [9, 10]]  # the probe rows without their padding


def test_serving_compares_logprobs_with_the_reference(served):
    from harness.checks.measure.serving_vllm import LOGPROB_ATOL, ServingOutcome

    check = get_check("serving-vllm")
    run = text_run()
    ids = [[5, 6, 7, 8], [9, 10]]
    ref = [run.text_reference_logits[0], run.text_reference_logits[1][:2]]
    base = [run.text_base_logits[0], run.text_base_logits[1][:2]]
    served(ServingOutcome(vllm_version="0.9", served=served_from(ref, ids)), run)
    got = run_check(check, serving_ctx())
    assert got.status == "pass", got.message
    assert got.message.startswith("vLLM 0.9 serves the adapter as the fp32 reference: prompt logprobs within ")
    assert got.message.endswith(f" (tolerance {LOGPROB_ATOL:g}) on 2 probe rows")
    assert got.details["prompts"] == 2 and got.details["positions"] == 6
    assert got.details["tolerance"] == LOGPROB_ATOL and got.details["max_logprob_gap"] <= 1e-5
    assert got.details["gap_to_base"] > LOGPROB_ATOL
    served(ServingOutcome(vllm_version="0.9", served=served_from(base, ids)), run)
    got = run_check(check, serving_ctx())
    assert got.status == "fail"
    assert got.message.startswith("vLLM 0.9 serves the adapter differently from the fp32 reference: largest logprob "
                                  "gap ")
    assert got.message.endswith(f"; tolerance {LOGPROB_ATOL:g}): vLLM served the base model's logprobs, so it loaded "
                                "the adapter and applied it to nothing (module names under a prefix vLLM's model "
                                "class does not use?)")
    assert got.fix == ("save the adapter with the module names of the class vLLM serves (for a multimodal wrapper, its "
                       "language model's prefix), or serve the merged model")
    off = served_from(ref, ids)
    off[1][0][10] += 0.01  # one logprob off: row 1, after its first token
    served(ServingOutcome(vllm_version="0.9", served=off), run)
    got = run_check(check, serving_ctx())
    assert got.status == "fail" and "applied it to nothing" not in got.message
    want = off[1][0][10]
    assert (f"largest logprob gap 0.01 (token 10 after 1 tokens of probe row 1: vLLM {want:.4f}, reference "
            f"{want - 0.01:.4f}; tolerance {LOGPROB_ATOL:g})") in got.message
    assert got.fix == ("vLLM applies every tensor in the adapter file, PEFT only what the config names: see "
                       "key-coverage for tensors PEFT leaves out and remove them or name them in target_modules; or "
                       "merge the adapter (merge_and_unload) and serve the merged model without --enable-lora")
    served(ServingOutcome(vllm_version="0.9", served=served_from(ref, ids, shift=LOGPROB_ATOL)), run)
    assert run_check(check, serving_ctx()).status == "pass"


# ---------------------------------------------------------------------------------------------
# qlora-merge-gap and merged-quantized: the judgement (measurements faked: bitsandbytes loads are slow)


def quant(method="bitsandbytes", scheme="nf4", bits=4):
    from harness.model.quantization import Quantization

    return Quantization(method=method, scheme=scheme, bits=bits, source="config.json quantization_config of m")


def quantized_ctx(tmp_path, merged=True, failed_prerequisites=(), said=None, **options):
    from types import SimpleNamespace

    from harness.checks.context import CheckOptions

    return CheckContext(adapter=SimpleNamespace(root=tmp_path / "adapter"),
                        base=SimpleNamespace(base_dir=tmp_path / "base"), merged=tmp_path / "merged" if merged else None,
                        failed_prerequisites=list(failed_prerequisites), options=CheckOptions(**options),
                        progress=said.append if said is not None else None)


def test_packed_reason_names_the_directory_and_its_scheme(tmp_path, monkeypatch):
    from harness.checks import quantized

    declared = {tmp_path / "base": None, tmp_path / "merged": quant("gptq", "gptq-4bit")}
    reads = []
    monkeypatch.setattr(quantized, "read_quantization", lambda d: reads.append(d) or declared[d])
    ctx = quantized_ctx(tmp_path)
    assert quantized.packed_reason(ctx, "X") == (
        f"the merged checkpoint {tmp_path / 'merged'} is saved quantized (gptq-4bit, gptq): its checkpoint holds packed "
        "integers and scales, not weights, so X cannot be checked on it; qlora-merge-gap and merged-quantized measure "
        "a quantized base and its merges instead")
    assert quantized.packed_reason(ctx, "X") is not None and len(reads) == 2  # read once per directory
    declared[tmp_path / "base"] = quant()
    ctx = quantized_ctx(tmp_path)
    assert quantized.packed_reason(ctx, "Y").startswith(f"the base {tmp_path / 'base'} is saved quantized (nf4, "
                                                        "bitsandbytes)")
    declared[tmp_path / "base"] = declared[tmp_path / "merged"] = None
    assert quantized.packed_reason(quantized_ctx(tmp_path), "Z") is None
    assert quantized.packed_reason(CheckContext(), "Z") is None and quantized.declared_quantization(ctx, None) is None


def gap(name, value, effect=1.0):
    from harness.checks.measure.qlora import Gap

    return Gap(name, {"text": value, "image": value / 2}, {"text": effect})


@pytest.fixture
def qlora_measured(monkeypatch):
    from harness.checks.measure import qlora

    calls = []

    def setup(measured):
        def measure(base, adapter, merged, *, trained_on_choice, progress):
            calls.append((base, adapter, merged, trained_on_choice, progress))
            return measured
        monkeypatch.setattr(qlora, "measure_qlora_gap", measure)
        return calls

    return setup


def test_qlora_merge_gap_skips_what_it_cannot_measure(tmp_path, qlora_measured):
    from harness.checks.measure.qlora import QLoraGap

    check = get_check("qlora-merge-gap")
    assert run_check(check, CheckContext()).message == "no --base-model given"
    ctx = quantized_ctx(tmp_path)
    ctx.adapter = None
    assert run_check(check, ctx).message == "the adapter could not be read (see the static checks)"
    got = run_check(check, quantized_ctx(tmp_path, failed_prerequisites=["config-valid", "key-coverage",
                                                                          "empty-tensors"]))
    assert got.message == "the adapter cannot be loaded until config-valid, empty-tensors pass(es)"
    said = []
    calls = qlora_measured(QLoraGap(skipped="the base is not quantized"))
    ctx = quantized_ctx(tmp_path, said=said, trained_on_quantized="nf4")
    got = run_check(check, ctx)
    assert (got.status, got.message) == ("skip", "the base is not quantized")
    ((base, adapter, merged, choice, progress),) = calls
    assert (base, adapter, merged, choice) == (tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", "nf4")
    progress("hello")
    assert said == ["hello"]


def test_qlora_merge_gap_judges_the_given_merge(tmp_path, qlora_measured):
    from harness.checks.measure.qlora import DEQUANT, GIVEN, MERGE_GAP_LIMIT, SHIPPED16, QLoraGap

    check = get_check("qlora-merge-gap")
    gaps = {SHIPPED16: gap(SHIPPED16, 0.8), DEQUANT: gap(DEQUANT, 0.1), GIVEN: gap(GIVEN, 0.8)}
    qlora_measured(QLoraGap(quantization=quant(), effect={"text": 1.0, "image": 0.5}, gaps=gaps, given_is=SHIPPED16,
                            notes=["a note"]))
    ctx = quantized_ctx(tmp_path)
    got = run_check(check, ctx)
    head = (f"on the nf4 base the adapter's effect is 1; {SHIPPED16} 0.8 (0.80x the effect); {DEQUANT} 0.1 (0.10x the "
            "effect)")
    assert got.status == "fail"
    assert got.message == (f"{head}; the given --merged {tmp_path / 'merged'} is the {SHIPPED16}, 0.8 from what was "
                           f"evaluated (0.80x the effect): more than {MERGE_GAP_LIMIT}x the effect, so the released "
                           "model is not the one that was evaluated")
    assert ctx.notes == ["qlora-merge-gap: a note"]
    assert got.details["quantization"] == quant().describe() and got.details["limit_fraction_of_effect"] == 0.5
    assert got.details["effect"] == {"text": 1.0, "image": 0.5} and got.details["given_is"] == SHIPPED16
    assert got.details[SHIPPED16] == {"per_row_class": {"text": 0.8, "image": 0.4}, "fraction_of_effect": 0.8}
    for given_is, words in ((DEQUANT, f"the {DEQUANT}"), ("neither", "neither the 16-bit nor the dequantized merge"),
                            ("odd", "odd")):
        qlora_measured(QLoraGap(quantization=quant(), effect={"text": 1.0}, given_is=given_is,
                                gaps={DEQUANT: gap(DEQUANT, 0.1), GIVEN: gap(GIVEN, 0.5)}))
        got = run_check(check, quantized_ctx(tmp_path))
        assert got.status == "pass"  # exactly at the limit
        assert got.message == (f"on the nf4 base the adapter's effect is 1; {DEQUANT} 0.1 (0.10x the effect); the "
                               f"given --merged {tmp_path / 'merged'} is {words}, 0.5 from what was evaluated (0.50x "
                               "the effect)")


def test_qlora_merge_gap_without_a_given_merge_warns_about_the_shipped_one(tmp_path, qlora_measured):
    from harness.checks.measure.qlora import DEQUANT, MERGE_GAP_LIMIT, SHIPPED16, QLoraGap

    check = get_check("qlora-merge-gap")
    qlora_measured(QLoraGap(quantization=quant(), effect={"text": 2.0, "image": 1.0},
                            gaps={SHIPPED16: gap(SHIPPED16, 1.2, 2.0), DEQUANT: gap(DEQUANT, 0.1, 2.0)}))
    got = run_check(check, quantized_ctx(tmp_path, merged=False))
    head = f"on the nf4 base the adapter's effect is 2; {SHIPPED16} 1.2 (0.60x the effect); {DEQUANT} 0.1 (0.05x the effect)"
    assert (got.status, got.message) == ("warn", f"{head}: the 16-bit merge users ship would differ from what was "
                                                 f"evaluated by more than {MERGE_GAP_LIMIT}x the effect (no --merged "
                                                 "given to judge)")
    qlora_measured(QLoraGap(quantization=quant(), effect={"text": 2.0},
                            gaps={SHIPPED16: gap(SHIPPED16, 1.0, 2.0), DEQUANT: gap(DEQUANT, 0.1, 2.0)}))
    got = run_check(check, quantized_ctx(tmp_path, merged=False))
    assert got.status == "pass" and got.message.startswith("on the nf4 base the adapter's effect is 2; ")
    qlora_measured(QLoraGap(quantization=quant(), effect={"text": 2.0}, gaps={DEQUANT: gap(DEQUANT, 1.9, 2.0)}))
    assert run_check(check, quantized_ctx(tmp_path, merged=False)).status == "pass"


@pytest.fixture
def merged_q(monkeypatch):
    """``merged_q(declared, found=None, bnb=None)``: the merged directory declares ``declared``; the 4-bit merge
    measures ``found``; bitsandbytes is unavailable for reason ``bnb``."""
    from harness.checks import quantized
    from harness.checks.measure import quantized_merge
    from harness.model import quantization

    calls = []

    def setup(declared, found=None, bnb=None):
        monkeypatch.setattr(quantized, "read_quantization", lambda d: declared)
        monkeypatch.setattr(quantization, "bnb_unavailable_reason", lambda: bnb)
        monkeypatch.setattr(quantized_merge, "measure_quantized_merge",
                            lambda base, adapter, merged, q: calls.append((base, adapter, merged, q)) or found)
        return calls

    return setup


def test_merged_quantization_rejects_packed_integer_claims(tmp_path, merged_q):
    check = get_check("merged-quantized")
    config = tmp_path / "merged" / "config.json"
    assert run_check(check, quantized_ctx(tmp_path, merged=False)).message == "no --merged given"
    merged_q(None)
    got = run_check(check, quantized_ctx(tmp_path))
    assert (got.status, got.message) == ("pass", f"{config} declares no quantization: a plain merged checkpoint")
    merged_q(quant("gptq", "gptq-4bit"))
    got = run_check(check, quantized_ctx(tmp_path))
    assert got.status == "fail"
    assert got.message == (f"{config}: declares a gptq-4bit quantization_config, so a LoRA merge cannot have been "
                           "written into it (gptq stores packed integers that merge_and_unload cannot add ΔW to, and a "
                           "checkpoint that claims it while holding merged float weights does not load)")
    assert got.fix == ("merge the adapter into the 16-bit base the gptq model was made from, then quantize the merged "
                       "model with gptq again; or ship the adapter beside the quantized base")
    assert got.details == {"quantization": quant("gptq", "gptq-4bit").describe()}
    merged_q(quant(scheme="int8", bits=8))
    got = run_check(check, quantized_ctx(tmp_path))
    assert (got.status, got.message) == ("skip", f"{config} declares bitsandbytes int8: a merge into int8 weights is "
                                                 "not measured (4-bit only)")
    merged_q(quant())
    got = run_check(check, quantized_ctx(tmp_path, failed_prerequisites=["unsafe-pickle"]))
    assert got.message == "the adapter cannot be loaded until unsafe-pickle pass(es)"
    merged_q(quant(), bnb="no CPU kernels")
    got = run_check(check, quantized_ctx(tmp_path))
    assert (got.status, got.message) == ("skip", f"{config} declares bitsandbytes nf4 and no CPU kernels")


def test_merged_quantization_judges_the_4bit_merge(tmp_path, merged_q):
    from harness.checks.measure.quantized_merge import QuantizedMerge

    check = get_check("merged-quantized")
    weights = tmp_path / "merged" / "model.safetensors"
    said = []
    calls = merged_q(quant(), QuantizedMerge(modules=4, lost=0.5))
    got = run_check(check, quantized_ctx(tmp_path, said=said))
    assert (got.status, got.message) == ("pass", f"{weights}: nf4 merge equals requant(dequant(W) + ΔW) in 4 weights "
                                                 "and kept ΔW within 50%")
    assert got.details == {"quantization": quant().describe(), "modules": 4, "mismatched": {}, "delta_lost": 0.5}
    assert calls == [(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", quant())]
    assert said == ["merged-quantized: comparing the 4-bit merged weights with requant(dequant(W) + ΔW)"]
    merged_q(quant(), QuantizedMerge(modules=4, lost=0.91234))
    got = run_check(check, quantized_ctx(tmp_path))
    assert got.status == "fail" and got.details["delta_lost"] == 0.9123
    assert got.message == (f"{weights}: merge_and_unload into packed nf4 weights requantized dequant(W) + ΔW and lost "
                           "91% of ΔW (‖merged − (dequant(W) + ΔW)‖ / ‖ΔW‖ over 4 adapted weights): the saved model "
                           "is close to the base, not base + adapter")
    merged_q(quant(), QuantizedMerge(modules=4, mismatched={"m.q": 0.25, "m.k": 0.5}, lost=0.9))
    got = run_check(check, quantized_ctx(tmp_path))
    assert got.status == "fail"
    assert got.message == (f"{weights}: 2 of 4 adapted 4-bit weight(s) are not what dequant(W) + ΔW requantizes to "
                           "(e.g. m.q: 25% of its elements differ, more than 1%): not a merge of this adapter into "
                           "this base")
    assert got.fix == ("re-merge into the 16-bit or dequantized base from the base and adapter you checked, and "
                       "quantize the merged model afterwards if you must ship 4 bits")
    merged_q(quant(), QuantizedMerge(modules=0, error="cannot load", lost=0.9))
    got = run_check(check, quantized_ctx(tmp_path))
    assert (got.status, got.message) == ("fail", f"{weights}: the 4-bit merged checkpoint could not be compared with "
                                                 "base + adapter: cannot load")


# ---------------------------------------------------------------------------------------------
# merged_advice: the fix follows the cause


def ratios(*values, rank=4, scaling=2.0):
    from harness.checks.merged_advice import DeltaRatio

    return [DeltaRatio(f"m{i}.weight", v, rank, scaling) for i, v in enumerate(values)]


def test_scaling_cause_names_each_clean_factor():
    from harness.checks.merged_advice import scaling_cause

    assert scaling_cause([], 3, {}) is None
    assert scaling_cause(ratios(0.5), 1, {"lora_alpha": 8}) == (
        "every wrong weight is exactly 0.5x off: the merge added B·A without the scaling s = lora_alpha/r = 2; or the "
        "merged ΔW is half the adapter's s·B·A (as if lora_alpha were 4, not 8): the merge used another lora_alpha or r "
        "than adapter_config.json, or added ΔW more than once")
    assert scaling_cause(ratios(2.0, 2.0), 3, {"lora_alpha": 8}) == (
        "2 of 3 wrong weight is exactly 2x off: the merge used rsLoRA scaling (lora_alpha/sqrt(r)) but "
        "adapter_config.json has use_rslora false (lora_alpha/r = 2); or the merged ΔW is twice the adapter's s·B·A (as "
        "if lora_alpha were 16, not 8): the merge used another lora_alpha or r than adapter_config.json, or added ΔW "
        "more than once")
    assert scaling_cause(ratios(0.5, scaling=4.0), 1, {"lora_alpha": 16, "use_rslora": True}) == (
        "every wrong weight is exactly 0.5x off: the merge used lora_alpha/r but the adapter uses rsLoRA (use_rslora "
        "true: lora_alpha/sqrt(r)); the merging PEFT ignored use_rslora (it needs peft >= 0.7); or the merged ΔW is "
        "half the adapter's s·B·A (as if lora_alpha were 8, not 16): the merge used another lora_alpha or r than "
        "adapter_config.json, or added ΔW more than once")
    assert scaling_cause(ratios(0.25, scaling=4.0), 1, {"lora_alpha": 16, "use_rslora": True}) == (
        "every wrong weight is exactly 0.25x off: the merge added B·A without the scaling s = lora_alpha/sqrt(r) = 4; "
        "or the merged ΔW is 1/4x the adapter's s·B·A (as if lora_alpha were 4, not 16): the merge used another "
        "lora_alpha or r than adapter_config.json, or added ΔW more than once")
    assert scaling_cause(ratios(1.5), 1, {"lora_alpha": "x"}) == (
        "every wrong weight is exactly 1.5x off: the merged ΔW is 3/2x the adapter's s·B·A: the merge used another "
        "lora_alpha or r than adapter_config.json, or added ΔW more than once")


def test_scaling_cause_stays_silent_without_a_clean_story():
    from harness.checks.merged_advice import scaling_cause

    assert scaling_cause(ratios(0.37), 1, {"lora_alpha": 8}) is None  # 3/8 ≈ 0.375 is not within 1e-3
    assert scaling_cause(ratios(1.0, scaling=1.0), 1, {"lora_alpha": 4}) is None  # scaling 1: nothing to omit
    assert scaling_cause(ratios(-2.0), 1, {"lora_alpha": 8}) is None
    assert scaling_cause(ratios(0.0), 1, {"lora_alpha": 8}) is None
    assert scaling_cause(ratios(130.0, scaling=3.0), 1, {"lora_alpha": 8}) is None  # a numerator beyond 64
    assert scaling_cause(ratios(2.0, 3.0), 2, {"lora_alpha": 8}) is None
    assert scaling_cause(ratios(2.0, 2.0025), 2, {"lora_alpha": 8}) is None  # 2.0025 is not 2 within 1e-3 · 2
    assert scaling_cause(ratios(2.0, 2.0019), 2, {"lora_alpha": 8}).startswith("every wrong weight is exactly 2x off")
    assert scaling_cause(ratios(1.0, rank=1, scaling=1.0), 1, {"lora_alpha": 1}) is None
    assert scaling_cause(ratios(1.0, rank=1, scaling=1.0), 1, {"lora_alpha": 1, "use_rslora": True}) is None
    # sqrt(r) for a rank-1 adapter is 1: no rsLoRA story either way
    assert "rsLoRA" not in (scaling_cause(ratios(2.0, rank=1), 1, {"lora_alpha": 8}) or "")


def test_scaling_cause_names_ignored_patterns_when_factors_differ():
    from harness.checks.merged_advice import scaling_cause

    got = scaling_cause(ratios(2.0, 0.5, 3.0, 4.0), 4, {"alpha_pattern": {"q": 16}, "rank_pattern": {"k": 2}})
    assert got == ("ΔW is off by different factors per module (2x, 0.5x, 3x): the merge ignored alpha_pattern / "
                   "rank_pattern in adapter_config.json; merge with a PEFT that applies them "
                   "(PeftModel.from_pretrained → merge_and_unload)")
    got = scaling_cause(ratios(2.0, 0.5), 2, {"rank_pattern": {"k": 2}, "alpha_pattern": {}})
    assert got.startswith("ΔW is off by different factors per module (2x, 0.5x): the merge ignored rank_pattern in")
    assert scaling_cause(ratios(2.0, 2.0), 2, {"rank_pattern": {"k": 2}}).startswith("every wrong weight is exactly 2x")


def test_dtype_cause_names_both_float_dtypes():
    from harness.checks.merged_advice import dtype_cause

    assert dtype_cause({"float32", "int64"}, {"float32"}) is None
    assert dtype_cause({"int64"}, {"float16"}) is None
    assert dtype_cause({"float32"}, {"int64"}) is None
    assert dtype_cause({"bfloat16", "float32"}, {"float16", "int64"}) == (
        "the merged weights are stored as float16, the base's as bfloat16, float32: merge in float32 and save in the "
        "base's dtype (model.to(torch.bfloat16).save_pretrained(...)); float16 overflows where bfloat16 does not, and "
        "float32 doubles the size")


class _Advice:
    name = "toy"
    merge_advice = {"missing": "MISSING", "folded": "FOLDED", "unmerged": "; UNMERGED"}

    def is_branch_param(self, key):
        return "branch" in key


def test_fixes_one_per_cause_in_order():
    from harness.checks.merged import MergedFindings
    from harness.checks.merged_advice import fixes

    assert fixes(MergedFindings(), family=_Advice(), plora=True, scaling=None, dtype=None, ties=[]) == []
    every = MergedFindings(missing=["a.weight", "x.branch"], plora_folded=["f"], unmerged=["u.weight"],
                           wrong_delta=["w"], copies_wrong=["c"], tokens_wrong=["t"], changed=["ch.weight"],
                           unexpected=["ex.weight"])
    got = fixes(every, family=_Advice(), plora=True, scaling=None, dtype=None, ties=["tie"])
    assert got == [
        "MISSING", "FOLDED",
        "merge every adapted module (e.g. u.weight was left at the base): PeftModel.from_pretrained(base, adapter)."
        "merge_and_unload(), then save_pretrained; UNMERGED",
        "re-merge in float32 with PeftModel.from_pretrained(base, adapter).merge_and_unload() (a merge into a "
        "bfloat16/float16 or quantized base rounds ΔW; DoRA needs the magnitude renormalisation)",
        "write the trained modules_to_save copies into the merged model (merge_and_unload does; a hand merge must copy "
        "them)",
        "write the trained token rows into the embedding (merge_and_unload does; a hand merge must copy exactly those "
        "rows)",
        "save the tied pair untied (tie_word_embeddings: false and a separate weight for each)",
        "leave every tensor the adapter does not touch at the base's value (e.g. ch.weight); check that --base-model is "
        "the base the merge was made from",
        "remove tensors the base does not have (e.g. ex.weight), or check that --base-model is the base the merge was "
        "made from"]
    plain = fixes(every, family=_Advice(), plora=False, scaling="SCALING", dtype="DTYPE", ties=[])
    assert plain[0] == ("save the whole merged model with save_pretrained, not a filtered state dict (2 tensor(s) "
                        "missing, e.g. a.weight)")
    assert plain[2].endswith("then save_pretrained") and plain[3] == "SCALING" and plain[-2:] == [
        "DTYPE", "remove tensors the base does not have (e.g. ex.weight), or check that --base-model is the base the "
        "merge was made from"]
    assert plain.count("DTYPE") == 1
    only_dtype = fixes(MergedFindings(wrong_delta=["w"]), family=_Advice(), plora=False, scaling=None, dtype="DTYPE",
                       ties=[])
    assert only_dtype == ["DTYPE"]
    dropped = fixes(MergedFindings(copies_dropped=["c"], tokens_dropped=["t"]), family=_Advice(), plora=False,
                    scaling=None, dtype="DTYPE", ties=[])
    assert dropped[0].startswith("write the trained modules_to_save") and dropped[1].startswith(
        "write the trained token rows") and dropped[2] == "DTYPE"


def test_fixes_for_a_family_without_advice():
    from harness.checks.merged import MergedFindings
    from harness.checks.merged_advice import fixes
    from harness.model.families import GENERIC

    found = MergedFindings(missing=["x.branch"], plora_folded=["f"], unmerged=["u"])
    got = fixes(found, family=GENERIC, plora=True, scaling=None, dtype=None, ties=[])
    assert got == ["save the whole merged model with save_pretrained, not a filtered state dict (1 tensor(s) missing, "
                   "e.g. x.branch)",
                   "merge only the adapter's ΔW: the base model's own branch must stay a separate module; "
                   "PeftModel.merge_and_unload leaves it alone",
                   "merge every adapted module (e.g. u was left at the base): PeftModel.from_pretrained(base, adapter)."
                   "merge_and_unload(), then save_pretrained"]
    missing_plain = fixes(MergedFindings(missing=["a.weight"]), family=_Advice(), plora=True, scaling=None, dtype=None,
                          ties=[])
    assert missing_plain[0].startswith("save the whole merged model")


# ---------------------------------------------------------------------------------------------
# more than eight trainable tokens: the entries list eight; the rows a small error reaches


TOKENS_KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def ten_tokens(built, out: Path) -> Path:
    """The llama tokens adapter with ten trainable tokens (ids 3..12)."""
    rows = torch.randn(10, 32, generator=torch.Generator().manual_seed(1)) * 0.1
    return edited(built.adapter("tokens"), out, lambda t: t.update({TOKENS_KEY: rows}),
                  config=lambda c: c.update(trainable_token_indices=list(range(3, 13))))


def test_ten_dropped_token_rows_list_the_first_eight(arch, tmp_path):
    built, info = arch("llama", "tokens")
    key = "model.embed_tokens.weight"
    base = base_tensors(built)[key]
    adapter = ten_tokens(built, tmp_path / "a")
    merged = edited(built.merged("tokens"), tmp_path / "m", lambda t: t.update({key: base.clone()}))
    got = verdict(adapter, info, merged)
    assert got.details["tokens_dropped"] == [f"{key} (trainable tokens of model.embed_tokens: rows [3, 4, 5, 6, 7, 8, "
                                             "9, 10] hold the base values, not the trained ones)"]


def test_ten_wrong_token_rows_list_the_first_eight(arch, tmp_path):
    built, info = arch("llama", "tokens")
    key = "model.embed_tokens.weight"
    adapter = ten_tokens(built, tmp_path / "a")

    def change(t):
        t[key] = t[key].clone()
        t[key][3:13] = 1.0

    got = verdict(adapter, info, edited(built.merged("tokens"), tmp_path / "m", change))
    (entry,) = got.details["tokens_wrong"]
    eight = "[3, 4, 5, 6, 7, 8, 9, 10]"
    assert entry.startswith(f"{key} (trainable tokens of model.embed_tokens {eight}: rows {eight} are not the trained "
                            "values; error ")


def test_an_untrained_row_just_beyond_the_tolerance_is_named(arch, tmp_path):
    from harness.numerics.tolerances import policy_for

    built, info = arch("llama", "tokens")
    key = "model.embed_tokens.weight"
    rtol = policy_for(torch.float32).merged_rel

    def change(t):
        t[key] = t[key].clone()
        t[key][20, 0] += 3 * rtol * float(t[key].abs().max())

    got = verdict(built.adapter("tokens"), info, edited(built.merged("tokens"), tmp_path / "m", change))
    (entry,) = got.details["tokens_wrong"]
    assert entry.startswith(f"{key} (trainable tokens of model.embed_tokens [3, 5, 7]: rows [20] changed that the "
                            "adapter does not train; error ")


# ---------------------------------------------------------------------------------------------
# merged-whole: one problem, three problems, and a passing report's details


def test_merged_whole_with_one_or_three_problems(arch, tmp_path):
    built, info = arch("llama")
    check = get_check("merged-whole")

    def run(merged):
        return run_check(check, CheckContext(adapter=read_adapter(built.adapter("plain")), base=info, merged=merged))

    got = run(built.merged("plain"))
    assert got.status == "pass" and got.details == {"problems": []}
    one = Path(shutil.copytree(built.merged("plain"), tmp_path / "one"))
    (one / "generation_config.json").unlink()
    got = run(one)
    (problem,) = got.details["problems"]
    assert got.message == f"generation_config.json: {problem['problem']}" and got.fix == problem["fix"]
    three = Path(shutil.copytree(one, tmp_path / "three"))
    shutil.copyfile(built.adapter("plain") / "adapter_config.json", three / "adapter_config.json")
    config = json.loads((three / "config.json").read_text())
    (three / "config.json").write_text(json.dumps({**config, "architectures": ["OtherForCausalLM"]}))
    got = run(three)
    texts = [f"{p['file']}: {p['problem']}" for p in got.details["problems"]]
    assert len(texts) >= 3
    assert got.message == f"{texts[0]} (+{len(texts) - 1} more: {'; '.join(texts[1:])})"


# ---------------------------------------------------------------------------------------------
# PLoRA folded: a small branch, and a base without one of the branch's tensors


LAYER = "model.layers.1.attention.wqkv"


@pytest.fixture(scope="module")
def ixc_merged(default_bundle, synthetic_cache) -> Path:
    from harness.synthetic.bundle import build_merged_dir

    return build_merged_dir(default_bundle, synthetic_cache)


def test_a_small_plora_branch_folded_in_is_still_named(default_bundle, ixc_merged, tmp_path):
    """A PLoRA branch whose B·A has a squared norm far below 1: the fitted scale must not be clamped."""
    small = {}

    def shrink(t):
        t[f"{LAYER}.Plora_A.weight"] = t[f"{LAYER}.Plora_A.weight"] * 1e-3
        small["branch"] = t[f"{LAYER}.Plora_B.weight"] @ t[f"{LAYER}.Plora_A.weight"]

    base = edited(default_bundle.base_dir, tmp_path / "base", shrink)
    assert float((small["branch"] ** 2).sum()) < 1e-2

    def fold(t):
        t[f"{LAYER}.Plora_A.weight"] = t[f"{LAYER}.Plora_A.weight"] * 1e-3
        t[f"{LAYER}.weight"] = t[f"{LAYER}.weight"] + small["branch"]

    merged = edited(ixc_merged, tmp_path / "m", fold)
    got = verdict(default_bundle.adapter_dir, inspect_base(base), merged)
    assert got.details["plora_folded"] == [f"{LAYER}.weight"], got.details["problems"]


def test_a_base_without_one_plora_tensor_is_no_crash(default_bundle, ixc_merged, tmp_path):
    base = edited(default_bundle.base_dir, tmp_path / "base", lambda t: t.pop(f"{LAYER}.Plora_A.weight"))

    def change(t):
        t.pop(f"{LAYER}.Plora_A.weight")
        t[f"{LAYER}.weight"] = t[f"{LAYER}.weight"] + noise_like(t[f"{LAYER}.weight"], 0.05)

    got = verdict(default_bundle.adapter_dir, inspect_base(base), edited(ixc_merged, tmp_path / "m", change))
    assert [e.split(" (")[0] for e in got.details["wrong_delta"]] == [f"{LAYER}.weight"], got.message


# ---------------------------------------------------------------------------------------------
# ties: which config decides, and a tied embedding among other adapted modules; tokens listed for the embedding


@CURRENT_STACK_ONLY
def test_the_tie_flag_defaults_to_the_base_config_then_to_the_base_model(arch, tmp_path):
    import dataclasses

    built, info = arch("gpt2")
    adapter, good = built.adapter("modules_to_save"), built.merged("modules_to_save")
    merged = edited(good, tmp_path / "m", config=lambda c: c.pop("tie_word_embeddings"))
    # neither config says: the base model ties its embedding and head (transformers' default), so a reload re-ties
    base = edited(built.base, tmp_path / "base", config=lambda c: c.pop("tie_word_embeddings"))
    got = verdict(adapter, dataclasses.replace(info, base_dir=base), merged)
    assert len(got.details["ties"]) == 1 and "tie_word_embeddings true (the default)" in got.details["ties"][0]
    # the base's config says untied: that is what a reload of the merged directory (which says nothing) follows
    untied = edited(built.base, tmp_path / "untied", config=lambda c: c.update(tie_word_embeddings=False))
    got = verdict(adapter, dataclasses.replace(info, base_dir=untied), merged)
    assert got.details["ties"] == [] and got.details["problems"] == ["config tie_word_embeddings is None, base has "
                                                                     "False"]


def test_a_tied_embedding_adapted_with_other_modules_is_still_named(arch, tmp_path):
    """LoRA on the attention and on the tied embedding: every adapted weight is looked at, the tied one too."""
    built, info = arch("gpt2")
    plain = load_file(built.adapter("plain") / "adapter_model.safetensors")
    targets = json.loads((built.adapter("plain") / "adapter_config.json").read_text())["target_modules"]
    adapter = edited(built.adapter("embedding"), tmp_path / "a", lambda t: t.update(plain),
                     config=lambda c: c.update(target_modules=sorted({*targets, "wte"})))
    got = verdict(adapter, info, built.merged("embedding"))
    assert got.details["ties"] == [tie_problem("transformer.wte", "lm_head", "transformer.wte.weight",
                                               "transformer.wte.weight and lm_head.weight")]


def test_a_list_of_trainable_tokens_is_for_the_input_embedding_only(arch, tmp_path):
    built, info = arch("llama", "tokens")
    head_key = "base_model.model.lm_head.token_adapter.trainable_tokens_delta"
    adapter = edited(built.adapter("tokens"), tmp_path / "a", lambda t: t.update({head_key: t[TOKENS_KEY] + 1}))
    got = verdict(adapter, info, built.merged("tokens"))
    assert got.status == "pass", got.message
    assert got.details["ignored_adapter_tensors"] == [
        "1 saved tensor(s) get no effect in the reference: trainable_token_indices is a list, so PEFT trains tokens of "
        f"the input embedding model.embed_tokens only (e.g. {head_key})"]


# ---------------------------------------------------------------------------------------------
# the report of many wrong weights: counts, caps, ratios, the dtype story, the PLoRA tensor named first


def test_every_weight_mis_scaled_is_counted_and_the_details_cap_at_ten(arch):
    built, info = arch("llama")
    got = verdict(built.adapter("plain"), info, built.broken("mis-scaled"))
    assert got.message.startswith(f"14 adapted weight(s) differ from W + s·B·A, e.g. {got.details['wrong_delta'][0]}; "
                                  "every wrong weight is exactly 2x off: ")
    assert len(got.details["wrong_delta"]) == 10 and len(got.details["delta_ratios"]) == 10
    assert set(got.details["delta_ratios"].values()) == {2.0}


def test_every_weight_unmerged_is_counted_and_the_details_cap_at_ten(arch):
    built, info = arch("llama")
    got = verdict(built.adapter("plain"), info, built.base)
    assert got.message.startswith("14 adapted weight(s) equal the base (layer not merged), e.g. ")
    assert len(got.details["unmerged"]) == 10


def test_delta_ratios_are_rounded_to_six_digits(arch, tmp_path):
    built, info = arch("llama")
    base, merged = base_tensors(built), load_file(built.merged("plain") / "model.safetensors")
    keys = [k for k in built.info["broken"]["mis-scaled"]]

    def scale(t):
        for k in keys[:1]:
            t[k] = base[k] + 0.5 * (merged[k] - base[k])
        for k in keys[1:2]:
            t[k] = base[k] + 1.234568 * (merged[k] - base[k])

    got = verdict(built.adapter("plain"), info, edited(built.merged("plain"), tmp_path / "m", scale))
    assert got.details["delta_ratios"] == {keys[0]: 0.5, keys[1]: 1.234568}


def test_a_bfloat16_merge_with_a_changed_tensor_names_the_dtypes(arch, tmp_path):
    built, info = arch("llama")

    def change(t):
        t["model.norm.weight"] = t["model.norm.weight"] * 1.5
        t.update({k: v.to(torch.bfloat16) for k, v in t.items()})

    got = verdict(built.adapter("plain"), info, edited(built.merged("plain"), tmp_path / "m", change))
    assert got.details["changed"] == ["model.norm.weight"]
    assert got.fix.startswith("the merged weights are stored as bfloat16, the base's as float32: merge in float32 and "
                              "save in the base's dtype (model.to(torch.float32).save_pretrained(...))")


def test_missing_tensors_name_a_plora_one_first(default_bundle, ixc_merged, tmp_path):
    keys = sorted(load_file(ixc_merged / "model.safetensors"))
    plora = [k for k in keys if "Plora" in k][-1]
    plain = next(k for k in keys if "Plora" not in k and k < plora)
    assert plain < plora
    merged = edited(ixc_merged, tmp_path / "m", lambda t: (t.pop(plain), t.pop(plora)))
    got = verdict(default_bundle.adapter_dir, inspect_base(default_bundle.base_dir), merged)
    assert got.message.startswith(f"2 base tensor(s) missing from the merged checkpoint (re-initialised on load), "
                                  f"e.g. {plora}")
    assert got.details["missing"] == sorted([plain, plora])
