"""A feature cache on disk, safe for several processes: SQLite in WAL mode.

Why SQLite: it ships with Python, every write is an ACID transaction (a killed process never
leaves half an entry), WAL mode lets readers work while one writer commits and serialises
writers across processes with a busy timeout, and the whole cache is one file to copy or
delete. LMDB would be as safe but needs a map size chosen in advance and another dependency;
a folder of files needs its own locking and leaves torn files behind on a crash.

What is cached (each key names everything the value depends on):

* ``text|<model>|<text>``: a text embedding;
* ``crop|<model>|<preprocessing>|<image>|<box>``: the embedding of one box crop (proposal or
  QAM box);
* ``props|<source>|<image>``: a source's proposals of one image;
* ``image|<model>|<preprocessing>|<image>``: a whole-image embedding (KAM's ``fi``, and the
  image side of ``bicm pseudo-label``'s matching).

``<model>`` is a hash of the weights plus the autocast dtype, ``<image>`` a hash of the decoded
pixels, ``<source>`` the source id with its options. A change to any of them misses the cache
instead of reusing stale features. Every value carries a checksum; an entry that fails it
(disk corruption, a foreign writer) is deleted, counted, and recomputed by the caller.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import warn

__all__ = ["FeatureCache", "CacheStats", "Entry"]

Entry = tuple[dict[str, torch.Tensor], dict[str, Any]]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    meta TEXT NOT NULL,
    checksum TEXT NOT NULL
)
"""


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0
    corrupt: int = 0


class FeatureCache:
    """Key -> (tensors, JSON metadata), persisted in one SQLite file.

    Parameters
    ----------
    path: the database file (created with its folder when missing).

    A cache that breaks (garbage pages under an intact header, a path under a regular file,
    a full disk) never stops the work: one warning names the real cause and the cache is off
    for the rest of the run (every lookup misses, nothing is stored). Only a path that is not
    a regular file (a FIFO, a device) is refused, as a mistake in the command.
    """

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)
        self.stats = CacheStats()
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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
            conn.execute("SELECT COUNT(*) FROM entries").fetchone()  # reads the pages: garbage fails here
        except sqlite3.DatabaseError as exc:
            raise sqlite3.DatabaseError(f"not a usable SQLite database: {exc}") from None
        self._local.conn = conn
        self._pid = os.getpid()
        return conn

    @staticmethod
    def _checksum(value: bytes, meta: str) -> str:
        return hashlib.blake2b(value + meta.encode("utf-8"), digest_size=16).hexdigest()

    def get_many(self, keys: Iterable[str]) -> dict[str, Entry]:
        """The entries found (missing and corrupt keys are absent from the result)."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, Entry] = {}
        if self.broken is None:
            try:
                conn = self._connect()
                for start in range(0, len(keys), 500):
                    chunk = keys[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    rows = conn.execute(f"SELECT key, value, meta, checksum FROM entries WHERE key IN ({marks})", chunk).fetchall()
                    for key, value, meta, checksum in rows:
                        entry = self._decode(key, bytes(value), meta, checksum)
                        if entry is not None:
                            found[key] = entry
            except (sqlite3.Error, OSError) as exc:
                self._disable(exc)
                found = {}
        self.stats.hits += len(found)
        self.stats.misses += len(keys) - len(found)
        return found

    def _decode(self, key: str, value: bytes, meta: str, checksum: str) -> Optional[Entry]:
        try:
            if self._checksum(value, meta) != checksum:
                raise ValueError("checksum mismatch")
            return st_load(value), json.loads(meta)
        except Exception:  # corrupt entry: drop it, the caller recomputes
            self.stats.corrupt += 1
            if self.stats.corrupt == 1:
                warn(f"feature cache {self.path.name}: a corrupt entry was found and will be recomputed")
            try:
                self._connect().execute("DELETE FROM entries WHERE key = ?", (key,))
            except (sqlite3.Error, OSError):
                pass  # a read-only or full cache keeps the bad entry; it is skipped again next time
            return None

    def put_many(self, items: Mapping[str, Entry]) -> None:
        """Store entries in one transaction (all or none)."""
        if not items or self.broken is not None:
            return
        rows = []
        for key, (tensors, meta) in items.items():
            value = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
            meta_text = json.dumps(meta, sort_keys=True)
            rows.append((key, value, meta_text, self._checksum(value, meta_text)))
        try:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
        except (sqlite3.Error, OSError) as exc:
            self._disable(exc)
            return
        try:
            conn.executemany("INSERT OR REPLACE INTO entries (key, value, meta, checksum) VALUES (?, ?, ?, ?)", rows)
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
            return int(self._connect().execute("SELECT COUNT(*) FROM entries").fetchone()[0])
        except (sqlite3.Error, OSError) as exc:
            self._disable(exc)
            return 0

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
