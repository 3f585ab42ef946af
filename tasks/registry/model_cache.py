"""The models a long-lived process (the warm check worker) keeps in memory between checks
(``Registry.load_model``).

Entries are keyed by the version (tracking URI, name, version and its registered sha256s) and
remembered with the (size, mtime) of the local files they were loaded from: a hit is served
only while those are unchanged. Loaded objects are shared by content: every site's model
starts as a copy of the same source version (``Registry.copy_to_site``: the same files under
another name), so 100 sites on one source model hold one checkpoint in memory, not 100, and
a version seen for the first time whose files hash to a model already loaded is verified
(sha256) but not loaded again. At most ``size`` distinct models are kept (least recently used
first out).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path
from typing import Any

MODEL_CACHE_SIZE = 4  # distinct models in RAM: plenty for one worker


def stamps(files: list[Path]) -> tuple[Any, ...]:
    """(size, mtime in ns) of each file (None when missing): what a cached model's files were
    when it was loaded."""
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


class ModelCache:
    """Loaded (checkpoint, profile) pairs by content, and the versions that map to them."""

    def __init__(self, size: int = MODEL_CACHE_SIZE) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._objects: OrderedDict[Hashable, tuple[Any, Any]] = OrderedDict()  # content -> pair
        self._versions: dict[Hashable, tuple[Hashable, tuple[Any, ...]]] = {}  # key -> (content, stamps)

    def get(self, key: Hashable, file_stamps: tuple[Any, ...]) -> tuple[Any, Any] | None:
        """The pair cached for version ``key`` if its files still have ``file_stamps``."""
        with self._lock:
            seen = self._versions.get(key)
            if seen is None or seen[1] != file_stamps or seen[0] not in self._objects:
                return None
            self._objects.move_to_end(seen[0])
            return self._objects[seen[0]]

    def shared(self, content: Hashable | None) -> tuple[Any, Any] | None:
        """The pair already loaded from files with these sha256s (None: not loaded)."""
        if content is None:
            return None
        with self._lock:
            return self._objects.get(content)

    def put(self, key: Hashable, content: Hashable | None, pair: tuple[Any, Any],
            file_stamps: tuple[Any, ...]) -> None:
        """Remember ``pair`` for version ``key`` (content None: files without recorded
        sha256s, never shared)."""
        obj_key = content if content is not None else ("version", key)
        with self._lock:
            self._objects[obj_key] = pair
            self._objects.move_to_end(obj_key)
            self._versions[key] = (obj_key, file_stamps)
            while len(self._objects) > self.size:
                self._objects.popitem(last=False)
            if len(self._versions) > 100 * self.size:  # versions of evicted models
                self._versions = {k: v for k, v in self._versions.items()
                                  if v[0] in self._objects}


__all__ = ["MODEL_CACHE_SIZE", "ModelCache", "stamps"]
