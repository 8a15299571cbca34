"""A release's adapters in one run: N adapters against one base, one call vs N separate calls.

Builds a synthetic XComposer base (``--hidden``/``--layers``) and N trained adapters (different seeds and
ranks), then measures, interleaved, in fresh processes:
  one call  - ``plora-harness check --adapter A1 ... --adapter AN --base-model BASE`` (one engine process,
              one base inspection, one set of imports);
  N calls   - ``plora-harness check --adapter Ai --base-model BASE`` once per adapter, one after another.
Prints medians and their ratio (target: one call well under the N calls).

    python benchmarks/multi_adapter.py [--adapters 4] [--hidden 256] [--layers 4] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median  # noqa: E402


def build(root: Path, n: int, hidden: int, layers: int) -> tuple[Path, list[Path]]:
    from harness.synthetic import TINY, BundleSpec, build_bundle

    dims = TINY.with_(vocab_size=1024, hidden_size=hidden, intermediate_size=int(hidden * 3.5),
                      num_hidden_layers=layers, num_attention_heads=max(4, hidden // 64),
                      num_key_value_heads=max(2, hidden // 256))
    bundles = [build_bundle(BundleSpec(dims=dims, seed=0, lora_r=4 + 2 * i, lora_alpha=8, train_steps=1 + i), root)
               for i in range(n)]
    return bundles[0].base_dir, [b.adapter_dir for b in bundles]


def check(adapters: list[Path], base: Path) -> float:
    command = [sys.executable, "-m", "harness.cli", "check", "--quiet", "--trust-remote-code", "--base-model",
               str(base)]
    for adapter in adapters:
        command += ["--adapter", str(adapter)]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(run.stdout[-3000:] + run.stderr[-2000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    one, separate = [], []
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = build(Path(tmp), args.adapters, args.hidden, args.layers)
        base_mb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e6
        for _ in range(args.repeats):
            one.append(check(adapters, base))
            separate.append(sum(check([adapter], base) for adapter in adapters))
    result = {"machine": machine(), "adapters": args.adapters, "base_weights_mb": round(base_mb, 1),
              "repeats": args.repeats, "one_call_median_s": round(median(one), 2),
              "separate_calls_median_s": round(median(separate), 2)}
    result["ratio"] = round(result["one_call_median_s"] / result["separate_calls_median_s"], 2)
    print(f"{args.adapters} adapters, base {base_mb:.0f} MB fp32, {args.repeats} interleaved rounds")
    print(f"one call:       median {result['one_call_median_s']:7.2f} s")
    print(f"separate calls: median {result['separate_calls_median_s']:7.2f} s (sum of {args.adapters})")
    print(f"one call takes {result['ratio']}x the separate calls' time")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
