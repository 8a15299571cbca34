"""Static checks: each fails on its broken fixture (with the right message) and passes on valid adapters."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from fixtures import ALL_GOOD_VARIANTS, MUTATIONS, both_formats_identical, marker_path, unsupported_reason
from fixtures.mutations import BIN, copy_adapter, edit_config, load_tensors, save_tensors, source_digest
from fixtures.runs import run_static
from harness import compat
from harness.checks import CheckContext, CheckOptions, checks
from harness.checks.registry import Check, register, run_check
from harness.inputs.adapter_dir import read_adapter
from harness.inputs.errors import InputError
from harness.model.lora_math import module_rank as expected_rank
from harness.model.peft_keys import classify_key

STATIC_IDS = [
    "config-valid", "weights-readable", "unsafe-pickle", "empty-tensors", "key-grammar",
    "shapes", "finite", "noop", "full-checkpoint",
]
BROKEN = [name for name, m in MUTATIONS.items() if not m.input_error]


@pytest.fixture(scope="module")
def good(default_bundle) -> Path:
    return default_bundle.adapter_dir


@pytest.fixture(scope="session")
def good_variant(synthetic_cache):
    """``good_variant(name)`` -> a valid trained adapter dir, built once and shared by xdist workers."""
    from harness.synthetic.cache import cached_build

    def make(name: str) -> Path:
        reason = unsupported_reason(ALL_GOOD_VARIANTS[name])
        if reason:
            pytest.skip(reason)
        params = {"variant": name, "fixtures": source_digest()}
        return cached_build(synthetic_cache, f"good-{name}", params, ALL_GOOD_VARIANTS[name])

    return make


def _problems(report):
    return [(c.id, c.status, c.message) for c in report.checks if c.status in ("fail", "warn")]


def test_registry_lists_the_static_checks_in_order():
    registered = checks("static")
    assert [c.id for c in registered] == STATIC_IDS
    for check in registered:
        assert check.summary and check.why and check.fix and check.group == "static"


def test_registry_orders_all_checks_by_group_and_rejects_unknown_groups():
    from harness.checks import GROUPS

    every = checks()
    assert [c.id for c in every if c.group == "static"] == STATIC_IDS
    assert every[0].group == GROUPS[0]
    assert [GROUPS.index(c.group) for c in every] == sorted(GROUPS.index(c.group) for c in every)
    assert len({c.id for c in every}) == len(every)
    with pytest.raises(ValueError, match="unknown check group"):
        checks("statics")


def test_default_adapter_passes_every_static_check(good):
    report = run_static(good)
    assert _problems(report) == []
    assert [c.id for c in report.checks] == STATIC_IDS
    assert report.get("unsafe-pickle").status == "skip"
    assert report.exit_code == 0


@pytest.mark.parametrize("name", BROKEN)
def test_broken_fixture_fails_the_right_check(name, good, tmp_path):
    mutation = MUTATIONS[name]
    broken = mutation.apply(good, tmp_path / name)
    report = run_static(broken)
    result = report.get(mutation.check)
    assert result.status == mutation.status, _problems(report)
    assert mutation.fragment.lower() in result.message.lower(), result.message
    assert "\n" not in result.message
    if mutation.status == "fail":
        assert result.fix and report.exit_code == 1
    assert not any(c.message.startswith("internal error") for c in report.checks), _problems(report)


@pytest.mark.parametrize("name", list(ALL_GOOD_VARIANTS))
def test_good_variants_pass_every_static_check(name, good_variant):
    adapter_dir = good_variant(name)
    report = run_static(adapter_dir)
    assert _problems(report) == []
    has_bin = (adapter_dir / BIN).exists()
    for result in report.checks:
        expected = "skip" if result.id == "unsafe-pickle" and not has_bin else "pass"
        assert result.status == expected, (result.id, result.message)


def _any_key(suffix: str):
    return lambda keys: any(k.endswith(suffix) for k in keys)


VARIANT_CLAIMS = {
    "dora": _any_key("lora_magnitude_vector"),
    "modules-to-save": lambda keys: "base_model.model.output.weight" in keys,
    "hf-bias-all": _any_key("k_proj.base_layer.bias"),
    "hf-bias-lora-only": _any_key("q_proj.base_layer.bias"),
    "hf-lora-bias": _any_key("lora_B.bias"),
    # embed_tokens targeted: lora_embedding_A/B, DoRA magnitudes, and save_embedding_layers="auto" also
    # saves embed_tokens.base_layer.weight (restored by PEFT on load)
    "hf-embedding-dora": lambda keys: {"base_model.model.model.embed_tokens.base_layer.weight",
                                       "base_model.model.model.embed_tokens.lora_embedding_A",
                                       "base_model.model.model.embed_tokens.lora_magnitude_vector"} <= keys,
    "hf-trainable-tokens": lambda keys: any("trainable_tokens_delta" in k for k in keys),
}


@pytest.mark.parametrize("name", sorted(VARIANT_CLAIMS))
def test_good_variants_exercise_what_they_claim(name, good_variant):
    keys = set(read_adapter(good_variant(name)).tensors)
    assert VARIANT_CLAIMS[name](keys), sorted(keys)[:12]


def test_pattern_and_bin_variants_exercise_what_they_claim(good_variant):
    pattern = read_adapter(good_variant("rank-alpha-pattern"))
    ranks = {info.shape[0] for k, info in pattern.tensors.items() if k.endswith("lora_A.weight")}
    assert ranks == {2, 4, 8}
    assert [wf.format for wf in read_adapter(good_variant("bin-only")).weight_files] == ["bin"]


def test_both_formats_identical_passes(good, tmp_path):
    report = run_static(both_formats_identical(good, tmp_path / "both"))
    assert _problems(report) == []
    assert "identical" in report.get("weights-readable").message
    assert report.get("unsafe-pickle").status == "pass"


def test_malicious_pickle_payload_never_runs(good, tmp_path):
    broken = MUTATIONS["malicious-bin"].apply(good, tmp_path / "m")
    report = run_static(broken)
    assert report.get("unsafe-pickle").status == "fail"
    assert "io.open" in report.get("unsafe-pickle").details["unsafe_globals"]
    assert not marker_path(broken).exists()


def test_zero3_message_names_both_fixes(good, tmp_path):
    report = run_static(MUTATIONS["empty-tensors"].apply(good, tmp_path / "z"))
    result = report.get("empty-tensors")
    assert "GatheredParameters(params, modifier_rank=None)" in result.fix
    assert "_zero3_consolidated_16bit_state_dict()" in result.fix
    assert report.get("finite").status == "pass" and report.get("shapes").status == "skip"


def test_full_checkpoint_points_to_merged_mode(good, tmp_path):
    report = run_static(MUTATIONS["merged-model-dir"].apply(good, tmp_path / "m"))
    assert "--merged" in report.get("full-checkpoint").fix
    assert report.get("finite").status == "skip"


def test_partial_zero_lora_b_warns(good, tmp_path):
    adapter_dir = copy_adapter(good, tmp_path / "a")
    tensors = load_tensors(adapter_dir)
    key = next(k for k in tensors if ".lora_B." in k)
    tensors[key] = torch.zeros_like(tensors[key])
    save_tensors(adapter_dir, tensors)
    result = run_static(adapter_dir).get("noop")
    assert result.status == "warn" and "1 of 10" in result.message


def test_missing_config_fails_config_valid_only(good, tmp_path):
    adapter_dir = copy_adapter(good, tmp_path / "a")
    (adapter_dir / "adapter_config.json").unlink()
    report = run_static(adapter_dir)
    assert [p[0] for p in _problems(report)] == ["config-valid"]
    assert "missing" in report.get("config-valid").message


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda c: c.update(peft_type="IA3"), "peft_type is 'IA3'"),
        (lambda c: c.update(peft_type="lora"), "peft_type is 'lora', not exactly 'LORA'"),
        (lambda c: c.update(r=0), "positive integer"),
        (lambda c: c.update(lora_alpha="big"), "lora_alpha must be a number"),
        (lambda c: c.update(target_modules=None), "target_modules"),
        (lambda c: c.update(rank_pattern={"wo": "four"}), "rank_pattern"),
        (lambda c: c.update(bias="sometimes"), "bias must be"),
        (lambda c: c.update(target_modules=".*wqkv", layers_to_transform=[0]), "rejects this config"),
    ],
)
def test_config_value_problems(good, tmp_path, change, fragment):
    adapter_dir = copy_adapter(good, tmp_path / "a")
    edit_config(adapter_dir, change)
    result = run_static(adapter_dir).get("config-valid")
    assert result.status == "fail" and fragment in result.message, result.message


def test_target_parameters_satisfy_the_target_requirement(good, tmp_path):
    adapter_dir = copy_adapter(good, tmp_path / "a")
    edit_config(adapter_dir, lambda c: c.update(target_modules=None, target_parameters=["feed_forward.w1.weight"]))
    result = run_static(adapter_dir).get("config-valid")
    assert "lacks required" not in result.message


def test_runner_turns_exceptions_into_failures(good):
    def explode(ctx):
        raise RuntimeError("boom\nsecond line")

    def wrong_type(ctx):
        return "pass"

    ctx = CheckContext(adapter=read_adapter(good), options=CheckOptions())
    for func in (explode, wrong_type):
        check = Check(id="exploding", group="static", summary="s", why="w", fix="f", func=func)
        result = run_check(check, ctx)
        assert result.id == "exploding" and result.status == "fail"
        assert result.message.startswith("internal error") and "\n" not in result.message


def test_register_rejects_duplicates_and_unknown_groups():
    with pytest.raises(ValueError, match="group"):
        register(id="x", group="nope", summary="", why="", fix="")
    with pytest.raises(ValueError, match="twice"):
        register(id="finite", group="static", summary="", why="", fix="")(lambda ctx: None)


def test_scan_runs_once_for_all_data_checks(good, monkeypatch):
    adapter = read_adapter(good)
    calls = []
    original = type(adapter).scan

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(type(adapter), "scan", counting)
    run_static(good)  # reads the adapter again; the patched class counts its scans
    assert len(calls) == 1


def test_classify_key():
    config = {"modules_to_save": ["output", "vision_proj"], "bias": "lora_only"}
    assert classify_key("base_model.model.a.b.lora_A.weight", config).kind == "lora"
    magnitude = classify_key("base_model.model.a.lora_magnitude_vector", config)
    # LoRA part names come from the installed PEFT: one without DoRA (0.8) does not know magnitudes
    assert magnitude.lora_kind == ("lora_magnitude_vector" if compat.peft_supports("use_dora") else None)
    assert classify_key("base_model.model.a.lora_A.default.weight", config).adapter_name == "default"
    assert classify_key("base_model.model.a.lora_embedding_A.other", config).adapter_name == "other"
    assert classify_key("base_model.model.output.weight", config).kind == "modules_to_save"
    assert classify_key("base_model.model.vision_proj.0.weight", config).kind == "modules_to_save"
    assert classify_key("base_model.model.a.b.bias", config).kind == "bias"
    assert classify_key("base_model.model.a.b.bias", {}).kind == "unknown"
    assert classify_key("base_model.model.a.wqkv.Plora_A.weight", config).kind == "branch"
    assert classify_key("base_model.model.a.wqkv.base_layer.weight", config).kind == "base_layer"
    assert classify_key("base_model.model.base_model.model.a.lora_B.weight", config).prefixes == 2
    # valid PEFT saves that are easy to mistake for base weights
    assert classify_key("base_model.model.a.q_proj.base_layer.bias", {"bias": "all"}).kind == "bias"
    assert classify_key("base_model.model.a.q_proj.base_layer.bias", {"bias": "none"}).kind == "base_layer"
    assert classify_key("base_model.model.a.q_proj.base_layer.weight", {"bias": "all"}).kind == "base_layer"
    embed = classify_key("base_model.model.model.embed_tokens.base_layer.weight", {})
    assert (embed.kind, embed.module) == ("embedding_layer", "model.embed_tokens")
    nested = classify_key("base_model.model.m.experts.base_layer.lora_A.weight", {})  # target_parameters
    assert (nested.kind, nested.module) == ("lora", "m.experts")
    assert classify_key("base_model.model.lm_head.modules_to_save.default.weight", {}).adapter_name == "default"
    assert classify_key("base_model.model.a.lora_B.bias", {}).kind == "lora"
    assert classify_key("base_model.model.a.lora_A.weight.extra", {}).kind == "unknown"
    tokens = classify_key("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta", {})
    assert (tokens.kind, tokens.module, tokens.adapter_name) == ("trainable_tokens", "model.embed_tokens", None)
    named = classify_key("base_model.model.emb.token_adapter.trainable_tokens_delta.default", {})
    assert (named.kind, named.module, named.adapter_name) == ("trainable_tokens", "emb", "default")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (None, None),
        ("rows", "trainable_tokens_delta [3, 32], expected [2, 32] (one row per token index"),
        ("flat", "is not a matrix"),
        ("repeat", "token indices [1] repeat"),
        ("negative", "token indices [-1] are not rows of the weight"),
    ],
    ids=["good", "one-row-too-many", "not-a-matrix", "repeated-index", "negative-index"],
)
def test_shapes_checks_trainable_tokens(good_variant, tmp_path, change, fragment):
    """trainable_tokens_delta holds one row per index of trainable_token_indices; the width and the vocab need the
    base (base-match)."""
    adapter_dir = copy_adapter(good_variant("hf-trainable-tokens"), tmp_path / "a")
    tensors = load_tensors(adapter_dir)
    key = next(k for k in tensors if k.endswith(".trainable_tokens_delta"))
    if change == "rows":
        tensors[key] = torch.cat([tensors[key], tensors[key][:1]])
    elif change == "flat":
        tensors[key] = tensors[key].flatten()
    save_tensors(adapter_dir, tensors)
    if change in ("repeat", "negative"):
        edit_config(adapter_dir, lambda c: c.update(trainable_token_indices=[1, 1] if change == "repeat" else [-1, 2]))
    result = run_static(adapter_dir).get("shapes")
    if fragment is None:
        assert result.status == "pass" and result.details["trainable_tokens"] == 1, result.message
    else:
        assert result.status == "fail" and fragment in result.message, result.message


def test_expected_rank_matches_peft():
    config = {"r": 8, "rank_pattern": {"w2": 4, "layers.1.attention.wo": 2}}
    assert expected_rank(config, "model.layers.0.feed_forward.w2") == 4
    assert expected_rank(config, "model.layers.1.attention.wo") == 2
    assert expected_rank(config, "model.layers.0.attention.wo") == 8
    assert expected_rank(config, "model.layers.0.feed_forward.xw2") == 8


def _digests(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_symlink():
                out[str(path)] = "link:" + os.readlink(path)
    return out


def test_full_static_run_never_modifies_inputs(good, good_variant, tmp_path):
    """Checksums, mtimes and listings of every input are identical after a full static run."""
    roots = [copy_adapter(good, tmp_path / "default")]
    roots += [MUTATIONS[name].apply(good, tmp_path / name) for name in MUTATIONS]
    roots.append(both_formats_identical(good, tmp_path / "both"))
    roots += [copy_adapter(good_variant(name), tmp_path / name) for name in ("bin-only", "dora", "hf-bias-all")]
    before = _digests(tmp_path)
    listing = sorted(str(p) for p in tmp_path.rglob("*"))
    mtimes = {p: os.stat(p).st_mtime_ns for p in before}
    for root in roots:
        try:
            report = run_static(root)
            report.to_json()
            report.render()
        except InputError:
            pass
    assert _digests(tmp_path) == before
    assert {p: os.stat(p).st_mtime_ns for p in before} == mtimes
    assert sorted(str(p) for p in tmp_path.rglob("*")) == listing  # nothing created, nothing removed
