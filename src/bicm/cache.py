"""Feature caches: one interface, keyed by :class:`CacheKey`; on disk (SQLite) or in memory.

Both caches answer ``get_many(keys) -> {key: entry}`` and ``put_many({key: entry})``, where an
entry is ``(tensors, JSON metadata)`` and a key is a small typed tuple (kind, model, image,
key) that names everything the value depends on:

========= ============================================ ============== ==========================
kind      model (what computed it)                     image          key
========= ============================================ ============== ==========================
``text``  the model                                    None           the text
``crop``  the model and the crop preprocessing         the image      the box (``x1,y1,x2,y2``)
``image`` the model and the preprocessing              the image      ``""``
``props`` the proposal source id with its options      the image      ``""``
``pair``  ``""`` (a ``bicm pseudo-label`` store)       None           the pair's id
========= ============================================ ============== ==========================

The model is a hash of the weights plus the autocast dtype, the image a hash of the decoded
pixels (:func:`bicm.imageio.image_digest`). A change to any of them misses the cache instead of
reusing stale features. Since the image is a field of its own, a cache groups, counts or
evicts by image without taking keys apart.

:class:`FeatureCache`, on disk, safe for several processes: SQLite in WAL mode. Why SQLite: it
ships with Python, every write is an ACID transaction (a killed process never leaves half an
entry), WAL mode lets readers work while one writer commits and serialises writers across
processes with a busy timeout, and the whole cache is one file to copy or delete. LMDB would
be as safe but needs a map size chosen in advance and another dependency; a folder of files
needs its own locking and leaves torn files behind on a crash. Every value carries a checksum;
an entry that fails it (disk corruption, a foreign writer) is deleted, counted, and recomputed
by the caller. The file records its format (``PRAGMA user_version``, :data:`SCHEMA_VERSION`):
a cache of an older format is emptied and rebuilt, one of a newer format is left alone.

:class:`MemoryFeatureCache`, in memory: the last few images (``bicm serve``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Union

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import BicmError, warn

__all__ = ["CacheKey", "FeatureCache", "MemoryFeatureCache", "CacheStats", "Entry", "SCHEMA_VERSION"]

Entry = tuple[dict[str, torch.Tensor], dict[str, Any]]


class CacheKey(NamedTuple):
    """What a cached value is (see the module's table); hashable, compared field by field."""

    kind: str
    model: str
    image: Optional[str]
    key: str = ""


#: The format of the SQLite file (its ``PRAGMA user_version``). 1 (stored as 0): one text
#: key per entry, ``kind|model|...``; 2: the fields of :class:`CacheKey` as columns.
SCHEMA_VERSION = 2

# ``image`` is "" for keys of no image (NULLs would not be equal in the primary key); the
# image comes first so that the rows of one image are one range of the primary key's index
_SCHEMA = """
CREATE TABLE IF NOT EXISTS features (
    image TEXT NOT NULL,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    meta TEXT NOT NULL,
    checksum TEXT NOT NULL,
    PRIMARY KEY (image, kind, model, key)
)
"""


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0
    corrupt: int = 0


class FeatureCache:
    """:class:`CacheKey` -> (tensors, JSON metadata), persisted in one SQLite file.

    Parameters
    ----------
    path: the database file (created with its folder when missing).
    rebuild_old: a file of an older format (:data:`SCHEMA_VERSION`) is emptied, with one
        warning, and used; with ``False`` it is refused with a :class:`~bicm.errors.BicmError`
        instead (a store whose entries cannot be recomputed, e.g. ``bicm pseudo-label``'s).

    A cache that breaks (garbage pages under an intact header, a path under a regular file,
    a full disk, a file of a newer format) never stops the work: one warning names the real
    cause and the cache is off for the rest of the run (every lookup misses, nothing is
    stored). Only a path that is not a regular file (a FIFO, a device) is refused, as a
    mistake in the command.
    """

    def __init__(self, path: Union[str, Path], *, rebuild_old: bool = True) -> None:
        self.path = Path(path)
        self.stats = CacheStats()
        self.rebuild_old = rebuild_old
        self._local = threading.local()
        self._pid = -1
        self.broken: Optional[str] = None
        try:
            self._connect()
        except (sqlite3.Error, OSError) as exc:
            self._disable(exc)

    def _disable(self, exc: BaseException) -> None:
        """Turn the cache off after a fault, with one warning that names the cause."""
        if self.broken is None:
            text = str(exc).strip()
            cause = getattr(exc, "strerror", None) or (text.splitlines()[0] if text else type(exc).__name__)
            self.broken = str(cause)[:200]
            warn(f"feature cache {self.path} cannot be used ({self.broken}); going on without it")
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass
            self._local.conn = None

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._pid == os.getpid():
            return conn
        if self.path.exists():
            from .safeload import regular_file

            regular_file(self.path, "feature cache")
        conn = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                self._set_up(conn)
            conn.execute("SELECT COUNT(*) FROM features").fetchone()  # reads the pages: garbage fails here
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, _NewerFormat):
                raise sqlite3.DatabaseError(f"not a usable SQLite database: {exc}") from None
            raise
        self._local.conn = conn
        self._pid = os.getpid()
        return conn

    def _set_up(self, conn: sqlite3.Connection) -> None:
        """Create the table in a new file, or rebuild one of an older format (in one
        transaction, so that two processes opening it at once do it once)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise _NewerFormat(f"written by a newer bicm (format {version}; this one reads {SCHEMA_VERSION})")
            old = version < SCHEMA_VERSION and conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'entries'").fetchone()
            if old and not self.rebuild_old:
                raise BicmError(f"{self.path} was written by an older bicm (format {version or 1}); this one cannot read it")
            if old:
                conn.execute("DROP TABLE entries")
            conn.execute(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise
        if old:
            warn(f"feature cache {self.path} was written by an older bicm (format {version or 1}); it starts again empty")
            try:
                conn.execute("VACUUM")  # gives the old entries' pages back
            except sqlite3.Error:
                pass  # another process is reading it: the space is reused by new entries

    @staticmethod
    def _checksum(value: bytes, meta: str) -> str:
        return hashlib.blake2b(value + meta.encode("utf-8"), digest_size=16).hexdigest()

    def get_many(self, keys: Iterable[CacheKey]) -> dict[CacheKey, Entry]:
        """The entries found (missing and corrupt keys are absent from the result)."""
        keys = list(dict.fromkeys(keys))
        found: dict[CacheKey, Entry] = {}
        if self.broken is None:
            groups: dict[tuple[str, str, str], list[str]] = {}
            for k in keys:  # one query per image, kind and model (e.g. the crops of one image)
                groups.setdefault((k.image or "", k.kind, k.model), []).append(k.key)
            try:
                conn = self._connect()
                for (image, kind, model), names in groups.items():
                    for start in range(0, len(names), 500):
                        chunk = names[start : start + 500]
                        marks = ",".join("?" * len(chunk))
                        rows = conn.execute(
                            f"SELECT key, value, meta, checksum FROM features WHERE image = ? AND kind = ? AND model = ? AND key IN ({marks})",
                            (image, kind, model, *chunk),
                        ).fetchall()
                        for name, value, meta, checksum in rows:
                            key = CacheKey(kind, model, image or None, name)
                            entry = self._decode(key, bytes(value), meta, checksum)
                            if entry is not None:
                                found[key] = entry
            except (sqlite3.Error, OSError) as exc:
                self._disable(exc)
                found = {}
        self.stats.hits += len(found)
        self.stats.misses += len(keys) - len(found)
        return found

    def _decode(self, key: CacheKey, value: bytes, meta: str, checksum: str) -> Optional[Entry]:
        try:
            if self._checksum(value, meta) != checksum:
                raise ValueError("checksum mismatch")
            return st_load(value), json.loads(meta)
        except Exception:  # corrupt entry: drop it, the caller recomputes
            self.stats.corrupt += 1
            if self.stats.corrupt == 1:
                warn(f"feature cache {self.path.name}: a corrupt entry was found and will be recomputed")
            try:
                self._connect().execute(
                    "DELETE FROM features WHERE image = ? AND kind = ? AND model = ? AND key = ?", _row_key(key)
                )
            except (sqlite3.Error, OSError):
                pass  # a read-only or full cache keeps the bad entry; it is skipped again next time
            return None

    def put_many(self, items: Mapping[CacheKey, Entry]) -> None:
        """Store entries in one transaction (all or none)."""
        if not items or self.broken is not None:
            return
        rows = []
        for key, (tensors, meta) in items.items():
            value = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
            meta_text = json.dumps(meta, sort_keys=True)
            rows.append((*_row_key(key), value, meta_text, self._checksum(value, meta_text)))
        try:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
        except (sqlite3.Error, OSError) as exc:
            self._disable(exc)
            return
        try:
            conn.executemany(
                "INSERT OR REPLACE INTO features (image, kind, model, key, value, meta, checksum) VALUES (?, ?, ?, ?, ?, ?, ?)", rows
            )
            conn.execute("COMMIT")
        except BaseException as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # on a full disk the rollback fails too; its error would hide the real cause
            if isinstance(exc, (sqlite3.Error, OSError)):
                self._disable(exc)  # e.g. "database or disk is full"
                return
            raise
        self.stats.writes += len(rows)

    def __len__(self) -> int:
        if self.broken is not None:
            return 0
        try:
            return int(self._connect().execute("SELECT COUNT(*) FROM features").fetchone()[0])
        except (sqlite3.Error, OSError) as exc:
            self._disable(exc)
            return 0

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class _NewerFormat(sqlite3.DatabaseError):
    """A cache file of a format newer than :data:`SCHEMA_VERSION` (left as it is)."""


def _row_key(key: CacheKey) -> tuple[str, str, str, str]:
    """``key`` as the table's primary key columns (image, kind, model, key)."""
    return (key.image or "", key.kind, key.model, key.key)


# ----------------------------------------------------------------------------------------
class MemoryFeatureCache:
    """An in-memory :class:`FeatureCache` (the same ``get_many`` / ``put_many``) that keeps
    the last few images.

    Entries of an image (its proposals, crop and whole-image embeddings: ``key.image`` set)
    are grouped by image, and the ``images`` most recently used images are kept (LRU), so
    memory stays bounded however many images a server sees. Entries of no image (text
    embeddings) are kept apart, for the last ``texts`` of them.

    Parameters
    ----------
    images: how many images to keep.
    texts: how many entries of no image to keep.
    """

    def __init__(self, images: int = 8, texts: int = 4096) -> None:
        self.max_images = int(images)
        self.max_texts = int(texts)
        self.stats = CacheStats()
        self._images: "OrderedDict[str, dict[CacheKey, Entry]]" = OrderedDict()
        self._texts: "OrderedDict[CacheKey, Entry]" = OrderedDict()
        self._lock = threading.Lock()

    def has_image(self, digest: str) -> bool:
        """Whether anything of the image ``digest`` is cached."""
        with self._lock:
            return digest in self._images

    def get_many(self, keys: Iterable[CacheKey]) -> dict[CacheKey, Entry]:
        found: dict[CacheKey, Entry] = {}
        with self._lock:
            for key in keys:
                if key.image is None:
                    hit = self._texts.get(key)
                    if hit is not None:
                        self._texts.move_to_end(key)
                else:
                    group = self._images.get(key.image)
                    hit = None if group is None else group.get(key)
                    if group is not None:
                        self._images.move_to_end(key.image)
                if hit is None:
                    self.stats.misses += 1
                else:
                    self.stats.hits += 1
                    found[key] = hit
        return found

    def put_many(self, items: Mapping[CacheKey, Entry]) -> None:
        with self._lock:
            for key, entry in items.items():
                if key.image is None:
                    self._texts[key] = entry
                    self._texts.move_to_end(key)
                else:
                    self._images.setdefault(key.image, {})[key] = entry
                    self._images.move_to_end(key.image)
                self.stats.writes += 1
            while len(self._images) > self.max_images:
                self._images.popitem(last=False)
            while len(self._texts) > self.max_texts:
                self._texts.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._texts) + sum(len(g) for g in self._images.values())

    def close(self) -> None:
        """Nothing to release (the same interface as the disk cache)."""
