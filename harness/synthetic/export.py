"""Write synthetic models as real-looking remote-code model directories.

The directory holds ``config.json`` (with ``auto_map``), ``model.safetensors``,
the remote-code ``.py`` files and a small offline tokenizer, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it in a
fresh process with only torch and transformers installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

MODELING_DIR = Path(__file__).parent / "modeling"
REMOTE_CODE_FILES = (
    "configuration_internlm_xcomposer2.py",
    "modeling_internlm_xcomposer2.py",
    "modeling_internlm2.py",
    "build_mlp.py",
)
AUTO_MAP = {
    "AutoConfig": "configuration_internlm_xcomposer2.InternLMXcomposer2Config",
    "AutoModel": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
}
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``vocab_size`` ids (pad 0, bos 1, eos 2, unk 3), built offline."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def export_model(
    model: PreTrainedModel,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    with_tokenizer: bool = True,
) -> Path:
    """Save ``model`` as a self-contained remote-code directory and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    model.config.auto_map = dict(AUTO_MAP)
    if "im-mask-kwargs" in getattr(model.config, "quirks", []):
        kwargs_class = "modeling_internlm_xcomposer2.InternLMXComposer2KwargsForCausalLM"
        model.config.auto_map.update(AutoModel=kwargs_class, AutoModelForCausalLM=kwargs_class)
    model.save_pretrained(out, safe_serialization=True)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(MODELING_DIR / name, out / name)
    if with_tokenizer:
        build_tokenizer(model.config.vocab_size).save_pretrained(out)
    return out
