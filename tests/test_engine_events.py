"""Engine events are types (issue 22): every kind survives the JSON line that carries it between processes,
malformed lines are dropped whole, and the recorder reads each kind, ``exit_called`` included."""

from __future__ import annotations

import dataclasses
import json

import pytest

from harness.engine import events as ev
from harness.engine.plan import Plan
from harness.engine.recorder import Recorder
from harness.report import CheckResult

EXAMPLES = [
    ev.Start(0, ["config-valid", "shapes"]),
    ev.Inputs(0, {"adapter": "/a", "weights": ["adapter_model.safetensors"]}),
    ev.Progress(0, "check shapes"),
    ev.Result(0, CheckResult("shapes", "fail", "rank 4 vs 8", fix="re-save", details={"modules": 2})),
    ev.Work(0, [{"key": "base.load", "name": "loading the base model", "seconds": 1.5, "runs": 1,
                 "checks": ["key-coverage", "effect"]}]),
    ev.Notes(0, ["loaded with attn_implementation='eager'"]),
    ev.Code([{"file": "/b/modeling_x.py", "sha256": "0" * 64, "executed": True}]),
    ev.InputRefused("/a/adapter_config.json: not valid JSON; regenerate it with save_pretrained"),
    ev.Fatal("model code raised SystemExit(3) at /b/modeling_x.py:12"),
    ev.ExitCalled(7, "/b/modeling_x.py:40"),
    ev.Done(),
]


def test_every_kind_is_exemplified_once():
    assert sorted(type(e).kind for e in EXAMPLES) == sorted(ev.KINDS)


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: type(e).kind)
def test_events_round_trip_through_a_json_line(event):
    line = json.dumps(ev.to_dict(event), allow_nan=False)
    assert json.loads(line)["type"] == type(event).kind
    assert ev.from_dict(json.loads(line)) == event


@pytest.mark.parametrize(
    "data",
    [
        {"type": "nonsense"},
        {"adapter": 0, "text": "no type"},
        {"type": "progress", "adapter": 0},  # a field missing
        {"type": "done", "extra": 1},  # a field too many
        {"type": "result", "adapter": 0, "result": "not a result"},
        ["type", "done"],
    ],
)
def test_lines_that_are_not_events_are_dropped_whole(data):
    assert ev.from_dict(data) is None


def test_the_recorder_reads_every_kind_and_names_the_exit_call(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    recorder = Recorder(Plan(adapters=(str(adapter),), only=("shapes",)))
    for event in EXAMPLES[:7]:
        recorder.handle(event)
    recorder.handle(ev.ExitCalled(7, "/b/modeling_x.py:40"))
    report = recorder.reports[0]
    assert report.inputs["weights"] == ["adapter_model.safetensors"] and recorder.running() == "check shapes"
    assert report.get("shapes").message == "rank 4 vs 8" and report.notes and report.code[0]["executed"] is True
    assert [(w.key, w.seconds, w.checks) for w in report.work] == [("base.load", 1.5, ["key-coverage", "effect"])]
    assert recorder.exit_call == ev.ExitCalled(7, "/b/modeling_x.py:40") and not recorder.done
    from harness.engine.supervisor import _describe_end

    said = _describe_end(7, recorder, tmp_path / "no-fault-log")
    assert said == ("the engine process ended with exit code 7 while check shapes: model code called os._exit at "
                    "/b/modeling_x.py:40")
    recorder.handle(ev.Done())
    assert recorder.done and dataclasses.is_dataclass(ev.Done())
