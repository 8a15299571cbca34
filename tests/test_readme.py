"""The README stays true: two Quick start commands, and the check table equals the registry."""

import re
from pathlib import Path

from harness.docs import BEGIN, END, check_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_check_table_matches_registry():
    text = README.read_text()
    assert BEGIN in text and END in text, "README lacks the generated check table markers"
    table = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == check_table(), "README check table is stale: regenerate it with `python -m harness.docs`"


def test_quick_start_has_exactly_two_commands():
    section = re.split(r"^## ", README.read_text(), flags=re.M)
    quick = next(s for s in section if s.lower().startswith("quick start"))
    block = quick.split("```", 2)[1]
    commands = [line for line in block.splitlines()[1:] if line.strip() and not line.startswith("#")]
    assert commands == ["bash scripts/in-venv plora-harness demo", "bash scripts/in-venv pytest -n auto"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/in-venv pytest -n auto" in ci
