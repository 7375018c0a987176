"""Document sources: the built-in python-stdlib corpus, local files and folders, HF datasets.

Every source yields ``Document(id, text)`` in a deterministic order. Ids are stable names
(a path relative to the corpus root, plus a line, row or chunk number), because the
train / held-out split hashes them: the same corpus and seed always give the same split.

Choices worth knowing:
- ``python-stdlib`` = the pydoc_data.topics entries + the running interpreter's standard-library
  .py files (tests excluded). The list of sources is shuffled with ``cfg.seed`` so training does
  not see all of asyncio first; files are read lazily.
- A ``.py`` file is one document, however long (a cut module would not parse).
- A ``.txt`` file is cut into documents at blank lines once a piece reaches ``TXT_CHUNK_CHARS``
  characters, so a single large text file can still be split into train and held-out parts.
  The pieces concatenate back to the file exactly; a file with no blank lines stays one document.
- ``.jsonl`` lines and ``.parquet`` rows keep their file order (shuffling them would mean reading
  the whole file); a folder's files are sorted, then shuffled with ``cfg.seed``.
- Empty and whitespace-only documents are skipped everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from saeforge.config import DataConfig, UserError

STDLIB = "python-stdlib"
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet", ".py")
# ~5k tokens: many 128-token windows per piece, yet a 1 MB book gives ~50 pieces to split.
TXT_CHUNK_CHARS = 20_000
# Folders of the standard library that hold tests, test data or installed third-party packages.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
# pydoc_data/topics.py is the topics dict itself; the topics already come in as documents.
_STDLIB_SKIP_FILES = frozenset({"pydoc_data/topics.py"})
_PARTS = ("train", "heldout")


@dataclass(frozen=True)
class Document:
    id: str
    text: str


class CorpusError(UserError, ValueError):
    """A corpus that cannot be read or is empty; the message says what was looked at and what to pass."""


def iter_documents(cfg: DataConfig) -> Iterator[Document]:
    """Documents of ``cfg.corpus`` in a deterministic order, empty ones skipped.

    Path and hub problems are raised here, at call time; a corpus that turns out to hold no
    non-empty document raises ``CorpusError`` when the iterator is exhausted.
    """
    corpus = cfg.corpus.strip()
    if corpus == STDLIB:
        return _non_empty(_stdlib_documents(cfg.seed), f"the standard library at {_stdlib_root()}", cfg)
    path = _local_path(corpus)
    if path is None:
        return _non_empty(_hub_documents(cfg), f"Hugging Face dataset {corpus!r} (split {cfg.dataset_split!r})", cfg)
    if path.is_dir():
        return _non_empty(_folder_documents(path, cfg), f"folder {path}", cfg)
    return _non_empty(_file_documents(path, path.name, cfg), f"file {path}", cfg)


def heldout_score(doc_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, doc id); below holdout_fraction = held out."""
    digest = hashlib.sha1(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(docs: Iterable[Document], cfg: DataConfig, part: str) -> Iterator[Document]:
    """The documents of ``part`` ("train" or "heldout"); each document lies wholly in one part.

    Raises ``CorpusError`` at exhaustion if documents were seen but none fell in ``part``
    (e.g. a corpus of one document), rather than letting training or evaluation run on nothing.
    """
    if part not in _PARTS:
        raise ValueError(f"part={part!r}: expected one of {_PARTS}")
    return _split(docs, cfg, part == "heldout", part)


def _split(docs: Iterable[Document], cfg: DataConfig, want_heldout: bool, part: str) -> Iterator[Document]:
    n_seen = n_kept = 0
    for doc in docs:
        n_seen += 1
        if (heldout_score(doc.id, cfg.seed) < cfg.holdout_fraction) == want_heldout:
            n_kept += 1
            yield doc
    if n_seen and not n_kept:
        raise CorpusError(
            f"none of the {n_seen} documents of {cfg.corpus!r} fell in the {part} part "
            f"(data.holdout_fraction={cfg.holdout_fraction}, split by document). Use a corpus with more "
            "documents (a folder of files, a .jsonl with one document per line) or change data.holdout_fraction."
        )


def _non_empty(docs: Iterator[Document], looked_at: str, cfg: DataConfig) -> Iterator[Document]:
    n = 0
    for doc in docs:
        if doc.text.strip():
            n += 1
            yield doc
    if not n:
        raise CorpusError(
            f"no non-empty documents in {looked_at}. Pass a corpus with text: --data.corpus {STDLIB}, "
            f"a .txt file, a .jsonl/.parquet with a {cfg.text_column!r} field (see data.text_column), "
            "a folder of those, or a Hugging Face dataset id."
        )


# ---- python-stdlib ----------------------------------------------------------------------------


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Sorted standard-library .py paths (posix, relative to ``root``), tests and packages excluded."""
    root = root or _stdlib_root()
    found = []
    for folder, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending into test folders and site-packages.
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        rel_folder = Path(folder).relative_to(root)
        for name in filenames:
            rel = (rel_folder / name).as_posix()
            if name.endswith(".py") and rel not in _STDLIB_SKIP_FILES:
                found.append(rel)
    return sorted(found)


def _stdlib_documents(seed: int) -> Iterator[Document]:
    from pydoc_data.topics import topics

    root = _stdlib_root()
    sources = [f"pydoc:{t}" for t in sorted(topics)] + stdlib_files(root)
    random.Random(seed).shuffle(sources)
    for source in sources:
        if source.startswith("pydoc:"):
            yield Document(source, topics[source[len("pydoc:") :]])
            continue
        try:
            text = (root / source).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a few interpreters ship latin-1 or unreadable files; they are not worth failing over
        yield Document(source, text)


# ---- local files --------------------------------------------------------------------------------


def _local_path(corpus: str) -> Path | None:
    """The local file or folder ``corpus`` names, or None when it should be a hub dataset id."""
    path = Path(corpus).expanduser()
    if path.exists():
        return path
    # Hub ids are "name" or "owner/name"; anything else path-shaped must not silently go to the hub.
    looks_local = (
        corpus.startswith(("/", ".", "~"))
        or "\\" in corpus
        or corpus.count("/") >= 2
        or path.suffix.lower() in FILE_SUFFIXES + (".json", ".csv", ".gz")
    )
    if looks_local:
        raise CorpusError(
            f"no such file or folder: {corpus!r}. Pass an existing .txt/.jsonl/.parquet file or folder, "
            f"--data.corpus {STDLIB}, or a Hugging Face dataset id such as 'owner/name'."
        )
    return None


def _folder_documents(root: Path, cfg: DataConfig) -> Iterator[Document]:
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in FILE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise CorpusError(
            f"folder {root} holds no {'/'.join(FILE_SUFFIXES)} files (hidden files are ignored). "
            f"Put text in such files, or pass --data.corpus {STDLIB} or a Hugging Face dataset id."
        )
    random.Random(cfg.seed).shuffle(files)
    return (doc for rel in files for doc in _file_documents(root / rel, rel, cfg))


def _file_documents(path: Path, name: str, cfg: DataConfig) -> Iterator[Document]:
    """Documents of one file; ``name`` (path relative to the corpus root) prefixes their ids."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _txt_documents(path, name)
    if suffix == ".py":
        return _py_documents(path, name)
    if suffix == ".jsonl":
        return _jsonl_documents(path, name, cfg.text_column)
    if suffix == ".parquet":
        return _parquet_documents(path, name, cfg.text_column)
    raise CorpusError(f"{path}: unsupported file type {suffix!r}; expected one of {FILE_SUFFIXES} or a folder")


def _txt_documents(path: Path, name: str) -> Iterator[Document]:
    with _open_utf8(path) as f:
        lines: list[str] = []
        size, cut_ready, index = 0, False, 0
        for line in _decode_lines(f, path):
            blank = not line.strip()
            if cut_ready and not blank:
                # The blank-line run stays with the piece before, so pieces concatenate to the file.
                yield Document(f"{name}#{index}", "".join(lines))
                lines, size, cut_ready, index = [], 0, False, index + 1
            lines.append(line)
            size += len(line)
            cut_ready = cut_ready or (blank and size >= TXT_CHUNK_CHARS)
        if lines:
            yield Document(f"{name}#{index}", "".join(lines))


def _py_documents(path: Path, name: str) -> Iterator[Document]:
    # One document per file, never cut: a piece of a module that starts inside a block does not parse,
    # and `saeforge probe` labels only what parses (like the standard-library files of python-stdlib).
    with _open_utf8(path) as f:
        yield Document(name, "".join(_decode_lines(f, path)))


def _jsonl_documents(path: Path, name: str, column: str) -> Iterator[Document]:
    with _open_utf8(path) as f:
        for lineno, line in enumerate(_decode_lines(f, path), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(
                    f"{path}, line {lineno}: not valid JSON ({e.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(row, dict):
                raise CorpusError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            if column not in row:
                raise CorpusError(
                    f"{path}, line {lineno}: no {column!r} key; keys there: {sorted(row)}. "
                    "Set --data.text_column to the key that holds the text."
                )
            yield Document(f"{name}:{lineno}", _as_text(row[column], f"{path}, line {lineno}", column))


def _parquet_documents(path: Path, name: str, column: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError variants for damaged files
        raise CorpusError(f"{path}: cannot read as parquet ({e})") from e
    columns = pfile.schema_arrow.names
    if column not in columns:
        raise CorpusError(
            f"{path}: no column {column!r}; columns: {columns}. Set --data.text_column to the column that holds the text."
        )
    return _parquet_rows(pfile, path, name, column)


def _parquet_rows(pfile, path: Path, name: str, column: str) -> Iterator[Document]:
    row = 0
    for batch in pfile.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield Document(f"{name}:{row}", _as_text(value, f"{path}, row {row}", column))
            row += 1


def _open_utf8(path: Path):
    return open(path, encoding="utf-8", newline=None)


def _decode_lines(f, path: Path) -> Iterator[str]:
    try:
        yield from f
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None


def _as_text(value: object, where: str, column: str) -> str:
    if value is None:
        return ""  # a null text is an empty document, skipped like any other
    if not isinstance(value, str):
        raise CorpusError(f"{where}: {column!r} holds {type(value).__name__}, expected a string of text")
    return value


# ---- Hugging Face datasets ----------------------------------------------------------------------


def _hub_documents(cfg: DataConfig) -> Iterator[Document]:
    import datasets

    name, split = cfg.corpus.strip(), cfg.dataset_split
    advice = f"Pass a local .txt/.jsonl/.parquet file or folder, or --data.corpus {STDLIB} (needs no network)."
    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
    except ConnectionError as e:  # what datasets raises when offline or the hub is down
        raise CorpusError(
            f"could not reach the Hugging Face hub to stream dataset {name!r} ({e}). {advice} "
            "Setting HF_HUB_OFFLINE=1 makes this fail at once instead of after retries."
        ) from e
    except datasets.exceptions.DatasetNotFoundError as e:
        raise CorpusError(
            f"{name!r} is not a local path, and the hub has no dataset of that name ({e}). {advice}"
        ) from e
    except ValueError as e:  # e.g. "Bad split: ... Available splits: [...]"
        raise CorpusError(f"cannot stream {name!r} split {split!r}: {e}. Check data.dataset_split.") from e
    return _hub_rows(stream, name, split, cfg.text_column)


def _hub_rows(stream: Iterable[dict], name: str, split: str, column: str) -> Iterator[Document]:
    for i, row in enumerate(stream):
        if column not in row:
            raise CorpusError(
                f"dataset {name!r} has no column {column!r}; columns: {sorted(row)}. "
                "Set --data.text_column to the column that holds the text."
            )
        yield Document(f"{name}:{split}:{i}", _as_text(row[column], f"dataset {name!r} row {i}", column))
