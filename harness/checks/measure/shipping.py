"""Does a merged directory load, with a plain ``from_pretrained``, to the model the harness verified?

Read from headers and small JSON files only (the weights are never loaded): adapter files left beside
the merged weights (transformers' ``from_pretrained`` finds ``adapter_config.json`` and applies the
adapter a second time), LoRA keys or ``base_layer`` wrappers saved instead of merged weights, config
fields that drifted from the base, and the files a user needs beside the weights (custom code,
tokenizer, generation config, processor) missing or different. Each problem names its file and its fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from harness.inputs.errors import InputError
from harness.inputs.files import read_json_object
from harness.inputs.model_dir import ModelDir

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")
GENERATION_CONFIG = "generation_config.json"
CONFIG_FIELDS = ("architectures", "auto_map", "model_type")
GENERATION_IDS = ("eos_token_id", "pad_token_id", "bos_token_id")
# Saved PEFT structure: a LoRA part (not PLoRA's ``Plora_A``: the part must start a dotted name), a base_layer
# wrapper, or the PeftModel's own prefix.
_PEFT_KEY = re.compile(r"(^|\.)(lora_(A|B|embedding_A|embedding_B|magnitude_vector)|base_layer|modules_to_save)\.|"
                       r"^base_model\.model\.")
TOKENIZER_PROBE = "Hello world! The quick brown fox, 12345 — 你好 <s></s>\n\tend."


@dataclass(frozen=True)
class ShippingProblem:
    """One reason the merged directory would not load to the verified model."""

    file: str  # the file to change (relative to the merged directory)
    problem: str
    fix: str

    def text(self) -> str:
        return f"{self.file}: {self.problem}"


def shipping_problems(base: ModelDir, merged: ModelDir, *, trust_remote_code: bool = True) -> list[ShippingProblem]:
    """Every problem found, adapter files first (they change what loads at all)."""
    return (_adapter_files(merged) + _peft_keys(merged) + _config(base, merged) + _code(base, merged)
            + _tokenizer(base, merged, trust_remote_code) + _generation(base, merged) + _processor(base, merged))


def _adapter_files(merged: ModelDir) -> list[ShippingProblem]:
    present = [name for name in ADAPTER_FILES if (merged.path / name).exists()]
    if not present:
        return []
    return [ShippingProblem(
        present[0], f"adapter files {present} sit beside the merged weights: transformers' from_pretrained finds "
        "adapter_config.json and applies the adapter a second time on top of the merged weights",
        f"delete {', '.join(present)} from the merged directory (save the adapter and the merged model to separate "
        "directories)")]


def _peft_keys(merged: ModelDir) -> list[ShippingProblem]:
    keys = [key for key in merged.keys if _PEFT_KEY.search(key)]
    if not keys:
        return []
    file = merged.info(keys[0]).file.name
    return [ShippingProblem(
        file, f"{len(keys)} tensor(s) are PEFT structure, not merged weights (e.g. {keys[0]}): a plain "
        "from_pretrained drops them and the adapter is lost",
        "save the model merge_and_unload() returns (model = peft_model.merge_and_unload(); "
        "model.save_pretrained(dir)), not the PeftModel")]


def _vocab_size(config: dict) -> int | None:
    value = config.get("vocab_size")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("vocab_size")
    return value


def _declared_dtype(config: dict) -> str | None:
    value = config.get("dtype") or config.get("torch_dtype")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("dtype") or config["text_config"].get("torch_dtype")
    return str(value).replace("torch.", "") if value else None


def _config(base: ModelDir, merged: ModelDir) -> list[ShippingProblem]:
    problems = []
    for name in CONFIG_FIELDS:
        if base.config.get(name) != merged.config.get(name):
            problems.append(ShippingProblem(
                "config.json", f"{name} is {merged.config.get(name)!r}, the base has {base.config.get(name)!r}",
                f"copy {name} from the base's config.json (or save the merged model from the base's own class)"))
    if _vocab_size(base.config) != _vocab_size(merged.config):
        problems.append(ShippingProblem(
            "config.json", f"vocab_size is {_vocab_size(merged.config)}, the base has {_vocab_size(base.config)}",
            "save the merged model with the base's vocab size (resize the embeddings only if the adapter trained new "
            "tokens, and then ship the matching tokenizer)"))
    declared = _declared_dtype(merged.config)
    stored = sorted({info[1] for info in merged.shapes().values() if "float" in info[1]})
    if declared and stored and stored != [declared]:
        problems.append(ShippingProblem(
            "config.json", f"declares dtype {declared} but the weights are stored as {', '.join(stored)}: "
            f"from_pretrained(dtype='auto') loads {declared}",
            f"set \"dtype\" (\"torch_dtype\" before transformers 4.56) in config.json to {stored[0]}, or save the "
            f"weights in {declared}" if len(stored) == 1 else
            f"save every weight in one dtype, the one config.json declares ({declared})"))
    return problems


def _code(base: ModelDir, merged: ModelDir) -> list[ShippingProblem]:
    lost = sorted(set(base.custom_code_files()) - set(merged.custom_code_files()))
    if not lost:
        return []
    return [ShippingProblem(lost[0], f"custom code files not copied: {lost} (from_pretrained(trust_remote_code=True) "
                            "fails without them)", f"copy {', '.join(lost)} from the base directory")]


def _tokenizer(base: ModelDir, merged: ModelDir, trust_remote_code: bool) -> list[ShippingProblem]:
    """The base's tokenizer files must be there; when their bytes differ, the tokenizers must still agree."""
    have = base.tokenizer_files()
    if not have:
        return []  # the base ships no tokenizer: nothing to compare
    lost = sorted(set(have) - set(merged.tokenizer_files()))
    fix = "save the base's tokenizer into the merged directory (AutoTokenizer.from_pretrained(base).save_pretrained(" \
          "merged_dir))"
    if lost:
        return [ShippingProblem(lost[0], f"tokenizer files not copied: {lost}", fix)]
    if all(_same_bytes(base.path / name, merged.path / name) for name in have):
        return []
    try:
        want, got = (_tokenizer_facts(d.path, trust_remote_code) for d in (base, merged))
    except Exception as err:  # noqa: BLE001 - a tokenizer that does not load is the finding
        return [ShippingProblem(have[0], f"the tokenizer does not load: {type(err).__name__}: "
                                f"{str(err).splitlines()[0][:200] if str(err) else ''}", fix)]
    differ = [f"{what} is {_short(got[what])}, the base's is {_short(want[what])}" for what in want
              if want[what] != got[what]]
    if not differ:
        return []
    return [ShippingProblem(have[0], "the tokenizer differs from the base's: " + "; ".join(differ), fix)]


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _same_bytes(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def _tokenizer_facts(directory: Path, trust_remote_code: bool) -> dict[str, object]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    specials = {name: str(value) for name, value in sorted(tok.special_tokens_map.items())}
    return {"the ids of a probe text": tok(TOKENIZER_PROBE)["input_ids"],
            "the special tokens": specials,
            "the special token ids": {name: tok.convert_tokens_to_ids(value) for name, value in specials.items()
                                      if isinstance(value, str)},
            "the chat template": getattr(tok, "chat_template", None),
            "the vocabulary size": len(tok)}


def _generation_ids(model: ModelDir) -> tuple[dict[str, object], bool]:
    """eos/pad/bos ids as ``generate`` reads them (generation_config.json over config.json), and whether the file
    exists."""
    path = model.path / GENERATION_CONFIG
    values = read_json_object(path) if path.is_file() else {}
    return ({name: values.get(name, model.config.get(name)) for name in GENERATION_IDS}, path.is_file())


def _generation(base: ModelDir, merged: ModelDir) -> list[ShippingProblem]:
    try:
        (want, base_has), (got, merged_has) = _generation_ids(base), _generation_ids(merged)
    except InputError as err:
        return [ShippingProblem(GENERATION_CONFIG, str(err), f"copy {GENERATION_CONFIG} from the base directory")]
    if base_has and not merged_has:
        return [ShippingProblem(GENERATION_CONFIG, "not copied: generate() falls back to config.json's defaults "
                                "(the base's sampling settings and stop ids are lost)",
                                f"copy {GENERATION_CONFIG} from the base directory")]
    wrong = [f"{name} {got[name]!r} (base {want[name]!r})" for name in GENERATION_IDS if got[name] != want[name]]
    if not wrong:
        return []
    file = GENERATION_CONFIG if merged_has else "config.json"
    return [ShippingProblem(file, f"{', '.join(wrong)}: generation stops or pads on other tokens than the base's",
                            f"copy {GENERATION_CONFIG} from the base directory (or set these ids as the base has them)")]


def _processor(base: ModelDir, merged: ModelDir) -> list[ShippingProblem]:
    lost = [name for name in PROCESSOR_FILES if (base.path / name).is_file() and not (merged.path / name).is_file()]
    if not lost:
        return []
    return [ShippingProblem(lost[0], f"processor files not copied: {lost} (AutoProcessor.from_pretrained on the "
                            "merged directory fails or builds another processor)",
                            f"copy {', '.join(lost)} from the base directory (processor.save_pretrained(merged_dir))")]
