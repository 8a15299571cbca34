"""The figures JSON (what scripts/gpu-check.sh hands back) and the timers behind it."""

import json
import math

import pytest
import torch

from fixtures.gpu.figures import environment, gib, overall_peak, peak_bytes, phase, timed, write_figures


def test_sections_are_kept_and_replaced_one_at_a_time(tmp_path):
    path = tmp_path / "out" / "figures.json"
    write_figures(path, "full_size", {"ok": True, "time_s": {"total": 1.5}})
    write_figures(path, "real_model", {"ok": False})
    write_figures(path, "full_size", {"ok": False, "time_s": {"total": 2.0}})
    data = json.loads(path.read_text())
    assert data == {"full_size": {"ok": False, "time_s": {"total": 2.0}}, "real_model": {"ok": False}}
    assert not list(path.parent.glob("*.tmp"))


def test_non_finite_numbers_and_tensors_become_strict_json(tmp_path):
    path = write_figures(tmp_path / "f.json", "s", {"nan": math.nan, "inf": math.inf, "neg": -math.inf,
                                                   "pair": (1, 2), "t": torch.tensor(0.5), "v": torch.tensor([1, 2])})
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert data["s"] == {"nan": "nan", "inf": "inf", "neg": "-inf", "pair": [1, 2], "t": 0.5, "v": [1, 2]}


def test_a_file_that_is_not_an_object_is_refused(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        write_figures(path, "s", {})


def test_timers_add_up_and_peaks_are_none_on_cpu():
    timings, peaks = {}, {}
    with timed(timings, "a", "cpu"):
        sum(range(1000))
    first = timings["a"]
    with timed(timings, "a", "cpu"):
        pass
    assert timings["a"] >= first > 0
    with phase(timings, peaks, "b", "cpu"):
        pass
    assert peaks == {"b": None} and peak_bytes("cpu") is None and overall_peak(peaks) is None
    assert overall_peak({"x": 3, "y": None, "z": 7}) == 7 and gib(2**31) == 2.0 and gib(None) is None


def test_environment_names_the_stack():
    env = environment("cpu")
    assert {"device", "device_name", "torch", "transformers", "peft", "python"} <= set(env)
    assert env["torch"] == torch.__version__
