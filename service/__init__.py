"""synclock: serialized LLM pricing syncs behind a fenced Redis lease lock."""

__version__ = "0.1.0"
