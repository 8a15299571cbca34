"""The README's extension points hold: a toy loading path and a toy model family, each one module under
fixtures/extensions/ that touches nothing else, are seen by every check that should see them.

Fails when a list of paths or a family's keyword is hardcoded again: a hardcoded merged-path list leaves
``toy-merged`` out of merge-equivalence / plora-preserved, a hardcoded ``im_mask`` feeds the toy model the wrong
keyword, a hardcoded "plora" key kind misses the toy family's branch.
"""

from __future__ import annotations

import importlib
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import harness
from harness.loading import paths
from harness.model import families


def _imported(module: str):
    """Import (or re-import: registration happens on import) an extension module."""
    return importlib.reload(sys.modules[module]) if module in sys.modules else importlib.import_module(module)


@pytest.fixture
def toy_path():
    module = _imported("fixtures.extensions.toy_path")
    yield module
    paths.unregister_path(module.NAME)


@pytest.fixture
def toy_family():
    module = _imported("fixtures.extensions.toy_family")
    yield module
    families.unregister(module.FAMILY.name)


def test_a_toy_loading_path_is_in_every_check_that_reads_the_registry(toy_path, default_bundle):
    record = paths.PATHS[toy_path.NAME]
    assert record.merges and not record.saves_and_reloads and paths.chain_of(toy_path.NAME) == []
    assert toy_path.NAME in paths.merging() and toy_path.NAME in paths.merging_in_memory()
    report = harness.check(default_bundle.adapter_dir, base_model=default_bundle.base_dir, trust_remote_code=True,
                           only=["path-agreement", "merge-equivalence", "plora-preserved"], isolated=False)
    agreement = report.get("path-agreement")
    assert agreement.status == "pass", agreement.message
    assert toy_path.NAME in agreement.details["paths"] and f"all {len(paths.PATHS)} loading paths" in agreement.message
    merge = report.get("merge-equivalence")
    assert merge.status == "pass" and merge.details[toy_path.NAME]["ok"], merge.message
    plora = report.get("plora-preserved")
    assert plora.status == "pass" and toy_path.NAME in plora.details["paths"], plora.details


def test_the_toy_path_leaves_the_registry_when_unregistered(toy_path):
    paths.unregister_path(toy_path.NAME)
    assert toy_path.NAME not in paths.PATHS and toy_path.NAME not in paths.merging()


def test_a_toy_family_is_detected_and_its_mask_keyword_reaches_the_model(toy_family):
    from harness.numerics.probes import make_probe, mask_kwarg
    from harness.numerics.reference import probe_logits
    from harness.synthetic import build_model

    model = toy_family.ToyLM()
    assert families.family_of(model) is toy_family.FAMILY
    assert mask_kwarg(model) == toy_family.MASK
    probe = make_probe(model.get_input_embeddings(), batch_size=2, seq_len=8, image_spans=[(2, 5)], seed=0)
    with_rows = probe_logits(model, probe)
    assert model.seen[-1] == {toy_family.MASK}  # the family's keyword, not XComposer's im_mask
    assert not torch.allclose(with_rows, probe_logits(model, probe, mask=None))  # the branch acts on image rows
    # its rules apply to its own models only: XComposer keeps im_mask, a model of neither family gets none
    assert mask_kwarg(build_model("ixc2.5")) == "im_mask"
    assert mask_kwarg(torch.nn.Linear(2, 2)) is None


def test_a_toy_family_branch_saved_as_adapter_keys_is_named_in_its_words(toy_family, default_bundle, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(default_bundle.adapter_dir, adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    branch_key = f"base_model.model.model.layers.0.attention.wqkv.{toy_family.BRANCH}.weight"
    tensors[branch_key] = torch.zeros(2, 2)
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    result = harness.check(adapter, only=["key-grammar"], isolated=False).get("key-grammar")
    assert result.status == "fail"
    assert result.message.startswith(f"1 key(s) are the base model's ToyBranch weights, not LoRA tensors "
                                     f"(e.g. {branch_key}): toy_branch belongs to the base model"), result.message


def test_a_toy_family_branch_is_its_own_training_finding(toy_family):
    from harness.checks.measure.training_audit import kind_of

    assert kind_of(f"layer.{toy_family.BRANCH}.weight", toy_family.FAMILY) == "toy-branch"
    assert kind_of("layer.proj.weight", toy_family.FAMILY) == "language"
