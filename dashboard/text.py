"""User text on a page: stored prompts, words and messages are text, never markup."""

from __future__ import annotations

import re

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~:$&=/])")


def escape_markdown(text: str) -> str:
    """Text that renders literally inside a markdown string: every markup character backslash-escaped.

    ':' and '/' are escaped too, which breaks GitHub-style autolinks of bare URLs.
    """
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))


def plain(text: str) -> str:
    """A one-line label safe for widgets whose labels render markdown (radio options, captions)."""
    return escape_markdown(" ".join(str(text).split()))


def definition_list(items: dict[str, str]) -> str:
    """A markdown list of bold terms and their texts, for the app's own authored docs (never stored text)."""
    return "\n".join(f"- **{term}**: {text}" for term, text in items.items())
