"""The README documents every trace column (generated from schema/) and every CLI command."""

from __future__ import annotations

from pathlib import Path

from schema.docs import markdown
from stepx.cli import COMMANDS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_embeds_current_schema_docs():
    assert markdown() in README, "README's schema section is stale: regenerate it with `python -m schema.docs`"


def test_readme_lists_every_command():
    for name in COMMANDS:
        assert f"stepx {name}" in README
