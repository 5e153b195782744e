"""The feature cache: round trips, corruption, several writing processes, and its keys."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest
import torch

from bicm import BicmWarning, Grounder
from bicm.cache import SCHEMA_VERSION, CacheKey, FeatureCache
from bicm.proposals.selective import SelectiveSearch

from .helpers import SCENE_BOXES, draw_scene, make_backbone


def K(name: str) -> CacheKey:
    return CacheKey("test", "m", None, name)


def test_round_trip(tmp_path):
    cache = FeatureCache(tmp_path / "c.sqlite")
    cache.put_many({K("a"): ({"f": torch.arange(4.0)}, {"names": ["x", None]})})
    tensors, meta = cache.get_many([K("a"), K("b")])[K("a")]
    assert torch.equal(tensors["f"], torch.arange(4.0)) and meta == {"names": ["x", None]}
    assert cache.stats.hits == 1 and cache.stats.misses == 1
    again = FeatureCache(tmp_path / "c.sqlite")  # another handle, same file
    assert len(again) == 1


def test_corrupt_entry_is_dropped_and_reported(tmp_path):
    path = tmp_path / "c.sqlite"
    cache = FeatureCache(path)
    cache.put_many({K("k"): ({"f": torch.ones(8)}, {})})
    with sqlite3.connect(path) as conn:
        (value,) = conn.execute("SELECT value FROM features WHERE key='k'").fetchone()
        broken = bytearray(value)
        broken[-3] ^= 0xFF
        conn.execute("UPDATE features SET value=? WHERE key='k'", (bytes(broken),))
    with pytest.warns(BicmWarning, match="corrupt entry"):
        assert cache.get_many([K("k")]) == {}
    assert cache.stats.corrupt == 1 and len(cache) == 0


def _writer(path, worker):
    cache = FeatureCache(path)
    for i in range(40):
        key = f"shared-{i}" if i % 2 else f"w{worker}-{i}"
        cache.put_many({K(key): ({"f": torch.full((16,), float(i))}, {"i": i})})


@pytest.mark.slow
def test_several_processes_write_at_once(tmp_path):
    path = tmp_path / "c.sqlite"
    FeatureCache(path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = FeatureCache(path)
    assert len(cache) == 3 * 20 + 20
    found = cache.get_many([K(f"shared-{i}") for i in range(1, 40, 2)])
    assert all(torch.equal(t["f"], torch.full((16,), float(m["i"]))) for t, m in found.values())
    assert cache.stats.corrupt == 0


def test_grounder_with_cache_gives_the_same_results_and_hits(tmp_path):
    cache = FeatureCache(tmp_path / "c.sqlite")
    plain = Grounder(make_backbone())
    cached = Grounder(make_backbone(), cache=cache)
    image = draw_scene()
    source = SelectiveSearch(top_n=10)
    want = plain.ground_many(image, ["a red square", "grass"], source)
    first = cached.ground_many(image, ["a red square", "grass"], source)
    misses = cache.stats.misses
    again = Grounder(make_backbone(), cache=cache).ground_many(image, ["a red square", "grass"], SelectiveSearch(top_n=10))
    assert cache.stats.misses == misses  # the second pass computed nothing it had
    for a, b, c in zip(want, first, again):
        assert a.box == b.box == c.box
        assert torch.allclose(a.candidates.fused, c.candidates.fused, atol=1e-6)
    # other weights, other preprocessing or another source: nothing is reused
    before = cache.stats.hits
    Grounder(make_backbone(seed=1), cache=cache).ground_many(image, ["a red square"], SCENE_BOXES)
    assert cache.stats.hits == before
    Grounder(make_backbone(), cache=cache).with_config(crop_resize="squash").ground_many(image, ["a red square"], SCENE_BOXES)
    assert cache.stats.hits == before + 1  # only the query text was the same


def _old_format_file(path):
    """A cache as bicm wrote it before the CacheKey format (one ``kind|...`` text key per entry)."""
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE entries (key TEXT PRIMARY KEY, value BLOB NOT NULL, meta TEXT NOT NULL, checksum TEXT NOT NULL)")
        conn.execute("INSERT INTO entries VALUES ('text|m|a', x'00', '{}', 'x')")
    conn.close()


def test_a_cache_of_an_older_format_starts_again_empty(tmp_path):
    path = tmp_path / "c.sqlite"
    _old_format_file(path)
    with pytest.warns(BicmWarning, match="older bicm") as caught:
        cache = FeatureCache(path)
    assert len([w for w in caught if issubclass(w.category, BicmWarning)]) == 1
    assert cache.broken is None and len(cache) == 0
    cache.put_many({K("a"): ({"f": torch.ones(2)}, {})})
    assert cache.get_many([K("a")])[K("a")][0]["f"].tolist() == [1.0, 1.0]
    cache.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'entries'").fetchone() is None
    conn.close()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(FeatureCache(path)) == 1  # rebuilt once: opened again, it is simply used


def test_a_cache_of_a_newer_format_is_left_alone(tmp_path):
    path = tmp_path / "c.sqlite"
    FeatureCache(path).put_many({K("a"): ({"f": torch.ones(2)}, {})})
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.warns(BicmWarning, match="newer bicm"):
        cache = FeatureCache(path)
    assert cache.broken is not None and cache.get_many([K("a")]) == {}
    cache.put_many({K("b"): ({"f": torch.ones(2)}, {})})
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM features").fetchone()[0] == 1


def test_a_kam_store_of_an_older_format_is_refused_not_emptied(tmp_path):
    from bicm.errors import BicmError
    from bicm.pseudo import _kam_store

    path = tmp_path / "kam_features.sqlite"
    _old_format_file(path)
    with pytest.raises(BicmError, match="older bicm.*pseudo-label' again"):
        _kam_store(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 1
