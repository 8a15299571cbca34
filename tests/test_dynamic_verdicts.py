"""The dynamic checks' verdicts on recorded runs: each way a run goes wrong fails (or warns) with its message.

The end-to-end tests (test_checks_dynamic.py) load models on every path, minutes for the whole file; these feed
each check a run as ``DynamicRun`` records it (load records, comparisons, logits), so the mutation run
(scripts/mutation-test.sh) judges the check bodies in seconds. A broken record here is one a real load produces:
keys PEFT dropped, an output outside the tolerance, a merge that left PLoRA changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from harness.checks.context import CheckContext
from harness.checks.registry import get_check, run_check
from harness.loading.records import LoadRecord
from harness.numerics.compare import Comparison
from harness.numerics.probes import make_probe

KEY = "base_model.model.model.layers.0.attention.wqkv.lora_A.weight"
DYNAMIC = ("key-coverage", "effect", "merge-equivalence", "reload-roundtrip", "plora-preserved", "path-agreement")
CALIBRATION = {"dtype": "float32", "noise": {"image": 1e-8, "text": 1e-8}, "effect": {"image": 0.1, "text": 0.1},
               "bands": {"image": 1e-5, "text": 1e-5}, "basis": "the table's 1e-05", "reference": "streamed"}


def comparison(label: str, *, ok: bool = True, image: float = 1e-7, text: float = 2e-7, non_finite=None) -> Comparison:
    return Comparison(label=label, dtype="float32", tolerance=1e-5, image_max_abs=image, image_max_rel=image,
                      text_max_abs=text, text_max_rel=text, worst_row=("image", 1, 5) if not ok else ("", -1, -1),
                      ok=ok, non_finite=non_finite)


@dataclass
class Outcome:  # harness.checks.measure.dynamic_run.PathOutcome's fields
    name: str
    record: LoadRecord = None
    comparison: Comparison = None
    logits: torch.Tensor = None
    error: str | None = None
    non_finite: str | None = None
    unmerged_wrappers: list = field(default_factory=list)
    plora_changed: list = field(default_factory=list)
    class_changes: list = field(default_factory=list)


PROBE = make_probe(torch.nn.Embedding(32, 8), batch_size=2, seq_len=16, image_spans=[(4, 11)], left_padding=[0, 3])
TEXT_PROBE = make_probe(torch.nn.Embedding(32, 8), batch_size=2, seq_len=16, image_spans=[], left_padding=[0, 3])
LOGITS = torch.tensor([0.5, -0.25, 0.125, 0.0]).repeat(2, 16, 1)  # every row: max abs 0.5


class Run:
    """What the checks read of a ``DynamicRun``: every path loads cleanly and matches, unless told otherwise."""

    load_error = None
    non_finite = None
    raw_load = None
    dtype = torch.float32
    dtype_name = "float32"
    tolerance = 1e-5
    basis = "the table's 1e-05"
    bands = {"image": 1e-5, "text": 1e-5}
    noise = {"image": 1e-8, "text": 1e-8}
    effect = {"image": 0.1, "text": 0.1}
    reference_mode = "streamed"
    probe, text_probe = PROBE, TEXT_PROBE

    def __init__(self, **outcomes: Outcome):
        self.outcomes = {o.name: o for o in outcomes.values()}
        # the adapter changes every output by 10% of the base's scale
        self.base_logits, self.text_base_logits = LOGITS, LOGITS
        self.reference_logits, self.text_reference_logits = LOGITS + 0.05, LOGITS + 0.05
        self.base_plora = {"model.layers.0.attention.wqkv.Plora_A.weight": "fp"}
        self.base_classes = {"model.layers.0.attention.wqkv": "PLoRA"}

    released = 0

    def release_pristine(self) -> None:  # DynamicRun lets the base kept for the peft path go after each check
        self.released += 1

    def outcome(self, name: str) -> Outcome:
        if name not in self.outcomes:
            self.outcomes[name] = Outcome(name, LoadRecord(path=name), comparison(name), logits=LOGITS + 0.05)
        return self.outcomes[name]


def verdict(check_id: str, run: Run, tmp_path, **config):
    ctx = CheckContext(adapter=SimpleNamespace(config=config, root=tmp_path), base=SimpleNamespace(base_dir=tmp_path),
                       cache={"dynamic.run": run})
    return run_check(get_check(check_id), ctx)


# -- key-coverage ------------------------------------------------------------------------------------


def test_key_coverage_passes_a_clean_record(tmp_path):
    got = verdict("key-coverage", Run(), tmp_path)
    assert (got.status, got.message) == ("pass", "every saved adapter key loads into its LoRA layer (0 missing, 0 "
                                                 "unexpected)")
    assert got.details["raw_load_state_dict"] is None


def test_key_coverage_fails_on_keys_peft_dropped_as_unexpected(tmp_path):
    """The hand-planted bug of issue 22: a record whose only problem is an unexpected key must not pass."""
    run = Run(peft=Outcome("peft", LoadRecord(path="peft", unexpected_keys=[KEY]), comparison("peft")))
    got = verdict("key-coverage", run, tmp_path)
    assert got.status == "fail"
    assert got.message == (f"after PeftModel.from_pretrained: 0 missing, 1 unexpected, 0 not loaded adapter keys "
                           f"(e.g. {KEY})")
    assert got.details == {"raw_load_state_dict": None, "missing": [], "unexpected": [KEY], "not_loaded": [],
                           "warnings": []}
    assert got.fix.startswith("save with peft_model.save_pretrained()")


@pytest.mark.parametrize("kind", ["missing_keys", "not_loaded"])
def test_key_coverage_fails_on_missing_or_not_loaded_keys(kind, tmp_path):
    keys = [f"{KEY}{i}" for i in range(12)]
    run = Run(peft=Outcome("peft", LoadRecord(path="peft", **{kind: keys}), comparison("peft")))
    got = verdict("key-coverage", run, tmp_path)
    counts = {"missing_keys": "12 missing, 0 unexpected, 0 not loaded", "not_loaded": "0 missing, 0 unexpected, "
              "12 not loaded"}[kind]
    assert (got.status, got.message) == ("fail", f"after PeftModel.from_pretrained: {counts} adapter keys (e.g. {KEY}0)")
    assert got.details[{"missing_keys": "missing", "not_loaded": "not_loaded"}[kind]] == keys[:10]
    run = Run(peft=Outcome("peft", LoadRecord(path="peft", unexpected_keys=keys, warnings=keys), comparison("peft")))
    run.raw_load = SimpleNamespace(message="refused")
    got = verdict("key-coverage", run, tmp_path)
    assert got.details == {"raw_load_state_dict": "refused", "missing": [], "unexpected": keys[:10], "not_loaded": [],
                           "warnings": keys[:10]}


def test_key_coverage_fails_when_peft_cannot_load(tmp_path):
    run = Run(peft=Outcome("peft", error="ValueError: size mismatch"))
    got = verdict("key-coverage", run, tmp_path)
    assert (got.status, got.message) == ("fail", "PeftModel.from_pretrained failed: ValueError: size mismatch")
    assert got.details == {"raw_load_state_dict": None}


def test_key_coverage_skips_without_a_base_and_fails_when_the_base_does_not_load(tmp_path):
    ctx = CheckContext(adapter=SimpleNamespace(config={}, root=tmp_path))
    assert run_check(get_check("key-coverage"), ctx).message == "no --base-model given"
    run = Run()
    run.load_error = "modeling_x.py line 3: NameError"
    for check_id in DYNAMIC:
        got = verdict(check_id, run, tmp_path)
        assert (got.status, got.message) == ("fail", "the base model cannot be checked: modeling_x.py line 3: NameError")
        assert got.fix == ("make the base directory load on its own first: the message names the file and line in its "
                           "code; AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) shows the full "
                           "traceback")
    ctx = CheckContext(adapter=SimpleNamespace(config={}, root=tmp_path), base=SimpleNamespace(base_dir=tmp_path),
                       failed_prerequisites=["noop", "config-valid", "finite", "weights-readable"],
                       cache={"dynamic.slices": None})  # the base fits: no depth slices
    got = run_check(get_check("key-coverage"), ctx)
    assert (got.status, got.message) == ("skip", "the adapter cannot be loaded until config-valid, weights-readable "
                                                 "pass(es)")


# -- effect ---------------------------------------------------------------------------------------------


def test_effect_passes_a_clear_effect_on_both_row_classes(tmp_path):
    got = verdict("effect", Run(), tmp_path)
    assert got.status == "pass"
    assert got.message == "the adapter changes outputs by 1.0e-01 on image rows and 1.0e-01 on text rows (relative)"
    assert got.details == {"relative_effect": pytest.approx({"image": 0.1, "text": 0.1}), "floor": 1e-4,
                           "dtype_tolerance": 1e-5, "dtype_noise": Run.noise, "dtype": "float32"}


@pytest.mark.parametrize("rows", ["image", "text", "both"])
def test_effect_fails_an_adapter_that_changes_nothing(rows, tmp_path):
    run = Run()
    if rows in ("image", "both"):
        run.reference_logits = LOGITS.clone()
    if rows in ("text", "both"):
        run.text_reference_logits = LOGITS + 1e-9
    got = verdict("effect", run, tmp_path)
    assert got.status == "fail"
    weak = {"image": "image", "text": "text", "both": "image and text"}[rows]
    assert got.message.startswith(f"the adapter has no measurable effect on {weak} rows (relative change image ")
    hint = ("; an adapter acting only through PLoRA's image branch (LoRA on Plora_A/Plora_B) never changes text "
            "tokens")
    assert got.message.endswith(hint if rows == "text" else ")"), got.message
    assert got.fix.startswith("check target_modules and lora_alpha") and "relative_effect" in got.details


def test_effect_without_image_rows_measures_none(tmp_path):
    run = Run()
    run.probe = TEXT_PROBE
    got = verdict("effect", run, tmp_path)
    assert got.message.startswith("the adapter has no measurable effect on image rows (relative change image 0.0e+00")


def test_effect_below_twice_the_rounding_warns_naming_the_dtype(tmp_path):
    run = Run()
    run.reference_logits = LOGITS + 1e-4  # 2e-4 relative: above the floor, below 2x the bfloat16 resolution
    run.noise = {"image": 1e-4, "text": 1e-8}
    run.dtype, run.dtype_name = torch.bfloat16, "bfloat16"
    got = verdict("effect", run, tmp_path)
    assert got.status == "warn", got.message
    assert got.message == ("the adapter's effect on image rows (2.0e-04) is within what bfloat16 rounding does to this "
                           "model (5.0e-02: the base in bfloat16 against fp32 differs by 1.0e-04): mis-merges of that "
                           "size cannot be told from rounding at this dtype")
    assert got.fix == "rerun with --dtype float32, which resolves it"
    run.dtype, run.dtype_name, run.noise = torch.float32, "float32", {"image": 1e-4, "text": 1e-8}
    got = verdict("effect", run, tmp_path)
    assert got.status == "warn" and got.message.startswith("the adapter's effect (2.0e-04) is close to the float32 "
                                                           "tolerance")
    assert got.fix == ("check lora_alpha / r and that training updated the LoRA weights: the effect is at the level of "
                       "fp32 summation noise")
    assert got.details["relative_effect"]["image"] == pytest.approx(2e-4, rel=1e-3)


def test_effect_names_the_least_resolved_row_class(tmp_path):
    run = Run()
    run.reference_logits = LOGITS + 1.5e-4  # image: 3e-4 against a resolution of 2e-4 (ratio 1.5)
    run.text_reference_logits = LOGITS + 2e-4  # text: 4e-4 against 4e-4 (ratio 1): the less resolved one
    run.noise = {"image": 2e-5, "text": 4e-5}  # float32: resolution max(1e-4, 10x the noise)
    got = verdict("effect", run, tmp_path)
    assert (got.status, got.message) == ("warn", "the adapter's effect (4.0e-04) is close to the float32 tolerance "
                                                 "(4e-04): mis-merges of that size cannot be told from rounding")


def test_effect_fails_on_non_finite_outputs_naming_where(tmp_path):
    run = Run()
    run.non_finite = "first produced by model.layers.0.attention.wqkv"
    got = verdict("effect", run, tmp_path)
    assert (got.status, got.message) == ("fail", run.non_finite)
    assert got.fix == "see finite for NaN/Inf adapter tensors; retrain or take an earlier checkpoint"
    assert got.details == {"non_finite": run.non_finite}


# -- merge-equivalence ------------------------------------------------------------------------------------


def test_merge_equivalence_passes_matching_merges(tmp_path):
    got = verdict("merge-equivalence", Run(), tmp_path)
    assert got.status == "pass"
    assert got.message == ("unmerged, merged and safe-merged match the fp32 reference (max rel 2.0e-07, float32 "
                           "tolerance 1.0e-05)")
    assert got.details == {name: comparison(name).to_dict() for name in ("peft", "peft-merged", "peft-safe-merged")} | {
        "merged_vs_unmerged_rel": 0.0, "calibration": CALIBRATION, "max_rel": 2e-07}


def test_merge_equivalence_fails_on_a_merge_that_differs(tmp_path):
    merged = Outcome("peft-merged", LoadRecord(path="peft-merged"), comparison("peft-merged", ok=False, image=3e-2),
                     logits=LOGITS + 0.2)
    got = verdict("merge-equivalence", Run(merged=merged), tmp_path)
    assert got.status == "fail"
    assert got.message.startswith("peft-merged: image rows max abs 3.00e-02")
    assert got.message.endswith(" (+1 more)")
    assert "merged_vs_unmerged_rel" in got.details


def test_merge_equivalence_names_unmerged_wrappers_and_dora(tmp_path):
    merged = Outcome("peft-merged", LoadRecord(path="peft-merged"), comparison("peft-merged"), logits=LOGITS + 0.05,
                     unmerged_wrappers=["model.layers.1.attention.wqkv", "model.layers.0.attention.wqkv"])
    got = verdict("merge-equivalence", Run(merged=merged), tmp_path, use_dora=True)
    assert got.status == "fail"
    assert got.message == ("merge_and_unload left 2 LoRA wrapper(s) unmerged, e.g. model.layers.0.attention.wqkv; "
                           "DoRA's magnitude rescales the whole PLoRA output (image branch included) when unmerged but "
                           "only the base weight when merged, so the two cannot agree on image rows")
    assert got.details["unmerged_wrappers"] == ["model.layers.0.attention.wqkv", "model.layers.1.attention.wqkv"]
    many = [f"model.layers.{i:02d}.attention.wo" for i in range(12)]
    safe = Outcome("peft-safe-merged", LoadRecord(path="peft-safe-merged"), comparison("peft-safe-merged", ok=False),
                   logits=LOGITS + 0.05, unmerged_wrappers=many)
    got = verdict("merge-equivalence", Run(safe=safe), tmp_path)
    assert got.message == f"merge_and_unload left 12 LoRA wrapper(s) unmerged, e.g. {many[0]} (+1 more)"
    assert got.details["unmerged_wrappers"] == many[:10]


def test_merge_equivalence_does_not_compare_non_finite_outputs(tmp_path):
    merged = Outcome("peft-merged", LoadRecord(path="peft-merged"),
                     comparison("peft-merged", ok=False, non_finite="first produced by model.norm"),
                     logits=LOGITS + 0.3, non_finite="first produced by model.norm")
    got = verdict("merge-equivalence", Run(merged=merged), tmp_path)
    assert got.message == "peft-merged: non-finite outputs (NaN/Inf) in real rows, first produced by model.norm"
    assert "merged_vs_unmerged_rel" not in got.details


def test_merge_equivalence_judges_the_merge_gap_against_the_calibrated_bands(tmp_path):
    run = Run(merged=Outcome("peft-merged", LoadRecord(path="peft-merged"), comparison("peft-merged"),
                             logits=LOGITS + 0.05 + 0.01))  # 1.8% of the scale: inside bands of 5%, not the table's
    run.bands = {"image": 5e-2, "text": 5e-2}
    got = verdict("merge-equivalence", run, tmp_path)
    assert got.status == "pass", got.message
    assert got.details["merged_vs_unmerged_rel"] == pytest.approx(0.01 / 0.55, rel=1e-3)


def test_merge_equivalence_fails_when_merged_and_unmerged_outputs_differ(tmp_path):
    merged = Outcome("peft-merged", LoadRecord(path="peft-merged"), comparison("peft-merged"), logits=LOGITS + 0.3)
    got = verdict("merge-equivalence", Run(merged=merged), tmp_path)
    assert got.status == "fail"
    rel = got.details["merged_vs_unmerged_rel"]
    assert rel == pytest.approx(0.25 / 0.55, rel=1e-3)
    assert got.message == (f"merged and unmerged outputs differ by {rel:.2e} (tolerance 1.0e-05: the table's 1e-05; "
                           "worst at image row batch 0 position 4)")


def test_merge_equivalence_fails_when_a_merge_does_not_load(tmp_path):
    safe = Outcome("peft-safe-merged", error="RuntimeError: out of memory")
    got = verdict("merge-equivalence", Run(safe=safe), tmp_path)
    assert (got.status, got.message) == ("fail", "peft-safe-merged failed to load: RuntimeError: out of memory")
    assert got.details["peft-safe-merged"] == "RuntimeError: out of memory"


# -- reload-roundtrip -------------------------------------------------------------------------------------


def test_reload_roundtrip_verdicts(tmp_path):
    got = verdict("reload-roundtrip", Run(), tmp_path)
    assert (got.status, got.message) == ("pass", "merged → saved → reloaded: no missing or unexpected tensors, "
                                                 "outputs match (max rel 2.0e-07)")
    assert got.details == {"missing_on_reload": [], "unexpected_on_reload": [],
                           "comparison": comparison("merge-script").to_dict(), "files": [], "max_rel": 2e-07}
    many = [f"t{i:02d}" for i in range(12)]
    lost = LoadRecord(path="merge-script", missing_keys=many, unexpected_keys=many)
    got = verdict("reload-roundtrip", Run(s=Outcome("merge-script", lost, comparison("merge-script"))), tmp_path)
    assert got.details["missing_on_reload"] == many[:10] and got.details["unexpected_on_reload"] == many[:10]
    lost = LoadRecord(path="merge-script", missing_keys=["m.Plora_A.weight", "n"], unexpected_keys=["u"])
    got = verdict("reload-roundtrip", Run(s=Outcome("merge-script", lost, comparison("merge-script"))), tmp_path)
    assert (got.status, got.message) == ("fail", "the reloaded merged checkpoint lacks 2 tensor(s), re-initialised on "
                                                 "load, e.g. m.Plora_A.weight")
    assert got.details["missing_on_reload"] == ["m.Plora_A.weight", "n"] and got.details["unexpected_on_reload"] == ["u"]
    extra = LoadRecord(path="merge-script", unexpected_keys=["u.lora_A.weight"])
    got = verdict("reload-roundtrip", Run(s=Outcome("merge-script", extra, comparison("merge-script"))), tmp_path)
    assert (got.status, got.message) == ("fail", "the merged checkpoint has 1 tensor(s) the model does not use, e.g. "
                                                 "u.lora_A.weight")
    assert got.details["unexpected_on_reload"] == ["u.lora_A.weight"]
    off = Outcome("merge-script", LoadRecord(path="merge-script"), comparison("merge-script", ok=False))
    got = verdict("reload-roundtrip", Run(s=off), tmp_path)
    assert got.status == "fail" and got.message == off.comparison.summary()
    assert got.details["comparison"] == off.comparison.to_dict()
    got = verdict("reload-roundtrip", Run(s=Outcome("merge-script", error="OSError: no file")), tmp_path)
    assert (got.status, got.message) == ("fail", "the merge script path failed: OSError: no file")


# -- plora-preserved -------------------------------------------------------------------------------------


def test_plora_preserved_verdicts(tmp_path):
    got = verdict("plora-preserved", Run(), tmp_path)
    assert (got.status, got.message) == ("pass", "all 1 PLoRA tensors bit-identical to the base after every merge; "
                                                 "1 PLoRA modules keep their class")
    assert got.details == {"plora_changed": [], "class_changes": [], "plora_tensors": 1,
                           "paths": ["peft-merged", "peft-safe-merged", "merge-script"]}
    run = Run()
    run.base_plora = {}
    assert verdict("plora-preserved", run, tmp_path).message == "the base model has no PLoRA weights"
    changed = Outcome("peft-merged", LoadRecord(path="peft-merged"), comparison("peft-merged"),
                      plora_changed=["b.Plora_B.weight", "a.Plora_A.weight"], class_changes=["a: Linear"])
    got = verdict("plora-preserved", Run(m=changed), tmp_path)
    assert (got.status, got.message) == ("fail", "2 PLoRA tensor(s) differ from the base after merging, e.g. "
                                                 "a.Plora_A.weight")
    assert got.details["plora_changed"] == ["a.Plora_A.weight", "b.Plora_B.weight"]
    assert got.details["class_changes"] == ["a: Linear"] and got.details["plora_tensors"] == 1
    swapped = Outcome("merge-script", LoadRecord(path="merge-script"), comparison("merge-script"),
                      class_changes=["model.layers.0.attention.wqkv: Linear"])
    got = verdict("plora-preserved", Run(m=swapped), tmp_path)
    assert (got.status, got.message) == ("fail", "1 PLoRA module(s) are not the original class after merging: "
                                                 "model.layers.0.attention.wqkv: Linear")
    got = verdict("plora-preserved", Run(m=Outcome("peft-safe-merged", error="boom")), tmp_path)
    assert (got.status, got.message) == ("fail", "peft-safe-merged failed to load: boom")
    assert got.details == {"plora_changed": [], "class_changes": [], "plora_tensors": 1,
                           "paths": ["peft-merged", "peft-safe-merged", "merge-script"]}
    many = Outcome("peft-merged", LoadRecord(path="peft-merged"), comparison("peft-merged"),
                   plora_changed=[f"l{i:02d}.Plora_A.weight" for i in range(12)],
                   class_changes=[f"l{i:02d}: Linear" for i in range(12)])
    got = verdict("plora-preserved", Run(m=many), tmp_path)
    assert got.details["plora_changed"] == many.plora_changed[:10] and got.details["class_changes"] == many.class_changes[:10]
    got = verdict("plora-preserved", Run(m=Outcome("merge-script", LoadRecord(path="merge-script"), comparison("m"),
                                                   class_changes=many.class_changes)), tmp_path)
    assert got.status == "fail" and got.details["class_changes"] == many.class_changes[:10]


# -- path-agreement ---------------------------------------------------------------------------------------


def test_path_agreement_verdicts(tmp_path):
    from harness.loading.paths import PATHS

    got = verdict("path-agreement", Run(), tmp_path)
    assert got.status == "pass"
    assert got.message == (f"all {len(PATHS)} loading paths agree with the fp32 reference; plain load_state_dict is "
                           "correctly refused (a PEFT adapter is not a state dict)")
    row = {"image_max_rel": 1e-7, "text_max_rel": 2e-7, "missing": 0, "unexpected": 0, "not_loaded": 0}
    assert got.details == {"paths": {name: row for name in PATHS}, "tolerance": 1e-5, "dtype": "float32",
                           "calibration": CALIBRATION, "raw_load_state_dict": None}
    dropped = Outcome("bin", LoadRecord(path="bin", unexpected_keys=[KEY]), comparison("bin", ok=False))
    off = Outcome("safetensors", LoadRecord(path="safetensors"), comparison("safetensors", ok=False))
    broken = Outcome("state-dict", error="KeyError: 'x'")
    got = verdict("path-agreement", Run(a=dropped, b=off, c=broken), tmp_path)
    assert got.status == "fail"
    assert got.message == (f"3 of {len(PATHS)} loading paths disagree: state-dict failed to load: KeyError: 'x'")
    assert got.details["paths"]["bin"]["unexpected"] == 1 and got.details["paths"]["state-dict"] == {"error": "KeyError: 'x'"}
    run = Run()
    run.raw_load = SimpleNamespace(message="load_state_dict(strict=True) refuses it: 20 unexpected keys")
    assert verdict("path-agreement", run, tmp_path).details["raw_load_state_dict"] == run.raw_load.message
    got = verdict("path-agreement", Run(a=dropped), tmp_path)
    assert got.message == f"1 of {len(PATHS)} loading paths disagree: bin: 0 missing, 1 unexpected, 0 not loaded keys"
    got = verdict("path-agreement", Run(b=off), tmp_path)
    assert got.message == f"1 of {len(PATHS)} loading paths disagree: {off.comparison.summary()}"


# -- depth slices: the worst slice decides ---------------------------------------------------------------


def test_combine_slices_takes_the_worst_and_names_its_layers():
    from harness.checks.dynamic import combine_slices
    from harness.checks.registry import failed, passed, skipped, warned

    a, b, c = (SimpleNamespace(label=f"layers {i}-{i + 1}") for i in (0, 2, 4))
    got = combine_slices([(a, passed("ok a")), (b, failed("bad b", fix="fix b")), (c, failed("bad c"))])
    assert (got.status, got.message, got.fix) == ("fail", "layers 2-3: bad b (+1 more slice(s) fail)", "fix b")
    assert got.details["depth_slices"]["layers 0-1"] == {"status": "pass", "message": "ok a"}
    got = combine_slices([(a, passed("ok a")), (b, warned("meh b"))])
    assert (got.status, got.message) == ("warn", "layers 2-3: meh b")
    got = combine_slices([(a, passed("ok a")), (b, passed("ok b"))])
    assert (got.status, got.message) == ("pass", "on 2 depth slice(s) (layers 0-1, layers 2-3): ok a (figures from "
                                                 "layers 0-1)")
    got = combine_slices([(a, passed("rel 1e-2", max_rel=1e-2)), (b, passed("rel 3e-2", max_rel=3e-2)),
                          (c, passed("rel 2e-2", max_rel=2e-2))])  # the largest error is the one shown
    assert got.message == "on 3 depth slice(s) (layers 0-1, layers 2-3, layers 4-5): rel 3e-2 (figures from layers 2-3)"
    got = combine_slices([(a, skipped("none")), (b, passed("ok b"))])
    assert (got.status, got.message) == ("pass", "on 2 depth slice(s) (layers 0-1, layers 2-3): ok b (figures from "
                                                 "layers 2-3)")
    assert combine_slices([(a, skipped("none a")), (b, skipped("none b"))]).message == "none a"
    got = combine_slices([(a, warned("meh a", fix="fix a")), (b, failed("bad b")), (c, warned("meh c"))])
    assert (got.status, got.message) == ("fail", "layers 2-3: bad b")
    got = combine_slices([(a, warned("meh a", fix="fix a")), (b, warned("meh b"))])
    assert (got.status, got.message, got.fix) == ("warn", "layers 0-1: meh a (+1 more slice(s) warn)", "fix a")
    assert got.details["depth_slices"]["layers 2-3"] == {"status": "warn", "message": "meh b"}


def test_a_base_over_the_budget_is_judged_per_depth_slice_naming_the_worst(default_bundle, monkeypatch):
    """Slices planned and written for real (a tiny base); each slice's run recorded: layer 1 drops a key."""
    from harness.checks.context import CheckOptions
    from harness.inputs.adapter_dir import read_adapter
    from harness.loading.slices import layer_layout, needed_bytes
    from harness.model.structure import inspect_base

    info = inspect_base(default_bundle.base_dir)
    ctx = CheckContext(adapter=read_adapter(default_bundle.adapter_dir), base=info,
                       options=CheckOptions(max_memory=needed_bytes(info, "float32", 1, layer_layout(info))))
    runs = {"layer 0": Run(), "layer 1": Run(p=Outcome("peft", LoadRecord(path="peft", unexpected_keys=[KEY]),
                                                         comparison("peft")))}
    import harness.checks.dynamic as dynamic

    monkeypatch.setattr(dynamic, "slice_cache", lambda depth_slice: {"dynamic.run": runs[depth_slice.label]})
    try:
        got = run_check(get_check("key-coverage"), ctx)
        assert got.status == "fail"
        assert got.message == f"layer 1: after PeftModel.from_pretrained: 0 missing, 1 unexpected, 0 not loaded adapter keys (e.g. {KEY})"
        assert got.details["depth_slices"]["layer 0"]["status"] == "pass"
        got = run_check(get_check("reload-roundtrip"), ctx)
        assert got.status == "pass" and got.message.startswith("on 2 depth slice(s) (layer 0, layer 1): merged → saved")
        assert [run.released for run in runs.values()] == [2, 2]
        assert any("the dynamic checks ran on 2 depth slice(s) of 1 layer(s) covering every layer the adapter touches"
                   in note for note in ctx.notes), ctx.notes
    finally:
        ctx.cleanup.close()


def test_a_budget_below_one_layer_fails_in_one_line(default_bundle):
    from harness.checks.context import CheckOptions
    from harness.inputs.adapter_dir import read_adapter
    from harness.model.structure import inspect_base

    ctx = CheckContext(adapter=read_adapter(default_bundle.adapter_dir), base=inspect_base(default_bundle.base_dir),
                       options=CheckOptions(max_memory=10_000))
    got = run_check(get_check("effect"), ctx)
    assert got.status == "fail"
    assert got.message.startswith("the base needs ")
    assert " GiB in float32 for the dynamic checks and the memory budget is 0.0 GiB; depth slices cannot help: even one " \
           "decoder layer" in got.message
    assert got.fix == "run on a machine with more memory (or --device cuda), or check a smaller base"


def test_a_temporary_disk_too_small_for_one_layer_fails_naming_tmpdir(default_bundle, monkeypatch):
    """Planning refuses because of the disk, not memory: the fix is about TMPDIR (chosen by the error's kind)."""
    import harness.loading.slices as slices
    from harness.checks.context import CheckOptions
    from harness.inputs.adapter_dir import read_adapter
    from harness.model.structure import inspect_base

    info = inspect_base(default_bundle.base_dir)
    monkeypatch.setattr(slices, "temporary_disk_free", lambda: 0)
    ctx = CheckContext(adapter=read_adapter(default_bundle.adapter_dir), base=info,
                       options=CheckOptions(max_memory=slices.needed_bytes(info, "float32", 1, slices.layer_layout(info))))
    got = run_check(get_check("merge-equivalence"), ctx)
    assert got.status == "fail"
    assert "depth slices cannot help: even one decoder layer with the rest of the model needs " in got.message
    assert "GiB of temporary disk and 0.0 GiB is free" in got.message
    assert got.fix == "point TMPDIR at a disk with room for one slice and its merged copy"
