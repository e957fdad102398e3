"""The controller's view of API objects: what the watches delivered, plus its own writes.

Reads of the reconciler come from here, never from the API server: a resync costs no
requests, and a reconcile costs only its writes.  Objects are JSON dicts keyed by
``(namespace, name)``; an optional index (e.g. the Destination an object belongs to)
finds an object's siblings without a scan.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping

Key = tuple[str, str]


def key_of(obj: Mapping[str, Any]) -> Key | None:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not meta.get("name"):
        return None
    return (str(meta.get("namespace") or ""), str(meta["name"]))


def _version(obj: Mapping[str, Any]) -> int | None:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion"))
    except (TypeError, ValueError):
        return None


def _later(a: int | None, b: int | None) -> bool:
    """Resource versions are opaque to clients, but every API server in use hands out
    increasing integers; when either is not one, the newcomer wins (as a watch event
    would)."""
    return a is None or b is None or a > b


def newer(new: Mapping[str, Any], old: Mapping[str, Any] | None) -> bool:
    """Is ``new`` a later version than ``old``?"""
    return old is None or _later(_version(new), _version(old))


def _without_managed_fields(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` without ``metadata.managedFields`` (often most of an object's size, and
    never read here)."""
    meta = obj.get("metadata")
    if isinstance(meta, Mapping) and "managedFields" in meta:
        return dict(obj, metadata={k: v for k, v in meta.items() if k != "managedFields"})
    return dict(obj)


class Store:
    """Objects of one kind by ``(namespace, name)``, with an optional secondary index."""

    def __init__(
        self,
        index: Callable[[Mapping[str, Any]], Hashable | None] | None = None,
        *,
        now: Callable[[], float] = time.monotonic,
        tombstone_ttl: float = 60.0,
    ):
        """``tombstone_ttl``: how long a deletion is remembered -- longer than any write
        made before it may take to be answered (the controller: twice a write's budget)."""
        self._objects: dict[Key, dict[str, Any]] = {}
        self._index_fn = index
        self._index: dict[Hashable, set[Key]] = {}
        #: the version at which each watched object was deleted, and until when that is
        #: remembered: the answer to a write made before the deletion, arriving after its
        #: event, must not bring the object back.  Oldest first.
        self._gone: dict[Key, tuple[int | None, float]] = {}
        self._now = now
        self.tombstone_ttl = tombstone_ttl

    def __len__(self) -> int:
        return len(self._objects)

    @property
    def tombstones(self) -> int:
        """How many deletions are remembered now (each for ``tombstone_ttl`` seconds)."""
        return len(self._gone)

    def __contains__(self, key: object) -> bool:
        return key in self._objects

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._objects))

    def get(self, key: Key) -> dict[str, Any] | None:
        return self._objects.get(key)

    def values(self) -> list[dict[str, Any]]:
        return list(self._objects.values())

    def index_of(self, obj: Mapping[str, Any]) -> Hashable | None:
        """``obj``'s index value (None without an index, or when ``obj`` has none)."""
        return self._index_fn(obj) if self._index_fn is not None else None

    def by_index(self, value: Hashable) -> list[dict[str, Any]]:
        return [self._objects[k] for k in sorted(self._index.get(value, ()))]

    def _unindex(self, key: Key) -> None:
        old = self._objects.get(key)
        if old is not None and self._index_fn is not None:
            value = self._index_fn(old)
            if value is not None:
                keys = self._index.get(value)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._index[value]

    def put(self, obj: Mapping[str, Any], *, force: bool = False) -> bool:
        """Store ``obj`` unless an equal or later version is there; True when stored."""
        key = key_of(obj)
        if key is None:
            return False
        old = self._objects.get(key)
        if not force and old is not None and not newer(obj, old):
            return False
        tombstone = self._gone.get(key)
        if not force and tombstone is not None:
            deleted_at, until = tombstone
            if self._now() < until and not _later(_version(obj), deleted_at):
                return False
            del self._gone[key]
        self._unindex(key)
        self._objects[key] = _without_managed_fields(obj)
        if self._index_fn is not None:
            value = self._index_fn(obj)
            if value is not None:
                self._index.setdefault(value, set()).add(key)
        return True

    def remove(self, key: Key) -> dict[str, Any] | None:
        self._unindex(key)
        return self._objects.pop(key, None)

    def forget(self, key: Key) -> bool:
        """This replica deleted ``key``: remove it, and remember the deletion as of the
        version stored (an older version arriving later must not bring it back).  True
        when it was stored; its watch event then changes nothing."""
        old = self._objects.get(key)
        if old is None:
            return False
        self._bury(key, _version(old))
        self.remove(key)
        return True

    def replace(self, items: Iterable[Mapping[str, Any]], namespace: str | None = None) -> set[Key]:
        """A fresh list (of ``namespace``, or of everything): the keys that changed."""
        fresh = {k: o for o in items if (k := key_of(o)) is not None}
        changed = set()
        for key in [k for k in self._gone if namespace is None or k[0] == namespace]:
            del self._gone[key]
        for key in [k for k in self._objects if (namespace is None or k[0] == namespace) and k not in fresh]:
            self.remove(key)
            changed.add(key)
        for key, obj in fresh.items():
            old = self._objects.get(key)
            if old is None or (old.get("metadata") or {}).get("resourceVersion") != (obj.get("metadata") or {}).get("resourceVersion"):
                changed.add(key)
            self.put(obj, force=True)
        return changed

    def _bury(self, key: Key, version: int | None) -> None:
        """Remember ``key``'s deletion; forget those that have expired (oldest first)."""
        now = self._now()
        while self._gone:
            oldest = next(iter(self._gone))
            if self._gone[oldest][1] > now:
                break
            del self._gone[oldest]
        self._gone.pop(key, None)
        self._gone[key] = (version, now + self.tombstone_ttl)

    def event(self, kind: str, obj: Mapping[str, Any]) -> bool:
        """Apply a watch event; True when the store changed (an echo of a write this
        replica made, already stored from the write's answer, changes nothing)."""
        key = key_of(obj)
        if key is None:
            return False
        if kind == "DELETED":
            self._bury(key, _version(obj))
            stored = self._objects.get(key)
            current, deleted_at = _version(stored) if stored is not None else None, _version(obj)
            if current is not None and deleted_at is not None and current > deleted_at:
                return False  # a later object of that name (created again) is not the one deleted
            return self.remove(key) is not None
        return self.put(obj)
