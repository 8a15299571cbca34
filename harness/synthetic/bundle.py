"""A synthetic base model directory plus its trained adapter: the harness's built-in default."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from harness.synthetic.adapters import official_lora_config, save_adapter, train_adapter
from harness.synthetic.cache import cache_path, cached_build
from harness.synthetic.export import export_model
from harness.synthetic.family import TINY, Dims, build_model


@dataclass(frozen=True)
class BundleSpec:
    """What to build: variant, dimensions, seeds and the LoRA settings."""

    variant: str = "ixc2.5"
    dims: Dims = TINY
    seed: int = 0
    lora_r: int = 8
    lora_alpha: int = 8
    train_steps: int = 3
    safe_serialization: bool = True
    target_modules: tuple[str, ...] | str | None = None  # None: the official XComposer targets
    lora_overrides: tuple[tuple[str, object], ...] = ()  # extra LoraConfig fields, e.g. (("use_rslora", True),)
    quirks: tuple[str, ...] = ()  # the real remote code's behaviours the base reproduces (modeling QUIRKS)

    def params(self) -> dict:
        return asdict(self)

    def lora_kwargs(self) -> dict:
        kwargs = dict(self.lora_overrides)
        if self.target_modules is not None:
            kwargs["target_modules"] = (
                self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
            )
        return kwargs


@dataclass(frozen=True)
class Bundle:
    base_dir: Path
    adapter_dir: Path
    spec: BundleSpec


def _base_params(spec: BundleSpec) -> dict:
    params = {"variant": spec.variant, "dims": asdict(spec.dims), "seed": spec.seed}
    return {**params, "quirks": list(spec.quirks)} if spec.quirks else params


def _merged_params(bundle: Bundle) -> dict:
    return {"spec": bundle.spec.params(), "base": str(bundle.base_dir), "adapter": str(bundle.adapter_dir)}


def is_built(spec: BundleSpec = BundleSpec(), cache_root: str | Path | None = None) -> bool:
    """Whether base, adapter and merged model of ``spec`` are already in the cache (nothing to build)."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    bundle = Bundle(cache_path(root, f"base-{spec.variant}", _base_params(spec)),
                    cache_path(root, f"adapter-{spec.variant}", spec.params()), spec)
    merged = cache_path(root, f"merged-{spec.variant}", _merged_params(bundle))
    return all(path.is_dir() for path in (bundle.base_dir, bundle.adapter_dir, merged))


def build_base_dir(spec: BundleSpec, cache_root: str | Path) -> Path:
    params = _base_params(spec)

    def build(out: Path) -> None:
        model = build_model(spec.variant, spec.dims, seed=spec.seed)  # built without quirks: they act on load
        if spec.quirks:
            apply_quirks(model, spec.quirks, out)
        export_model(model, out)

    name = f"base-{spec.variant}" + ("-quirks" if spec.quirks else "")
    return cached_build(cache_root, name, params, build)


def apply_quirks(model, quirks: tuple[str, ...], out: Path) -> None:
    """Make the exported config reproduce the real code's ``quirks`` when the directory is loaded. The CLIP
    tower of ``relative-vision-tower`` is written to ``out/<vision_tower_path>``: the path is relative to the
    current directory, so the model loads when run from ``out`` (as the real one does from the repo root)."""
    config = model.config
    config.quirks = list(quirks)
    if "flash-default" in quirks:
        config.attn_implementation = "flash_attention_2"  # what the real config.json says
    if "relative-vision-tower" in quirks:
        model.vit._clip.save_pretrained(out / config.vision_tower_path, safe_serialization=True)


def build_bundle(spec: BundleSpec = BundleSpec(), cache_root: str | Path | None = None) -> Bundle:
    """Build (or reuse from ``cache_root``) the base model dir and a trained adapter dir."""
    cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
    base_dir = build_base_dir(spec, cache_root)

    def build(out: Path) -> None:
        model = build_model(spec.variant, spec.dims, seed=spec.seed)
        peft_model = train_adapter(
            model,
            official_lora_config(r=spec.lora_r, lora_alpha=spec.lora_alpha, **spec.lora_kwargs()),
            steps=spec.train_steps,
            seed=spec.seed,
        )
        peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
        save_adapter(peft_model, out, safe_serialization=spec.safe_serialization)
        (out / "README.md").unlink(missing_ok=True)

    adapter_dir = cached_build(cache_root, f"adapter-{spec.variant}", spec.params(), build)
    return Bundle(base_dir=base_dir, adapter_dir=adapter_dir, spec=spec)


def build_merged_dir(bundle: Bundle, cache_root: str | Path | None = None) -> Path:
    """The official merge script's output for ``bundle`` (merge, save_pretrained, code + tokenizer copied)."""
    from harness.loading.base import copy_model_extras
    from harness.loading.paths import load_peft_merged

    cache_root = Path(cache_root) if cache_root is not None else default_cache_root()

    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory() as work:
            loaded = load_peft_merged(bundle.base_dir, bundle.adapter_dir, dtype=torch.float32, device="cpu",
                                      workdir=Path(work))
            loaded.model.save_pretrained(out, safe_serialization=True)
        copy_model_extras(bundle.base_dir, out)

    return cached_build(cache_root, f"merged-{bundle.spec.variant}", _merged_params(bundle), build)


def default_cache_root() -> Path:
    """``$PLORA_HARNESS_CACHE`` or ``~/.cache/plora-harness`` (never the user's input dirs)."""
    import os

    env = os.environ.get("PLORA_HARNESS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "plora-harness"
