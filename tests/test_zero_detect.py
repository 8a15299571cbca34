"""harness.inputs.deepspeed without real DeepSpeed runs: detection, the pickle safety scan, key mapping, errors.

Every checkpoint here is hand-made with ``torch.save`` in the DeepSpeed file layout, so these
tests need neither deepspeed nor extra processes (the real ZeRO runs are in test_zero_runs.py).
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import compat
from harness.inputs import deepspeed as zero
from harness.inputs.deepspeed import (
    SKIP_REASON,
    DeepSpeedUnavailable,
    UnsafeCheckpointError,
    ZeroCheckpointError,
    convert_zero_checkpoint,
    detect_zero_checkpoint,
    is_zero_checkpoint,
    scan_file,
)
from harness.model.peft_keys import peft_key

REPO = Path(__file__).resolve().parents[1]
LORA_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["attention.wqkv"]}


class _Payload:
    """Unpickling this creates ``marker`` (``open(marker, "w")``): proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _model_states(extra: dict | None = None, stage: int = 3) -> dict:
    return {
        "module": {"base_model.model.x.lora_A.default.weight": torch.zeros(0)},
        "buffer_names": [],
        "param_shapes": [{"base_model.model.x.lora_A.default.weight": torch.Size([4, 8])}],
        "ds_config": {"zero_optimization": {"stage": stage}},
        "ds_version": "0.0.test",
        "dp_world_size": 2,
        **(extra or {}),
    }


def fake_checkpoint(root: Path, *, stage: int = 3, world: int = 2, tag: str = "global_step7",
                    latest: bool = True, config: bool = True, model_extra: dict | None = None,
                    optim_extra: dict | None = None) -> Path:
    """A DeepSpeed-shaped checkpoint of plain tensors and dicts (loads with weights_only=True)."""
    tag_dir = root / tag
    tag_dir.mkdir(parents=True)
    if latest:
        (root / "latest").write_text(tag)
    if config:
        (root / "adapter_config.json").write_text(json.dumps(LORA_CONFIG))
    model_names = ([f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)] if stage == 3
                   else ["mp_rank_00_model_states.pt"])
    for name in model_names:
        torch.save(_model_states(model_extra, stage), tag_dir / name)
    for r in range(world):
        torch.save({"optimizer_state_dict": {"fp32": torch.zeros(4)}, **(optim_extra or {})},
                   tag_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return root


# --------------------------------------------------------------------------- detection


def test_non_deepspeed_paths_are_not_detected(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(LORA_CONFIG))
    torch.save({"w": torch.zeros(2)}, adapter / "adapter_model.bin")
    other = tmp_path / "other"
    (other / "global_step1").mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, other / "global_step1" / "model.pt")  # not a DeepSpeed file name
    empty = tmp_path / "empty"
    empty.mkdir()
    for path in (adapter, other, empty, adapter / "adapter_config.json", tmp_path / "missing"):
        assert detect_zero_checkpoint(path) is None, path
        assert not is_zero_checkpoint(path)


@pytest.mark.parametrize("stage", [2, 3])
def test_detects_layout_stage_world_size_and_tag(tmp_path: Path, stage: int) -> None:
    root = fake_checkpoint(tmp_path / "ckpt", stage=stage, world=2)
    ckpt = detect_zero_checkpoint(root)
    assert ckpt is not None
    assert (ckpt.root, ckpt.tag, ckpt.tag_dir) == (root, "global_step7", root / "global_step7")
    assert ckpt.world_size == 2
    assert ckpt.stage_hint == ("3" if stage == 3 else "1 or 2")
    assert len(ckpt.model_files) == (2 if stage == 3 else 1) and len(ckpt.optim_files) == 2
    assert zero.read_metadata(ckpt) == {"stage": stage, "world_size": 2, "ds_version": "0.0.test",
                                        "global_steps": None}


def test_detects_a_tag_folder_given_directly(tmp_path: Path) -> None:
    root = fake_checkpoint(tmp_path / "ckpt")
    ckpt = detect_zero_checkpoint(root / "global_step7")
    assert (ckpt.root, ckpt.tag) == (root, "global_step7")
    assert any("tag folder directly" in note for note in ckpt.notes)


def test_without_latest_the_highest_step_wins_with_a_note(tmp_path: Path) -> None:
    root = fake_checkpoint(tmp_path / "ckpt", tag="global_step9", latest=False)
    fake_checkpoint(root, tag="global_step10", latest=False, config=False)
    ckpt = detect_zero_checkpoint(root)
    assert ckpt.tag == "global_step10"  # natural order, not string order
    assert any("global_step9" in note for note in ckpt.notes)
    assert detect_zero_checkpoint(root, tag="global_step9").tag == "global_step9"


@pytest.mark.parametrize(
    ("breakage", "needle"),
    [
        ("latest-missing-folder", "global_step99"),
        ("latest-escapes", "single folder name"),
        ("tensor-parallel", "mp_rank_01"),
        ("optim-without-model", "model_states"),
    ],
)
def test_broken_checkpoints_fail_with_one_clear_sentence(tmp_path: Path, breakage: str, needle: str) -> None:
    root = fake_checkpoint(tmp_path / "ckpt")
    tag_dir = root / "global_step7"
    if breakage == "latest-missing-folder":
        (root / "latest").write_text("global_step99")
    elif breakage == "latest-escapes":
        (root / "latest").write_text("../../etc")
    elif breakage == "tensor-parallel":
        torch.save(_model_states(), tag_dir / "zero_pp_rank_0_mp_rank_01_model_states.pt")
    elif breakage == "optim-without-model":
        for f in tag_dir.glob("*_model_states.pt"):
            f.unlink()
    with pytest.raises(ZeroCheckpointError) as err:
        detect_zero_checkpoint(root)
    message = str(err.value)
    assert needle in message and "\n" not in message
    assert is_zero_checkpoint(root)  # it is one, just a broken one


# --------------------------------------------------------------------------- safety scan


def test_payload_is_live_when_loaded_unsafely(tmp_path: Path) -> None:
    """Guards the refusal tests below: this payload really runs under weights_only=False."""
    marker = tmp_path / "ran"
    torch.save({"x": _Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)["x"].close()  # the payload's open file, closed
    assert marker.exists()


@pytest.mark.parametrize("where", ["model", "optim"])
def test_hostile_pickle_is_refused_before_loading(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "payload-ran"
    payload = {"evil": _Payload(marker)}
    root = fake_checkpoint(tmp_path / "ckpt", model_extra=payload if where == "model" else None,
                           optim_extra=payload if where == "optim" else None)
    before = sorted(p.name for p in root.rglob("*"))
    with pytest.raises(UnsafeCheckpointError) as err:
        convert_zero_checkpoint(root, tmp_path / "out")
    message = str(err.value)
    assert "io.open" in message and "refused" in message and "\n" not in message
    assert err.value.offending == ["io.open"]
    assert err.value.file.name.endswith(f"_{where}_states.pt") and str(err.value.file) in message
    assert not marker.exists(), "the payload ran: the file was unpickled before the scan"
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in root.rglob("*")) == before


def test_legacy_pickle_cannot_be_vetted_and_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    root = fake_checkpoint(tmp_path / "ckpt")
    target = root / "global_step7" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    target.write_bytes(pickle.dumps({"evil": _Payload(marker)}))  # not a torch.save zip archive
    with pytest.raises(UnsafeCheckpointError, match="cannot be vetted"):
        convert_zero_checkpoint(root)
    assert not marker.exists()


def test_allowlist_is_per_file_kind(tmp_path: Path) -> None:
    ds_config = pytest.importorskip("deepspeed.runtime.zero.config", reason=SKIP_REASON)
    f = tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    torch.save({"stage": ds_config.ZeroStageEnum.weights}, f)
    with pytest.raises(UnsafeCheckpointError, match="ZeroStageEnum"):
        scan_file(f)  # model states never need DeepSpeed classes
    optim = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(f.read_bytes())
    assert scan_file(optim) == ["deepspeed.runtime.zero.config.ZeroStageEnum"]


# --------------------------------------------------------------------------- conversion errors


def test_missing_deepspeed_is_a_skip_reason_not_a_traceback(tmp_path: Path, monkeypatch) -> None:
    root = fake_checkpoint(tmp_path / "ckpt")
    monkeypatch.setattr(zero, "deepspeed_unavailable_reason", lambda: SKIP_REASON)
    with pytest.raises(DeepSpeedUnavailable) as err:
        convert_zero_checkpoint(root, tmp_path / "out")
    assert str(err.value) == err.value.reason == "deepspeed not installed (pip install 'plora-harness[deepspeed]')"
    assert not (tmp_path / "out").exists()


def test_missing_adapter_config_says_where_to_put_it(tmp_path: Path) -> None:
    root = fake_checkpoint(tmp_path / "ckpt", config=False)
    with pytest.raises(ZeroCheckpointError, match="into the checkpoint directory \\(API: adapter_config=\\)") as err:
        convert_zero_checkpoint(root)
    assert str(root) in str(err.value) and "\n" not in str(err.value)


def test_adapter_config_search_order(tmp_path: Path) -> None:
    root = fake_checkpoint(tmp_path / "run" / "ckpt", config=False)
    ckpt = detect_zero_checkpoint(root)
    (tmp_path / "run" / "adapter_config.json").write_text(json.dumps({**LORA_CONFIG, "r": 1}))
    assert zero.find_adapter_config(ckpt)[0]["r"] == 1  # beside the checkpoint
    (root / "adapter_config.json").write_text(json.dumps({**LORA_CONFIG, "r": 2}))
    assert zero.find_adapter_config(ckpt) == ({**LORA_CONFIG, "r": 2}, str(root / "adapter_config.json"))
    explicit = {**LORA_CONFIG, "r": 3}
    assert zero.find_adapter_config(ckpt, explicit)[0]["r"] == 3
    with pytest.raises(ZeroCheckpointError, match="only LoRA"):
        zero.find_adapter_config(ckpt, {"peft_type": "IA3"})


def test_output_inside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    root = fake_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ZeroCheckpointError, match="never written to"):
        convert_zero_checkpoint(root, root / "converted")
    assert not (root / "converted").exists()


def test_not_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ZeroCheckpointError, match="not a DeepSpeed checkpoint"):
        convert_zero_checkpoint(tmp_path)


# --------------------------------------------------------------------------- key mapping


@pytest.mark.parametrize(
    ("key", "saved"),
    [
        ("base_model.model.model.layers.0.attention.wqkv.lora_A.default.weight",
         "base_model.model.model.layers.0.attention.wqkv.lora_A.weight"),
        ("base_model.model.m.lora_B.default.bias", "base_model.model.m.lora_B.bias"),
        ("base_model.model.tok.lora_embedding_A.default", "base_model.model.tok.lora_embedding_A"),
        ("base_model.model.m.lora_magnitude_vector.default.weight", "base_model.model.m.lora_magnitude_vector"),
        ("base_model.model.output.modules_to_save.default.weight", "base_model.model.output.weight"),
        ("base_model.model.m.base_layer.Plora_A.lora_A.default.weight",
         "base_model.model.m.base_layer.Plora_A.lora_A.weight"),
        ("base_model.model.m.base_layer.Plora_A.weight", None),  # PLoRA is the base model's, not LoRA
        ("base_model.model.plora_glb_GN", None),
        ("base_model.model.m.lora_A.other.weight", None),  # another adapter
        ("base_model.model.m.base_layer.weight", None),
    ],
)
def test_peft_key_matches_get_peft_model_state_dict(key: str, saved: str | None) -> None:
    if "lora_magnitude_vector" in key and not compat.peft_supports("use_dora"):
        saved = None  # the part names come from the installed PEFT, and one without DoRA has no magnitudes
    assert peft_key(key, "default") == saved


def test_peft_key_agrees_with_peft_on_the_synthetic_model() -> None:
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    from harness import compat
    from harness.synthetic import build_model, official_lora_config

    dora = {"use_dora": True} if compat.peft_supports("use_dora") else {}  # magnitude keys where PEFT has DoRA
    model = get_peft_model(build_model("ixc2.5"), official_lora_config(r=2, **dora))
    saved = set(get_peft_model_state_dict(model))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert {peft_key(name) for name in trainable} - {None} == saved
    # PEFT <= 0.20 also leaves PLoRA's Plora_A/B and plora_*_GN trainable (their names contain "lora_"):
    # not adapter keys, and peft_key says so.
    leftover = [name for name in trainable if peft_key(name) is None]
    assert all("lora_" in name.lower() and ".lora_" not in name for name in leftover), leftover[:5]


# --------------------------------------------------------------------------- import hygiene


def test_library_never_imports_deepspeed_or_pytest_at_import_time() -> None:
    for rel in ("harness/inputs/deepspeed.py", "fixtures/zero_train.py"):
        tree = ast.parse((REPO / rel).read_text())
        top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        top |= {(node.module or "").split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
        assert not top & {"deepspeed", "pytest", "torch"}, (rel, top)
    code = ("import sys, harness.inputs.deepspeed as z; "
            "assert z.detect_zero_checkpoint('.') is None; "
            "assert 'deepspeed' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(REPO)})


def test_whether_an_adapter_is_a_deepspeed_checkpoint_is_read_from_disk_once(default_bundle, tmp_path, monkeypatch):
    """Issue 22: the plan decides it once per adapter; the groups, the planned ids, the isolation decision, the
    engine's reading of the inputs and the engine process (through the plan's JSON) reuse that answer."""
    from harness.api import check_adapters
    from harness.engine.plan import Plan

    calls: list[str] = []
    real = zero.is_zero_checkpoint
    monkeypatch.setattr(zero, "is_zero_checkpoint", lambda path: calls.append(str(path)) or real(path))
    run = check_adapters([default_bundle.adapter_dir], isolated=False)  # a whole static run, in this process
    assert run.reports[0].get("config-valid").status == "pass"
    assert calls == [str(default_bundle.adapter_dir)]

    calls.clear()
    ckpt = fake_checkpoint(tmp_path / "ckpt")
    plan = Plan(adapters=(str(ckpt), str(default_bundle.adapter_dir)))
    assert calls == [str(ckpt), str(default_bundle.adapter_dir)]
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.zero_checkpoints == (str(ckpt),) and len(calls) == 2
    assert again.groups(0)[0] == "deepspeed" and again.groups(1) == ["static"]
    assert again.runs_model_code() and len(calls) == 2
