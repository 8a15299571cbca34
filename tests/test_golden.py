"""Golden adapters: tiny adapters saved by several PEFT versions, loaded now through every path.

Each directory under ``fixtures/golden/`` holds an adapter written by one PEFT version's
``save_pretrained``, the outputs that version produced with it, and a manifest (keys, shapes, dtypes,
versions, base checksum, expectations per PEFT range and path). The base model is not committed: it is
rebuilt here from the manifest's spec and must reproduce the recorded checksum. Every golden adapter
goes through every loading path of ``harness.loading.paths.PATHS`` under the installed PEFT and is judged by
``fixtures.golden_adapters.check_path``: a match within the fp32 tolerance, a documented difference that is still
there, or a documented refusal that is loud (then the test skips with that reason). Regenerate with
``python fixtures/golden/regenerate.py`` (fixtures/golden/README.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from packaging.version import Version

from fixtures.golden_adapters import (
    GOLDEN_NAME,
    MANIFEST_NAME,
    PROBES_NAME,
    Expectation,
    GoldenAdapter,
    GoldenVerdict,
    check_path,
    compare_outputs,
    discover,
    file_sha256,
    key_suffixes,
    load_probes,
    params_digest,
    tensor_inventory,
)
from harness.inputs.adapter_dir import read_adapter_tensors
from harness.loading.paths import PATHS, UNAVAILABLE
from harness.loading.records import LoadedModel
from harness.synthetic.export import export_model
from harness.synthetic.family import Dims, build_model

torch.set_num_threads(1)

GOLDEN_ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "golden"
GOLDEN = {g.name: g for g in discover(GOLDEN_ROOT)}
# Loadable with every PEFT the project supports (0.7+): the subject of the test doubles.
DOUBLE_SUBJECT = "peft-0.8.2-lora"


@pytest.fixture(scope="session")
def golden_probes():
    return load_probes(GOLDEN_ROOT / PROBES_NAME)


@pytest.fixture(scope="session")
def golden_base(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The base every golden adapter was recorded on, rebuilt from the manifests' (single) spec and exported."""
    specs = {json.dumps(g.manifest["base"], sort_keys=True) for g in GOLDEN.values()}
    assert len(specs) == 1, f"golden adapters disagree on their base: {sorted(specs)}"
    spec = json.loads(specs.pop())
    model = build_model(spec["variant"], Dims(**spec["dims"]), seed=spec["seed"])
    digest = params_digest(model, tuple(spec.get("digest_excludes", ())))
    out = tmp_path_factory.mktemp("golden") / "golden_base"  # no '.' in the name: transformers 4.33 remote code
    export_model(model, out)
    problem = None
    if digest != spec["params_sha256"]:
        problem = (f"the synthetic base rebuilt from the golden manifests ({spec['variant']}, seed {spec['seed']}) "
                   f"has parameter checksum {digest[:16]}…, the golden adapters were recorded on "
                   f"{spec['params_sha256'][:16]}…: harness.synthetic changed its weights or names. If intended, "
                   f"regenerate them: python fixtures/golden/regenerate.py")
    return {"dir": out, "spec": spec, "digest": digest, "problem": problem}


def assert_as_recorded(verdict: GoldenVerdict) -> None:
    """The golden assertion every path test makes (and the test doubles must trip)."""
    assert verdict.ok, verdict.message()


def run_path(golden: GoldenAdapter, path_name: str, path_fn: Callable, golden_base: dict, probes,
             workdir: Path) -> GoldenVerdict:
    if golden_base["problem"]:
        pytest.fail(golden_base["problem"])
    return check_path(golden, path_name, path_fn, golden_base["dir"], workdir, probes)


# ---------------------------------------------------------------------------------------------
# The set itself


def test_golden_set_covers_the_key_format_eras() -> None:
    saved_by = {g.saved_with["peft"] for g in GOLDEN.values()}
    assert {"0.8.2", "0.21.2"} <= saved_by, "the oldest and the current CI stacks' PEFT must have written goldens"
    kinds = {(g.manifest["kind"], g.saved_with["peft"]) for g in GOLDEN.values()}
    dora = sorted(Version(v) for k, v in kinds if k == "dora")
    assert dora and dora[0] < Version("0.12") <= dora[-1], "DoRA from the ParameterDict era and after it"
    assert dora[0] < Version("0.14") <= dora[-1], "DoRA recorded before and after its forward changed in 0.14"
    files = {name for g in GOLDEN.values() for name in g.manifest["files"]}
    assert {"adapter_model.bin", "adapter_model.safetensors"} <= files
    configs = [g.config for g in GOLDEN.values()]
    assert any(c.get("modules_to_save") for c in configs)
    assert any(c.get("rank_pattern") and c.get("alpha_pattern") for c in configs)
    assert any(c.get("use_rslora") for c in configs)
    total = sum(p.stat().st_size for p in GOLDEN_ROOT.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total < 2 * 1024 * 1024, f"fixtures/golden holds {total / 1024:.0f} KiB"


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_manifest_matches_the_files(name: str) -> None:
    golden = GOLDEN[name]
    manifest = golden.manifest
    assert manifest["name"] == name == golden.dir.name
    assert name.startswith(f"peft-{manifest['saved_with']['peft']}-")
    for file, meta in manifest["files"].items():
        path = golden.dir / file
        assert path.stat().st_size == meta["size"], f"{name}/{file}: size changed since it was recorded"
        assert file_sha256(path) == meta["sha256"], f"{name}/{file}: contents changed since it was recorded"
    present = {p.name for p in golden.dir.iterdir()} - {MANIFEST_NAME, GOLDEN_NAME}
    assert present == set(manifest["files"]), f"{name}: files not in the manifest: {present - set(manifest['files'])}"
    inventory = tensor_inventory(golden.dir)
    assert inventory == manifest["tensors"], f"{name}: keys/shapes/dtypes differ from the manifest"
    assert key_suffixes(list(inventory)) == manifest["key_suffixes"]
    assert {k: list(v.shape) for k, v in golden.outputs.items()} == manifest["outputs"]["shapes"]
    assert all(v.dtype == torch.float32 for v in golden.outputs.values())
    assert (golden.dir / manifest["probes"]["file"]).resolve() == (GOLDEN_ROOT / PROBES_NAME).resolve()
    assert file_sha256(GOLDEN_ROOT / PROBES_NAME) == manifest["probes"]["sha256"]
    assert golden.config["peft_type"] == "LORA"
    for entry in manifest["expectations"]:
        assert entry["outcome"] in {"match", "differs", "refused"} and entry.get("why"), entry
        # a path this stack lacks (UNAVAILABLE, with its reason) may still be named: the manifests serve every stack
        assert entry.get("paths", "*") == "*" or set(entry["paths"]) <= set(PATHS) | set(UNAVAILABLE), entry


def test_base_rebuilds_bit_identically(golden_base: dict) -> None:
    assert golden_base["problem"] is None, golden_base["problem"]


def test_same_adapter_recorded_by_two_versions_agrees(golden_probes) -> None:
    """Records of identical tensors agree across saving versions, except DoRA across peft 0.14 (documented)."""
    by_kind: dict[str, list[GoldenAdapter]] = {}
    for golden in GOLDEN.values():
        by_kind.setdefault(golden.manifest["kind"], []).append(golden)
    compared = 0
    for kind, group in by_kind.items():
        first, *rest = sorted(group, key=lambda g: Version(g.saved_with["peft"]))
        for other in rest:
            mine, theirs = read_adapter_tensors(first.dir), read_adapter_tensors(other.dir)
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), (
                f"{first.name} and {other.name}: the same kind must hold the same tensors in every era")
            diffs = compare_outputs(other.outputs, first.outputs, golden_probes)
            bad = sorted(n for n, d in diffs.items() if not d.ok)
            crosses = kind == "dora" and Version(first.saved_with["peft"]) < Version("0.14") <= Version(
                other.saved_with["peft"])
            detail = "; ".join(d.summary for d in diffs.values())
            if crosses:
                assert bad == ["image_text"], f"{first.name} vs {other.name}: {detail}"
            else:
                assert not bad, f"{first.name} vs {other.name}: {detail}"
            compared += 1
    assert compared >= 3


# ---------------------------------------------------------------------------------------------
# Every golden adapter through every loading path, under the installed PEFT


@pytest.mark.parametrize("path_name", sorted(PATHS))
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_adapter_through_loading_path(name: str, path_name: str, golden_base: dict, golden_probes,
                                             tmp_path: Path) -> None:
    verdict = run_path(GOLDEN[name], path_name, PATHS[path_name], golden_base, golden_probes, tmp_path)
    if verdict.ok and verdict.status == "refused":
        pytest.skip(verdict.message())  # asserted loud and documented; nothing to compare
    assert_as_recorded(verdict)


# ---------------------------------------------------------------------------------------------
# Test doubles: loading paths that silently change outputs must fail the golden comparison


def _doubled_scaling(loaded: LoadedModel) -> None:
    """Every LoRA layer's scaling doubled after a clean load (the record stays clean)."""
    from peft.tuners.lora import LoraLayer

    for module in loaded.model.modules():
        if isinstance(module, LoraLayer):
            for adapter in list(module.scaling):
                module.scaling[adapter] *= 2


def _dropped_merged_module(loaded: LoadedModel) -> None:
    """One merged module (layer 1's w2) put back to its base weight: its LoRA silently lost."""
    base = dict(build_model("ixc2.5", seed=0).named_parameters())
    params = dict(loaded.model.named_parameters())
    with torch.no_grad():
        params["model.layers.1.feed_forward.w2.weight"].copy_(base["model.layers.1.feed_forward.w2.weight"])


def _base_vision_proj(loaded: LoadedModel) -> None:
    """modules_to_save copies reset to the base vision_proj (the trained projector silently not loaded)."""
    from peft.utils import ModulesToSaveWrapper

    for module in loaded.model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            for copy in module.modules_to_save.values():
                copy.load_state_dict(module.original_module.state_dict())


DOUBLES = {  # label -> (wrapped path, perturbation, outputs that must then be off)
    "peft+doubled-scaling": ("peft", _doubled_scaling, {"image_text", "text_only"}),
    "peft-merged+dropped-w2": ("peft-merged", _dropped_merged_module, {"image_text", "text_only"}),
    "load-adapter+base-vision-proj": ("load-adapter", _base_vision_proj, {"vision_proj"}),
}


def perturbed(path_name: str, perturb: Callable[[LoadedModel], None]) -> Callable[..., LoadedModel]:
    def path(base_dir: Path, adapter_dir: Path, **kwargs) -> LoadedModel:
        loaded = PATHS[path_name](base_dir, adapter_dir, **kwargs)
        perturb(loaded)
        return loaded

    return path


@pytest.mark.parametrize("label", sorted(DOUBLES))
def test_a_path_that_silently_changes_outputs_fails(label: str, golden_base: dict, golden_probes,
                                                    tmp_path: Path) -> None:
    path_name, perturb, off = DOUBLES[label]
    golden = GOLDEN[DOUBLE_SUBJECT]
    assert golden.expectation(path_name).outcome == "match", f"{DOUBLE_SUBJECT} must load on peft {peft.__version__}"
    verdict = run_path(golden, label, perturbed(path_name, perturb), golden_base, golden_probes, tmp_path)
    assert verdict.record is not None and verdict.record.clean, "the double must be silent: a clean load record"
    assert not verdict.ok and verdict.status == "FAIL"
    assert off <= {n for n, d in verdict.diffs.items() if not d.ok}, verdict.message()
    with pytest.raises(AssertionError) as caught:
        assert_as_recorded(verdict)
    message = str(caught.value)
    assert f"golden adapter {DOUBLE_SUBJECT}" in message and f"loading path {label}" in message
    assert "max abs err" in message and "OUTSIDE the float32 tolerance" in message


def test_a_refusal_that_goes_silent_fails(golden_base: dict, golden_probes, tmp_path: Path) -> None:
    """A documented refusal (an adapter this PEFT cannot read) must not turn into a quiet load."""
    golden = GOLDEN[DOUBLE_SUBJECT]
    fake = GoldenAdapter(golden.name, golden.dir, dict(golden.manifest), golden.outputs)
    refusal = Expectation("refused", paths=("peft",), error="lora_magnitude_vector", why="test double").to_dict()
    fake.manifest["expectations"] = [refusal]
    verdict = run_path(fake, "peft", PATHS["peft"], golden_base, golden_probes, tmp_path)
    assert not verdict.ok
    assert "documented as refused, but it loads cleanly and matches" in verdict.message()
