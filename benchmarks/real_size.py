"""The harness at the real size and dtype: a 7B-shaped synthetic XComposer in bf16, its official r=64 adapter, its
official merge and three broken merges, checked with default options and under a memory budget.

Everything is written streamed, one tensor at a time, so nothing is ever held twice: the base (shards of about
2 GB, values regenerated from their seeds), the adapter, the merge (each shard folded with ΔW in fp32 and cast to
bf16), and the broken merges, which hard-link every shard they share with the good merge and rewrite only the one
that holds their fault:

- ``unmerged-27``: layer 27 left unmerged (its weights are the base's);
- ``doubled-30``: ΔW added twice in layer 30;
- ``plora-folded-5``: PLoRA folded into the base weight of layer 5 (W + s·B·A of Plora_A/B).

Then ``plora-harness check --adapter A --base-model B --merged M --trust-remote-code`` runs on each, with default
options and with ``--max-memory``; printed: the verdicts, peak RSS over the process tree, wall time, and what the
naive script (load, PeftModel, deepcopy, merge, compare) does on the same machine.

    bash scripts/in-venv python benchmarks/real_size.py --workdir /data/real-size          # 7B: ~40 GB of disk
    bash scripts/in-venv python benchmarks/real_size.py --dims 4x1024 --workdir /tmp/rs   # a quick rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import TreePeak  # noqa: E402

from harness.synthetic.export import AUTO_MAP, MODELING_DIR, REMOTE_CODE_FILES, build_tokenizer  # noqa: E402
from harness.synthetic.family import FULL_7B, Dims, build_model, make_config  # noqa: E402

VARIANT = "ixc2.5"
TARGETS = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
SHARD_BYTES = 2 * 2**30
RANK = 64
BROKEN = {"unmerged-27": 27, "doubled-30": 30, "plora-folded-5": 5}


def broken_layer(layer: int, dims: Dims) -> int:
    """The layer of a fault on the 32-layer model, at the same relative depth on a shallower rehearsal."""
    return layer if layer < dims.num_hidden_layers else layer * dims.num_hidden_layers // FULL_7B.num_hidden_layers


def dims_from(text: str) -> Dims:
    if text == "full":
        return FULL_7B
    layers, hidden = map(int, text.split("x"))
    return FULL_7B.with_(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=hidden * 7 // 2,
                         num_attention_heads=max(4, hidden // 128), num_key_value_heads=max(2, hidden // 512),
                         vision_hidden_size=256, vision_intermediate_size=512, vision_layers=2, vision_heads=4,
                         image_size=56, patch_size=14)


def value_of(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A deterministic bf16 weight (normal, std 0.02; norms at 1): regenerated the same way every time."""
    if name.endswith("norm.weight") or "layernorm" in name or name.endswith("ln.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) ^ seed)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def write_shards(named_shapes: list[tuple[str, tuple[int, ...]]], out: Path, make) -> dict[str, str]:
    """Tensors from ``make(name, shape)`` into ~2 GB safetensors shards, one shard in memory at a time."""
    weight_map, shard, size, index = {}, {}, 0, 0
    names = []

    def flush():
        nonlocal shard, size, index
        if shard:
            index += 1
            file = f"model-{index:05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
            names.append(file)
            shard, size = {}, 0

    for name, shape in named_shapes:
        tensor = make(name, shape)
        shard[name] = tensor
        size += tensor.numel() * tensor.element_size()
        if size >= SHARD_BYTES:
            flush()
    flush()
    total = len(names)
    for old in names:  # HF's naming: model-00001-of-0000N
        new = old.replace(".safetensors", f"-of-{total:05d}.safetensors")
        (out / old).rename(out / new)
        weight_map = {k: (new if v == old else v) for k, v in weight_map.items()}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def build_base(dims: Dims, out: Path) -> list[tuple[str, tuple[int, ...]]]:
    """config, code, tokenizer and the weights (generated tensor by tensor from a meta-device build)."""
    out.mkdir(parents=True)
    meta = build_model(VARIANT, dims, device="meta")
    config = make_config(VARIANT, dims)
    config.auto_map = dict(AUTO_MAP)
    config.torch_dtype = torch.bfloat16
    config.save_pretrained(out)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(MODELING_DIR / name, out / name)
    build_tokenizer(dims.vocab_size).save_pretrained(out)
    shapes = [(name, tuple(p.shape)) for name, p in meta.state_dict(keep_vars=True).items()]
    write_shards(shapes, out, lambda name, shape: value_of(name, shape, seed=0))
    return shapes


def lora_parts(shapes) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (lora_A [r, in], lora_B [out, r]) of the official recipe's targets, deterministic."""
    parts = {}
    for name, shape in shapes:
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and any(module.endswith(t) for t in TARGETS) and "Plora" not in name:
            out_features, in_features = shape
            gen = torch.Generator().manual_seed(zlib.crc32(module.encode()))
            parts[module] = (torch.randn(RANK, in_features, generator=gen) * (1 / in_features ** 0.5),
                             torch.randn(out_features, RANK, generator=gen) * 0.004)
    return parts


def build_adapter(parts, out: Path) -> None:
    out.mkdir(parents=True)
    tensors = {}
    for module, (a, b) in parts.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(torch.bfloat16)
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(torch.bfloat16)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": RANK, "lora_dropout": 0.05,
        "target_modules": TARGETS, "bias": "none", "base_model_name_or_path": None, "fan_in_fan_out": False,
        "inference_mode": True, "modules_to_save": None}))


def merged_value(base_dir: Path, parts, name: str, shape, fault: str | None = None, layer: int = -1):
    """The merged bf16 tensor ``name`` (W + s·B·A in fp32, then bf16), with ``fault`` applied in ``layer``."""
    from safetensors import safe_open

    weight_map = json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(base_dir / weight_map[name]), "pt") as f:
        base = f.get_tensor(name)
    module = name.removesuffix(".weight")
    in_layer = f".layers.{layer}." in name
    if fault == "plora-folded" and in_layer and module in parts:
        with safe_open(str(base_dir / weight_map[f"{module}.Plora_A.weight"]), "pt") as f:
            plora_a = f.get_tensor(f"{module}.Plora_A.weight").float()
        with safe_open(str(base_dir / weight_map[f"{module}.Plora_B.weight"]), "pt") as f:
            plora_b = f.get_tensor(f"{module}.Plora_B.weight").float()
        base = (base.float() + plora_b @ plora_a).to(torch.bfloat16)
    if module not in parts or (fault == "unmerged" and in_layer):
        return base
    a, b = parts[module]
    times = 2.0 if fault == "doubled" and in_layer else 1.0
    return (base.float() + times * (b.to(torch.bfloat16).float() @ a.to(torch.bfloat16).float())).to(torch.bfloat16)


def build_merged(base_dir: Path, shapes, parts, out: Path, *, good: Path | None = None, fault: str | None = None,
                 layer: int = -1) -> None:
    """The official merge (``good`` None), or a broken one sharing every unchanged shard with ``good`` (links)."""
    out.mkdir(parents=True)
    for path in base_dir.iterdir():
        if not path.name.endswith(".safetensors") and path.name != "model.safetensors.index.json":
            shutil.copyfile(path, out / path.name)
    if good is None:
        write_shards(shapes, out, lambda name, shape: merged_value(base_dir, parts, name, shape))
        return
    weight_map = json.loads((good / "model.safetensors.index.json").read_text())["weight_map"]
    shutil.copyfile(good / "model.safetensors.index.json", out / "model.safetensors.index.json")
    touched = {file for name, file in weight_map.items() if f".layers.{layer}." in name}
    for file in sorted(set(weight_map.values())):
        if file not in touched:
            os.link(good / file, out / file)
            continue
        names = [name for name, f in weight_map.items() if f == file]
        shard = {name: merged_value(base_dir, parts, name, None, fault, layer) for name in names}
        save_file(shard, str(out / file), metadata={"format": "pt"})


def run_check(args: list[str]) -> dict:
    """One ``plora-harness check`` as a user runs it: exit code, verdicts, peak RSS over the process tree, wall."""
    start = time.perf_counter()
    with TreePeak() as peak:
        proc = subprocess.run([sys.executable, "-m", "harness.cli", "check", *args, "--json", "-"],
                              capture_output=True, text=True)
    wall = time.perf_counter() - start
    verdicts = {}
    try:
        report = json.loads(proc.stdout)
        for adapter in report.get("adapters", [report]):
            for check in adapter.get("checks", []):
                verdicts[check["id"]] = (check["status"], check["message"][:160], check.get("duration_s"))
    except json.JSONDecodeError:
        verdicts["(no report)"] = ("error", (proc.stderr or proc.stdout)[-300:], None)
    return {"exit": proc.returncode, "wall_s": wall, "peak_gib": peak.peak_mb / 1024,
            "check_gib": peak.above_baseline_mb / 1024, "verdicts": verdicts}


def naive(base_dir: Path, adapter_dir: Path, limit_mb: float | None = None) -> dict:
    """The script users write: load, PeftModel, deepcopy, merge, compare (its peak over the process tree)."""
    code = f"""
import copy, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
m = AutoModelForCausalLM.from_pretrained({str(base_dir)!r}, trust_remote_code=True, torch_dtype=torch.bfloat16)
p = PeftModel.from_pretrained(m, {str(adapter_dir)!r})
ids = torch.randint(4, 1000, (1, 16))
un = p(input_ids=ids).logits
merged = copy.deepcopy(p).merge_and_unload()
print(float((merged(input_ids=ids).logits - un).abs().max()))
"""
    # It holds the model twice (deepcopy): on a machine smaller than that it thrashes or is killed by the kernel,
    # taking other work with it. Stopped here first once the tree would leave less than 1 GiB of memory free.
    limit_mb = (_available_mb() - 1024) if limit_mb is None else limit_mb
    start = time.perf_counter()
    with TreePeak() as peak:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stopped = None
        while proc.poll() is None:
            if peak.peak_mb - peak.baseline_mb > limit_mb:
                stopped = (f"stopped by the benchmark at {(peak.peak_mb - peak.baseline_mb) / 1024:.1f} GiB after "
                           f"{time.perf_counter() - start:.0f} s (the machine had {limit_mb / 1024:.1f} GiB to give)")
                proc.kill()
            time.sleep(0.2)
        out, err = proc.communicate()
    tail = stopped or ((out + err).strip().splitlines()[-1:] if proc.returncode else out.strip())
    return {"exit": proc.returncode, "wall_s": time.perf_counter() - start, "peak_gib": peak.peak_mb / 1024,
            "check_gib": peak.above_baseline_mb / 1024, "tail": tail}


def _available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="full", help="'full' (7B) or LAYERSxHIDDEN for a rehearsal")
    parser.add_argument("--workdir", required=True, help="where the models are written (about 40 GB for 7B)")
    parser.add_argument("--max-memory", default="8GiB")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--naive-only", action="store_true", help="run only the naive script (the models exist)")
    parser.add_argument("--only", nargs="*", default=None, help="merged variants to check (default: all)")
    parser.add_argument("--runs", choices=("both", "defaults", "budget"), default="both",
                        help="check each variant with default options, with --max-memory, or both (default)")
    parser.add_argument("--build-only", action="store_true", help="build the models and stop")
    args = parser.parse_args()
    dims = dims_from(args.dims)
    work = Path(args.workdir)
    base, adapter, merged = work / "base", work / "adapter", work / "merged"
    timings = {}
    if not base.exists():
        start = time.perf_counter()
        shapes = build_base(dims, base)
        parts = lora_parts(shapes)
        build_adapter(parts, adapter)
        build_merged(base, shapes, parts, merged)
        for name, layer in BROKEN.items():
            build_merged(base, shapes, parts, work / name, good=merged, fault=name.rsplit("-", 1)[0],
                         layer=broken_layer(layer, dims))
        timings["build_s"] = time.perf_counter() - start
        del shapes, parts  # the checks below are measured over a tree that includes this process
    size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**30
    config = json.loads((base / "config.json").read_text())  # what was built, whatever --dims says now
    print(f"base: {base} ({size:.1f} GiB in bf16, {config['num_hidden_layers']} layers, hidden {config['hidden_size']}); "
          f"build {timings.get('build_s', 0):.0f} s", flush=True)
    variants = ["merged", *BROKEN]
    runs = {"both": ([], ["--max-memory", args.max_memory]), "defaults": ([],),
            "budget": (["--max-memory", args.max_memory],)}[args.runs]
    for variant in [] if args.naive_only or args.build_only else args.only or variants:
        for options in runs:
            result = run_check(["--adapter", str(adapter), "--base-model", str(base), "--merged", str(work / variant),
                                "--trust-remote-code", *options])
            label = f"{variant} {' '.join(options) or '(defaults)'}"
            print(f"\n== {label}: exit {result['exit']}, peak {result['check_gib']:.2f} GiB over plora-harness's "
                  f"process tree ({result['peak_gib']:.2f} GiB with this benchmark's own process), "
                  f"wall {result['wall_s']:.0f} s", flush=True)
            for check_id, (status, message, duration) in result["verdicts"].items():
                print(f"   {check_id:<18} {status:<5} {duration or 0:7.1f}s  {message}", flush=True)
    if not args.skip_naive and not args.build_only:
        result = naive(base, adapter)
        print(f"\n== naive script (load, PeftModel, deepcopy, merge, compare): exit {result['exit']}, peak "
              f"{result['check_gib']:.2f} GiB over its process tree, wall {result['wall_s']:.0f} s: {result['tail']}")


if __name__ == "__main__":
    main()
