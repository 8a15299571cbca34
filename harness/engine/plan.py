"""What one run checks: the inputs, the options, and the check ids each adapter reports.

A ``Plan`` is plain data (JSON both ways) so the process that owns the verdict can hand it to the
engine process that runs model code, and both agree on what "every planned check" means: a check
the engine did not report is a failure, never a silent gap. Importing this module imports no torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.checks.context import CheckOptions
from harness.checks.registry import GROUPS, REGISTRY, checks

MIN_TIMEOUT_S = 600.0  # static checks, or a tiny model on a busy machine
SECONDS_PER_GIB = 900.0  # a run loads the base ~10 times: a 7B bf16 base (13 GiB) on 2 CPU cores takes about an hour


@dataclass(frozen=True)
class Plan:
    adapters: tuple[str, ...]  # absolute paths, in the order given
    base_model: str | None = None
    merged: tuple[str | None, ...] = ()  # each adapter's merged checkpoint, aligned with adapters (empty: none)
    options: CheckOptions = field(default_factory=CheckOptions)
    only: tuple[str, ...] = ()  # check ids to run (empty: all that apply)
    skip: tuple[str, ...] = ()  # check ids not to run
    trust_remote_code: bool = False
    timeout_s: float | None = MIN_TIMEOUT_S  # per adapter; None: no limit
    demo: bool = False  # the built-in synthetic demo, not a user's adapter
    # The adapters that are DeepSpeed checkpoints: read from disk once, when the plan is made, and carried (to the
    # engine process too) so no later step scans the directories again. None: not known yet (filled in here).
    zero_checkpoints: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.zero_checkpoints is None:
            from harness.inputs.deepspeed import is_zero_checkpoint

            object.__setattr__(self, "zero_checkpoints", tuple(a for a in self.adapters if is_zero_checkpoint(a)))

    def is_zero_checkpoint(self, adapter: str) -> bool:
        """Whether ``adapter`` is a DeepSpeed checkpoint directory (decided once, when the plan was made)."""
        return adapter in self.zero_checkpoints

    def merged_for(self, index: int) -> str | None:
        """The merged checkpoint paired with adapter ``index`` (None: no merged-model check for it)."""
        return self.merged[index] if index < len(self.merged) else None

    def merged_dirs(self) -> list[str]:
        return [m for m in dict.fromkeys(self.merged) if m is not None]

    def selected(self, check_id: str) -> bool:
        return (not self.only or check_id in self.only) and check_id not in self.skip

    def groups(self, index: int) -> list[str]:
        """The check groups that apply to adapter ``index`` with these inputs, in run order."""
        groups = (["deepspeed"] if self.is_zero_checkpoint(self.adapters[index]) else []) + ["static"]
        groups += (["against-base", "dynamic", "serving"] if self.base_model is not None else [])
        groups += ["merged"] if self.merged_for(index) is not None else []
        return groups + (["quantized"] if self.base_model is not None else [])

    def planned_ids(self, index: int) -> list[str]:
        """Every check id the engine must report for adapter ``index`` (a missing one becomes a failure)."""
        return [c.id for group in self.groups(index) for c in checks(group) if self.selected(c.id)]

    def runs_model_code(self) -> bool:
        """Whether this run imports model code or unpickles DeepSpeed shards (then it belongs in a child
        process); a static-only run reads files with the safe readers and runs nothing of the inputs'."""
        return self.base_model is not None or bool(self.merged_dirs()) or bool(self.zero_checkpoints)

    def deadline_s(self) -> float | None:
        return None if self.timeout_s is None else self.timeout_s * len(self.adapters)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        options = data["options"]
        if options.get("layers") is not None:
            options["layers"] = tuple(options["layers"])
        data["options"] = CheckOptions(**options)
        for key in ("adapters", "merged", "only", "skip", "zero_checkpoints"):
            data[key] = tuple(data[key])
        return cls(**data)


def pair_merged(adapters: Sequence[str | Path], merged: str | Path | Sequence[str | Path] | None) -> list[
        tuple[str, str | None]]:
    """Each adapter with its own merged checkpoint: ``A=M`` pairs one adapter with ``M``; otherwise the merged
    checkpoints pair with the adapters by position, one each. Raises ``InputError`` when they cannot be paired:
    comparing a merged checkpoint with an adapter that did not make it fails for the wrong reason."""
    from harness.inputs.errors import InputError

    merged_list = [] if merged is None else [merged] if isinstance(merged, (str, Path)) else list(merged)
    pairs: list[tuple[str, str | None]] = []
    explicit = False
    for adapter in adapters:
        text = str(adapter)
        if isinstance(adapter, str) and "=" in text and not Path(text).expanduser().exists():
            text, partner = text.split("=", 1)
            explicit = True
            pairs.append((text, partner))
        else:
            pairs.append((text, None))
    if not merged_list:
        return pairs
    if explicit:
        raise InputError("merged checkpoints given both as --adapter A=M and as --merged; use one way to pair them")
    if len(merged_list) != len(pairs):
        raise InputError(f"{len(pairs)} adapter(s) and {len(merged_list)} merged checkpoint(s) cannot be paired: give "
                         "one --merged per --adapter, in the same order, or write --adapter A=M for each adapter "
                         "with a merged checkpoint")
    return [(adapter, str(m)) for (adapter, _), m in zip(pairs, merged_list)]


def default_timeout_s(*model_dirs: str | Path | None) -> float:
    """A limit per adapter that fits the models given: ``MIN_TIMEOUT_S`` plus ``SECONDS_PER_GIB`` per GiB of
    their weight files (a run loads the base about ten times), instead of one figure for every size."""
    size = 0
    for directory in model_dirs:
        if directory is None:
            continue
        for path in Path(directory).iterdir():
            if path.suffix in (".safetensors", ".bin", ".pt", ".pth") and path.is_file():
                size += path.stat().st_size
    return round(MIN_TIMEOUT_S + SECONDS_PER_GIB * size / 2**30)


def unknown_ids(ids: list[str]) -> list[str]:
    """Ids that name no check (for ``--only`` / ``--skip``)."""
    checks()  # load every group's registrations
    return [i for i in ids if i not in REGISTRY]


def absolute(path: str | Path | None) -> str | None:
    """A path made absolute before any library sees it: a relative local path must never be taken for a
    hub repository id (peft 0.8.2's ``get_peft_model_state_dict`` does that with ``org/model``-shaped paths)."""
    return None if path is None else str(Path(path).expanduser().absolute())


__all__ = ["GROUPS", "Plan", "absolute", "default_timeout_s", "pair_merged", "unknown_ids"]
