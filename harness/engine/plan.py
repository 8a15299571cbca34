"""What one run checks: the inputs, the options, and the check ids each adapter reports.

A ``Plan`` is plain data (JSON both ways) so the process that owns the verdict can hand it to the
engine process that runs model code, and both agree on what "every planned check" means: a check
the engine did not report is a failure, never a silent gap. Importing this module imports no torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.checks.context import CheckOptions
from harness.checks.registry import GROUPS, REGISTRY, checks

DEFAULT_TIMEOUT_S = 4 * 3600.0  # per adapter: a 7B base on a CPU loads ~10 times (about an hour on 2 cores)


@dataclass(frozen=True)
class Plan:
    adapters: tuple[str, ...]  # absolute paths, in the order given
    base_model: str | None = None
    merged: str | None = None
    options: CheckOptions = field(default_factory=CheckOptions)
    only: tuple[str, ...] = ()  # check ids to run (empty: all that apply)
    skip: tuple[str, ...] = ()  # check ids not to run
    trust_remote_code: bool = False
    timeout_s: float | None = DEFAULT_TIMEOUT_S  # per adapter; None: no limit
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

    def selected(self, check_id: str) -> bool:
        return (not self.only or check_id in self.only) and check_id not in self.skip

    def groups(self, adapter: str) -> list[str]:
        """The check groups that apply to ``adapter`` with these inputs, in run order."""
        groups = (["deepspeed"] if self.is_zero_checkpoint(adapter) else []) + ["static"]
        groups += (["against-base", "dynamic"] if self.base_model is not None else [])
        return groups + (["merged"] if self.merged is not None else [])

    def planned_ids(self, adapter: str) -> list[str]:
        """Every check id the engine must report for ``adapter`` (a missing one becomes a failure)."""
        return [c.id for group in self.groups(adapter) for c in checks(group) if self.selected(c.id)]

    def runs_model_code(self) -> bool:
        """Whether this run imports model code or unpickles DeepSpeed shards (then it belongs in a child
        process); a static-only run reads files with the safe readers and runs nothing of the inputs'."""
        return self.base_model is not None or self.merged is not None or bool(self.zero_checkpoints)

    def deadline_s(self) -> float | None:
        return None if self.timeout_s is None else self.timeout_s * len(self.adapters)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        data["options"] = CheckOptions(**data["options"])
        for key in ("adapters", "only", "skip", "zero_checkpoints"):
            data[key] = tuple(data[key])
        return cls(**data)


def unknown_ids(ids: list[str]) -> list[str]:
    """Ids that name no check (for ``--only`` / ``--skip``)."""
    checks()  # load every group's registrations
    return [i for i in ids if i not in REGISTRY]


def absolute(path: str | Path | None) -> str | None:
    """A path made absolute before any library sees it: a relative local path must never be taken for a
    hub repository id (peft 0.8.2's ``get_peft_model_state_dict`` does that with ``org/model``-shaped paths)."""
    return None if path is None else str(Path(path).expanduser().absolute())


__all__ = ["DEFAULT_TIMEOUT_S", "GROUPS", "Plan", "absolute", "unknown_ids"]
