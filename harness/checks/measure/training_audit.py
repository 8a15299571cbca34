"""Trained vs shipped: is what ``save_pretrained`` wrote the model that was trained?

Run at the end of a training script, with the in-memory PEFT model and the directory it was saved
to. Two questions, both answered without trusting PEFT's own bookkeeping:

* Outputs: a fresh base + the saved adapter, loaded the way users load it, must reproduce the
  trained model's logits on image and text rows, within the engine's band (``tolerances.band``): both
  sides run the same arithmetic in the same dtype, so the dtype's noise between them is nil and the
  band is the table's floor or its share of the adapter's effect (the trained model with the adapter
  disabled gives the effect).
* Parameters: every parameter the optimiser could move (``requires_grad``) and every base
  parameter whose value differs from the base files must be in the adapter. PEFT <= 0.20 leaves
  PLoRA's ``Plora_A``/``Plora_B`` and ``plora_*_GN`` trainable (their names contain ``lora_``) but
  never saves them; the official XComposer recipe unfreezes ``vision_proj`` without
  ``modules_to_save``. Both train weights that no user will ever load.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.inputs.adapter_dir import read_adapter_tensors
from harness.inputs.model_dir import ModelDir
from harness.loading.paths import PATHS
from harness.model import families
from harness.model.peft_keys import PREFIX, base_key, peft_key
from harness.numerics.compare import Comparison, compare
from harness.numerics.probes import ProbeBatch, make_probe, mask_kwarg
from harness.numerics.reference import probe_logits
from harness.numerics.tolerances import band


@dataclass
class ParamFinding:
    name: str  # the base checkpoint key (PEFT's prefix and ``.base_layer`` removed)
    trainable: bool
    changed: bool | None  # differs from the base files (None: not in them, or not comparable)
    max_abs_change: float | None = None
    kind: str = "other"  # a branch kind of the family ("plora", ...) | projector | vision | language | other


@dataclass
class TrainedAudit:
    saved_dir: Path
    base_dir: Path | None
    adapter_name: str
    saved_keys: list[str]
    not_saved: list[ParamFinding] = field(default_factory=list)  # trainable or changed, and not in the adapter
    trainable_count: int = 0
    compared_count: int = 0  # base parameters compared with the base files
    comparison: Comparison | None = None
    # parameters whose reloaded value differs from the trained one: (checkpoint key, max abs difference)
    weight_mismatches: list[tuple[str, float]] = field(default_factory=list)
    reload_path: str = "peft"
    reload_error: str | None = None
    family: families.ModelFamily = families.GENERIC  # the trained model's (detected): its branch kinds and advice

    @property
    def changed_not_saved(self) -> list[ParamFinding]:
        return [f for f in self.not_saved if f.changed]

    @property
    def trainable_not_saved(self) -> list[ParamFinding]:
        return [f for f in self.not_saved if f.trainable]


def kind_of(name: str, family: families.ModelFamily) -> str:
    """What a parameter is, in the words the fix needs: its family's branch kind ("plora", ...), or its tower."""
    return family.branch_param_kind(name) or family.tower_of(name) or "language"


def resolve_base_dir(peft_model, adapter_name: str, base_dir: str | Path | None) -> Path | None:
    """``base_dir`` if given, else the local directory the adapter config names (``base_model_name_or_path``)."""
    if base_dir is not None:
        return Path(base_dir)
    config = getattr(peft_model, "peft_config", {}).get(adapter_name)
    named = getattr(config, "base_model_name_or_path", None)
    return Path(named) if named and Path(named).is_dir() else None


def audit_parameters(peft_model, saved_dir: Path, base: ModelDir | None, adapter_name: str) -> TrainedAudit:
    """Which trainable or changed parameters did not make it into the saved adapter."""
    saved = read_adapter_tensors(saved_dir)
    audit = TrainedAudit(saved_dir=saved_dir, base_dir=base.path if base else None, adapter_name=adapter_name,
                         saved_keys=sorted(saved), family=families.family_of(peft_model))
    base_keys = set(base.keys) if base is not None else set()
    for name, param in peft_model.named_parameters():
        audit.trainable_count += bool(param.requires_grad)
        saved_as = peft_key(name, adapter_name)
        if saved_as is not None:
            continue  # an adapter parameter (or modules_to_save copy): its saved value is what the reload tests
        key = base_key(name)
        if key is None:
            continue  # another adapter's weights, or PEFT's frozen original of a modules_to_save module
        changed, max_abs = None, None
        if key in base_keys:
            reference = base.get(key)
            value = param.detach()
            if value.shape == reference.shape:
                audit.compared_count += 1
                # at the model's dtype: a bf16/fp16 model loaded from fp32 files holds the rounded base values,
                # which is no change
                value32, reference32 = value.float().cpu(), reference.to(value.dtype).float()
                changed = not torch.equal(value32, reference32)
                max_abs = float((value32 - reference32).abs().max()) if changed and value.numel() else None
        if (param.requires_grad or changed) and f"{PREFIX}{key}" not in saved and key not in saved:
            audit.not_saved.append(ParamFinding(key, bool(param.requires_grad), changed, max_abs, kind_of(key, audit.family)))
    return audit


def _probe_for(model) -> ProbeBatch:
    return make_probe(model.get_input_embeddings(), batch_size=2, seq_len=16, image_spans=[(4, 11)],
                      left_padding=[0, 3], seed=4321)


def audit_trained(peft_model, saved_dir: str | Path, base_dir: str | Path | None = None, *,
                  adapter_name: str = "default", dtype: torch.dtype = torch.float32,
                  device: str = "cpu") -> TrainedAudit:
    """Compare the in-memory trained ``peft_model`` with ``saved_dir`` (and the base files, when known).

    The trained model is put in ``eval()`` for the comparison and restored to its previous mode.
    """
    saved_dir = Path(saved_dir)
    base_path = resolve_base_dir(peft_model, adapter_name, base_dir)
    base = ModelDir(base_path) if base_path is not None else None
    audit = audit_parameters(peft_model, saved_dir, base, adapter_name)
    if base_path is None:
        audit.reload_error = ("no base model directory: pass base_model=, or save with a local "
                              "base_model_name_or_path in the adapter config")
        return audit

    was_training = peft_model.training
    peft_model.eval()
    try:
        probe = _probe_for(peft_model)
        mask = mask_kwarg(peft_model)
        trained = probe_logits(peft_model, probe, mask=mask)
        effect = _effect(peft_model, probe, trained, mask)
    finally:
        peft_model.train(was_training)
    with tempfile.TemporaryDirectory(prefix="plora-harness-trained-") as work:
        try:
            loaded = PATHS[audit.reload_path](base_path, saved_dir, dtype=dtype, device=device, workdir=Path(work))
        except Exception as err:  # noqa: BLE001 - reported as the check's failure, one line
            text = str(err).strip().splitlines()
            audit.reload_error = f"{type(err).__name__}: {text[0][:300] if text else ''}"
            return audit
        shipped = probe_logits(loaded.model, probe, mask=mask)
        audit.weight_mismatches = _weight_mismatches(peft_model, loaded.model)
        del loaded
    bands = {row: band(dtype, noise=0.0, effect=effect[row]) for row in ("image", "text")}
    audit.comparison = compare(shipped, trained, probe, dtype=dtype, label=f"{audit.reload_path} reload",
                               tolerance=bands, basis="the engine's policy: same arithmetic on both sides (no dtype "
                               f"noise); adapter effect image {effect['image']:.1e}, text {effect['text']:.1e}")
    return audit


@torch.no_grad()
def _effect(peft_model, probe: ProbeBatch, trained: torch.Tensor, mask: str | None) -> dict[str, float]:
    """The adapter's relative effect per row class: the trained model against itself with the adapter disabled."""
    disable = getattr(peft_model, "disable_adapter", None)
    if disable is None:
        return {"image": 0.0, "text": 0.0}
    with disable():
        untouched = probe_logits(peft_model, probe, mask=mask)
    found = compare(trained, untouched, probe, dtype=torch.float32, label="effect")
    return {"image": found.image_max_rel, "text": found.text_max_rel}


@torch.no_grad()
def _weight_mismatches(trained, reloaded) -> list[tuple[str, float]]:
    """Same-named parameters of the two PEFT models that differ: what the probe may not exercise
    (a projector only images reach, a layer the probe's tokens barely move). One tensor at a time."""
    reloaded_params = dict(reloaded.named_parameters())
    mismatches = []
    for name, param in trained.named_parameters():
        other = reloaded_params.get(name)
        if other is None:
            continue  # structure differences show up in the output comparison and the key checks
        a, b = param.detach().float().cpu(), other.detach().float().cpu()
        if a.shape != b.shape:
            mismatches.append((base_key(name) or name, float("inf")))
        elif not torch.equal(a, b):
            mismatches.append((base_key(name) or name, float((a - b).abs().max())))
    return mismatches
