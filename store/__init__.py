"""The read side: a store's runs, maps and statistics as numpy / Arrow, and the SQL sandbox. Never imports torch."""

from store.errors import IndexDamaged, QueryError, Results, RunDataMissing, RunNotFound, StoreError, WordNotFound
from store.reader import ALL_LEVELS, GLOBAL, SelfAttention, Store, Word, open_sandboxed

__all__ = [
    "ALL_LEVELS",
    "GLOBAL",
    "IndexDamaged",
    "QueryError",
    "Results",
    "RunDataMissing",
    "RunNotFound",
    "SelfAttention",
    "Store",
    "StoreError",
    "Word",
    "WordNotFound",
    "open_sandboxed",
]
