"""Tolerance boundaries: for every check with a tolerance or a floor, a fault just past it fails and one just inside
passes (issue 15, item 5: tests that fail for the right reason).

Each decision is pinned at the lowest unit that carries it (``compare``, ``pairwise_disagreements``, the check
functions on a constructed context), for every dtype in ``TOLERANCE_TABLE``, so that loosening a tolerance 100x,
flipping ``<=`` into ``<`` or dropping the atol floor makes a test here fail. ``merged-matches`` is driven end to
end on a merged checkpoint computed by hand from the cached default bundle (no model load).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import harness
from harness.checks import CheckContext
from harness.checks.measure.dynamic_run import PathOutcome
from harness.checks.measure.training_audit import TrainedAudit
from harness.checks.registry import CheckResult, get_check, run_check
from harness.loading.paths import PATHS
from harness.loading.records import LoadRecord
from harness.numerics.compare import compare, pairwise_disagreements
from harness.numerics.probes import ProbeBatch, make_probe
from harness.numerics.tolerances import EFFECT_FLOOR, TOLERANCE_TABLE, band, policy_for, tolerance_for

DTYPES = [getattr(torch, name) for name in TOLERANCE_TABLE]
DTYPE_IDS = list(TOLERANCE_TABLE)
TEXT_POS = (0, 5)  # a real text row of the probe below (batch 0 has no padding, image span is positions 2..3)
IMAGE_POS = (0, 2)


@pytest.fixture(scope="module")
def probe() -> ProbeBatch:
    torch.manual_seed(0)
    return make_probe(torch.nn.Embedding(32, 8), batch_size=2, seq_len=6, image_spans=[(2, 4)], left_padding=[0, 1],
                      seed=0)


def outputs_with_error(scale: float, error: float,
                       where: tuple[int, int] = TEXT_POS) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, reference): a reference whose max |.| is ``scale`` on every row, outputs off by ``error`` at one
    element of row ``where``."""
    reference = torch.full((2, 6, 5), scale, dtype=torch.float32)
    outputs = reference.clone()
    outputs[where[0], where[1], 3] += error
    return outputs, reference


# ---------------------------------------------------------------------------------------------
# compare(): rel tolerance, atol floor, the <= at the boundary (every path comparison uses it)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("where, row_class", [(TEXT_POS, "text"), (IMAGE_POS, "image")], ids=["text", "image"])
def test_compare_rel_tolerance_boundary(probe, dtype, where, row_class) -> None:
    rel = tolerance_for(dtype)
    inside = compare(*outputs_with_error(1.0, 0.9 * rel, where), probe, dtype=dtype, label="inside")
    outside = compare(*outputs_with_error(1.0, 1.1 * rel, where), probe, dtype=dtype, label="outside")
    assert inside.ok and not outside.ok
    assert inside.tolerance == outside.tolerance == rel
    assert getattr(outside, f"{row_class}_max_rel") == pytest.approx(1.1 * rel, rel=1e-2)
    assert outside.worst_row == (row_class, *where)
    other = "image" if row_class == "text" else "text"
    assert getattr(outside, f"{other}_max_abs") == 0.0


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_compare_fails_when_the_reference_is_not_finite_in_real_rows(probe, bad) -> None:
    """An inf reference makes its scale inf and every relative error 0: that must not read as agreement."""
    outputs, reference = outputs_with_error(1.0, 0.0)
    reference[TEXT_POS[0], TEXT_POS[1], 1] = bad
    result = compare(outputs, reference, probe, dtype=torch.float32, label="path")
    assert not result.ok and result.non_finite is None
    assert "compared against hold NaN/Inf" in result.summary()
    padded = outputs_with_error(1.0, 0.0)[1]
    padded[1, 0, 1] = bad  # batch 1 is left-padded by one position: padding is not judged
    assert compare(outputs, padded, probe, dtype=torch.float32, label="path").ok


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_compare_error_exactly_at_the_tolerance_passes(probe, dtype) -> None:
    """max abs <= rel·scale, not <: an error of exactly the tolerance is within it."""
    rel = tolerance_for(dtype)
    scale = float(round(1 / rel))
    assert rel * scale == 1.0  # the boundary is exactly representable: error 1.0 on a reference of max `scale`
    outputs, reference = outputs_with_error(scale, 1.0)
    assert float((outputs - reference).abs().max()) == 1.0
    assert compare(outputs, reference, probe, dtype=dtype, label="edge").ok
    outputs, reference = outputs_with_error(scale, 1.0 + 2 ** -8)  # the next step past it fails
    assert not compare(outputs, reference, probe, dtype=dtype, label="past").ok


def test_compare_explicit_tolerance_boundary_is_inclusive(probe) -> None:
    """The explicit ``tolerance=`` (pairwise comparisons) uses the same inclusive boundary."""
    assert compare(*outputs_with_error(1.0, 0.5), probe, dtype=torch.float32, label="edge", tolerance=0.5).ok
    assert not compare(*outputs_with_error(1.0, 0.5 + 2 ** -10), probe, dtype=torch.float32, label="past",
                       tolerance=0.5).ok


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_compare_atol_floor_boundary(probe, dtype) -> None:
    """Rows whose reference is near zero: the absolute floor decides, not rel·scale."""
    policy = policy_for(dtype)
    scale = 1e-3
    assert policy.rel * scale < 0.1 * policy.atol  # rel alone would reject both errors below
    inside = compare(*outputs_with_error(scale, 0.9 * policy.atol), probe, dtype=dtype, label="inside")
    outside = compare(*outputs_with_error(scale, 1.1 * policy.atol), probe, dtype=dtype, label="outside")
    assert inside.ok and not outside.ok
    assert outside.text_max_abs == pytest.approx(1.1 * policy.atol, rel=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pairwise_uses_twice_the_dtype_tolerance(probe, dtype) -> None:
    rel = tolerance_for(dtype)
    reference = torch.ones(2, 6, 5)
    inside = {"a": outputs_with_error(1.0, 1.9 * rel)[0], "b": reference}  # the second of a pair is the scale
    outside = {"a": outputs_with_error(1.0, 2.1 * rel)[0], "b": reference}
    assert pairwise_disagreements(inside, probe, dtype=dtype) == []
    problems = pairwise_disagreements(outside, probe, dtype=dtype)
    assert len(problems) == 1 and problems[0].startswith("a vs b: ")


# ---------------------------------------------------------------------------------------------
# The dynamic checks on a constructed run (the check functions themselves decide)


@dataclass
class FakeRun:
    """What the dynamic checks read from a ``DynamicRun``: logits, probes and per-path outcomes."""

    dtype: torch.dtype
    probe: ProbeBatch
    text_probe: ProbeBatch
    base_logits: torch.Tensor
    reference_logits: torch.Tensor
    text_base_logits: torch.Tensor
    text_reference_logits: torch.Tensor
    outcomes: dict[str, PathOutcome] = field(default_factory=dict)
    non_finite: str | None = None
    load_error: str | None = None
    raw_load: object = None
    base_plora: dict = field(default_factory=dict)
    noise: dict = field(default_factory=lambda: {"image": 0.0, "text": 0.0})  # the dtype's own noise on the model
    effect: dict = field(default_factory=lambda: {"image": 0.0, "text": 0.0})  # as calibrated: 0 keeps the floor
    reference_mode: str = "streamed"

    @property
    def bands(self) -> dict[str, float]:
        return {row: band(self.dtype, noise=self.noise[row], effect=self.effect[row]) for row in ("image", "text")}

    @property
    def tolerance(self) -> float:
        return max(self.bands.values())

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def basis(self) -> str:
        return f"calibrated on noise {self.noise}"

    def outcome(self, name: str) -> PathOutcome:
        return self.outcomes[name]


def run_on(check_id: str, ctx: CheckContext) -> CheckResult:
    """The registered check, run as the engine runs it (id and status filled in by the registry)."""
    return run_check(get_check(check_id), ctx)


def context_with(run: FakeRun, config: dict | None = None) -> CheckContext:
    ctx = CheckContext(adapter=SimpleNamespace(config=config or {}), base=SimpleNamespace(base_dir=Path("unused")))
    ctx.cache["dynamic.run"] = run
    return ctx


def fake_run(probe: ProbeBatch, dtype: torch.dtype, *, image_effect: float = 1.0, text_effect: float = 1.0,
             path_logits: dict[str, torch.Tensor] | None = None) -> FakeRun:
    """Base logits of max 1 everywhere; the reference moves them by ``image_effect`` on an image row and by
    ``text_effect`` on a text row; each loading path's logits (default: the reference) compared as the run does."""
    base = torch.ones(2, 6, 5)
    reference = base.clone()
    reference[IMAGE_POS[0], IMAGE_POS[1], 0] += image_effect
    text_reference = base.clone()
    text_reference[TEXT_POS[0], TEXT_POS[1], 0] += text_effect
    text_probe = make_probe(torch.nn.Embedding(32, 8), batch_size=2, seq_len=6, image_spans=[], left_padding=[0, 1],
                            seed=0)
    run = FakeRun(dtype, probe, text_probe, base, reference, base.clone(), text_reference)
    for name in PATHS:
        logits = (path_logits or {}).get(name, reference)
        run.outcomes[name] = PathOutcome(name, record=LoadRecord(path=name), logits=logits,
                                         comparison=compare(logits, reference, probe, dtype=dtype, label=name))
    return run


def test_effect_floor_boundary(probe) -> None:
    """Below EFFECT_FLOOR on a row class: no measurable effect there (fail, naming the row class)."""
    def effect(image: float, text: float):
        return run_on("effect", context_with(fake_run(probe, torch.float32, image_effect=image, text_effect=text)))

    weak = effect(1.0, 0.5 * EFFECT_FLOOR)
    assert weak.id == "effect" and weak.status == "fail"
    assert weak.details["relative_effect"]["text"] == pytest.approx(0.5 * EFFECT_FLOOR, rel=1e-2)
    assert weak.details["floor"] == EFFECT_FLOOR and "no measurable effect on text rows" in weak.message
    above = effect(1.0, 3 * EFFECT_FLOOR)
    assert above.status == "pass", above.message  # 3e-4 > 2x the fp32 tolerance: a clear effect
    weak = effect(0.5 * EFFECT_FLOOR, 1.0)
    assert weak.status == "fail" and weak.details["relative_effect"]["image"] < EFFECT_FLOOR
    assert "on image rows" in weak.message


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_effect_warns_below_twice_the_dtype_tolerance(probe, dtype) -> None:
    """An effect above the floor but under 2x the dtype tolerance cannot be told from rounding: warn."""
    tol = tolerance_for(dtype)
    near = run_on("effect", context_with(fake_run(probe, dtype, image_effect=1.0, text_effect=1.9 * tol)))
    clear = run_on("effect", context_with(fake_run(probe, dtype, image_effect=1.0, text_effect=2.1 * tol)))
    assert near.id == clear.id == "effect"
    assert near.status == "warn" and clear.status == "pass", (near.message, clear.message)
    assert near.details["dtype_tolerance"] == tol
    # a rerun in float32 helps only when the run was not in float32 already
    assert ("--dtype float32" in near.fix) == (dtype != torch.float32), near.fix
    assert near.details["relative_effect"]["text"] == pytest.approx(1.9 * tol, rel=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_equivalence_merged_vs_unmerged_boundary(probe, dtype) -> None:
    """Unmerged and merged each within the tolerance of the reference (on opposite sides), apart by 0.9x / 1.1x."""
    tol = tolerance_for(dtype)

    def run_apart(gap: float) -> FakeRun:
        reference = fake_run(probe, dtype).reference_logits
        unmerged, merged = reference.clone(), reference.clone()
        unmerged[TEXT_POS[0], TEXT_POS[1], 1] -= gap * tol / 2
        merged[TEXT_POS[0], TEXT_POS[1], 1] += gap * tol / 2
        return fake_run(probe, dtype, path_logits={"peft": unmerged, "peft-merged": merged, "peft-safe-merged": merged})

    inside = run_on("merge-equivalence", context_with(run_apart(0.9)))
    outside = run_on("merge-equivalence", context_with(run_apart(1.1)))
    assert inside.id == outside.id == "merge-equivalence"
    assert inside.status == "pass", inside.message
    assert outside.status == "fail" and outside.message.startswith("merged and unmerged outputs differ by")
    assert "worst at text row batch 0 position 5" in outside.message  # measured on text rows, not the image scale
    assert outside.details["merged_vs_unmerged_rel"] == pytest.approx(1.1 * tol, rel=1e-2)
    assert all(outside.details[name]["ok"] for name in ("peft", "peft-merged", "peft-safe-merged"))


def test_merge_equivalence_reports_non_finite_merged_outputs_once(probe) -> None:
    """NaN in the merged outputs is the merged path's own failure (non-finite, with its source), not a second
    'merged and unmerged differ by inf/nan' problem."""
    run = fake_run(probe, torch.float32)
    logits = run.reference_logits.clone()
    logits[TEXT_POS[0], TEXT_POS[1], 0] = float("nan")
    run.outcomes["peft-merged"] = PathOutcome(
        "peft-merged", record=LoadRecord(path="peft-merged"), logits=logits, non_finite="first produced by x",
        comparison=compare(logits, run.reference_logits, probe, dtype=torch.float32, label="peft-merged",
                           non_finite="first produced by x"))
    got = run_on("merge-equivalence", context_with(run))
    assert got.status == "fail" and got.message.startswith("peft-merged: non-finite outputs")
    assert "more)" not in got.message and "merged_vs_unmerged_rel" not in got.details


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_path_agreement_boundary(probe, dtype) -> None:
    """One path off the reference by 0.9x / 1.1x the dtype tolerance: within / named as disagreeing."""
    tol = tolerance_for(dtype)
    reference = fake_run(probe, dtype).reference_logits

    def shifted(k: float) -> torch.Tensor:
        out = reference.clone()
        out[TEXT_POS[0], TEXT_POS[1], 2] += k * tol  # the reference's max on text rows is 1
        return out

    inside = run_on("path-agreement", context_with(fake_run(probe, dtype, path_logits={"state-dict": shifted(0.9)})))
    outside = run_on("path-agreement", context_with(fake_run(probe, dtype, path_logits={"state-dict": shifted(1.1)})))
    assert inside.id == outside.id == "path-agreement"
    assert inside.status == "pass", inside.message
    assert outside.status == "fail" and f"1 of {len(PATHS)} loading paths disagree: state-dict:" in outside.message
    assert outside.details["paths"]["state-dict"]["text_max_rel"] == pytest.approx(1.1 * tol, rel=1e-2)
    assert outside.details["tolerance"] == tol and outside.details["dtype"] == str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# trained-vs-shipped: weights the probe does not reach, judged at tolerance·1e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_trained_weight_mismatch_boundary(probe, dtype) -> None:
    """Outputs agree; a reloaded parameter differs from the trained one by 0.5x / 2x of tolerance·1e-2."""
    tol = tolerance_for(dtype)
    agree = compare(torch.ones(2, 6, 5), torch.ones(2, 6, 5), probe, dtype=dtype, label="peft reload")

    def judged(k: float):
        audit = TrainedAudit(saved_dir=Path("saved"), base_dir=Path("base"), adapter_name="default", saved_keys=[],
                             comparison=agree, weight_mismatches=[("vision_proj.0.weight", k * tol * 1e-2)])
        ctx = CheckContext()
        ctx.cache["trained.audit"] = audit
        return run_on("trained-vs-shipped", ctx)

    inside, outside = judged(0.5), judged(2.0)
    assert inside.id == outside.id == "trained-vs-shipped"
    assert inside.status == "pass", inside.message
    assert outside.status == "fail" and "the probe does not reach them" in outside.message
    assert outside.details["weight_mismatches"] == [{"name": "vision_proj.0.weight", "max_abs": 2.0 * tol * 1e-2}]
    assert "e.g. vision_proj.0.weight" in outside.message


# ---------------------------------------------------------------------------------------------
# merged-matches: merged_rel per tensor, on a merged checkpoint computed by hand


LAYER = "model.layers.1.feed_forward.w2"
UNTOUCHED = "model.layers.0.attention_norm.weight"


def hand_merged(bundle, dst: Path, dtype: torch.dtype) -> Path:
    """base + s·B·A for every adapted weight, computed in fp32 and stored in ``dtype`` (code, tokenizer, config
    copied; config declares ``dtype``)."""
    shutil.copytree(bundle.base_dir, dst)
    config = json.loads((bundle.adapter_dir / "adapter_config.json").read_text())
    adapter = load_file(bundle.adapter_dir / "adapter_model.safetensors")
    weights = load_file(dst / "model.safetensors")
    scaling = config["lora_alpha"] / config["r"]
    for key, a in adapter.items():
        if key[len("base_model.model."):].split(".")[0] in (config.get("modules_to_save") or []):
            weights[key[len("base_model.model."):]] = a  # the trained copy replaces the base tensor
        elif key.endswith(".lora_A.weight"):
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            weights[f"{module}.weight"] = weights[f"{module}.weight"].float() + scaling * (b.float() @ a.float())
    save_file({k: v.to(dtype).contiguous() for k, v in weights.items()}, dst / "model.safetensors",
              metadata={"format": "pt"})
    model_config = json.loads((dst / "config.json").read_text())
    name = str(dtype).replace("torch.", "")
    model_config.update({k: name for k in ("torch_dtype", "dtype") if k in model_config} or {"torch_dtype": name})
    (dst / "config.json").write_text(json.dumps(model_config))
    return dst


def perturb(merged: Path, key: str, rel: float) -> None:
    """Move the largest-magnitude element of ``key`` by ``rel`` of the tensor's max |.| (what merged-matches
    measures), keeping the stored dtype."""
    weights = load_file(merged / "model.safetensors")
    tensor = weights[key].float()
    flat = tensor.reshape(-1)
    i = int(flat.abs().argmax())
    flat[i] += rel * float(flat.abs().max()) * (1 if flat[i] >= 0 else -1)
    weights[key] = tensor.to(weights[key].dtype)
    save_file(weights, merged / "model.safetensors", metadata={"format": "pt"})


def merged_result(bundle, merged: Path):
    return harness.check(bundle.adapter_dir, base_model=bundle.base_dir, merged=merged, trust_remote_code=True,
                         only=["merged-matches"], isolated=False).get("merged-matches")


@pytest.fixture(scope="module", params=DTYPES, ids=DTYPE_IDS)
def merged_of(request, default_bundle, tmp_path_factory):
    """(dtype, a correct hand-made merged checkpoint in that dtype)."""
    dtype = request.param
    return dtype, hand_merged(default_bundle, tmp_path_factory.mktemp("merged") / "m", dtype)


def test_hand_merged_checkpoint_passes(default_bundle, merged_of) -> None:
    dtype, merged = merged_of
    got = merged_result(default_bundle, merged)
    assert got.id == "merged-matches" and got.status == "pass", got.message
    assert got.details["max_rel_error"] < 0.5 * policy_for(dtype).merged_rel
    assert got.details["tolerance"][str(dtype).replace("torch.", "")] == policy_for(dtype).merged_rel


@pytest.mark.parametrize("k, status", [(0.5, "pass"), (2.0, "fail")])
def test_merged_adapted_weight_boundary(default_bundle, merged_of, tmp_path, k, status) -> None:
    """An adapted weight off W + s·B·A by 0.5x / 2x merged_rel of its max |W'|."""
    dtype, merged = merged_of
    rtol = policy_for(dtype).merged_rel
    broken = Path(shutil.copytree(merged, tmp_path / "m"))
    perturb(broken, f"{LAYER}.weight", k * rtol)
    got = merged_result(default_bundle, broken)
    assert got.id == "merged-matches" and got.status == status, got.message
    assert got.details["worst_tensor"] == f"{LAYER}.weight"
    assert got.details["max_rel_error"] == pytest.approx(k * rtol, abs=torch.finfo(dtype).eps)  # + storage rounding
    if status == "fail":
        assert [entry.split(" ")[0] for entry in got.details["wrong_delta"]] == [f"{LAYER}.weight"]
        assert got.details["unmerged"] == [] and got.details["changed"] == []


@pytest.mark.parametrize("k, status", [(0.5, "pass"), (2.0, "fail")])
def test_merged_untouched_tensor_boundary(default_bundle, merged_of, tmp_path, k, status) -> None:
    """A tensor the adapter does not touch, off the base by 0.5x / 2x merged_rel of its max |W|."""
    dtype, merged = merged_of
    rtol = policy_for(dtype).merged_rel
    broken = Path(shutil.copytree(merged, tmp_path / "m"))
    perturb(broken, UNTOUCHED, k * rtol)
    got = merged_result(default_bundle, broken)
    assert got.id == "merged-matches" and got.status == status, got.message
    assert got.details["changed"] == ([UNTOUCHED] if status == "fail" else [])


COPY = "output.weight"


@pytest.fixture(scope="module")
def copy_bundle(default_bundle, tmp_path_factory) -> SimpleNamespace:
    """The default adapter plus a modules_to_save copy of the (untied) LM head: base + 0.5·max|W| noise."""
    adapter_dir = Path(shutil.copytree(default_bundle.adapter_dir, tmp_path_factory.mktemp("mts") / "adapter"))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["modules_to_save"] = ["output"]
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    head = load_file(default_bundle.base_dir / "model.safetensors")[COPY]
    noise = torch.randn(head.shape, generator=torch.Generator().manual_seed(7))
    tensors[f"base_model.model.{COPY}"] = head + 0.5 * float(head.abs().max()) * noise / float(noise.abs().max())
    save_file(tensors, adapter_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    return SimpleNamespace(base_dir=default_bundle.base_dir, adapter_dir=adapter_dir)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("k, status", [(0.0, "pass"), (0.5, "pass"), (2.0, "fail")])
def test_merged_modules_to_save_copy_boundary(copy_bundle, tmp_path, dtype, k, status) -> None:
    """The merged LM head must be the trained copy: off it by 0.5x / 2x merged_rel of its max |W|."""
    rtol = policy_for(dtype).merged_rel
    merged = hand_merged(copy_bundle, tmp_path / "m", dtype)
    if k:
        perturb(merged, COPY, k * rtol)
    got = merged_result(copy_bundle, merged)
    assert got.id == "merged-matches" and got.status == status, got.message
    if k:
        assert got.details["worst_tensor"] == COPY
        assert got.details["max_rel_error"] == pytest.approx(k * rtol, abs=torch.finfo(dtype).eps)
    if status == "fail":
        assert [entry.split(" ")[0] for entry in got.details["copies_wrong"]] == [COPY]
        assert got.details["copies_dropped"] == []


def test_merged_modules_to_save_copy_left_at_the_base_is_dropped(copy_bundle, tmp_path) -> None:
    merged = hand_merged(copy_bundle, tmp_path / "m", torch.float32)
    weights = load_file(merged / "model.safetensors")
    weights[COPY] = load_file(copy_bundle.base_dir / "model.safetensors")[COPY]
    save_file(weights, merged / "model.safetensors", metadata={"format": "pt"})
    got = merged_result(copy_bundle, merged)
    assert got.status == "fail" and [e.split(" ")[0] for e in got.details["copies_dropped"]] == [COPY]


@pytest.mark.parametrize(("effect", "status"), [(0.55, "warn"), (0.65, "pass")])
def test_effect_within_the_dtype_noise_of_the_model_warns_naming_float32(probe, effect, status) -> None:
    """bf16 at depth: the base alone is 10% from its fp32 run on text rows, so an effect under 2x the resolution
    floor (3x that noise) cannot be told from rounding: a warning naming the dtype that resolves it."""
    run = fake_run(probe, torch.bfloat16, image_effect=1.0, text_effect=effect)
    run.noise = {"image": 0.01, "text": 0.1}
    result = run_on("effect", context_with(run))
    assert result.status == status, result.message
    if status == "warn":
        assert "within what bfloat16 rounding does to this model" in result.message
        assert "the base in bfloat16 against fp32 differs by 1.0e-01" in result.message
        assert result.fix == "rerun with --dtype float32, which resolves it"
        assert result.details["dtype_noise"] == {"image": 0.01, "text": 0.1}


@pytest.mark.parametrize(("gap", "status"), [(0.9, "pass"), (1.1, "fail")])
def test_merge_equivalence_band_follows_the_dtype_noise(probe, gap, status) -> None:
    """With the noise measured at 0.1 on text rows the band there is 3x that: merged vs unmerged apart by 0.9x of
    it passes, by 1.1x fails, naming how the band was calibrated."""
    noise = {"image": 0.0, "text": 0.1}
    width = band(torch.bfloat16, noise=0.1)
    reference = fake_run(probe, torch.bfloat16).reference_logits
    unmerged, merged = reference.clone(), reference.clone()
    unmerged[TEXT_POS[0], TEXT_POS[1], 1] -= gap * width / 2
    merged[TEXT_POS[0], TEXT_POS[1], 1] += gap * width / 2
    run = fake_run(probe, torch.bfloat16, path_logits={"peft": unmerged, "peft-merged": merged,
                                                        "peft-safe-merged": merged})
    run.noise = noise
    for name in ("peft", "peft-merged", "peft-safe-merged"):
        outcome = run.outcomes[name]
        outcome.comparison = compare(outcome.logits, run.reference_logits, probe, dtype=torch.bfloat16, label=name,
                                     tolerance=run.bands, basis=run.basis)
    result = run_on("merge-equivalence", context_with(run))
    assert result.status == status, result.message
    if status == "fail":
        assert result.message.startswith("merged and unmerged outputs differ by") and "calibrated on noise" in result.message
