"""Every layer kind PEFT's LoRA adapts, modelled once: shapes, ΔW, the merged weight and the reference forward.

PEFT picks a LoRA layer by the *type* of the module it wraps, and so does this table:

- ``linear``: ``nn.Linear`` (PLoRA included), weight [out, in]; saved ``lora_A`` [r, in], ``lora_B`` [out, r]
  (+ ``lora_B.bias`` [out]);
- ``conv1d``: transformers' ``pytorch_utils.Conv1D``, weight [in, out]; the same saved parts and shapes;
- ``embedding``: ``nn.Embedding``, weight [vocab, hidden]; saved ``lora_embedding_A`` [r, vocab],
  ``lora_embedding_B`` [hidden, r], without ``.weight``.

In PEFT's own [out, in] view every kind adds ΔW = s·B@A; a kind whose weight is stored [in, out] (Conv1D, and an
embedding read as [vocab = in, hidden = out]) receives ΔWᵀ. That orientation comes from the module's type, never from
``fan_in_fan_out`` in the config: PEFT corrects a contradicting flag per module and warns
(``fan_in_fan_out_correction`` says what it does). DoRA's magnitude renormalises each output unit of W + ΔW (a
row when stored [out, in], a column when stored [in, out]). ``lora_bias`` (peft >= 0.14) adds s·``lora_B.bias`` to the
base bias when merging; PEFT refuses it on embeddings.

The reference folds the merged weight into the base module and runs the module's own forward (``fold``), which is
what PEFT's unmerged forward computes: W·x + s·B·A·x for linear kinds, a lookup in E + ΔE for embeddings. A module
whose weight is shared with another (tied input embedding and LM head) is untied first: PEFT's LoRA and
``modules_to_save`` act on the wrapped module only.

Trainable tokens (``LoraConfig(trainable_token_indices=...)``, peft >= 0.15; ``TOKENS``) are no LoRA layer: PEFT wraps
the embedding in a ``TrainableTokensWrapper`` and saves ``<module>.token_adapter.trainable_tokens_delta``
[len(indices), hidden]. Despite its name the tensor holds the new *values* of those rows, not a difference: the forward
and the merge write it over the base weight with ``index_copy`` (rows of ``weight``, [vocab, hidden] for an
``nn.Embedding`` and for an LM head alike). With tied embeddings PEFT gives the tied head the same rows (one adapter,
saved once), so the shared weight changes for both and the merge stays tied.

Everything that needs one of these rules (``shapes``, ``base-match``, the reference and through it the probes'
reach check, ``merged-matches``) asks this table; nothing else knows a layer kind's orientation or part names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch


class Dims(NamedTuple):
    """A layer's sizes in PEFT's terms: ``in_features`` (vocab for an embedding), ``out_features`` (hidden)."""

    in_features: int
    out_features: int


class LowRank(NamedTuple):
    """ΔW = scaling·up@down, as factors: what the reference folds into an fp32 weight without forming ΔW."""

    down: torch.Tensor
    up: torch.Tensor
    scaling: float


@dataclass(frozen=True)
class LayerKind:
    """One kind of module PEFT's LoRA wraps, and every rule the harness needs about it."""

    name: str
    module_type: str  # what the base module is, for messages
    parts: tuple[str, str]  # saved (down, up) part names
    stored_in_out: bool  # weight stored [in, out]: PEFT's fan_in_fan_out for this module, whatever the config says
    lora_bias: bool  # PEFT can give lora_B a bias here

    # -- shape rule ------------------------------------------------------------------------------

    def weight_shape(self, dims: Dims) -> tuple[int, int]:
        return (dims.in_features, dims.out_features) if self.stored_in_out else (dims.out_features, dims.in_features)

    def dims_from_weight(self, shape: Iterable[int]) -> Dims | None:
        shape = tuple(shape)
        if len(shape) != 2:
            return None
        return Dims(shape[0], shape[1]) if self.stored_in_out else Dims(shape[1], shape[0])

    def lora_shapes(self, dims: Dims, rank: int) -> dict[str, tuple[int, ...]]:
        """The shape of every saved part for a module of ``dims`` at ``rank``."""
        down, up = self.parts
        shapes: dict[str, tuple[int, ...]] = {down: (rank, dims.in_features), up: (dims.out_features, rank)}
        if self.lora_bias:
            shapes[f"{up}.bias"] = (dims.out_features,)
        shapes["lora_magnitude_vector"] = (dims.out_features,)
        return shapes

    def rank_of(self, parts: dict[str, tuple[int, ...]]) -> int | None:
        """The rank the saved tensors carry (the down part's first dim)."""
        down = parts.get(self.parts[0])
        return int(down[0]) if down is not None and len(down) == 2 else None

    # -- ΔW and the merged weight ---------------------------------------------------------------

    def delta(self, down: torch.Tensor, up: torch.Tensor, scaling: float) -> torch.Tensor:
        """ΔW = s·B@A in fp32, in the layout the base weight is stored in."""
        delta = (up.float() @ down.float()).mul_(scaling)  # in place: one weight-sized buffer, not two
        return delta.T if self.stored_in_out else delta

    def merged_weight(self, base: torch.Tensor, delta: torch.Tensor,
                      magnitude: torch.Tensor | None = None) -> torch.Tensor:
        """The fp32 weight a correct merge produces: W + ΔW, renormalised per output unit by DoRA's magnitude."""
        merged = base.float() + delta.to(base.device)
        if magnitude is None:
            return merged
        axis = 0 if self.stored_in_out else 1  # the input axis: the norm is taken per output unit
        factor = magnitude.float().flatten().to(merged.device) / merged.norm(p=2, dim=axis)
        return merged * (factor.view(1, -1) if self.stored_in_out else factor.view(-1, 1))

    def _add_low_rank_(self, weight: torch.Tensor, factors: LowRank) -> None:
        """weight += s·B@A in place (fp32), in the layout the weight is stored in."""
        down, up = factors.down.float().to(weight.device), factors.up.float().to(weight.device)
        if self.stored_in_out:
            weight.addmm_(down.T, up.T, alpha=factors.scaling)
        else:
            weight.addmm_(up, down, alpha=factors.scaling)

    @staticmethod
    def bias_delta(lora_bias: torch.Tensor, scaling: float) -> torch.Tensor:
        """``lora_bias``: what the merge adds to the base bias, s·lora_B.bias (fp32)."""
        return lora_bias.float() * scaling

    # -- reference forward -----------------------------------------------------------------------

    def fold(self, module: torch.nn.Module, delta: torch.Tensor | LowRank, *, magnitude: torch.Tensor | None = None,
             bias_delta: torch.Tensor | None = None, untie: bool = False) -> None:
        """Merge ``delta`` into ``module`` by hand, so that its own forward is the reference forward.

        ``delta``: ΔW, or its factors (``LowRank``: an fp32 weight then takes s·B@A in one fused, in-place product,
        no weight-sized ΔW). ``bias_delta``: s·lora_B.bias, added to the base bias. ``untie``: the weight is shared
        with another module (tied embeddings): the merged weight becomes this module's own Parameter and the other
        keeps the base value, as PEFT's unmerged layer does.
        """
        import torch

        weight = module.weight
        if magnitude is None and not untie and weight.dtype == torch.float32:
            if isinstance(delta, LowRank):
                self._add_low_rank_(weight, delta)
            else:
                weight.add_(delta.to(weight.device))  # the same fp32 sum as merged_weight, without a copy
        else:
            delta = self.delta(delta.down, delta.up, delta.scaling) if isinstance(delta, LowRank) else delta
            merged = self.merged_weight(weight, delta, magnitude).to(weight.dtype)
            if untie:
                module.weight = torch.nn.Parameter(merged, requires_grad=False)
            else:
                weight.copy_(merged)
        if bias_delta is not None:
            module.bias.copy_((module.bias.float() + bias_delta.float().to(module.bias.device)).to(module.bias.dtype))


LINEAR = LayerKind("linear", "nn.Linear", ("lora_A", "lora_B"), stored_in_out=False, lora_bias=True)
CONV1D = LayerKind("conv1d", "transformers Conv1D", ("lora_A", "lora_B"), stored_in_out=True, lora_bias=True)
EMBEDDING = LayerKind("embedding", "nn.Embedding", ("lora_embedding_A", "lora_embedding_B"), stored_in_out=True,
                      lora_bias=False)
KINDS: dict[str, LayerKind] = {kind.name: kind for kind in (LINEAR, CONV1D, EMBEDDING)}


@dataclass(frozen=True)
class TokenRows:
    """PEFT's trainable tokens: saved rows that replace rows ``indices`` of a module's weight (module docstring)."""

    name: str = "trainable_tokens"
    part: str = "token_adapter.trainable_tokens_delta"  # the saved tensor, after the module name
    module_types: tuple[str, ...] = ("embedding", "linear")  # what PEFT's TrainableTokensLayer can wrap

    # -- shape rule ------------------------------------------------------------------------------

    @staticmethod
    def rows_shape(indices: Iterable[int], hidden: int) -> tuple[int, int]:
        """The saved tensor's shape: one row of ``hidden`` values per trained token."""
        return (len(tuple(indices)), hidden)

    @staticmethod
    def index_problem(indices, vocab: int | None) -> str | None:
        """Why ``indices`` cannot be the rows of a [vocab, hidden] weight (None when they can; ``vocab`` None:
        only the form is checked)."""
        if not isinstance(indices, (list, tuple)) or not indices:
            return f"token indices {indices!r} are not a non-empty list"
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or i < 0
               or (vocab is not None and i >= vocab)]
        if bad:
            where = f"[0, {vocab})" if vocab is not None else "non-negative integers"
            return f"token indices {bad[:5]} are not rows of the weight (must be {where})"
        if len(set(indices)) != len(indices):
            return f"token indices {sorted(i for i in set(indices) if indices.count(i) > 1)[:5]} repeat"
        return None

    def rows_problem(self, indices, shape: Iterable[int], weight_shape: Iterable[int] | None = None) -> str | None:
        """Why saved rows of ``shape`` cannot be the trainable tokens ``indices`` of a weight of ``weight_shape``
        ([vocab, hidden]; None: unknown, only the row count and the indices' form are checked); None when they can."""
        weight = tuple(weight_shape) if weight_shape is not None else None
        weight = weight if weight is not None and len(weight) == 2 else None
        if problem := self.index_problem(indices, weight[0] if weight else None):
            return problem
        shape = tuple(shape)
        if len(shape) != 2:
            return f"trainable_tokens_delta {list(shape)} is not a matrix [tokens, hidden]"
        want = self.rows_shape(indices, weight[1] if weight else shape[1])
        if shape != want:
            width = f" as wide as the weight {list(weight)}" if weight else ""
            return (f"trainable_tokens_delta {list(shape)}, expected {list(want)} (one row{width} per token index in "
                    f"trainable_token_indices, {len(indices)} of them)")
        return None

    # -- the merged weight and the reference forward ----------------------------------------------

    @staticmethod
    def merged_weight(base: torch.Tensor, indices: Iterable[int], rows: torch.Tensor) -> torch.Tensor:
        """The fp32 weight a correct merge produces: the base with rows ``indices`` replaced by ``rows``."""
        import torch

        merged = base.float().clone()
        index = torch.as_tensor(list(indices), dtype=torch.long, device=merged.device)
        return merged.index_copy_(0, index, rows.float().to(merged.device))

    def fold(self, module: torch.nn.Module, indices: Iterable[int], rows: torch.Tensor) -> None:
        """Write the rows into ``module.weight`` in place (as PEFT's forward and merge do, in the weight's dtype).
        A weight shared with a tied head changes for both: PEFT ties the head's token adapter to the embedding's."""
        import torch

        weight = module.weight
        index = torch.as_tensor(list(indices), dtype=torch.long, device=weight.device)
        weight.index_copy_(0, index, rows.to(weight.device, weight.dtype))


TOKENS = TokenRows()


def _is_conv1d(module: torch.nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it in the supported range
        Conv1D = ()
    if Conv1D and isinstance(module, Conv1D):
        return True
    # remote code may ship its own copy of GPT-2's Conv1D: same name, same [in, out] weight and nf attribute
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def kind_of_module(module: torch.nn.Module) -> LayerKind | None:
    """The kind PEFT would give ``module`` (by type, as ``peft.tuners.lora.model._create_new_module``), or None."""
    import torch

    if isinstance(module, torch.nn.Embedding):
        return EMBEDDING
    if _is_conv1d(module):
        return CONV1D
    if isinstance(module, torch.nn.Linear):
        return LINEAR
    return None


def dims_of_module(module: torch.nn.Module, kind: LayerKind) -> Dims | None:
    """(in, out) of a module of ``kind``, read from its weight (works on the meta device too)."""
    weight = getattr(module, "weight", None)
    return kind.dims_from_weight(weight.shape) if weight is not None else None


def kind_of_parts(parts: Iterable[str]) -> LayerKind:
    """The kind saved parts imply when the base module is unknown: embedding parts, else a linear-like layer.
    Linear and Conv1D save the same parts; only the base module's type tells them apart."""
    names = set(parts)
    return EMBEDDING if names & set(EMBEDDING.parts) else LINEAR


def kind_named(name: str | None) -> LayerKind | None:
    return KINDS.get(name) if name else None


def fan_in_fan_out_correction(kind: LayerKind, configured: bool) -> str | None:
    """What PEFT does when the config's ``fan_in_fan_out`` contradicts the module's type (None when it does not)."""
    if kind is LINEAR and configured:
        return ("fan_in_fan_out is true but the module is an nn.Linear (weight [out, in]): PEFT warns "
                "\"fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to "
                "False.\" and uses False for it")
    if kind is CONV1D and not configured:
        return ("fan_in_fan_out is false but the module is a transformers Conv1D (weight [in, out]): PEFT warns "
                "\"fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.\" "
                "and uses True for it")
    return None
