"""Dynamic checks: each fails on a broken adapter or a broken loading path, with a readable message."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import harness
from fixtures.judging import only_transformers_dora_failure
from fixtures.mutations import GOOD_VARIANTS, MUTATIONS, copy_adapter
from harness import compat
from harness.checks.registry import checks
from harness.compat import DTYPE_KW
from harness.loading import paths
from harness.loading.base import copy_model_extras, load_base
from harness.loading.records import LoadedModel, LoadRecord

DYNAMIC = [c.id for c in checks("dynamic")]


def results(adapter_dir, base_dir, **kwargs):
    return {r.id: r for r in harness.check(adapter_dir, base_model=base_dir, trust_remote_code=True, isolated=False,
                                           **kwargs).checks}


def test_good_adapter_passes_every_dynamic_check(default_bundle):
    got = results(default_bundle.adapter_dir, default_bundle.base_dir)
    assert {i: got[i].status for i in DYNAMIC} == {i: "pass" for i in DYNAMIC}
    assert "correctly refused" in got["path-agreement"].message
    assert "PeftModel.from_pretrained or merge it" in got["key-coverage"].details["raw_load_state_dict"]


@pytest.mark.slow
def test_bf16_run_passes_with_the_bf16_tolerance(default_bundle):
    got = results(default_bundle.adapter_dir, default_bundle.base_dir, dtype="bfloat16")
    assert got["path-agreement"].status == "pass", got["path-agreement"].message
    assert got["path-agreement"].details["tolerance"] == 5e-2


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["rank-alpha-pattern", "rslora", "modules-to-save"])
def test_good_variants_pass_dynamic_checks(variant, make_bundle, tmp_path):
    """No false alarms: rank/alpha patterns, rsLoRA, DoRA and modules_to_save agree with the reference."""
    adapter = GOOD_VARIANTS[variant](tmp_path / variant)
    base = make_bundle(variant="ixc2").base_dir
    got = results(adapter, base)
    assert {i: got[i].status for i in DYNAMIC} == {i: "pass" for i in DYNAMIC}, {i: got[i].message for i in DYNAMIC}


@pytest.mark.slow
@pytest.mark.skipif(not compat.peft_supports("use_dora"), reason=f"PEFT {compat.PEFT_VERSION} has no DoRA")
def test_dora_on_plora_cannot_merge_faithfully(make_bundle, tmp_path):
    """A real incompatibility: unmerged DoRA rescales PLoRA's image-row output, merged DoRA does not."""
    adapter = GOOD_VARIANTS["dora"](tmp_path / "dora")
    got = results(adapter, make_bundle(variant="ixc2").base_dir)
    assert got["merge-equivalence"].status == "fail"
    assert got["merge-equivalence"].message.startswith("peft: image rows")
    assert "DoRA's magnitude rescales the whole PLoRA output" in got["merge-equivalence"].message
    merged = got["merge-equivalence"].details["peft-merged"]
    assert merged["image_max_rel"] < 1e-4  # the merged model matches the hand-merged reference


def test_untrained_adapter_has_no_effect(default_bundle, tmp_path):
    broken = MUTATIONS["zero-lora-b"].apply(default_bundle.adapter_dir, tmp_path / "a")
    got = results(broken, default_bundle.base_dir)["effect"]
    assert got.status == "fail" and "no measurable effect on image and text rows" in got.message


@pytest.mark.slow
def test_lora_inside_plora_is_flagged_three_ways(make_bundle):
    """Also guards the synthetic trainer: it must feed im_mask (the detected family's mask keyword), or LoRA on
    Plora_A/B never trains and the effect is exactly 0 on image rows too (it was, for an hour, on a fresh cache)."""
    bundle = make_bundle(target_modules=r".*\.Plora_[AB]")
    got = results(bundle.adapter_dir, bundle.base_dir)
    assert got["lora-on-plora"].status == "fail"
    effect = got["effect"]
    assert effect.status == "fail" and "no measurable effect on text rows" in effect.message, effect.message
    assert "never changes text tokens" in effect.message
    assert got["plora-preserved"].status == "fail" and "PLoRA tensor(s) differ" in got["plora-preserved"].message


def doubled_scaling_merge(base_dir, adapter_dir, **kw):
    """A broken path: merges with twice the LoRA scaling (the bug the suite must catch)."""
    loaded = paths.PATHS["peft"](base_dir, adapter_dir, **kw)
    for module in loaded.model.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict):
            module.scaling = {k: 2 * v for k, v in module.scaling.items()}
    loaded.model = loaded.model.merge_and_unload().eval()
    loaded.record.path = "peft-merged"
    return loaded


@pytest.mark.slow
def test_double_scaling_in_a_merge_path_fails_readably(default_bundle, monkeypatch):
    monkeypatch.setitem(paths.PATHS, "peft-merged", paths.replaced("peft-merged", doubled_scaling_merge))
    got = results(default_bundle.adapter_dir, default_bundle.base_dir)
    message = got["merge-equivalence"].message
    assert got["merge-equivalence"].status == "fail"
    assert message.startswith("peft-merged: image rows max abs") and "text rows max abs" in message
    assert "worst at" in message and "OUTSIDE the float32 tolerance" in message
    assert got["path-agreement"].status == "fail" and "peft-merged" in got["path-agreement"].message
    assert got["key-coverage"].status == "pass"  # the unmerged path is still fine


def test_renamed_keys_are_missing_and_unexpected(default_bundle, tmp_path):
    broken = copy_adapter(default_bundle.adapter_dir, tmp_path / "a")
    path = broken / "adapter_model.safetensors"
    tensors = load_file(path)
    renamed = {k.replace("layers.1.attention.wo.", "layers.1.attention.w_o."): v for k, v in tensors.items()}
    save_file(renamed, path)
    got = results(broken, default_bundle.base_dir)["key-coverage"]
    assert got.status == "fail"
    assert "2 missing, 2 unexpected" in got.message and "layers.1.attention.w" in got.message


def lossy_merge_script(base_dir, adapter_dir, *, dtype, device, workdir):
    """A broken merge script: drops Plora_A from the saved checkpoint (what LoRA-on-Plora did in old PEFT)."""
    merged = paths.load_peft_merged(base_dir, adapter_dir, dtype=dtype, device=device, workdir=workdir)
    out = Path(workdir) / "lossy"
    merged.model.save_pretrained(out, safe_serialization=True)
    copy_model_extras(base_dir, out)
    tensors = load_file(out / "model.safetensors")
    tensors.pop("model.layers.0.attention.wqkv.Plora_A.weight")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    model, info = load_base(out, dtype=dtype, device=device, output_loading_info=True)
    record = LoadRecord(path="merge-script", missing_keys=sorted(info["missing_keys"]))
    return LoadedModel(model, record)


@pytest.mark.slow
def test_reinitialised_tensor_after_reload_fails(default_bundle, monkeypatch):
    monkeypatch.setitem(paths.PATHS, "merge-script", paths.replaced("merge-script", lossy_merge_script))
    got = results(default_bundle.adapter_dir, default_bundle.base_dir)["reload-roundtrip"]
    assert got.status == "fail"
    assert "re-initialised on load, e.g. model.layers.0.attention.wqkv.Plora_A.weight" in got.message


@pytest.mark.slow
def test_folded_plora_fails_plora_preserved(default_bundle, monkeypatch):
    def folding_merge(base_dir, adapter_dir, **kw):
        loaded = paths.load_peft_merged(base_dir, adapter_dir, **kw)
        with torch.no_grad():
            layer = loaded.model.model.layers[0].attention.wqkv
            layer.weight += layer.Plora_B.weight @ layer.Plora_A.weight * layer.lora_scaling
        return loaded

    monkeypatch.setitem(paths.PATHS, "peft-merged", paths.replaced("peft-merged", folding_merge))
    got = results(default_bundle.adapter_dir, default_bundle.base_dir)
    assert got["merge-equivalence"].status == "fail" and "peft-merged" in got["merge-equivalence"].message


def test_base_that_cannot_load_gives_one_line(default_bundle, tmp_path):
    base = tmp_path / "base_that_cannot_load"  # a name of its own: transformers caches remote code by folder name
    shutil.copytree(default_bundle.base_dir, base)
    code = base / "modeling_internlm_xcomposer2.py"
    code.write_text(code.read_text().replace("        self.post_init()",
                                             "        raise OSError('cannot download openai/clip-vit-large-patch14')"))
    got = results(default_bundle.adapter_dir, base)
    for check_id in DYNAMIC:
        assert got[check_id].status == "fail"
        assert got[check_id].message.startswith("the base model cannot be checked:")
        assert "clip-vit-large" in got[check_id].message and "\n" not in got[check_id].message


def test_static_blocker_skips_dynamic_checks(default_bundle, tmp_path):
    broken = MUTATIONS["empty-tensors"].apply(default_bundle.adapter_dir, tmp_path / "a")
    got = results(broken, default_bundle.base_dir)
    assert got["empty-tensors"].status == "fail"
    assert got["path-agreement"].status == "skip" and "empty-tensors" in got["path-agreement"].message


@pytest.fixture(scope="module")
def llama_bundle(tmp_path_factory):
    """A plain HF causal LM (Llama from config) + a LoRA (DoRA where PEFT has it) on q_proj/v_proj: the harness is
    not XComposer-only."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    model = LlamaForCausalLM.from_pretrained(root / "base", **{DTYPE_KW: torch.float32})
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False, task_type="CAUSAL_LM",
                                                  **({"use_dora": True} if compat.peft_supports("use_dora") else {})))
    peft_model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


@pytest.mark.slow
def test_plain_llama_passes_every_check(llama_bundle):
    base, adapter = llama_bundle
    report = harness.check(adapter, base_model=base, trust_remote_code=True, isolated=False)
    assert report.get("plora-preserved").status == "skip"
    if only_transformers_dora_failure(report):
        return  # transformers 5.x's load_adapter drops DoRA magnitudes: named on those paths alone (test_zoo)
    bad = {r.id: r.message for r in report.checks if r.status == "fail"}
    assert bad == {}
    assert report.get("path-agreement").status == "pass"


@pytest.mark.slow
def test_load_adapter_that_never_switches_is_caught(default_bundle, monkeypatch):
    """The decoy default adapter is non-zero, so forgetting set_adapter() cannot pass as a no-op."""

    def forgetful(base_dir, adapter_dir, *, dtype, device, workdir):
        record = LoadRecord(path="load-adapter")
        model = paths._fresh_peft(base_dir, adapter_dir, dtype=dtype, device=device)
        model.load_adapter(str(adapter_dir), adapter_name="other")  # no set_adapter("other")
        return LoadedModel(model.eval(), record)

    monkeypatch.setitem(paths.PATHS, "load-adapter", paths.replaced("load-adapter", forgetful))
    got = results(default_bundle.adapter_dir, default_bundle.base_dir)["path-agreement"]
    assert got.status == "fail" and "load-adapter: image rows" in got.message
