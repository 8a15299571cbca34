"""trained-vs-shipped and trained-params-saved: the end-of-training gate (``harness.check_trained``).

Each failure mode is reproduced for real: on the XComposer-era stack PEFT itself leaves PLoRA
trainable (the ``lora_`` name collision); on a newer PEFT a test double sets the same flags.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file

import harness
from harness import compat
from harness.checks.measure.training_audit import kind_of
from harness.loading.base import load_base
from harness.model.families.xcomposer import XComposer
from harness.model.peft_keys import base_key
from harness.numerics.probes import make_probe
from harness.synthetic import official_lora_config, save_adapter

TRAINED_IDS = ["trained-vs-shipped", "trained-params-saved"]


def train(peft_model, *, steps: int = 2, seed: int = 3):
    """A few AdamW steps over whatever is trainable, on batches whose image rows come from the vision
    tower and projector (``encode_img``), as in real fine-tuning."""
    torch.manual_seed(seed)
    peft_model.train()
    inner = peft_model.get_base_model()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    side = inner.config.vision_config["image_size"]
    for step in range(steps):
        gen = torch.Generator().manual_seed(seed * 100 + step)
        image = inner.encode_img(torch.randn(2, 3, side, side, generator=gen))  # [2, n, H]
        n = image.shape[1]
        probe = make_probe(peft_model.get_input_embeddings(), batch_size=2, seq_len=n + 6, image_spans=[(3, 3 + n)],
                           seed=seed * 100 + step)
        embeds = torch.cat([probe.inputs_embeds[:, :3], image, probe.inputs_embeds[:, 3 + n:]], dim=1)
        labels = probe.input_ids.masked_fill(probe.im_mask, -100)
        loss = peft_model(inputs_embeds=embeds, im_mask=probe.im_mask, attention_mask=probe.attention_mask,
                          labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return peft_model.eval()


def fresh_peft_model(base_dir: Path, *, freeze_base: bool = True, **overrides):
    model = load_base(base_dir, dtype=torch.float32)
    if freeze_base:  # the safe recipe: only what get_peft_model adds (or modules_to_save) trains
        model.requires_grad_(False)
    peft_model = get_peft_model(model, official_lora_config(r=4, **overrides))
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    return peft_model


def statuses(report) -> dict[str, str]:
    return {r.id: r.status for r in report.checks if r.id in TRAINED_IDS}


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_correctly_saved_adapter_passes(default_bundle, tmp_path):
    peft_model = train(fresh_peft_model(default_bundle.base_dir))
    saved = save_adapter(peft_model, tmp_path / "adapter")
    before = digest(saved)
    report = harness.check_trained(peft_model, saved, trust_remote_code=True)  # base found through base_model_name_or_path
    assert statuses(report) == {"trained-vs-shipped": "pass", "trained-params-saved": "pass"}, report.render()
    assert report.exit_code == 0
    shipped = report.get("trained-vs-shipped")
    assert shipped.details["comparison"]["image_max_abs"] < 1e-4 and "within the float32 tolerance" in shipped.message
    params = report.get("trained-params-saved")
    assert params.details["trainable"] > 0 and params.details["compared_with_base"] > 0
    assert digest(saved) == before  # nothing written into the user's directory


def test_plora_trained_through_the_lora_name_collision_is_named(default_bundle, tmp_path):
    """peft <= 0.20 freezes by name, so Plora_A/B and plora_*_GN keep training; they are never saved."""
    peft_model = fresh_peft_model(default_bundle.base_dir, freeze_base=False)
    leftover = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n.lower()
                and ".lora_" not in n]
    if compat.peft_leaves_lora_named_params_trainable():
        assert leftover  # the real old-PEFT behaviour, no double needed
    else:
        assert not leftover  # PEFT >= 0.21 freezes structurally; reproduce the old flags as a test double
        for name, param in peft_model.named_parameters():
            if "Plora_" in name or "plora_" in name:
                param.requires_grad_(True)
    train(peft_model)
    saved = save_adapter(peft_model, tmp_path / "adapter")
    report = harness.check_trained(peft_model, saved, default_bundle.base_dir, trust_remote_code=True)
    assert statuses(report) == {"trained-vs-shipped": "fail", "trained-params-saved": "fail"}
    params = report.get("trained-params-saved")
    assert "changed during training but are not in the adapter" in params.message
    assert "PLoRA Plora_A/Plora_B" in params.message and "plora_*_GN separator" in params.message
    assert "peft <= 0.20" in params.fix and "\n" not in params.message
    names = {f["name"] for f in params.details["changed_not_saved"]}
    assert any(n.endswith("wqkv.Plora_A.weight") for n in names) and {"plora_glb_GN", "plora_sub_GN"} <= names
    shipped = report.get("trained-vs-shipped")
    assert "does not reproduce the trained model" in shipped.message and "OUTSIDE" in shipped.message
    assert "image rows" in shipped.message


def test_projector_unfrozen_without_modules_to_save_is_named(default_bundle, tmp_path):
    """The official recipe trains vision_proj (requires_grad) but only modules_to_save ships a full module."""
    peft_model = fresh_peft_model(default_bundle.base_dir)
    peft_model.base_model.model.vision_proj.requires_grad_(True)
    train(peft_model)
    saved = save_adapter(peft_model, tmp_path / "adapter")
    report = harness.check_trained(peft_model, saved, default_bundle.base_dir, trust_remote_code=True)
    params = report.get("trained-params-saved")
    assert params.status == "fail" and "projector (vision_proj)" in params.message
    assert "modules_to_save" in params.fix
    assert {f["kind"] for f in params.details["changed_not_saved"]} == {"projector"}
    shipped = report.get("trained-vs-shipped")  # the text probe never reaches vision_proj: weights tell
    assert shipped.status == "fail" and "the probe does not reach them" in shipped.message
    assert "vision_proj." in shipped.message


def test_projector_in_modules_to_save_passes(default_bundle, tmp_path):
    peft_model = train(fresh_peft_model(default_bundle.base_dir, modules_to_save=["vision_proj"]))
    saved = save_adapter(peft_model, tmp_path / "adapter")
    assert any("vision_proj" in k for k in load_file(saved / "adapter_model.safetensors"))
    report = harness.check_trained(peft_model, saved, default_bundle.base_dir, trust_remote_code=True)
    assert statuses(report) == {"trained-vs-shipped": "pass", "trained-params-saved": "pass"}, report.render()


def test_adapter_file_changed_after_training_fails_only_the_output_check(default_bundle, tmp_path):
    peft_model = train(fresh_peft_model(default_bundle.base_dir))
    saved = save_adapter(peft_model, tmp_path / "adapter")
    tensors = load_file(saved / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith("w2.lora_B.weight"))
    tensors[key] = tensors[key] * 2  # e.g. a stale checkpoint, or a save from the wrong rank
    save_file(tensors, saved / "adapter_model.safetensors", metadata={"format": "pt"})
    report = harness.check_trained(peft_model, saved, default_bundle.base_dir, trust_remote_code=True)
    assert statuses(report) == {"trained-vs-shipped": "fail", "trained-params-saved": "pass"}


def test_trainable_but_unchanged_warns_and_no_base_skips_the_reload(default_bundle, tmp_path):
    peft_model = fresh_peft_model(default_bundle.base_dir)
    peft_model.base_model.model.vision_proj.requires_grad_(True)  # trainable, but no step taken
    saved = save_adapter(peft_model.eval(), tmp_path / "adapter")
    report = harness.check_trained(peft_model, saved, default_bundle.base_dir, trust_remote_code=True)
    params = report.get("trained-params-saved")
    assert params.status == "warn" and "unchanged so far" in params.message
    peft_model.peft_config["default"].base_model_name_or_path = None
    report = harness.check_trained(peft_model, saved, trust_remote_code=True)
    assert report.get("trained-vs-shipped").status == "skip" and "base_model=" in report.get("trained-vs-shipped").message
    params = report.get("trained-params-saved")
    assert params.status == "fail" and "no base files" in params.message


@pytest.mark.parametrize(
    "name, key, kind",
    [("base_model.model.model.layers.0.attention.wqkv.base_layer.weight", "model.layers.0.attention.wqkv.weight",
      "language"),
     ("base_model.model.model.layers.0.attention.wqkv.Plora_A.weight", "model.layers.0.attention.wqkv.Plora_A.weight",
      "plora"),
     ("base_model.model.plora_glb_GN", "plora_glb_GN", "plora-separator"),
     ("base_model.model.vision_proj.0.weight", "vision_proj.0.weight", "projector"),
     ("base_model.model.vit.vision_tower.encoder.layers.0.fc1.weight", "vit.vision_tower.encoder.layers.0.fc1.weight",
      "vision"),
     ("base_model.model.model.layers.0.attention.wqkv.lora_A.default.weight", None, None),
     ("base_model.model.vision_proj.modules_to_save.default.0.weight", None, None),
     ("base_model.model.vision_proj.original_module.0.weight", None, None)],
)
def test_base_key_and_kind(name, key, kind):
    assert base_key(name) == key
    if key is not None:
        assert kind_of(key, XComposer()) == kind


def test_official_recipe_loses_the_hd_separators_on_old_peft(default_bundle, tmp_path):
    """The official recipe (finetune/finetune.py) freezes everything under model.model (and the ViT) before
    get_peft_model. plora_glb_GN / plora_sub_GN are top-level and named "lora_": PEFT <= 0.20 leaves them
    trainable, training moves them (images pass through them), and save_pretrained drops them."""
    model = load_base(default_bundle.base_dir, dtype=torch.float32)
    model.model.requires_grad_(False)
    model.vit.requires_grad_(False)
    peft_model = get_peft_model(model, official_lora_config(r=4))
    peft_model.peft_config["default"].base_model_name_or_path = str(default_bundle.base_dir)
    train(peft_model)
    report = harness.check_trained(peft_model, save_adapter(peft_model, tmp_path / "adapter"), trust_remote_code=True)
    params = report.get("trained-params-saved")
    if compat.peft_leaves_lora_named_params_trainable():
        assert params.status == "fail", params.message
        assert {f["name"] for f in params.details["changed_not_saved"]} == {"plora_glb_GN", "plora_sub_GN"}
        assert params.message.startswith("2 parameter(s) changed during training but are not in the adapter: "
                                         "2 plora_*_GN separator")
        assert report.get("trained-vs-shipped").status == "fail"
    else:
        assert statuses(report) == {"trained-vs-shipped": "pass", "trained-params-saved": "pass"}, report.render()


# -- consent (issue 22): check_trained follows check's gate; code in a base directory runs only when allowed ----------


def _base_with_payload(base_dir: Path, where: Path) -> tuple[Path, Path]:
    """A copy of ``base_dir`` whose model code writes a marker file when imported; (copy, marker)."""
    import json
    import shutil
    import uuid

    copy = where / f"payload_base_{uuid.uuid4().hex[:12]}"  # a fresh name: transformers caches modules by name
    shutil.copytree(base_dir, copy)
    marker = where / "PAYLOAD_RAN"
    payload = f"\nimport pathlib as _payload\n_payload.Path({str(marker)!r}).write_text('ran')\n"
    for entry in json.loads((copy / "config.json").read_text())["auto_map"].values():
        module = (entry[0] if isinstance(entry, list) else entry).split(".")[0]
        with open(copy / f"{module}.py", "a") as handle:
            handle.write(payload)
    return copy, marker


def test_check_trained_refuses_a_base_that_ships_code_without_the_flag(default_bundle, tmp_path):
    from harness.checks.measure.training_audit import audit_trained
    from harness.inputs.code import UntrustedCode
    from harness.loading.model_code import remote_code_consent

    base, marker = _base_with_payload(default_bundle.base_dir, tmp_path)
    peft_model = fresh_peft_model(default_bundle.base_dir)
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    saved = save_adapter(peft_model, tmp_path / "adapter")
    for given in (base, None):  # passed, or found through the config's base_model_name_or_path
        with pytest.raises(UntrustedCode) as refused:
            harness.check_trained(peft_model, saved, given)
        text = str(refused.value)
        assert "\n" not in text and text.startswith(f"{base}: the base model ships Python code"), text
        assert "modeling_" in text and "pass trust_remote_code=True to allow it" in text, text
    # the training audit's own loaders hold the same gate, whoever calls them
    with remote_code_consent(False):
        audit = audit_trained(peft_model, saved, base)
    assert audit.reload_error.startswith("UntrustedCode: ") and str(base) in audit.reload_error, audit.reload_error
    assert not marker.exists(), "the base directory's code ran without consent"
    load_base(base, dtype=torch.float32, trust_remote_code=True)  # control: the payload runs when allowed
    assert marker.exists()


def test_trained_vs_shipped_is_judged_by_the_engines_band_in_bf16(default_bundle, tmp_path):
    """Issue 19: check_trained's output comparison uses tolerances.band (noise nil: both sides run the same bf16
    arithmetic; the effect: the trained model against itself with the adapter disabled), as the engine does."""
    from harness.numerics.compare import compare
    from harness.numerics.reference import probe_logits
    from harness.numerics.tolerances import band

    peft_model = train(fresh_peft_model(default_bundle.base_dir)).to(torch.bfloat16)
    saved = save_adapter(peft_model, tmp_path / "adapter")
    report = harness.check_trained(peft_model, saved, trust_remote_code=True)
    shipped = report.get("trained-vs-shipped")
    assert shipped.status == "pass", report.render()
    from harness.checks.measure.training_audit import _probe_for

    probe = _probe_for(peft_model)
    trained = probe_logits(peft_model, probe)
    with peft_model.disable_adapter():
        effect = compare(trained, probe_logits(peft_model, probe), probe, dtype=torch.float32, label="effect")
    assert effect.image_max_rel > 0 and effect.text_max_rel > 0
    assert shipped.details["comparison"]["bands"] == {
        "image": band(torch.bfloat16, noise=0.0, effect=effect.image_max_rel),
        "text": band(torch.bfloat16, noise=0.0, effect=effect.text_max_rel)}
    assert "the engine's policy" in shipped.message and "bfloat16 tolerance" in shipped.message
    audit = next(w for w in report.work if w.key == "trained.audit")  # the reload is shared work, not one check's time
    assert audit.checks == ["trained-vs-shipped", "trained-params-saved"] and audit.seconds > shipped.duration_s
