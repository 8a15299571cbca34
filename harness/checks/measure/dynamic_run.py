"""One dynamic run: load the base and the adapter through every path, once each, against one reference.

The expensive work (model loads, forward passes) happens here, lazily and at most
once per path; the checks in ``harness.checks.dynamic`` only read the outcomes.
Each loaded model is reduced to the facts the checks need and freed straight away, so
one model is alive at a time (the fp32 reference is reduced to its logits before any path
loads); ``peft``, ``peft-merged`` and ``merge-script`` share one load (see ``_run_chain``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.loading.memory import keep_large_frees_returnable, release_memory
from harness.inputs.adapter_dir import read_adapter_tensors
from harness.inputs.errors import UnusableInput
from harness.inputs.files import read_json_object
from harness.loading.base import load_base, note_adjustment
from harness.loading.paths import PATHS, merge_loaded, save_and_reload
from harness.loading.raw_load import RawLoadDiagnosis, diagnose_raw_load
from harness.loading.records import LoadedModel, LoadRecord, find_unmerged_lora_wrappers
from harness.model import families
from harness.model.structure import tied_parameters
from harness.numerics.compare import Comparison, compare, finite_rows
from harness.numerics.probes import ProbeBatch, accepts_im_mask, make_probe, reached_modules
from harness.numerics.reference import (
    apply_adapter_reference,
    first_non_finite_module,
    probe_logits,
    trained_token_ids,
)
from harness.numerics.tolerances import tolerance_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MERGED_PATHS = ("peft-merged", "peft-safe-merged", "merge-script")
CHAINED_PATHS = ("peft", "peft-merged", "merge-script")  # one load, in this order


@dataclass
class PathOutcome:
    name: str
    record: LoadRecord | None = None
    comparison: Comparison | None = None
    logits: torch.Tensor | None = None
    error: str | None = None
    non_finite: str | None = None  # where this path's NaN/Inf outputs come from
    unmerged_wrappers: list[str] = field(default_factory=list)
    plora_changed: list[str] = field(default_factory=list)
    class_changes: list[str] = field(default_factory=list)


class DynamicRun:
    """Reference, probe and per-path outcomes for one (base, adapter, dtype, device)."""

    def __init__(self, base_dir: Path, adapter_dir: Path, *, dtype: str | None, device: str, progress=None,
                 init_buffers: dict[str, torch.Tensor] | None = None) -> None:
        self.base_dir, self.adapter_dir, self.device = Path(base_dir), Path(adapter_dir), device
        self.dtype = DTYPES[dtype] if dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
        self.progress = progress or (lambda text: None)
        self._workdir = tempfile.TemporaryDirectory(prefix="plora-harness-")
        self.workdir = Path(self._workdir.name)
        self.outcomes: dict[str, PathOutcome] = {}
        self.load_error: str | None = None
        self.probe: ProbeBatch | None = None
        self.uses_im_mask = False
        self.base_logits = self.reference_logits = None
        self.text_probe: ProbeBatch | None = None  # the same tokens with no image rows at all
        self.text_base_logits = self.text_reference_logits = None
        self.raw_load: RawLoadDiagnosis | None = None
        self.non_finite: str | None = None  # NaN/Inf in the base's or the reference's outputs: where they come from
        self.unreached: list[str] = []  # adapted modules no probe runs through
        self.untied: dict[str, str] = {}  # parameter the adapter changes -> the tied partner PEFT leaves at the base
        self.base_plora: dict[str, torch.Tensor] = {}
        self.base_classes: dict[str, str] = {}
        self.init_buffers = init_buffers or {}  # what the model's own constructor computes (BaseModelInfo)
        self.notes: list[str] = []  # what the reference could not apply or the probes could not reach
        self._prepare()
        for note in self.notes:  # into the report of the check that started this run
            note_adjustment(note)

    @property
    def tolerance(self) -> float:
        return tolerance_for(self.dtype)

    def _prepare(self) -> None:
        keep_large_frees_returnable()
        self.progress("loading the base model in fp32 for the reference")
        try:
            model = load_base(self.base_dir, dtype=torch.float32, device=self.device, private=True)  # ΔW in place
        except UnusableInput:
            raise  # the model code needs the network: the run stops with its one line
        except Exception as err:  # remote code that crashes: one line, not a traceback, naming file and line
            from harness.model.remote_code import explain_load_error

            self.load_error = explain_load_error(err, self.base_dir)
            return
        self.load_error = uninitialised_buffers(model, self.init_buffers, self.base_dir)
        if self.load_error:
            return
        self.uses_im_mask = accepts_im_mask(model)
        self.base_classes = {n: type(m).__name__ for n, m in model.named_modules() if families.is_branch_module(m)}
        self.base_plora = {n: p.detach().clone() for n, p in model.named_parameters() if families.is_branch_param(n)}
        config = read_json_object(self.adapter_dir / "adapter_config.json")
        tensors = read_adapter_tensors(self.adapter_dir)
        self._make_probes(model, trained_token_ids(model, config, tensors))
        self.base_logits = probe_logits(model, self.probe, im_mask=self.uses_im_mask)
        self.text_base_logits = probe_logits(model, self.text_probe, im_mask=self.uses_im_mask)
        self.non_finite = self._locate_non_finite(model, self.base_logits, self.text_base_logits,
                                                  "the base model itself")
        tied_before = _tied_params(model)
        changed = apply_adapter_reference(model, config, tensors, notes=self.notes)
        del tensors
        self.untied = _untied_by_adapter(model, tied_before)
        modules = dict(model.named_modules())
        adapted = sorted({name if name in modules else name.rsplit(".", 1)[0] for name in changed})  # params -> module
        del modules
        with reached_modules(model, adapted) as reached:
            self.reference_logits = probe_logits(model, self.probe, im_mask=self.uses_im_mask)
            self.text_reference_logits = probe_logits(model, self.text_probe, im_mask=self.uses_im_mask)
        self.unreached = [name for name in adapted if name not in reached]
        if self.unreached:
            self.notes.append(f"probes: {len(self.unreached)} adapted module(s) never run on the probes (e.g. "
                              f"{self.unreached[0]}): their effect is not measured (probes feed token ids and "
                              "embeddings, not images through a vision tower)")
        self.non_finite = self.non_finite or self._locate_non_finite(
            model, self.reference_logits, self.text_reference_logits, "the fp32 reference (base + adapter)")
        self.raw_load = diagnose_raw_load(model, self.adapter_dir)
        del model
        release_memory()

    def _make_probes(self, model: torch.nn.Module, token_ids: list[int]) -> None:
        """A mixed probe (image rows, text rows embedded by each model under test, left padding) and a text-only
        probe fed as token ids, so an adapted input embedding acts in both; both hold the adapter's trainable
        tokens (``token_ids``), the only rows of the embedding they change."""
        embedding = model.get_input_embeddings()
        self.probe = make_probe(embedding, batch_size=2, seq_len=16, image_spans=[(4, 11)], left_padding=[0, 3],
                                seed=1234, feed="model-embeds", token_ids=token_ids)
        self.text_probe = make_probe(embedding, batch_size=2, seq_len=16, image_spans=[], left_padding=[0, 3],
                                     seed=1234, feed="input_ids", token_ids=token_ids)

    def _locate_non_finite(self, model, logits: torch.Tensor, text_logits: torch.Tensor, what: str) -> str | None:
        """None when both probes' outputs are finite; else the message naming the first module producing NaN/Inf."""
        for probe, out in ((self.probe, logits), (self.text_probe, text_logits)):
            if not finite_rows(out, probe):
                module = first_non_finite_module(model, probe, im_mask=self.uses_im_mask)
                return f"non-finite outputs (NaN/Inf) from {what}, " + _first_produced_by(module)
        return None

    def outcome(self, name: str) -> PathOutcome:
        """Run loading path ``name`` once; later calls return the stored outcome.

        ``peft``, ``peft-merged`` and ``merge-script`` share one load (``CHAINED_PATHS``): the unmerged model
        is measured, merged in place and measured, then saved and reloaded, as a merge script does. Same
        results as three separate loads, at a third of the loading, merging and memory traffic.
        """
        if name in self.outcomes:
            return self.outcomes[name]
        if name in CHAINED_PATHS and _chain_is_builtin():
            self._run_chain()
            return self.outcomes[name]
        outcome = PathOutcome(name)
        self.progress(f"loading path {name} ({str(self.dtype).replace('torch.', '')}, {self.device})")
        try:
            loaded = PATHS[name](self.base_dir, self.adapter_dir, dtype=self.dtype, device=self.device,
                                 workdir=self.workdir / name)
        except Exception as err:  # noqa: BLE001 - any failure of a path is its outcome, one line
            outcome.error = _one_line(err)
        else:
            self._measure(loaded, outcome)
            del loaded
            release_memory()
        self.outcomes[name] = outcome
        return outcome

    def _measure(self, loaded: LoadedModel, outcome: PathOutcome) -> None:
        outcome.record = loaded.record
        outcome.logits = probe_logits(loaded.model, self.probe, im_mask=self.uses_im_mask)
        if not finite_rows(outcome.logits, self.probe):
            outcome.non_finite = _first_produced_by(first_non_finite_module(loaded.model, self.probe,
                                                                            im_mask=self.uses_im_mask))
        outcome.comparison = compare(outcome.logits, self.reference_logits, self.probe, dtype=self.dtype,
                                     label=outcome.name, non_finite=outcome.non_finite,
                                     cause=self._tie_cause(loaded.model, outcome.name))
        if outcome.name in MERGED_PATHS:
            self._inspect_merged(loaded.model, outcome)

    def _run_chain(self) -> None:
        """peft -> merge in place (peft-merged) -> save + reload (merge-script); a failing step fails the rest."""
        steps = [
            ("peft", lambda _: PATHS["peft"](self.base_dir, self.adapter_dir, dtype=self.dtype, device=self.device,
                                             workdir=self.workdir / "peft", private=True)),
            ("peft-merged", lambda loaded: merge_loaded(loaded, "peft-merged")),
            ("merge-script", lambda loaded: save_and_reload(loaded, self.base_dir, dtype=self.dtype,
                                                            device=self.device, workdir=self.workdir / "merge-script")),
        ]
        loaded, error = None, None
        for name, step in steps:
            outcome = PathOutcome(name)
            self.progress(f"loading path {name} ({str(self.dtype).replace('torch.', '')}, {self.device})")
            if error is None:
                try:
                    loaded = step(loaded)
                except Exception as err:  # noqa: BLE001 - any failure of a path is its outcome, one line
                    error = _one_line(err)
                else:
                    self._measure(loaded, outcome)
            outcome.error = error if outcome.record is None else None
            self.outcomes[name] = outcome
        del loaded
        release_memory()

    def _inspect_merged(self, model: torch.nn.Module, outcome: PathOutcome) -> None:
        outcome.unmerged_wrappers = find_unmerged_lora_wrappers(model)
        params = dict(model.named_parameters())
        for name, before in self.base_plora.items():
            after = params.get(name)
            if after is None or after.shape != before.shape or not torch.equal(after.detach().cpu(), before.to(after.dtype)):
                outcome.plora_changed.append(name)
        modules = dict(model.named_modules())
        for name, class_name in self.base_classes.items():
            if name not in modules or type(modules[name]).__name__ != class_name:
                got = type(modules[name]).__name__ if name in modules else "missing"
                outcome.class_changes.append(f"{name}: {got} instead of {class_name}")

    def _tie_cause(self, model: torch.nn.Module, path: str) -> str | None:
        """Why a path differs when the adapter changes one side of a tied pair that is still tied in ``model``."""
        if not self.untied:
            return None
        from harness.model.peft_keys import strip_prefix

        tied = {strip_prefix(alias): strip_prefix(holder) for alias, holder in tied_parameters(model).items()}
        for changed, partner in self.untied.items():
            if tied.get(changed, changed) == tied.get(partner, partner):
                how = ("the reloaded merged checkpoint ties them (tie_word_embeddings is true)"
                       if path == "merge-script" else "merging into the shared weight changes both")
                return (f"{changed} is tied to {partner} (tied embeddings) and the adapter changes only {changed} "
                        f"(unmerged, PEFT leaves {partner} at the base), but {how}; untie them before merging "
                        "(tie_word_embeddings: false and a separate weight for each)")
        return None

    def close(self) -> None:
        self._workdir.cleanup()


def uninitialised_buffers(model: torch.nn.Module, expected: dict[str, torch.Tensor], base_dir: Path) -> str | None:
    """Why the loaded ``model`` cannot be trusted when buffers outside its checkpoint (non-persistent, e.g. RoPE
    tables) differ from what its own constructor computes: transformers 5 leaves such buffers uninitialised
    when it loads, and every output is then meaningless (NaN, or garbage that differs from load to load)."""
    import transformers

    buffers = dict(model.named_buffers())
    wrong = [name for name, want in expected.items() if name in buffers and (
        buffers[name].shape != want.shape or not torch.allclose(buffers[name].detach().float().cpu(), want,
                                                                 rtol=1e-5, atol=1e-6, equal_nan=False))]
    if not wrong:
        return None
    from harness.model.remote_code import buffer_definition

    where = buffer_definition(base_dir, wrong[0].rsplit(".", 1)[-1])
    return (f"the base model loads with {len(wrong)} buffer(s) not in its checkpoint left different from what its own "
            f"code computes (e.g. {wrong[0]}{f', registered at {where}' if where else ''}): transformers "
            f"{transformers.__version__} does not initialise non-persistent buffers on load, so every output is "
            "meaningless; load this model with transformers 4.x, or make those buffers persistent")


def _tied_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every tied parameter name -> its (shared) Parameter."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return {name: params[name] for pair in tied_parameters(model).items() for name in pair}


def _untied_by_adapter(model: torch.nn.Module, before: dict[str, torch.nn.Parameter]) -> dict[str, str]:
    """Tied pairs the reference split: the parameter the adapter changed (it got its own weight) -> the partner
    that kept the shared base weight, as in PEFT's unmerged model."""
    after = dict(model.named_parameters(remove_duplicate=False))
    kept = sorted(name for name in before if after.get(name) is before[name])
    split = {}
    for name, shared in before.items():
        partner = next((other for other in kept if before[other] is shared), None)
        if name not in kept and partner is not None:
            split[name] = partner
    return split


def _first_produced_by(module: str | None) -> str:
    return f"first produced by {module}" if module else "the module that first produces them was not located"


def _chain_is_builtin() -> bool:
    """The chain stands for the three registered paths only while they are the built-in ones (a test double or a
    user's own path registered under one of these names runs on its own)."""
    from harness.loading import paths

    builtin = {"peft": paths.load_peft, "peft-merged": paths.load_peft_merged, "merge-script": paths.load_merge_script}
    return all(PATHS[name] is func for name, func in builtin.items())


def _one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300]}" if str(err) else type(err).__name__
