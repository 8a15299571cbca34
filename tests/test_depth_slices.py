"""Depth slices: a base that does not fit the memory budget is checked a few layers at a time, each slice a real
model and adapter with the layers renumbered, every loading path run on it as on the whole model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from harness.checks.context import CheckContext, CheckOptions
from harness.checks.dynamic import combine_slices
from harness.checks.registry import get_check, run_check
from harness.inputs.adapter_dir import read_adapter
from harness.loading.slices import (
    DepthSlice,
    LayerLayout,
    adapted_layers,
    layer_layout,
    needed_bytes,
    parse_memory,
    plan_slices,
    slice_adapter_config,
    write_slice,
)
from harness.model.structure import inspect_base
from harness.report import CheckResult


@pytest.fixture(scope="module")
def info(default_bundle):
    return inspect_base(default_bundle.base_dir)


def test_the_decoder_layers_are_found_from_the_config_and_the_checkpoint(info) -> None:
    layout = layer_layout(info)
    assert layout == LayerLayout(prefix="model.layers", count=2, count_field="num_hidden_layers")


def test_no_slicing_when_the_base_fits_and_a_clear_error_when_one_layer_does_not(info) -> None:
    layout = layer_layout(info)
    assert plan_slices(info, "float32", needed_bytes(info, "float32"), {0, 1}) is None
    assert plan_slices(info, "float32", needed_bytes(info, "float32", 1, layout), {0, 1}) == [(0,), (1,)]
    assert plan_slices(info, "float32", needed_bytes(info, "float32", 1, layout), {1}) == [(1,)]  # only adapted
    with pytest.raises(ValueError, match="even one decoder layer"):
        plan_slices(info, "float32", needed_bytes(info, "float32", 1, layout) - 1, {0})


def test_memory_sizes_parse_with_units() -> None:
    assert parse_memory("8GiB") == 8 * 2**30 and parse_memory("500MB") == 500 * 10**6
    assert parse_memory("16G") == 16 * 2**30 and parse_memory(1024) == 1024
    with pytest.raises(ValueError, match="e.g. 8GiB"):
        parse_memory("eight gigs")


def test_a_slice_is_a_model_and_an_adapter_with_the_layers_renumbered(info, default_bundle, tmp_path) -> None:
    depth_slice = write_slice(info, default_bundle.adapter_dir, (1,), tmp_path / "s")
    config = json.loads((depth_slice.base_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    base = load_file(str(depth_slice.base_dir / "model.safetensors"))
    whole = load_file(str(next(default_bundle.base_dir.glob("*.safetensors"))))
    key = "model.layers.0.attention.wqkv.weight"
    assert torch.equal(base[key], whole["model.layers.1.attention.wqkv.weight"])  # layer 1 became layer 0
    assert not any(k.startswith("model.layers.1.") for k in base)
    assert torch.equal(base["output.weight"], whole["output.weight"])  # non-layer tensors kept
    assert sorted(p.name for p in depth_slice.base_dir.glob("*.py")) == sorted(
        p.name for p in default_bundle.base_dir.glob("*.py"))
    adapter = load_file(str(depth_slice.adapter_dir / "adapter_model.safetensors"))
    assert adapter and all(".layers.0." in k for k in adapter)
    assert adapted_layers(list(adapter), layer_layout(info)) == {0}
    assert not any(default_bundle.base_dir.glob("layers-*"))  # nothing written beside the user's input


def test_layer_naming_config_fields_follow_the_renumbering() -> None:
    layout = LayerLayout("model.layers", 4, "num_hidden_layers")
    config = {"r": 16, "lora_alpha": 32, "layers_to_transform": [1, 3],
              "rank_pattern": {"layers.3.attention.wqkv": 8, "wo": 4},
              "alpha_pattern": {"model.layers.1.feed_forward.w1": 2}}
    modules = [f"model.layers.{i}.{m}" for i in range(4) for m in ("attention.wqkv", "attention.wo", "feed_forward.w1")]
    sliced = slice_adapter_config(config, layout, {2: 0, 3: 1}, modules)
    assert sliced["layers_to_transform"] == [1]
    assert sliced["rank_pattern"] == {r"layers\.1\.attention\.wqkv": 8,  # was layer 3
                                      r"layers\.0\.attention\.wo": 4, r"layers\.1\.attention\.wo": 4}
    assert sliced["alpha_pattern"] == {}  # layer 1 is not in the slice


def test_pattern_keys_without_the_layer_list_name_keep_their_modules() -> None:
    """A GPT-2 key ``1.attn.c_attn`` names layer 1: in the slice it names the module that was layer 1, and never
    the slice's own layer 1 (which was layer 3: a wrong rank there fails the load, a wrong alpha scales silently)."""
    layout = LayerLayout("transformer.h", 4, "n_layer")
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"1.attn.c_attn": 2}, "alpha_pattern": {"c_fc": 3}}
    modules = [f"transformer.h.{i}.{m}" for i in range(4) for m in ("attn.c_attn", "mlp.c_fc")]
    first = slice_adapter_config(config, layout, {1: 0}, modules)
    assert first["rank_pattern"] == {r"h\.0\.attn\.c_attn": 2}
    assert first["alpha_pattern"] == {r"h\.0\.mlp\.c_fc": 3}
    later = slice_adapter_config(config, layout, {2: 0, 3: 1}, modules)
    assert later["rank_pattern"] == {}
    assert later["alpha_pattern"] == {r"h\.0\.mlp\.c_fc": 3, r"h\.1\.mlp\.c_fc": 3}


def test_every_supported_peft_reads_the_slice_patterns_as_meant() -> None:
    """The keys written are matched by the installed PEFT to their module alone, with the rank and alpha given."""
    from harness.loading.slices import peft_rank_and_alpha

    layout = LayerLayout("transformer.h", 12, "n_layer")
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"1.attn.c_attn": 2, "h.11.attn.c_attn": 6}}
    modules = [f"transformer.h.{i}.attn.c_attn" for i in range(12)]
    sliced = slice_adapter_config(config, layout, {1: 0, 11: 1, 10: 2}, modules)
    got = {m: peft_rank_and_alpha(sliced["rank_pattern"], sliced["alpha_pattern"], m, (4, 8))
           for m in (f"transformer.h.{i}.attn.c_attn" for i in range(3))}
    assert got == {"transformer.h.0.attn.c_attn": (2, 8), "transformer.h.1.attn.c_attn": (6, 8),
                   "transformer.h.2.attn.c_attn": (4, 8)}


def test_a_target_modules_regex_naming_layers_targets_the_same_modules_in_the_slice() -> None:
    import re

    layout = LayerLayout("model.layers", 4, "num_hidden_layers")
    base_modules = [f"model.layers.{i}.attention.{m}" for i in range(4) for m in ("wqkv", "wo")] + ["output"]
    config = {"target_modules": r".*layers\.(2|3)\.attention\.wqkv"}
    sliced = slice_adapter_config(config, layout, {1: 0, 2: 1}, [], base_modules)
    renamed = [f"model.layers.{i}.attention.{m}" for i in range(2) for m in ("wqkv", "wo")] + ["output"]
    assert [m for m in renamed if re.fullmatch(sliced["target_modules"], m)] == ["model.layers.1.attention.wqkv"]
    assert slice_adapter_config({"target_modules": ["wqkv"]}, layout, {1: 0}, [], base_modules)["target_modules"] == [
        "wqkv"]  # a list matches by name suffix: no layer in it


def test_adapter_module_names_strip_the_peft_wrapping() -> None:
    from harness.loading.slices import adapter_module_names

    assert adapter_module_names(["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
                                 "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight",
                                 "base_model.model.model.embed_tokens.lora_embedding_A",
                                 "base_model.model.model.layers.1.mlp.lora_magnitude_vector",
                                 "base_model.model.lm_head.modules_to_save.weight"]) == [
        "model.embed_tokens", "model.layers.1.mlp", "transformer.h.0.attn.c_attn"]


def test_the_verdict_is_the_worst_slice_naming_its_layers(tmp_path) -> None:
    def slice_of(*layers):
        return DepthSlice(layers, tmp_path, tmp_path)

    good = CheckResult(id="", status="pass", message="all agree")
    bad = CheckResult(id="", status="fail", message="peft: OUTSIDE", fix="re-merge")
    result = combine_slices([(slice_of(0, 1), good), (slice_of(2, 3), bad)])
    assert (result.status, result.message, result.fix) == ("fail", "layers 2-3: peft: OUTSIDE", "re-merge")
    assert result.details["depth_slices"]["layers 0-1"]["status"] == "pass"
    passed = combine_slices([(slice_of(0, 1), good), (slice_of(2), good)])
    assert passed.status == "pass" and passed.message == "on 2 depth slice(s) (layers 0-1, layer 2): all agree (figures from layers 0-1)"


def _context(default_bundle, info, budget: int) -> CheckContext:
    return CheckContext(adapter=read_adapter(default_bundle.adapter_dir), base=info,
                        options=CheckOptions(max_memory=budget))


def test_dynamic_checks_run_per_slice_when_the_base_does_not_fit(default_bundle, info) -> None:
    layout = layer_layout(info)
    ctx = _context(default_bundle, info, needed_bytes(info, "float32", 1, layout))
    try:
        for check_id in ("key-coverage", "merge-equivalence", "path-agreement"):
            result = run_check(get_check(check_id), ctx)
            assert result.status == "pass", result.message
            assert result.message.startswith("on 2 depth slice(s) (layer 0, layer 1): ")
            assert set(result.details["depth_slices"]) == {"layer 0", "layer 1"}
        assert any("2 depth slice(s) of 1 layer(s)" in note for note in ctx.notes)
    finally:
        ctx.cleanup.close()


def test_slices_are_taken_one_at_a_time_every_planned_check_on_one_before_the_next_is_written(
        default_bundle, info, tmp_path, monkeypatch) -> None:
    """Before: every slice was written up front (a 7B base: a second full copy on disk, which ran out of space)."""
    import dataclasses
    import tempfile

    import harness.loading.slices as slices

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []
    write = slices.write_slice

    def recording(info, adapter_dir, layers, out):
        seen.append((layers, sorted(p.name for p in tmp_path.glob("plora-harness-slice-*"))))
        return write(info, adapter_dir, layers, out)

    monkeypatch.setattr(slices, "write_slice", recording)
    ctx = dataclasses.replace(_context(default_bundle, info, needed_bytes(info, "float32", 1, layer_layout(info))),
                              planned=("key-coverage", "path-agreement"))
    try:
        for check_id in ("key-coverage", "path-agreement"):
            assert run_check(get_check(check_id), ctx).status == "pass"
    finally:
        ctx.cleanup.close()
    assert [layers for layers, _ in seen] == [(0,), (1,)]  # two slices, written once for both checks
    assert all(len(on_disk) == 1 for _, on_disk in seen)  # the one being written; the previous one is gone
    assert not list(tmp_path.glob("plora-harness-slice-*"))


def test_a_temporary_disk_too_small_for_a_slice_fails_in_one_line_naming_the_fix(default_bundle, info,
                                                                                monkeypatch) -> None:
    import shutil
    from collections import namedtuple

    import harness.loading.slices as slices

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(slices, "temporary_disk_free", lambda: 2**40)  # planned with room; gone when writing
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    ctx = _context(default_bundle, info, needed_bytes(info, "float32", 1, layer_layout(info)))
    try:
        result = run_check(get_check("key-coverage"), ctx)
    finally:
        ctx.cleanup.close()
    assert result.status == "fail"
    assert "of temporary disk and " in result.message and "has 0.0 GiB free" in result.message
    assert result.fix.startswith("point TMPDIR at a disk with room")


def test_slices_are_planned_to_fit_the_temporary_disk_as_well_as_the_memory(tmp_path) -> None:
    """Before: a 7B base was cut for memory alone, and its 22-layer slice ran out of disk while being written."""
    from harness.loading.slices import disk_bytes
    from harness.model.structure import BaseModelInfo

    weights = {f"model.layers.{i}.mlp.weight": ((1000, 1000), "BF16") for i in range(8)}
    weights["model.embed_tokens.weight"] = ((100, 1000), "BF16")
    deep = BaseModelInfo(base_dir=tmp_path, config={"num_hidden_layers": 8}, weights=weights)
    layout = layer_layout(deep)
    roomy = 2**40
    assert plan_slices(deep, "bfloat16", roomy, set(range(8)), disk=roomy, stored="bfloat16") is None
    quarter = disk_bytes(deep, "bfloat16", "bfloat16", 2, layout)  # a slice is written AND saved merged
    assert plan_slices(deep, "bfloat16", roomy, set(range(8)), disk=quarter, stored="bfloat16") == [
        (0, 1), (2, 3), (4, 5), (6, 7)]  # the memory would hold it whole: the disk cut it
    one = disk_bytes(deep, "bfloat16", "bfloat16", 1, layout)
    with pytest.raises(ValueError, match=r"GiB of temporary disk and 0\.0 GiB is free \(point TMPDIR at a disk"):
        plan_slices(deep, "bfloat16", roomy, set(range(8)), disk=one - 1, stored="bfloat16")


def test_a_budget_below_one_layer_fails_the_dynamic_checks_in_one_line(default_bundle, info) -> None:
    ctx = _context(default_bundle, info, 10_000)
    try:
        result = run_check(get_check("path-agreement"), ctx)
        assert result.status == "fail"
        assert "the memory budget is 0.0 GiB; depth slices cannot help: even one decoder layer" in result.message
    finally:
        ctx.cleanup.close()


def test_max_memory_reaches_the_checks_from_the_api(default_bundle, info) -> None:
    import harness

    budget = needed_bytes(info, "float32", 1, layer_layout(info))
    report = harness.check(default_bundle.adapter_dir, base_model=default_bundle.base_dir, isolated=False,
                           trust_remote_code=True, only=("path-agreement",), max_memory=budget)
    result = report.get("path-agreement")
    assert result.status == "pass" and result.message.startswith("on 2 depth slice(s) (layer 0, layer 1)")


@pytest.mark.parametrize("value", ["lots", "0"])
def test_an_unreadable_max_memory_is_a_usage_error(default_bundle, value) -> None:
    from harness.cli import main

    assert main(["check", "--adapter", str(default_bundle.adapter_dir), "--max-memory", value]) == 2


def test_a_sliced_adapter_is_planned_as_independent_units_of_work(default_bundle, info) -> None:
    """The plugin's xdist items: the whole-model checks once, the dynamic checks once per depth slice."""
    from harness.engine.units import WorkUnit, work_units

    ids = ["finite", "key-coverage", "path-agreement", "merged-matches"]
    one_layer = needed_bytes(info, "float32", 1, layer_layout(info))
    units = work_units(ids, default_bundle.base_dir, default_bundle.adapter_dir, dtype="float32", budget=one_layer)
    assert units == [WorkUnit(("finite", "merged-matches")),
                     WorkUnit(("key-coverage", "path-agreement"), (0,)),
                     WorkUnit(("key-coverage", "path-agreement"), (1,))]
    assert [u.label for u in units] == [None, "layer-0", "layer-1"]
    roomy = work_units(ids, default_bundle.base_dir, default_bundle.adapter_dir, dtype="float32", budget=2**40)
    assert roomy == [WorkUnit(tuple(ids))]
    assert work_units(ids, None, default_bundle.adapter_dir, dtype=None, budget=1) == [WorkUnit(tuple(ids))]


@pytest.mark.parametrize(("value", "expected"), [("1", (1,)), ("2-4", (2, 3, 4)), ([3, 4], (3, 4))])
def test_layers_parse_as_consecutive_indices(value, expected) -> None:
    from harness.loading.slices import parse_layers

    assert parse_layers(value) == expected


@pytest.mark.parametrize("value", ["4-2", "a-b", [1, 3], [], [-1]])
def test_layers_that_are_not_a_consecutive_range_are_a_usage_error(default_bundle, value) -> None:
    import harness
    from harness.inputs.errors import InputError

    with pytest.raises(InputError, match=r"^layers: .*(e\.g\. 8-15|range such as 8-15)$"):
        harness.check(default_bundle.adapter_dir, base_model=default_bundle.base_dir, layers=value, isolated=False,
                      trust_remote_code=True)


def test_layers_without_a_base_or_outside_the_model_are_refused_in_one_line(default_bundle) -> None:
    import harness
    from harness.inputs.errors import InputError

    with pytest.raises(InputError, match="--layers 0-1 slices the base model by depth; pass --base-model too"):
        harness.check(default_bundle.adapter_dir, layers="0-1", isolated=False)
    report = harness.check(default_bundle.adapter_dir, base_model=default_bundle.base_dir, layers="1-5",
                           isolated=False, trust_remote_code=True, only=("path-agreement",))
    result = report.get("path-agreement")
    assert result.status == "fail"
    assert result.message == "layers 1-5 were asked for, but the base has 2 decoder layers (0-1)"
    assert result.fix == "ask for layers within 0-1"


def test_layers_runs_the_dynamic_checks_on_that_slice_only(default_bundle) -> None:
    import harness

    report = harness.check(default_bundle.adapter_dir, base_model=default_bundle.base_dir, layers="1",
                           isolated=False, trust_remote_code=True, only=("key-coverage",))
    result = report.get("key-coverage")
    assert result.status == "pass", result.message
    assert result.message.startswith("on 1 depth slice(s) (layer 1): ")


def test_planning_errors_say_which_resource_ran_short(info) -> None:
    from harness.loading.slices import SlicePlanError

    layout = layer_layout(info)
    with pytest.raises(SlicePlanError) as short_of_memory:
        plan_slices(info, "float32", needed_bytes(info, "float32", 1, layout) - 1, {0})
    assert short_of_memory.value.resource == "memory" and "more memory" in short_of_memory.value.fix
    with pytest.raises(SlicePlanError) as short_of_disk:
        plan_slices(info, "float32", needed_bytes(info, "float32", 1, layout), {0}, disk=0, stored="float32")
    assert short_of_disk.value.resource == "disk" and "TMPDIR" in short_of_disk.value.fix


def test_work_units_cross_to_workers_unchanged() -> None:
    from harness.engine.units import WorkUnit

    for unit in (WorkUnit(("static", "effect")), WorkUnit(("effect",), (0,)), WorkUnit(("effect",), (8, 9, 10))):
        assert WorkUnit.from_json(json.loads(json.dumps(unit.to_json()))) == unit


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rank_and_alpha_patterns_survive_slicing_on_hugging_face_architectures(arch, synthetic_cache) -> None:
    """Found by hand: a GPT-2 adapter whose rank_pattern names layer 1 as ``1.attn.c_attn`` failed every dynamic
    check of the slice of layer 1 (its key was kept as text and matched nothing); sliced now as the whole passes."""
    import harness
    from fixtures import zoo

    if reason := zoo.arch_unavailable(arch):
        pytest.skip(reason)
    if "patterns" not in zoo.arch_kinds(arch):
        pytest.skip(f"{arch} has no patterns adapter on this PEFT")
    built = zoo.build_arch(arch, synthetic_cache)
    info = inspect_base(built.base)
    report = harness.check(built.adapter("patterns"), base_model=built.base,
                           max_memory=needed_bytes(info, "float32", 1, layer_layout(info)))
    assert any("depth slice(s) of 1 layer(s)" in note for note in report.notes), report.notes
    assert report.exit_code == 0, report.render()


@pytest.mark.slow
def test_a_regex_target_naming_a_layer_is_checked_on_its_slice(synthetic_cache, tmp_path) -> None:
    """A LoRA whose target_modules regex names layer 1 only: the slice of layer 1 (renumbered 0) must target it."""
    from peft import LoraConfig, get_peft_model

    import harness
    from fixtures import zoo

    built = zoo.build_arch("llama", synthetic_cache)
    model = zoo.load_pretrained(built.base)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                  target_modules=r".*layers\.1\.self_attn\.(q_proj|v_proj)"))
    peft_model.save_pretrained(tmp_path / "adapter")
    info = inspect_base(built.base)
    report = harness.check(tmp_path / "adapter", base_model=built.base,
                           max_memory=needed_bytes(info, "float32", 1, layer_layout(info)))
    assert any("1 depth slice(s) of 1 layer(s)" in note for note in report.notes), report.notes
    assert report.exit_code == 0, report.render()
