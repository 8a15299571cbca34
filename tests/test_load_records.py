"""Every loading path keeps its own record of what PEFT did with the saved keys, key by key.

PEFT loads with ``strict=False``: a key it cannot place is dropped without an error, and the module it
belonged to keeps its initialisation. The records are what ``key-coverage`` and ``path-agreement``
judge, so each path must name exactly the keys that went astray: no more, no fewer.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.mutations import copy_adapter
from harness.loading.paths import PATHS

RENAMED_MODULE = "model.layers.0.attention.wqkv"
NOWHERE = "model.layers.0.attention.wqkv_nowhere"
# Paths whose record describes the adapter load itself; merge-script's describes the reload of the saved
# merged model (it holds no adapter keys), and the merged paths carry the record of the load they merged.
ADAPTER_RECORD_PATHS = [name for name, path in PATHS.items() if not path.saves_and_reloads]


@pytest.fixture(scope="module")
def renamed_adapter(default_bundle, tmp_path_factory):
    """The good adapter with layer 0's wqkv lora_A saved under a module name the model does not have."""
    adapter = copy_adapter(default_bundle.adapter_dir, tmp_path_factory.mktemp("renamed") / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    old = f"base_model.model.{RENAMED_MODULE}.lora_A.weight"
    new = f"base_model.model.{NOWHERE}.lora_A.weight"
    tensors[new] = tensors.pop(old)
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    return adapter, old, new


@pytest.mark.parametrize("name", sorted(PATHS))
def test_a_good_adapter_loads_with_a_clean_record(name, default_bundle, tmp_path):
    loaded = PATHS[name](default_bundle.base_dir, default_bundle.adapter_dir, dtype=torch.float32, device="cpu",
                         workdir=tmp_path)
    record = loaded.record
    assert (record.path, record.missing_keys, record.unexpected_keys, record.not_loaded) == (name, [], [], [])
    assert record.clean
    # the registry's facts about the path are what it builds: a merging path leaves no LoRA layer, an unmerged one
    # keeps them; a path that saves and reloads reads back a whole model directory
    from peft.tuners.lora import LoraLayer

    lora_layers = [n for n, m in loaded.model.named_modules() if isinstance(m, LoraLayer)]
    assert bool(lora_layers) != PATHS[name].merges, (name, lora_layers[:3])
    assert ("config.json" in record.files_used) == PATHS[name].saves_and_reloads, record.files_used


@pytest.mark.parametrize("name", ADAPTER_RECORD_PATHS)
def test_a_renamed_key_is_named_missing_and_unexpected_by_every_path(name, default_bundle, renamed_adapter, tmp_path):
    adapter, old, new = renamed_adapter
    record = PATHS[name](default_bundle.base_dir, adapter, dtype=torch.float32, device="cpu", workdir=tmp_path).record
    assert record.unexpected_keys == [new], record
    assert record.missing_keys == [old], record
    assert record.not_loaded == [] and not record.clean


@pytest.fixture(scope="module")
def extra_key_adapter(default_bundle, tmp_path_factory):
    """The good adapter plus one lora_A saved under a module name the model does not have (nothing missing)."""
    adapter = copy_adapter(default_bundle.adapter_dir, tmp_path_factory.mktemp("extra") / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    extra = f"base_model.model.{NOWHERE}.lora_A.weight"
    tensors[extra] = tensors[f"base_model.model.{RENAMED_MODULE}.lora_A.weight"].clone()
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    return adapter, extra


@pytest.mark.parametrize("name", ADAPTER_RECORD_PATHS)
def test_an_extra_key_alone_makes_the_record_unclean(name, default_bundle, extra_key_adapter, tmp_path):
    """A key PEFT drops silently (strict=False) is the whole problem: the record must not call that clean."""
    adapter, extra = extra_key_adapter
    record = PATHS[name](default_bundle.base_dir, adapter, dtype=torch.float32, device="cpu", workdir=tmp_path).record
    assert (record.missing_keys, record.unexpected_keys, record.not_loaded) == ([], [extra], []), record
    assert not record.clean


def test_the_merge_script_record_names_what_the_reload_lacks(default_bundle, tmp_path, monkeypatch):
    """merge-script's record is the fresh reload's: a tensor the merged save lost is missing on reload."""
    from harness.loading import paths

    save = paths.save_and_reload

    def losing_save(merged, base_dir, **kw):
        state = merged.model.state_dict()
        dropped = next(k for k in state if k.endswith("Plora_A.weight"))
        original = merged.model.save_pretrained

        def save_without(out, **kwargs):
            kwargs["state_dict"] = {k: v for k, v in state.items() if k != dropped}
            return original(out, **kwargs)

        merged.model.save_pretrained = save_without
        losing_save.dropped = dropped
        return save(merged, base_dir, **kw)

    monkeypatch.setattr(paths, "save_and_reload", losing_save)
    record = paths.load_merge_script(default_bundle.base_dir, default_bundle.adapter_dir, dtype=torch.float32,
                                     device="cpu", workdir=tmp_path).record
    assert record.missing_keys == [losing_save.dropped] and record.unexpected_keys == []
    config = json.loads((default_bundle.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"  # the input was only read


def test_warnings_are_heard_while_transformers_is_quietened():
    import logging

    from harness.loading.records import capture_warnings

    logger = logging.getLogger("transformers")
    before = logger.level
    logger.setLevel(logging.ERROR)  # what transformers.logging.set_verbosity_error() does
    try:
        got: list[str] = []
        with capture_warnings(got):
            logger.warning("a key was not loaded")
        assert got == ["WARNING: a key was not loaded"] and logger.level == logging.ERROR
    finally:
        logger.setLevel(before)
