"""The trace contract: the one definition of what a StepX trace holds.

Both the pipeline (writer) and the read side import this package; nothing else defines columns.
"""

from schema.layout import DEFAULT_STORE, store_root
from schema.tables import (
    INDEX_TABLES,
    RUN_FILES,
    SCHEMA_VERSION,
    TABLES,
    SchemaVersionError,
    check_version,
    column_docs,
    file_metadata,
)
from schema.views import USER_VIEWS, view_sql

__all__ = [
    "DEFAULT_STORE",
    "INDEX_TABLES",
    "RUN_FILES",
    "SCHEMA_VERSION",
    "TABLES",
    "USER_VIEWS",
    "SchemaVersionError",
    "check_version",
    "column_docs",
    "file_metadata",
    "store_root",
    "view_sql",
]
