"""One adapter's checks as independent units of work, so runners that spread work (pytest-xdist workers, CI jobs)
can take them: the checks that read the whole model once (static, against-base, merged ...) as one unit, and the
dynamic checks once per depth slice when the base does not fit the memory each runner has.

Planned from the base's config and safetensors headers and the adapter's tensor names only: no model code runs
and no weight is read, so the process that owns the verdict can plan before any child starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SLICED_GROUP = "dynamic"  # the checks that run per depth slice (checks.dynamic.over_depth_slices)


@dataclass(frozen=True)
class WorkUnit:
    """Checks ``check_ids`` of one adapter, on the depth slice of ``layers`` (None: on the whole model)."""

    check_ids: tuple[str, ...]
    layers: tuple[int, ...] | None = None

    @property
    def label(self) -> str | None:
        """``layers-8-15`` (a name usable in a pytest node id), or None for the whole-model unit."""
        if self.layers is None:
            return None
        first, last = self.layers[0], self.layers[-1]
        return f"layers-{first}-{last}" if last != first else f"layer-{first}"

    def to_json(self) -> dict:
        """What crosses to a pytest-xdist worker (``from_json`` reads it back)."""
        return {"check_ids": list(self.check_ids), "layers": list(self.layers) if self.layers is not None else None}

    @classmethod
    def from_json(cls, data: dict) -> WorkUnit:
        layers = data.get("layers")
        return cls(tuple(data["check_ids"]), tuple(layers) if layers is not None else None)


def work_units(check_ids: list[str], base_dir: str | Path | None, adapter_dir: str | Path, *, dtype: str | None,
               budget: int, disk: int | None = None) -> list[WorkUnit]:
    """The units of ``check_ids``: one, unless the dynamic run on the whole base needs more than ``budget`` bytes;
    then the other checks as one unit and the dynamic checks on each depth slice that holds adapted layers. A base
    or adapter this cannot plan (no layer list, a DeepSpeed checkpoint, not even one layer fits) stays one unit, and
    the engine reports why as it does for a single run. ``disk``: the temporary disk each unit may write."""
    whole = [WorkUnit(tuple(check_ids))]
    sliced_ids = set(_sliced_check_ids())
    dynamic = tuple(i for i in check_ids if i in sliced_ids)
    if base_dir is None or not dynamic:
        return whole
    from harness.loading.slices import adapted_layers, layer_layout, plan_slices, run_dtypes
    from harness.model.structure import inspect_base

    try:
        info = inspect_base(base_dir, build_tree=False)
        layout = layer_layout(info)
        if layout is None:
            return whole
        dtype, stored = run_dtypes(info, dtype)
        chosen = plan_slices(info, dtype, budget, adapted_layers(adapter_tensor_names(Path(adapter_dir)), layout),
                             disk=disk, stored=stored)
    except Exception:  # noqa: BLE001 - whatever stops planning here, the single run reports it with its fix
        return whole
    if chosen is None:
        return whole
    rest = tuple(i for i in check_ids if i not in sliced_ids)
    return ([WorkUnit(rest)] if rest else []) + [WorkUnit(dynamic, layers) for layers in chosen]


def adapter_tensor_names(adapter_dir: Path) -> list[str]:
    """The adapter's tensor names from the safetensors header (a ``.bin`` is read with ``weights_only=True``)."""
    from harness.inputs.adapter_dir import SAFETENSORS_NAME, read_adapter_tensors
    from harness.inputs.files import regular_file_problem

    if regular_file_problem(adapter_dir / SAFETENSORS_NAME) is None:
        from safetensors import safe_open

        with safe_open(str(adapter_dir / SAFETENSORS_NAME), "pt") as handle:
            return list(handle.keys())
    return list(read_adapter_tensors(adapter_dir))


def _sliced_check_ids() -> list[str]:
    from harness.checks.registry import checks

    return [c.id for c in checks(SLICED_GROUP)]
