"""JSONCache: built once per key and file generation, least recently used entries dropped first."""

import os

from saeforge.viewer.jsoncache import JSONCache, encode, generation


def test_cache_builds_once_per_generation_and_evicts_the_least_recently_used(tmp_path):
    path = tmp_path / "f.db"
    path.write_bytes(b"x")
    calls = []

    def get(path, key, v):
        """What the server does: the cached bytes, or build (recorded in calls), encode and store."""
        full, body = c.lookup(path, key)
        if body is None:
            calls.append(v)
            body = encode({"v": v})
            c.store(full, body)
        return body

    c = JSONCache(maxsize=2)
    assert get(path, 1, 1) == b'{"v":1}' and get(path, 1, 99) == b'{"v":1}'
    get(path, 2, 2)
    get(path, 1, 99)  # 1 is now the most recent, so 3 evicts 2
    get(path, 3, 3)
    assert get(path, 2, 22) == b'{"v":22}' and calls == [1, 2, 3, 22]
    assert (c.hits, c.misses) == (2, 4)
    before = generation(path)
    path.write_bytes(b"xy")  # a writer's commit: size and mtime change, the old answer is not served
    os.utime(path, ns=(1, 1))
    assert generation(path) != before and get(path, 2, 7) == b'{"v":7}'
    (tmp_path / "f.db-wal").write_bytes(b"w")  # a WAL file counts too
    assert len(generation(path)) == 4
