"""``merged-matches`` and ``merged-whole``: the official merge passes; each way a merged checkpoint goes wrong
fails by name (the file and the fix)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import harness
from harness.compat import DTYPE_KW

LAYER = "model.layers.1.attention.wqkv"


@pytest.fixture(scope="module")
def merged_dir(default_bundle, tmp_path_factory) -> Path:
    """The official recipe: base + PeftModel.from_pretrained → merge_and_unload → save_pretrained (+ code, tokenizer)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("merged")
    base = AutoModelForCausalLM.from_pretrained(default_bundle.base_dir, trust_remote_code=True, **{DTYPE_KW: torch.float32})
    merged = PeftModel.from_pretrained(base, default_bundle.adapter_dir).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    for path in default_bundle.base_dir.iterdir():  # code and tokenizer files (transformers 4.x also writes
        if path.suffix == ".py" or path.name.startswith(("tokenizer", "special_tokens")):  # special_tokens_map)
            shutil.copyfile(path, out / path.name)
    return out


def clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_weights(directory: Path, change) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def edit_config(directory: Path, change) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def result(bundle, merged):
    return harness.check(bundle.adapter_dir, base_model=bundle.base_dir, merged=merged, trust_remote_code=True,
                         only=["merged-matches"], isolated=False).get("merged-matches")


def test_official_merge_passes(default_bundle, merged_dir):
    got = result(default_bundle, merged_dir)
    assert got.status == "pass", got
    assert got.details["max_rel_error"] < 1e-6


def adapter_delta(bundle, module):
    tensors = load_file(bundle.adapter_dir / "adapter_model.safetensors")
    config = json.loads((bundle.adapter_dir / "adapter_config.json").read_text())
    a = tensors[f"base_model.model.{module}.lora_A.weight"]
    b = tensors[f"base_model.model.{module}.lora_B.weight"]
    return b @ a * (config["lora_alpha"] / config["r"])


def base_tensors(bundle):
    return load_file(bundle.base_dir / "model.safetensors")


def test_double_scaling_is_caught(default_bundle, merged_dir, tmp_path):
    broken = clone(merged_dir, tmp_path / "m")
    delta = adapter_delta(default_bundle, LAYER)
    edit_weights(broken, lambda t: t.update({f"{LAYER}.weight": t[f"{LAYER}.weight"] + delta}))
    got = result(default_bundle, broken)
    assert got.status == "fail" and "differ from W + s·B·A" in got.message and LAYER in got.message


def test_skipped_layer_is_caught(default_bundle, merged_dir, tmp_path):
    broken = clone(merged_dir, tmp_path / "m")
    base = base_tensors(default_bundle)
    edit_weights(broken, lambda t: t.update({f"{LAYER}.weight": base[f"{LAYER}.weight"]}))
    got = result(default_bundle, broken)
    assert got.status == "fail" and "equal the base (layer not merged)" in got.message


def test_plora_folded_into_base_weight_is_named(default_bundle, merged_dir, tmp_path):
    broken = clone(merged_dir, tmp_path / "m")
    base = base_tensors(default_bundle)
    plora = base[f"{LAYER}.Plora_B.weight"] @ base[f"{LAYER}.Plora_A.weight"]
    edit_weights(broken, lambda t: t.update({f"{LAYER}.weight": t[f"{LAYER}.weight"] + plora}))
    got = result(default_bundle, broken)
    assert got.status == "fail" and "PLoRA branch folded into the base weight" in got.message


def test_missing_plora_tensor_means_reinitialised_on_load(default_bundle, merged_dir, tmp_path):
    broken = clone(merged_dir, tmp_path / "m")
    edit_weights(broken, lambda t: t.pop(f"{LAYER}.Plora_A.weight"))
    got = result(default_bundle, broken)
    assert got.status == "fail" and "missing from the merged checkpoint" in got.message
    assert f"{LAYER}.Plora_A.weight" in got.message


def test_retied_head_is_caught(default_bundle, merged_dir, tmp_path):
    broken = clone(merged_dir, tmp_path / "m")
    edit_weights(broken, lambda t: t.update({"output.weight": t["model.tok_embeddings.weight"].clone()}))
    got = result(default_bundle, broken)
    assert got.status == "fail" and "does not touch changed, e.g. output.weight" in got.message


def ships_whole(bundle, merged, base=None):
    return harness.check(bundle.adapter_dir, base_model=base or bundle.base_dir, merged=merged, trust_remote_code=True,
                         only=["merged-whole"], isolated=False).get("merged-whole")


def assert_names(got, file, fragment, fix_fragment):
    """The check fails, and its first (or one listed) problem names ``file``, what is wrong and the fix."""
    assert got.status == "fail", got
    named = [p for p in got.details["problems"] if p["file"] == file and fragment in p["problem"]]
    assert named, got.details["problems"]
    assert fix_fragment in named[0]["fix"] and fix_fragment in got.fix, (named[0], got.fix)
    assert file in got.message


def test_official_merge_ships_whole(default_bundle, merged_dir):
    got = ships_whole(default_bundle, merged_dir)
    assert got.status == "pass", got


def test_adapter_left_inside_the_merged_directory_is_caught(default_bundle, merged_dir, tmp_path):
    """What was seen 1: the merged weights plus adapter_config.json / adapter_model.safetensors in one directory;
    transformers' from_pretrained applies the adapter again on top. merged-matches compares tensors and passes."""
    broken = clone(merged_dir, tmp_path / "m")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(default_bundle.adapter_dir / name, broken / name)
    assert result(default_bundle, broken).status == "pass"
    got = ships_whole(default_bundle, broken)
    assert_names(got, "adapter_config.json", "applies the adapter a second time", "delete adapter_config.json, "
                 "adapter_model.safetensors")


def test_adapter_files_beside_merged_weights_do_change_what_from_pretrained_loads(default_bundle, merged_dir, tmp_path):
    """The premise of the check above, on the installed transformers: from_pretrained of the directory with the
    adapter files applies the adapter again, so its outputs are not the merged model's."""
    from harness.loading.base import load_base
    from harness.numerics.probes import make_probe
    from harness.numerics.reference import probe_logits

    broken = clone(merged_dir, tmp_path / "m")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(default_bundle.adapter_dir / name, broken / name)
    clean = load_base(merged_dir, dtype=torch.float32)
    probe = make_probe(clean.get_input_embeddings(), batch_size=1, seq_len=8, image_spans=[(2, 5)], seed=3)
    want = probe_logits(clean, probe, mask="im_mask")
    got = probe_logits(load_base(broken, dtype=torch.float32), probe, mask="im_mask")
    if (got - want).abs().max() <= 1e-4 * want.abs().max():  # transformers 4.33: it does not look for them
        pytest.skip("this transformers does not look for adapter files beside a model's weights (newer ones do, so "
                    "the check fails on every stack)")
    assert (got - want).abs().max() > 1e-2 * want.abs().max()


def test_peft_model_saved_instead_of_the_merged_one_is_caught(default_bundle, merged_dir, tmp_path):
    broken = clone(merged_dir, tmp_path / "m")
    adapter = load_file(default_bundle.adapter_dir / "adapter_model.safetensors")

    def unmerge(t):
        t[f"{LAYER}.base_layer.weight"] = t.pop(f"{LAYER}.weight")
        t[f"{LAYER}.lora_A.default.weight"] = adapter[f"base_model.model.{LAYER}.lora_A.weight"]

    edit_weights(broken, unmerge)
    got = ships_whole(default_bundle, broken)
    assert_names(got, "model.safetensors", "PEFT structure, not merged weights", "merge_and_unload()")


def test_plora_weights_are_not_taken_for_lora_keys(default_bundle, merged_dir):
    from harness.checks.measure.shipping import _PEFT_KEY

    assert not _PEFT_KEY.search(f"{LAYER}.Plora_A.weight") and not _PEFT_KEY.search("plora_glb_GN")
    assert _PEFT_KEY.search(f"{LAYER}.lora_A.weight") and _PEFT_KEY.search(f"{LAYER}.base_layer.weight")


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda c: c.update(architectures=["LlamaForCausalLM"]), "architectures is ['LlamaForCausalLM']"),
        (lambda c: c.pop("auto_map"), "auto_map is None"),
        (lambda c: c.update(model_type="llama"), "model_type is 'llama'"),
        (lambda c: c.update(vocab_size=c["vocab_size"] * 2), "vocab_size is"),
        (lambda c: c.update(dtype="bfloat16", torch_dtype="bfloat16"), "declares dtype bfloat16 but the weights are "
                                                                       "stored as float32"),
    ],
    ids=["architectures", "auto_map", "model_type", "vocab_size", "dtype"],
)
def test_config_drift_is_caught(default_bundle, merged_dir, tmp_path, change, fragment):
    broken = clone(merged_dir, tmp_path / "m")
    edit_config(broken, change)
    got = ships_whole(default_bundle, broken)
    fix = "to float32" if "dtype" in fragment else "the base's"
    assert_names(got, "config.json", fragment, fix)


@pytest.mark.parametrize("name, fragment, fix", [
    ("modeling_internlm2.py", "custom code files not copied", "copy modeling_internlm2.py from the base"),
    ("tokenizer.json", "tokenizer files not copied", "save_pretrained(merged_dir)"),
    ("generation_config.json", "not copied", "copy generation_config.json from the base"),
])
def test_files_not_copied_are_caught(default_bundle, merged_dir, tmp_path, name, fragment, fix):
    broken = clone(merged_dir, tmp_path / "m")
    (broken / name).unlink()
    assert_names(ships_whole(default_bundle, broken), name, fragment, fix)


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change, fragment", [
    (lambda c: c.update(eos_token="<pad>"), "the special tokens"),
    (lambda c: c.update(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}"), "the chat template"),
], ids=["eos-token", "chat-template"])
def test_a_tokenizer_that_differs_from_the_base_is_caught(default_bundle, merged_dir, tmp_path, change, fragment):
    from transformers import PreTrainedTokenizerBase

    if "chat" in fragment and not hasattr(PreTrainedTokenizerBase, "apply_chat_template"):
        pytest.skip("this transformers has no chat templates (added in 4.34): the field changes nothing it loads")
    broken = clone(merged_dir, tmp_path / "m")
    edit_json(broken / "tokenizer_config.json", change)
    if (broken / "special_tokens_map.json").is_file():  # transformers 4.x reads the special tokens from here first
        edit_json(broken / "special_tokens_map.json", lambda c: change(c) if "eos_token" in c else None)
    got = ships_whole(default_bundle, broken)
    assert_names(got, "tokenizer.json", "the tokenizer differs from the base's", "save_pretrained(merged_dir)")
    assert f"{fragment} is" in got.details["problems"][0]["problem"], got.details["problems"]


def test_generation_config_with_other_stop_ids_is_caught(default_bundle, merged_dir, tmp_path):
    broken = clone(merged_dir, tmp_path / "m")
    edit_json(broken / "generation_config.json", lambda c: c.update(eos_token_id=7))
    assert_names(ships_whole(default_bundle, broken), "generation_config.json", "eos_token_id 7 (base 2)",
                 "copy generation_config.json from the base")


def test_processor_files_of_a_multimodal_base_must_be_copied(default_bundle, merged_dir, tmp_path):
    base = clone(default_bundle.base_dir, tmp_path / "base")
    (base / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    assert_names(ships_whole(default_bundle, merged_dir, base=base), "preprocessor_config.json",
                 "processor files not copied", "processor.save_pretrained(merged_dir)")


def test_merged_check_never_writes_into_inputs(default_bundle, merged_dir):
    def snapshot():
        return {p: p.read_bytes() for d in (default_bundle.base_dir, default_bundle.adapter_dir, merged_dir)
                for p in sorted(d.iterdir())}

    before = snapshot()
    result(default_bundle, merged_dir)
    assert snapshot() == before


def test_merged_dir_with_a_symlink_out_of_it_is_refused(default_bundle, merged_dir, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    broken = clone(merged_dir, tmp_path / "m")
    (broken / "model.safetensors").rename(outside)
    (broken / "model.safetensors").symlink_to(outside)
    got = result(default_bundle, broken)
    assert got.status == "fail" and "outside" in got.message and "symlink" in got.message


def test_trainable_tokens_on_a_tied_embedding_reach_the_head_too(synthetic_cache, tmp_path):
    """With tied embeddings PEFT ties the head's token adapter to the embedding's: the head uses the trained rows
    too. A merge that unties and saves the head at the base values is wrong, and merged-matches says where."""
    from fixtures import zoo

    if reason := zoo.arch_unavailable("opt") or zoo.feature_unavailable("tokens"):
        pytest.skip(reason)
    built = zoo.build_arch("opt", synthetic_cache)
    assert built.tied
    untied = clone(built.merged("tokens"), tmp_path / "untied")
    base = load_file(built.base / "model.safetensors")
    head = built.info["head_module"] + ".weight"
    edit_weights(untied, lambda t: t.update({head: base[built.info["embedding_key"]].clone()}))
    edit_config(untied, lambda c: c.update(tie_word_embeddings=False))
    got = harness.check(built.adapter("tokens"), base_model=built.base, merged=untied, only=["merged-matches"],
                        isolated=False).get("merged-matches")
    assert got.status == "fail", got
    assert any(entry.startswith(f"{head} (trainable tokens of {built.info['embedding_module']}")
               for entry in got.details["tokens_dropped"]), got.details


# ---------------------------------------------------------------------------------------------
# merged-matches: the fix follows the cause (scaling, dtype, missing tensors) and the family (PLoRA only for PLoRA)


def adapted_modules(bundle) -> list[str]:
    keys = load_file(bundle.adapter_dir / "adapter_model.safetensors")
    return sorted(k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in keys
                  if k.endswith(".lora_A.weight"))


def merged_with_factor(bundle, merged_dir, out: Path, factor: float) -> Path:
    """Every adapted weight W + factor·s·B·A, as a merge with another scaling writes it."""
    broken = clone(merged_dir, out)
    base = base_tensors(bundle)

    def scale(t):
        for module in adapted_modules(bundle):
            t[f"{module}.weight"] = base[f"{module}.weight"] + factor * adapter_delta(bundle, module)

    edit_weights(broken, scale)
    return broken


@pytest.mark.parametrize("factor, words", [(0.5, "half the adapter's s·B·A"), (2.0, "twice the adapter's s·B·A")],
                         ids=["halved-alpha", "doubled-alpha"])
def test_a_merge_off_by_a_clean_ratio_names_the_scaling(default_bundle, merged_dir, tmp_path, factor, words):
    got = result(default_bundle, merged_with_factor(default_bundle, merged_dir, tmp_path / "m", factor))
    assert got.status == "fail" and words in got.message, got.message
    assert f"every wrong weight is exactly {factor:.4g}x off" in got.message
    assert "lora_alpha" in got.fix and "as if lora_alpha were" in got.fix, got.fix
    assert all(v == pytest.approx(factor, rel=1e-3) for v in got.details["delta_ratios"].values())


def test_rslora_scaling_applied_to_a_plain_adapter_is_named(default_bundle, merged_dir, tmp_path):
    rank = json.loads((default_bundle.adapter_dir / "adapter_config.json").read_text())["r"]
    got = result(default_bundle, merged_with_factor(default_bundle, merged_dir, tmp_path / "m", rank ** 0.5))
    assert got.status == "fail" and "rsLoRA" in got.fix and "use_rslora false" in got.fix, got.fix


def test_an_unclean_error_gets_no_scaling_story(default_bundle, merged_dir, tmp_path):
    broken = clone(merged_dir, tmp_path / "m")
    edit_weights(broken, lambda t: t.update({f"{LAYER}.weight": t[f"{LAYER}.weight"] + 0.3 * torch.randn_like(
        t[f"{LAYER}.weight"], generator=torch.Generator().manual_seed(0))}))
    got = result(default_bundle, broken)
    assert got.status == "fail" and "lora_alpha" not in got.fix and "re-merge in float32" in got.fix, got.fix


def test_a_float16_merge_that_overflows_names_the_dtypes(default_bundle, merged_dir, tmp_path):
    """A base weight beyond float16's range: the float16 merged checkpoint holds inf there, and the fix names the
    dtypes, not a re-merge or PLoRA."""
    base = clone(default_bundle.base_dir, tmp_path / "base")
    big = "model.norm.weight"
    edit_weights(base, lambda t: t[big].__setitem__(0, 1e5))
    broken = clone(merged_dir, tmp_path / "m")
    edit_weights(broken, lambda t: t[big].__setitem__(0, 1e5))
    edit_weights(broken, lambda t: t.update({k: v.to(torch.float16) for k, v in t.items()}))
    edit_config(broken, lambda c: c.update(dtype="float16", torch_dtype="float16"))
    got = harness.check(default_bundle.adapter_dir, base_model=base, merged=broken, trust_remote_code=True,
                        only=["merged-matches"], isolated=False).get("merged-matches")
    assert got.status == "fail" and big in got.message, got.message
    assert "stored as float16, the base's as float32" in got.fix and "overflows" in got.fix, got.fix
    assert "PLoRA" not in got.fix


def test_plora_advice_only_for_plora_models(default_bundle, merged_dir, tmp_path, synthetic_cache):
    """A skipped layer: on the XComposer base the fix names PeFT's lora_ name collision with Plora_A/Plora_B; on a
    text-only model (the zoo's GPT-2) it names no PLoRA and no image rows."""
    from fixtures import zoo

    broken = clone(merged_dir, tmp_path / "m")
    base = base_tensors(default_bundle)
    edit_weights(broken, lambda t: t.update({f"{LAYER}.weight": base[f"{LAYER}.weight"]}))
    plora = result(default_bundle, broken)
    assert plora.status == "fail" and "Plora_A/Plora_B" in plora.fix, plora.fix
    if reason := zoo.arch_unavailable("gpt2"):
        pytest.skip(reason)
    built = zoo.build_arch("gpt2", synthetic_cache)
    text = harness.check(built.adapter("plain"), base_model=built.base, merged=built.broken("layer-skipped"),
                         only=["merged-matches"], isolated=False).get("merged-matches")
    assert text.status == "fail" and "not merged" in text.message, text.message
    assert "merge every adapted module" in text.fix
    assert not any(word in text.fix.lower() for word in ("plora", "image")), text.fix
