"""One dynamic run: load the base and the adapter through every path, once each, against one reference.

The expensive work (model loads, forward passes) happens here, lazily and at most
once per path; the checks in ``harness.checks.dynamic`` only read the outcomes.
Each loaded model is reduced to the facts the checks need and freed straight away, so
one model is alive at a time (the fp32 reference is reduced to its logits before any path
loads); paths that share a load (``peft`` -> ``peft-merged`` -> ``merge-script``) run as one chain
(``harness.loading.paths.chain_of``, ``_run_chain``).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness import worklog
from harness.inputs.adapter_dir import read_adapter_tensors
from harness.inputs.errors import UnusableInput
from harness.inputs.files import read_json_object
from harness.loading.base import load_base, note_adjustment
from harness.loading.memory import keep_large_frees_returnable, release_memory
from harness.loading.paths import PATHS, LoadingPath, chain_of
from harness.loading.raw_load import RawLoadDiagnosis, diagnose_raw_load
from harness.loading.records import LoadedModel, LoadRecord, find_unmerged_lora_wrappers
from harness.model import families
from harness.model.structure import stored_dtype, tied_parameters
from harness.numerics.compare import Comparison, compare, finite_rows
from harness.numerics.probes import ProbeBatch, make_probe, mask_kwarg, reached_modules
from harness.numerics.reference import ReferenceFold, first_non_finite_module, probe_logits, trained_token_ids
from harness.numerics.streamed import StreamedFp32, run_streamed
from harness.numerics.tolerances import band, policy_for, tolerance_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    """Reference, probe and per-path outcomes for one (base, adapter, dtype, device).

    ``dtype`` None: the dtype the checkpoint is stored in (what users load; ``stored_dtype``). The base is loaded
    once in that dtype; the fp32 reference and the fp32 base outputs are computed on it layer by layer
    (``harness.numerics.streamed``), and the base's own outputs in the check dtype against its fp32 ones measure
    the dtype's noise on this model, which calibrates every tolerance (``tolerances.band``).
    """

    def __init__(self, base_dir: Path, adapter_dir: Path, *, dtype: str | None, device: str, progress=None,
                 init_buffers: dict[str, torch.Tensor] | None = None) -> None:
        self.base_dir, self.adapter_dir, self.device = Path(base_dir), Path(adapter_dir), device
        self.dtype = DTYPES[dtype or stored_dtype(self.base_dir) or "float32"]
        self.progress = progress or (lambda text: None)
        self._workdir = tempfile.TemporaryDirectory(prefix="plora-harness-")
        self.workdir = Path(self._workdir.name)
        self.outcomes: dict[str, PathOutcome] = {}
        self.load_error: str | None = None
        self.probe: ProbeBatch | None = None
        self.mask: str | None = None  # the keyword that marks image rows (the family's), when the forward takes it
        self.family: families.ModelFamily = families.GENERIC  # the base model's (detected)
        self.base_logits = self.reference_logits = None
        self.base_dtype_logits = None  # the base run in the check dtype (its gap to base_logits is the noise)
        self.text_probe: ProbeBatch | None = None  # the same tokens with no image rows at all
        self.text_base_logits = self.text_reference_logits = None
        self.raw_load: RawLoadDiagnosis | None = None
        self.non_finite: str | None = None  # NaN/Inf in the base's or the reference's outputs: where they come from
        self.unreached: list[str] = []  # adapted modules no probe runs through
        self.untied: dict[str, str] = {}  # parameter the adapter changes -> the tied partner PEFT leaves at the base
        self.base_plora: dict[str, tuple] = {}  # PLoRA parameter -> (shape, dtype, digest) of its base value
        self.base_classes: dict[str, str] = {}
        self.noise: dict[str, float] = {"image": 0.0, "text": 0.0}  # the dtype's own relative error on this model
        self.effect: dict[str, float] = {"image": 0.0, "text": 0.0}  # the adapter's relative effect (fp32)
        self.bands: dict[str, float] = {}  # the rel tolerance per row class, from noise and effect (band())
        self.reference_mode = "streamed"  # how the fp32 reference ran (numerics.streamed.MODES)
        self.reference_peak_bytes = 0  # the most fp32 bytes the streamed reference held beside the model
        self.init_buffers = init_buffers or {}  # what the model's own constructor computes (BaseModelInfo)
        self.notes: list[str] = []  # what the reference could not apply or the probes could not reach
        self._pristine: torch.nn.Module | None = None  # the base the reference ran on, until the peft path takes it
        self._prepare()
        for note in self.notes:  # into the report of the check that started this run
            note_adjustment(note)

    @property
    def tolerance(self) -> float:
        """The largest of the per-row-class bands (the table's floor before the run is prepared)."""
        return max(self.bands.values()) if self.bands else tolerance_for(self.dtype)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def basis(self) -> str:
        """How the bands were calibrated, for messages."""
        policy = policy_for(self.dtype)
        return (f"max of the table's {policy.rel:.0e}, {policy.noise_factor:g}x the {self.dtype_name} noise of this "
                f"model (image {self.noise['image']:.1e}, text {self.noise['text']:.1e})"
                + (f" and {policy.effect_share:g}x the adapter's effect" if policy.effect_share else ""))

    def _prepare(self) -> None:
        keep_large_frees_returnable()
        self.progress(f"loading the base model in {self.dtype_name} (the fp32 reference runs on it layer by layer)")
        try:
            with worklog.shared("base.load", f"loading the base model ({self.dtype_name}, {self.device})"):
                model = load_base(self.base_dir, dtype=self.dtype, device=self.device, private=True)  # merged later
        except UnusableInput:
            raise  # the model code needs the network: the run stops with its one line
        except Exception as err:  # remote code that crashes: one line, not a traceback, naming file and line
            from harness.model.remote_code import explain_load_error

            self.load_error = explain_load_error(err, self.base_dir)
            return
        self.load_error = uninitialised_buffers(model, self.init_buffers, self.base_dir,
                                                dtypes=(self.dtype, DTYPES.get(stored_dtype(self.base_dir) or "")))
        if self.load_error:
            return
        self.family = families.family_of(model)
        self.mask = mask_kwarg(model)
        self.base_classes = {n: type(m).__name__ for n, m in model.named_modules() if self.family.is_branch_module(m)}
        self.base_plora = {n: _fingerprint(p) for n, p in model.named_parameters() if self.family.is_branch_param(n)}
        config = read_json_object(self.adapter_dir / "adapter_config.json")
        tensors = read_adapter_tensors(self.adapter_dir)
        self._make_probes(model, trained_token_ids(model, config, tensors))
        fold = ReferenceFold(model, config, tensors)
        self.notes.extend(f"reference: {line}" for line in fold.notes)
        self.untied = _untied_by(model, fold)
        self.progress("running the fp32 reference layer by layer")
        self.base_dtype_logits = probe_logits(model, self.probe, mask=self.mask)
        # an fp32 model whose buffers are its constructor's: the streamed base run is this very computation
        same = self.dtype == torch.float32 and _buffers_as_constructed(model, self.init_buffers)
        self.base_logits = self.base_dtype_logits if same else self._streamed(model, self.probe, None)
        self.text_base_logits = self._streamed(model, self.text_probe, None)
        self.non_finite = self._locate_non_finite(model, self.base_logits, self.text_base_logits,
                                                  "the base model itself", None)
        modules = dict(model.named_modules())
        adapted = sorted({name if name in modules else name.rsplit(".", 1)[0] for name in fold.changed})
        del modules
        with reached_modules(model, adapted) as reached:
            self.reference_logits = self._streamed(model, self.probe, fold)
            self.text_reference_logits = self._streamed(model, self.text_probe, fold)
        self.unreached = [name for name in adapted if name not in reached]
        if self.unreached:
            self.notes.append(f"probes: {len(self.unreached)} adapted module(s) never run on the probes (e.g. "
                              f"{self.unreached[0]}): their effect is not measured (probes feed token ids and "
                              "embeddings, not images through a vision tower)")
        self.non_finite = self.non_finite or self._locate_non_finite(
            model, self.reference_logits, self.text_reference_logits, "the fp32 reference (base + adapter)", fold)
        self._calibrate()
        self.raw_load = diagnose_raw_load(model, self.adapter_dir)
        self._pristine = model  # untouched (every swap was put back): the peft path's base, one load saved
        del tensors, fold, model
        release_memory()

    def release_pristine(self) -> None:
        """Free the base kept for the peft path (before another model loads: one model alive at a time)."""
        if self._pristine is not None:
            self._pristine = None
            release_memory()

    def _take_pristine(self) -> torch.nn.Module | None:
        model, self._pristine = self._pristine, None
        return model

    def _streamed(self, model: torch.nn.Module, probe: ProbeBatch, fold: ReferenceFold | None) -> torch.Tensor:
        """fp32 logits of ``model`` (+ ``fold``) on ``probe``, one layer's fp32 weights at a time."""
        logits, stream = run_streamed(
            model, lambda: probe_logits(model, probe, mask=self.mask, dtype=torch.float32),
            fold=fold, buffers=self.init_buffers, mode=self.reference_mode)
        if stream.mode != self.reference_mode:
            self.reference_mode = stream.mode
            self.notes.append(f"reference: the model's code reads weights outside the module that owns them, so the "
                              f"fp32 reference ran {stream.mode} (more memory than one layer at a time)")
        self.reference_peak_bytes = max(self.reference_peak_bytes, stream.peak_extra_bytes)
        return logits

    def _calibrate(self) -> None:
        """The dtype's own noise on this model (the base in the check dtype against its fp32 run) and the adapter's
        effect, per row class of the mixed probe; from them the band each path must stay in."""
        if self.non_finite:
            self.bands = {row: band(self.dtype) for row in ("image", "text")}
            return
        noise = compare(self.base_dtype_logits, self.base_logits, self.probe, dtype=self.dtype, label="noise")
        effect = compare(self.reference_logits, self.base_logits, self.probe, dtype=torch.float32, label="effect")
        self.noise = {"image": noise.image_max_rel, "text": noise.text_max_rel}
        self.effect = {"image": effect.image_max_rel, "text": effect.text_max_rel}
        self.bands = {row: band(self.dtype, noise=self.noise[row], effect=self.effect[row])
                      for row in ("image", "text")}

    def _make_probes(self, model: torch.nn.Module, token_ids: list[int]) -> None:
        """A mixed probe (image rows, text rows embedded by each model under test, left padding) and a text-only
        probe fed as token ids, so an adapted input embedding acts in both; both hold the adapter's trainable
        tokens (``token_ids``), the only rows of the embedding they change."""
        embedding = model.get_input_embeddings()
        self.probe = make_probe(embedding, batch_size=2, seq_len=16, image_spans=[(4, 11)], left_padding=[0, 3],
                                seed=1234, feed="model-embeds", token_ids=token_ids)
        self.text_probe = make_probe(embedding, batch_size=2, seq_len=16, image_spans=[], left_padding=[0, 3],
                                     seed=1234, feed="input_ids", token_ids=token_ids)

    def _locate_non_finite(self, model, logits: torch.Tensor, text_logits: torch.Tensor, what: str,
                           fold: ReferenceFold | None) -> str | None:
        """None when both probes' outputs are finite; else the message naming the first module producing NaN/Inf
        (located in the same fp32 run that produced them)."""
        for probe, out in ((self.probe, logits), (self.text_probe, text_logits)):
            if not finite_rows(out, probe):
                stream = StreamedFp32(model, fold=fold, buffers=self.init_buffers, mode=self.reference_mode)
                with stream.active():
                    module = first_non_finite_module(model, probe, mask=self.mask, dtype=torch.float32)
                return f"non-finite outputs (NaN/Inf) from {what}, " + _first_produced_by(module)
        return None

    def outcome(self, name: str) -> PathOutcome:
        """``_outcome(name)``, timed as shared work (``harness.worklog``): a path's load and measurement are the
        time of every check that reads it, not of the one that happened to need it first."""
        chain = [path.name for path in chain_of(name)]
        key = "paths.chain" if chain else f"path.{name}"
        if name in self.outcomes:
            worklog.used(key)
            return self.outcomes[name]
        what = f"loading paths {', '.join(chain)} (one load)" if chain else f"loading path {name}"
        with worklog.shared(key, f"{what}, run on the probes"):
            return self._outcome(name)

    def _outcome(self, name: str) -> PathOutcome:
        """Run loading path ``name`` once; later calls return the stored outcome.

        Paths that share one load (``chain_of``: ``peft`` -> ``peft-merged`` -> ``merge-script``) run together:
        the unmerged model is measured, merged in place and measured, then saved and reloaded, as a merge script
        does. Same results as three separate loads, at a third of the loading, merging and memory traffic.
        """
        if name in self.outcomes:
            return self.outcomes[name]
        if chain := chain_of(name):
            self._run_chain(chain)
            return self.outcomes[name]
        outcome = PathOutcome(name)
        self.release_pristine()
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
        outcome.logits = probe_logits(loaded.model, self.probe, mask=self.mask)
        if not finite_rows(outcome.logits, self.probe):
            outcome.non_finite = _first_produced_by(first_non_finite_module(loaded.model, self.probe,
                                                                            mask=self.mask))
        outcome.comparison = compare(outcome.logits, self.reference_logits, self.probe, dtype=self.dtype,
                                     label=outcome.name, non_finite=outcome.non_finite,
                                     cause=self._tie_cause(loaded.model, outcome.name), tolerance=self.bands,
                                     basis=self.basis)
        if PATHS[outcome.name].merges:
            self._inspect_merged(loaded.model, outcome)

    def _run_chain(self, chain: list[LoadingPath]) -> None:
        """The root loads (on the kept base, weights private: merged next), each later path continues the model
        the one before it left (e.g. peft -> merge in place -> save + reload); a failing step fails the rest."""
        loaded, error = None, None
        for path in chain:
            name = path.name
            outcome = PathOutcome(name)
            self.progress(f"loading path {name} ({str(self.dtype).replace('torch.', '')}, {self.device})")
            if error is None:
                try:
                    if loaded is None:
                        loaded = path(self.base_dir, self.adapter_dir, dtype=self.dtype, device=self.device,
                                      workdir=self.workdir / name, private=True, base=self._take_pristine())
                    else:
                        loaded = path.then(loaded, base_dir=self.base_dir, dtype=self.dtype, device=self.device,
                                           workdir=self.workdir / name)
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
            if after is None or _fingerprint(after) != before:
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
                       if PATHS[path].saves_and_reloads else "merging into the shared weight changes both")
                return (f"{changed} is tied to {partner} (tied embeddings) and the adapter changes only {changed} "
                        f"(unmerged, PEFT leaves {partner} at the base), but {how}; untie them before merging "
                        "(tie_word_embeddings: false and a separate weight for each)")
        return None

    def close(self) -> None:
        self.release_pristine()
        self._workdir.cleanup()


def uninitialised_buffers(model: torch.nn.Module, expected: dict[str, torch.Tensor], base_dir: Path,
                          dtypes: tuple[torch.dtype | None, ...] = ()) -> str | None:
    """Why the loaded ``model`` cannot be trusted when buffers outside its checkpoint (non-persistent, e.g. RoPE
    tables) differ from what its own constructor computes: transformers 5 leaves such buffers uninitialised
    when it loads, and every output is then meaningless (NaN, or garbage that differs from load to load).

    The constructor's values are fp32; model code computes such tables in the dtype it is loaded in (the real
    IXC2.5 code does), so a buffer holding their rounding to its own dtype, the checkpoint's or the check dtype
    (``dtypes``), within that dtype's rounding, is what its code computes, not uninitialised."""
    import transformers

    buffers = dict(model.named_buffers())
    wrong = [name for name, want in expected.items() if name in buffers
             and not _computed_as(buffers[name].detach().cpu(), want, dtypes)]
    if not wrong:
        return None
    from harness.model.remote_code import buffer_definition

    where = buffer_definition(base_dir, wrong[0].rsplit(".", 1)[-1])
    return (f"the base model loads with {len(wrong)} buffer(s) not in its checkpoint left different from what its own "
            f"code computes (e.g. {wrong[0]}{f', registered at {where}' if where else ''}): transformers "
            f"{transformers.__version__} does not initialise non-persistent buffers on load, so every output is "
            "meaningless; load this model with transformers 4.x, or make those buffers persistent")


def _buffers_as_constructed(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    """Every buffer the streamed reference would replace by its constructor value already holds exactly that."""
    buffers = dict(model.named_buffers())
    return all(name not in buffers or buffers[name].shape != want.shape
               or torch.equal(buffers[name].detach().cpu(), want.to(buffers[name].dtype)) for name, want in expected.items())


def _computed_as(got: torch.Tensor, want: torch.Tensor, dtypes: tuple[torch.dtype | None, ...]) -> bool:
    """``got`` is ``want`` as computed in fp32 or rounded to one of ``dtypes`` (within that dtype's rounding)."""
    if got.shape != want.shape:
        return False
    got = got.float()
    for dtype in dict.fromkeys((torch.float32, got.dtype, *[d for d in dtypes if d is not None])):
        rounded = want.to(dtype).float()
        rtol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
        if torch.allclose(got, rounded, rtol=rtol, atol=1e-6, equal_nan=False):
            return True
    return False


def _fingerprint(param: torch.Tensor) -> tuple:
    """(shape, dtype, digest) of a tensor's bytes: "bit-identical after merging" without keeping a copy (PLoRA is
    ~7% of a 7B XComposer)."""
    data = param.detach().cpu().contiguous()
    raw = memoryview(data.reshape(-1).view(torch.uint8).numpy()) if data.numel() else b""
    return tuple(data.shape), str(data.dtype), hashlib.sha256(raw).hexdigest()  # read in place; SHA-NI: ~2x blake2b


def _untied_by(model: torch.nn.Module, fold: ReferenceFold) -> dict[str, str]:
    """Tied pairs the reference splits: the parameter the adapter changes (a LoRA on it or a ``modules_to_save``
    copy gives it its own weight) -> the partner that keeps the shared base weight, as in PEFT's unmerged model.
    Trainable token rows and loaded embedding layers change the shared weight for both, so they split nothing."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    changed = {lora.weight for lora in fold.lora} | {c.param for c in fold.copies if c.role == "modules_to_save"}
    split = {}
    for names in groups.values():
        kept = [name for name in names if name not in changed]
        if len(names) > 1 and kept:
            split.update({name: kept[0] for name in names if name in changed})
    return split


def _first_produced_by(module: str | None) -> str:
    return f"first produced by {module}" if module else "the module that first produces them was not located"


def _one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300]}" if str(err) else type(err).__name__
