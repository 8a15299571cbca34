"""Dynamic check cost: ``harness.check(adapter, base_model=...)`` vs the validation script users write today.

Builds a synthetic XComposer base of about 1.5 GB of fp32 weights (``--hidden``/``--layers`` to
resize) and a random r=16 adapter, then measures in fresh worker processes, interleaved, each timed end to end
from before its imports (as ``python script.py`` and ``plora-harness check`` are):
  floor   - load base + adapter, two forward passes (unmerged, merged) and one merge: the minimum;
  naive   - load base, PeftModel.from_pretrained, deep-copy, merge_and_unload, compare outputs;
  harness - harness.check(adapter, base_model=base) (every check, every loading path; the engine runs in a
            child process, so memory is measured over the whole process tree, sampled every 20 ms).
Prints medians of wall time and peak RSS above the worker's baseline, against the base's bytes.

    python benchmarks/dynamic_check.py [--hidden 1024] [--layers 24] [--repeats 3] [--json out.json]
    python benchmarks/dynamic_check.py --hidden 2048 --layers 16 --dtype bfloat16   # issue 19's deep bf16 case

``--dtype bfloat16`` stores the base in bf16 (as released checkpoints are): every method loads it in bf16, and the
harness checks in the stored dtype (its default) against its streamed fp32 reference.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import TreePeak, machine, median, run_worker  # noqa: E402


def build(root: Path, hidden: int, layers: int, dtype: str = "float32") -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    from harness.synthetic import TINY, build_model, export_model
    from harness.synthetic.adapters import OFFICIAL_TARGETS

    dims = TINY.with_(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 3.5),
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256)
    export_model(build_model("ixc2.5", dims), root / "base", dtype=getattr(torch, dtype))
    from harness.loading.base import load_base
    from harness.loading.model_code import remote_code_consent

    # the adapter is trained on the base as users load it (its class from the directory's own code), so the
    # adapter_config's auto_mapping names that class, not this process's module
    with remote_code_consent(True):
        model = load_base(root / "base", dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(OFFICIAL_TARGETS),
                                                  task_type="CAUSAL_LM",
                                                  init_lora_weights=False))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=1e-3)
    peft_model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def _probe(model):
    from harness.numerics.probes import make_probe

    return make_probe(model.get_input_embeddings(), batch_size=2, seq_len=16)


def worker(method: str, base: Path, adapter: Path, dtype: str = "float32") -> dict:
    """One method in this fresh interpreter, timed from before its imports: a user's script imports torch,
    transformers and PEFT itself, and so does the harness's engine child (its parent imports neither)."""
    with TreePeak() as tree:
        start = time.perf_counter()
        if method == "harness":
            import harness

            report = harness.check(adapter, base_model=base, trust_remote_code=True)
            assert report.exit_code == 0, report.render()
        else:
            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            from harness.numerics.probes import mask_kwarg

            model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True, dtype=getattr(torch, dtype)).eval()
            peft_model = PeftModel.from_pretrained(model, adapter).eval()
            probe = _probe(model)
            with torch.no_grad():
                unmerged = peft_model(**probe.model_kwargs(mask_kwarg(peft_model))).logits
                merged_model = (copy.deepcopy(peft_model) if method == "naive" else peft_model).merge_and_unload()
                merged = merged_model(**probe.model_kwargs(mask_kwarg(merged_model))).logits
            if dtype == "float32":  # in bf16 no fixed tolerance holds at depth (the harness calibrates on the noise)
                assert torch.allclose(unmerged, merged, atol=1e-3, rtol=1e-3)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss_mb": tree.above_baseline_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "BASE", "ADAPTER", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the dtype the base is stored in")
    args = parser.parse_args()
    if args.worker:
        method, base, adapter, dtype = args.worker
        print(json.dumps(worker(method, Path(base), Path(adapter), dtype)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = build(Path(tmp), args.hidden, args.layers, args.dtype)
        base_mb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e6
        methods = ["floor", "naive", "harness"]
        samples = {m: [] for m in methods}
        for _ in range(args.repeats):
            for method in methods:
                samples[method].append(run_worker(Path(__file__), [method, str(base), str(adapter), args.dtype]))
    result = {"machine": machine(), "base_weights_mb": round(base_mb, 1), "dtype": args.dtype, "repeats": args.repeats,
              "methods": {}}
    for method in methods:
        secs = median([s["seconds"] for s in samples[method]])
        rss = median([s["rss_mb"] for s in samples[method]])
        result["methods"][method] = {"median_s": round(secs, 2), "peak_rss_above_baseline_mb": round(rss, 1),
                                     "rss_vs_base": round(rss / base_mb, 2)}
    floor = result["methods"]["floor"]["median_s"]
    result["harness_vs_floor_time"] = round(result["methods"]["harness"]["median_s"] / floor, 2)
    print(f"base weights: {base_mb:.0f} MB {args.dtype}, {args.repeats} interleaved rounds")
    print(f"{'method':<8} {'median s':>9} {'peak RSS +MB':>13} {'x base':>7}")
    for method, row in result["methods"].items():
        print(f"{method:<8} {row['median_s']:>9.2f} {row['peak_rss_above_baseline_mb']:>13.0f} {row['rss_vs_base']:>7.2f}")
    print(f"harness takes {result['harness_vs_floor_time']}x the floor's time")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
