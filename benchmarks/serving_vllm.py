"""The cost of ``serving-vllm`` per adapter: admission only (a refused adapter), a full engine run, and the saving
when a run's adapters share one engine.

Builds the vLLM-servable tiny Llama of ``fixtures.serving_zoo`` (head_dim 64, local tokenizer) and measures, in
the vLLM venv, each of these ``--repeats`` times, interleaved:
  refused  - ``serving_vllm.serve`` on the rank-32 adapter: the grandchild imports vLLM and applies its admission
             rules, no engine (what a refused adapter costs);
  served   - ``serve`` on the plain adapter: import, admission, an engine (float32, eager), one generate with
             prompt logprobs (what an admitted adapter costs);
  check    - ``harness.check(..., only=["serving-vllm"])`` in this process on the plain adapter: the above plus the
             dynamic run's fp32 reference the logprobs are compared with;
  run3     - ``harness.check_adapters`` on three admissible adapters (plain, patterns, embedding) in one run: one
             grandchild, one engine for the three; reported per adapter (the run's time / 3), to set beside check.
Prints the medians and the grandchild's own phases (import, admission, engine, generate).

    bash scripts/vllm-venv python benchmarks/serving_vllm.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine, median  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import harness
    from fixtures.serving_zoo import build_serving_arch
    from harness.checks.measure import serving_vllm as measure

    if missing := measure.vllm_missing():
        raise SystemExit(f"{missing}; run this with: bash scripts/vllm-venv python benchmarks/serving_vllm.py")
    times: dict[str, list[float]] = {"refused": [], "served": [], "check": [], "run3": []}
    phases: dict[str, list[dict]] = {"refused": [], "served": [], "run3": []}
    with tempfile.TemporaryDirectory() as tmp:
        llama = build_serving_arch("llama", tmp)
        prompts = [[5 + i for i in range(16)], [20 + i for i in range(13)]]
        for _ in range(args.repeats):
            for name, kind in (("refused", "rank32"), ("served", "plain")):
                started = time.perf_counter()
                outcome = measure.serve(llama.base, llama.adapter(kind), prompts)
                measure.close_engines()  # each adapter on its own: a fresh grandchild every time
                times[name].append(time.perf_counter() - started)
                phases[name].append(outcome.seconds)
                assert (name == "refused") == bool(outcome.refusals), outcome
            started = time.perf_counter()
            result = harness.check(llama.adapter("plain"), base_model=llama.base, only=["serving-vllm"],
                                   isolated=False).get("serving-vllm")
            times["check"].append(time.perf_counter() - started)
            assert result.status == "pass", result.message
            kinds = ("plain", "patterns", "embedding")
            started = time.perf_counter()
            run = harness.check_adapters([llama.adapter(kind) for kind in kinds], base_model=llama.base,
                                         only=["serving-vllm"], isolated=False)
            times["run3"].append((time.perf_counter() - started) / len(kinds))
            results = [report.get("serving-vllm") for report in run.reports]
            assert all(r.status == "pass" for r in results), [r.message for r in results]
            assert sum("engine" in r.details["seconds"] for r in results) == 1, [r.details for r in results]
            phases["run3"] = [r.details["seconds"] for r in results]
    summary = {"machine": machine(), "repeats": args.repeats,
               "median_s": {name: round(median(values), 2) for name, values in times.items()},
               "phases_s": phases}
    for name, value in summary["median_s"].items():
        print(f"{name:8s} {value:6.1f} s{' per adapter' if name == 'run3' else ''} (median of {args.repeats})")
    for name, runs in phases.items():
        print(f"{name} phases: {runs[-1]}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
