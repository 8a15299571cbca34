"""Branch kinds the issue lists as uncaught (issue 15, item 5): each must make its check fail for the right reason.

* a frozen parameter whose value changed against the base files (trained-params-saved);
* the bf16 dtype branch of ``check_trained`` (the trained model's dtype picks the comparison policy);
* a LoRA wrapper that ``merge_and_unload`` leaves in place while the outputs still agree (merge-equivalence,
  plora-preserved);
* every loading path wrong the same way: they agree with each other, only the fp32 reference tells
  (path-agreement).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

import harness
from harness.checks import CheckContext
from harness.checks.registry import get_check, run_check
from harness.loading import paths
from harness.loading.base import load_base
from harness.numerics.compare import pairwise_disagreements
from harness.numerics.tolerances import tolerance_for
from harness.synthetic import official_lora_config, save_adapter


def peft_model_of(base_dir: Path, dtype: torch.dtype = torch.float32):
    """The safe recipe (whole base frozen, then get_peft_model) with non-zero LoRA weights, no training needed."""
    model = load_base(base_dir, dtype=dtype)
    model.requires_grad_(False)
    peft_model = get_peft_model(model, official_lora_config(r=4, init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    return peft_model.eval()


# ---------------------------------------------------------------------------------------------
# trained-params-saved: a frozen parameter that changed anyway


@pytest.mark.parametrize(
    "param, key, kind",
    [("model.norm.weight", "model.norm.weight", "language"),
     ("vision_proj.0.weight", "vision_proj.0.weight", "projector")],
    ids=["language-norm", "projector"],
)
def test_frozen_parameter_changed_in_place_is_reported(default_bundle, tmp_path, param, key, kind) -> None:
    """Not trainable, yet different from the base files (an in-place edit, a buggy optimiser group, a
    requires_grad flip after the step): it is lost on save all the same, so it must be named."""
    peft_model = peft_model_of(default_bundle.base_dir)
    target = peft_model.get_base_model().get_parameter(param)
    assert not target.requires_grad
    with torch.no_grad():
        target.add_(0.25)
    saved = save_adapter(peft_model, tmp_path / "adapter")
    report = harness.check_trained(peft_model, saved, default_bundle.base_dir, trust_remote_code=True)
    params = report.get("trained-params-saved")
    assert params.id == "trained-params-saved" and params.status == "fail", params.message
    assert params.details["changed_not_saved"] == [{"name": key, "max_abs_change": pytest.approx(0.25, rel=1e-3),
                                                    "kind": kind}]
    assert params.details["trainable_not_saved"] == []  # caught by value, not by the requires_grad flag
    shipped = report.get("trained-vs-shipped")
    assert shipped.status == "fail"
    assert key in shipped.message or any(m["name"] == key for m in shipped.details["weight_mismatches"])


# ---------------------------------------------------------------------------------------------
# check_trained in bf16: the bf16 branch picks the dtype (and so the tolerance and the reload dtype)


def test_check_trained_on_a_bf16_model_compares_in_bf16(default_bundle, tmp_path) -> None:
    """A bf16 model is reloaded in bf16 and judged by the bf16 policy; were bf16 dropped from the accepted dtypes
    (fp32 reload, fp32 tolerance), bf16 rounding alone would fail this correctly saved adapter."""
    peft_model = peft_model_of(default_bundle.base_dir, torch.bfloat16)
    saved = save_adapter(peft_model, tmp_path / "adapter")
    report = harness.check_trained(peft_model, saved, default_bundle.base_dir, trust_remote_code=True)
    shipped = report.get("trained-vs-shipped")
    assert shipped.status == "pass", shipped.message
    assert shipped.details["comparison"]["dtype"] == "bfloat16"
    assert shipped.details["comparison"]["tolerance"] == tolerance_for(torch.bfloat16)
    assert report.get("trained-params-saved").status == "pass"


# ---------------------------------------------------------------------------------------------
# merge_and_unload leaving a LoRA wrapper in place


LEFT_BEHIND = "model.layers.0.attention.wqkv"


def merge_leaving_a_wrapper(base_dir, adapter_dir, **kw):
    """A merge whose numbers are right but that leaves one (merged) LoRA wrapper in the model, as the
    prefix-filter merge of old PEFT did for modules named lora_*: outputs agree, the structure does not."""
    loaded = ORIGINAL_PEFT(base_dir, adapter_dir, **kw)
    wrapper = loaded.model.get_base_model().get_submodule(LEFT_BEHIND)
    assert isinstance(wrapper, LoraLayer)
    merged = loaded.model.merge_and_unload()
    parent, name = LEFT_BEHIND.rsplit(".", 1)
    setattr(merged.get_submodule(parent), name, wrapper)  # its base_layer holds the merged weight
    loaded.model = merged.eval()
    loaded.record.path = "peft-merged"
    return loaded


ORIGINAL_PEFT = paths.PATHS["peft"]


def test_leftover_lora_wrapper_fails_merge_equivalence_and_plora_preserved(default_bundle, monkeypatch) -> None:
    monkeypatch.setitem(paths.PATHS, "peft-merged", paths.replaced("peft-merged", merge_leaving_a_wrapper))
    report = harness.check(default_bundle.adapter_dir, base_model=default_bundle.base_dir, trust_remote_code=True,
                           only=["merge-equivalence", "plora-preserved"], isolated=False)
    merge = report.get("merge-equivalence")
    assert merge.status == "fail" and merge.message.startswith("merge_and_unload left 1 LoRA wrapper(s) unmerged")
    assert merge.details["unmerged_wrappers"] == [LEFT_BEHIND]
    assert merge.details["peft-merged"]["ok"]  # the outputs alone would not have told
    plora = report.get("plora-preserved")
    assert plora.status == "fail"
    assert any(c.startswith(f"{LEFT_BEHIND}: ") and c.endswith("instead of PLoRA")
               for c in plora.details["class_changes"]), plora.details


# ---------------------------------------------------------------------------------------------
# every path wrong the same way


def test_every_path_wrong_the_same_way_fails_path_agreement(default_bundle, monkeypatch) -> None:
    """PEFT itself doubling the LoRA scaling (a version bug) moves every path alike: the paths agree with one
    another, and only the hand-folded fp32 reference shows that all of them are wrong."""
    from harness.checks.measure.dynamic_run import DynamicRun

    update_layer = LoraLayer.update_layer

    def doubled(self, adapter_name, *args, **kwargs):
        out = update_layer(self, adapter_name, *args, **kwargs)
        self.scaling[adapter_name] *= 2
        return out

    monkeypatch.setattr(LoraLayer, "update_layer", doubled)
    run = DynamicRun(default_bundle.base_dir, default_bundle.adapter_dir, dtype="float32", device="cpu")
    try:
        ctx = CheckContext(adapter=SimpleNamespace(config={}), base=SimpleNamespace(base_dir=default_bundle.base_dir))
        ctx.cache["dynamic.run"] = run
        result = run_check(get_check("path-agreement"), ctx)
        logits = {name: run.outcome(name).logits for name in paths.PATHS}
        assert pairwise_disagreements(logits, run.probe, dtype=torch.float32) == []  # they agree with each other
    finally:
        run.close()
    assert result.id == "path-agreement" and result.status == "fail"
    assert result.message.startswith(f"{len(paths.PATHS)} of {len(paths.PATHS)} loading paths disagree")
    rels = {name: max(row["image_max_rel"], row["text_max_rel"]) for name, row in result.details["paths"].items()}
    assert set(rels) == set(paths.PATHS) and min(rels.values()) > 100 * result.details["tolerance"], rels
