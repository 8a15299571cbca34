"""``merged-matches``: the official merge passes; each way a merged checkpoint goes wrong fails by name."""

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


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda c: c.update(architectures=["LlamaForCausalLM"]), "config architectures"),
        (lambda c: c.pop("auto_map"), "config auto_map"),
        (lambda c: c.update(dtype="bfloat16", torch_dtype="bfloat16"), "declares dtype bfloat16"),
    ],
    ids=["architectures", "auto_map", "dtype"],
)
def test_config_drift_is_caught(default_bundle, merged_dir, tmp_path, change, fragment):
    broken = clone(merged_dir, tmp_path / "m")
    edit_config(broken, change)
    got = result(default_bundle, broken)
    assert got.status == "fail" and any(fragment in p for p in got.details["problems"]), got.details["problems"]


@pytest.mark.parametrize("name, fragment", [("modeling_internlm2.py", "custom code files"),
                                            ("tokenizer.json", "tokenizer files")])
def test_files_not_copied_are_caught(default_bundle, merged_dir, tmp_path, name, fragment):
    broken = clone(merged_dir, tmp_path / "m")
    (broken / name).unlink()
    got = result(default_bundle, broken)
    assert got.status == "fail" and any(fragment in p and name in p for p in got.details["problems"])


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
