"""Deterministic trained PEFT LoRA adapters for the synthetic family.

The official XComposer recipe (the repository's finetune/finetune.py): LoRA on
``attention.wqkv, attention.wo, feed_forward.w1, feed_forward.w2, feed_forward.w3``,
alpha = r, dropout 0.05, CAUSAL_LM, scaled down. A few AdamW steps on image+text
batches make every ``lora_B`` non-zero; seeds make the files reproducible bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from harness.model.families.xcomposer import OFFICIAL_TARGETS  # noqa: E402  (re-exported: synthetic.OFFICIAL_TARGETS)
from harness.numerics.probes import make_probe, mask_kwarg


def official_lora_config(r: int = 8, lora_alpha: int | None = None, **overrides) -> LoraConfig:
    """The official fine-tuning LoraConfig (r=64/alpha=64 at 7B; ``r`` scales it down)."""
    kwargs = dict(
        r=r,
        lora_alpha=r if lora_alpha is None else lora_alpha,
        lora_dropout=0.05,
        target_modules=list(OFFICIAL_TARGETS),
        bias="none",
        task_type="CAUSAL_LM",
    )
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def train_adapter(
    model: torch.nn.Module,
    lora_config: LoraConfig | None = None,
    *,
    steps: int = 3,
    seed: int = 0,
    lr: float = 1e-2,
) -> PeftModel:
    """Wrap ``model`` (in place) with PEFT and take ``steps`` AdamW steps on probe batches.

    The base is frozen first, so only the adapter (and ``modules_to_save``) trains on every PEFT version:
    PEFT <= 0.20 would otherwise leave PLoRA's ``Plora_A``/``Plora_B`` and ``plora_*_GN`` trainable.
    """
    torch.manual_seed(seed)
    model.requires_grad_(False)
    peft_model = get_peft_model(model, lora_config or official_lora_config())
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    embedding = peft_model.get_input_embeddings()
    mask = mask_kwarg(peft_model)  # XComposer's im_mask: without it PLoRA (and LoRA on Plora_A/B) never trains
    for step in range(steps):
        probe = make_probe(embedding, batch_size=2, seq_len=12, seed=seed * 1000 + step)
        labels = probe.input_ids.masked_fill(probe.im_mask, -100)
        loss = peft_model(**probe.model_kwargs(mask), labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return peft_model.eval()


def save_adapter(peft_model: PeftModel, out_dir: str | Path, *, safe_serialization: bool = True) -> Path:
    """``save_pretrained`` the adapter (safetensors by default, ``.bin`` when asked)."""
    out = Path(out_dir)
    peft_model.save_pretrained(out, safe_serialization=safe_serialization)
    # PEFT stores target_modules from a set: sort it so the file is byte-reproducible.
    for config_path in out.rglob("adapter_config.json"):
        config = json.loads(config_path.read_text())
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
