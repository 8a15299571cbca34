"""The GPU suite judges outputs by the engine's numeric policy (issue 19, item 1), tested on the CPU.

Before: tests/gpu had a rule of its own (error as a share of the adapter's effect, 50%/25% in bf16) and the
real-model run held bf16 logits to the fixed table. Now ``fixtures.gpu.verdict.judge`` calls
``harness.numerics.tolerances.band`` with the dtype's noise measured as the engine measures it (the base in
the dtype against the engine's streamed fp32 reference) and ``harness.numerics.compare`` with those bands."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from fixtures.gpu.build import attach_lora, build_on_device
from fixtures.gpu.verdict import judge, streamed_fp32_logits
from harness.numerics.compare import compare
from harness.numerics.probes import make_probe
from harness.numerics.reference import probe_logits
from harness.numerics.tolerances import band
from harness.synthetic import TINY

DTYPE = torch.bfloat16


def _merged_logits(scale: float, probe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(base, base fp32, unmerged, merged) logits of a tiny bf16 XComposer with an r=8 adapter whose merge applies
    ``scale`` times its ΔW (1: correct; 2: a doubled lora_alpha/r)."""
    model = build_on_device("ixc2.5", TINY, device="cpu", dtype=DTYPE, seed=0)
    base, base_fp32 = probe_logits(model, probe), streamed_fp32_logits(model, probe)
    peft_model = attach_lora(model, r=8, lora_alpha=8, seed=0, effect_scale=0.2)
    unmerged = probe_logits(peft_model, probe)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.scaling["default"] *= scale
    merged = probe_logits(peft_model.merge_and_unload(), probe)
    return base, base_fp32, unmerged, merged


@pytest.fixture(scope="module")
def probe():
    embedding = build_on_device("ixc2.5", TINY, device="cpu", dtype=DTYPE, seed=0).get_input_embeddings()
    return make_probe(embedding, batch_size=2, seq_len=16, image_spans=[(4, 12)], left_padding=[0, 3], seed=7)


@pytest.mark.parametrize("scale, ok", [(1.0, True), (2.0, False)], ids=["correct", "doubled"])
def test_the_gpu_verdict_uses_the_engines_band_in_bf16(probe, scale, ok):
    base, base_fp32, unmerged, merged = _merged_logits(scale, probe)
    verdict = judge(merged, unmerged, probe, dtype=DTYPE, base=base, base_fp32=base_fp32, reference_base=base,
                    label="merged vs unmerged")
    # the band is the engine's function of the noise and effect measured as the engine measures them
    noise = compare(base, base_fp32, probe, dtype=DTYPE, label="noise")
    assert verdict.noise == {"image": noise.image_max_rel, "text": noise.text_max_rel} and noise.image_max_rel > 0
    for row in ("image", "text"):
        assert verdict.bands[row] == band(DTYPE, noise=verdict.noise[row], effect=verdict.effect[row])
    assert verdict.unresolved() == []  # the adapter's effect is well above bf16 rounding here
    assert verdict.ok is ok and verdict.comparison.ok is ok
    if ok:
        assert verdict.outside() == []
    else:
        assert verdict.outside() == ["image", "text"]
        assert "OUTSIDE the bfloat16 tolerance" in verdict.comparison.summary()
        assert all(verdict.rel(row) > 4 * verdict.bands[row] for row in ("image", "text"))  # far outside, not marginal


def test_an_effect_within_bf16_rounding_is_unresolved_not_passed(probe):
    base, base_fp32, _unmerged, _merged = _merged_logits(1.0, probe)
    tiny_effect = base + 1e-4 * base.abs().max()  # an "adapter" that moves the logits by 1e-4 of their scale
    verdict = judge(tiny_effect, tiny_effect, probe, dtype=DTYPE, base=base, base_fp32=base_fp32,
                    reference_base=base, label="merged vs unmerged")
    assert verdict.comparison.ok and verdict.unresolved() == ["image", "text"] and not verdict.ok
