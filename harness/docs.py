"""The README's check table, generated from the registry so the two can never drift apart.

``python -m harness.docs`` prints it; a test asserts the README holds exactly this text.
"""

from __future__ import annotations

from harness.checks import checks

BEGIN, END = "<!-- checks:begin -->", "<!-- checks:end -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def check_table() -> str:
    rows = ["| id | group | what it catches | why it matters | how to fix |", "|---|---|---|---|---|"]
    for c in checks():
        rows.append(f"| `{c.id}` | {c.group} | {_cell(c.summary)} | {_cell(c.why)} | {_cell(c.fix)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(check_table())
