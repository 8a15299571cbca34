"""The tiny synthetic InternLM-XComposer2 family (and the same code at 7B dims)."""

from harness.synthetic.adapters import OFFICIAL_TARGETS, official_lora_config, save_adapter, train_adapter
from harness.synthetic.bundle import Bundle, BundleSpec, build_bundle, default_cache_root
from harness.synthetic.export import export_model
from harness.synthetic.family import FULL_7B, TINY, Dims, build_model, fill_deterministic, make_config

__all__ = [
    "OFFICIAL_TARGETS", "official_lora_config", "save_adapter", "train_adapter",
    "Bundle", "BundleSpec", "build_bundle", "default_cache_root", "export_model",
    "FULL_7B", "TINY", "Dims", "build_model", "fill_deterministic", "make_config",
]
