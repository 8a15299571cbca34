"""The QLoRA merge gap: the model users evaluated (quantized base + LoRA) against the merges they ship.

A QLoRA adapter learned ΔW against the *quantized* weights: the model that was trained and evaluated
computes with dequant(W_q) + ΔW. The usual release merges ΔW into the 16-bit W instead; the two differ by
W - dequant(W_q) in every layer, which can be as large as the adapter's own effect. This module loads, one
at a time (each reduced to its logits on the probes, then freed):

- the quantized base (bitsandbytes on the CPU: a directory saved quantized, or the 16-bit base quantized
  on the fly as ``--trained-on-quantized`` says) without and with the adapter: the adapter's effect;
- the 16-bit merge users ship (``PeftModel`` on the 16-bit base, ``merge_and_unload``), when the 16-bit
  base is at hand;
- the better merge: ΔW folded into the dequantized weights (transformers' ``dequantize()``, then
  ``PeftModel`` and ``merge_and_unload``): what the quantized model computed;
- the given ``--merged`` checkpoint, and which of the two it is.

Each merge's gap is the largest logit difference from the quantized + LoRA model at real positions, per
row class, and its fraction of the adapter's effect. bitsandbytes is imported only here, lazily.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.model.quantization import (
    Quantization,
    bnb_config,
    bnb_unavailable_reason,
    packs_weights,
    read_quantization,
    trained_on,
)

MERGE_GAP_LIMIT = 0.5  # a shipped merge may differ from what was evaluated by at most this fraction of the effect
SAME_MERGE = 0.05  # --merged is "the 16-bit merge" / "the dequantized merge" when this close (fraction of effect)
SHIPPED16, DEQUANT, GIVEN = "16-bit merge", "dequantized merge", "--merged"


@dataclass(frozen=True)
class Gap:
    """One merge against the quantized + LoRA model: largest logit difference per row class."""

    name: str
    per_class: dict[str, float]
    effect: dict[str, float]

    @property
    def value(self) -> float:
        return max(self.per_class.values())

    @property
    def fraction(self) -> float:
        effect = max(self.effect.values())
        return self.value / effect if effect > 0 else float("inf")

    def describe(self) -> str:
        return f"{self.name} {self.value:.3g} ({self.fraction:.2f}x the effect)"


@dataclass
class QLoraGap:
    """What ``qlora-merge-gap`` reads. ``skipped`` set: nothing was measured, and why."""

    quantization: Quantization | None = None
    skipped: str | None = None
    effect: dict[str, float] = field(default_factory=dict)  # |quantized + LoRA - quantized| per row class
    gaps: dict[str, Gap] = field(default_factory=dict)  # SHIPPED16, DEQUANT, GIVEN (those measured)
    given_is: str | None = None  # which merge --merged is: SHIPPED16, DEQUANT or "neither"
    notes: list[str] = field(default_factory=list)


def the_quantization(base_dir: Path, trained_on_choice: str | None) -> Quantization | None:
    """The quantization the adapter was trained on: the base directory's own, else ``--trained-on-quantized``."""
    declared = read_quantization(base_dir)
    if declared is not None:  # the base as saved wins over --trained-on-quantized (the report says so)
        return declared
    return trained_on(trained_on_choice) if trained_on_choice else None


def measure_qlora_gap(base_dir: Path, adapter_dir: Path, merged_dir: Path | None, *,
                      trained_on_choice: str | None, progress=None) -> QLoraGap:
    """Measure the merge gaps (see the module docstring); never raises for an input it cannot measure."""
    say = progress or (lambda _text: None)
    quant = the_quantization(base_dir, trained_on_choice)
    result = QLoraGap(quantization=quant)
    if trained_on_choice and quant is not None and quant.scheme != trained_on_choice:
        result.notes.append(f"--trained-on-quantized {trained_on_choice} ignored: {quant.describe()} is what the base "
                            "directory holds")
    if quant is None:
        result.skipped = (f"nothing is quantized: {base_dir}/config.json declares no quantization_config and "
                          "--trained-on-quantized was not given (pass it for an adapter trained with QLoRA)")
        return result
    if not quant.is_bitsandbytes:
        result.skipped = (f"the base is {quant.describe()}: measuring it needs the {quant.method} library and a "
                          "dequantizer, which the harness does not drive (bitsandbytes NF4/FP4/int8 only)")
        return result
    reason = bnb_unavailable_reason()
    if reason is not None:
        result.skipped = f"{reason}: the quantized base cannot be loaded here"
        return result
    prequantized = read_quantization(base_dir) is not None
    load_q = {} if prequantized else {"quantization_config": bnb_config(quant)}
    with _quiet():
        say(f"qlora-merge-gap: loading {base_dir} quantized ({quant.scheme}) with the adapter")
        from peft import PeftModel

        # wrapped before any forward: on a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights at the first
        # eval forward, and PEFT's wrap afterwards (which moves the weights) leaves the layer computing something
        # else (measured: 0.3 on one q_proj output, 0.2 on the logits; bitsandbytes 0.50.2, peft 0.21.2)
        model = PeftModel.from_pretrained(_load(base_dir, **load_q), str(adapter_dir))
        probes = _probes(model)
        trained = _logits(model, probes)
        with model.disable_adapter():
            base_logits = _logits(model, probes)
        del model
        gc.collect()
        result.effect = _diff(trained, base_logits, probes)
        if max(result.effect.values()) == 0:
            result.skipped = "the adapter has no effect on the quantized base: there is no merge gap to judge"
            return result
        if not prequantized:
            say("qlora-merge-gap: the 16-bit merge (PeftModel on the 16-bit base, merge_and_unload)")
            merged = PeftModel.from_pretrained(_load(base_dir), str(adapter_dir)).merge_and_unload()
            result.gaps[SHIPPED16] = Gap(SHIPPED16, _diff(_logits(merged, probes), trained, probes), result.effect)
            del merged
            gc.collect()
        else:
            result.notes.append(f"{base_dir} is saved quantized: the 16-bit merge needs the 16-bit base it was made "
                                "from (check that base with --trained-on-quantized to measure it)")
        if quant.four_bit:
            say("qlora-merge-gap: the dequantized merge (ΔW into dequant(W_q))")
            dequant = _load(base_dir, **load_q).dequantize().to(torch.float32)
            merged = PeftModel.from_pretrained(dequant, str(adapter_dir)).merge_and_unload()
            result.gaps[DEQUANT] = Gap(DEQUANT, _diff(_logits(merged, probes), trained, probes), result.effect)
            del merged, dequant
            gc.collect()
        else:
            result.notes.append("int8: bitsandbytes' int8 layers compute with outlier columns in 16 bits; the "
                                "dequantized merge is measured for 4-bit bases only")
        if merged_dir is not None:
            _measure_given(result, merged_dir, probes, trained, say)
    return result


def _measure_given(result: QLoraGap, merged_dir: Path, probes, trained: list[torch.Tensor], say) -> None:
    declared = read_quantization(merged_dir)
    if declared is not None and not declared.is_bitsandbytes and packs_weights(declared):
        result.notes.append(f"{merged_dir} declares {declared.scheme}: not loaded (see merged-quantized)")
        return
    say(f"qlora-merge-gap: the given merged checkpoint {merged_dir}")
    try:
        merged = _load(merged_dir)
    except Exception as err:  # noqa: BLE001 - a merge that does not load is reported, not raised
        result.notes.append(f"{merged_dir}: could not be loaded: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        return
    result.gaps[GIVEN] = Gap(GIVEN, _diff(_logits(merged, probes), trained, probes), result.effect)
    del merged
    gc.collect()
    given = result.gaps[GIVEN]
    effect = max(result.effect.values())
    closest = min((name for name in (SHIPPED16, DEQUANT) if name in result.gaps),
                  key=lambda name: abs(result.gaps[name].value - given.value), default=None)
    same = closest is not None and abs(result.gaps[closest].value - given.value) <= SAME_MERGE * effect
    if same:
        result.given_is = closest
    elif SHIPPED16 not in result.gaps:
        result.given_is = "not the dequantized merge (the 16-bit base was not given to compare)"
    else:
        result.given_is = "neither"


# -- loading and measuring, one model at a time ------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        yield


def _load(directory: Path, **kwargs) -> torch.nn.Module:
    from harness.loading.base import load_base

    return load_base(Path(directory), dtype=torch.float32, device="cpu", **kwargs)


def _probes(model: torch.nn.Module):
    from harness.numerics.probes import make_probe, mask_kwarg

    embedding = model.get_input_embeddings()
    mixed = make_probe(embedding, batch_size=2, seq_len=16, image_spans=[(4, 11)], left_padding=[0, 3], seed=1234,
                       feed="model-embeds")
    text = make_probe(embedding, batch_size=2, seq_len=16, image_spans=[], left_padding=[0, 3], seed=1234,
                      feed="input_ids")
    return (mixed, text, mask_kwarg(model))


def _logits(model: torch.nn.Module, probes) -> list[torch.Tensor]:
    from harness.numerics.reference import probe_logits

    mixed, text, mask = probes
    return [probe_logits(model, mixed, mask=mask), probe_logits(model, text, mask=mask)]


def _diff(got: list[torch.Tensor], want: list[torch.Tensor], probes) -> dict[str, float]:
    """Largest |got - want| at real positions of each row class: text and image rows of the mixed probe,
    and the text-only probe (token ids)."""
    mixed, text, _ = probes
    rows = {"text rows": (0, mixed.text_rows), "image rows": (0, mixed.image_rows), "text-only probe": (1, text.text_rows)}
    out = {}
    for name, (index, mask) in rows.items():
        if mask.any():
            out[name] = float((got[index] - want[index]).abs()[mask.cpu()].max())
    return out

