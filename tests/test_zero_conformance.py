"""The conformance checks on real DeepSpeed ZeRO-2/3 outputs (acceptance of the DeepSpeed issue).

The naive ZeRO-3 adapter must fail ``empty-tensors`` naming both fixes; the gathered adapter and
the engine checkpoint itself (converted by zero_to_fp32) must pass every check against the base.
"""

from __future__ import annotations

import pytest

import harness
from harness.inputs.deepspeed import SKIP_REASON

pytest.importorskip("deepspeed", reason=SKIP_REASON)

pytestmark = pytest.mark.distributed


def failures(report) -> dict[str, str]:
    return {r.id: r.message for r in report.checks if r.status == "fail"}


def test_naive_zero3_adapter_fails_empty_tensors_with_both_fixes(zero_runs):
    run = zero_runs["zero3"]
    report = harness.check(run.naive_adapter_dir, base_model=run.base_dir, trust_remote_code=True, isolated=False)
    result = report.get("empty-tensors")
    assert result.status == "fail" and "ZeRO-3" in result.message
    assert "GatheredParameters" in result.fix and "_zero3_consolidated_16bit_state_dict" in result.fix
    assert report.get("path-agreement").status == "skip"  # cannot load until empty-tensors passes


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("source", ["gathered", "engine-checkpoint"])
def test_gathered_adapter_and_engine_checkpoint_pass_every_check(zero_runs, stage, source):
    run = zero_runs[f"zero{stage}"]
    adapter = run.gathered_adapter_dir if source == "gathered" else run.checkpoint_dir
    report = harness.check(adapter, base_model=run.base_dir, trust_remote_code=True, isolated=False)
    assert failures(report) == {}
    zero = report.get("zero-checkpoint")
    if source == "gathered":
        assert zero is None  # only reported for DeepSpeed checkpoint inputs
    else:
        assert zero.status == "pass"
        assert f"ZeRO-{stage} checkpoint, world size 2" in zero.message
        assert zero.details["tag"] == run.spec.tag and zero.details["world_size"] == 2
    assert report.get("path-agreement").status == "pass"


def test_converted_checkpoint_agrees_with_gathered_adapter(zero_runs):
    """key-coverage and path-agreement on both give the same outputs: same tensors, same reference."""
    run = zero_runs["zero3"]
    a = harness.check(run.gathered_adapter_dir, base_model=run.base_dir, trust_remote_code=True, isolated=False).get("path-agreement").details["paths"]
    b = harness.check(run.checkpoint_dir, base_model=run.base_dir, trust_remote_code=True, isolated=False).get("path-agreement").details["paths"]
    assert a.keys() == b.keys()
    for name in a:
        assert abs(a[name]["image_max_rel"] - b[name]["image_max_rel"]) < 1e-6, name


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_shard_is_refused_before_loading(zero_runs, tmp_path):
    import shutil

    import torch

    run = zero_runs["zero3"]
    ckpt = shutil.copytree(run.checkpoint_dir, tmp_path / "ckpt")
    shutil.copy(run.checkpoint_dir.parent / "adapter-gathered" / "adapter_config.json", ckpt / "adapter_config.json")
    marker = tmp_path / "PAYLOAD_RAN"
    shard = next((ckpt / run.spec.tag).glob("*_model_states.pt"))
    torch.save({"module": _Payload(str(marker))}, shard)
    report = harness.check(ckpt, base_model=run.base_dir, trust_remote_code=True, isolated=False)
    result = report.get("zero-checkpoint")
    assert result.status == "fail" and report.exit_code == 1
    assert shard.name in result.message and "open" in result.message and "never contains" in result.message
    assert not marker.exists(), "the pickle payload ran"
    others = [r for r in report.checks if r.id != "zero-checkpoint"]
    assert others and all(r.status == "skip" and "could not be converted" in r.message for r in others)
