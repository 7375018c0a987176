"""Encoded feature JSON kept in memory, so a feature the server has answered once costs a dict look-up.

A feature database is immutable once ``saeforge index`` renamed it into place, except that ``saeforge explain``
and ``saeforge map`` add tables to it later while a server may be running. Entries are therefore keyed by the
file's generation: (mtime_ns, size) of the database and of its ``-wal`` file when there is one. Any commit
changes it, and the next request finds no entry of the new generation and rebuilds (old entries age out of
the LRU). A stat per request costs microseconds; re-reading and re-encoding a feature costs milliseconds.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

try:  # optional: faster encoding on a miss; the stdlib encoder gives the same JSON
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None


def encode(obj: Any) -> bytes:
    """Compact UTF-8 JSON, as Starlette's JSONResponse writes it (NaN is an error there too)."""
    if orjson is not None:
        return orjson.dumps(obj)
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def generation(path: Path) -> tuple[int, ...]:
    """What changes whenever a writer commits to the SQLite file at ``path``."""
    st = os.stat(path)
    out = (st.st_mtime_ns, st.st_size)
    try:
        wal = os.stat(f"{path}-wal")
    except FileNotFoundError:
        return out
    return (*out, wal.st_mtime_ns, wal.st_size)


class JSONCache:
    """A thread-safe LRU of encoded responses, one per (path, generation of path, key): ``lookup`` then, on a
    miss, ``store`` the bytes built. ``maxsize`` bounds the entries (a feature's JSON is
    ~10-100 KB, so the default 2048 holds up to ~200 MB on a large database)."""

    def __init__(self, maxsize: int = 2048):
        self.maxsize = maxsize
        self._data: OrderedDict[Hashable, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.peeked = 0  # the hits found by peek (FeatureHits' answers, which never reach the app)

    def lookup(self, path: Path, key: Hashable) -> tuple[Hashable, bytes | None]:
        """(full key, bytes or None); the full key is what ``store`` takes after a miss."""
        full = (str(path), generation(path), key)
        return full, self._find(full, peek=False)

    def peek(self, path: Path, key: Hashable) -> bytes | None:
        """The bytes if held (counted as a hit), else None (not counted: the caller's ``lookup`` counts the miss)."""
        return self._find((str(path), generation(path), key), peek=True)

    def _find(self, full: Hashable, peek: bool) -> bytes | None:
        with self._lock:
            body = self._data.get(full)
            if body is None:
                self.misses += not peek
            else:
                self.hits += 1
                self.peeked += peek
                self._data.move_to_end(full)
            return body

    def store(self, full: Hashable, body: bytes) -> None:
        with self._lock:
            self._data[full] = body
            self._data.move_to_end(full)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)


class FeatureHits:
    """ASGI middleware: ``GET /api/feature/{model}/{sae}/{index}`` with no query string, whose JSON the cache
    already holds, is answered here, before FastAPI's routing, validation and response classes (most of the
    server's time on a hit). Everything else, misses included, goes on to the app, which builds, caches and
    documents the same response. ``lookup(model, sae, index)`` returns the cached bytes or None."""

    PREFIX = "/api/feature/"

    def __init__(self, app, lookup: Callable[[str, str, int], bytes | None]):
        self.app, self.lookup = app, lookup

    async def __call__(self, scope, receive, send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and not scope.get("query_string")
            and scope["path"].startswith(self.PREFIX)
        ):
            parts = scope["path"][len(self.PREFIX) :].split("/")
            if len(parts) == 3 and parts[2].isascii() and parts[2].isdigit():
                body = self.lookup(parts[0], parts[1], int(parts[2]))
                if body is not None:
                    headers = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    await send({"type": "http.response.body", "body": body})
                    return
        await self.app(scope, receive, send)
