"""Static scan speed: ``harness`` static checks vs reading the bytes vs the naive Python check.

Builds a 7B-shaped adapter (official recipe: r=64 on wqkv, wo, w1, w2, w3 over 32 layers,
4096/6144/14336 dims, bf16: about 300 MB) unless ``--adapter`` is given, then measures, in
fresh worker processes, interleaved round by round (warm page cache):
  read   - read the file to nowhere (the floor: memory bandwidth);
  naive  - safetensors.torch.load_file + per-tensor numel / isfinite / any-nonzero in Python;
  harness- harness.api.check on the adapter alone (every byte looked at for finite / noop / empty-tensors).
Prints medians, MB/s, ratios and peak RSS above the worker's baseline; ``--json`` writes them.

    python benchmarks/static_scan.py [--layers 32] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, peak_rss_mb, reset_peak_rss, run_worker  # noqa: E402

MODULES = {"attention.wqkv": (4096, 6144), "attention.wo": (4096, 4096), "feed_forward.w1": (4096, 14336),
           "feed_forward.w3": (4096, 14336), "feed_forward.w2": (14336, 4096)}


def build_adapter(out: Path, layers: int, r: int, dtype_name: str) -> Path:
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        for name, (fan_in, fan_out) in MODULES.items():
            prefix = f"base_model.model.model.layers.{i}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(r, fan_in, generator=gen) * 0.01).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, r, generator=gen) * 0.01).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "lora_dropout": 0.05, "bias": "none",
              "task_type": "CAUSAL_LM", "target_modules": sorted(MODULES), "base_model_name_or_path": None}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def worker(method: str, adapter: Path) -> dict:
    weights = adapter / "adapter_model.safetensors"
    if method == "read":
        baseline = reset_peak_rss()
        start = time.perf_counter()
        with open(weights, "rb", buffering=0) as handle:
            buf = bytearray(8 << 20)
            view = memoryview(buf)
            while handle.readinto(view):
                pass
        seconds = time.perf_counter() - start
    elif method == "naive":
        import torch
        from safetensors.torch import load_file

        baseline = reset_peak_rss()
        start = time.perf_counter()
        tensors = load_file(str(weights))
        problems = 0
        for key, t in tensors.items():
            problems += t.numel() == 0
            problems += not bool(torch.isfinite(t).all())
            if ".lora_B." in key:
                problems += not bool(t.any())
        seconds = time.perf_counter() - start
    else:
        import peft  # noqa: F401

        from harness.api import check  # noqa: F401  (import cost is not the scan's)

        baseline = reset_peak_rss()
        start = time.perf_counter()
        report = check(adapter)  # adapter only: the static checks, in this process
        seconds = time.perf_counter() - start
        assert report.exit_code == 0, report.render()
    return {"seconds": seconds, "rss_mb": peak_rss_mb() - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "ADAPTER"), help=argparse.SUPPRESS)
    parser.add_argument("--adapter", type=Path, help="an existing adapter directory instead of the built one")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], Path(args.worker[1]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter or build_adapter(Path(tmp) / "adapter", args.layers, args.rank, args.dtype)
        size_mb = (adapter / "adapter_model.safetensors").stat().st_size / 1e6
        methods = ["read", "naive", "harness"]
        run_worker(Path(__file__), ["read", str(adapter)])  # warm the page cache
        samples = {m: [] for m in methods}
        for _ in range(args.repeats):
            for method in methods:
                samples[method].append(run_worker(Path(__file__), [method, str(adapter)]))
    result = {"machine": machine(), "file_mb": round(size_mb, 1), "repeats": args.repeats, "methods": {}}
    for method in methods:
        secs = median([s["seconds"] for s in samples[method]])
        rss = median([s["rss_mb"] for s in samples[method]])
        result["methods"][method] = {"median_s": round(secs, 4), "mb_per_s": round(size_mb / secs, 1),
                                     "peak_rss_above_baseline_mb": round(rss, 1)}
    h, n = result["methods"]["harness"], result["methods"]["naive"]
    result["harness_vs_naive_speed"] = round(n["median_s"] / h["median_s"], 2)
    result["harness_rss_vs_file"] = round(h["peak_rss_above_baseline_mb"] / size_mb, 3)
    print(f"adapter file: {size_mb:.1f} MB, {args.repeats} interleaved rounds, warm page cache")
    print(f"{'method':<8} {'median s':>9} {'MB/s':>9} {'peak RSS +MB':>13}")
    for method, row in result["methods"].items():
        print(f"{method:<8} {row['median_s']:>9.3f} {row['mb_per_s']:>9.0f} {row['peak_rss_above_baseline_mb']:>13.1f}")
    print(f"harness is {result['harness_vs_naive_speed']}x the naive check's speed; "
          f"peak RSS {result['harness_rss_vs_file']}x the file size")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
