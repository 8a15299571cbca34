"""Target resolution follows PEFT's matching and attributes matches to towers and PLoRA internals."""

import json

import pytest

from harness import compat
from harness.model.families import GENERIC
from harness.model.structure import inspect_base
from harness.model.targets import resolve_targets


@pytest.fixture(scope="module")
def base_and_config(default_bundle):
    config = json.loads((default_bundle.adapter_dir / "adapter_config.json").read_text())
    return inspect_base(default_bundle.base_dir), config


@pytest.mark.parametrize("build_tree", [True, False], ids=["module-tree", "weight-index-only"])
def test_official_targets_hit_every_language_linear(default_bundle, base_and_config, build_tree):
    base = inspect_base(default_bundle.base_dir, build_tree=build_tree)
    result = resolve_targets(base_and_config[1], base)
    layers = base.config["num_hidden_layers"]
    assert result.per_tower == {"language": 5 * layers}
    assert result.unmatched_patterns == [] and result.plora_inner == []
    assert all(len(hits) == layers for hits in result.per_pattern.values())


@pytest.mark.parametrize(
    "targets, towers, unmatched, inner",
    [
        (["q_proj", "v_proj"], {"vision"}, [], 0),  # Llama names match only the CLIP tower
        (["wqkv", "does_not_exist"], {"language"}, ["does_not_exist"], 0),
        (r".*\.Plora_[AB]", {"language"}, [], 20),
        ("all-linear", {"language", "vision", "projector"}, [], 20),
    ],
)
def test_wrong_or_partial_targets_are_visible(base_and_config, targets, towers, unmatched, inner):
    base, config = base_and_config
    result = resolve_targets({**config, "target_modules": targets}, base)
    assert set(result.per_tower) == towers
    assert result.unmatched_patterns == unmatched
    assert len(result.plora_inner) == inner
    assert all(name.rsplit(".", 1)[-1] in ("Plora_A", "Plora_B") for name in result.plora_inner)


def test_exclude_and_layers_to_transform_are_honoured(base_and_config):
    base, config = base_and_config
    result = resolve_targets({**config, "layers_to_transform": [1]}, base)
    assert result.matched and all(".layers.1." in name for name in result.matched)
    if not compat.peft_supports("exclude_modules"):
        pytest.skip(f"PEFT {compat.PEFT_VERSION} has no exclude_modules")
    result = resolve_targets({**config, "exclude_modules": ["wqkv"]}, base)
    assert not any(name.endswith("wqkv") for name in result.matched)


@pytest.mark.parametrize(
    "name, tower",
    [("model.layers.0.attention.wqkv", "language"), ("vit.vision_tower.encoder.layers.0.self_attn.q_proj", "vision"),
     ("vision_proj.0", "projector"), ("model.visual.blocks.0.attn.qkv", "vision"), ("output", "language")],
)
def test_tower_of(name, tower):
    assert (GENERIC.tower_of(name) or "language") == tower
