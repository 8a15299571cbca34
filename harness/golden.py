"""Golden records: what an adapter did under the PEFT version that saved it, checked on any loading path.

The fp32 reference (``harness.reference``) says what an adapter *should* do, computed from its tensors.
A golden record says what it *did* for the people who saved it: outputs recorded under that PEFT
version's own forward, kept beside the adapter with a manifest (keys, shapes, dtypes, versions, a
checksum of the base weights). Loading the adapter later with another PEFT through every loading path
and comparing with the record catches key-format changes that drop tensors and forward changes between
versions, the way PEFT's own state-dict regression tests do. The manifest's ``expectations`` say, per
PEFT range and path, where a difference or a refusal is known, so nothing passes silently: a documented
difference must still be there, and a refusal must be loud (an exception, or keys the path reports).

Used by ``fixtures/golden/regenerate.py`` (which writes the records under several PEFT versions) and by
``tests/test_golden.py``; it works for any adapter whose base model takes ``inputs_embeds`` and ``im_mask``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .paths import ADAPTER_BIN, ADAPTER_CONFIG, ADAPTER_SAFETENSORS, LoadRecord, PathFn, read_adapter_tensors
from .probes import ProbeBatch, make_probe
from .reference import compare, policy_for

MANIFEST_NAME = "manifest.json"
GOLDEN_NAME = "golden.safetensors"
PROBES_NAME = "probes.safetensors"
FORMAT_VERSION = 1
OUTPUTS = ("image_text", "text_only", "vision_proj")
# Left out of the base checksum: transformers 5 names CLIPVisionModel's parameters without ``vision_model.``
# and the synthetic family seeds each tensor by its name, so the vision tower differs between transformers
# 4.x and 5.x. No golden output passes through it (the probes feed inputs_embeds and vision features).
DIGEST_EXCLUDES = ("vit.",)
UNMERGED_PATHS = ("peft", "load-adapter", "state-dict", "bin", "safetensors")
MERGED_PATHS = ("peft-merged", "peft-safe-merged", "merge-script")
# Paths that hand adapter_config.json to PEFT's own PeftConfig.from_pretrained (state-dict builds the
# LoraConfig through harness.targets.lora_config_from_dict, which keeps only the fields PEFT knows).
CONFIG_READING_PATHS = tuple(p for p in UNMERGED_PATHS + MERGED_PATHS if p != "state-dict")


# ---------------------------------------------------------------------------------------------
# Base weights, probes and outputs


def params_digest(model: torch.nn.Module, exclude: tuple[str, ...] = DIGEST_EXCLUDES) -> str:
    """sha256 over each parameter's name, dtype, shape and bytes: proves a rebuilt base is bit-identical."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if name.startswith(exclude):
            continue
        tensor = param.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class GoldenProbes:
    """The inputs every golden output is recorded on (stored once, so a change in ``make_probe`` cannot drift them)."""

    image_text: ProbeBatch  # image rows (im_mask True), text rows and left padding
    text_only: ProbeBatch  # no image rows: PLoRA's branch is off everywhere
    vision_features: torch.Tensor | None = None  # vision-tower-shaped features for vision_proj (modules_to_save)


def make_probes(model: torch.nn.Module) -> GoldenProbes:
    """Deterministic probes for ``model``; ``vision_features`` only when it has a ``vision_proj`` module."""
    embedding = model.get_input_embeddings()
    image_text = make_probe(embedding, batch_size=2, seq_len=10, image_spans=[(2, 6)], left_padding=[0, 2], seed=7)
    text_only = make_probe(embedding, batch_size=2, seq_len=10, image_spans=[], left_padding=[0, 2], seed=11)
    features = None
    projector = getattr(model, "vision_proj", None)
    first = next((m for m in projector.modules() if isinstance(m, torch.nn.Linear)), None) if projector else None
    if first is not None:
        gen = torch.Generator().manual_seed(13)
        features = torch.randn(1, 6, first.in_features, generator=gen)
    return GoldenProbes(image_text, text_only, features)


def save_probes(probes: GoldenProbes, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name in ("image_text", "text_only"):
        batch: ProbeBatch = getattr(probes, name)
        for part in ("input_ids", "inputs_embeds", "im_mask", "attention_mask"):
            tensors[f"{name}.{part}"] = getattr(batch, part).detach().cpu().contiguous()
    if probes.vision_features is not None:
        tensors["vision_features"] = probes.vision_features.contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})  # one key: safetensors orders metadata by hash


def load_probes(path: Path) -> GoldenProbes:
    from safetensors.torch import load_file

    tensors = load_file(str(path))

    def batch(name: str) -> ProbeBatch:
        parts = {p: tensors[f"{name}.{p}"] for p in ("input_ids", "inputs_embeds", "im_mask", "attention_mask")}
        return ProbeBatch(**parts, description=f"golden {name}")

    return GoldenProbes(batch("image_text"), batch("text_only"), tensors.get("vision_features"))


def _inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PeftModel (LoRA layers injected), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def golden_outputs(model: torch.nn.Module, probes: GoldenProbes) -> dict[str, torch.Tensor]:
    """fp32 CPU outputs on the golden probes: logits with and without image rows, and vision_proj's.

    ``vision_proj`` is where ``modules_to_save`` acts on XComposer; the logits probes feed inputs_embeds
    and never reach it.
    """
    from .reference import probe_logits

    outputs = {"image_text": probe_logits(model, probes.image_text),
               "text_only": probe_logits(model, probes.text_only)}
    inner = _inner_model(model)
    projector = getattr(inner, "vision_proj", None)
    if probes.vision_features is not None and projector is not None:
        param = next(projector.parameters())
        outputs["vision_proj"] = projector(probes.vision_features.to(param.device, param.dtype)).float().cpu()
    return outputs


@dataclass
class OutputDiff:
    """One recorded output against what a path produced now."""

    name: str
    max_abs: float
    max_rel: float
    tolerance: float
    ok: bool
    summary: str


def compare_outputs(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], probes: GoldenProbes, *,
                    dtype: torch.dtype = torch.float32) -> dict[str, OutputDiff]:
    """Each recorded output against ``got`` with the harness tolerance for ``dtype`` (relative to the output scale)."""
    policy = policy_for(dtype)
    diffs = {}
    for name, reference in want.items():
        if name not in got:
            diffs[name] = OutputDiff(name, float("inf"), float("inf"), policy.rel, False, f"{name}: not produced")
            continue
        if got[name].shape != reference.shape:
            diffs[name] = OutputDiff(name, float("inf"), float("inf"), policy.rel, False,
                                     f"{name}: shape {tuple(got[name].shape)} != recorded {tuple(reference.shape)}")
            continue
        if name in ("image_text", "text_only"):
            result = compare(got[name], reference, getattr(probes, name), dtype=dtype, label=name)
            max_abs = max(result.image_max_abs, result.text_max_abs)
            max_rel = max(result.image_max_rel, result.text_max_rel)
            diffs[name] = OutputDiff(name, max_abs, max_rel, policy.rel, result.ok, result.summary())
        else:
            err = float(torch.nan_to_num((got[name].float() - reference.float()).abs(), nan=float("inf")).max())
            scale = float(reference.float().abs().max().clamp_min(1e-12))
            ok = err <= max(policy.atol, policy.rel * scale)
            verdict = "within" if ok else "OUTSIDE"
            diffs[name] = OutputDiff(name, err, err / scale, policy.rel, ok,
                                     f"{name}: max abs {err:.2e} (rel {err / scale:.2e}); {verdict} the "
                                     f"{str(dtype).replace('torch.', '')} tolerance {policy.rel:.0e}")
    return diffs


# ---------------------------------------------------------------------------------------------
# Adapter inventory


def tensor_inventory(adapter_dir: Path) -> dict[str, dict]:
    """Key -> {shape, dtype} of the adapter's weights file (safetensors first; .bin only weights_only)."""
    return {key: {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
            for key, value in sorted(read_adapter_tensors(Path(adapter_dir)).items())}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def adapter_files(adapter_dir: Path) -> list[str]:
    """The adapter's own files (config and weights), in the order PEFT would look for them."""
    return [n for n in (ADAPTER_CONFIG, ADAPTER_SAFETENSORS, ADAPTER_BIN) if (Path(adapter_dir) / n).is_file()]


def key_suffixes(keys: list[str]) -> list[str]:
    """The key grammar an adapter uses, module names removed (e.g. ``lora_magnitude_vector`` vs ``...vector.weight``)."""
    suffixes = set()
    for key in keys:
        found = re.search(r"\.((?:lora_|modules_to_save)\S*)$", key)
        plain = re.sub(r"\blayers\.\d+\.", "layers.N.", key.removeprefix("base_model.model."))
        suffixes.add(found.group(1) if found else f"(full tensor) {plain}")
    return sorted(suffixes)


# ---------------------------------------------------------------------------------------------
# Expectations and verdicts


@dataclass(frozen=True)
class Expectation:
    """What a path should do with a golden adapter under a range of PEFT versions.

    ``outcome``: ``match`` (every recorded output within tolerance, clean load), ``differs`` (a documented
    forward difference: outputs in ``match`` still agree, at least one other must not, so the entry
    fails once PEFT changes back) or ``refused`` (the load raises, or the path reports missing /
    unexpected / not-loaded keys, matching the regex ``error``). ``condition`` ``unknown-config-fields``
    applies the entry only when adapter_config.json has fields the installed LoraConfig lacks.
    """

    outcome: str = "match"
    peft: str = ""  # PEP 440 specifier on the installed peft version; "" is any
    paths: tuple[str, ...] | str = "*"
    match: tuple[str, ...] = ()
    error: str = ""
    condition: str = ""
    why: str = ""

    @classmethod
    def from_dict(cls, data: dict) -> "Expectation":
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
        return cls(**data)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if v not in ("", ())}

    def applies(self, path: str, peft_version: str, unknown_fields: list[str]) -> bool:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        if self.paths != "*" and path not in self.paths:
            return False
        if self.peft and Version(peft_version) not in SpecifierSet(self.peft):
            return False
        if self.condition == "unknown-config-fields":
            return bool(unknown_fields)
        return not self.condition


def installed_lora_fields() -> set[str]:
    from peft import LoraConfig

    return {f.name for f in dataclasses.fields(LoraConfig)}


@dataclass
class GoldenAdapter:
    """A golden adapter directory: the adapter files, its manifest and the recorded outputs."""

    name: str
    dir: Path
    manifest: dict
    outputs: dict[str, torch.Tensor]

    @property
    def saved_with(self) -> dict:
        return self.manifest["saved_with"]

    @property
    def config(self) -> dict:
        return json.loads((self.dir / ADAPTER_CONFIG).read_text())

    def unknown_config_fields(self) -> list[str]:
        return sorted(set(self.config) - installed_lora_fields())

    def expectation(self, path: str, peft_version: str | None = None) -> Expectation:
        """The first manifest entry that applies to ``path`` under ``peft_version`` (installed), else ``match``."""
        import peft

        version = peft_version or peft.__version__
        unknown = self.unknown_config_fields()
        for entry in self.manifest.get("expectations", []):
            expectation = Expectation.from_dict(entry)
            if expectation.applies(path, version, unknown):
                return expectation
        return Expectation()


def load_golden(adapter_dir: Path) -> GoldenAdapter:
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    manifest = json.loads((adapter_dir / MANIFEST_NAME).read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{adapter_dir / MANIFEST_NAME}: format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
    return GoldenAdapter(manifest["name"], adapter_dir, manifest, load_file(str(adapter_dir / GOLDEN_NAME)))


def discover(root: Path) -> list[GoldenAdapter]:
    """Every golden adapter directory under ``root`` (one holding a manifest), sorted by name."""
    return [load_golden(p.parent) for p in sorted(Path(root).glob(f"*/{MANIFEST_NAME}"))]


@dataclass
class GoldenVerdict:
    """One golden adapter through one loading path under the installed PEFT, against its record."""

    adapter: str
    path: str
    peft_version: str
    saved_by: str
    expectation: Expectation
    status: str  # "match", "known-difference", "refused" (all as documented) or "FAIL"
    diffs: dict[str, OutputDiff] = field(default_factory=dict)
    record: LoadRecord | None = None
    error: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status != "FAIL"

    @property
    def max_abs(self) -> float:
        return max((d.max_abs for d in self.diffs.values()), default=float("nan"))

    def message(self) -> str:
        """Names the adapter, the path and both PEFT versions; the max abs error of every output."""
        head = (f"golden adapter {self.adapter} (saved by peft {self.saved_by}) via loading path {self.path} "
                f"under peft {self.peft_version}: ")
        head += {"match": "matches its recorded outputs",
                 "known-difference": f"differs as documented ({self.expectation.why})",
                 "refused": f"refused as documented ({self.expectation.why}): {self.error}",
                 }.get(self.status, "DOES NOT behave as recorded (expected " + self.expectation.outcome + ")")
        if self.diffs:
            head += f"; max abs err {self.max_abs:.2e}"
        lines = [head] + [f"  - {p}" for p in self.problems] + [f"  {d.summary}" for d in self.diffs.values()]
        return "\n".join(lines)


def _key_problems(record: LoadRecord) -> list[str]:
    problems = []
    for label, keys in (("missing", record.missing_keys), ("unexpected", record.unexpected_keys),
                        ("not loaded", record.not_loaded)):
        if keys:
            problems.append(f"{len(keys)} {label} adapter keys, e.g. {keys[0]}")
    return problems


def check_path(golden: GoldenAdapter, path_name: str, path_fn: PathFn, base_dir: Path, workdir: Path,
               probes: GoldenProbes, *, peft_version: str | None = None) -> GoldenVerdict:
    """Load ``golden`` through ``path_fn`` (fp32, CPU), run the probes and judge it against the manifest."""
    import peft

    version = peft_version or peft.__version__
    expectation = golden.expectation(path_name, version)
    verdict = GoldenVerdict(golden.name, path_name, version, golden.saved_with["peft"], expectation, "FAIL")
    try:
        loaded = path_fn(Path(base_dir), golden.dir, dtype=torch.float32, device="cpu", workdir=Path(workdir))
    except Exception as err:  # noqa: BLE001  (a refusal is an outcome here, judged against the manifest)
        verdict.error = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        if expectation.condition == "unknown-config-fields":
            verdict.error += f" (fields this PEFT lacks: {', '.join(golden.unknown_config_fields())})"
        if expectation.outcome == "refused" and re.search(expectation.error, verdict.error):
            verdict.status = "refused"
        else:
            verdict.problems.append(f"the load raised {verdict.error}")
        return verdict
    verdict.record = loaded.record
    try:
        verdict.diffs = compare_outputs(golden_outputs(loaded.model, probes), golden.outputs, probes)
    finally:
        del loaded
    keys = _key_problems(verdict.record)
    mismatched = [name for name, diff in verdict.diffs.items() if not diff.ok]
    if expectation.outcome == "refused":
        reported = " ".join(verdict.record.missing_keys + verdict.record.unexpected_keys + verdict.record.not_loaded)
        if keys and re.search(expectation.error, reported):
            verdict.status, verdict.error = "refused", "the path reports " + "; ".join(keys)
        elif not keys and not mismatched:
            verdict.problems.append("documented as refused, but it loads cleanly and matches: update the manifest")
        else:
            verdict.problems.append("documented as refused, but nothing reports it: "
                                    + ("; ".join(keys) if keys else "clean load, different outputs (SILENT)"))
        return verdict
    verdict.problems.extend(keys)
    if expectation.outcome == "differs":
        must_match = [n for n in mismatched if n in expectation.match]
        if must_match:
            verdict.problems.append(f"outputs documented to match differ: {', '.join(must_match)}")
        if not [n for n in mismatched if n not in expectation.match]:
            verdict.problems.append("the documented difference is gone (every output matches): update the manifest")
        if not verdict.problems:
            verdict.status = "known-difference"
        return verdict
    if mismatched:
        verdict.problems.append(f"outputs outside tolerance: {', '.join(mismatched)}")
    if not verdict.problems:
        verdict.status = "match"
    return verdict
