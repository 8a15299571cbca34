"""Checks against the base model's structure: each fails on its broken case, passes on good ones."""


import harness
from fixtures.mutations import copy_adapter, edit_config
from harness.synthetic import TINY


def run(adapter_dir, base_dir, **kwargs):
    report = harness.check(adapter_dir, base_model=base_dir, trust_remote_code=True, isolated=False, **kwargs)
    return {r.id: r for r in report.checks}


def with_targets(default_bundle, tmp_path, targets):
    dst = copy_adapter(default_bundle.adapter_dir, tmp_path / "adapter")
    edit_config(dst, lambda c: c.update(target_modules=targets))
    return dst


def test_good_adapter_passes_against_base(default_bundle):
    results = run(default_bundle.adapter_dir, default_bundle.base_dir)
    for check_id in ("targets-resolve", "lora-on-plora", "base-match"):
        assert results[check_id].status == "pass", results[check_id]
    assert "10 modules matched (language 10)" in results["targets-resolve"].message


def test_llama_names_hit_only_the_vision_tower(default_bundle, tmp_path):
    result = run(with_targets(default_bundle, tmp_path, ["q_proj", "v_proj"]), default_bundle.base_dir)["targets-resolve"]
    assert result.status == "fail"
    assert "no language-model module" in result.message and "vision: 2" in result.message
    assert "attention.wqkv" in result.fix


def test_pattern_matching_nothing_fails(default_bundle, tmp_path):
    result = run(with_targets(default_bundle, tmp_path, ["wqkv", "query_key_value"]), default_bundle.base_dir)
    assert result["targets-resolve"].status == "fail"
    assert "['query_key_value'] match no module" in result["targets-resolve"].message


def test_lora_on_plora_fails_and_can_be_allowed(default_bundle, tmp_path):
    adapter = with_targets(default_bundle, tmp_path, r".*\.(wqkv|Plora_A)")
    result = run(adapter, default_bundle.base_dir)["lora-on-plora"]
    assert result.status == "fail"
    assert "Plora_A/Plora_B inside PLoRA modules" in result.message and result.details["count"] == 10  # every PLoRA module of 2 layers x 5
    assert "not Plora_A/Plora_B" in result.fix
    allowed = run(adapter, default_bundle.base_dir, allow_plora_targets=True)["lora-on-plora"]
    assert allowed.status == "warn" and "--allow-plora-targets" in allowed.message


def test_adapter_from_a_different_base_is_named(make_bundle, default_bundle):
    other = make_bundle(dims=TINY.with_(hidden_size=32, intermediate_size=112))
    result = run(other.adapter_dir, default_bundle.base_dir)["base-match"]
    assert result.status == "fail"
    assert "trained for a different base model" in result.message and "other dimensions" in result.message
    assert result.details["adapter_base_model_name_or_path"] == str(other.base_dir)


def test_adapter_with_modules_the_base_lacks(make_bundle, default_bundle):
    deeper = make_bundle(dims=TINY.with_(num_hidden_layers=3))
    result = run(deeper.adapter_dir, default_bundle.base_dir)["base-match"]
    assert result.status == "fail"
    assert "10 adapted module(s) missing" not in result.message
    assert "5 adapted module(s) missing" in result.message and "model.layers.2." in result.message


def test_without_base_the_against_base_checks_are_not_run(default_bundle):
    ids = {r.id for r in harness.check(default_bundle.adapter_dir, isolated=False).checks}
    assert "targets-resolve" not in ids and "base-match" not in ids


def with_declared_base(default_bundle, tmp_path, declared):
    dst = copy_adapter(default_bundle.adapter_dir, tmp_path / "adapter")
    edit_config(dst, lambda c: c.update(base_model_name_or_path=declared))
    return dst


def test_base_name_naming_the_checked_base_passes(default_bundle):
    result = run(default_bundle.adapter_dir, default_bundle.base_dir, only=["base-name"])["base-name"]
    assert result.status == "pass" and "names the base being checked" in result.message, result


def test_base_name_naming_another_local_directory_warns_naming_both_and_the_loaders(default_bundle, tmp_path):
    other = tmp_path / "stale-base"
    other.mkdir()
    result = run(with_declared_base(default_bundle, tmp_path, str(other)), default_bundle.base_dir,
                 only=["base-name"])["base-name"]
    assert result.status == "warn", result
    assert str(other) in result.message and str(default_bundle.base_dir.resolve()) in result.message
    assert "AutoPeftModelForCausalLM.from_pretrained(adapter_dir)" in result.message
    assert "AutoModelForCausalLM.from_pretrained(adapter_dir)" in result.message and "pipeline" in result.message
    assert "set base_model_name_or_path" in result.fix


def test_base_name_naming_a_path_that_no_longer_exists_warns(default_bundle, tmp_path):
    result = run(with_declared_base(default_bundle, tmp_path, "/data/old/checkpoints/base-v1"),
                 default_bundle.base_dir, only=["base-name"])["base-name"]
    assert result.status == "warn" and "does not exist here" in result.message, result
    assert "/data/old/checkpoints/base-v1" in result.message


def test_base_name_as_a_relative_path_to_the_checked_base_passes(default_bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(default_bundle.base_dir.parent)
    result = run(with_declared_base(default_bundle, tmp_path, f"./{default_bundle.base_dir.name}"),
                 default_bundle.base_dir, only=["base-name"])["base-name"]
    assert result.status == "pass", result


def test_base_name_as_a_hub_id_is_a_note(default_bundle, tmp_path):
    result = run(with_declared_base(default_bundle, tmp_path, "internlm/internlm-xcomposer2d5-7b"),
                 default_bundle.base_dir, only=["base-name"])["base-name"]
    assert result.status == "pass" and result.message.startswith("note: "), result
    assert "internlm/internlm-xcomposer2d5-7b" in result.message and "download that model" in result.message


def test_base_name_unset_warns(default_bundle, tmp_path):
    result = run(with_declared_base(default_bundle, tmp_path, None), default_bundle.base_dir,
                 only=["base-name"])["base-name"]
    assert result.status == "warn" and "no base_model_name_or_path" in result.message, result
