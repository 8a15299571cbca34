"""Behaviour of the loading-path registry and of each path's pieces, pinned down by mutation testing
(scripts/mutation-test.sh): the registry's derived lists, the messages a refused loader gives, what each path
writes into its work directory (never into the input), and the record each real load leaves on a tiny base.
Each test runs in milliseconds to a second, so the mutation run can judge ``harness/loading/paths.py``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from harness import compat
from harness.loading import paths
from harness.loading.paths import LoaderRefused, LoadingPath
from harness.loading.records import LoadedModel, LoadRecord

# Written against the current stack's behaviour (the mutation run's); the oldest stack differs in the marked tests:
# PEFT 0.8.2 refuses config fields it does not know and has no DoRA, transformers 4.33 keeps or omits the tie flag.
OLDEST_STACK = Version(str(compat.PEFT_VERSION)) < Version("0.14")
CURRENT_STACK_ONLY = pytest.mark.skipif(OLDEST_STACK, reason=f"PEFT {compat.PEFT_VERSION}: the oldest stack behaves "
                                        "differently here (see OLDEST_STACK)")

CONFIG, SAFE, BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
WQKV = "base_model.model.model.layers.0.attention.wqkv"


@pytest.fixture
def registry():
    """The three registry tables, restored after the test (which registers toy paths)."""
    saved = {table: dict(getattr(paths, table)) for table in ("REGISTRY", "PATHS", "UNAVAILABLE")}
    yield paths
    for table, content in saved.items():
        getattr(paths, table).clear()
        getattr(paths, table).update(content)


def _load(*args, **kw):
    return ("loaded", args, kw)


def _toy(name, **facts) -> LoadingPath:
    return paths.register_path(LoadingPath(name, _load, **facts))


# -- the registry ----------------------------------------------------------------------------------------------------


def test_a_path_the_stack_lacks_is_listed_with_its_reason_and_moves_when_re_registered(registry):
    got = _toy("toy", requires=lambda: "needs peft 9")
    assert registry.REGISTRY["toy"] is got and "toy" not in registry.PATHS
    assert registry.UNAVAILABLE["toy"] == "needs peft 9"
    again = _toy("toy", requires=lambda: None)  # the stack has it now: available, no stale reason
    assert registry.PATHS["toy"] is again and registry.REGISTRY["toy"] is again and "toy" not in registry.UNAVAILABLE
    _toy("toy", requires=lambda: "gone again")
    assert "toy" not in registry.PATHS and registry.UNAVAILABLE["toy"] == "gone again"
    _toy("toy")  # no requirement at all
    assert "toy" in registry.PATHS and "toy" not in registry.UNAVAILABLE
    registry.unregister_path("toy")
    assert all("toy" not in getattr(registry, t) for t in ("REGISTRY", "PATHS", "UNAVAILABLE"))
    _toy("toy", requires=lambda: "why")
    registry.unregister_path("toy")
    assert "toy" not in registry.UNAVAILABLE and "toy" not in registry.REGISTRY


def test_loading_path_registers_the_function_with_its_facts_and_returns_it(registry):
    def load_toy(base_dir, adapter_dir, **kw):
        return (base_dir, adapter_dir, kw)

    assert registry.loading_path("toy", merges=True, saves_and_reloads=True)(load_toy) is load_toy
    path = registry.PATHS["toy"]
    assert (path.name, path.function, path.merges, path.saves_and_reloads) == ("toy", load_toy, True, True)
    assert path(Path("b"), Path("a"), dtype="d", workdir="w") == (Path("b"), Path("a"), {"dtype": "d", "workdir": "w"})


def test_a_path_record_defaults_to_a_plain_adapter_load():
    path = LoadingPath("toy", _load)
    assert (path.merges, path.saves_and_reloads, path.reads_adapter_config, path.shares_load_with, path.then,
            path.takes_base, path.requires) == (False, False, True, None, None, False, None)


def test_replaced_keeps_the_facts_but_loads_on_its_own(registry):
    def why():
        return None

    def then(loaded, **_):
        return loaded

    _toy("toy", merges=True, saves_and_reloads=True, reads_adapter_config=False, shares_load_with="peft", then=then,
         takes_base=True, requires=why)
    def other(*args, **kw):
        return "the replacement"

    got = registry.replaced("toy", other)
    assert got == LoadingPath("toy", other, merges=True, saves_and_reloads=True, reads_adapter_config=False,
                              shares_load_with=None, then=None, takes_base=False, requires=why)


def test_the_merging_lists_are_derived_from_the_available_records(registry):
    for table in ("REGISTRY", "PATHS", "UNAVAILABLE"):
        getattr(registry, table).clear()
    _toy("plain")
    _toy("merged", merges=True)
    _toy("saved", merges=True, saves_and_reloads=True)
    _toy("saves-only", saves_and_reloads=True)
    _toy("lacking", merges=True, requires=lambda: "no")
    assert registry.merging() == ["merged", "saved"]
    assert registry.merging_in_memory() == ["merged"]


def _names(registry, name):
    return [p.name for p in registry.chain_of(name)]


def test_a_chain_runs_from_the_root_that_takes_the_base_in_load_order(registry):
    def then(loaded, **_):
        return loaded

    for table in ("REGISTRY", "PATHS", "UNAVAILABLE"):
        getattr(registry, table).clear()
    _toy("last", shares_load_with="middle", then=then)  # registered before its leader: order comes from the links
    _toy("root", takes_base=True)
    _toy("middle", shares_load_with="root", then=then)
    _toy("alone")
    _toy("no-step", shares_load_with="root")  # names a leader but has no step: loads on its own
    assert _names(registry, "root") == _names(registry, "last") == _names(registry, "middle") == ["root", "middle",
                                                                                                   "last"]
    assert _names(registry, "alone") == [] and _names(registry, "no-step") == []
    _toy("lonely-root", takes_base=True)  # a root nobody continues is no chain
    assert _names(registry, "lonely-root") == []
    _toy("headless", shares_load_with="leader-that-takes-no-base", then=then)
    _toy("leader-that-takes-no-base")
    assert _names(registry, "headless") == []
    _toy("middle", shares_load_with="root", then=then, requires=lambda: "unavailable")
    assert _names(registry, "root") == [] and _names(registry, "last") == []


def test_a_declared_cycle_stops_where_it_closes(registry):
    def then(loaded, **_):
        return loaded

    for table in ("REGISTRY", "PATHS", "UNAVAILABLE"):
        getattr(registry, table).clear()
    _toy("x", shares_load_with="y", then=then)
    _toy("y", shares_load_with="x", then=then, takes_base=True)
    assert _names(registry, "x") == ["y", "x"]  # climbs x -> y (takes the base), then y's follower x
    assert _names(registry, "y") == []  # climbs y -> x, which takes no base: no chain


def test_a_cycle_above_the_start_stops_where_it_closes(registry):
    def then(loaded, **_):
        return loaded

    for table in ("REGISTRY", "PATHS", "UNAVAILABLE"):
        getattr(registry, table).clear()
    _toy("start", shares_load_with="y", then=then)
    _toy("y", shares_load_with="z", then=then)
    _toy("z", shares_load_with="y", then=then, takes_base=True)
    assert _names(registry, "start") == ["z", "y", "start"]


def test_the_built_in_chain_and_merging_lists():
    assert _names(paths, "peft") == _names(paths, "merge-script") == ["peft", "peft-merged", "merge-script"]
    assert _names(paths, "peft-safe-merged") == [] and _names(paths, "bin") == []
    assert paths.merging() == ["peft-merged", "peft-safe-merged", "merge-script"]
    assert paths.merging_in_memory() == ["peft-merged", "peft-safe-merged"]
    facts = {name: (p.merges, p.saves_and_reloads, p.reads_adapter_config, p.shares_load_with, p.takes_base)
             for name, p in paths.REGISTRY.items()}
    assert facts["peft"] == (False, False, True, None, True)
    assert facts["peft-merged"] == (True, False, True, "peft", False)
    assert facts["merge-script"] == (True, True, True, "peft-merged", False)
    assert facts["state-dict"] == (False, False, False, None, False)
    assert facts["load-adapter"] == facts["bin"] == facts["safetensors"] == (False, False, True, None, False)
    assert paths.REGISTRY["transformers-load-adapter"].requires is not None
    assert paths.REGISTRY["auto-peft"].requires is not None


# -- pieces that touch files only ------------------------------------------------------------------------------------


def _write_adapter(directory: Path, *, safe: bool = True, bin_too: bool = False, extra=(), **config) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["wo"], **config}))
    tensors = {"base_model.model.layer.wo.lora_A.weight": torch.arange(8.0).reshape(2, 4),
               "base_model.model.layer.wo.lora_B.weight": torch.arange(6.0).reshape(3, 2)}
    if safe:
        save_file(tensors, str(directory / SAFE), metadata={"format": "pt"})
    if bin_too or not safe:
        torch.save(tensors, directory / BIN)
    for name in extra:
        (directory / name).write_text(name)
    return directory


def _digest(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_explaining_bin_only_names_the_file_and_the_fix(tmp_path):
    import transformers

    adapter = _write_adapter(tmp_path / "a", safe=False)
    with pytest.raises(LoaderRefused) as err, paths._explaining_bin_only(adapter):
        raise FileNotFoundError(f"no file named {SAFE} in {adapter}")
    assert str(err.value) == (
        f"transformers {transformers.__version__}'s load_adapter looks only for adapter_model.safetensors in a local "
        "directory and this adapter has only adapter_model.bin: users of model.load_adapter / "
        "from_pretrained(adapter_dir) cannot load it; save the adapter with safe_serialization=True")
    assert err.value.__cause__ is None and err.value.__suppress_context__


@pytest.mark.parametrize("case", ["both-files", "no-bin", "other-file"])
def test_explaining_bin_only_leaves_other_missing_files_alone(tmp_path, case):
    adapter = _write_adapter(tmp_path / "a", safe=case != "no-bin", bin_too=case == "both-files")
    if case == "no-bin":
        (adapter / BIN).unlink()
    message = "tokenizer.json" if case == "other-file" else SAFE
    if case == "other-file":
        (adapter / SAFE).unlink()
        _write_adapter(adapter, safe=False)
    with pytest.raises(FileNotFoundError, match=message), paths._explaining_bin_only(adapter):
        raise FileNotFoundError(message)
    with paths._explaining_bin_only(adapter):  # nothing raised: nothing to explain
        pass


def test_adapter_files_are_the_adapter_files_sorted(tmp_path):
    adapter = _write_adapter(tmp_path / "a", bin_too=True, extra=("README.md", "tokenizer.json", "my_adapter_x"))
    assert paths._adapter_files(adapter) == [CONFIG, BIN, SAFE]


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_resaved_writes_the_same_tensors_in_the_format_into_the_workdir(tmp_path, fmt):
    adapter = _write_adapter(tmp_path / "a", extra=("README.md",))
    before = _digest(adapter)
    out = paths._resaved(adapter, tmp_path / "work" / "deeper", fmt)
    assert out == tmp_path / "work" / "deeper" / f"adapter-{fmt}"
    name = BIN if fmt == "bin" else SAFE
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG, name])
    assert (out / CONFIG).read_bytes() == (adapter / CONFIG).read_bytes()
    got = torch.load(out / BIN, weights_only=True) if fmt == "bin" else load_file(out / SAFE)
    want = load_file(adapter / SAFE)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    if fmt == "safetensors":
        with safe_open(str(out / SAFE), "pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert _digest(adapter) == before
    assert paths._resaved(adapter, tmp_path / "work" / "deeper", fmt) == out  # a second call reuses the directory


def test_adapter_naming_base_copies_what_loaders_read_and_names_the_checked_base(tmp_path, monkeypatch):
    adapter = _write_adapter(tmp_path / "a", bin_too=True, extra=("tokenizer.json", "tokenizer_config.json",
                                                                   "README.md", "notes.txt"),
                             base_model_name_or_path="somewhere/else")
    before = _digest(adapter)
    monkeypatch.chdir(tmp_path)
    out = paths.adapter_naming_base(adapter, Path("base"), tmp_path / "w" / "x")
    assert out == tmp_path / "w" / "x" / "adapter-naming-base"
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG, SAFE, BIN, "tokenizer.json",
                                                            "tokenizer_config.json"])
    config = json.loads((out / CONFIG).read_text())
    assert config == {**json.loads((adapter / CONFIG).read_text()),
                      "base_model_name_or_path": str((tmp_path / "base").resolve())}
    assert (out / CONFIG).read_text() == json.dumps(config, indent=2)
    assert (out / SAFE).read_bytes() == (adapter / SAFE).read_bytes()
    assert (out / BIN).read_bytes() == (adapter / BIN).read_bytes()
    assert (out / "tokenizer.json").read_text() == "tokenizer.json"
    assert _digest(adapter) == before
    assert paths.adapter_naming_base(adapter, Path("base"), tmp_path / "w" / "x") == out  # exists already: fine


def test_point_at_rewrites_only_the_base_name(tmp_path):
    adapter = _write_adapter(tmp_path / "a", base_model_name_or_path="old", r=8)
    paths._point_at(adapter, tmp_path / "view")
    config = json.loads((adapter / CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "view") and config["r"] == 8
    assert (adapter / CONFIG).read_text() == json.dumps(config, indent=2)


def test_a_missing_task_type_is_named_as_why_auto_peft_refuses(tmp_path):
    adapter = _write_adapter(tmp_path / "a", task_type=None,
                             auto_mapping={"base_model_class": "X", "parent_library": "transformers_modules.m"})
    err = ValueError("not allowed: transformers_modules.m\nsecond line")
    got = paths._auto_mapping_refused(err, adapter)
    assert isinstance(got, ValueError) and got is not err
    assert str(got) == (f"{adapter / CONFIG} has no task_type, so PEFT saved an auto_mapping naming "
                        "'transformers_modules.m', which AutoPeftModelForCausalLM refuses (not allowed: "
                        "transformers_modules.m); set \"task_type\": \"CAUSAL_LM\" in adapter_config.json "
                        "(LoraConfig(task_type='CAUSAL_LM') when training)")
    long = paths._auto_mapping_refused(ValueError("y" * 300), adapter)
    assert f"({'y' * 160}); set" in str(long)


@pytest.mark.parametrize("config", [{"task_type": "CAUSAL_LM", "auto_mapping": {"parent_library": "m"}},
                                    {"task_type": None}, {"task_type": None, "auto_mapping": {}}])
def test_other_auto_peft_errors_pass_unchanged(tmp_path, config):
    adapter = _write_adapter(tmp_path / "a", **config)
    err = ValueError("something else")
    assert paths._auto_mapping_refused(err, adapter) is err


# -- merge and save, on stand-ins for the model ----------------------------------------------------------------------


class _Merging:
    """A stand-in PEFT model: records how merge_and_unload was called and logs a warning as PEFT does."""

    def __init__(self):
        self.calls = []

    def merge_and_unload(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        logging.getLogger("peft").warning("merged with a warning")
        return self

    def eval(self):
        self.evaluated = True
        return self


@pytest.mark.parametrize("safe", [False, True])
def test_merge_loaded_consumes_the_load_and_renames_a_copy_of_its_record(safe):
    model = _Merging()
    record = LoadRecord(path="peft", missing_keys=["m"], files_used=[SAFE])
    loaded = LoadedModel(model, record)
    merged = paths.merge_loaded(loaded, "peft-merged", safe_merge=safe) if safe else paths.merge_loaded(
        loaded, "peft-merged")
    assert model.calls == ([((), {"safe_merge": True})] if safe else [((), {})])
    assert merged.model is model and model.evaluated and loaded.model is None
    assert merged.record.path == "peft-merged" and merged.record.missing_keys == ["m"]
    assert merged.record.files_used == [SAFE]
    assert record.path == "peft" and merged.record is not record  # the original record is untouched
    assert any("merged with a warning" in w for w in merged.record.warnings)
    assert record.warnings == []


def test_save_and_reload_records_the_reload(tmp_path, monkeypatch):
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    for name in ("modeling_x.py", "tokenizer.json", "weights.safetensors"):
        (base_dir / name).write_text(name)
    saved = {}

    class Merged:
        def save_pretrained(self, out, **kw):
            saved.update(out=out, **kw)
            Path(out).mkdir(parents=True)
            (Path(out) / "model.safetensors").write_text("w")
            (Path(out) / "config.json").write_text("{}")

    calls = []

    def fake_load_base(out, **kw):
        calls.append((out, kw))
        logging.getLogger("transformers").warning("reloaded with a warning")
        return "reloaded", {"missing_keys": ["b", "a"], "unexpected_keys": ["z", "y"]}

    monkeypatch.setattr(paths, "load_base", fake_load_base)
    merged = LoadedModel(Merged(), LoadRecord(path="peft-merged", notes=["earlier"]))
    got = paths.save_and_reload(merged, base_dir, dtype="d", device="dev", workdir=tmp_path / "work")
    out = tmp_path / "work" / "merge-script"
    assert saved == {"out": out, "safe_serialization": True}
    assert calls == [(out, {"dtype": "d", "device": "dev", "output_loading_info": True})]
    assert got.model == "reloaded" and merged.model is None
    assert got.record.path == "merge-script"
    assert got.record.notes == ["earlier", "copied ['modeling_x.py', 'tokenizer.json']"]
    assert (got.record.missing_keys, got.record.unexpected_keys) == (["a", "b"], ["y", "z"])
    assert got.record.files_used == ["config.json", "model.safetensors", "modeling_x.py", "tokenizer.json"]
    assert any("reloaded with a warning" in w for w in got.record.warnings)
    monkeypatch.setattr(paths, "load_base", lambda out, **kw: ("reloaded", {}))
    again = paths.save_and_reload(LoadedModel(Merged(), LoadRecord(path="x")), base_dir, dtype="d", device="dev",
                                  workdir=tmp_path / "work2")
    assert (again.record.missing_keys, again.record.unexpected_keys) == ([], [])


# -- every path's real load on the tiny base: what the record says ---------------------------------------------------


@pytest.fixture
def spy_loads(monkeypatch):
    """Every ``load_base`` a path makes: (directory, keyword arguments), the real load still done."""
    calls = []
    real = paths.load_base

    def spy(base_dir, **kw):
        calls.append((Path(base_dir), {k: v for k, v in kw.items() if k != "config"}))
        return real(base_dir, **kw)

    monkeypatch.setattr(paths, "load_base", spy)
    return calls


def _run(name, bundle, tmp_path, adapter=None):
    return paths.PATHS[name](bundle.base_dir, adapter or bundle.adapter_dir, dtype=torch.float32, device="cpu",
                             workdir=tmp_path / "work")


def _lora_b(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".lora_B." in n}


def test_the_unmerged_peft_path_loads_the_base_once_shared_and_records_the_adapter_files(default_bundle, tmp_path,
                                                                                         spy_loads):
    loaded = _run("peft", default_bundle, tmp_path)
    assert spy_loads == [(Path(default_bundle.base_dir), {"dtype": torch.float32, "device": "cpu", "private": False})]
    assert loaded.record.path == "peft" and loaded.record.files_used == [CONFIG, SAFE]
    assert not loaded.model.training and _lora_b(loaded.model)
    base = paths.load_base(default_bundle.base_dir, dtype=torch.float32)
    given = paths.load_peft(default_bundle.base_dir, default_bundle.adapter_dir, base=base, dtype=torch.float32,
                            device="cpu", workdir=tmp_path / "given")
    assert given.model.get_base_model() is base and len(spy_loads) == 2  # the base given is used, not reloaded
    private = paths.load_peft(default_bundle.base_dir, default_bundle.adapter_dir, private=True, dtype=torch.float32,
                              device="cpu", workdir=tmp_path / "private")
    assert spy_loads[-1][1]["private"] is True and private.record.path == "peft"  # to be merged in place next


@CURRENT_STACK_ONLY
def test_load_adapter_and_state_dict_note_what_peft_itself_reported(default_bundle, tmp_path):
    """PEFT's own load result goes into the notes beside the key-by-key record (a renamed key: one missing, one
    unexpected); PEFT's missing list also names PLoRA's own weights, which the note says are ignored."""
    from fixtures.mutations import copy_adapter, load_tensors, save_tensors

    adapter = copy_adapter(default_bundle.adapter_dir, tmp_path / "renamed")
    tensors = load_tensors(adapter)
    old = f"{WQKV}.lora_A.weight"
    tensors[old.replace(".wqkv.", ".wqkv_nowhere.")] = tensors.pop(old)
    save_tensors(adapter, tensors)
    notes = {name: _run(name, default_bundle, tmp_path / name, adapter).record.notes
             for name in ("load-adapter", "state-dict")}
    plora = ("PEFT also lists 22 non-adapter key(s) containing 'lora_' as missing (e.g. "
             "base_model.model.plora_glb_GN): PLoRA names, ignored")
    assert notes["load-adapter"] == ["load_result: 1 missing adapter keys, 1 unexpected keys"], notes
    assert notes["state-dict"] == ["load_result: 1 missing adapter keys, 1 unexpected keys", plora], notes
    clean = _run("state-dict", default_bundle, tmp_path / "clean").record.notes
    assert clean == ["load_result: 0 missing adapter keys, 0 unexpected keys", plora]


@pytest.mark.parametrize("name", ["peft-merged", "peft-safe-merged", "merge-script"])
def test_merging_paths_load_into_private_memory_and_leave_no_lora_layer(name, default_bundle, tmp_path, spy_loads):
    loaded = _run(name, default_bundle, tmp_path)
    assert spy_loads[0] == (Path(default_bundle.base_dir), {"dtype": torch.float32, "device": "cpu", "private": True})
    assert loaded.record.path == name and not loaded.model.training
    assert not _lora_b(loaded.model) and loaded.record.clean
    if name == "merge-script":
        out = tmp_path / "work" / "merge-script"
        assert spy_loads[1] == (out, {"dtype": torch.float32, "device": "cpu", "output_loading_info": True})
        assert "config.json" in loaded.record.files_used and "model.safetensors" in loaded.record.files_used
        assert loaded.record.notes and loaded.record.notes[-1].startswith("copied [")
    else:
        assert len(spy_loads) == 1 and loaded.record.files_used == [CONFIG, SAFE]


@pytest.fixture(scope="module")
def nan_adapter(default_bundle, tmp_path_factory):
    from fixtures.mutations import copy_adapter, load_tensors, save_tensors

    adapter = copy_adapter(default_bundle.adapter_dir, tmp_path_factory.mktemp("nan") / "adapter")
    tensors = load_tensors(adapter)
    key = next(k for k in sorted(tensors) if ".lora_B." in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_tensors(adapter, tensors)
    return adapter


def test_only_the_safe_merge_refuses_nan_weights(default_bundle, nan_adapter, tmp_path):
    """``merge_and_unload(safe_merge=True)`` checks the merged weights for NaN; the plain merge does not."""
    merged = _run("peft-merged", default_bundle, tmp_path / "plain", nan_adapter)
    assert any(torch.isnan(p).any() for p in merged.model.parameters())
    with pytest.raises(ValueError, match="NaN"):
        _run("peft-safe-merged", default_bundle, tmp_path / "safe", nan_adapter)


@CURRENT_STACK_ONLY
def test_the_fresh_peft_model_holds_frozen_non_zero_decoys(default_bundle):
    """A key that never loads must show as a difference: the wrapped base starts with random, non-zero lora_B
    (not PEFT's zero init) and is built for inference (nothing trainable)."""
    model = paths._fresh_peft(default_bundle.base_dir, default_bundle.adapter_dir, dtype=torch.float32, device="cpu")
    lora_b = _lora_b(model)
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values())
    assert not any(p.requires_grad for p in model.parameters())
    assert model.peft_config["default"].inference_mode


def test_load_adapter_runs_the_adapter_under_another_name(default_bundle, tmp_path, spy_loads):
    loaded = _run("load-adapter", default_bundle, tmp_path)
    assert loaded.model.active_adapter == "other" and not loaded.model.training
    assert loaded.record.path == "load-adapter" and loaded.record.files_used == [CONFIG, SAFE]
    assert loaded.record.clean
    assert spy_loads == [(Path(default_bundle.base_dir), {"dtype": torch.float32, "device": "cpu"})]
    saved = load_file(default_bundle.adapter_dir / SAFE)
    held = {n: p for n, p in loaded.model.named_parameters() if ".lora_B.other." in n}
    key = next(k for k in sorted(saved) if ".lora_B." in k)
    want = saved[key]
    assert any(torch.equal(p, want) for p in held.values())  # the saved values, not the decoys


def test_state_dict_loads_the_saved_values_without_reading_files_it_does_not_use(default_bundle, tmp_path, spy_loads):
    loaded = _run("state-dict", default_bundle, tmp_path)
    assert loaded.record.path == "state-dict" and loaded.record.files_used == [] and loaded.record.clean
    assert not loaded.model.training
    assert spy_loads == [(Path(default_bundle.base_dir), {"dtype": torch.float32, "device": "cpu"})]
    saved = load_file(default_bundle.adapter_dir / SAFE)
    key = next(k for k in sorted(saved) if ".lora_B." in k)
    held = dict(loaded.model.named_parameters())
    assert torch.equal(held[key.replace(".lora_B.weight", ".lora_B.default.weight")], saved[key])


@pytest.mark.parametrize("name,resaved", [("bin", BIN), ("safetensors", SAFE)])
def test_the_resaving_paths_load_their_copy_and_record_its_files(name, resaved, default_bundle, tmp_path,
                                                                  spy_loads):
    """Each loads the adapter re-saved in its format, whatever the user saved: a .bin-only adapter for the
    safetensors path, the .safetensors one for the bin path."""
    adapter = None
    if name == "safetensors":
        adapter = tmp_path / "bin-only"
        adapter.mkdir()
        (adapter / CONFIG).write_bytes((default_bundle.adapter_dir / CONFIG).read_bytes())
        torch.save(load_file(default_bundle.adapter_dir / SAFE), adapter / BIN)
    loaded = _run(name, default_bundle, tmp_path, adapter)
    assert spy_loads == [(Path(default_bundle.base_dir), {"dtype": torch.float32, "device": "cpu", "private": False})]
    assert loaded.record.path == name and loaded.record.files_used == sorted([CONFIG, resaved])
    assert (tmp_path / "work" / f"adapter-{name}" / resaved).is_file() and loaded.record.clean
    assert _lora_b(loaded.model) and not loaded.model.training


def test_transformers_load_adapter_injects_into_the_base_and_records(default_bundle, tmp_path, spy_loads):
    if "transformers-load-adapter" not in paths.PATHS:
        pytest.skip(paths.UNAVAILABLE["transformers-load-adapter"])
    loaded = _run("transformers-load-adapter", default_bundle, tmp_path)
    assert type(loaded.model).__name__ != "PeftModel" and not loaded.model.training
    assert loaded.record.path == "transformers-load-adapter" and loaded.record.files_used == [CONFIG, SAFE]
    assert loaded.record.clean and _lora_b(loaded.model)
    assert spy_loads == [(Path(default_bundle.base_dir), {"dtype": torch.float32, "device": "cpu"})]


def test_transformers_load_adapter_refuses_a_bin_only_adapter_by_name(default_bundle, tmp_path):
    if "transformers-load-adapter" not in paths.PATHS:
        pytest.skip(paths.UNAVAILABLE["transformers-load-adapter"])
    adapter = tmp_path / "bin-only"
    adapter.mkdir()
    (adapter / CONFIG).write_bytes((default_bundle.adapter_dir / CONFIG).read_bytes())
    torch.save(load_file(default_bundle.adapter_dir / SAFE), adapter / BIN)
    for name in ("transformers-load-adapter", "transformers-from-adapter-dir"):
        try:
            _run(name, default_bundle, tmp_path / name, adapter)
        except LoaderRefused as err:
            assert "has only adapter_model.bin" in str(err) and "safe_serialization=True" in str(err)
        else:
            pytest.skip("this transformers loads adapter_model.bin")


def test_from_adapter_dir_loads_the_checked_base_through_a_copy(default_bundle, tmp_path, spy_loads):
    if "transformers-from-adapter-dir" not in paths.PATHS:
        pytest.skip(paths.UNAVAILABLE["transformers-from-adapter-dir"])
    loaded = _run("transformers-from-adapter-dir", default_bundle, tmp_path)
    copy = tmp_path / "work" / "adapter-naming-base"
    assert spy_loads == [(copy, {"dtype": torch.float32, "device": "cpu"})]
    assert loaded.record.path == "transformers-from-adapter-dir" and loaded.record.files_used == [CONFIG, SAFE]
    assert loaded.record.clean and _lora_b(loaded.model) and not loaded.model.training


@pytest.fixture(scope="module")
def flash_base(default_bundle, tmp_path_factory):
    """The default base whose config.json asks for flash attention (as the real one does)."""
    import shutil

    base = shutil.copytree(default_bundle.base_dir, tmp_path_factory.mktemp("flash") / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "attn_implementation": "flash_attention_2"}))
    return base


def _flash_attn_missing():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed: no override happens")


def test_the_base_as_loaded_is_the_directory_when_its_config_needs_no_change(default_bundle, tmp_path):
    record = LoadRecord(path="x")
    assert paths._base_as_loaded(default_bundle.base_dir, tmp_path, record) == Path(default_bundle.base_dir)
    assert record.notes == [] and not (tmp_path / "base").exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    for file in Path(default_bundle.base_dir).iterdir():
        (plain / file.name).symlink_to(file)
    config = json.loads((Path(default_bundle.base_dir) / "config.json").read_text())
    config.pop("attn_implementation", None)
    (plain / "config.json").unlink()
    (plain / "config.json").write_text(json.dumps(config))
    assert paths._base_as_loaded(plain, tmp_path / "w", record) == plain and record.notes == []


def test_a_flash_config_is_loaded_from_an_eager_view(flash_base, tmp_path):
    _flash_attn_missing()
    record = LoadRecord(path="x", notes=["earlier"])
    view = paths._base_as_loaded(flash_base, tmp_path / "w", record)
    assert view == tmp_path / "w" / "base"
    config = json.loads((view / "config.json").read_text())
    assert config == {**json.loads((flash_base / "config.json").read_text()), "attn_implementation": "eager"}
    assert (view / "config.json").read_text() == json.dumps(config, indent=2)
    assert not (view / "config.json").is_symlink()
    others = sorted(p.name for p in flash_base.iterdir() if p.name != "config.json")
    assert sorted(p.name for p in view.iterdir() if p.name != "config.json") == others
    assert all((view / n).is_symlink() and (view / n).resolve() == (flash_base / n).resolve() for n in others)
    assert record.notes == ["earlier", f"base loaded from a view of {flash_base} with attn_implementation='eager' "
                                       "(as the other paths load it)"]
    again = LoadRecord(path="x")
    assert paths._base_as_loaded(flash_base, tmp_path / "w", again) == view  # the view exists: reused
    assert json.loads((view / "config.json").read_text())["attn_implementation"] == "eager"


def test_base_kwargs_are_what_load_base_passes(default_bundle, flash_base):
    from harness.compat import ATTN_IMPLEMENTATION_KWARG, DTYPE_KW

    got = paths._base_kwargs(default_bundle.base_dir, torch.bfloat16)
    eager = {"attn_implementation": "eager"} if ATTN_IMPLEMENTATION_KWARG else {}
    assert got == {"trust_remote_code": True, DTYPE_KW: torch.bfloat16, **eager}
    _flash_attn_missing()
    assert paths._base_kwargs(flash_base, torch.float32) == {"trust_remote_code": True, DTYPE_KW: torch.float32,
                                                              **eager}


def test_auto_peft_loads_the_checked_base_from_its_eager_view(default_bundle, flash_base, tmp_path):
    if "auto-peft" not in paths.PATHS:
        pytest.skip(paths.UNAVAILABLE["auto-peft"])
    _flash_attn_missing()
    loaded = paths.PATHS["auto-peft"](flash_base, default_bundle.adapter_dir, dtype=torch.float32, device="cpu",
                                      workdir=tmp_path / "work")
    record = loaded.record
    assert record.path == "auto-peft" and record.files_used == [CONFIG, SAFE] and record.clean
    assert record.notes == [f"base loaded from a view of {flash_base} with attn_implementation='eager' (as the "
                            "other paths load it)"]
    copy = json.loads((tmp_path / "work" / "adapter-naming-base" / CONFIG).read_text())
    assert copy["base_model_name_or_path"] == str(tmp_path / "work" / "base")
    assert not loaded.model.training and _lora_b(loaded.model)
    assert next(loaded.model.parameters()).dtype == torch.float32


# == harness/checks/against_base.py: bases without a module tree or without PLoRA, trainable tokens ==================


WO = "base_model.model.model.layers.0.attention.wo"
EMBED = "base_model.model.model.tok_embeddings"


@pytest.fixture(scope="module")
def info(default_bundle):
    from harness.model.structure import inspect_base

    return inspect_base(default_bundle.base_dir)


def _verdict(check_id, adapter_dir, base, **options):
    from harness.checks.context import CheckContext, CheckOptions
    from harness.checks.registry import get_check, run_check
    from harness.inputs.adapter_dir import read_adapter

    ctx = CheckContext(adapter=read_adapter(adapter_dir), base=base, options=CheckOptions(**options))
    return run_check(get_check(check_id), ctx)


def _edited(default_bundle, tmp_path, tensors=None, **config) -> Path:
    """A copy of the good adapter with ``tensors`` changed (None: removed) and ``config`` set."""
    from fixtures.mutations import copy_adapter, edit_config, load_tensors, save_tensors

    dst = copy_adapter(default_bundle.adapter_dir, tmp_path / "adapter")
    if config:
        edit_config(dst, lambda c: c.update(config))
    if tensors:
        saved = load_tensors(dst)
        for key, value in tensors.items():
            if value is None:
                saved.pop(key)
            else:
                saved[key] = value
        save_tensors(dst, saved)
    return dst


def _no_tree(info, **weights):
    """The base as inspect_base sees it when the meta build failed: the weight index alone."""
    import dataclasses

    return dataclasses.replace(info, modules=None, meta_build_error="no meta build",
                               weights={**info.weights, **weights})


def _saved(default_bundle, key):
    return load_file(default_bundle.adapter_dir / SAFE)[key]


def test_a_base_without_a_module_tree_still_judges_shapes_by_its_weight_index(default_bundle, tmp_path, info):
    base = _no_tree(info)
    assert base.layer("model.layers.0.attention.wo") is None
    got = _verdict("base-match", default_bundle.adapter_dir, base)
    assert (got.status, got.message) == ("pass", "all 10 adapted modules exist in the base with matching dimensions")
    assert got.details["layer_kinds"] == {"unknown": 10}
    a = _saved(default_bundle, f"{WO}.lora_A.weight")
    rank, width = a.shape
    out = info.weights["model.layers.0.attention.wo.weight"][0][0]
    wrong = _edited(default_bundle, tmp_path, {f"{WO}.lora_A.weight": torch.zeros(rank, width + 1)})
    got = _verdict("base-match", wrong, base)
    assert got.status == "fail"
    assert got.message == ("adapter looks trained for a base model with other modules: 0 adapted module(s) missing, "
                           f"1 with other dimensions (first: model.layers.0.attention.wo: base nn.Linear in/out "
                           f"{width}/{out}, adapter lora_A [{rank}, {width + 1}] (want [{rank}, {width}]))")


def test_without_a_tree_either_orientation_of_a_linear_weight_fits(default_bundle, info):
    """A Conv1D base stores its weight [in, out]: with no module tree to say which, both orientations are tried."""
    shape, dtype = info.weights["model.layers.0.attention.wqkv.weight"]
    assert shape[0] != shape[1]
    base = _no_tree(info, **{"model.layers.0.attention.wqkv.weight": (tuple(shape[::-1]), dtype)})
    got = _verdict("base-match", default_bundle.adapter_dir, base)
    assert got.status == "pass", got.message


def test_without_a_tree_a_module_whose_weight_is_not_indexed_is_not_judged(default_bundle, info):
    import dataclasses

    weights = {k: v for k, v in info.weights.items() if k != "model.layers.0.attention.wo.weight"}
    base = dataclasses.replace(_no_tree(info), weights=weights)
    assert _verdict("base-match", default_bundle.adapter_dir, base).status == "pass"


def test_without_a_tree_a_wrong_vector_weight_is_not_judged(default_bundle, info):
    """A 1-D weight has no in/out: no dims to compare with (the module is left to key-coverage)."""
    base = _no_tree(info, **{"model.layers.0.attention.wo.weight": ((64,), "float32")})
    assert _verdict("base-match", default_bundle.adapter_dir, base).status == "pass"


def test_without_a_tree_a_transposed_fit_is_still_wrong_for_the_other_part(default_bundle, tmp_path, info):
    """Both orientations tried: when neither fits every part, the module is reported in the weight's own one."""
    a = _saved(default_bundle, f"{WO}.lora_A.weight")
    rank, width = a.shape
    out = info.weights["model.layers.0.attention.wo.weight"][0][0]
    wrong = _edited(default_bundle, tmp_path, {f"{WO}.lora_B.weight": torch.zeros(out + 3, rank)})
    got = _verdict("base-match", wrong, _no_tree(info))
    assert got.status == "fail"
    assert got.message.endswith(f"(first: model.layers.0.attention.wo: base nn.Linear in/out {width}/{out}, adapter "
                                f"lora_B [{out + 3}, {rank}] (want [{out}, {rank}]))")


def test_embedding_parts_are_judged_as_an_embedding_without_a_tree(default_bundle, tmp_path, info):
    vocab, hidden = info.weights["model.tok_embeddings.weight"][0]
    good = {f"{EMBED}.lora_embedding_A": torch.zeros(4, vocab), f"{EMBED}.lora_embedding_B": torch.zeros(hidden, 4)}
    path = _edited(default_bundle, tmp_path / "good", good)
    assert _verdict("base-match", path, _no_tree(info)).status == "pass"
    bad = {**good, f"{EMBED}.lora_embedding_A": torch.zeros(4, vocab + 1)}
    got = _verdict("base-match", _edited(default_bundle, tmp_path / "bad", bad), _no_tree(info))
    assert got.status == "fail"
    assert got.message.endswith(f"(first: model.tok_embeddings: base nn.Embedding in/out {vocab}/{hidden}, adapter "
                                f"lora_embedding_A [4, {vocab + 1}] (want [4, {vocab}]))")


def test_embedding_parts_on_a_linear_module_name_the_parts_it_takes(default_bundle, tmp_path, info):
    key = "base_model.model.model.layers.0.attention.wo"
    path = _edited(default_bundle, tmp_path, {f"{key}.lora_A.weight": None, f"{key}.lora_B.weight": None,
                                              f"{key}.lora_embedding_A": torch.zeros(4, 8),
                                              f"{key}.lora_embedding_B": torch.zeros(8, 4)})
    got = _verdict("base-match", path, info)
    assert got.status == "fail"
    assert got.message.endswith("(first: model.layers.0.attention.wo: a nn.Linear takes lora_A/lora_B, the adapter "
                                "has lora_embedding_A/lora_embedding_B)")


def test_misfits_take_the_rank_from_the_up_part_when_the_down_part_is_absent(default_bundle, tmp_path, info):
    b = _saved(default_bundle, f"{WO}.lora_B.weight")
    out, rank = b.shape
    width = info.weights["model.layers.0.attention.wo.weight"][0][1]
    path = _edited(default_bundle, tmp_path / "b-only", {f"{WO}.lora_A.weight": None})
    assert _verdict("base-match", path, info).status == "pass"  # lora_B alone, right shape: fits
    path = _edited(default_bundle, tmp_path / "b-wrong", {f"{WO}.lora_A.weight": None,
                                                           f"{WO}.lora_B.weight": torch.zeros(out + 1, rank)})
    got = _verdict("base-match", path, info)
    assert got.message.endswith(f"(first: model.layers.0.attention.wo: base nn.Linear in/out {width}/{out}, adapter "
                                f"lora_B [{out + 1}, {rank}] (want [{out}, {rank}]))")
    path = _edited(default_bundle, tmp_path / "vectors", {f"{WO}.lora_A.weight": torch.zeros(rank),
                                                           f"{WO}.lora_B.weight": torch.zeros(out)})
    assert _verdict("base-match", path, info).status == "pass"  # no rank to read: nothing compared here


@CURRENT_STACK_ONLY
def test_misfits_compare_bias_and_magnitude_by_size_and_list_every_wrong_part(default_bundle, tmp_path, info):
    out, width = info.weights["model.layers.0.attention.wo.weight"][0]
    rank = _saved(default_bundle, f"{WO}.lora_A.weight").shape[0]
    unit = {f"{WO}.lora_magnitude_vector": torch.ones(1, out), f"{WO}.lora_B.bias": torch.zeros(out)}
    assert _verdict("base-match", _edited(default_bundle, tmp_path / "ok", unit), info).status == "pass"
    wrong = {f"{WO}.lora_magnitude_vector": torch.ones(out + 1), f"{WO}.lora_B.bias": torch.zeros(1, out - 1),
             f"{WO}.lora_A.weight": torch.zeros(rank, width + 2)}
    got = _verdict("base-match", _edited(default_bundle, tmp_path / "bad", wrong), info)
    assert got.message.endswith(f"adapter lora_A [{rank}, {width + 2}] (want [{rank}, {width}]), lora_B.bias [1, "
                                f"{out - 1}] (want [{out}]), lora_magnitude_vector [{out + 1}] (want [{out}]))")


def test_misfits_directly_skip_parts_the_kind_does_not_save():
    from harness.checks.against_base import _misfits
    from harness.model.layer_kinds import LINEAR, Dims

    dims = Dims(6, 5)
    assert _misfits(LINEAR, dims, {"lora_A": (2, 6), "lora_B": (5, 2), "lora_C": (9, 9)}) == []
    assert _misfits(LINEAR, dims, {"lora_A": (2, 7), "lora_B": (4, 2)}) == ["lora_A [2, 7] (want [2, 6])",
                                                                          "lora_B [4, 2] (want [5, 2])"]
    assert _misfits(LINEAR, dims, {"lora_B": (4, 3)}) == ["lora_B [4, 3] (want [5, 3])"]
    assert _misfits(LINEAR, dims, {"lora_B": (4,)}) == []
    assert _misfits(LINEAR, dims, {"lora_A": (2, 6), "lora_B": (5, 3, 1)}) == ["lora_B [5, 3, 1] (want [5, 2])"]


@pytest.mark.parametrize("rows,width,indices,problem", [
    (2, 1, [1, 2], "trainable_tokens_delta [2, {w1}], expected [2, {w}] (one row as wide as the weight [{v}, {w}] per "
                   "token index in trainable_token_indices, 2 of them)"),
    (1, 0, [10_000], None),
])
def test_trainable_token_rows_that_do_not_fit_the_embedding_fail(default_bundle, tmp_path, info, rows, width, indices,
                                                                  problem):
    vocab, hidden = info.weights["model.tok_embeddings.weight"][0]
    key = f"{EMBED}.token_adapter.trainable_tokens_delta"
    path = _edited(default_bundle, tmp_path, {key: torch.zeros(rows, hidden + width)},
                   trainable_token_indices=indices)
    got = _verdict("base-match", path, info)
    assert got.status == "fail"
    assert got.message.startswith("adapter looks trained for a base model with other modules: 0 adapted module(s) "
                                  "missing, 1 with other dimensions (first: model.tok_embeddings: ")
    if problem:
        assert got.message.endswith(problem.format(w1=hidden + 1, w=hidden, v=vocab) + ")")
    else:
        assert str(vocab) in got.message
    assert len(got.details["mismatched"]) == 1 and got.details["mismatched"][0].startswith("model.tok_embeddings: ")


def test_trainable_token_rows_alone_are_judged_and_fitting_ones_pass(default_bundle, tmp_path, info):
    from fixtures.mutations import copy_adapter, edit_config, save_tensors

    vocab, hidden = info.weights["model.tok_embeddings.weight"][0]
    key = f"{EMBED}.token_adapter.trainable_tokens_delta"
    path = copy_adapter(default_bundle.adapter_dir, tmp_path / "tokens-only")
    edit_config(path, lambda c: c.update(trainable_token_indices=[1, 2]))
    save_tensors(path, {key: torch.zeros(2, hidden + 1)})
    got = _verdict("base-match", path, info)  # no LoRA tensors, yet a problem: judged, not skipped
    assert got.status == "fail" and got.details["modules"] == 0
    assert got.message.startswith("adapter looks trained for a different base model: 0 adapted module(s) missing, 1 "
                                  "with other dimensions (first: model.tok_embeddings: trainable_tokens_delta")
    save_tensors(path, {key: torch.zeros(2, hidden)})
    got = _verdict("base-match", path, info)
    assert (got.status, got.message) == ("skip", "the adapter has no LoRA tensors to compare (see key-grammar)")
    fits = _edited(default_bundle, tmp_path / "fits", {key: torch.zeros(2, hidden)}, trainable_token_indices=[1, 2])
    assert _verdict("base-match", fits, info).status == "pass"
    named = {f"{key}.default": torch.zeros(2, hidden + 1)}  # saved under an adapter name: not a saved adapter's key
    assert _verdict("base-match", _edited(default_bundle, tmp_path / "named", named, trainable_token_indices=[1, 2]),
                    info).status == "pass"


def test_base_match_details_name_everything_and_cap_the_lists(default_bundle, tmp_path, info):
    from fixtures.mutations import copy_adapter, load_tensors, save_tensors

    path = copy_adapter(default_bundle.adapter_dir, tmp_path / "adapter")
    tensors = load_tensors(path)
    a, b = tensors[f"{WO}.lora_A.weight"], tensors[f"{WO}.lora_B.weight"]
    for i in range(12):  # twelve modules the base lacks: 22 in all, most (12) missing: another base
        tensors[f"base_model.model.model.layers.0.attention.extra{i:02d}.lora_A.weight"] = a.clone()
        tensors[f"base_model.model.model.layers.0.attention.extra{i:02d}.lora_B.weight"] = b.clone()
    save_tensors(path, tensors)
    got = _verdict("base-match", path, info)
    missing = [f"model.layers.0.attention.extra{i:02d}" for i in range(12)]
    assert got.details == {"modules": 22, "missing": missing[:10], "mismatched": [],
                           "adapter_base_model_name_or_path": str(default_bundle.base_dir),
                           "fan_in_fan_out_corrected": {}, "layer_kinds": {"linear": 10, "unknown": 12}}
    assert got.message == ("adapter looks trained for a different base model: 12 adapted module(s) missing, 0 with "
                           "other dimensions (first: model.layers.0.attention.extra00)")
    assert got.fix.startswith("check base_model_name_or_path")


def test_base_match_fan_in_fan_out_details_list_the_corrected_modules(default_bundle, tmp_path, info):
    got = _verdict("base-match", _edited(default_bundle, tmp_path, fan_in_fan_out=True), info)
    (note, modules), = got.details["fan_in_fan_out_corrected"].items()
    assert note.startswith("fan_in_fan_out is true but the module is an nn.Linear") and len(modules) == 10
    assert modules[0] == "model.layers.0.attention.wo" and got.details["missing"] == []
    assert got.message.startswith(note + " (10 module(s), e.g. model.layers.0.attention.wo)")


def _tree_without_plora(info, rename=None):
    import dataclasses

    modules = {(rename(n) if rename else n): dataclasses.replace(m, is_branch=False, name=rename(n) if rename else n)
               for n, m in info.modules.items()}
    return dataclasses.replace(info, modules=modules)


def test_targets_on_a_base_without_plora_still_need_the_language_model(default_bundle, tmp_path, info):
    vision = _edited(default_bundle, tmp_path / "v", target_modules=["q_proj"])
    base = _tree_without_plora(info)
    assert not base.branch_modules()
    got = _verdict("targets-resolve", vision, base)
    assert (got.status, got.message) == ("fail", "targets adapt no language-model module, only the vision: 1 part")
    renamed = _tree_without_plora(info, lambda n: n.replace("model.", "language_model.", 1) if n.startswith(
        "model.") else n)
    got = _verdict("targets-resolve", vision, renamed)
    assert got.status == "fail", got.message


def test_targets_on_a_base_with_no_language_model_part_pass(default_bundle, tmp_path, info):
    """A base whose module names show no language model (nothing under model. or language_model, no PLoRA) cannot
    be told to need one: the vision targets pass, counted per tower."""
    vision = _edited(default_bundle, tmp_path / "v", target_modules=["q_proj"])
    base = _tree_without_plora(info, lambda n: "decoder" + n[len("model"):] if n.startswith("model") else n)
    got = _verdict("targets-resolve", vision, base)
    assert (got.status, got.message) == ("pass", "1 modules matched (vision 1)")
    assert got.details["per_tower"] == {"vision": 1}


# == harness/checks/dynamic.py: starting the shared run, planning depth slices (the heavy parts faked) ===============


class _FakeRun:
    """Stands in for ``DynamicRun``: records how it was started and whether it was closed."""

    made: list = []
    load_error = None

    def __init__(self, base_dir, adapter_dir, **kw):
        self.args, self.closed = (base_dir, adapter_dir, kw), False
        _FakeRun.made.append(self)

    def close(self):
        self.closed = True


def _dynamic_ctx(tmp_path, **options):
    from types import SimpleNamespace

    from harness.checks.context import CheckContext, CheckOptions

    said = []
    ctx = CheckContext(adapter=SimpleNamespace(config={}, root=tmp_path / "adapter"),
                       base=SimpleNamespace(base_dir=tmp_path / "base", init_buffers={"rope": 1}),
                       options=CheckOptions(**options), progress=said.append)
    return ctx, said


def test_the_dynamic_run_is_started_once_with_the_options_and_closed_at_cleanup(tmp_path, monkeypatch):
    from harness.checks import dynamic
    from harness.checks.measure import dynamic_run

    monkeypatch.setattr(dynamic_run, "DynamicRun", _FakeRun)
    monkeypatch.setattr(_FakeRun, "made", [])
    ctx, said = _dynamic_ctx(tmp_path, dtype="bfloat16", device="meta-device")
    run = dynamic.dynamic_run(ctx)
    assert isinstance(run, _FakeRun) and dynamic.dynamic_run(ctx) is run and _FakeRun.made == [run]
    base_dir, adapter_dir, kw = run.args
    assert (base_dir, adapter_dir) == (tmp_path / "base", tmp_path / "adapter")
    assert {k: v for k, v in kw.items() if k != "progress"} == {"dtype": "bfloat16", "device": "meta-device",
                                                                 "init_buffers": {"rope": 1}}
    kw["progress"]("a step")
    assert said == ["a step"] and ctx.cache["dynamic.run"] is run
    assert not run.closed
    ctx.cleanup.close()
    assert run.closed


def test_a_base_that_does_not_load_fails_every_dynamic_check_naming_why(tmp_path, monkeypatch):
    from harness.checks import dynamic
    from harness.checks.measure import dynamic_run
    from harness.checks.registry import get_check, run_check

    class Broken(_FakeRun):
        load_error = "modeling_x.py line 3: boom"

    monkeypatch.setattr(dynamic_run, "DynamicRun", Broken)
    ctx, _ = _dynamic_ctx(tmp_path)
    got = dynamic.dynamic_run(ctx)
    assert got == dynamic.Unavailable("the base model cannot be checked: modeling_x.py line 3: boom", is_failure=True)
    ctx.cache["dynamic.slices"] = None  # the whole base fits
    got = run_check(get_check("key-coverage"), ctx)
    assert (got.status, got.message) == ("fail", "the base model cannot be checked: modeling_x.py line 3: boom")
    assert got.fix.startswith("make the base directory load on its own first: the message names the file and line")
    ctx.cleanup.close()


def test_only_the_loading_prerequisites_block_the_dynamic_run(tmp_path, monkeypatch):
    from harness.checks import dynamic
    from harness.checks.measure import dynamic_run

    monkeypatch.setattr(dynamic_run, "DynamicRun", _FakeRun)
    ctx, _ = _dynamic_ctx(tmp_path)
    ctx.failed_prerequisites = ["config-valid", "base-name", "empty-tensors"]
    assert dynamic.dynamic_run(ctx) == dynamic.Unavailable(
        "the adapter cannot be loaded until config-valid, empty-tensors pass(es)")
    ctx.failed_prerequisites = ["base-name", "lora-on-plora"]
    assert isinstance(dynamic.dynamic_run(ctx), _FakeRun)
    ctx.cleanup.close()


GiB = 2**30


@pytest.fixture
def sized(monkeypatch):
    """The tiny base made to need 10 GiB whole and 3 GiB per layer (the real sizes are kilobytes); the temporary disk
    and the memory the machine has are set by the test."""
    from harness.loading import slices

    monkeypatch.setattr(slices, "needed_bytes",
                        lambda info, dtype, layers=None, layout=None: (10 if layers is None else 3 * layers) * GiB)
    free = {"disk": 50 * GiB, "memory": 64 * GiB, "asked": []}
    monkeypatch.setattr(slices, "temporary_disk_free", lambda: free["disk"])

    def available(device="cpu"):
        free["asked"].append(device)
        return free["memory"]

    monkeypatch.setattr(slices, "available_bytes", available)
    return free


def _slicing_ctx(default_bundle, info, adapter_dir=None, **options):
    from harness.checks.context import CheckContext, CheckOptions
    from harness.inputs.adapter_dir import read_adapter

    return CheckContext(adapter=read_adapter(adapter_dir or default_bundle.adapter_dir), base=info,
                        options=CheckOptions(**options))


def test_a_base_that_fits_is_not_sliced(default_bundle, info, sized):
    from harness.checks import dynamic

    ctx = _slicing_ctx(default_bundle, info, max_memory=11 * GiB)
    assert dynamic.depth_slices(ctx) is None and ctx.notes == [] and "dynamic.slices" in ctx.cache
    ctx = _slicing_ctx(default_bundle, info, device="cuda:1")  # the budget: what the device has
    assert dynamic.depth_slices(ctx) is None and sized["asked"] == ["cuda:1"]
    ctx = _slicing_ctx(default_bundle, info, max_memory=1)
    ctx.cache["dynamic.run"] = object()  # the whole-base run exists already: it is used
    assert dynamic.depth_slices(ctx) is None and "dynamic.slices" not in ctx.cache
    assert dynamic.depth_slices(_slicing_ctx(default_bundle, None, max_memory=1)) is None


def test_a_base_over_the_budget_is_cut_into_the_slices_the_adapter_touches_with_a_note(default_bundle, info, sized,
                                                                                       tmp_path):
    from fixtures.mutations import copy_adapter, load_tensors, save_tensors
    from harness.checks import dynamic

    sized["memory"] = 4 * GiB
    ctx = _slicing_ctx(default_bundle, info)
    assert dynamic.depth_slices(ctx) == [(0,), (1,)] and ctx.cache["dynamic.slices"] == [(0,), (1,)]
    assert ctx.notes == ["the base needs 10.0 GiB in float32 and the memory budget is 4.0 GiB (50.0 GiB of temporary "
                         "disk free): the dynamic checks ran on 2 depth slice(s) of 1 layer(s) covering every layer "
                         "the adapter touches (README, Depth slices)"]
    late = copy_adapter(default_bundle.adapter_dir, tmp_path / "layer-1-only")
    save_tensors(late, {k: v for k, v in load_tensors(late).items() if ".layers.0." not in k})
    ctx = _slicing_ctx(default_bundle, info, late, max_memory=7 * GiB, dtype="bfloat16")
    assert dynamic.depth_slices(ctx) == [(1,)]
    assert ctx.notes[0].startswith("the base needs 10.0 GiB in bfloat16 and the memory budget is 7.0 GiB (")
    assert "ran on 1 depth slice(s) of 1 layer(s)" in ctx.notes[0]


def test_a_budget_below_one_layer_or_a_full_disk_fails_naming_the_fix(default_bundle, info, sized):
    from harness.checks import dynamic

    ctx = _slicing_ctx(default_bundle, info, max_memory=2 * GiB)
    got = dynamic.depth_slices(ctx)
    assert got == dynamic.Unavailable(
        "the base needs 10.0 GiB in float32 for the dynamic checks and the memory budget is 2.0 GiB; depth slices "
        "cannot help: even one decoder layer with the rest of the model needs 3.0 GiB", is_failure=True,
        fix="run on a machine with more memory (or --device cuda), or check a smaller base")
    sized["disk"] = 0
    ctx = _slicing_ctx(default_bundle, info, max_memory=4 * GiB)
    got = dynamic.depth_slices(ctx)
    assert got.is_failure and got.fix == "point TMPDIR at a disk with room for one slice and its merged copy"
    assert got.reason.startswith("the base needs 10.0 GiB in float32 for the dynamic checks and the memory budget is "
                                 "4.0 GiB; depth slices cannot help: even one decoder layer with the rest of the model "
                                 "needs ")
    assert got.reason.endswith("GiB of temporary disk and 0.0 GiB is free (point TMPDIR at a disk with room)")
    assert ctx.notes == []


def test_the_layers_asked_for_are_the_one_slice(default_bundle, info, sized):
    from harness.checks import dynamic

    ctx = _slicing_ctx(default_bundle, info, layers=(1,))
    assert dynamic.depth_slices(ctx) == [(1,)]
    assert ctx.notes == ["the dynamic checks ran on the depth slice of layers 1-1 only, as asked (layers=); the other "
                         "layers' units check the rest (README, Depth slices)"]
    ctx = _slicing_ctx(default_bundle, info, layers=(0, 1))
    assert dynamic.depth_slices(ctx) is None and ctx.notes == []  # the whole model
    ctx = _slicing_ctx(default_bundle, info, layers=(1, 2))
    assert dynamic.depth_slices(ctx) == dynamic.Unavailable(
        "layers 1-2 were asked for, but the base has 2 decoder layers (0-1)", is_failure=True,
        fix="ask for layers within 0-1")
    assert dynamic.asked_slice((0, 3), None) == dynamic.Unavailable(
        "layers 0-3 were asked for, but the base has no decoder layer list to slice by depth", is_failure=True,
        fix="run without layers= (the whole model)")


def test_a_slice_the_temporary_disk_cannot_hold_fails_every_planned_check(default_bundle, info, tmp_path,
                                                                          monkeypatch):
    import shutil
    import tempfile
    from types import SimpleNamespace

    from harness.checks import dynamic
    from harness.loading import slices

    asked = []

    def disk_bytes(info, dtype, stored, layers=None, layout=None):
        asked.append((dtype, stored, layers, layout.count if layout else None))
        return 3 * GiB

    monkeypatch.setattr(slices, "disk_bytes", disk_bytes)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=GiB + GiB // 2))
    ctx = _slicing_ctx(default_bundle, info, dtype="bfloat16")
    assert dynamic._disk_problem(ctx, (2, 3, 4), tmp_path / "w") == (
        f"the depth slice of layers 2-4 needs about 3.0 GiB of temporary disk and {tmp_path} has 1.5 GiB free")
    assert asked == [("bfloat16", "float32", 3, 2)]
    assert dynamic._disk_problem(_slicing_ctx(default_bundle, info), (0,), tmp_path / "w") is not None
    assert asked[-1] == ("float32", "float32", 1, 2)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=3 * GiB))
    assert dynamic._disk_problem(ctx, (0,), tmp_path / "w") is None  # exactly enough
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=GiB))
    ctx = _slicing_ctx(default_bundle, info, max_memory=1)
    ctx.cache["dynamic.slices"] = [(0,), (1,)]
    ctx.planned = ("key-coverage", "effect")
    from harness.checks.registry import get_check, run_check

    for check_id in ("key-coverage", "effect", "path-agreement"):
        got = run_check(get_check(check_id), ctx)
        assert (got.status, got.message) == ("fail", "layer 0: the depth slice of layers 0-0 needs about 3.0 GiB of "
                                                     f"temporary disk and {tempfile.gettempdir()} has 1.0 GiB free")
        assert list(got.details["depth_slices"]) == ["layer 0"]
        assert got.fix == "point TMPDIR at a disk with room (or pass a smaller --max-memory for smaller slices)"


@pytest.mark.parametrize("name", ["bin", "safetensors", "auto-peft"])
def test_paths_load_in_the_dtype_asked_for(name, default_bundle, tmp_path):
    if name not in paths.PATHS:
        pytest.skip(paths.UNAVAILABLE[name])
    loaded = paths.PATHS[name](default_bundle.base_dir, default_bundle.adapter_dir, dtype=torch.bfloat16, device="cpu",
                               workdir=tmp_path / "work")
    weights = {n: p.dtype for n, p in loaded.model.named_parameters() if n.endswith("attention.wo.base_layer.weight")}
    assert weights and set(weights.values()) == {torch.bfloat16}, weights


def test_base_kwargs_leave_an_attention_other_than_eager_to_the_config(default_bundle, tmp_path):
    base = tmp_path / "sdpa"
    base.mkdir()
    for file in Path(default_bundle.base_dir).iterdir():
        if file.name != "config.json":
            (base / file.name).symlink_to(file)
    config = json.loads((Path(default_bundle.base_dir) / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "attn_implementation": "sdpa"}))
    from harness.compat import DTYPE_KW

    assert paths._base_kwargs(base, torch.float32) == {"trust_remote_code": True, DTYPE_KW: torch.float32}


def test_auto_peft_names_a_missing_task_type_as_the_cause(default_bundle, tmp_path):
    """PEFT's AutoPeftModelForCausalLM refuses an auto_mapping (saved when task_type is missing): the error names
    the file, the module it would import and the fix."""
    from fixtures.mutations import copy_adapter, edit_config

    if "auto-peft" not in paths.PATHS:
        pytest.skip(paths.UNAVAILABLE["auto-peft"])
    adapter = copy_adapter(default_bundle.adapter_dir, tmp_path / "adapter")
    edit_config(adapter, lambda c: c.update(task_type=None, auto_mapping={
        "base_model_class": "InternLMXComposer2ForCausalLM", "parent_library": "transformers_modules.base.modeling_x"}))
    try:
        _run("auto-peft", default_bundle, tmp_path, adapter)
    except ValueError as err:
        message = str(err)
    else:
        pytest.skip("this PEFT imports an auto_mapping without an allowlist")
    assert message.startswith(f"{adapter / CONFIG} has no task_type, so PEFT saved an auto_mapping naming "
                              "'transformers_modules.base.modeling_x', which AutoPeftModelForCausalLM refuses (")
    assert message.endswith("); set \"task_type\": \"CAUSAL_LM\" in adapter_config.json "
                            "(LoraConfig(task_type='CAUSAL_LM') when training)")


def test_lora_on_plora_lists_ten_of_many_inner_targets(default_bundle, tmp_path, info):
    got = _verdict("lora-on-plora", _edited(default_bundle, tmp_path, target_modules=r".*\.Plora_[AB]"), info)
    assert got.status == "fail" and got.details["count"] == 20 and len(got.details["modules"]) == 10
    assert got.message == f"20 target(s) are Plora_A/Plora_B inside PLoRA modules, e.g. {got.details['modules'][0]}"
