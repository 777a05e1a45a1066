"""Sources: where records come from. The pipeline knows them only through ``Source``."""

from .base import Source, SourceRecord
from .file import FileSource

__all__ = ["Source", "SourceRecord", "FileSource"]
