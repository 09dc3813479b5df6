"""Prompt words for the pickers: content words first, function words and punctuation behind a toggle,
and the part of a long prompt the text encoder never saw. Plain functions, tested without Streamlit."""

from __future__ import annotations

import re
import unicodedata

# English function words (articles, pronouns, prepositions, conjunctions, auxiliaries): their maps
# exist but rarely answer "where is X". Content words (nouns, adjectives, verbs, numbers) come first.
_FUNCTION_WORDS = """
    a an the this that these those some any each every no
    i me my we us our you your he him his she her it its they them their
    in on at to of for from by with without into onto over under above below between behind beside
    near next up down off out about across along around through toward towards upon within
    and or but nor so yet if then than as because while
    is are was were be been being am do does did have has had will would shall should can could may might must
    there here not very just also too
    """
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split())


def is_punctuation(word: str) -> bool:
    """True when every character is punctuation or a symbol (',', '.', '!!', '-')."""
    return bool(word) and all(unicodedata.category(c)[0] in "PS" for c in word)


def is_content(word: str) -> bool:
    """A word worth a map by default: not a function word, not punctuation."""
    return not is_punctuation(word) and word.casefold() not in FUNCTION_WORDS


def cut_words(prompt: str, kept: list[str]) -> str:
    """The prompt's text after the last word the encoder kept (empty when nothing was cut).

    Each kept word is found in order in the prompt (case-insensitively); what follows the last one is
    what truncation dropped.
    """
    low = prompt.casefold()
    pos = 0
    for word in kept:
        found = low.find(word.casefold(), pos)
        if found < 0:
            squeezed = re.sub(r"\s+", "", word.casefold())
            found = low.find(squeezed, pos)
            if found < 0:
                continue
            word = squeezed
        pos = found + len(word)
    return prompt[pos:].strip()
