"""On-disk activation cache: safetensors shards plus a manifest.

Layout of a cache folder::

    manifest.json              what was cached and which shards are whole
    shard_00000.safetensors    acts [N, D] (model dtype), token [N] int32, window [N] int64,
                               position [N] int16, windows [W, T] int32 (the shard's whole windows)

Several hook points: ``acts`` rows are their concatenation (see stream.py); the manifest lists
``"hooks"`` and ``"widths"`` in column order and ``"d_in"`` is the total width. A single-hook
manifest also keeps ``"hook"``; manifests written before "hooks" existed read as single-hook.

Every row knows its token id, its window (global index in the packed corpus part) and its
position, and each shard keeps its windows' token ids, so analysis can find the text again.

Crash safety: a shard is written under a temporary name and renamed when whole, and only
then listed in the manifest (itself replaced atomically). On restart the writer checks every
listed shard's size, drops a damaged one and everything after it, and continues from the
last whole shard. The reader refuses an unfinished cache and checks each shard's size before
trusting it.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from saeforge.activations.batcher import ShuffledBatcher
from saeforge.activations.stream import as_points, columns_of, hook_widths, train_windows, window_activations
from saeforge.config import ActivationsConfig, DataConfig, UserError, to_dict
from saeforge.io import atomic_path, atomic_write_text

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


class CacheError(UserError, RuntimeError):
    """A cache folder that cannot be used as asked; the message says what to do."""


def _identity(lm, hook_points, data_cfg: DataConfig, part: str) -> dict:
    # The fields that must match for a resumed cache to be one consistent cache.
    points = as_points(hook_points)
    names, widths = [p.name for p in points], hook_widths(lm, points)
    hook = {"hook": names[0]} if len(points) == 1 else {}
    return {
        "model": lm.name,
        **hook,
        "hooks": names,
        "widths": widths,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "d_in": sum(widths),
        "context_size": data_cfg.context_size,
        "part": part,
        "corpus": to_dict(data_cfg),
    }


def manifest_hooks(manifest: dict) -> tuple[list[str], list[int]]:
    """(hook names, widths) in column order; a manifest without "hooks" (older saeforge) is single-hook."""
    if "hooks" in manifest:
        return list(manifest["hooks"]), [int(w) for w in manifest["widths"]]
    return [manifest["hook"]], [int(manifest["d_in"])]


def _with_hooks(manifest: dict) -> dict:
    names, widths = manifest_hooks(manifest)
    return {**manifest, "hooks": names, "widths": widths}


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise CacheError(f"{folder} is not an activation cache (no {MANIFEST}); make one with `saeforge cache`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{path} is damaged ({e}); delete the folder and run `saeforge cache` again") from e


def _shard_ok(folder: Path, shard: dict) -> bool:
    path = folder / shard["file"]
    return path.exists() and path.stat().st_size == shard["bytes"]


def write_cache(
    lm,
    hook_points,
    data_cfg: DataConfig,
    act_cfg: ActivationsConfig,
    folder: str | Path,
    n_tokens: int,
    part: str = "train",
    progress: bool = True,
    window_range: tuple[int, int] | None = None,
) -> dict:
    """Cache at least ``n_tokens`` activation rows (whole windows) into ``folder``; resumes a partial cache.

    ``hook_points``: one HookPoint, or a list whose activations are concatenated into each row.

    ``window_range=(lo, hi)``: cache exactly windows lo..hi-1 instead (one rank's part of a parallel
    cache, see sharding.py); ``n_tokens`` is then only recorded.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.tmp-*"):
        stale.unlink()  # left by a killed writer; never part of the cache
    ident = _identity(lm, hook_points, data_cfg, part)
    if window_range is not None:
        ident["window_range"] = list(window_range)  # a part resumed with another process count is refused
    if (folder / MANIFEST).exists():
        manifest = _with_hooks(read_manifest(folder))  # an older single-hook cache resumes too
        theirs = {k: manifest.get(k) for k in ident}
        if theirs != ident:
            diff = {k: (theirs[k], ident[k]) for k in ident if theirs[k] != ident[k]}
            raise CacheError(
                f"{folder} holds a different cache (cached vs asked: {diff}); choose another folder or delete this one"
            )
        whole = list(itertools.takewhile(lambda s: _shard_ok(folder, s), manifest["shards"]))
        if len(whole) < len(manifest["shards"]):
            log.warning(
                "cache %s: shard %s is damaged; rewriting from there", folder, manifest["shards"][len(whole)]["file"]
            )
        manifest["shards"] = whole
    else:
        manifest = {"format_version": FORMAT_VERSION, **ident, "shards": []}
    manifest.update(target_tokens=n_tokens, complete=False)

    def n_rows() -> int:
        return sum(s["rows"] for s in manifest["shards"])

    def commit() -> None:
        manifest["n_rows"] = n_rows()
        manifest["n_windows"] = manifest["shards"][-1]["windows"][1] if manifest["shards"] else 0
        atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")

    lo, hi = window_range or (0, None)
    start = manifest["shards"][-1]["windows"][1] if manifest["shards"] else lo
    windows = itertools.islice(train_windows(lm.tokenizer, data_cfg, part), start, hi)
    if window_range is not None:
        n_tokens = 1 << 62  # write the whole range: stop when the windows run out
    bar = tqdm(
        total=None if window_range else n_tokens,
        initial=min(n_rows(), n_tokens),
        unit="tok",
        desc="cache",
        disable=not progress,
    )
    pending: list = []
    next_window = start
    while n_rows() < n_tokens:
        block = list(itertools.islice(windows, act_cfg.lm_batch_size))
        if block:
            (wa,) = window_activations(lm, hook_points, torch.stack(block), data_cfg, len(block))
            pending.append((next_window, wa))
            next_window += len(block)
            bar.update(int(wa.keep_ST.sum()))
        rows_pending = sum(int(w.keep_ST.sum()) for _, w in pending)
        if pending and (not block or rows_pending >= act_cfg.shard_rows or n_rows() + rows_pending >= n_tokens):
            tensors = _shard_tensors(pending)
            name = f"shard_{len(manifest['shards']):05d}.safetensors"
            with atomic_path(folder / name) as tmp:
                save_file(tensors, str(tmp))
            manifest["shards"].append(
                {
                    "file": name,
                    "rows": len(tensors["token"]),
                    "windows": [pending[0][0], next_window],
                    "bytes": (folder / name).stat().st_size,
                }
            )
            commit()
            pending = []
        if not block:
            if n_rows() < n_tokens and window_range is None:
                log.warning("corpus part %r ran out after %d rows (asked for %d)", part, n_rows(), n_tokens)
            break
    bar.close()
    manifest["complete"] = True
    commit()
    return manifest


def _shard_tensors(pending: list) -> dict[str, torch.Tensor]:
    acts, token, window, position, windows = [], [], [], [], []
    for first, wa in pending:
        S, T = wa.tokens_ST.shape
        win_ST = (first + torch.arange(S)).unsqueeze(1).expand(S, T)
        pos_ST = torch.arange(T).unsqueeze(0).expand(S, T)
        acts.append(wa.acts_STD[wa.keep_ST])
        token.append(wa.tokens_ST[wa.keep_ST].to(torch.int32))
        window.append(win_ST[wa.keep_ST])
        position.append(pos_ST[wa.keep_ST].to(torch.int16))
        windows.append(wa.tokens_ST.to(torch.int32))
    return {
        "acts": torch.cat(acts).contiguous(),
        "token": torch.cat(token),
        "window": torch.cat(window),
        "position": torch.cat(position),
        "windows": torch.cat(windows),
    }


class CacheReader:
    """Shuffled float32 batches from a finished cache; cycles through the shards as epochs.

    ``columns`` (hook name -> slice of a row) and ``d_in`` (total width) describe the rows.
    """

    def __init__(self, folder: str | Path, batch_size: int, seed: int = 0):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        m = self.manifest
        if m.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{folder}: cache format {m.get('format_version')} is not {FORMAT_VERSION}; re-create it")
        if not m.get("complete") or not m["shards"]:
            raise CacheError(
                f"{folder} is unfinished ({m.get('n_rows', 0)} of {m.get('target_tokens')} rows); "
                "run the same `saeforge cache` command again to finish it"
            )
        self.batcher = ShuffledBatcher(self._load_chunk, batch_size, seed)

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    @property
    def hooks(self) -> list[str]:
        return manifest_hooks(self.manifest)[0]

    @property
    def columns(self) -> dict[str, slice]:
        return columns_of(*manifest_hooks(self.manifest))

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    def load_shard(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        shard = self.manifest["shards"][index]
        path = self.folder / shard["file"]
        if not _shard_ok(self.folder, shard):
            size = path.stat().st_size if path.exists() else "missing"
            raise CacheError(
                f"{path} is damaged (size {size}, expected {shard['bytes']} bytes); run the "
                "`saeforge cache` command that made this cache again: it rewrites damaged shards"
            )
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises several types for bad headers
            raise CacheError(f"{path} could not be read ({e}); re-run `saeforge cache` to rewrite it") from e

    def _load_chunk(self, chunk: int) -> torch.Tensor:
        return self.load_shard(chunk % len(self.manifest["shards"]))["acts"]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batcher)

    def state_dict(self) -> dict:
        return self.batcher.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.batcher.load_state_dict(d)
