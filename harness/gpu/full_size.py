"""The synthetic family at full 7B size: merge equivalence at scale, peak memory and timing.

One model lives on the device at a time (7B in bf16 is about 16 GB): the base is built there
(``build_on_device``), wrapped with a deterministic r=64 official-recipe LoRA, run unmerged, merged
in place with ``merge_and_unload`` and run again. What is checked, and why each is needed:

- **outputs**: merged vs unmerged logits per row class (image rows, text rows, and a probe with no
  image rows), as an error relative to the adapter's own effect on those logits. In bf16 the
  absolute error is dominated by rounding that grows with size; relative to what the adapter
  changes it says whether the merge kept the adapter (a mis-scaled merge is off by ~100%).
- **weights**: every merged weight against base + s·B·A computed in fp32, all 32 layers. Base
  weights are regenerated from their seeds, not kept, so no second copy of the model is needed;
  PLoRA's own weights must come out bit-identical and no LoRA wrapper may survive the merge.
- **fp32 slice**: the first ``ref_layers`` decoder layers rebuilt in fp32 from the same (bf16-rounded)
  base weights with ΔW folded in fp32: the bf16 merged and unmerged hidden states after that slice
  against this reference, relative to the adapter's effect there. A full fp32 7B reference would
  need 32 GB more; two layers carry the same per-layer arithmetic.

Every step takes the device and the dims, so the default test suite runs this whole file at tiny
dims on the CPU (including a deliberately broken merge that must be caught).
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from ..paths import find_unmerged_lora_wrappers
from ..probes import ProbeBatch, make_probe
from ..reference import apply_adapter_reference, iter_expected_deltas, policy_for, tolerance_for
from ..synthetic.family import FULL_7B, Dims
from .build import attach_lora, build_on_device, regenerate_param
from .figures import environment, gib, overall_peak, phase

# Largest error allowed, as a fraction of the adapter's own effect on the same rows: ``MAX_REL_EFFECT``
# for the max over rows, ``MAX_RMS_REL_EFFECT`` for the root mean square. fp32: summation order only.
# bf16: the merged weight W+ΔW is rounded once to 8 mantissa bits where the unmerged path adds ΔW·x at
# higher precision, and depth amplifies the difference: measured on CPU with this file at 32 layers,
# hidden 512, r=64, it is 9% (rms) / 12% (max) of the effect on image rows, 4% after two layers. A merge
# that drops, doubles or mis-scales the adapter is 50-100% off; a single skipped module is caught by the
# per-weight check instead, which has no depth to amplify rounding.
MAX_REL_EFFECT = {torch.float32: 1e-3, torch.bfloat16: 0.5, torch.float16: 0.2}
MAX_RMS_REL_EFFECT = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.1}
# The adapter must change the outputs by more than the dtype tolerance, or the checks prove nothing.
MIN_EFFECT_OVER_TOLERANCE = 1.0


@dataclass(frozen=True)
class FullSizeSpec:
    """What to build and check; the defaults are the real 7B dims and the official r=64 recipe."""

    variant: str = "ixc2.5"
    dims: Dims = FULL_7B
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0
    lora_r: int = 64
    lora_alpha: int = 64
    effect_scale: float = 0.2
    ref_layers: int = 2
    batch_size: int = 2
    seq_len: int = 64
    time_budget_s: float = 300.0

    def describe(self) -> dict:
        data = asdict(self)
        data["dtype"] = str(self.dtype).replace("torch.", "")
        return data


@dataclass
class FullSizeResult:
    spec: FullSizeSpec
    environment: dict
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, int | None] = field(default_factory=dict)
    model_bytes: int = 0
    outputs: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    slice: dict[str, dict[str, float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def figures(self) -> dict:
        """The numbers worth keeping (README, figures JSON): what ran, how long, how much memory, how far off."""
        return {
            "ok": self.ok,
            "problems": list(self.problems),
            "spec": self.spec.describe(),
            "environment": self.environment,
            "time_s": {k: round(v, 3) for k, v in self.timings.items()},
            "peak_memory_gib": {k: gib(v) for k, v in self.peak_memory.items()},
            "model_gib": gib(self.model_bytes),
            "outputs": self.outputs,
            "weights": self.weights,
            "fp32_slice": self.slice,
        }


def row_errors(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor, rows: torch.Tensor) -> dict[str, float]:
    """On ``rows`` (bool [B, T]): how far ``got`` is from ``want``, relative to the output and to the effect.

    ``rel_output`` = max |got - want| / max |want|; ``rel_effect`` = max |got - want| / max |want - base|
    (the effect being what the adapter changes); ``rms_rel_effect`` is the same ratio of root mean squares,
    which is stable where a max over a few thousand rounding errors is not.
    """
    rows = rows.cpu()
    if not rows.any():
        return {}
    got, want, base = got.float()[rows], want.float()[rows], base.float()[rows]
    diff = torch.nan_to_num(got - want, nan=float("inf"))
    effect = torch.nan_to_num(want - base, nan=float("inf"))
    err, effect_max, scale = float(diff.abs().max()), float(effect.abs().max()), float(want.abs().max())
    rms = float(diff.pow(2).mean().sqrt())
    effect_rms = float(effect.pow(2).mean().sqrt())
    return {
        "max_abs": err,
        "rel_output": err / max(scale, 1e-30),
        "effect_rel_output": effect_max / max(scale, 1e-30),
        "rel_effect": err / max(effect_max, 1e-30),
        "rms_rel_effect": rms / max(effect_rms, 1e-30),
    }


@contextmanager
def capture_layer(model: torch.nn.Module, index: int, into: list[torch.Tensor]):
    """Record the output of decoder layer ``index`` (``...model.layers.<index>``) as fp32 on the CPU."""
    pattern = re.compile(rf"(?:^|\.)model\.layers\.{index}$")
    targets = [m for n, m in model.named_modules() if pattern.search(n)]
    if len(targets) != 1:
        raise ValueError(f"expected one decoder layer {index}, found {len(targets)}")

    def hook(_module, _inputs, output):
        into.append((output[0] if isinstance(output, tuple) else output).detach().float().cpu())

    handle = targets[0].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def run_probe(model: torch.nn.Module, probe: ProbeBatch, *, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 CPU logits, fp32 CPU hidden state after decoder layer ``layer``) for the probe."""
    param = next(model.parameters())
    hidden: list[torch.Tensor] = []
    with capture_layer(model, layer, hidden):
        out = model(inputs_embeds=probe.inputs_embeds.to(param.device, param.dtype),
                    attention_mask=probe.attention_mask.to(param.device), im_mask=probe.im_mask.to(param.device),
                    use_cache=False)
    return out.logits.float().cpu(), hidden[-1]


class FullSizeRun:
    """One end-to-end run. Steps are methods so a test double can break one (e.g. ``merge``) and prove
    the checks catch it."""

    def __init__(self, spec: FullSizeSpec = FullSizeSpec()) -> None:
        self.spec = spec
        self.result = FullSizeResult(spec=spec, environment=environment(spec.device))

    # -- steps -------------------------------------------------------------------------------

    def build_base(self) -> torch.nn.Module:
        s = self.spec
        return build_on_device(s.variant, s.dims, device=s.device, dtype=s.dtype, seed=s.seed)

    def build_slice_reference(self) -> torch.nn.Module:
        """The first ``ref_layers`` layers in fp32, holding the bf16-rounded base values exactly."""
        s = self.spec
        dims = s.dims.with_(num_hidden_layers=s.ref_layers, vision_layers=1)
        model = build_on_device(s.variant, dims, device=s.device, dtype=torch.float32, seed=s.seed)
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(s.dtype).float())
        return model

    def attach(self, model: torch.nn.Module):
        s = self.spec
        return attach_lora(model, r=s.lora_r, lora_alpha=s.lora_alpha, seed=s.seed, effect_scale=s.effect_scale)

    def merge(self, peft_model) -> torch.nn.Module:
        return peft_model.merge_and_unload()

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> FullSizeResult:
        from peft.utils import get_peft_model_state_dict

        s, r, t = self.spec, self.result, self.result.timings
        last = s.ref_layers - 1
        if not 1 <= s.ref_layers <= s.dims.num_hidden_layers:
            raise ValueError(f"ref_layers must be in 1..{s.dims.num_hidden_layers}, got {s.ref_layers}")
        start = time.perf_counter()
        peaks = r.peak_memory
        with phase(t, peaks, "build", s.device):
            model = self.build_base()
        r.model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        embedding = model.get_input_embeddings()
        probe = make_probe(embedding, batch_size=s.batch_size, seq_len=s.seq_len,
                           image_spans=[(s.seq_len // 4, 3 * s.seq_len // 4)], left_padding=[0, 5], seed=s.seed + 7)
        text_probe = make_probe(embedding, batch_size=s.batch_size, seq_len=s.seq_len, image_spans=[],
                                left_padding=[0, 5], seed=s.seed + 7)

        with phase(t, peaks, "adapter", s.device):
            peft_model = self.attach(model)
            adapter_config = peft_model.peft_config["default"].to_dict()
            lora = get_peft_model_state_dict(peft_model)  # references: they outlive the merge
        with phase(t, peaks, "forward_unmerged", s.device):
            with peft_model.disable_adapter():
                base = {"probe": run_probe(peft_model, probe, layer=last),
                        "text_probe": run_probe(peft_model, text_probe, layer=last)}
            unmerged = {"probe": run_probe(peft_model, probe, layer=last),
                        "text_probe": run_probe(peft_model, text_probe, layer=last)}
        with phase(t, peaks, "merge", s.device):
            merged_model = self.merge(peft_model)
        del peft_model, model, embedding
        with phase(t, peaks, "check", s.device):
            merged = {"probe": run_probe(merged_model, probe, layer=last),
                      "text_probe": run_probe(merged_model, text_probe, layer=last)}
            self._check_outputs(base, unmerged, merged, probe, text_probe)
            self._check_weights(merged_model, adapter_config, lora)
        del merged_model
        self._release()
        with phase(t, peaks, "fp32_slice", s.device):
            self._check_slice(probe, adapter_config, lora, base["probe"][1], unmerged["probe"][1], merged["probe"][1])
        peaks["overall"] = overall_peak(peaks)
        t["total"] = time.perf_counter() - start
        if t["total"] > s.time_budget_s:
            r.problems.append(f"the run took {t['total']:.0f} s, over its {s.time_budget_s:.0f} s budget")
        return r

    # -- checks ------------------------------------------------------------------------------

    def _check_outputs(self, base, unmerged, merged, probe: ProbeBatch, text_probe: ProbeBatch) -> None:
        """Merged vs unmerged logits, per row class, relative to the adapter's effect (the output-scale
        error is reported, not judged: after 32 bf16 layers it reflects depth, not the merge)."""
        r = self.result
        for key, batch, classes in (("probe", probe, ("image", "text")), ("text_probe", text_probe, ("text",))):
            r.outputs[key] = {}
            for row_class in classes:
                rows = batch.image_rows if row_class == "image" else batch.text_rows
                stats = row_errors(merged[key][0], unmerged[key][0], base[key][0], rows)
                r.outputs[key][row_class] = stats
                self._judge(f"logits, {row_class} rows of the {key.replace('_', ' ')}", stats,
                            "merged and unmerged", judge_output_scale=False)

    def _judge(self, where: str, stats: dict[str, float], what: str, *, judge_output_scale: bool) -> None:
        dtype = self.spec.dtype
        tol = tolerance_for(dtype)
        max_rel = MAX_REL_EFFECT.get(dtype, MAX_REL_EFFECT[torch.float32])
        max_rms = MAX_RMS_REL_EFFECT.get(dtype, MAX_RMS_REL_EFFECT[torch.float32])
        problems = self.result.problems
        if not stats["effect_rel_output"] > MIN_EFFECT_OVER_TOLERANCE * tol:
            problems.append(f"{where}: the adapter changes them by only {stats['effect_rel_output']:.1e} of their "
                            f"scale, within the {tol:.0e} tolerance: the check cannot tell a merge from rounding")
        bad = not (stats["rel_effect"] <= max_rel and stats["rms_rel_effect"] <= max_rms)
        if judge_output_scale and not stats["rel_output"] <= tol:
            bad = True
        if bad:
            problems.append(f"{where}: {what} differ by {stats['rel_effect']:.1%} (max) / {stats['rms_rel_effect']:.1%}"
                            f" (rms) of the adapter's effect, {stats['rel_output']:.1e} of the output scale; allowed "
                            f"{max_rel:.0%} / {max_rms:.0%}" + (f" and {tol:.0e}" if judge_output_scale else ""))

    @torch.no_grad()
    def _check_weights(self, merged_model: torch.nn.Module, adapter_config: dict, lora: dict) -> None:
        s, r = self.spec, self.result
        policy = policy_for(s.dtype)
        modules = dict(merged_model.named_modules())
        worst = {"module": "", "ratio": -1.0, "rel_delta": 0.0}
        missing, checked = [], 0
        for delta in iter_expected_deltas(adapter_config, lora):
            module = modules.get(delta.module)
            if module is None or getattr(module, "weight", None) is None:
                missing.append(delta.module)
                continue
            got = module.weight.detach()
            base = regenerate_param(f"{delta.module}.weight", got.shape, seed=s.seed, device=got.device, dtype=s.dtype)
            want_delta = delta.delta.to(got.device)
            err = float(torch.nan_to_num((got.float() - base.float() - want_delta).abs(), nan=float("inf")).max())
            scale = float(want_delta.abs().max())
            allowed = policy.rel * 0.1 * scale + policy.weight_eps * float(base.float().abs().max()) + 1e-12
            checked += 1
            if err / allowed > worst["ratio"]:
                worst = {"module": delta.module, "ratio": err / allowed, "rel_delta": err / max(scale, 1e-30)}
        plora_changed = []
        for name, param in merged_model.named_parameters():
            if ".Plora_A." in name or ".Plora_B." in name or name.split(".")[-1].startswith("plora_"):
                want = regenerate_param(name, param.shape, seed=s.seed, device=param.device, dtype=s.dtype)
                if not torch.equal(param.detach(), want):
                    plora_changed.append(name)
        wrappers = find_unmerged_lora_wrappers(merged_model)
        expected = 5 * s.dims.num_hidden_layers
        r.weights = {"modules_checked": checked, "worst_module": worst["module"],
                     "worst_err_rel_delta": worst["rel_delta"], "worst_err_over_allowed": worst["ratio"],
                     "plora_changed": plora_changed[:10], "unmerged_wrappers": wrappers[:10]}
        if missing or checked != expected:
            r.problems.append(f"weights: {checked} adapted modules found, expected {expected}"
                              + (f"; missing e.g. {missing[0]}" if missing else ""))
        if worst["ratio"] > 1.0:
            r.problems.append(f"weights: merged {worst['module']} is off by {worst['rel_delta']:.1%} of its ΔW "
                              f"({worst['ratio']:.1f}x the {str(s.dtype).replace('torch.', '')} rounding allowance)")
        if plora_changed:
            r.problems.append(f"weights: the merge changed {len(plora_changed)} PLoRA tensor(s), e.g. {plora_changed[0]}")
        if wrappers:
            r.problems.append(f"weights: merge_and_unload left {len(wrappers)} LoRA wrapper(s), e.g. {wrappers[0]}")

    @torch.no_grad()
    def _check_slice(self, probe: ProbeBatch, adapter_config: dict, lora: dict, base_hidden: torch.Tensor,
                     unmerged_hidden: torch.Tensor, merged_hidden: torch.Tensor) -> None:
        s, r = self.spec, self.result
        last = s.ref_layers - 1
        keep = {k: v for k, v in lora.items() if (m := re.search(r"\.layers\.(\d+)\.", k)) and int(m.group(1)) <= last}
        reference = self.build_slice_reference()
        probe32 = ProbeBatch(probe.input_ids, probe.inputs_embeds.float(), probe.im_mask, probe.attention_mask)
        _, ref_base = run_probe(reference, probe32, layer=last)
        apply_adapter_reference(reference, adapter_config, keep)
        _, ref = run_probe(reference, probe32, layer=last)
        del reference
        for row_class, rows in (("image", probe.image_rows), ("text", probe.text_rows)):
            merged_stats = row_errors(merged_hidden, ref, ref_base, rows)
            unmerged_stats = row_errors(unmerged_hidden, ref, ref_base, rows)
            base_stats = row_errors(base_hidden, ref_base, ref_base, rows)
            r.slice[row_class] = {
                "merged_rel_effect": merged_stats["rel_effect"], "merged_rms_rel_effect": merged_stats["rms_rel_effect"],
                "merged_rel_output": merged_stats["rel_output"],
                "unmerged_rel_effect": unmerged_stats["rel_effect"],
                "unmerged_rel_output": unmerged_stats["rel_output"],
                "base_rel_output": base_stats["rel_output"], "effect_rel_output": merged_stats["effect_rel_output"],
            }
            where = f"hidden state after {s.ref_layers} layer(s), {row_class} rows"
            self._judge(where, merged_stats, "merged and the fp32 reference", judge_output_scale=True)

    def _release(self) -> None:
        import gc

        gc.collect()
        if torch.device(self.spec.device).type == "cuda":
            torch.cuda.empty_cache()


def run_full_size(spec: FullSizeSpec = FullSizeSpec()) -> FullSizeResult:
    """Build, adapt, merge and check the synthetic model as ``spec`` says; see the module docstring."""
    return FullSizeRun(spec).run()
