"""The loading-path matrix on real directories: every registered path against the fp32 reference.

Base directories and trained adapters come from the shared synthetic cache (built once per
session); generated adapters (drawn rank / alpha / rsLoRA / patterns / targets) are written to
temporary directories next to a cached base. Input directories are never written to.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import get_peft_model
from peft.tuners.lora import LoraModel
from test_properties_merge import (  # noqa: E402  (shared scenario machinery, tests/ is on sys.path)
    Scenario,
    doubled_scaling_merge,
    fill_adapter,
    legacy_merge_and_unload,
    prop_settings,
    scenarios,
)

from fixtures.judging import build_reference, judge
from harness import compat
from harness.inputs.adapter_dir import read_adapter_tensors
from harness.loading.base import load_base, recording_adjustments
from harness.loading.paths import PATHS, UNAVAILABLE, LoaderRefused
from harness.loading.raw_load import PEFT_NOT_STATE_DICT, diagnose_raw_load
from harness.loading.records import find_unmerged_lora_wrappers
from harness.numerics.compare import pairwise_disagreements
from harness.numerics.probes import make_probe
from harness.numerics.reference import probe_logits
from harness.synthetic.adapters import save_adapter
from harness.synthetic.family import TINY, build_model

torch.set_num_threads(1)

TRANSFORMERS_INTEGRATION = {"transformers-load-adapter", "transformers-from-adapter-dir"}
NATIVE_PATHS = TRANSFORMERS_INTEGRATION | {"auto-peft"}
EXPECTED_PATHS = {"peft", "peft-merged", "peft-safe-merged", "merge-script", "load-adapter", "state-dict", "bin",
                  "safetensors"}


def dir_digest(path: Path) -> str:
    """Names and bytes of every file under ``path``: proves a path never writes into its inputs."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def probe_for_dir(reference_model) -> object:
    return make_probe(reference_model.get_input_embeddings(), batch_size=2, seq_len=10, image_spans=[(2, 6)],
                      left_padding=[0, 2], seed=7)


def run_matrix(base_dir: Path, adapter_dir: Path, *, dtype: torch.dtype = torch.float32, paths=None,
               workdir: Path | None = None) -> tuple[list[str], dict]:
    """Every path against the fp32 reference and against each other; returns (problems, records)."""
    paths = PATHS if paths is None else paths
    reference = build_reference(base_dir, adapter_dir)
    probe = probe_for_dir(reference.model)
    ref_logits = probe_logits(reference.model, probe)
    problems, records, outputs = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        for name, path in paths.items():
            loaded = path(base_dir, adapter_dir, dtype=dtype, device="cpu", workdir=root / name)
            records[name] = loaded.record
            assert not loaded.model.training, f"path {name} returned a model in training mode"
            record = loaded.record
            if record.missing_keys or record.unexpected_keys or getattr(record, "not_loaded", []):
                problems.append(f"path {name}: missing {record.missing_keys[:3]}, unexpected "
                                f"{record.unexpected_keys[:3]}, not loaded {getattr(record, 'not_loaded', [])[:3]}")
            verdict = judge(name, loaded.model, reference, probe, dtype=dtype, reference_logits=ref_logits)
            if not verdict.ok:
                problems.append(verdict.report())
            outputs[name] = probe_logits(loaded.model, probe)
            del loaded
    problems += pairwise_disagreements(outputs, probe, dtype=dtype)
    return problems, records


def test_registry_has_every_path() -> None:
    assert EXPECTED_PATHS <= set(PATHS)


def test_paths_that_share_a_load_run_as_one_chain_until_one_is_replaced(monkeypatch) -> None:
    """The chain (peft -> peft-merged -> merge-script) is derived from the records; a replaced path (a test double,
    a user's variant) loads on its own, and so does what would have continued from it."""
    from harness.loading import paths

    def names(name: str) -> list[str]:
        return [path.name for path in paths.chain_of(name)]

    assert names("peft") == names("merge-script") == ["peft", "peft-merged", "merge-script"]
    assert names("peft-safe-merged") == [] and names("bin") == []
    assert paths.merging() == ["peft-merged", "peft-safe-merged", "merge-script"]
    assert paths.merging_in_memory() == ["peft-merged", "peft-safe-merged"]
    monkeypatch.setitem(paths.PATHS, "merge-script", paths.replaced("merge-script", paths.load_merge_script))
    assert names("peft") == ["peft", "peft-merged"] and names("merge-script") == []
    monkeypatch.setitem(paths.PATHS, "peft-merged", paths.replaced("peft-merged", paths.load_peft_merged))
    assert names("peft") == names("peft-merged") == []
    assert paths.PATHS["peft-merged"].merges  # a replacement keeps the facts of the path it stands for


def test_transformers_native_paths_are_registered_or_skipped_with_the_reason() -> None:
    """Each native path is in the matrix where the installed stack has it, else listed with why (never dropped
    silently): transformers < 4.33 has no PEFT integration, peft < 0.9's
    AutoPeftModelForCausalLM cannot load a local adapter directory without a tokenizer."""
    import transformers

    for name in NATIVE_PATHS:
        assert (name in PATHS) != (name in UNAVAILABLE), name
        if name in UNAVAILABLE:
            assert "transformers" in UNAVAILABLE[name] or "peft" in UNAVAILABLE[name], UNAVAILABLE[name]
    if hasattr(transformers.PreTrainedModel, "load_adapter"):
        assert {"transformers-load-adapter", "transformers-from-adapter-dir"} <= set(PATHS)
    else:
        assert "4.33" in UNAVAILABLE["transformers-load-adapter"]


@pytest.mark.parametrize("name", sorted(NATIVE_PATHS))
def test_native_paths_load_the_checked_base_whatever_the_config_names(name, default_bundle, tmp_path) -> None:
    """AutoPeftModelForCausalLM / from_pretrained(adapter_dir) read base_model_name_or_path; the path resolves it
    to the base being checked (a copy of the adapter in its workdir), never writing into the user's directory."""
    if name not in PATHS:
        pytest.skip(UNAVAILABLE[name])
    adapter = tmp_path / "adapter"
    shutil.copytree(default_bundle.adapter_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "stale" / "base-that-moved")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    before = dir_digest(adapter)
    problems, records = run_matrix(default_bundle.base_dir, adapter, paths={name: PATHS[name]},
                                   workdir=tmp_path / "work")
    assert not problems, "\n".join(problems)
    assert dir_digest(adapter) == before, "a path wrote into the adapter directory"
    assert "adapter_model.safetensors" in records[name].files_used


@pytest.mark.parametrize("name", sorted(NATIVE_PATHS))
def test_native_paths_see_a_decoy_adapter(name, default_bundle, tmp_path) -> None:
    """A native path that loaded nothing (or the base alone) must disagree with the reference: zeroing lora_B in a
    copy changes every native path's outputs, so the matrix comparison is not vacuous for them."""
    if name not in PATHS:
        pytest.skip(UNAVAILABLE[name])
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(default_bundle.adapter_dir, adapter)
    reference = build_reference(default_bundle.base_dir, default_bundle.adapter_dir)
    probe = probe_for_dir(reference.model)
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: (v * 0 if ".lora_B." in k else v).contiguous() for k, v in tensors.items()},
              str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    loaded = PATHS[name](default_bundle.base_dir, adapter, dtype=torch.float32, device="cpu", workdir=tmp_path / "w")
    assert not judge(name, loaded.model, reference, probe, dtype=torch.float32).ok


def paths_that_load(base_dir: Path, adapter_dir: Path) -> tuple[dict, dict[str, str]]:
    """Every path, less the transformers-integration ones that refuse a .bin-only adapter (transformers 5.x's
    load_adapter finds no adapter_model.bin): those must refuse by name, with the fix."""
    paths, refused = dict(PATHS), {}
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        for name in TRANSFORMERS_INTEGRATION & set(PATHS):
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    PATHS[name](base_dir, adapter_dir, dtype=torch.float32, device="cpu", workdir=Path(tmp))
                except LoaderRefused as err:
                    refused[name] = str(err)
                    del paths[name]
    assert all("safe_serialization=True" in text for text in refused.values()), refused
    return paths, refused


@pytest.mark.parametrize("variant,safe", [("ixc2.5", True), ("ixc2", False), ("ixc2-4khd", True)])
def test_trained_adapter_loads_identically_on_every_path(make_bundle, variant: str, safe: bool) -> None:
    bundle = make_bundle(variant=variant, safe_serialization=safe)
    before = dir_digest(bundle.base_dir), dir_digest(bundle.adapter_dir)
    paths, refused = paths_that_load(bundle.base_dir, bundle.adapter_dir)
    problems, records = run_matrix(bundle.base_dir, bundle.adapter_dir, paths=paths)
    assert not problems, "\n".join(problems)
    assert (dir_digest(bundle.base_dir), dir_digest(bundle.adapter_dir)) == before, "a path wrote into its inputs"
    assert set(records) | set(refused) == set(PATHS)
    for name, record in records.items():
        assert record.path == name
        assert isinstance(record.warnings, list)
    saved = "adapter_model.safetensors" if safe else "adapter_model.bin"
    assert saved in records["peft"].files_used
    assert "adapter_model.bin" in records["bin"].files_used
    assert "adapter_model.safetensors" in records["safetensors"].files_used
    files = set(records["merge-script"].files_used)
    assert {"config.json", "modeling_internlm_xcomposer2.py", "build_mlp.py", "tokenizer.json"} <= files


def test_low_precision_paths_within_dtype_tolerance(default_bundle) -> None:
    problems, _ = run_matrix(default_bundle.base_dir, default_bundle.adapter_dir, dtype=torch.bfloat16,
                             paths={k: PATHS[k] for k in ("peft", "peft-merged", "merge-script")})
    assert not problems, "\n".join(problems)


def test_merge_script_reload_is_plora_and_bit_identical(default_bundle, tmp_path: Path) -> None:
    loaded = PATHS["merge-script"](default_bundle.base_dir, default_bundle.adapter_dir, dtype=torch.float32,
                                   device="cpu", workdir=tmp_path)
    base = load_base(default_bundle.base_dir, dtype=torch.float32)
    assert not find_unmerged_lora_wrappers(loaded.model)
    got, want = loaded.model.state_dict(), base.state_dict()
    plora = [k for k in want if ".Plora_" in k or k.startswith("plora_")]
    assert plora and all(torch.equal(got[k], want[k]) for k in plora)
    assert {type(m).__name__ for n, m in loaded.model.named_modules() if n.endswith("attention.wqkv")} == {"PLoRA"}
    assert (tmp_path / "merge-script" / "config.json").is_file()


def test_load_base_records_warnings(default_bundle) -> None:
    sink: list[str] = []
    model = load_base(default_bundle.base_dir, dtype=torch.float32, warnings_into=sink)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert all(isinstance(w, str) for w in sink)


@pytest.mark.parametrize("variant", ["ixc2", "ixc2.5"])
def test_raw_load_state_dict_is_diagnosed(make_bundle, variant: str) -> None:
    bundle = make_bundle(variant=variant)
    diagnosis = diagnose_raw_load(bundle.base_dir, bundle.adapter_dir)
    assert diagnosis.failed and diagnosis.error_type == "RuntimeError"
    assert diagnosis.message.startswith(PEFT_NOT_STATE_DICT)
    assert "Traceback" not in diagnosis.message
    assert any(".Plora_A." in k for k in diagnosis.missing_plora)
    assert any(".Plora_B." in k for k in diagnosis.missing_plora)
    assert "Plora_A" in diagnosis.message and "Plora_B" in diagnosis.message
    hd = variant != "ixc2"
    assert ("plora_glb_GN" in diagnosis.missing_plora) == hd and ("plora_sub_GN" in diagnosis.message) == hd
    assert diagnosis.unexpected_total == len(read_adapter_tensors(bundle.adapter_dir))


def test_raw_load_leaves_a_given_model_untouched(default_bundle) -> None:
    model = load_base(default_bundle.base_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert diagnose_raw_load(model, default_bundle.adapter_dir).failed
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Generated adapters through the whole matrix


def write_adapter(sc: Scenario, out: Path, *, targets=None, safe: bool = True) -> Path:
    """An adapter for the bundle base (same variant, TINY dims, seed 0) with deterministic tensors."""
    model = get_peft_model(build_model(sc.variant, TINY, seed=0), sc.lora_config(targets))
    fill_adapter(model, sc.seed)
    return save_adapter(model.eval(), out, safe_serialization=safe)


@prop_settings(8)
@given(sc=scenarios(dtypes=("float32",), masks=("spans",)), safe=st.booleans())
def test_generated_adapters_agree_on_every_path(make_bundle, sc: Scenario, safe: bool) -> None:
    """Drawn r / alpha / rsLoRA / rank_pattern / alpha_pattern / targets: every path pair agrees with the reference."""
    base_dir = make_bundle(variant=sc.variant).base_dir
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = write_adapter(sc, Path(tmp) / "adapter", safe=safe)
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert config["use_rslora"] == sc.rslora and config["rank_pattern"] == dict(sc.rank_pattern)
        problems, _ = run_matrix(base_dir, adapter_dir, paths=paths_that_load(base_dir, adapter_dir)[0],
                                 workdir=Path(tmp) / "work")
    assert not problems, f"{sc!r}\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# A broken path must fail loudly and say where


def doubled_scaling_path(base_dir: Path, adapter_dir: Path, **kw):
    """Test double: ``peft-merged`` with every LoRA scaling doubled before the merge."""
    loaded = PATHS["peft"](base_dir, adapter_dir, **kw)
    loaded.record.path = "peft-merged-doubled"
    loaded.model = doubled_scaling_merge(loaded.model).eval()
    return loaded


def test_doubled_scaling_path_fails_with_readable_report(default_bundle) -> None:
    broken = {"peft": PATHS["peft"], "peft-merged-doubled": doubled_scaling_path}
    problems, _ = run_matrix(default_bundle.base_dir, default_bundle.adapter_dir, paths=broken)
    assert problems, "a doubled scaling went unnoticed"
    report = "\n".join(problems)
    print(report)
    assert "path peft-merged-doubled: MISMATCH" in report
    assert "image rows max abs" in report and "text rows max abs" in report and "OUTSIDE" in report
    assert "worst module model.layers." in report and "(layer " in report
    assert "first divergent decoder layer: layer 0" in report
    assert "peft vs peft-merged-doubled" in report  # the pairwise comparison fails too


# ---------------------------------------------------------------------------------------------
# LoRA on Plora_A / Plora_B


def test_lora_on_plora_a_with_prefix_filter_merge_loses_plora_a(default_bundle, tmp_path: Path, monkeypatch) -> None:
    """With the old prefix-filter merge, Plora_A wrappers survive merge_and_unload, the merged checkpoint
    saves ``Plora_A.base_layer.weight`` instead of ``Plora_A.weight``, and the reload re-initialises it."""
    sc = Scenario(variant="ixc2.5", r=4, alpha=8)
    adapter_dir = write_adapter(sc, tmp_path / "adapter", targets=r".*\.Plora_A")
    if not compat.merge_skips_lora_named_modules():
        # peft 0.21 merges these correctly (structural matching):
        loaded = PATHS["merge-script"](default_bundle.base_dir, adapter_dir, dtype=torch.float32, device="cpu",
                                       workdir=tmp_path / "new")
        assert not loaded.record.missing_keys and not find_unmerged_lora_wrappers(loaded.model)
        # ... the older behaviour, reproduced by a test double of merge_and_unload:
        monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: legacy_merge_and_unload(self))
    # (an installed PEFT <= 0.20 has the prefix filter itself: no double needed)
    merged = PATHS["peft-merged"](default_bundle.base_dir, adapter_dir, dtype=torch.float32, device="cpu",
                                  workdir=tmp_path / "old-merged")
    flagged = find_unmerged_lora_wrappers(merged.model)
    assert flagged and all(name.endswith("Plora_A") for name in flagged)
    reloaded = PATHS["merge-script"](default_bundle.base_dir, adapter_dir, dtype=torch.float32, device="cpu",
                                     workdir=tmp_path / "old")
    lost = [k for k in reloaded.record.missing_keys if k.endswith("Plora_A.weight")]
    assert lost, reloaded.record.missing_keys
    assert any("Plora_A.base_layer.weight" in k for k in reloaded.record.unexpected_keys)


def test_lora_on_plora_has_no_text_row_effect_through_paths(default_bundle, tmp_path: Path) -> None:
    sc = Scenario(variant="ixc2.5", r=4, alpha=8)
    adapter_dir = write_adapter(sc, tmp_path / "adapter", targets=r".*\.Plora_[AB]")
    base = load_base(default_bundle.base_dir, dtype=torch.float32)
    text_only = make_probe(base.get_input_embeddings(), batch_size=2, seq_len=8, image_spans=[], seed=3)
    want = probe_logits(base, text_only)
    for name in ("peft", "peft-merged", "load-adapter"):
        loaded = PATHS[name](default_bundle.base_dir, adapter_dir, dtype=torch.float32, device="cpu",
                             workdir=tmp_path / name)
        assert torch.equal(probe_logits(loaded.model, text_only), want), name


def test_flash_attention_config_loads_eagerly_with_a_note(default_bundle, tmp_path: Path) -> None:
    """Real XComposer configs ask for flash_attention_2; without flash_attn the load falls back to eager, said."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed: no override happens")
    copy = shutil.copytree(default_bundle.base_dir, tmp_path / "flash-config")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "attn_implementation": "flash_attention_2"}))
    notes: list[str] = []
    with recording_adjustments(notes):  # what the engine puts in the report's notes
        model = load_base(copy, dtype=torch.float32)
    assert model.config.attn_implementation == "eager"
    assert any("asks for attn_implementation='flash_attention_2' and flash_attn is not installed" in n
               for n in notes), notes
    reference = load_base(default_bundle.base_dir, dtype=torch.float32)
    probe = make_probe(reference.get_input_embeddings())
    assert torch.equal(probe_logits(model, probe), probe_logits(reference, probe))


def test_auto_peft_names_a_missing_task_type_as_the_cause(default_bundle, tmp_path) -> None:
    """An adapter saved without task_type carries an auto_mapping naming the base's module; peft 0.21's
    AutoPeftModelForCausalLM refuses to import it: the path's error says so and names the fix."""
    from harness.loading import paths

    if "auto-peft" not in paths.PATHS:
        pytest.skip(paths.UNAVAILABLE.get("auto-peft", "auto-peft is not available on this stack"))
    adapter = tmp_path / "adapter"
    shutil.copytree(default_bundle.adapter_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(task_type=None, auto_mapping={"base_model_class": "InternLMXComposer2ForCausalLM",
                                                "parent_library": "transformers_modules.base.modeling_x"})
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    try:
        paths.PATHS["auto-peft"](default_bundle.base_dir, adapter, dtype=torch.float32, device="cpu",
                                 workdir=tmp_path / "work")
    except ValueError as err:
        message = str(err)
    else:
        pytest.skip("this PEFT imports an auto_mapping without an allowlist")
    assert "has no task_type" in message and "'transformers_modules.base.modeling_x'" in message
    assert '"task_type": "CAUSAL_LM"' in message
