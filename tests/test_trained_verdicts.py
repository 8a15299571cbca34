"""``trained-vs-shipped`` and ``trained-params-saved`` on recorded training audits: each way a save loses training
fails (or warns) naming the parameters, their kind and the fix.

The end-to-end tests (test_trained.py) train and save tiny models; these feed each check an audit as
``audit_trained`` records it, so the mutation run (scripts/mutation-test.sh) judges the check bodies in seconds.
"""

from __future__ import annotations

from pathlib import Path

from harness.checks.context import CheckContext
from harness.checks.measure.training_audit import ParamFinding, TrainedAudit
from harness.checks.registry import get_check, run_check
from harness.model import families
from harness.numerics.compare import Comparison

PLORA = ParamFinding("model.layers.0.attention.wqkv.Plora_A.weight", trainable=True, changed=True,
                     max_abs_change=3e-2, kind="plora")
PROJ = ParamFinding("vision_proj.0.weight", trainable=True, changed=True, max_abs_change=5e-1, kind="projector")
IDLE = ParamFinding("vision_proj.0.bias", trainable=True, changed=False, max_abs_change=0.0, kind="projector")


def comparison(ok: bool = True) -> Comparison:
    return Comparison(label="reloaded", dtype="float32", tolerance=1e-5, image_max_abs=1e-7, image_max_rel=1e-7,
                      text_max_abs=2e-7 if ok else 3e-1, text_max_rel=2e-7 if ok else 3e-1,
                      worst_row=("text", 0, 3), ok=ok)


def audit(*, not_saved=(), ok=True, base_dir: Path | None = Path("/base"), **kw) -> TrainedAudit:
    kw.setdefault("family", families.detect(names=["model.layers.0.attention.wqkv.Plora_A.weight"]))  # XComposer
    return TrainedAudit(saved_dir=Path("/saved"), base_dir=base_dir, adapter_name="default", saved_keys=["k"],
                        not_saved=list(not_saved), trainable_count=8, compared_count=40, comparison=comparison(ok),
                        **kw)


def verdict(check_id: str, recorded: TrainedAudit):
    return run_check(get_check(check_id), CheckContext(cache={"trained.audit": recorded}))


def test_a_complete_save_passes_both():
    got = verdict("trained-vs-shipped", audit())
    assert got.status == "pass" and got.message.startswith("base + saved adapter reproduce the trained model: reloaded:")
    assert got.details == {"comparison": comparison().to_dict(), "not_saved": [], "weight_mismatches": []}
    got = verdict("trained-params-saved", audit())
    assert (got.status, got.message) == ("pass", "all 8 trainable parameters are in the adapter, 40 base parameters "
                                                 "unchanged")
    got = verdict("trained-params-saved", audit(base_dir=None))
    assert (got.status, got.message) == ("pass", "all 8 trainable parameters are in the adapter")
    assert got.details == {"changed_not_saved": [], "trainable_not_saved": [], "trainable": 8, "compared_with_base": 40,
                           "base_dir": None}
    assert verdict("trained-params-saved", audit()).details["base_dir"] == str(Path("/base"))


def test_trained_but_unsaved_parameters_fail_naming_kinds_the_worst_and_the_fix():
    got = verdict("trained-params-saved", audit(not_saved=[PLORA, PROJ, IDLE]))
    assert got.status == "fail"
    assert got.message == ("2 parameter(s) changed during training but are not in the adapter: 1 PLoRA Plora_A/Plora_B, "
                           "1 projector (vision_proj) (e.g. vision_proj.0.weight, max change 5.00e-01); 1 more "
                           "trainable but unchanged so far: 1 projector (vision_proj)")
    assert got.fix.startswith("freeze PLoRA before training") and "; add the module to LoraConfig(modules_to_save" in got.fix
    assert got.details["changed_not_saved"][0] == {"name": PLORA.name, "max_abs_change": 3e-2, "kind": "plora"}
    assert got.details["trainable_not_saved"] == [PLORA.name, PROJ.name, IDLE.name]


def test_the_worst_change_is_named_and_no_idle_tail_without_idle_parameters():
    unknown = ParamFinding("model.norm.weight", trainable=False, changed=True, max_abs_change=None)
    got = verdict("trained-params-saved", audit(not_saved=[unknown, PLORA]))
    assert got.message == ("2 parameter(s) changed during training but are not in the adapter: 1 other, 1 PLoRA "
                           "Plora_A/Plora_B (e.g. model.layers.0.attention.wqkv.Plora_A.weight, max change 3.00e-02)")


def test_a_plora_separator_alone_gets_the_plora_fix_only():
    separator = ParamFinding("plora_glb_GN", trainable=True, changed=True, max_abs_change=1e-3, kind="plora-separator")
    got = verdict("trained-params-saved", audit(not_saved=[separator]))
    assert got.message.startswith("1 parameter(s) changed during training but are not in the adapter: 1 plora_*_GN "
                                  "separator (e.g. plora_glb_GN")
    assert got.fix.startswith("freeze PLoRA before training") and "modules_to_save" not in got.fix


def test_trainable_unchanged_parameters_warn_and_fail_without_a_base():
    got = verdict("trained-params-saved", audit(not_saved=[IDLE]))
    assert (got.status, got.message) == ("warn", "1 trainable parameter(s) are not in the adapter: 1 projector "
                                         "(vision_proj) (e.g. vision_proj.0.bias); unchanged so far, but more training "
                                         "would lose their updates")
    assert got.fix.startswith("add the module to LoraConfig(modules_to_save")
    assert got.details["trainable_not_saved"] == [IDLE.name]
    got = verdict("trained-params-saved", audit(not_saved=[ParamFinding("x.w", True, None)], base_dir=None))
    assert (got.status, got.message) == ("fail", "1 trainable parameter(s) are not in the adapter: 1 other (e.g. x.w); "
                                         "no base files to tell whether training changed them")
    assert got.fix.startswith("add the module to LoraConfig(modules_to_save") and got.details["trainable_not_saved"] == ["x.w"]


def test_outputs_that_differ_fail_naming_what_changed_and_was_not_saved():
    got = verdict("trained-vs-shipped", audit(not_saved=[PLORA, IDLE], ok=False))
    assert got.status == "fail"
    assert got.message.startswith("the saved adapter does not reproduce the trained model: reloaded: ")
    assert got.message.endswith("; 1 parameter(s) changed in training are not in the adapter (1 PLoRA Plora_A/Plora_B, "
                                f"e.g. {PLORA.name})")
    assert got.fix.startswith("freeze PLoRA before training") and "modules_to_save" not in got.fix
    assert got.details["not_saved"] == [PLORA.name, IDLE.name]
    got = verdict("trained-vs-shipped", audit(ok=False))
    assert got.message.endswith("OUTSIDE the float32 tolerance 1e-05")
    assert got.fix.startswith("save every trained weight in the adapter")  # the check's own fix


def test_weights_off_beyond_rounding_fail_even_when_the_probe_agrees():
    mismatches = [("a.weight", 1e-8), ("z.weight", 2e-3), ("c.weight", 5e-3)]  # 1e-8 is within 1e-2 * tolerance
    got = verdict("trained-vs-shipped", audit(not_saved=[PROJ], weight_mismatches=mismatches))
    assert got.status == "fail"
    assert got.message.startswith("outputs agree on the probe (reloaded: ")
    assert got.message.endswith("but 2 parameter(s) of the reloaded model differ from the trained ones, e.g. c.weight "
                                "(max abs 5.00e-03): the probe does not reach them, users' inputs will")
    assert got.fix.startswith("add the module to LoraConfig") and got.details["not_saved"] == [PROJ.name]
    assert got.details["weight_mismatches"][1] == {"name": "z.weight", "max_abs": 2e-3}
    assert verdict("trained-vs-shipped", audit(weight_mismatches=[("a.weight", 1e-8)])).status == "pass"
    assert verdict("trained-vs-shipped", audit(weight_mismatches=[("a.weight", 1.1e-7)])).status == "fail"


def test_a_reload_that_fails_fails_with_a_base_and_skips_without():
    got = verdict("trained-vs-shipped", audit(reload_error="KeyError: 'x'", reload_path="auto-peft"))
    assert (got.status, got.message) == ("fail", "base + saved adapter could not be reloaded with auto-peft: KeyError: 'x'")
    assert got.fix == "fix the saved directory so PeftModel.from_pretrained loads it (see the static checks)"
    got = verdict("trained-vs-shipped", audit(reload_error="no base files given", base_dir=None))
    assert (got.status, got.message) == ("skip", "no base files given")


def test_a_kind_without_words_is_named_by_its_own_name():
    from harness.checks.trained import _by_kind

    findings = [ParamFinding("a", True, True, kind="mystery"), ParamFinding("b", True, True, kind="vision"),
                ParamFinding("c", True, True, kind="mystery")]
    assert _by_kind(findings, families.detect()) == "2 mystery, 1 vision tower"
