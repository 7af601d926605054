"""The store's sorted map: bytes keys to bytes records, in parallel sorted lists.

A record is one immutable bytes object: the key's create revision, mod
revision and version as big-endian uint64s, then its value
(:func:`pack_record`). An object per key with its own ints cost about 100
bytes more per key (issue 9: 1,000,000 keys of 100 bytes must fit in a
400 MB node); and records being immutable, the watch history shares them with
the map, and a snapshot is the map's keys and records as they are.

Why not ``sortedcontainers.SortedDict``: it keeps a hash table beside its
sorted key lists, about 40 bytes a key, and the only way from its sorted keys
to their values is one hash lookup per key: 0.3-0.8 s to gather 1,000,000
records for a snapshot, on the thread that applies commands (issue 9). Here
keys and values sit side by side in lists of at most ``2 * LOAD`` items
(``sortedcontainers``' layout), so a lookup is two C bisections, a range is a
slice of each list, and the whole map is two flat lists in one pass at C speed.

Positions (for counts and slices by index) come from the start offset of
each sublist, rebuilt lazily (at C speed) after the number of keys changes.
Pure: no I/O, no clock, no randomness; iteration order is key order only.
"""

from __future__ import annotations

import struct
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from itertools import accumulate, chain, islice
from operator import lt
from typing import Any, Final

from raftcoord.errors import ValueFormatError
from raftcoord.events import KeyValue
from raftcoord.keys import MAX_CLOCK

__all__ = ["META_SIZE", "KVMap", "pack_record", "record_kv", "record_meta", "record_mod_revision", "record_value"]

_META: Final = struct.Struct(">QQQ")
#: Bytes of revisions before a record's value.
META_SIZE: Final = _META.size
_pack_meta = _META.pack
_unpack_meta = _META.unpack_from


def pack_record(value: bytes, create: int, mod: int, version: int) -> bytes:
    """A record: the revisions (uint64s; struct.error past them), then the value."""
    return _pack_meta(create, mod, version) + value


def record_kv(key: bytes, rec: bytes) -> KeyValue:
    """A record as the public, immutable KeyValue."""
    return KeyValue(key, rec[META_SIZE:], *_unpack_meta(rec))


def record_meta(rec: bytes) -> tuple[int, int, int]:
    """A record's create revision, mod revision and version."""
    return _unpack_meta(rec)  # type: ignore[no-any-return]


def record_value(rec: bytes) -> bytes:
    """A record's value."""
    return rec[META_SIZE:]


def record_mod_revision(rec: bytes) -> int:
    """A record's mod revision."""
    return int.from_bytes(rec[8:16], "big")

#: Sublists split past ``2 * LOAD`` items and join a neighbour at ``LOAD // 2``.
LOAD: Final = 1000


class KVMap:
    """A sorted map of ``bytes`` keys to ``bytes`` values (see the module docstring)."""

    __slots__ = ("_keys", "_vals", "_maxes", "_len", "_offsets")

    #: Sublist size (a class attribute so that tests can make it small).
    load: int = LOAD

    def __init__(self) -> None:
        self._keys: list[list[bytes]] = []
        self._vals: list[list[bytes]] = []
        self._maxes: list[bytes] = []  # the last (largest) key of each sublist
        self._len = 0
        self._offsets: list[int] | None = []  # where each sublist starts; None: to rebuild

    @classmethod
    def from_sorted(cls, keys: list[bytes], values: list[bytes]) -> KVMap:
        """A map from strictly ascending ``keys`` and their ``values`` (not checked here)."""
        m = cls()
        n, load = len(keys), cls.load
        m._keys = [keys[i : i + load] for i in range(0, n, load)]
        m._vals = [values[i : i + load] for i in range(0, n, load)]
        m._maxes = [sub[-1] for sub in m._keys]
        m._len = n
        m._offsets = None
        return m

    @classmethod
    def from_snapshot(cls, kvs: Any, *, flat: bool = True) -> KVMap:
        """A map from a snapshot's ``kvs``; raises ValueFormatError if they are malformed.

        ``flat``: ``[keys, records]`` as :meth:`flat` gives (snapshot format
        4); else ``[[key, value, create, mod, version], ...]`` (formats 1-3).
        """
        keys, records = _flat_kvs(kvs) if flat else _listed_kvs(kvs)
        # Whole-list checks at C speed: a per-key Python loop cost 5 s per
        # 1,000,000 keys, the whole of a restart's budget (issue 9).
        if not set(map(type, keys)) <= {bytes} or not set(map(type, records)) <= {bytes}:
            raise ValueFormatError("snapshot keys and values must be bytes", field="kvs")
        if records and min(map(len, records)) < META_SIZE:
            raise ValueFormatError(f"snapshot records must hold {META_SIZE} bytes of revisions", field="kvs")
        if not all(map(lt, keys, islice(keys, 1, None))):
            raise ValueFormatError("snapshot keys are not strictly sorted", field="kvs")
        return cls.from_sorted(keys, records)

    def __len__(self) -> int:
        return self._len

    def __contains__(self, key: bytes) -> bool:
        i = bisect_left(self._maxes, key)
        if i == len(self._maxes):
            return False
        sub = self._keys[i]
        return sub[bisect_left(sub, key)] == key

    def __iter__(self) -> Iterator[bytes]:
        return chain.from_iterable(self._keys)

    def get(self, key: bytes) -> bytes | None:
        """The key's value, or None."""
        i = bisect_left(self._maxes, key)
        if i == len(self._maxes):
            return None
        sub = self._keys[i]
        j = bisect_left(sub, key)
        return self._vals[i][j] if sub[j] == key else None

    def __getitem__(self, key: bytes) -> bytes:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: bytes, value: bytes) -> None:
        maxes = self._maxes
        if not maxes:
            self._keys.append([key])
            self._vals.append([value])
            maxes.append(key)
            self._grown()
            return
        i = bisect_left(maxes, key)
        if i == len(maxes):
            i -= 1
            self._keys[i].append(key)
            self._vals[i].append(value)
            maxes[i] = key
        else:
            sub = self._keys[i]
            j = bisect_left(sub, key)
            if sub[j] == key:
                self._vals[i][j] = value
                return
            sub.insert(j, key)
            self._vals[i].insert(j, value)
        self._grown()
        if len(self._keys[i]) > 2 * self.load:
            self._split(i)

    def pop(self, key: bytes) -> bytes:
        """Remove ``key`` and return its value; KeyError if it is absent."""
        i = bisect_left(self._maxes, key)
        if i == len(self._maxes):
            raise KeyError(key)
        sub, vals = self._keys[i], self._vals[i]
        j = bisect_left(sub, key)
        if sub[j] != key:
            raise KeyError(key)
        value = vals.pop(j)
        del sub[j]
        self._len -= 1
        self._offsets = None
        if not sub:
            del self._keys[i], self._vals[i], self._maxes[i]
            return value
        self._maxes[i] = sub[-1]
        if len(sub) <= self.load // 2 and len(self._keys) > 1:
            self._merge(i if i + 1 < len(self._keys) else i - 1)
        return value

    def __delitem__(self, key: bytes) -> None:
        self.pop(key)

    # ------------------------------------------------------------- positions

    def bisect_left(self, key: bytes) -> int:
        """The index of the first key >= ``key``."""
        i = bisect_left(self._maxes, key)
        if i == len(self._maxes):
            return self._len
        return self._starts()[i] + bisect_left(self._keys[i], key)

    def bisect_right(self, key: bytes) -> int:
        """The index of the first key > ``key``."""
        i = bisect_right(self._maxes, key)
        if i == len(self._maxes):
            return self._len
        return self._starts()[i] + bisect_right(self._keys[i], key)

    def key_at(self, index: int) -> bytes:
        """The key at ``index`` (0 <= index < len)."""
        if not 0 <= index < self._len:
            raise IndexError(index)
        starts = self._starts()
        i = bisect_right(starts, index) - 1
        return self._keys[i][index - starts[i]]

    def keys_between(self, lo: int, hi: int) -> list[bytes]:
        """The keys at indexes ``lo`` to ``hi - 1``, ascending."""
        return self._slice(self._keys, lo, hi)

    def items_between(self, lo: int, hi: int) -> tuple[list[bytes], list[bytes]]:
        """The keys and values at indexes ``lo`` to ``hi - 1``, ascending."""
        return self._slice(self._keys, lo, hi), self._slice(self._vals, lo, hi)

    def flat(self) -> tuple[list[bytes], list[bytes]]:
        """Every key and every value, as two new lists in key order."""
        return list(chain.from_iterable(self._keys)), list(chain.from_iterable(self._vals))

    # -------------------------------------------------------------- internals

    def _grown(self) -> None:
        self._len += 1
        self._offsets = None

    def _starts(self) -> list[int]:
        starts = self._offsets
        if starts is None:
            starts = self._offsets = [0, *accumulate(map(len, self._keys))]
            starts.pop()
        return starts

    def _slice(self, lists: list[list[bytes]], lo: int, hi: int) -> list[bytes]:
        lo, hi = max(lo, 0), min(hi, self._len)
        if lo >= hi:
            return []
        starts = self._starts()
        i = bisect_right(starts, lo) - 1
        off = lo - starts[i]
        first = lists[i]
        if off + (hi - lo) <= len(first):
            return first[off : off + hi - lo]
        out = first[off:]
        need = hi - lo - len(out)
        i += 1
        while need > len(lists[i]):
            out.extend(lists[i])
            need -= len(lists[i])
            i += 1
        out.extend(lists[i][:need])
        return out

    def _split(self, i: int) -> None:
        keys, vals, load = self._keys[i], self._vals[i], self.load
        self._keys[i : i + 1] = [keys[:load], keys[load:]]
        self._vals[i : i + 1] = [vals[:load], vals[load:]]
        self._maxes[i : i + 1] = [keys[load - 1], keys[-1]]

    def _merge(self, i: int) -> None:
        """Join sublists ``i`` and ``i + 1`` (then split again if too long)."""
        self._keys[i : i + 2] = [self._keys[i] + self._keys[i + 1]]
        self._vals[i : i + 2] = [self._vals[i] + self._vals[i + 1]]
        del self._maxes[i]
        self._maxes[i] = self._keys[i][-1]
        if len(self._keys[i]) > 2 * self.load:
            self._split(i)


def _uint(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_CLOCK:
        raise ValueFormatError(f"snapshot {name} must be a uint64, got {v!r}", field=name)
    return v


def _flat_kvs(kvs: Any) -> tuple[list[Any], list[Any]]:
    if not (isinstance(kvs, list) and len(kvs) == 2 and isinstance(kvs[0], list) and isinstance(kvs[1], list)):
        raise ValueFormatError("snapshot kvs must be [keys, records]", field="kvs")
    keys, records = kvs
    if len(keys) != len(records):
        raise ValueFormatError(f"snapshot has {len(keys)} keys but {len(records)} records", field="kvs")
    return keys, records


def _listed_kvs(kvs: Any) -> tuple[list[Any], list[Any]]:
    keys, records = [], []
    for item in kvs:
        key, value, create, mod, version = item
        if not isinstance(key, bytes) or not isinstance(value, bytes):
            raise ValueFormatError("snapshot keys and values must be bytes", field="kvs")
        keys.append(key)
        records.append(pack_record(value, _uint(create, "create_revision"), _uint(mod, "mod_revision"), _uint(version, "version")))
    return keys, records
