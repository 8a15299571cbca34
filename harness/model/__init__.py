"""Model knowledge: PEFT's key grammar, LoRA arithmetic, base-model structure, targets, remote-code quirks."""
