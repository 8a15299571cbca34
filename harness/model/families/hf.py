"""Hugging Face models in general (the family every model without a more specific one belongs to): the towers of
multimodal models, by the names transformers uses."""

from __future__ import annotations

from harness.model.families import ModelFamily

# Module-name markers of vision towers and vision-to-language projectors across HF multimodal models.
VISION_MARKERS = ("vit.", "vision_tower", "vision_model", "visual.", "image_encoder")
PROJECTOR_MARKERS = ("vision_proj", "mm_projector", "multi_modal_projector", "merger")


class HuggingFace(ModelFamily):
    name = "hf"

    def detect(self, config, names) -> bool:
        return True  # the fallback: any causal LM transformers loads

    def tower_of(self, module_name: str) -> str | None:
        lowered = module_name.lower()
        if any(marker in lowered for marker in PROJECTOR_MARKERS):
            return "projector"
        if any(lowered.startswith(marker) or f".{marker}" in lowered for marker in VISION_MARKERS):
            return "vision"
        return None
