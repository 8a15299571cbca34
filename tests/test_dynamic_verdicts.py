"""The dynamic checks' verdicts on recorded runs: each way a run goes wrong fails (or warns) with its message.

The end-to-end tests (test_checks_dynamic.py) load models on every path, minutes for the whole file; these feed
each check a run as ``DynamicRun`` records it (load records, comparisons, logits), so the mutation run
(scripts/mutation-test.sh) judges the check bodies in seconds. A broken record here is one a real load produces:
keys PEFT dropped, an output outside the tolerance, a merge that left PLoRA changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from harness.checks.context import CheckContext
from harness.checks.registry import get_check, run_check
from harness.loading.records import LoadRecord
from harness.numerics.compare import Comparison
from harness.numerics.probes import make_probe

KEY = "base_model.model.model.layers.0.attention.wqkv.lora_A.weight"


def comparison(label: str, *, ok: bool = True, image: float = 1e-7, text: float = 2e-7, non_finite=None) -> Comparison:
    return Comparison(label=label, dtype="float32", tolerance=1e-5, image_max_abs=image, image_max_rel=image,
                      text_max_abs=text, text_max_rel=text, worst_row=("image", 1, 5) if not ok else ("", -1, -1),
                      ok=ok, non_finite=non_finite)


@dataclass
class Outcome:  # harness.checks.measure.dynamic_run.PathOutcome's fields
    name: str
    record: LoadRecord = None
    comparison: Comparison = None
    logits: torch.Tensor = None
    error: str | None = None
    non_finite: str | None = None
    unmerged_wrappers: list = field(default_factory=list)
    plora_changed: list = field(default_factory=list)
    class_changes: list = field(default_factory=list)


PROBE = make_probe(torch.nn.Embedding(32, 8), batch_size=2, seq_len=16, image_spans=[(4, 11)], left_padding=[0, 3])
TEXT_PROBE = make_probe(torch.nn.Embedding(32, 8), batch_size=2, seq_len=16, image_spans=[], left_padding=[0, 3])
LOGITS = torch.linspace(-1, 1, 2 * 16 * 4).reshape(2, 16, 4)


class Run:
    """What the checks read of a ``DynamicRun``: every path loads cleanly and matches, unless told otherwise."""

    load_error = None
    non_finite = None
    raw_load = None
    dtype = torch.float32
    dtype_name = "float32"
    tolerance = 1e-5
    basis = "the table's 1e-05"
    bands = {"image": 1e-5, "text": 1e-5}
    noise = {"image": 1e-8, "text": 1e-8}
    effect = {"image": 0.1, "text": 0.1}
    reference_mode = "streamed"
    probe, text_probe = PROBE, TEXT_PROBE

    def __init__(self, **outcomes: Outcome):
        self.outcomes = {o.name: o for o in outcomes.values()}
        # the adapter changes every output by 10% of the base's scale
        self.base_logits, self.text_base_logits = LOGITS, LOGITS
        self.reference_logits, self.text_reference_logits = LOGITS + 0.1, LOGITS + 0.1
        self.base_plora = {"model.layers.0.attention.wqkv.Plora_A.weight": "fp"}
        self.base_classes = {"model.layers.0.attention.wqkv": "PLoRA"}

    def outcome(self, name: str) -> Outcome:
        if name not in self.outcomes:
            self.outcomes[name] = Outcome(name, LoadRecord(path=name), comparison(name), logits=LOGITS + 0.1)
        return self.outcomes[name]


def verdict(check_id: str, run: Run, tmp_path, **config):
    ctx = CheckContext(adapter=SimpleNamespace(config=config, root=tmp_path), base=SimpleNamespace(base_dir=tmp_path),
                       cache={"dynamic.run": run})
    return run_check(get_check(check_id), ctx)


# -- key-coverage ------------------------------------------------------------------------------------


def test_key_coverage_passes_a_clean_record(tmp_path):
    got = verdict("key-coverage", Run(), tmp_path)
    assert (got.status, got.message) == ("pass", "every saved adapter key loads into its LoRA layer (0 missing, 0 "
                                                 "unexpected)")
    assert got.details["raw_load_state_dict"] is None


def test_key_coverage_fails_on_keys_peft_dropped_as_unexpected(tmp_path):
    """The hand-planted bug of issue 22: a record whose only problem is an unexpected key must not pass."""
    run = Run(peft=Outcome("peft", LoadRecord(path="peft", unexpected_keys=[KEY]), comparison("peft")))
    got = verdict("key-coverage", run, tmp_path)
    assert got.status == "fail"
    assert got.message == (f"after PeftModel.from_pretrained: 0 missing, 1 unexpected, 0 not loaded adapter keys "
                           f"(e.g. {KEY})")
    assert got.details["unexpected"] == [KEY] and got.fix.startswith("save with peft_model.save_pretrained()")


@pytest.mark.parametrize("kind", ["missing_keys", "not_loaded"])
def test_key_coverage_fails_on_missing_or_not_loaded_keys(kind, tmp_path):
    keys = [f"{KEY}{i}" for i in range(12)]
    run = Run(peft=Outcome("peft", LoadRecord(path="peft", **{kind: keys}), comparison("peft")))
    got = verdict("key-coverage", run, tmp_path)
    counts = {"missing_keys": "12 missing, 0 unexpected, 0 not loaded", "not_loaded": "0 missing, 0 unexpected, "
              "12 not loaded"}[kind]
    assert (got.status, got.message) == ("fail", f"after PeftModel.from_pretrained: {counts} adapter keys (e.g. {KEY}0)")
    assert got.details[{"missing_keys": "missing", "not_loaded": "not_loaded"}[kind]] == keys[:10]


def test_key_coverage_fails_when_peft_cannot_load(tmp_path):
    run = Run(peft=Outcome("peft", error="ValueError: size mismatch"))
    got = verdict("key-coverage", run, tmp_path)
    assert (got.status, got.message) == ("fail", "PeftModel.from_pretrained failed: ValueError: size mismatch")


def test_key_coverage_skips_without_a_base_and_fails_when_the_base_does_not_load(tmp_path):
    ctx = CheckContext(adapter=SimpleNamespace(config={}, root=tmp_path))
    assert run_check(get_check("key-coverage"), ctx).message == "no --base-model given"
    run = Run()
    run.load_error = "modeling_x.py line 3: NameError"
    got = verdict("key-coverage", run, tmp_path)
    assert (got.status, got.message) == ("fail", "the base model cannot be checked: modeling_x.py line 3: NameError")
    assert got.fix.startswith("make the base directory load on its own first")
    ctx = CheckContext(adapter=SimpleNamespace(config={}, root=tmp_path), base=SimpleNamespace(base_dir=tmp_path),
                       failed_prerequisites=["noop", "config-valid", "finite", "weights-readable"],
                       cache={"dynamic.slices": None})  # the base fits: no depth slices
    got = run_check(get_check("key-coverage"), ctx)
    assert (got.status, got.message) == ("skip", "the adapter cannot be loaded until config-valid, weights-readable "
                                                 "pass(es)")
