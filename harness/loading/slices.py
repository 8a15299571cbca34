"""Depth slices: the dynamic checks of a base too large for the memory budget, run on a few layers at a time.

A slice is a real model directory made from the base: its own code and small files, a config with fewer layers,
the non-layer tensors (embeddings, norms, head, vision tower) and the chosen decoder layers renumbered from 0,
read tensor by tensor from the base's safetensors (a private mmap; never the whole checkpoint), and an adapter
with the tensors of those layers renumbered the same way (``layers_to_transform``, ``rank_pattern``,
``alpha_pattern`` and a ``target_modules`` regex follow). Every loading path then runs on the slice exactly as users run it
on the whole model. The slices together hold every layer the adapter touches.

What a slice does not show: interactions across slices (a layer's error reaching later layers outside its
slice) and the full depth's accumulated rounding; the merged checkpoint (``merged-matches``) and the static checks
still read every tensor of the whole model, streamed.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.dtypes import DType
from harness.model.structure import BaseModelInfo

LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
BYTES = {d.value: d.bytes for d in DType}
# What one run holds beyond the model under test, over the whole process tree (measured with
# benchmarks/real_size.py on an 8-layer, hidden-1024 bf16 base, README "Memory budget and depth slices"):
# PEFT's wrappers, one layer's fp32 copy in the streamed reference, ΔW of one module, the probes, a merge's
# transient copies (x1.5 of the model), and the two processes' imports (the CLI and the engine child with
# torch, transformers, peft and their allocators: about 2.2 GiB).
MODEL_OVERHEAD = 1.5
ENGINE_BYTES = 2_400_000_000


@dataclass(frozen=True)
class DepthSlice:
    """Layers ``layers`` of the base (original indices, in order) as a model and an adapter of their own."""

    layers: tuple[int, ...]
    base_dir: Path
    adapter_dir: Path

    @property
    def label(self) -> str:
        first, last = self.layers[0], self.layers[-1]
        return f"layers {first}-{last}" if last != first else f"layer {first}"


@dataclass(frozen=True)
class LayerLayout:
    """Where the decoder layers sit: the ModuleList's name (also the checkpoint keys' prefix) and how many."""

    prefix: str  # e.g. "model.layers"
    count: int
    count_field: str  # the config field that says how many


def layer_layout(info: BaseModelInfo) -> LayerLayout | None:
    """The decoder layers of ``info`` (the ModuleList as long as the config's layer count whose indices prefix the
    checkpoint's keys); None when the base has no such list (then it is not sliced)."""
    field = next((f for f in LAYER_COUNT_FIELDS if isinstance(info.config.get(f), int)), None)
    if field is None:
        return None
    count = info.config[field]
    pattern = re.compile(r"^(.*)\.(\d+)\.")
    prefixes: dict[str, set[int]] = {}
    for key in info.weights:
        match = pattern.match(key)
        while match:
            prefixes.setdefault(match.group(1), set()).add(int(match.group(2)))
            match = pattern.match(match.group(1) + ".")
    candidates = [p for p, indices in prefixes.items() if indices == set(range(count)) and not p[-1:].isdigit()]
    if not candidates:
        return None
    return LayerLayout(prefix=min(candidates, key=len), count=count, count_field=field)


def model_bytes(info: BaseModelInfo, dtype: str, layers: int | None = None, layout: LayerLayout | None = None) -> int:
    """Bytes of the base's floating tensors in ``dtype`` (only ``layers`` decoder layers when given)."""
    size = BYTES.get(dtype, 4)
    total = 0
    for key, (shape, _) in info.weights.items():
        numel = 1
        for dim in shape:
            numel *= dim
        if layout is not None and layers is not None and key.startswith(layout.prefix + "."):
            numel = numel * layers / layout.count  # every layer is alike: the share of ``layers`` of them
        total += numel * size
    return int(total)


def needed_bytes(info: BaseModelInfo, dtype: str, layers: int | None = None,
                 layout: LayerLayout | None = None) -> int:
    """What one dynamic run needs at its peak: the model under test once, its overheads, the engine."""
    return int(model_bytes(info, dtype, layers, layout) * MODEL_OVERHEAD) + ENGINE_BYTES


def disk_bytes(info: BaseModelInfo, dtype: str, stored: str | None, layers: int | None = None,
               layout: LayerLayout | None = None) -> int:
    """Temporary disk one dynamic run writes: the merge script's saved copy in ``dtype`` and, for a slice
    (``layers`` given), the slice itself in the ``stored`` dtype (x1.1: configs, code, safetensors headers)."""
    written = model_bytes(info, dtype, layers, layout)
    if layers is not None:
        written += model_bytes(info, stored or dtype, layers, layout)
    return int(1.1 * written)


class SlicePlanError(ValueError):
    """Why depth slices cannot help (``resource``: "layout", "memory" or "disk"), with the fix a user applies."""

    FIXES = {"layout": "run on a machine with more memory (or --device cuda), or check a smaller base",
             "memory": "run on a machine with more memory (or --device cuda), or check a smaller base",
             "disk": "point TMPDIR at a disk with room for one slice and its merged copy"}

    def __init__(self, message: str, resource: str) -> None:
        super().__init__(message)
        self.resource = resource
        self.fix = self.FIXES[resource]


def run_dtypes(info: BaseModelInfo, asked: str | None) -> tuple[str, str | None]:
    """(the dtype the dynamic checks load the base in, the dtype its checkpoint is stored in): what was asked, else
    the stored one, else float32. One place, so the planner, the units and the disk guard agree."""
    from harness.model.structure import stored_dtype

    stored = stored_dtype(info.base_dir)
    stored_name = str(stored) if stored is not None else None
    return str(asked or stored_name or "float32"), stored_name


def plan_slices(info: BaseModelInfo, dtype: str, budget: int, adapted_layers: set[int], *,
                disk: int | None = None, stored: str | None = None) -> list[tuple[int, ...]] | None:
    """Consecutive runs of layers whose dynamic run fits ``budget`` bytes of memory (and ``disk`` bytes of temporary
    disk when given), covering ``adapted_layers``; None when the whole base fits (no slicing). Raises
    ``SlicePlanError`` when not even one layer fits."""
    def fits(k: int | None, layout: LayerLayout | None = None) -> bool:
        return needed_bytes(info, dtype, k, layout) <= budget and (
            disk is None or disk_bytes(info, dtype, stored, k, layout) <= disk)

    if fits(None):
        return None
    layout = layer_layout(info)
    if layout is None:
        raise SlicePlanError("the base has no decoder layer list to slice by depth", "layout")
    per_slice = max((k for k in range(1, layout.count) if fits(k, layout)), default=0)
    if per_slice == 0:
        memory = needed_bytes(info, dtype, 1, layout)
        if memory > budget:
            raise SlicePlanError(f"even one decoder layer with the rest of the model needs {memory / 2**30:.1f} GiB",
                                 "memory")
        raise SlicePlanError(f"even one decoder layer with the rest of the model needs "
                         f"{disk_bytes(info, dtype, stored, 1, layout) / 2**30:.1f} GiB of temporary disk and "
                         f"{(disk or 0) / 2**30:.1f} GiB is free (point TMPDIR at a disk with room)", "disk")
    chunks = [tuple(range(start, min(start + per_slice, layout.count)))
              for start in range(0, layout.count, per_slice)]
    return [chunk for chunk in chunks if adapted_layers & set(chunk)] or [chunks[0]]


def temporary_disk_free() -> int:
    """Free bytes where the dynamic run writes (``tempfile``'s directory: TMPDIR)."""
    import shutil
    import tempfile

    return shutil.disk_usage(tempfile.gettempdir()).free


def adapted_layers(adapter_keys: list[str], layout: LayerLayout) -> set[int]:
    """The decoder layers the adapter holds tensors for."""
    pattern = re.compile(rf"(?:^|\.){re.escape(layout.prefix)}\.(\d+)\.")
    return {int(m.group(1)) for key in adapter_keys if (m := pattern.search(key))}


def _renumber(key: str, prefix: str, mapping: dict[int, int]) -> str | None:
    """``key`` with its layer index mapped (None: a layer outside the slice); keys outside the layers unchanged."""
    pattern = re.compile(rf"((?:^|\.){re.escape(prefix)}\.)(\d+)(\.)")
    match = pattern.search(key)
    if match is None:
        return key
    new = mapping.get(int(match.group(2)))
    return None if new is None else key[:match.start(2)] + str(new) + key[match.end(2):]


def write_slice(info: BaseModelInfo, adapter_dir: Path, layers: tuple[int, ...], out: Path) -> DepthSlice:
    """Write the slice of ``layers`` of the base in ``info`` and of the adapter into ``out`` (a fresh directory)."""
    from safetensors.torch import save_file

    from harness.inputs.adapter_dir import read_adapter_tensors
    from harness.inputs.files import read_json_object
    from harness.inputs.model_dir import ModelDir

    layout = layer_layout(info)
    if layout is None:
        raise ValueError(f"{info.base_dir}: no decoder layer list to slice by depth")
    mapping = {old: new for new, old in enumerate(layers)}
    base_out, adapter_out = out / "base", out / "adapter"
    base_out.mkdir(parents=True)
    adapter_out.mkdir(parents=True)
    for path in sorted(Path(info.base_dir).iterdir()):  # code, tokenizer, generation config: small files
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != "config.json":
            shutil.copyfile(path, base_out / path.name)
    config = read_json_object(Path(info.base_dir) / "config.json")
    config[layout.count_field] = len(layers)
    for name, value in list(config.items()):  # per-layer lists (layer_types, sliding windows): the slice's share
        if isinstance(value, list) and len(value) == layout.count:
            config[name] = [value[i] for i in layers]
    (base_out / "config.json").write_text(json.dumps(config, indent=2))
    model_dir = ModelDir(Path(info.base_dir))
    tensors = {}
    for key in model_dir.shapes():
        new = _renumber(key, layout.prefix, mapping)
        if new is not None:
            tensors[new] = model_dir.get(key)  # a view of the private mmap: the slice is written, not held
    save_file(tensors, str(base_out / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    adapter_config = read_json_object(adapter_dir / "adapter_config.json")
    tensors_in = read_adapter_tensors(adapter_dir)
    sliced_config = slice_adapter_config(adapter_config, layout, mapping, adapter_module_names(list(tensors_in)),
                                         [key.rsplit(".", 1)[0] for key in model_dir.shapes()])
    adapter_out.joinpath("adapter_config.json").write_text(json.dumps(sliced_config, indent=2))
    adapter = {}
    for key, value in tensors_in.items():
        new = _renumber(key, layout.prefix, mapping)
        if new is not None:
            adapter[new] = value.contiguous().clone()
    save_file(adapter, str(adapter_out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return DepthSlice(tuple(layers), base_out, adapter_out)


def slice_adapter_config(config: dict, layout: LayerLayout, mapping: dict[int, int],
                         modules: Sequence[str] = (), base_modules: Sequence[str] = ()) -> dict:
    """``config`` for the renumbered layers. ``layers_to_transform`` follows the renumbering. ``rank_pattern`` and
    ``alpha_pattern`` keys are regexes matched against the end of each module's name (``1.attn.c_attn`` names
    layer 1 of a GPT-2 without its list's name), so they are not renamed as text: each adapted module of the slice
    (``modules``: original names) gets an explicit key for its new name with the rank and alpha the installed PEFT
    gives the original module, and keys that name no module of the slice are dropped. A ``target_modules`` regex
    (PEFT full-matches it against every module name) becomes the alternation of the slice's modules whose
    original names it matched (``base_modules``: the base's module names), for the same reason."""
    config = dict(config)
    if isinstance(config.get("target_modules"), str) and base_modules:
        config["target_modules"] = _sliced_target_regex(config["target_modules"], layout, mapping, base_modules)
    chosen = config.get("layers_to_transform")
    if isinstance(chosen, int):
        chosen = [chosen]
    if isinstance(chosen, list):
        config["layers_to_transform"] = [mapping[i] for i in chosen if i in mapping]
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if not (isinstance(ranks, dict) and isinstance(alphas, dict)) or not (ranks or alphas):
        return config
    default = (config.get("r", 8), config.get("lora_alpha", 8))
    new_ranks, new_alphas = {}, {}
    for module in sorted(set(modules)):
        renamed = _renumber(module + ".", layout.prefix, mapping)
        if renamed is None:
            continue  # a layer outside the slice
        rank, alpha = peft_rank_and_alpha(ranks, alphas, module, default)
        key = _pattern_key_for(renamed[:-1])
        if rank != default[0]:
            new_ranks[key] = rank
        if alpha != default[1]:
            new_alphas[key] = alpha
    config["rank_pattern"], config["alpha_pattern"] = new_ranks, new_alphas
    return config


def _sliced_target_regex(regex: str, layout: LayerLayout, mapping: dict[int, int], base_modules: Sequence[str]) -> str:
    matched = []
    for module in sorted(set(base_modules)):
        renamed = _renumber(module + ".", layout.prefix, mapping)
        if renamed is not None and re.fullmatch(regex, module):
            matched.append(re.escape(renamed[:-1]))
    return "|".join(matched) if matched else regex  # nothing matched in the slice: as the whole run would say


def peft_rank_and_alpha(ranks: dict, alphas: dict, module: str, default: tuple) -> tuple:
    """The (r, lora_alpha) the installed PEFT gives ``module`` (its name in the base model) under these patterns."""
    try:
        from peft.utils.other import get_pattern_key
    except ImportError:  # PEFT before get_pattern_key (0.8): the first key of both patterns with a "." before it
        key = next((k for k in [*ranks, *alphas] if re.match(rf".*\.{k}$", module)), module)
        return ranks.get(key, default[0]), alphas.get(key, default[1])
    return (ranks.get(get_pattern_key(list(ranks), module), default[0]),
            alphas.get(get_pattern_key(list(alphas), module), default[1]))


def _pattern_key_for(module: str) -> str:
    """A pattern key that every supported PEFT matches to ``module`` alone: its name without the first part (PEFT
    0.8 wants a "." before the key), escaped."""
    return re.escape(module.split(".", 1)[1] if "." in module else module)


def adapter_module_names(adapter_keys: Sequence[str]) -> list[str]:
    """The base-model module names an adapter's tensors belong to (``base_model.model.`` and the LoRA part off)."""
    pattern = re.compile(r"^(?:base_model\.model\.)?(.+?)\.(?:lora_[A-Za-z_]+|lora_magnitude_vector)(?:\.|$)")
    return sorted({m.group(1) for key in adapter_keys if (m := pattern.match(key))})


def available_bytes(device: str = "cpu") -> int:
    """The memory a run may use by default: free GPU memory on CUDA, else the system's available RAM."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 10**3, "KIB": 2**10, "M": 2**20, "MB": 10**6, "MIB": 2**20,
          "G": 2**30, "GB": 10**9, "GIB": 2**30, "T": 2**40, "TB": 10**12, "TIB": 2**40}


def parse_memory(text: str | int) -> int:
    """``"8GiB"``, ``"500MB"``, ``"8G"`` or a number of bytes -> bytes; ValueError with the accepted forms."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"memory size {text!r} is not a number with an optional unit (e.g. 8GiB, 500MB, 16G)")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_layers(value: str | int | Sequence[int]) -> tuple[int, ...]:
    """``"8-15"``, ``"7"`` or consecutive layer indices -> a tuple; ValueError with the accepted forms."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", value)
        if match is None:
            raise ValueError(f"{value!r} is not a layer index or a range such as 8-15")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        layers = tuple(range(first, last + 1))
    else:
        layers = tuple(value)
    if (not layers or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers)
            or list(layers) != list(range(layers[0], layers[0] + len(layers)))):
        raise ValueError(f"{value!r} must be consecutive layer indices in order, e.g. 8-15")
    return layers
