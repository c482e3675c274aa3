"""A bounded LRU cache of finished completions, for deterministic requests."""

from __future__ import annotations

import collections
import json


class OutputCache:
    """At most `max_entries` entries and `max_bytes` bytes; the least recently used go first.
    Values are kept as their JSON bytes, so that the bound counts what they occupy (a dict of
    lists holds several times its JSON's size). Used from the event loop only."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return json.loads(entry)

    def put(self, key: str, value: dict) -> None:
        entry = json.dumps(value).encode()
        size = len(key) + len(entry)
        if size > self.max_bytes or self.max_entries < 1:
            return
        if key in self._entries:
            self.bytes -= len(key) + len(self._entries.pop(key))
        self._entries[key] = entry
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            dropped, entry = self._entries.popitem(last=False)
            self.bytes -= len(dropped) + len(entry)
