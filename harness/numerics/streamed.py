"""The fp32 reference without a second copy of the model: run the model under test as if it were fp32.

The dynamic run loads the base once, in the dtype being checked (bf16 for a released XComposer). Its fp32
reference and its fp32 base outputs come from that same model: while a *unit* of it runs, the unit's parameters
and floating buffers are swapped for fp32 copies (with the adapter folded in by hand, ``ReferenceFold``), and put
back when the unit returns. A unit is one repeated block (each child of an ``nn.ModuleList``: a decoder layer, a
vision-tower layer) or one module with its own parameters outside the blocks (embedding, final norm, LM head).
So at most one layer's fp32 weights exist beside the model under test, whatever its depth: the reference of a 7B
bf16 model needs about one 7B bf16 copy, not that plus a 28 GB fp32 one.

The weights are the loaded ones, upcast: exact when the checkpoint is stored in the dtype being checked (the
default); when it is not, the reference computes in fp32 from the rounded weights every path also starts from.
Buffers the model's own constructor computes (RoPE tables) are taken at their constructor (fp32) values when known.

Model code that reads a child's weight from outside that child's forward (``self.lm_head.weight`` in a parent)
would meet a low-precision weight mid-forward; then the units outside the blocks are swapped for the whole forward
(``coarse``), and if that fails too, every unit (``whole``: a full fp32 copy, as before). ``StreamedFp32.mode``
says which ran.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

import torch

from harness.numerics.reference import ReferenceFold

MODES = ("streamed", "coarse", "whole")


def block_units(model: torch.nn.Module) -> list[str]:
    """The repeated blocks: every child of an ``nn.ModuleList`` not inside another block, outermost first."""
    blocks: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and not any(_inside(name, b) for b in blocks):
            blocks.extend(f"{name}.{child}" if name else child for child, _ in module.named_children())
    return blocks


def _inside(name: str, block: str) -> bool:
    return name == block or name.startswith(block + ".")


class StreamedFp32:
    """Context in which ``model`` computes in fp32, unit by unit; ``fold``: the adapter to fold in (None: the base).

    ``buffers``: fp32 values of buffers the model's constructor computes (``BaseModelInfo.init_buffers``), used in
    place of the loaded (possibly rounded) ones. ``peak_extra_bytes`` records the largest fp32 footprint alive at
    once, so tests and benchmarks can hold the memory promise to account.
    """

    def __init__(self, model: torch.nn.Module, *, fold: ReferenceFold | None = None,
                 buffers: dict[str, torch.Tensor] | None = None, mode: str = "streamed") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.model, self.fold, self.buffers, self.mode = model, fold, buffers or {}, mode
        self.modules = dict(model.named_modules())
        self.blocks = block_units(model)
        self.extra_bytes = self.peak_extra_bytes = 0
        self._open: list = []  # swaps not yet put back (innermost last)
        self._token_rows = self._rows_by_weight() if fold is not None else {}
        self._written = self._written_by_fold()
        self._spares: list[torch.Tensor] = []  # fp32 copies a finished unit gave back, for the next one to reuse

    def _written_by_fold(self) -> set[str]:
        """Parameters the fold writes into in place (LoRA weights and biases, loaded embedding/bias tensors): each
        needs its own fp32 copy even when the model is fp32 already; every other fp32 parameter is used as it is."""
        if self.fold is None:
            return set()
        written = {f"{lora.module}.{leaf}" for lora in self.fold.lora for leaf in ("weight", "bias")}
        return written | {copy.param for copy in self.fold.copies if copy.role != "modules_to_save"}

    def _rows_by_weight(self) -> dict[int, list[tuple[tuple[int, ...], torch.Tensor]]]:
        """Trainable token rows by the identity of the weight they are written into (a tied head shares them)."""
        rows: dict[int, list] = {}
        for trained in self.fold.tokens:
            weight = self.modules[trained.module].weight
            rows.setdefault(id(weight), []).append((trained.indices, trained.rows(self.fold.tensors.__getitem__)))
        return rows

    def units(self) -> list[tuple[str, list[str]]]:
        """Each unit as (the module whose forward it lives in, the module names it swaps). A block lives in its own
        forward; modules outside the blocks in theirs (``streamed``) or in the whole model's (``coarse``)."""
        if self.mode == "whole":
            return [("", list(self.modules))]
        blocks = [(block, [name for name in self.modules if _inside(name, block)]) for block in self.blocks]
        outside = [name for name, module in self.modules.items()
                   if not any(_inside(name, block) for block in self.blocks)
                   and (any(True for _ in module.parameters(recurse=False))
                        or any(True for _ in module.buffers(recurse=False)))]
        if self.mode == "coarse":
            return blocks + ([("", outside)] if outside else [])
        return blocks + [(name, [name]) for name in outside]

    @contextlib.contextmanager
    def active(self) -> Iterator[StreamedFp32]:
        """Hooks in place: every forward of the model inside this block computes the fp32 reference."""
        handles = []
        for owner, unit in self.units():
            handles += self._hook(self.modules[owner], unit)
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            while self._open:  # a forward that raised never reached the hooks that put the weights back
                self._swap_out(self._open.pop())
            self._spares = []  # freed with the run, not kept until this object goes

    def _hook(self, owner: torch.nn.Module, unit: list[str]) -> list:
        saved: list = []

        def enter(*_args, **_kwargs) -> None:
            saved.append(self._swap_in(unit))
            self._open.append(saved[-1])

        def leave(*_args, **_kwargs) -> None:
            if saved:
                swapped = saved.pop()
                self._open.remove(swapped)
                self._swap_out(swapped)

        return [owner.register_forward_pre_hook(enter), owner.register_forward_hook(leave)]

    @torch.no_grad()
    def _swap_in(self, unit: list[str]) -> list[tuple[list, int, list]]:
        """Swap ``unit``'s weights for fp32 (folded) copies; returns [(originals, bytes, lent copies)] for ``_swap_out``."""
        originals = []
        size = 0
        copied = []  # (module, leaf, param): the parameters that get an fp32 copy
        for name in unit:
            module = self.modules[name]
            for leaf, param in list(module._parameters.items()):
                if param is None:
                    continue
                originals.append((module, "_parameters", leaf, param))  # every one: a fold may replace it
                full = f"{name}.{leaf}" if name else leaf
                if param.is_floating_point() and (param.dtype != torch.float32 or full in self._written
                                                  or id(param) in self._token_rows):
                    copied.append((module, leaf, param))  # else fp32 already, unwritten: used as it is (no copy)
        self._keep_spares_for([param for _, _, param in copied])
        lent = []  # (module, leaf, the Parameter swapped in, its buffer): given back as spares on the way out
        for module, leaf, param in copied:
            copy = self._spare(param)
            copy.copy_(param.detach())
            for indices, rows in self._token_rows.get(id(param), ()):  # written as PEFT writes them
                copy.index_copy_(0, torch.as_tensor(indices, dtype=torch.long), rows.to(copy.dtype))
            module._parameters[leaf] = swapped_in = torch.nn.Parameter(copy, requires_grad=False)
            lent.append((module, leaf, swapped_in, copy))
            size += copy.numel() * copy.element_size()
        for name in unit:
            module = self.modules[name]
            for leaf, buffer in list(module._buffers.items()):
                if buffer is None or not buffer.is_floating_point():
                    continue
                full = f"{name}.{leaf}" if name else leaf
                known = self.buffers.get(full)
                if known is not None and known.shape == buffer.shape:
                    copy = known.to(buffer.device)
                elif buffer.dtype == torch.float32:
                    continue  # nothing writes buffers: an fp32 one is used as it is
                else:
                    copy = buffer.detach().float().clone()
                originals.append((module, "_buffers", leaf, buffer))
                module._buffers[leaf] = copy
                size += copy.numel() * copy.element_size()
        if self.fold is not None:
            within = {name: self.modules[name] for name in unit}
            params = {f"{name}.{leaf}" if name else leaf: p for name in unit
                      for leaf, p in self.modules[name]._parameters.items() if p is not None}
            self.fold.apply(within, params, tokens=False)
        self.extra_bytes += size
        self.peak_extra_bytes = max(self.peak_extra_bytes, self.extra_bytes)
        return [(originals, size, lent)]

    def _swap_out(self, swapped) -> None:
        for originals, size, lent in swapped:
            for module, leaf, swapped_in, copy in lent:
                if module._parameters.get(leaf) is swapped_in:  # still ours (a fold may have replaced it)
                    self._spares.append(copy)  # the next unit's copy, without fresh pages to fault in
            for module, table, leaf, value in reversed(originals):
                getattr(module, table)[leaf] = value
            self.extra_bytes -= size

    def _keep_spares_for(self, params: list[torch.Tensor]) -> None:
        """Drop the spare fp32 buffers no parameter of the next unit can reuse, before it allocates its own (so the
        spares never add a unit of a different shape, e.g. the LM head, on top of a layer)."""
        wanted = Counter((tuple(p.shape), p.device) for p in params)
        kept = []
        for spare in self._spares:
            key = (tuple(spare.shape), spare.device)
            if wanted[key] > 0:
                wanted[key] -= 1
                kept.append(spare)
        self._spares = kept

    def _spare(self, param: torch.Tensor) -> torch.Tensor:
        """An fp32 buffer of ``param``'s shape: a spare from the previous unit, or a new one."""
        for index, spare in enumerate(self._spares):
            if spare.shape == param.shape and spare.device == param.device:
                return self._spares.pop(index)
        return torch.empty(param.shape, dtype=torch.float32, device=param.device)


def run_streamed(model: torch.nn.Module, run: Callable[[], torch.Tensor], *, fold: ReferenceFold | None = None,
                 buffers: dict[str, torch.Tensor] | None = None, mode: str | None = None,
                 ) -> tuple[torch.Tensor, StreamedFp32]:
    """``run()`` (a forward of ``model``) in fp32 unit by unit; on a dtype clash the next coarser mode is tried.

    ``mode``: start from this mode (a run that fell back once keeps its mode for the other probes)."""
    errors = []
    for each in MODES[MODES.index(mode or "streamed"):]:
        stream = StreamedFp32(model, fold=fold, buffers=buffers, mode=each)
        try:
            with stream.active():
                return run(), stream
        except RuntimeError as err:  # a parent reading a child's weight outside its forward: a dtype clash
            errors.append(f"{each}: {err}".splitlines()[0])
    raise RuntimeError("the fp32 reference could not run on this model: " + "; ".join(errors))
