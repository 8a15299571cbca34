"""``merged-matches`` and ``merged-whole`` called directly on a base inspected once and the cached official merge:
each broken merged checkpoint fails with its message, in seconds (test_checks_merged.py runs such cases through
``harness.check``), so the mutation run (scripts/mutation-test.sh) can judge the check bodies."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.checks import merged as merged_check
from harness.checks.context import CheckContext
from harness.checks.registry import get_check, run_check
from harness.inputs.adapter_dir import read_adapter
from harness.model.structure import inspect_base
from harness.numerics import tolerances
from harness.synthetic.bundle import build_merged_dir

LAYER = "model.layers.1.attention.wqkv"


@pytest.fixture(scope="module")
def info(default_bundle):
    return inspect_base(default_bundle.base_dir)


@pytest.fixture(scope="module")
def merged_dir(default_bundle, synthetic_cache) -> Path:
    """The official merge (merge_and_unload → save_pretrained, code and tokenizer copied), built once per cache."""
    return build_merged_dir(default_bundle, synthetic_cache)


def verdict(check_id: str, bundle, info, merged: Path | None):
    ctx = CheckContext(adapter=read_adapter(bundle.adapter_dir), base=info, merged=merged)
    return run_check(get_check(check_id), ctx)


def broken(merged_dir: Path, tmp_path: Path, change=None, config=None) -> Path:
    out = Path(shutil.copytree(merged_dir, tmp_path / "merged"))
    if change is not None:
        tensors = load_file(out / "model.safetensors")
        change(tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        data = json.loads((out / "config.json").read_text())
        config(data)
        (out / "config.json").write_text(json.dumps(data))
    return out


def delta(bundle, module: str):
    tensors = load_file(bundle.adapter_dir / "adapter_model.safetensors")
    config = json.loads((bundle.adapter_dir / "adapter_config.json").read_text())
    a, b = (tensors[f"base_model.model.{module}.lora_{p}.weight"] for p in "AB")
    return b @ a * (config["lora_alpha"] / config["r"])


def test_the_official_merge_passes_both(default_bundle, info, merged_dir):
    got = verdict("merged-matches", default_bundle, info, merged_dir)
    assert got.status == "pass", got.message
    n = len(load_file(merged_dir / "model.safetensors"))
    assert got.message.startswith(f"{n} tensors match base + adapter (max rel error ")
    assert got.details["problems"] == [] and got.details["max_rel_error"] < 1e-6
    got = verdict("merged-whole", default_bundle, info, merged_dir)
    assert (got.status, got.message) == ("pass", "no adapter files or PEFT keys; config.json, code, tokenizer, "
                                                 "generation config and processor files as the base has them")


def test_both_skip_without_the_merged_directory_or_the_base(default_bundle, info, merged_dir):
    for check_id in ("merged-matches", "merged-whole"):
        assert verdict(check_id, default_bundle, info, None).message == "no --merged given"
        ctx = CheckContext(adapter=read_adapter(default_bundle.adapter_dir), merged=merged_dir)
        got = run_check(get_check(check_id), ctx)
        assert (got.status, got.message) == ("skip", "--merged needs --base-model to compare against")


def test_a_double_scaled_layer_fails_naming_the_scaling(default_bundle, info, merged_dir, tmp_path):
    d = delta(default_bundle, LAYER)
    path = broken(merged_dir, tmp_path, lambda t: t.update({f"{LAYER}.weight": t[f"{LAYER}.weight"] + d}))
    got = verdict("merged-matches", default_bundle, info, path)
    assert got.status == "fail"
    assert got.message.startswith(f"1 adapted weight(s) differ from W + s·B·A, e.g. {LAYER}.weight")
    assert len(got.details["wrong_delta"]) == 1 and got.details["wrong_delta"][0].startswith(f"{LAYER}.weight (error ")
    assert got.details["delta_ratios"] == {f"{LAYER}.weight": 2.0}  # the merge added ΔW twice
    assert "lora_alpha were 16, not 8" in got.message
    assert got.message.endswith("the merge used another lora_alpha or r than adapter_config.json, or added ΔW more "
                                "than once")
    assert got.fix


def test_a_skipped_layer_and_a_changed_tensor_fail_counting_both(default_bundle, info, merged_dir, tmp_path):
    base = load_file(default_bundle.base_dir / "model.safetensors")

    def change(t):
        t[f"{LAYER}.weight"] = base[f"{LAYER}.weight"]
        t["output.weight"] = t["output.weight"] * 2

    got = verdict("merged-matches", default_bundle, info, broken(merged_dir, tmp_path, change))
    assert got.status == "fail"
    assert got.message == (f"1 adapted weight(s) equal the base (layer not merged), e.g. {LAYER}.weight "
                           "(+1 more problem(s))")
    assert got.details["problems"][1] == "1 tensor(s) that the adapter does not touch changed, e.g. output.weight"


def test_a_missing_plora_tensor_and_an_extra_one_fail(default_bundle, info, merged_dir, tmp_path):
    def change(t):
        t["extra.weight"] = t.pop(f"{LAYER}.Plora_A.weight")

    got = verdict("merged-matches", default_bundle, info, broken(merged_dir, tmp_path, change))
    assert got.status == "fail"
    assert got.message == (f"1 base tensor(s) missing from the merged checkpoint (re-initialised on load), e.g. "
                           f"{LAYER}.Plora_A.weight (+1 more problem(s))")
    assert got.details["problems"][1] == "1 tensor(s) not in the base, e.g. extra.weight"
    assert got.details["missing"] == [f"{LAYER}.Plora_A.weight"] and got.details["unexpected"] == ["extra.weight"]


def test_plora_folded_into_the_weight_is_named(default_bundle, info, merged_dir, tmp_path):
    base = load_file(default_bundle.base_dir / "model.safetensors")
    plora = base[f"{LAYER}.Plora_B.weight"] @ base[f"{LAYER}.Plora_A.weight"]
    path = broken(merged_dir, tmp_path, lambda t: t.update({f"{LAYER}.weight": t[f"{LAYER}.weight"] + plora}))
    got = verdict("merged-matches", default_bundle, info, path)
    assert got.status == "fail"
    assert got.message == (f"PLoRA branch folded into the base weight of 1 module(s), e.g. {LAYER}.weight (text-token "
                           "outputs change)")
    assert got.details["plora_folded"] == [f"{LAYER}.weight"]


def test_a_tie_flag_other_than_the_bases_fails(default_bundle, info, merged_dir, tmp_path):
    path = broken(merged_dir, tmp_path, config=lambda c: c.update(tie_word_embeddings=True))
    got = verdict("merged-matches", default_bundle, info, path)
    assert got.status == "fail"
    assert "config tie_word_embeddings is True, base has False" in got.details["problems"]


def test_an_unreadable_merged_checkpoint_fails_in_one_line(default_bundle, info, merged_dir, tmp_path):
    path = broken(merged_dir, tmp_path)
    (path / "model.safetensors").write_bytes(b"\x00" * 7)
    for check_id in ("merged-matches", "merged-whole"):
        got = verdict(check_id, default_bundle, info, path)
        assert got.status == "fail" and "model.safetensors" in got.message and "\n" not in got.message, got.message


def test_merged_whole_names_adapter_files_left_and_files_not_copied(default_bundle, info, merged_dir, tmp_path):
    path = broken(merged_dir, tmp_path)
    shutil.copyfile(default_bundle.adapter_dir / "adapter_config.json", path / "adapter_config.json")
    (path / "generation_config.json").unlink()
    got = verdict("merged-whole", default_bundle, info, path)
    assert got.status == "fail"
    first, second = got.details["problems"]
    assert first["file"] == "adapter_config.json" and "applies the adapter a second time" in first["problem"]
    assert second["file"] == "generation_config.json" and "not copied" in second["problem"]
    assert got.message.startswith("adapter_config.json: ") and " (+1 more: generation_config.json: " in got.message
    assert got.fix == f"{first['fix']}; {second['fix']}"


def test_the_report_details_of_a_passing_merge(default_bundle, info, merged_dir):
    from harness.numerics.tolerances import merged_weight_tolerances

    details = verdict("merged-matches", default_bundle, info, merged_dir).details
    lists = ("missing", "unexpected", "changed", "wrong_delta", "unmerged", "plora_folded", "copies_dropped",
             "copies_wrong", "tokens_dropped", "tokens_wrong", "ties", "problems")
    assert set(details) == {*lists, "untie_expected", "ignored_adapter_tensors", "max_rel_error", "worst_tensor",
                            "dtypes", "tolerance", "delta_ratios"}
    assert {k: details[k] for k in lists} == {k: [] for k in lists}
    assert details["dtypes"] == ["float32"] and details["tolerance"] == merged_weight_tolerances()
    assert details["untie_expected"] is False and details["delta_ratios"] == {}
    assert isinstance(details["worst_tensor"], str) and details["max_rel_error"] < 1e-6


def test_many_problems_are_counted_and_the_details_list_ten_of_each(default_bundle, info, merged_dir, tmp_path):
    base = load_file(default_bundle.base_dir / "model.safetensors")
    untouched = sorted(k for k in base if k.endswith("norm.weight") or "Plora" in k)[:24]

    def change(t):
        for k in untouched[:12]:
            t[k] = t[k] + 1.0
        for k in untouched[12:24]:
            t.pop(k)
        for i in range(12):
            t[f"extra{i:02d}.weight"] = t["output.weight"][:1].clone()

    got = verdict("merged-matches", default_bundle, info, broken(merged_dir, tmp_path, change))
    assert got.status == "fail" and len(untouched) == 24
    assert {k: len(got.details[k]) for k in ("missing", "unexpected", "changed")} == {k: 10 for k in
                                                                                      ("missing", "unexpected", "changed")}
    assert got.message.endswith(" (+2 more problem(s))")
    assert got.details["problems"][1:] == [f"12 tensor(s) that the adapter does not touch changed, e.g. {untouched[0]}",
                                           "12 tensor(s) not in the base, e.g. extra00.weight"]


def test_a_wrong_delta_without_a_clean_ratio_gets_no_scaling_story(default_bundle, info, merged_dir, tmp_path):
    import torch

    noise = torch.Generator().manual_seed(0)

    def change(t):
        w = t[f"{LAYER}.weight"]
        t[f"{LAYER}.weight"] = w + torch.randn(w.shape, generator=noise) * w.abs().max() * 0.1

    got = verdict("merged-matches", default_bundle, info, broken(merged_dir, tmp_path, change))
    assert got.status == "fail"
    assert got.message == f"1 adapted weight(s) differ from W + s·B·A, e.g. {got.details['wrong_delta'][0]}"


def test_merged_matches_skips_an_unreadable_adapter(default_bundle, info, merged_dir):
    import dataclasses

    unreadable = dataclasses.replace(read_adapter(default_bundle.adapter_dir), config=None)
    got = run_check(get_check("merged-matches"), CheckContext(adapter=unreadable, base=info, merged=merged_dir))
    assert (got.status, got.message) == ("skip", "the adapter's tensors or config are unreadable (see the static "
                                                 "checks)")


# ---------------------------------------------------------------------------------------------
# a weight whose ΔW is small against max|W| (bf16 at 7B: one outlier sets max|W|), judged element by element


def _outlier_weight(seed: int = 0):
    """A bf16 weight whose one outlier makes max|W| 200x its typical element, and a rank-8 ΔW about 1e-3 of it."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(256, 256, generator=g) * 0.02
    base[0, 0] = 4.0
    delta = torch.randn(256, 8, generator=g) @ torch.randn(8, 256, generator=g) * 2e-4
    return base.to(torch.bfloat16), delta


def test_a_small_delta_is_below_the_per_tensor_resolution_of_bf16():
    base, delta = _outlier_weight()
    assert float(delta.abs().max() / base.float().abs().max()) <= tolerances.policy_for(torch.bfloat16).merged_rel


def test_by_element_a_right_merge_is_right_a_base_unmerged_and_a_double_wrong():
    base, delta = _outlier_weight()
    want = base.float() + delta
    verdict_, off, shown = merged_check.judge_by_element(want.to(torch.bfloat16), base, want)
    assert verdict_ == merged_check.RIGHT and off < 0.05 and shown > 0.5
    assert merged_check.judge_by_element(base, base, want)[:2] == (merged_check.UNMERGED, 1.0)
    verdict_, off, _ = merged_check.judge_by_element((base.float() + 2 * delta).to(torch.bfloat16), base, want)
    assert verdict_ == merged_check.WRONG and off > 0.9
    half = (base.float() + 0.4 * delta).to(torch.bfloat16)  # off by 0.6 ΔW: wrong, yet not the base
    assert merged_check.judge_by_element(half, base, want)[0] == merged_check.WRONG


def test_by_element_a_delta_below_rounding_everywhere_is_unresolved():
    base, delta = _outlier_weight()
    want = base.float() + delta * 1e-4
    verdict_, off, shown = merged_check.judge_by_element(base, base, want)
    assert (verdict_, off) == (merged_check.UNRESOLVED, 0.0) and shown < 16 / base.numel()
    assert merged_check.judge_by_element(base.int(), base, want) == (merged_check.UNRESOLVED, 0.0, 0.0)
    assert merged_check.judge_by_element(base[:8], base, want) == (merged_check.UNRESOLVED, 0.0, 0.0)


def test_by_element_runs_in_chunks(monkeypatch):
    base, delta = _outlier_weight()
    want = base.float() + delta
    whole = merged_check.judge_by_element((base.float() + 2 * delta).to(torch.bfloat16), base, want)
    monkeypatch.setattr(merged_check, "CHUNK", 1000)
    assert merged_check.judge_by_element((base.float() + 2 * delta).to(torch.bfloat16), base, want) == whole


def _bf16_small_delta_case(default_bundle, merged_dir, tmp_path, factor, noise=0.0):
    """A bf16 merged checkpoint of an adapter whose LAYER ΔW is scaled down below the per-tensor resolution, with
    that layer's merged weight base + factor·ΔW (+ noise·u·ΔW, u uniform in [-1, 1] per element)."""
    adapter = Path(shutil.copytree(default_bundle.adapter_dir, tmp_path / "adapter"))
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = f"base_model.model.{LAYER}.lora_B.weight"
    tensors[key] = tensors[key] * 0.3  # max|ΔW| 1.1e-2 of max|W|: below bf16's merged_rel, 1.6e-2
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    small = delta(dataclasses.replace(default_bundle, adapter_dir=adapter), LAYER)
    base = load_file(default_bundle.base_dir / "model.safetensors")[f"{LAYER}.weight"]

    def change(t):
        t.update({k: v.to(torch.bfloat16) for k, v in t.items()})
        u = torch.rand(small.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
        t[f"{LAYER}.weight"] = (base + (factor + noise * u) * small).to(torch.bfloat16)

    return adapter, broken(merged_dir, tmp_path, change)


def _small_delta_verdict(default_bundle, info, merged_dir, tmp_path, factor, noise=0.0):
    adapter, merged = _bf16_small_delta_case(default_bundle, merged_dir, tmp_path, factor, noise)
    return run_check(get_check("merged-matches"), CheckContext(adapter=read_adapter(adapter), base=info, merged=merged))


def test_a_bf16_merge_of_a_small_delta_passes(default_bundle, info, merged_dir, tmp_path):
    got = _small_delta_verdict(default_bundle, info, merged_dir, tmp_path, 1.0)
    assert got.status == "pass", got.message


def test_a_bf16_merge_that_left_out_a_small_delta_fails_naming_the_layer(default_bundle, info, merged_dir, tmp_path):
    got = _small_delta_verdict(default_bundle, info, merged_dir, tmp_path, 0.0)
    assert got.status == "fail"
    assert got.message.startswith(f"1 adapted weight(s) equal the base (layer not merged), e.g. {LAYER}.weight")


def test_a_bf16_merge_that_doubled_a_small_delta_fails_naming_the_share(default_bundle, info, merged_dir, tmp_path):
    got = _small_delta_verdict(default_bundle, info, merged_dir, tmp_path, 2.0)
    assert got.status == "fail"
    assert re.match(rf"1 adapted weight\(s\) differ from W \+ s·B·A, e.g. {re.escape(LAYER)}.weight \(\d+% of the \d+% "
                    r"of its elements where ΔW is above the dtype's rounding are off by more than half of ΔW\)",
                    got.message), got.message
    assert got.details["delta_ratios"] == {f"{LAYER}.weight": pytest.approx(2.0, abs=0.02)}


def test_a_bf16_merge_off_by_no_clean_ratio_fails_without_a_scaling_story(default_bundle, info, merged_dir, tmp_path):
    got = _small_delta_verdict(default_bundle, info, merged_dir, tmp_path, 2.0, noise=0.9)  # (2 ± 0.9)·ΔW
    assert got.status == "fail" and got.message.startswith(f"1 adapted weight(s) differ from W + s·B·A, e.g. {LAYER}")
    assert got.details["delta_ratios"] == {} and "exactly" not in got.message
