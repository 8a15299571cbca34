"""What quantization a model directory declares, as one typed record computed once per input.

A base saved quantized (bitsandbytes 4/8-bit, GPTQ, AWQ, ...) says so in ``config.json``'s
``quantization_config``; its checkpoint then stores packed integers and their scales (``weight`` as
uint8, ``weight.absmax``, ``qweight``, ``scales``...), not the weights the model computes with. Every
check that reads base tensors must know this first, or it reads the packing as weights. QLoRA adapters
are usually trained on a base quantized on the fly (nothing in the 16-bit base directory says so):
``--trained-on-quantized nf4|fp4|int8`` declares it. Reading the record imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# --trained-on-quantized values: the bitsandbytes schemes that run on CPU (bitsandbytes >= 0.48)
TRAINED_ON_CHOICES = ("nf4", "fp4", "int8")

# quant_method values whose checkpoints store packed integer weights that no merge can write a ΔW into
# without requantizing (transformers' names, transformers.utils.quantization_config.QuantizationMethod)
_PACKED_METHODS = {"gptq", "awq", "aqlm", "eetq", "hqq", "quanto", "exl2", "vptq", "higgs", "spqr", "bitnet",
                   "compressed-tensors", "torchao", "fbgemm_fp8", "fp8", "quark", "auto-round", "mxfp4"}

# key suffixes that are quantization storage, never a weight the model computes with
_STORAGE_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format",
                     ".qweight", ".qzeros", ".scales", ".g_idx", ".weight_scale", ".weight_zero_point",
                     ".input_scale", ".weight_packed", ".weight_shape")


@dataclass(frozen=True)
class Quantization:
    """One declared quantization: where it was read, the library, the scheme and what follows for merges."""

    method: str  # "bitsandbytes", "gptq", "awq", ... (transformers' quant_method)
    scheme: str  # "nf4", "fp4", "int8", "gptq-4bit", "awq-4bit", or the method when nothing finer is known
    bits: int | None
    source: str  # "config.json quantization_config of DIR" or "--trained-on-quantized"
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_bitsandbytes(self) -> bool:
        return self.method == "bitsandbytes"

    @property
    def four_bit(self) -> bool:
        return self.bits == 4

    def describe(self) -> str:
        return f"{self.scheme} ({self.method}, from {self.source})"


def read_quantization(model_dir: str | Path) -> Quantization | None:
    """The quantization ``model_dir/config.json`` declares, or None (no config, no ``quantization_config``).

    Reads the JSON text only, with the safe bounded reader (no config class, no remote code): a directory
    whose config.json cannot be read is answered None here, the loaders report it with their own message.
    """
    from harness.inputs.errors import InputError
    from harness.inputs.files import read_model_config

    try:
        config = read_model_config(model_dir)
    except InputError:
        return None
    return from_config_dict(config.get("quantization_config"), source=f"config.json quantization_config of {model_dir}")


def from_config_dict(qc, *, source: str) -> Quantization | None:
    """The record for one ``quantization_config`` mapping (None when absent or not a mapping)."""
    if not isinstance(qc, dict) or not qc:
        return None
    method = str(qc.get("quant_method") or "").lower()
    if not method and (qc.get("load_in_4bit") or qc.get("load_in_8bit")):
        method = "bitsandbytes"  # transformers < 4.31 wrote no quant_method for bitsandbytes
    if method == "bitsandbytes" or method.startswith("bitsandbytes"):
        if qc.get("load_in_4bit") or method.endswith("4bit"):
            scheme = str(qc.get("bnb_4bit_quant_type") or "fp4").lower()
            return Quantization("bitsandbytes", scheme, 4, source, dict(qc))
        return Quantization("bitsandbytes", "int8", 8, source, dict(qc))
    bits = qc.get("bits", qc.get("w_bit"))
    bits = int(bits) if isinstance(bits, (int, float)) and not isinstance(bits, bool) else None
    if not method:
        method = "unknown"
    scheme = f"{method}-{bits}bit" if bits else method
    return Quantization(method, scheme, bits, source, dict(qc))


def trained_on(choice: str) -> Quantization:
    """The record for ``--trained-on-quantized CHOICE`` (bitsandbytes, quantized on the fly at load)."""
    if choice not in TRAINED_ON_CHOICES:
        raise ValueError(f"--trained-on-quantized must be one of {', '.join(TRAINED_ON_CHOICES)}, not {choice!r}")
    return Quantization("bitsandbytes", choice, 8 if choice == "int8" else 4, "--trained-on-quantized")


def bnb_config(q: Quantization, compute_dtype=None):
    """transformers' ``BitsAndBytesConfig`` that quantizes a 16-bit base the way ``q`` says (as QLoRA does)."""
    import torch
    from transformers import BitsAndBytesConfig

    if q.scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.scheme,
                              bnb_4bit_compute_dtype=compute_dtype or torch.float32)


def packs_weights(q: Quantization | None) -> bool:
    """Whether a checkpoint saved with ``q`` stores packed integers instead of weights (bitsandbytes 4-bit and
    int8, GPTQ, AWQ and the other integer formats): its tensors cannot be compared or merged as weights."""
    return q is not None and (q.is_bitsandbytes or q.method in _PACKED_METHODS or q.method == "unknown")


def is_storage_key(key: str) -> bool:
    """Whether a checkpoint key is quantization storage (scales, packed integers, bitsandbytes quant state)."""
    return key.endswith(_STORAGE_SUFFIXES) or ".quant_state." in key or key.endswith(".quant_state")


def bnb_unavailable_reason() -> str | None:
    """Why bitsandbytes models cannot be loaded on this CPU here (None: they can)."""
    import importlib.util
    from importlib.metadata import version

    from packaging.version import Version

    if Version(version("transformers")) < Version("4.46"):
        return (f"transformers {version('transformers')} loads bitsandbytes models only on CUDA "
                "(CPU support came with transformers 4.46 and bitsandbytes 0.48)")
    if importlib.util.find_spec("bitsandbytes") is None:
        return ("bitsandbytes is not installed (pip install 'plora-harness[bitsandbytes]'; "
                "requirements/bitsandbytes.txt pins the tested CPU build)")
    if Version(version("bitsandbytes")) < Version("0.48"):
        return f"bitsandbytes {version('bitsandbytes')} has no CPU kernels (0.48 or newer has them)"
    return None
