"""The input layer: bounded safetensors parsing, safe .bin loading, InputError vs recorded problems."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import given, settings
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


# -- hostile files: kinds, strict bounded JSON, the safetensors library's own header rules, pickles ----------


@pytest.mark.parametrize("kind", ["fifo", "directory", "socket"])
def test_non_regular_config_is_refused_before_opening(good, tmp_path, kind):
    import socket

    adapter_dir = copy_adapter(good, tmp_path / "a")
    (adapter_dir / CONFIG).unlink()
    if kind == "fifo":
        os.mkfifo(adapter_dir / CONFIG)  # opening it would block for ever: the test itself would hang
    elif kind == "directory":
        (adapter_dir / CONFIG).mkdir()
    else:
        short = tmp_path / "s"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(short))
        os.rename(short, adapter_dir / CONFIG)
    with pytest.raises(InputError, match="not a regular file") as info:
        read_adapter(adapter_dir)
    assert str(info.value).startswith(str(adapter_dir / CONFIG)) and "save_pretrained" in str(info.value)


def test_non_regular_weights_and_optional_config_are_recorded(good, tmp_path):
    adapter_dir = copy_adapter(good, tmp_path / "a")
    (adapter_dir / SAFETENSORS).unlink()
    os.mkfifo(adapter_dir / SAFETENSORS)
    os.mkfifo(adapter_dir / "config.json")
    adapter = read_adapter(adapter_dir)
    (wf,) = adapter.weight_files
    assert not wf.readable and "FIFO" in wf.error and adapter.primary is None
    assert adapter.model_config == {} and "FIFO" in adapter.model_config_error


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"r": NaN}', "NaN is not a JSON number"),
        ('{"r": -Infinity}', "-Infinity is not a JSON number"),
        ('{"r": 1e309}', "overflows a 64-bit float"),
        ('{"r": ' + "9" * 5000 + "}", "5000-digit integer"),
        ('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper than 64"),
        ('{"r": ' + "[" * 65 + "]" * 65 + "}", "nested deeper than 64"),
        ('{"r\\ud800": 1}', "lone surrogate \\ud800"),
        ('{"r": "\\udfff"}', "lone surrogate \\udfff"),
        ('{"r": 1, "r": 2}', "'r' appears twice"),
        ("\ufeff{}", "not valid JSON"),
        (b'{"r": "\xff"}', "not UTF-8 JSON"),
    ],
)
def test_strict_json_refuses_what_other_parsers_refuse(text, fragment):
    from harness.inputs.files import JsonError, parse_json

    with pytest.raises(JsonError) as info:
        parse_json(text)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_strict_json_keeps_ordinary_values():
    from harness.inputs.files import parse_json

    text = '{"a": [1, -2.5e-3, "\\ud83d\\ude00", null, true], "b": {"c": ' + "[" * 60 + "]" * 60 + "}}"
    assert parse_json(text)["a"] == [1, -0.0025, "\U0001f600", None, True]


def test_config_reader_bounds_size_and_names_the_file(tmp_path):
    from harness.inputs.files import read_json_object

    path = tmp_path / "config.json"
    path.write_text('{"x": "' + "a" * 2000 + '"}')
    with pytest.raises(InputError, match=r"config\.json: .*over the 1000 B limit"):
        read_json_object(path, limit=1000)
    path.write_text('{"max_position_embeddings": ' + "9" * 5000 + "}")
    with pytest.raises(InputError, match=r"config\.json: a 5000-digit integer; regenerate it"):
        read_json_object(path)


def test_input_error_text_is_one_escaped_line():
    text = str(InputError("/tmp/a\x1b[2J\x07b\nc: broken; fix it" + "x" * 5000))
    assert "\x1b" not in text and "\x07" not in text and "\n" not in text and "\\x1b" in text
    assert len(text) < 1100 and "more characters" in text


def _header_file(path, header_text: str, body: bytes):
    raw = header_text.encode("utf-8", "surrogatepass")
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return path


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        ('{"__metadata__": {"format": 1}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
         "__metadata__ must map strings to strings"),
        ('{"a": {"dtype": {"F32": 1}, "shape": [2], "data_offsets": [0, 8]}}', "unknown dtype"),
        ('{"a": {"dtype": "F32", "shape": [0, 1180591620717411303424], "data_offsets": [0, 0]},'
         ' "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "invalid shape"),
        ('{"a": {"dtype": "F32", "shape": [1099511627776, 1099511627776, 0], "data_offsets": [0, 0]},'
         ' "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "overflows 64 bits"),
        ('{"a": {"dtype": "F32", "shape": [0, 18446744073709551615], "data_offsets": [0, 0]},'
         ' "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "over 2**63-1"),
        ('{"a\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "lone surrogate"),
        ('{"a": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "appears twice"),
        ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}', "invalid data_offsets"),
        ('{"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}', "byte boundary"),
    ],
)
def test_header_rules_are_the_safetensors_librarys(tmp_path, header, fragment):
    from safetensors import safe_open

    path = _header_file(tmp_path / "x.safetensors", header, b"\0" * 8)
    with pytest.raises(WeightsError, match=re_escape(fragment)) as info:
        parse_safetensors_header(path)
    assert "corrupt" in str(info.value) and "ZeRO" not in str(info.value)
    with pytest.raises(Exception):  # noqa: B017 - the library refuses it too (header or tensor)
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


_DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL", "F8_E4M3",
           "F8_E5M2", "C64", "F6_E2M3", "f32", "", "F99"]
_DIMS = st.one_of(st.integers(0, 4), st.sampled_from([2**31, 2**32, 2**40, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70]),
                  st.integers(-2, -1), st.floats(0, 4), st.booleans())
_ENTRY = st.fixed_dictionaries({"dtype": st.sampled_from(_DTYPES) | st.integers(0, 3) | st.none(),
                                "shape": st.lists(_DIMS, max_size=3) | st.none()})
_NAMES = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=6) | st.just("a\ud800")
_METADATA = st.none() | st.dictionaries(st.text(max_size=3), st.text(max_size=3) | st.integers(0, 3), max_size=2) \
    | st.just([]) | st.just("x")


@settings(max_examples=300, deadline=None)
@given(entries=st.dictionaries(_NAMES, _ENTRY, min_size=1, max_size=3), metadata=_METADATA,
       skew=st.sampled_from([0, 0, 0, 1, -1]), lead=st.sampled_from(["", " ", "\n"]), tail=st.binary(max_size=2))
def test_header_agrees_with_the_safetensors_library(tmp_path_factory, entries, metadata, skew, lead, tail):
    """The oracle is the library itself: whenever safe_open + get_tensor refuses a file, the harness refuses it
    (its header, or reading a tensor); whenever the harness accepts a file, so does the library."""
    from safetensors import safe_open

    from harness.inputs.weights import SAFETENSORS_DTYPES

    header, offset = {}, 0
    for name, entry in entries.items():
        bits = SAFETENSORS_DTYPES.get(entry["dtype"], (8, None))[0] if isinstance(entry["dtype"], str) else 8
        numel = 1
        for dim in entry["shape"] or []:
            numel *= dim if isinstance(dim, int) and not isinstance(dim, bool) and 0 <= dim < 64 else 1
        size = max(0, numel * bits // 8 + skew)
        header[name] = {**entry, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata is not None:
        header["__metadata__"] = metadata
    text = lead + json.dumps(header, ensure_ascii=True)
    path = _header_file(tmp_path_factory.mktemp("h") / "x.safetensors", text, b"\1" * offset + tail)
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key)
        library_ok = True
    except Exception:  # noqa: BLE001 - any refusal
        library_ok = False
    wf = inspect_weight_file(path)
    harness_ok = wf.readable and not any(s.error for s in scan_weight_file(wf).values())
    exotic = any(e.get("dtype") in ("F4", "F6_E2M3", "F6_E3M2") for e in header.values() if isinstance(e, dict))
    if not library_ok:
        assert not harness_ok, f"the library refuses, the harness accepts: {text[:300]!r}"
    elif not exotic:  # sub-byte floats torch has no dtype for: the harness cannot read them, knowingly
        assert harness_ok, f"the library accepts, the harness refuses ({wf.error}): {text[:300]!r}"


def test_random_bytes_named_bin_are_corrupt_not_a_pickle(tmp_path):
    import random

    (tmp_path / BIN).write_bytes(random.Random(1).randbytes(4096))
    wf = inspect_weight_file(tmp_path / BIN)
    assert not wf.readable and "corrupt" in wf.error and not wf.unsafe_globals


@pytest.mark.parametrize("layout", ["legacy", "raw-protocol-2", "raw-protocol-5"])
def test_legacy_and_raw_pickles_name_the_global_they_need(tmp_path, layout):
    import pickle

    from fixtures.hostile import SystemCall

    marker = tmp_path / "RAN"
    payload = {"w": torch.zeros(2), "x": SystemCall(f"touch {marker}")}
    if layout == "legacy":
        torch.save(payload, tmp_path / BIN, _use_new_zipfile_serialization=False)
    else:
        (tmp_path / BIN).write_bytes(pickle.dumps({"x": payload["x"]}, protocol=int(layout[-1])))
    wf = inspect_weight_file(tmp_path / BIN)
    assert not wf.readable and wf.unsafe_globals == ["posix.system"] and "refused, not executed" in wf.error
    assert not marker.exists()


def test_pickle_scan_resolves_memoised_stack_globals(tmp_path):
    import pickle

    from harness.inputs.weights import pickle_globals

    data = pickle.dumps([os.system, os.getcwd, print], protocol=4)  # "posix" pushed once, then fetched from the memo
    assert b"\x94" in data  # MEMOIZE
    (tmp_path / "p.bin").write_bytes(data)
    assert pickle_globals(tmp_path / "p.bin") == ["builtins.print", "posix.getcwd", "posix.system"]


def test_model_directories_with_a_fifo_anywhere_are_refused(tmp_path):
    from harness.inputs.code import require_trust

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "sub").mkdir()
    assert require_trust({"base model": base}, trusted=False) == []
    os.mkfifo(base / "tokenizer.model")
    with pytest.raises(InputError, match=r"tokenizer\.model: a FIFO \(named pipe\) in the base model directory"):
        require_trust({"base model": base}, trusted=True)
