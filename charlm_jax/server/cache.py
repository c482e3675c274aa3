"""A bounded LRU cache of finished completions, for deterministic requests."""

from __future__ import annotations

import collections
import json


class OutputCache:
    """At most `max_entries` entries and `max_bytes` bytes (keys plus JSON values); the
    least recently used go first. Used from the event loop only."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: collections.OrderedDict[str, tuple[dict, int]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, value: dict) -> None:
        size = len(key) + len(json.dumps(value))
        if size > self.max_bytes or self.max_entries < 1:
            return
        if key in self._entries:
            self.bytes -= self._entries.pop(key)[1]
        self._entries[key] = (value, size)
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped
