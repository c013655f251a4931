"""The HDF5 training cache (data/training.hdf5, data/testing.hdf5): schema, writers, readers.

Modules: ``schema`` (the file format, written down there; opening a cache; reading rows),
``build`` (the streaming writer and `prepare.py cache`'s tiles), ``imports`` (`prepare.py
import`'s image/mask pairs), ``batches`` (evaluation order, shuffled training batches).
The names below are what train.py, validate.py and training code use.
"""

from __future__ import annotations

from osmseg.cache.batches import BatchReader, iter_labels, iter_tiles, label_histogram, make_batches
from osmseg.cache.build import split_indices
from osmseg.cache.schema import SCHEMA_VERSION, CacheInfo, open_cache

__all__ = [
    "SCHEMA_VERSION",
    "BatchReader",
    "CacheInfo",
    "iter_labels",
    "iter_tiles",
    "label_histogram",
    "make_batches",
    "open_cache",
    "split_indices",
]
