"""The full-size synthetic suite's code, run in the default suite: 7B dims on the meta device, the whole
check at tiny dims on the CPU, and broken merges that it must catch (so a pass means something)."""

import json

import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from fixtures.gpu.build import attach_lora, build_on_device, estimate_bytes, regenerate_param, restore_buffers
from fixtures.gpu.figures import write_figures
from fixtures.gpu.full_size import FullSizeRun, FullSizeSpec, run_full_size
from harness.synthetic import FULL_7B, TINY, build_model

TARGETS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def tiny_spec(**changes) -> FullSizeSpec:
    base = dict(dims=TINY, device="cpu", dtype=torch.float32, lora_r=8, lora_alpha=8, seq_len=16)
    base.update(changes)
    return FullSizeSpec(**base)


# -- 7B dims on the meta device -------------------------------------------------------------------

def test_7b_model_and_r64_adapter_on_meta_have_the_real_names_and_shapes():
    model = build_on_device("ixc2.5", FULL_7B, device="meta", dtype=torch.bfloat16)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert state["model.tok_embeddings.weight"] == (92544, 4096) and state["output.weight"] == (92544, 4096)
    assert state["model.layers.31.attention.wqkv.weight"] == (6144, 4096)
    assert state["model.layers.0.feed_forward.w2.weight"] == (4096, 14336)
    assert state["model.layers.0.attention.wqkv.Plora_A.weight"] == (256, 4096)
    assert state["plora_glb_GN"] == (1, 1, 4096) and state["plora_sub_GN"] == (1, 1, 1, 4096)
    assert all(v.dtype == torch.bfloat16 and v.is_meta for v in model.parameters())
    assert not any(f"layers.{FULL_7B.num_hidden_layers}." in k for k in state)

    peft_model = attach_lora(model, r=64, lora_alpha=64)  # official recipe, nothing materialised
    saved = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    prefix = "base_model.model.model.layers"
    assert saved[f"{prefix}.0.attention.wqkv.lora_A.weight"] == (64, 4096)
    assert saved[f"{prefix}.0.attention.wqkv.lora_B.weight"] == (6144, 64)
    assert saved[f"{prefix}.31.feed_forward.w2.lora_A.weight"] == (64, 14336)
    assert saved[f"{prefix}.31.feed_forward.w2.lora_B.weight"] == (4096, 64)
    assert len(saved) == 2 * len(TARGETS) * 32
    assert {k.split(".layers.")[1].split(".", 1)[1].rsplit(".lora_", 1)[0] for k in saved} == set(TARGETS)
    wrapped = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    assert not any("Plora" in n or "vit" in n for n in wrapped)  # never PLoRA's own linears, never CLIP


def test_7b_bf16_fits_an_80gb_card_with_room_for_the_fp32_slice():
    model_bytes = estimate_bytes("ixc2.5", FULL_7B, torch.bfloat16)
    assert 15e9 < model_bytes < 18e9  # ~8.1B params incl. CLIP-L and the HD projector
    slice_bytes = estimate_bytes("ixc2.5", FULL_7B.with_(num_hidden_layers=2, vision_layers=1), torch.float32)
    assert slice_bytes < 6e9
    assert model_bytes + slice_bytes < 40e9


def test_fp32_slice_names_are_the_full_models():
    full = build_on_device("ixc2", FULL_7B, device="meta", dtype=torch.bfloat16).state_dict()
    spec = FullSizeSpec(variant="ixc2", device="meta")
    part = build_on_device("ixc2", spec.dims.with_(num_hidden_layers=2, vision_layers=1), device="meta",
                           dtype=torch.float32).state_dict()
    lm = [k for k in part if not k.startswith("vit.")]
    assert lm and all(full[k].shape == part[k].shape for k in lm)


# -- device build and regeneration, at tiny dims on the CPU ----------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["ixc2", "ixc2.5"])
def test_device_build_equals_the_family_build(variant, dtype):
    want = build_model(variant, TINY, dtype=dtype).state_dict()
    got = build_on_device(variant, TINY, device="cpu", dtype=dtype).state_dict()
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key  # buffers included


def test_regenerate_param_gives_every_weight_back():
    model = build_on_device("ixc2.5", TINY, device="cpu", dtype=torch.bfloat16, seed=3)
    for name, param in model.named_parameters():
        again = regenerate_param(name, param.shape, seed=3, device="cpu", dtype=torch.bfloat16)
        assert torch.equal(again, param), name
    assert not torch.equal(regenerate_param("output.weight", (4, 4), seed=4, device="cpu", dtype=torch.float32),
                           regenerate_param("output.weight", (4, 4), seed=3, device="cpu", dtype=torch.float32))


def test_restore_buffers_refuses_an_owner_it_cannot_rebuild():
    module = torch.nn.Module()
    module.register_buffer("table", torch.arange(3))
    with pytest.raises(RuntimeError, match="no config"):
        restore_buffers(module)


def test_lora_fill_is_deterministic_and_sized_by_effect_scale():
    a = attach_lora(build_model("ixc2"), r=4, seed=1, effect_scale=0.2)
    b = attach_lora(build_model("ixc2"), r=4, seed=1, effect_scale=0.2)
    sa, sb = get_peft_model_state_dict(a), get_peft_model_state_dict(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    layer = a.base_model.model.model.layers[0].feed_forward.w1
    delta = layer.get_delta_weight("default").detach()
    ratio = float(delta.std() / layer.base_layer.weight.detach().std())
    assert 0.1 < ratio < 0.3, ratio  # ΔW about effect_scale times the base weight's spread


# -- the whole check at tiny dims ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_size_run_passes_at_tiny_dims(dtype, tmp_path):
    result = run_full_size(tiny_spec(dtype=dtype))
    assert result.ok, result.problems
    assert result.weights["modules_checked"] == 5 * TINY.num_hidden_layers
    assert not result.weights["plora_changed"] and not result.weights["unmerged_wrappers"]
    assert set(result.outputs) == {"probe", "text_probe"} and set(result.outputs["probe"]) == {"image", "text"}
    assert set(result.slice) == {"image", "text"}
    for stats in (result.outputs["probe"]["image"], result.outputs["text_probe"]["text"]):
        assert stats["effect_rel_output"] > 0.05  # the adapter really changes the outputs
    assert {"build", "adapter", "forward_unmerged", "merge", "check", "fp32_slice", "total"} <= set(result.timings)
    assert result.peak_memory["overall"] is None  # no allocator counter on the CPU
    figures = result.figures()
    path = write_figures(tmp_path / "figures.json", "full_size", figures)
    back = json.loads(path.read_text())["full_size"]
    assert back["ok"] is True and back["spec"]["dtype"] == str(dtype).replace("torch.", "")
    assert back["spec"]["lora_r"] == 8 and back["environment"]["device"] == "cpu"


class DoubleOneModule(FullSizeRun):
    """Merges correctly, then adds one module's ΔW a second time (a merge applied twice to one layer)."""

    def merge(self, peft_model):
        layer = peft_model.base_model.model.model.layers[1].feed_forward.w2
        extra = layer.get_delta_weight("default").detach().clone()
        merged = super().merge(peft_model)
        with torch.no_grad():
            merged.model.layers[1].feed_forward.w2.weight += extra.to(merged.model.layers[1].feed_forward.w2.weight)
        return merged


class DoubleScaling(FullSizeRun):
    """A merge that applies alpha/r twice (what a rsLoRA/alpha mix-up looks like)."""

    def merge(self, peft_model):
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                module.scaling["default"] *= 2
        return super().merge(peft_model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_module_merged_twice_is_named(dtype):
    result = DoubleOneModule(tiny_spec(dtype=dtype)).run()
    assert not result.ok
    assert result.weights["worst_module"] == "model.layers.1.feed_forward.w2"
    assert any("model.layers.1.feed_forward.w2" in p for p in result.problems), result.problems


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mis_scaled_merge_fails_outputs_weights_and_the_fp32_slice(dtype):
    result = DoubleScaling(tiny_spec(dtype=dtype)).run()
    text = "\n".join(result.problems)
    assert "logits, image rows of the probe" in text and "logits, text rows of the text probe" in text
    assert "weights: merged" in text and "hidden state after 2 layer(s)" in text


def test_an_adapter_too_small_to_measure_is_not_a_pass():
    result = run_full_size(tiny_spec(dtype=torch.bfloat16, effect_scale=1e-5))
    assert any("cannot tell a merge from rounding" in p for p in result.problems), result.problems


def test_an_overrun_time_budget_is_reported():
    result = run_full_size(tiny_spec(time_budget_s=0.0))
    assert result.problems == [p for p in result.problems if "budget" in p] and result.problems
