"""Real DeepSpeed ZeRO-2 / ZeRO-3 runs (2 ranks, gloo, CPU) and what the harness makes of them.

One launch trains four runs, ZeRO-2 and ZeRO-3 in fp32 and in bf16 (``build_zero_many``, cached on
disk and file-locked, so all xdist workers share it). Tolerances: in fp32 runs the gathered
parameters, the consolidated state dict and zero_to_fp32's fp32 master weights are the same
numbers, so tensors must be bit-equal; in bf16 runs the saved adapters are bf16 and must equal the
bf16 rounding of the converted fp32 master weights, bit for bit. Logits (fp32 runs) are recomputed
in another process with another thread count, so they are compared at atol=rtol=1e-5.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
import torch

from harness.compat import DTYPE_KW
from harness.inputs.deepspeed import SKIP_REASON

pytest.importorskip("deepspeed", reason=SKIP_REASON)

from safetensors.torch import load_file  # noqa: E402

from fixtures.zero_runs import zero_run_specs  # noqa: E402
from fixtures.zero_train import ZeroSpec, ZeroTrainError, train_zero  # noqa: E402
from harness.inputs.deepspeed import (
    OPTIM_STATES_ALLOWED,
    ZeroCheckpointError,
    convert_zero_checkpoint,
    converted_zero_checkpoint,
    detect_zero_checkpoint,
    read_metadata,
    scan_checkpoint,
)

pytestmark = pytest.mark.distributed
RUNS = zero_run_specs()
FP32_RUNS = ["zero2", "zero3"]
LOGITS_TOL = {"atol": 1e-5, "rtol": 1e-5}


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def _descendants(pid: int) -> list[tuple[int, str]]:
    """Live descendants of ``pid`` from /proc (no psutil)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            found.append((child, cmd))
            todo.append(child)
    return found


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def _assert_no_strays(run_id: str) -> None:
    assert multiprocessing.active_children() == []
    workers = [(pid, cmd) for pid, cmd in _descendants(os.getpid()) if "zero_train" in cmd]
    assert workers == [], f"worker processes left behind: {workers}"
    assert _processes_mentioning(run_id) == [], f"processes of run {run_id} still alive"


@pytest.mark.parametrize("name", RUNS)
def test_real_checkpoint_is_detected_and_vetted(zero_runs, name: str) -> None:
    run, spec = zero_runs[name], RUNS[name]
    ckpt = detect_zero_checkpoint(run.checkpoint_dir)
    assert (ckpt.tag, ckpt.world_size) == ("global_step2", 2)
    assert ckpt.stage_hint == ("3" if spec.stage == 3 else "1 or 2")
    prefix = "bf16_" if spec.bf16 else ""
    optim = [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    model = ([f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)] if spec.stage == 3
             else ["mp_rank_00_model_states.pt"])
    assert sorted(f.name for f in ckpt.files()) == sorted(model + optim)
    optim_globals = {"deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler"}
    if spec.stage != 3:
        optim_globals.add("deepspeed.utils.tensor_fragment.fragment_address")
    for file_name, globs in scan_checkpoint(ckpt).items():
        assert set(globs) == (optim_globals if "optim" in file_name else set()), file_name
    assert optim_globals <= OPTIM_STATES_ALLOWED
    assert read_metadata(ckpt)["stage"] == spec.stage and read_metadata(ckpt)["world_size"] == 2


@pytest.mark.parametrize("name", RUNS)
def test_naive_save_is_empty_under_zero3_only(zero_runs, name: str) -> None:
    run = zero_runs[name]
    naive, gathered = _adapter(run.naive_adapter_dir), _adapter(run.gathered_adapter_dir)
    assert naive.keys() == gathered.keys() and len(naive) == 20
    assert all(t.numel() > 0 for t in gathered.values())
    if RUNS[name].stage == 3:
        assert {tuple(t.shape) for t in naive.values()} == {(0,)}
    else:  # ZeRO-2 replicates parameters, so the same naive save is complete
        assert all(torch.equal(naive[k], gathered[k]) for k in gathered)


@pytest.mark.parametrize("name", RUNS)
def test_gathered_consolidated_and_converted_adapters_agree(zero_runs, name: str, capfd) -> None:
    run, spec = zero_runs[name], RUNS[name]
    capfd.readouterr()
    gathered = _adapter(run.gathered_adapter_dir)
    consolidated = _adapter(run.consolidated_adapter_dir)
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in gathered.items()), "untrained"
    with converted_zero_checkpoint(run.checkpoint_dir) as conv:
        assert (conv.stage, conv.world_size, conv.tag, conv.n_tensors) == (spec.stage, 2, "global_step2", 20)
        assert conv.adapter_config_source == str(run.checkpoint_dir / "adapter_config.json")
        assert conv.dtype == "float32" and conv.left_out == []
        converted = _adapter(conv.output_dir)
        assert (conv.output_dir / "adapter_config.json").read_text() == (
            run.gathered_adapter_dir / "adapter_config.json").read_text()
        out_dir = conv.output_dir
    assert not out_dir.exists()
    assert capfd.readouterr().out == "", "DeepSpeed's prints must not reach stdout (the CLI prints JSON there)"
    assert "Detected checkpoint of type zero stage" in conv.log
    assert gathered.keys() == consolidated.keys() == converted.keys()
    saved_dtype = torch.bfloat16 if spec.bf16 else torch.float32
    for key, tensor in gathered.items():
        assert tensor.dtype == consolidated[key].dtype == saved_dtype and converted[key].dtype == torch.float32
        assert torch.equal(tensor, consolidated[key]), key
        assert torch.equal(tensor, converted[key].to(saved_dtype)), key  # bf16: the rounding of the master


@pytest.mark.parametrize("pair", [("zero2", "zero3"), ("zero2-bf16", "zero3-bf16")])
def test_both_stages_start_from_the_same_model(zero_runs, pair) -> None:
    # Same seeds, data and LoRA init: the first loss is bit-equal. Later steps are not compared:
    # ZeRO-2 and ZeRO-3 reduce gradients in different orders and Adam magnifies that on tiny gradients.
    first = {zero_runs[name].manifest["losses_rank0"][0] for name in pair}
    assert len(first) == 1


@pytest.mark.parametrize("source", ["gathered", "converted"])
@pytest.mark.parametrize("name", FP32_RUNS)
def test_base_plus_adapter_reproduces_rank0_logits(zero_runs, name: str, source: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = zero_runs[name]
    if source == "gathered":
        adapter_dir = run.gathered_adapter_dir
    else:
        adapter_dir = convert_zero_checkpoint(run.checkpoint_dir, tmp_path / "converted").output_dir
    ref = run.reference()
    base = AutoModelForCausalLM.from_pretrained(run.base_dir, trust_remote_code=True, **{DTYPE_KW: torch.float32})
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        logits = model(inputs_embeds=ref["inputs_embeds"], im_mask=ref["im_mask"],
                       attention_mask=ref["attention_mask"]).logits
    torch.testing.assert_close(logits.float(), ref["logits"], **LOGITS_TOL)
    with torch.no_grad(), model.disable_adapter():
        plain = model(inputs_embeds=ref["inputs_embeds"], im_mask=ref["im_mask"],
                      attention_mask=ref["attention_mask"]).logits
    assert (plain - ref["logits"]).abs().max() > 1e-3, "the adapter has no effect: the comparison proves nothing"


def test_conversion_leaves_the_input_untouched_and_needs_a_config(zero_runs, tmp_path: Path) -> None:
    src = zero_runs["zero3"].checkpoint_dir

    def snapshot(root: Path) -> list:
        return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))

    before = snapshot(src)
    with converted_zero_checkpoint(src):
        pass
    assert snapshot(src) == before
    bare = tmp_path / "run" / "ckpt"
    shutil.copytree(src, bare, ignore=shutil.ignore_patterns("adapter_config.json"))
    with pytest.raises(ZeroCheckpointError, match="adapter_config"):
        convert_zero_checkpoint(bare)
    conv = convert_zero_checkpoint(bare / "global_step2", tmp_path / "out",
                                   adapter_config=zero_runs["zero3"].gathered_adapter_dir)
    assert conv.n_tensors == 20 and conv.adapter_config_source.endswith("adapter_config.json")
    assert any("tag folder directly" in note for note in conv.notes)


def test_deepspeed_loads_really_run_weights_only(zero_runs, tmp_path: Path, monkeypatch) -> None:
    """Second line of defence: with an empty class allowlist, zero_to_fp32's own loads must fail."""
    import harness.inputs.deepspeed as zero

    monkeypatch.setattr(zero, "_allowed_classes", lambda: [])
    with pytest.raises(zero.UnsafeCheckpointError, match="weights_only=True"):
        convert_zero_checkpoint(zero_runs["zero3"].checkpoint_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_missing_rank_shard_is_a_clear_error(zero_runs, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(zero_runs["zero3"].checkpoint_dir, ckpt)
    (ckpt / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ZeroCheckpointError, match="zero_to_fp32 could not rebuild") as err:
        convert_zero_checkpoint(ckpt, tmp_path / "out")
    assert "Expected 2" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_runs_leave_no_process_behind(zero_runs) -> None:
    run_ids = {run.manifest["run_id"] for run in zero_runs.values()}
    assert len(run_ids) == 1  # every run came from one launch
    _assert_no_strays(run_ids.pop())


def _run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "logs" / "job.json").read_text())["run_id"]


def test_a_failing_rank_stops_the_others_and_leaves_no_process(tmp_path: Path) -> None:
    with pytest.raises(ZeroTrainError, match="rank 1 of 2 exited with code 1") as err:
        train_zero(tmp_path / "run", ZeroSpec(stage=3), fail_rank=1, timeout=120)
    assert "injected failure" in str(err.value) and str(tmp_path / "run" / "logs" / "rank1.log") in str(err.value)
    _assert_no_strays(_run_id(tmp_path / "run"))


def test_a_timeout_kills_every_worker(tmp_path: Path) -> None:
    with pytest.raises(ZeroTrainError, match="did not finish within 0.5 s"):
        train_zero(tmp_path / "run", ZeroSpec(stage=2), timeout=0.5)
    _assert_no_strays(_run_id(tmp_path / "run"))
