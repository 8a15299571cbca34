"""The input layer: bounded safetensors parsing, safe .bin loading, InputError vs recorded problems."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from fixtures import MUTATIONS, marker_path
from fixtures.mutations import BIN, CONFIG, SAFETENSORS, copy_adapter
from harness.inputs import scan
from harness.inputs.adapter_dir import read_adapter
from harness.inputs.errors import InputError, WeightsError
from harness.inputs.scan import scan_weight_file
from harness.inputs.weights import inspect_weight_file, parse_safetensors_header


@pytest.fixture(scope="module")
def good(default_bundle):
    return default_bundle.adapter_dir


def test_reads_default_adapter_metadata_without_data(good):
    adapter = read_adapter(good)
    assert adapter.config["peft_type"] == "LORA"
    assert [wf.name for wf in adapter.weight_files] == [SAFETENSORS]
    reference = load_file(str(good / SAFETENSORS))
    assert set(adapter.tensors) == set(reference)
    for key, info in adapter.tensors.items():
        assert info.shape == tuple(reference[key].shape)
        assert info.dtype == str(reference[key].dtype).removeprefix("torch.")
    streamed = dict(adapter.iter_tensors())
    assert all(torch.equal(streamed[k], reference[k]) for k in reference)
    assert adapter.describe()["weights"][0]["format"] == "safetensors"


def test_yielded_views_never_write_to_the_file(good, tmp_path):
    adapter_dir = copy_adapter(good, tmp_path / "a")
    before = (adapter_dir / SAFETENSORS).read_bytes()
    adapter = read_adapter(adapter_dir)
    for _, tensor in adapter.iter_tensors():
        tensor.add_(1.0)  # private copy-on-write mapping: must not reach the file
    adapter.scan()
    adapter.close()
    assert (adapter_dir / SAFETENSORS).read_bytes() == before


def test_single_weights_file_path(good):
    adapter = read_adapter(good / SAFETENSORS)
    assert adapter.config is not None and adapter.primary.name == SAFETENSORS


@pytest.mark.parametrize("name", [n for n, m in MUTATIONS.items() if m.input_error])
def test_unreadable_inputs_raise_one_line_input_error(name, good, tmp_path):
    mutation = MUTATIONS[name]
    broken = mutation.apply(good, tmp_path / name)
    with pytest.raises(InputError) as info:
        read_adapter(broken)
    text = str(info.value)
    assert "\n" not in text and mutation.fragment.lower() in text.lower()


def test_missing_path_and_non_directory(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_adapter(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        read_adapter(tmp_path / "notes.txt")


def test_nested_adapter_directories_are_named(good, tmp_path):
    copy_adapter(good, tmp_path / "outer" / "my_adapter")
    with pytest.raises(InputError, match="subdirectories: my_adapter"):
        read_adapter(tmp_path / "outer")


def test_broken_symlink_is_input_error(good, tmp_path):
    adapter_dir = copy_adapter(good, tmp_path / "a")
    (adapter_dir / SAFETENSORS).unlink()
    (adapter_dir / SAFETENSORS).symlink_to(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="broken or looping symlink"):
        read_adapter(adapter_dir)


def test_symlink_inside_directory_and_hub_snapshot_layout_are_fine(good, tmp_path):
    adapter_dir = copy_adapter(good, tmp_path / "a")
    (adapter_dir / "real.safetensors").write_bytes((adapter_dir / SAFETENSORS).read_bytes())
    (adapter_dir / SAFETENSORS).unlink()
    (adapter_dir / SAFETENSORS).symlink_to("real.safetensors")
    assert read_adapter(adapter_dir).primary.readable

    hub = tmp_path / "models--x" / "snapshots" / "abc123"
    blobs = tmp_path / "models--x" / "blobs"
    hub.mkdir(parents=True)
    blobs.mkdir()
    for name in (SAFETENSORS, CONFIG):
        (blobs / f"sha-{name}").write_bytes((good / name).read_bytes())
        (hub / name).symlink_to(os.path.relpath(blobs / f"sha-{name}", hub))
    assert read_adapter(hub).primary.readable


def test_config_problems_can_be_recorded_instead_of_raised(good, tmp_path):
    broken = MUTATIONS["config-not-object"].apply(good, tmp_path / "c")
    adapter = read_adapter(broken, strict_config=False)
    assert adapter.config is None and "not an object" in adapter.config_error


def test_missing_config_is_recorded(good, tmp_path):
    adapter_dir = copy_adapter(good, tmp_path / "a")
    (adapter_dir / CONFIG).unlink()
    adapter = read_adapter(adapter_dir)
    assert adapter.config is None and "missing" in adapter.config_error and adapter.primary.readable


# -- safetensors header validation ----------------------------------------------------------------


def _write(path, header: dict, data: bytes, *, pad: bool = True):
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "fragment"),
    [
        ({"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "byte range"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "invalid data_offsets"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            b"\0" * 12, "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "unaccounted"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 20, "does not describe"),
        ({"a": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 4 << 30]}}, b"\0" * 8, "truncated"),
        ({"a": [1, 2]}, b"", "not an object"),
        ({"__metadata__": [1]}, b"", "__metadata__"),
    ],
)
def test_hostile_headers_are_refused_with_a_reason(tmp_path, header, data, fragment):
    path = _write(tmp_path / "x.safetensors", header, data)
    with pytest.raises(WeightsError, match=fragment):
        parse_safetensors_header(path)
    wf = inspect_weight_file(path)
    assert not wf.readable and fragment.split()[0] in wf.error


def test_header_length_bounds(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 200 * 1024 * 1024) + b"{}")
    with pytest.raises(WeightsError, match="over the safetensors limit of 100,000,000 bytes"):
        parse_safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 100_000_001) + b"{}")  # the library's limit is decimal, not 100 MiB
    with pytest.raises(WeightsError, match="100,000,000"):
        parse_safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 4096) + b"{}")
    with pytest.raises(WeightsError, match="header claims 4096 bytes"):
        parse_safetensors_header(path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(WeightsError, match="shorter than the 8-byte"):
        parse_safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(WeightsError, match="not an object"):
        parse_safetensors_header(path)


@given(cut=st.integers(min_value=0, max_value=10_000), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
def test_damaged_files_never_crash(default_bundle, tmp_path_factory, cut, flips):
    data = bytearray((default_bundle.adapter_dir / SAFETENSORS).read_bytes())
    for position, value in flips:
        data[position % len(data)] = value
    data = data[: max(0, len(data) - cut)]
    path = tmp_path_factory.mktemp("fuzz") / SAFETENSORS
    path.write_bytes(bytes(data))
    wf = inspect_weight_file(path)
    if wf.readable:
        stats = scan_weight_file(wf)
        assert set(stats) == set(wf.tensors)
    else:
        assert wf.error and "\n" not in wf.error


def test_matches_safetensors_on_every_dtype(tmp_path):
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f16": torch.randn(7).half(),
        "i64": torch.arange(6).view(2, 3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "f8": torch.randn(4).to(torch.float8_e4m3fn),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    wf = inspect_weight_file(path)
    assert wf.readable, wf.error
    for key, value in wf.iter_tensors():
        assert value.dtype == tensors[key].dtype and value.shape == tensors[key].shape
        assert torch.equal(value.view(torch.uint8) if value.dtype == torch.float8_e4m3fn else value,
                           tensors[key].view(torch.uint8) if value.dtype == torch.float8_e4m3fn else tensors[key])


def test_misaligned_data_is_read_correctly(tmp_path):
    values = torch.arange(6, dtype=torch.float32)
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "b": {"dtype": "F32", "shape": [6], "data_offsets": [1, 25]}}
    path = _write(tmp_path / "x.safetensors", header, b"\x07" + values.numpy().tobytes(), pad=False)
    wf = inspect_weight_file(path)
    assert torch.equal(wf.get_tensor("b"), values) and wf.get_tensor("a").item() == 7


# -- the streaming scan ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_scan_finds_nan_inf_and_zero_across_chunks(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(scan, "SCAN_CHUNK_ELEMENTS", 16)
    ok = torch.randn(100).to(dtype)
    nan = torch.randn(100).to(dtype)
    nan[77] = float("nan")
    inf = torch.randn(100).to(dtype)
    inf[99] = float("-inf") if dtype != torch.float8_e4m3fn else float("nan")  # e4m3fn has no inf
    zero = torch.zeros(100).to(dtype)
    late = torch.zeros(100).to(dtype)
    late[95] = 1
    path = tmp_path / "x.safetensors"
    save_file({"ok": ok, "nan": nan, "inf": inf, "zero": zero, "late": late, "empty": torch.empty(0, dtype=dtype)},
              str(path))
    stats = scan_weight_file(inspect_weight_file(path))
    assert stats["ok"].finite and stats["ok"].nonzero
    assert not stats["nan"].finite and stats["nan"].nan == 1
    assert not stats["inf"].finite
    assert stats["zero"].finite and not stats["zero"].nonzero
    assert stats["late"].nonzero
    assert stats["empty"].numel == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64, torch.float8_e5m2, torch.float8_e4m3fnuz])
def test_scan_other_float_encodings(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(scan, "SCAN_CHUNK_ELEMENTS", 8)
    base = torch.randn(40).to(dtype) if not dtype.is_complex else torch.randn(40, dtype=dtype)
    bad = base.clone()
    bad[33] = float("inf") if dtype != torch.float8_e4m3fnuz else float("nan")
    path = tmp_path / "x.safetensors"
    save_file({"ok": base, "bad": bad, "zero": torch.zeros(40, dtype=dtype)}, str(path))
    stats = scan_weight_file(inspect_weight_file(path))
    assert stats["ok"].finite and stats["ok"].nonzero and stats["ok"].error is None
    assert not stats["bad"].finite and stats["bad"].nan + stats["bad"].inf == 1
    assert stats["zero"].finite and not stats["zero"].nonzero


def test_scan_negative_zero_is_zero_and_tiny_values_are_not(tmp_path, monkeypatch):
    monkeypatch.setattr(scan, "SCAN_CHUNK_ELEMENTS", 8)
    tensors = {
        "negzero": torch.full((20,), -0.0, dtype=torch.bfloat16),
        "mixedzero": torch.tensor([0.0, -0.0] * 10, dtype=torch.float16),
        "subnormal": torch.tensor([0.0] * 19 + [-1e-40], dtype=torch.float32),
        "neg_nan": torch.tensor([1.0] * 19 + [-float("nan")], dtype=torch.bfloat16),
        "ints": torch.tensor([0, 0, -3], dtype=torch.int64),
        "int_zero": torch.zeros(5, dtype=torch.int32),
        "bools": torch.tensor([False, True]),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    stats = scan_weight_file(inspect_weight_file(path))
    assert not stats["negzero"].nonzero and not stats["mixedzero"].nonzero
    assert stats["subnormal"].nonzero and stats["subnormal"].finite
    assert not stats["neg_nan"].finite and stats["neg_nan"].nan == 1
    assert stats["ints"].nonzero and stats["ints"].finite and not stats["int_zero"].nonzero
    assert stats["bools"].nonzero


def test_scan_releases_pages_without_losing_data(tmp_path, monkeypatch):
    monkeypatch.setattr(scan, "SCAN_CHUNK_ELEMENTS", 1000)
    tensors = {"a": torch.randn(3001), "b": torch.randn(70, 90).to(torch.bfloat16)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    wf = inspect_weight_file(path)
    views = dict(wf.iter_tensors())  # live views across the page release
    first = scan_weight_file(wf)
    second = scan_weight_file(wf)
    assert first == second
    assert all(torch.equal(views[k], tensors[k]) for k in tensors)


def test_scan_resident_memory_stays_small(tmp_path):
    """The scan maps, reads and releases chunk by chunk: peak RSS grows far less than the file."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:  # reset VmHWM (Linux)
            handle.write("5")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs")
    path = tmp_path / "big.safetensors"
    save_file({f"t{i}": torch.ones(1024, 4096, dtype=torch.bfloat16) for i in range(8)}, str(path))  # 64 MB
    size = path.stat().st_size

    def status(field):
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = status("VmRSS")
    stats = scan_weight_file(inspect_weight_file(path))
    assert all(s.nonzero and s.finite for s in stats.values())
    assert status("VmHWM") - before < 0.5 * size


def test_scan_is_cached(good):
    adapter = read_adapter(good)
    assert adapter.scan() is adapter.scan()


# -- .bin -----------------------------------------------------------------------------------------


def test_bin_loads_with_weights_only(good, tmp_path):
    tensors = load_file(str(good / SAFETENSORS))
    torch.save(tensors, tmp_path / BIN)
    wf = inspect_weight_file(tmp_path / BIN)
    assert wf.readable and wf.unsafe_globals == [] and not wf.legacy_format
    assert all(torch.equal(v, tensors[k]) for k, v in wf.iter_tensors())


def test_legacy_bin_format(good, tmp_path):
    tensors = load_file(str(good / SAFETENSORS))
    torch.save(tensors, tmp_path / BIN, _use_new_zipfile_serialization=False)
    wf = inspect_weight_file(tmp_path / BIN)
    assert wf.readable and wf.legacy_format


def test_malicious_bin_is_never_executed(good, tmp_path):
    broken = MUTATIONS["malicious-bin"].apply(good, tmp_path / "m")
    marker = marker_path(broken)
    adapter = read_adapter(broken)
    (wf,) = adapter.weight_files
    assert not wf.readable and "refused, not executed" in wf.error
    assert any("open" in name for name in wf.unsafe_globals)
    assert adapter.primary is None and list(adapter.iter_tensors()) == []
    assert not marker.exists()


def test_malicious_legacy_pickle_is_never_executed(tmp_path):
    import pickle

    from fixtures.mutations import _Payload

    marker = tmp_path / "RAN"
    (tmp_path / BIN).write_bytes(pickle.dumps({"w": _Payload(marker)}))
    wf = inspect_weight_file(tmp_path / BIN)
    assert not wf.readable and not marker.exists()


def test_bin_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / BIN)
    wf = inspect_weight_file(tmp_path / BIN)
    assert not wf.readable and "not a state dict" in wf.error
