"""The against-base checks called directly on a base inspected once: each broken adapter fails (or warns) with its
message, in seconds (test_checks_against_base.py runs the same cases through ``harness.check``, minutes on a
loaded machine), so the mutation run (scripts/mutation-test.sh) can judge the check bodies."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fixtures.mutations import copy_adapter, edit_config, load_tensors, save_tensors
from harness.checks.context import CheckContext, CheckOptions
from harness.checks.registry import get_check, run_check
from harness.inputs.adapter_dir import read_adapter
from harness.model.structure import inspect_base

WQKV = "base_model.model.model.layers.0.attention.wqkv"


@pytest.fixture(scope="module")
def info(default_bundle):
    return inspect_base(default_bundle.base_dir)


def verdict(check_id: str, adapter_dir: Path, info, **options):
    ctx = CheckContext(adapter=read_adapter(adapter_dir), base=info, options=CheckOptions(**options))
    return run_check(get_check(check_id), ctx)


def adapter(default_bundle, tmp_path, **config) -> Path:
    dst = copy_adapter(default_bundle.adapter_dir, tmp_path / "adapter")
    edit_config(dst, lambda c: c.update(config))
    return dst


def test_a_good_adapter_passes(default_bundle, info):
    got = {i: verdict(i, default_bundle.adapter_dir, info) for i in ("targets-resolve", "lora-on-plora", "base-match")}
    assert (got["targets-resolve"].status, got["targets-resolve"].message) == ("pass", "10 modules matched (language 10)")
    assert set(got["targets-resolve"].details) == {"per_tower", "per_pattern", "notes"}
    assert got["targets-resolve"].details["per_tower"] == {"language": 10}
    assert (got["lora-on-plora"].status, got["lora-on-plora"].message) == ("pass", "no target lies inside a PLoRA module")
    assert (got["base-match"].status, got["base-match"].message) == ("pass", "all 10 adapted modules exist in the base "
                                                                     "with matching dimensions")
    assert got["base-match"].details["missing"] == [] and got["base-match"].details["modules"] == 10


def test_targets_that_hit_only_the_vision_tower_fail(default_bundle, tmp_path, info):
    got = verdict("targets-resolve", adapter(default_bundle, tmp_path, target_modules=["q_proj", "v_proj"]), info)
    assert (got.status, got.message) == ("fail", "targets adapt no language-model module, only the vision: 2 part")
    assert got.details["per_tower"] == {"vision": 2}
    assert got.fix.startswith("use the base model's own module names")


def test_targets_that_match_nothing_or_in_part_fail(default_bundle, tmp_path, info):
    got = verdict("targets-resolve", adapter(default_bundle, tmp_path / "a", target_modules=["wqkv", "query_key_value"]),
                  info)
    assert (got.status, got.message) == ("fail", "target pattern(s) ['query_key_value'] match no module of the base "
                                                 "model")
    assert got.details["per_pattern"] == {"wqkv": 2, "query_key_value": 0}
    got = verdict("targets-resolve", adapter(default_bundle, tmp_path / "b", target_modules=["nowhere"]), info)
    assert (got.status, got.message) == ("fail", "no target pattern matches any module of the base model")
    assert got.details["per_pattern"] == {"nowhere": 0}


def test_targets_over_two_towers_are_counted_per_tower(default_bundle, tmp_path, info):
    got = verdict("targets-resolve", adapter(default_bundle, tmp_path, target_modules=["wqkv", "q_proj"]), info)
    assert (got.status, got.message) == ("pass", "3 modules matched (language 2, vision 1)")


def test_an_unresolvable_target_regex_fails_naming_the_fix(default_bundle, tmp_path, info):
    got = verdict("targets-resolve", adapter(default_bundle, tmp_path, target_modules="(unclosed"), info)
    assert got.status == "fail" and got.message.startswith("target_modules cannot be resolved: ")
    assert got.fix == "write target_modules as module names or a simple regex PEFT can match quickly"
    assert "per_tower" in got.details


def test_lora_inside_plora_fails_unless_allowed(default_bundle, tmp_path, info):
    path = adapter(default_bundle, tmp_path, target_modules=r".*\.(wqkv|Plora_A)")
    got = verdict("lora-on-plora", path, info)
    assert got.status == "fail"
    assert got.message == ("10 target(s) are Plora_A/Plora_B inside PLoRA modules, e.g. "
                           f"{got.details['modules'][0]}") and got.details["count"] == 10
    assert got.details["modules"][0].endswith(".Plora_A") and len(got.details["modules"]) == 10
    got = verdict("lora-on-plora", path, info, allow_plora_targets=True)
    assert got.status == "warn" and got.message.endswith(" (allowed by --allow-plora-targets)")
    assert got.details["count"] == 10


def test_lora_on_plora_passes_a_base_without_plora(default_bundle):
    base = SimpleNamespace(branch_modules=lambda: [])
    got = run_check(get_check("lora-on-plora"), CheckContext(adapter=read_adapter(default_bundle.adapter_dir), base=base))
    assert (got.status, got.message) == ("pass", "the base model has no PLoRA modules")


def _reshape(path: Path, key: str, shape) -> None:
    tensors = load_tensors(path)
    tensors[key] = torch.zeros(shape)
    save_tensors(path, tensors)


def test_a_module_with_other_dimensions_fails_naming_base_and_adapter_shapes(default_bundle, tmp_path, info):
    path = adapter(default_bundle, tmp_path)
    a = load_tensors(path)[f"{WQKV}.lora_A.weight"]
    _reshape(path, f"{WQKV}.lora_A.weight", (a.shape[0], a.shape[1] + 1))
    got = verdict("base-match", path, info)
    assert got.status == "fail"
    assert got.message.startswith("adapter looks trained for a base model with other modules: 0 adapted module(s) "
                                  "missing, 1 with other dimensions (first: model.layers.0.attention.wqkv: base ")
    assert got.message.endswith(f"adapter lora_A [{a.shape[0]}, {a.shape[1] + 1}] (want [{a.shape[0]}, {a.shape[1]}]))")
    assert got.fix.startswith("check base_model_name_or_path in adapter_config.json")


def test_modules_the_base_lacks_fail_and_most_missing_means_another_base(default_bundle, tmp_path, info):
    path = adapter(default_bundle, tmp_path)
    tensors = load_tensors(path)
    renamed = {k.replace("layers.0.", "layers.7."): v for k, v in tensors.items()}
    save_tensors(path, renamed)
    got = verdict("base-match", path, info)
    assert got.status == "fail"
    assert got.message == ("adapter looks trained for a base model with other modules: 5 adapted module(s) missing, 0 "
                           "with other dimensions (first: model.layers.7.attention.wo)")
    assert len(got.details["missing"]) == 5
    save_tensors(path, {k.replace("layers.", "blocks."): v for k, v in tensors.items()})
    got = verdict("base-match", path, info)
    assert got.message.startswith("adapter looks trained for a different base model: 10 adapted module(s) missing")
    assert got.details["missing"] == sorted(got.details["missing"]) and len(got.details["missing"]) == 10


def test_base_match_skips_without_lora_tensors_or_base(default_bundle, tmp_path, info):
    path = adapter(default_bundle, tmp_path)
    save_tensors(path, {"base_model.model.model.norm.weight": torch.ones(4)})
    got = verdict("base-match", path, info)
    assert (got.status, got.message) == ("skip", "the adapter has no LoRA tensors to compare (see key-grammar)")
    got = run_check(get_check("base-match"), CheckContext(adapter=read_adapter(default_bundle.adapter_dir)))
    assert (got.status, got.message) == ("skip", "no --base-model given")


def test_fan_in_fan_out_contradicting_linear_modules_warns(default_bundle, tmp_path, info):
    got = verdict("base-match", adapter(default_bundle, tmp_path, fan_in_fan_out=True), info)
    assert got.status == "warn"
    assert got.message.startswith("fan_in_fan_out is true but the module is an nn.Linear (weight [out, in])")
    assert got.message.endswith("(10 module(s), e.g. model.layers.0.attention.wo); the adapter loads and merges right, "
                                "but tools that read the config literally would not")
    assert got.fix == ("set fan_in_fan_out in adapter_config.json to match the modules (true for Conv1D, false for "
                       "nn.Linear)")


@pytest.mark.parametrize("kind", ["same", "other-dir", "missing-path", "hub-id", "unset", "not-a-string", "nested"])
def test_base_name_verdicts(kind, default_bundle, tmp_path, info, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    declared = {"same": str(default_bundle.base_dir), "other-dir": "elsewhere", "missing-path": "./gone",
                "hub-id": "internlm/internlm-xcomposer2d5-7b", "unset": None, "not-a-string": 5,
                "nested": "gone/deeper/path"}[kind]
    got = verdict("base-name", adapter(default_bundle, tmp_path, base_model_name_or_path=declared), info)
    want = {"not-a-string": "unset", "nested": "missing-path"}.get(kind, kind)
    resolved = {"same": Path(default_bundle.base_dir).resolve(), "other-dir": (tmp_path / "elsewhere").resolve(),
                "missing-path": tmp_path / "gone", "nested": tmp_path / "gone/deeper/path"}.get(kind)
    assert got.details == {"declared": None if declared is None else str(declared),
                           "resolved": str(resolved) if resolved else None,
                           "checked_base": str(Path(default_bundle.base_dir).resolve()), "kind": want,
                           "loaders_reading_it": ["AutoPeftModelForCausalLM.from_pretrained(adapter_dir)",
                                                  "AutoModelForCausalLM.from_pretrained(adapter_dir)",
                                                  "pipeline(model=adapter_dir)"]}
    if kind in ("not-a-string", "nested"):
        assert got.status == "warn"
        return
    readers = ("AutoPeftModelForCausalLM.from_pretrained(adapter_dir), AutoModelForCausalLM.from_pretrained("
               "adapter_dir), pipeline(model=adapter_dir)")
    base = Path(default_bundle.base_dir)
    expected = {
        "same": ("pass", f"base_model_name_or_path names the base being checked ({declared})"),
        "other-dir": ("warn", f"base_model_name_or_path 'elsewhere' names another local directory, "
                              f"{(tmp_path / 'elsewhere').resolve()}, not the base being checked ({base.resolve()}): "
                              f"{readers} load that one instead"),
        "missing-path": ("warn", f"base_model_name_or_path './gone' names a path that does not exist here "
                                 f"({tmp_path / 'gone'}), not the base being checked ({base.resolve()}): {readers} load "
                                 "that one instead"),
        "unset": ("warn", f"adapter_config.json has no base_model_name_or_path: {readers} cannot find a base for it "
                          f"(checked against {base})"),
    }
    if kind == "hub-id":
        assert got.status == "pass"
        assert got.message == (f"note: base_model_name_or_path is the hub id {declared!r}: {readers} download that "
                               f"model, not the local base checked ({base}); make sure they are the same weights")
        named = dataclasses.replace(info, config={**info.config, "_name_or_path": "internlm/xc"})
        ctx = CheckContext(adapter=read_adapter(tmp_path / "adapter"), base=named)
        assert run_check(get_check("base-name"), ctx).message.endswith("; the base's config.json names 'internlm/xc'")
    else:
        assert (got.status, got.message) == expected[kind]


def test_against_base_checks_skip_without_a_base_or_a_readable_config(default_bundle, tmp_path, info):
    for check_id in ("targets-resolve", "lora-on-plora", "base-name"):
        got = run_check(get_check(check_id), CheckContext(adapter=read_adapter(default_bundle.adapter_dir)))
        assert (got.status, got.message) == ("skip", "no --base-model given")
    unreadable = dataclasses.replace(read_adapter(default_bundle.adapter_dir), config=None)  # config-valid failed
    got = run_check(get_check("targets-resolve"), CheckContext(adapter=unreadable, base=info))
    assert (got.status, got.message) == ("skip", "adapter_config.json unreadable (see config-valid)")


def test_the_layer_kinds_of_the_adapted_modules_are_counted(default_bundle, info):
    assert verdict("base-match", default_bundle.adapter_dir, info).details["layer_kinds"] == {"linear": 10}


def test_a_modules_to_save_copy_of_another_shape_fails_naming_both(default_bundle, tmp_path, info):
    path = adapter(default_bundle, tmp_path, modules_to_save=["output"])
    rows, cols = info.weights[info.checkpoint_key("output.weight")][0]
    tensors = load_tensors(path)
    tensors["base_model.model.output.modules_to_save.default.weight"] = torch.zeros(rows + 1, cols)
    save_tensors(path, tensors)
    got = verdict("base-match", path, info)
    assert got.status == "fail"
    assert got.message == ("adapter looks trained for a base model with other modules: 0 adapted module(s) missing, 1 "
                           f"with other dimensions (first: output.weight: modules_to_save copy [{rows + 1}, {cols}], "
                           f"base [{rows}, {cols}])")
