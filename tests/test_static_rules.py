"""Every rule of the static and against-base checks has its broken case (issue 15, item 5).

One row per branch that can fail or warn in ``harness/checks/static.py`` and ``harness/checks/against_base.py``
that no other test hits exactly (the mutation catalogue in ``fixtures/mutations.py``, ``test_checks_static.py``,
``test_checks_against_base.py`` and ``test_hostile.py`` cover the rest). Each row edits a copy of the cached
default adapter, runs the real check, and asserts status, check id and a structured detail where the check gives one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import harness
from fixtures import MUTATIONS
from fixtures.mutations import BIN, SAFETENSORS, copy_adapter, edit_config, load_tensors, save_tensors
from fixtures.runs import run_static
from harness import compat
from harness.report import CheckResult

PREFIX = "base_model.model."
MODULE = f"{PREFIX}model.layers.0.attention.wo"  # a Linear 64 -> 64, LoRA rank 8 in the default adapter
A_KEY, B_KEY = f"{MODULE}.lora_A.weight", f"{MODULE}.lora_B.weight"
LORA_MODULES = 10  # 2 layers x 5 PLoRA modules


def tensors_edit(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(adapter_dir: Path) -> None:
        tensors = load_tensors(adapter_dir)
        change(tensors)
        save_tensors(adapter_dir, tensors)

    return edit


def config_edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda adapter_dir: edit_config(adapter_dir, change)


def both(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(adapter_dir: Path) -> None:
        for one in edits:
            one(adapter_dir)

    return edit


def with_bin(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    """An adapter_model.bin next to the safetensors file, holding the same tensors changed by ``change``."""
    def edit(adapter_dir: Path) -> None:
        tensors = load_tensors(adapter_dir)
        change(tensors)
        torch.save(tensors, adapter_dir / BIN)

    return edit


def replace_all(tensors: dict, new: dict) -> None:
    tensors.clear()
    tensors.update(new)


@dataclass(frozen=True)
class Case:
    """A broken (or good) adapter for one branch of one check, and what that check must say about it."""

    edit: Callable[[Path], None] | str | None  # applied to a copy of the default adapter; a str: that mutation of
    # fixtures/mutations.py; None: the adapter as is
    check: str
    status: str
    fragment: str  # in the message
    details: Callable[[dict], bool] = lambda details: True  # the structured detail this branch gives


def rows_zeroed(tensors: dict) -> None:
    for key in tensors:
        if ".lora_B." in key:
            tensors[key] = torch.zeros_like(tensors[key])


STATIC_CASES: dict[str, Case] = {
    # -- config-valid
    "config-valid/good": Case(None, "config-valid", "pass", "LoRA config: r=8, lora_alpha=8"),
    "config-valid/no-config-next-to-model-weights": Case(
        "merged-model-dir", "config-valid", "fail", "no adapter_config.json: this directory is not a PEFT adapter",
        lambda d: "error" in d),
    "config-valid/missing-r": Case(config_edit(lambda c: c.pop("r")), "config-valid", "fail", "lacks required",
                                   lambda d: d["missing"] == ["r"]),
    "config-valid/missing-lora-alpha": Case(config_edit(lambda c: c.pop("lora_alpha")), "config-valid", "fail",
                                            "lacks required", lambda d: d["missing"] == ["lora_alpha"]),
    "config-valid/no-targets-nor-target-parameters": Case(
        config_edit(lambda c: c.update(target_modules=None, target_parameters=None)), "config-valid", "fail",
        "lacks required", lambda d: d["missing"] == ["target_modules"]),
    "config-valid/target-modules-not-strings": Case(
        config_edit(lambda c: c.update(target_modules=["attention.wo", 7])), "config-valid", "fail",
        "target_modules must be a non-empty list", lambda d: d["fields"] == ["target_modules"]),
    "config-valid/bias-unknown": Case(config_edit(lambda c: c.update(bias="sometimes")), "config-valid", "fail",
                                      "bias must be", lambda d: d["fields"] == ["bias"]),
    "config-valid/rank-pattern-not-a-table": Case(config_edit(lambda c: c.update(rank_pattern=[4])), "config-valid",
                                                  "fail", "rank_pattern must map",
                                                  lambda d: d["fields"] == ["rank_pattern"]),
    "config-valid/alpha-pattern-not-a-table": Case(config_edit(lambda c: c.update(alpha_pattern="16")),
                                                   "config-valid", "fail", "alpha_pattern must map",
                                                   lambda d: d["fields"] == ["alpha_pattern"]),
    "config-valid/alpha-pattern-negative": Case(config_edit(lambda c: c.update(alpha_pattern={"wo": -2})),
                                                "config-valid", "fail", "alpha_pattern['wo'] is negative",
                                                lambda d: d["fields"] == ["alpha_pattern"]),
    "config-valid/target-regex-matches-none": Case(
        config_edit(lambda c: c.update(target_modules=r".*\.(q_proj|v_proj)")), "config-valid", "fail",
        r"target_modules regex '.*\\.(q_proj|v_proj)' matches none of the 10 module(s) the adapter holds LoRA "
        "weights for (e.g. model.layers.0.attention.wo)", lambda d: d["fields"] == ["target_modules"]),
    "config-valid/target-regex-misses-some": Case(
        config_edit(lambda c: c.update(target_modules=r".*\.(wqkv|wo)")), "config-valid", "fail",
        "misses 6 of the 10 module(s) the adapter holds LoRA weights for (e.g. model.layers.0.feed_forward.w1)",
        lambda d: d["fields"] == ["target_modules"]),
    "config-valid/target-regex-matches-every-module": Case(
        config_edit(lambda c: c.update(target_modules=r"model\.layers\.\d+\.(attention|feed_forward)\.w.*")),
        "config-valid", "pass", "LoRA config: r=8, lora_alpha=8, 1 target pattern(s)"),
    "config-valid/two-problems-counted": Case(config_edit(lambda c: c.update(r=0, bias="x")), "config-valid", "fail",
                                              "(+1 more)", lambda d: d["fields"] == ["bias", "r"]),
    "config-valid/unknown-field-non-default": Case(
        config_edit(lambda c: c.update(lora_future_knob=3)), "config-valid", "fail", "lora_future_knob",
        lambda d: d["unknown_fields"] == {"lora_future_knob": 3}),
    "config-valid/unknown-field-at-default": Case(
        config_edit(lambda c: c.update(lora_future_knob=None)), "config-valid",
        "warn" if compat.peft_drops_unknown_config_fields() else "fail", "lora_future_knob",
        lambda d: d["unknown_fields"] == {"lora_future_knob": None}),
    # -- weights-readable
    "weights-readable/good": Case(None, "weights-readable", "pass", "adapter_model.safetensors: 20 tensors",
                                  lambda d: d[SAFETENSORS]["tensors"] == 2 * LORA_MODULES),
    "weights-readable/file-without-tensors": Case(tensors_edit(lambda t: t.clear()), "weights-readable", "fail",
                                                  "holds no tensors"),
    "weights-readable/bin-has-an-extra-key": Case(
        with_bin(lambda t: t.update({f"{MODULE}.extra.lora_A.weight": torch.ones(8, 64)})), "weights-readable",
        "fail", "differ", lambda d: d["differences"][0].startswith("1 key(s) only in adapter_model.bin")),
    "weights-readable/bin-lacks-a-key": Case(
        with_bin(lambda t: t.pop(A_KEY)), "weights-readable", "fail", "differ",
        lambda d: d["differences"][0] == f"1 key(s) only in adapter_model.safetensors, e.g. {A_KEY}"),
    "weights-readable/bin-other-dtype": Case(
        with_bin(lambda t: t.update({A_KEY: t[A_KEY].to(torch.bfloat16)})), "weights-readable", "fail", "differ",
        lambda d: d["differences"] == [f"1 tensor(s) differ, e.g. {A_KEY} (float32[8, 64] vs bfloat16[8, 64])"]),
    # -- unsafe-pickle
    "unsafe-pickle/safetensors-only": Case(None, "unsafe-pickle", "skip", "no .bin file"),
    "unsafe-pickle/clean-bin": Case(with_bin(lambda t: None), "unsafe-pickle", "pass", "only torch tensor-rebuild"),
    # -- empty-tensors
    "empty-tensors/good": Case(None, "empty-tensors", "pass", "all 20 tensors have elements"),
    "empty-tensors/one-empty": Case(tensors_edit(lambda t: t.update({A_KEY: torch.empty(0)})), "empty-tensors",
                                    "fail", "1 of 20 tensors are empty",
                                    lambda d: d["empty"] == 1 and d["examples"] == {A_KEY: [0]}),
    # -- key-grammar
    "key-grammar/good": Case(None, "key-grammar", "pass", "20 keys follow PEFT's adapter format",
                             lambda d: d["kinds"] == {"lora": 20}),
    "key-grammar/base-layer-weight-saved": Case(
        tensors_edit(lambda t: t.update({f"{MODULE}.base_layer.weight": torch.ones(64, 64)})), "key-grammar", "fail",
        "are base weights", lambda d: d["examples"] == [f"{MODULE}.base_layer.weight"]),
    "key-grammar/unknown-suffix": Case(
        tensors_edit(lambda t: t.update({f"{MODULE}.lora_C.weight": torch.ones(8, 64)})), "key-grammar", "fail",
        "not LoRA tensors PEFT knows", lambda d: d["examples"] == [f"{MODULE}.lora_C.weight"]),
    "key-grammar/dora-without-magnitudes": Case(
        config_edit(lambda c: c.update(use_dora=True)), "key-grammar", "fail", "no lora_magnitude_vector",
        lambda d: len(d["problems"]) == 1),
    "key-grammar/prefix-doubled": Case(
        tensors_edit(lambda t: replace_all(t, {PREFIX + k: v for k, v in t.items()})), "key-grammar", "fail",
        "prefix 2 times", lambda d: len(d["examples"]) == 5 and all(k.startswith(PREFIX * 2) for k in d["examples"])),
    "key-grammar/adapter-name-left-in-keys": Case(
        tensors_edit(lambda t: replace_all(t, {k.replace(".weight", ".default.weight"): v for k, v in t.items()})),
        "key-grammar", "fail", "adapter name 'default'", lambda d: all(".default." in k for k in d["examples"])),
    "key-grammar/prefix-missing": Case(
        tensors_edit(lambda t: replace_all(t, {k[len(PREFIX):]: v for k, v in t.items()})), "key-grammar", "fail",
        "20 key(s) lack the base_model.model. prefix", lambda d: not any(k.startswith(PREFIX) for k in d["examples"])),
    "key-grammar/plora-weights-saved": Case(
        tensors_edit(lambda t: t.update({f"{MODULE}.Plora_A.weight": torch.ones(8, 64)})), "key-grammar", "fail",
        "are the base model's PLoRA weights", lambda d: d["examples"] == [f"{MODULE}.Plora_A.weight"]),
    "key-grammar/two-problems-counted": Case(
        tensors_edit(lambda t: t.update({f"{MODULE}.lora_C.weight": torch.ones(8, 64),
                                         f"{MODULE}.base_layer.weight": torch.ones(64, 64)})),
        "key-grammar", "fail", "and 1 more problem(s)", lambda d: len(d["problems"]) == 2),
    # -- shapes
    "shapes/good": Case(None, "shapes", "pass", "10 LoRA modules", lambda d: d["ranks"] == {"8": LORA_MODULES}),
    "shapes/lora-b-without-lora-a": Case(tensors_edit(lambda t: t.pop(A_KEY)), "shapes", "fail",
                                         "lora_B without lora_A", lambda d: d["count"] == 1),
    "shapes/not-matrices": Case(tensors_edit(lambda t: t.update({A_KEY: t[A_KEY].reshape(-1)})), "shapes", "fail",
                                "are not matrices", lambda d: d["problems"] == [
                                    "model.layers.0.attention.wo: lora_A[512] / lora_B[64, 8] are not matrices"]),
    "shapes/rank-pattern-disagrees": Case(
        config_edit(lambda c: c.update(rank_pattern={"attention.wo": 4})), "shapes", "fail",
        "the config's rank_pattern gives 4", lambda d: d["count"] == 2),  # wo in both layers
    "shapes/magnitude-wrong-size": Case(
        tensors_edit(lambda t: t.update({f"{MODULE}.lora_magnitude_vector": torch.ones(63)})), "shapes", "fail",
        "lora_magnitude_vector [63] does not match lora_B out 64", lambda d: d["count"] == 1),
    "shapes/lora-b-bias-wrong-size": Case(
        tensors_edit(lambda t: t.update({f"{MODULE}.lora_B.bias": torch.ones(8)})), "shapes", "fail",
        "lora_B.bias [8] does not match lora_B out 64", lambda d: d["count"] == 1),
    "shapes/no-lora-tensors": Case(tensors_edit(lambda t: replace_all(t, {f"{MODULE}.lora_A.weight": torch.empty(0)})),
                                   "shapes", "skip", "see empty-tensors"),
    # -- finite
    "finite/good": Case(None, "finite", "pass", "all 20 tensors finite"),
    "finite/bf16-inf": Case(
        tensors_edit(lambda t: t.update({B_KEY: t[B_KEY].to(torch.bfloat16).index_put_(
            (torch.tensor([3]), torch.tensor([1])), torch.tensor(float("inf"), dtype=torch.bfloat16))})),
        "finite", "fail", "1 tensor(s) contain NaN/Inf",
        lambda d: d["tensors"] == {B_KEY: {"nan": 0, "inf": 1, "numel": 512}}),
    "finite/bf16-nan": Case(
        tensors_edit(lambda t: t.update({A_KEY: t[A_KEY].to(torch.bfloat16).index_put_(
            (torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan"), dtype=torch.bfloat16))})),
        "finite", "fail", "1 NaN, 0 Inf", lambda d: d["tensors"][A_KEY]["nan"] == 1),
    "finite/bf16-largest-finite-passes": Case(
        tensors_edit(lambda t: t.update({A_KEY: torch.full((8, 64), torch.finfo(torch.bfloat16).max,
                                                           dtype=torch.bfloat16)})),
        "finite", "pass", "all 20 tensors finite"),
    "finite/fp16-inf": Case(
        tensors_edit(lambda t: t.update({A_KEY: torch.full((8, 64), -float("inf"), dtype=torch.float16)})),
        "finite", "fail", "contain NaN/Inf", lambda d: d["tensors"][A_KEY]["inf"] == 512),
    # -- noop
    "noop/good": Case(None, "noop", "pass", "all 10 lora_B tensors are non-zero"),
    "noop/all-zero": Case(tensors_edit(rows_zeroed), "noop", "fail", "untrained",
                          lambda d: d["zero"] == LORA_MODULES and len(d["examples"]) == 5),
    "noop/all-zero-but-dora-magnitudes": Case(
        tensors_edit(lambda t: (rows_zeroed(t), t.update({f"{MODULE}.lora_magnitude_vector": torch.ones(64)}))),
        "noop", "warn", "only 1 other tensor(s)", lambda d: d["zero"] == LORA_MODULES),
    "noop/no-lora-b": Case(tensors_edit(lambda t: replace_all(t, {k: v for k, v in t.items() if ".lora_B." not in k})),
                           "noop", "skip", "no lora_B tensors"),
    "noop/every-lora-b-empty": Case(
        tensors_edit(lambda t: t.update({k: torch.empty(0) for k in list(t) if ".lora_B." in k})),
        "noop", "skip", "every lora_B is empty"),
    # -- full-checkpoint
    "full-checkpoint/good": Case(None, "full-checkpoint", "pass", "an adapter: 20 LoRA tensors"),
    "full-checkpoint/lora-inside-a-model-state-dict": Case(
        tensors_edit(lambda t: t.update({f"model.layers.{i}.w{j}.weight": torch.ones(2) for i in range(3)
                                         for j in range(7)})),
        "full-checkpoint", "fail", "21 of 41 keys are not LoRA tensors"),
    "full-checkpoint/only-model-weight-files": Case(
        lambda d: (d / SAFETENSORS).rename(d / "model.safetensors"), "full-checkpoint", "fail",
        "only model weight files (model.safetensors)"),
}


def _apply(case: Case, good: Path, dst: Path) -> Path:
    if isinstance(case.edit, str):
        return MUTATIONS[case.edit].apply(good, dst)
    adapter = copy_adapter(good, dst)
    if case.edit is not None:
        case.edit(adapter)
    return adapter


def _check(result: CheckResult, case: Case, check_id: str) -> None:
    assert result.id == check_id
    assert result.status == case.status, (result.status, result.message, result.details)
    assert case.fragment in result.message, result.message
    assert "\n" not in result.message
    assert case.details(result.details), result.details
    if case.status == "fail":
        assert result.fix


# A PEFT without DoRA (0.8) does not know lora_magnitude_vector: there it is an unknown key, not a LoRA part.
NEEDS_DORA = pytest.mark.skipif(not compat.peft_supports("use_dora"), reason=f"PEFT {compat.PEFT_VERSION} has no DoRA")
DORA_ROWS = {"shapes/magnitude-wrong-size", "noop/all-zero-but-dora-magnitudes"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[NEEDS_DORA] if n in DORA_ROWS else []) for n in
                                  sorted(STATIC_CASES)])
def test_static_rule(name: str, default_bundle, tmp_path: Path) -> None:
    case = STATIC_CASES[name]
    adapter = _apply(case, default_bundle.adapter_dir, tmp_path / "a")
    report = run_static(adapter)
    _check(report.get(case.check), case, case.check)
    assert not any(c.message.startswith("internal error") for c in report.checks)


def test_merged_model_dir_fails_weights_readable_with_the_files_found(default_bundle, tmp_path: Path) -> None:
    adapter = MUTATIONS["merged-model-dir"].apply(default_bundle.adapter_dir, tmp_path / "a")
    report = run_static(adapter)
    config = report.get("config-valid")
    assert config.status == "fail" and "see full-checkpoint" in config.message and "--merged" in config.fix
    readable = report.get("weights-readable")
    assert readable.status == "fail" and readable.details["found"] == ["model.safetensors"]


def test_uninspectable_bin_skips_unsafe_pickle(default_bundle, tmp_path: Path) -> None:
    """A .bin the disassembler cannot read is not called safe: unsafe-pickle skips and points at weights-readable."""
    adapter = MUTATIONS["corrupt-bin"].apply(default_bundle.adapter_dir, tmp_path / "a")
    report = run_static(adapter)
    assert report.get("weights-readable").status == "fail"
    pickle = report.get("unsafe-pickle")
    assert pickle.id == "unsafe-pickle" and pickle.status == "skip", pickle.message
    assert "could not be inspected" in pickle.message and "see weights-readable" in pickle.message


# ---------------------------------------------------------------------------------------------
# against-base: targets-resolve, lora-on-plora, base-match


AGAINST_BASE_CASES: dict[str, Case] = {
    "targets-resolve/nothing-matches": Case(
        config_edit(lambda c: c.update(target_modules=["query_key_value", "dense_h_to_4h"])), "targets-resolve",
        "fail", "no target pattern matches any module",
        lambda d: d["per_pattern"] == {"query_key_value": 0, "dense_h_to_4h": 0}),
    "targets-resolve/good": Case(None, "targets-resolve", "pass", "10 modules matched",
                                 lambda d: d["per_tower"] == {"language": LORA_MODULES}),
    "lora-on-plora/good": Case(None, "lora-on-plora", "pass", "no target lies inside a PLoRA module"),
    "base-match/good": Case(None, "base-match", "pass", "all 10 adapted modules exist",
                            lambda d: d["missing"] == [] and d["mismatched"] == []),
    "base-match/embedding-parts-on-a-linear": Case(
        tensors_edit(lambda t: t.update({f"{MODULE}.lora_embedding_A": t.pop(A_KEY),
                                         f"{MODULE}.lora_embedding_B": t.pop(B_KEY)})),
        "base-match", "fail", "takes lora_A/lora_B, the adapter has lora_embedding_A/lora_embedding_B",
        lambda d: len(d["mismatched"]) == 1 and d["missing"] == []),
    "base-match/modules-to-save-copy-wrong-shape": Case(
        both(config_edit(lambda c: c.update(modules_to_save=["output"])),
             tensors_edit(lambda t: t.update({f"{PREFIX}output.weight": torch.ones(3, 64)}))),
        "base-match", "fail", "a base model with other modules",
        lambda d: len(d["mismatched"]) == 1 and d["mismatched"][0].startswith("output.weight: modules_to_save copy "
                                                                              "[3, 64], base ")),
    "base-match/fan-in-fan-out-contradicts-linear": Case(
        config_edit(lambda c: c.update(fan_in_fan_out=True)), "base-match", "warn", "loads and merges right",
        lambda d: sum(len(mods) for mods in d["fan_in_fan_out_corrected"].values()) == LORA_MODULES),
    "base-match/no-lora-tensors": Case(
        tensors_edit(lambda t: replace_all(t, {f"{PREFIX}model.norm.weight": torch.ones(64)})), "base-match", "skip",
        "no LoRA tensors"),
}


@pytest.mark.parametrize("name", sorted(AGAINST_BASE_CASES))
def test_against_base_rule(name: str, default_bundle, tmp_path: Path) -> None:
    case = AGAINST_BASE_CASES[name]
    adapter = _apply(case, default_bundle.adapter_dir, tmp_path / "a")
    report = harness.check(adapter, base_model=default_bundle.base_dir, trust_remote_code=True, only=[case.check],
                           isolated=False)
    _check(report.get(case.check), case, case.check)


def test_base_match_wording_follows_the_share_of_bad_modules(default_bundle, tmp_path: Path) -> None:
    """One module of ten off: "a base model with other modules"; all off: "a different base model"."""
    def run(edit) -> CheckResult:
        adapter = copy_adapter(default_bundle.adapter_dir, tmp_path / f"a{len(list(tmp_path.iterdir()))}")
        tensors_edit(edit)(adapter)
        return harness.check(adapter, base_model=default_bundle.base_dir, trust_remote_code=True, only=["base-match"],
                             isolated=False).get("base-match")

    one = run(lambda t: t.update({A_KEY: torch.ones(8, 65)}))
    assert one.status == "fail" and "a base model with other modules" in one.message
    assert one.details["mismatched"] == [
        "model.layers.0.attention.wo: base nn.Linear in/out 64/64, adapter lora_A [8, 65] (want [8, 64])"]
    every = run(lambda t: t.update({k: torch.ones(8, 65) for k in list(t) if k.endswith("lora_A.weight")}))
    assert every.status == "fail" and "a different base model" in every.message
    assert len(every.details["mismatched"]) == LORA_MODULES

