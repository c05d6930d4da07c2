"""Data: sources (JSONL, save_to_disk folders, prepare outputs, HF names, the synthetic teacher),
chat-template tokenization with response-only labels, and collation (padded or padding-free).

Heavy imports (datasets, transformers) happen inside the functions that need them.
"""

from redi_ds.data.errors import DataError

__all__ = ["DataError"]
