"""saeforge.data: document sources, the train/held-out split, window packing, excluded positions."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from pathlib import Path, PurePosixPath

import pytest
import torch

import saeforge.data.corpus as corpus_mod
import saeforge.data.packing as packing_mod
from saeforge.config import DataConfig
from saeforge.data import (
    CorpusError,
    Document,
    PackingError,
    excluded_mask,
    heldout_score,
    iter_documents,
    pack_batches,
    pack_windows,
    split_documents,
)

BOS, EOS, PAD = 0, 1, 2  # the tiny tokenizer's special ids (tests/tiny.py)
WORDS = "the quick brown fox jumps over lazy dog def add return import class pass print".split()


def make_docs(n: int, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    return [Document(f"doc{i}", " ".join(rng.choices(WORDS, k=rng.randint(1, 40)))) for i in range(n)]


def ids_of(docs) -> list[str]:
    return [d.id for d in docs]


# ---- split ---------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_complete_and_near_fraction():
    docs = make_docs(4000)
    cfg = DataConfig(holdout_fraction=0.1, seed=3)
    train = ids_of(split_documents(docs, cfg, "train"))
    held = ids_of(split_documents(docs, cfg, "heldout"))
    assert train == ids_of(split_documents(iter(docs), cfg, "train"))  # same answer from a fresh iterator
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(ids_of(docs))
    # Binomial(4000, 0.1): mean 400, sd 19; +-80 is > 4 sd.
    assert 320 <= len(held) <= 480
    # The documented rule: held out iff the first 8 bytes of sha1(f"{seed}:{id}") / 2**64 < fraction.
    import hashlib

    ref = [d.id for d in docs if int(hashlib.sha1(f"3:{d.id}".encode()).hexdigest()[:16], 16) / 2**64 < 0.1]
    assert held == ref
    # Order within a part follows the corpus order.
    assert held == [i for i in ids_of(docs) if i in set(held)]


def test_split_depends_on_seed_and_id_not_text():
    docs = make_docs(500)
    held0 = ids_of(split_documents(docs, DataConfig(holdout_fraction=0.2, seed=0), "heldout"))
    held1 = ids_of(split_documents(docs, DataConfig(holdout_fraction=0.2, seed=1), "heldout"))
    assert held0 != held1
    renamed_text = [Document(d.id, d.text.upper() + " changed") for d in docs]
    assert held0 == ids_of(split_documents(renamed_text, DataConfig(holdout_fraction=0.2, seed=0), "heldout"))


def test_split_raises_when_a_part_gets_no_documents():
    cfg = DataConfig(holdout_fraction=0.02, seed=0)
    one = [Document("only", "some text")]
    home, empty = ("heldout", "train") if heldout_score("only", 0) < 0.02 else ("train", "heldout")
    assert ids_of(split_documents(one, cfg, home)) == ["only"]
    with pytest.raises(CorpusError, match=f"none of the 1 documents .* fell in the {empty} part"):
        list(split_documents(one, cfg, empty))
    with pytest.raises(ValueError, match="expected one of"):
        split_documents(one, cfg, "test")


def test_document_is_frozen():
    doc = Document("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        doc.text = "c"


# ---- packing -------------------------------------------------------------------------------------


def reference_stream(docs, tok) -> list[int]:
    """Each document tokenised alone, joined by EOS: what the packed windows must reproduce."""
    out: list[int] = []
    for i, d in enumerate(docs):
        if i:
            out.append(tok.eos_token_id)
        out.extend(tok(d.text, add_special_tokens=False)["input_ids"])
    return out


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_windows_reproduce_the_eos_joined_token_stream(tiny_tokenizer, monkeypatch, prepend_bos):
    monkeypatch.setattr(packing_mod, "DOCS_PER_BATCH", 7)  # force many carry-overs between tokenizer batches
    docs = make_docs(60)
    cfg = DataConfig(context_size=16, prepend_bos=prepend_bos)
    windows = list(pack_windows(docs, tiny_tokenizer, cfg))
    stream = reference_stream(docs, tiny_tokenizer)
    body = 15 if prepend_bos else 16
    assert len(windows) == len(stream) // body > 20
    for w in windows:
        assert w.shape == (16,) and w.dtype == torch.long
    if prepend_bos:
        assert all(int(w[0]) == BOS for w in windows)
    joined = torch.cat([w[1:] if prepend_bos else w for w in windows]).tolist()
    assert joined == stream[: len(windows) * body]  # exact; only the unfilled tail is dropped
    assert joined.count(EOS) == stream[: len(joined)].count(EOS) > 5


def test_pack_windows_is_lazy_on_an_endless_corpus(tiny_tokenizer):
    endless = (Document(str(i), "def add(a, b): return a + b") for i in itertools.count())
    windows = pack_windows(endless, tiny_tokenizer, DataConfig(context_size=32))
    first = list(itertools.islice(windows, 3))
    assert [w.shape for w in first] == [(32,)] * 3


def test_pack_batches_stacks_windows_and_keeps_the_remainder(tiny_tokenizer):
    docs = make_docs(40)
    cfg = DataConfig(context_size=8)
    windows = list(pack_windows(docs, tiny_tokenizer, cfg))
    batches = list(pack_batches(docs, tiny_tokenizer, cfg, n_seq=5))
    assert [b.shape[0] for b in batches] == [5] * (len(windows) // 5) + ([len(windows) % 5] if len(windows) % 5 else [])
    assert all(b.shape[1] == 8 for b in batches)
    assert torch.equal(torch.cat(batches), torch.stack(windows))
    with pytest.raises(ValueError, match="n_seq=0"):
        pack_batches(docs, tiny_tokenizer, cfg, n_seq=0)


def test_no_bos_tokenizer_needs_prepend_bos_off():
    import tiny  # on sys.path via conftest.py

    tok = tiny.make_tokenizer()
    tok.bos_token = None
    docs = make_docs(10)
    with pytest.raises(PackingError, match="Set data.prepend_bos false"):
        pack_windows(docs, tok, DataConfig(context_size=8))  # raised at call time, before iterating
    windows = list(pack_windows(docs, tok, DataConfig(context_size=8, prepend_bos=False)))
    assert torch.cat(windows).tolist() == reference_stream(docs, tok)[: 8 * len(windows)]


def test_excluded_mask_by_hand(tiny_tokenizer):
    tokens_ST = torch.tensor([[BOS, 50, EOS, 60, 70], [BOS, PAD, PAD, 80, EOS], [90, 91, BOS, 92, 93]])
    expected = torch.tensor(
        [
            [True, False, True, False, False],
            [True, True, True, False, True],
            [False, False, True, False, False],
        ]
    )
    mask = excluded_mask(tokens_ST, tiny_tokenizer, DataConfig())
    assert mask.dtype == torch.bool and torch.equal(mask, expected)
    off = excluded_mask(tokens_ST, tiny_tokenizer, DataConfig(exclude_special_tokens=False))
    assert off.shape == (3, 5) and not off.any()


def test_excluded_mask_on_packed_windows_marks_bos_and_separators(tiny_tokenizer):
    cfg = DataConfig(context_size=12)
    tokens_ST = next(pack_batches(make_docs(30), tiny_tokenizer, cfg, n_seq=16))
    mask = excluded_mask(tokens_ST, tiny_tokenizer, cfg)
    assert mask[:, 0].all()
    assert torch.equal(mask[:, 1:], tokens_ST[:, 1:] == EOS)  # the docs hold no other special token


# ---- local sources -------------------------------------------------------------------------------


def cfg_for(path, **kw) -> DataConfig:
    return DataConfig(corpus=str(path), **kw)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" if r is not None else "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def test_txt_small_file_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("Hello there.\n\nSecond paragraph.\n", encoding="utf-8")
    docs = list(iter_documents(cfg_for(tmp_path / "a.txt")))
    assert docs == [Document("a.txt#0", "Hello there.\n\nSecond paragraph.\n")]


def test_txt_large_file_is_cut_at_blank_lines_and_rejoins_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "TXT_CHUNK_CHARS", 100)
    paragraphs = [f"paragraph {i}\n" + "word " * (i % 7 * 5) + "\nend." for i in range(40)]  # 3 lines each
    text = "\n\n".join(paragraphs) + "\n\n\n"
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    docs = list(iter_documents(cfg_for(tmp_path / "book.txt")))
    assert "".join(d.text for d in docs) == text
    assert ids_of(docs) == [f"book.txt#{i}" for i in range(len(docs))] and len(docs) >= 8
    for d in docs[:-1]:
        assert len(d.text) >= 100 and d.text.endswith("\n\n")  # cut only after a blank line
    assert all(d.text.startswith("paragraph") for d in docs)


def test_jsonl_lines_become_documents(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"text": "one"}, None, {"text": "", "x": 1}, {"text": None}, {"text": "four", "y": 2}]
    )
    docs = list(iter_documents(cfg_for(path)))
    assert docs == [Document("d.jsonl:1", "one"), Document("d.jsonl:5", "four")]
    other = write_jsonl(tmp_path / "e.jsonl", [{"body": "alpha"}])
    assert ids_of(iter_documents(cfg_for(other, text_column="body"))) == ["e.jsonl:1"]


def test_parquet_rows_become_documents(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", {"text": ["r0", None, "r2", "  "], "n": [0, 1, 2, 3]})
    assert list(iter_documents(cfg_for(path))) == [Document("p.parquet:0", "r0"), Document("p.parquet:2", "r2")]


def test_folder_reads_every_supported_file_in_a_seeded_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "a.txt").write_text("text a", encoding="utf-8")
    (tmp_path / "sub" / "b.txt").write_text("text b", encoding="utf-8")
    write_jsonl(tmp_path / "c.jsonl", [{"text": "c1"}, {"text": "c2"}])
    write_parquet(tmp_path / "sub" / "d.parquet", {"text": ["d0"]})
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden" / "x.txt").write_text("ignored", encoding="utf-8")
    runs = {seed: ids_of(iter_documents(cfg_for(tmp_path, seed=seed))) for seed in range(6)}
    expected = {"a.txt#0", "sub/b.txt#0", "c.jsonl:1", "c.jsonl:2", "sub/d.parquet:0"}
    assert all(set(ids) == expected and len(ids) == 5 for ids in runs.values())
    assert runs[0] == ids_of(iter_documents(cfg_for(tmp_path, seed=0)))
    assert len({tuple(ids) for ids in runs.values()}) > 1  # the seed changes the file order
    for ids in runs.values():  # a jsonl keeps its own line order
        assert ids.index("c.jsonl:1") + 1 == ids.index("c.jsonl:2")


# ---- bad inputs ----------------------------------------------------------------------------------


def test_empty_corpora_say_what_was_looked_at(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "   \n"}])
    with pytest.raises(CorpusError, match=r"no non-empty documents in file .*empty\.jsonl.*python-stdlib"):
        list(iter_documents(cfg_for(path)))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "readme.md").write_text("x", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"holds no \.txt/\.jsonl/\.parquet/\.py files"):
        iter_documents(cfg_for(tmp_path / "folder"))


def test_jsonl_without_the_text_column_names_file_line_and_keys(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"content": "x", "meta": 1}])
    with pytest.raises(CorpusError) as e:
        list(iter_documents(cfg_for(path)))
    msg = str(e.value)
    assert "bad.jsonl, line 2" in msg and "['content', 'meta']" in msg and "text_column" in msg


def test_jsonl_with_broken_json_or_wrong_types(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"broken\.jsonl, line 2: not valid JSON"):
        list(iter_documents(cfg_for(tmp_path / "broken.jsonl")))
    path = write_jsonl(tmp_path / "num.jsonl", [{"text": 5}])
    with pytest.raises(CorpusError, match=r"num\.jsonl, line 1: 'text' holds int"):
        list(iter_documents(cfg_for(path)))


def test_parquet_without_the_text_column_lists_columns(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", {"body": ["x"], "id": [1]})
    with pytest.raises(CorpusError, match=r"p\.parquet: no column 'text'; columns: \['body', 'id'\]"):
        iter_documents(cfg_for(path))  # raised at call time


def test_missing_paths_and_unsupported_files(tmp_path):
    for name in [str(tmp_path / "nope.jsonl"), "./nope", "data/train/x.txt", "~/missing.parquet"]:
        with pytest.raises(CorpusError, match="no such file or folder"):
            iter_documents(DataConfig(corpus=name))
    (tmp_path / "t.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="unsupported file type '.csv'"):
        iter_documents(cfg_for(tmp_path / "t.csv"))
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8"):
        list(iter_documents(cfg_for(tmp_path / "latin.txt")))


# ---- Hugging Face datasets (load_dataset replaced: no network in tests) --------------------------


def fake_datasets(monkeypatch, behaviour):
    import datasets

    calls = []

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return behaviour()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_dataset_streams_rows(monkeypatch):
    calls = fake_datasets(
        monkeypatch, lambda: iter([{"text": "a", "n": 0}, {"text": "", "n": 1}, {"text": "c", "n": 2}])
    )
    docs = list(iter_documents(DataConfig(corpus="owner/set", dataset_split="validation")))
    assert calls == [("owner/set", "validation", True)]
    assert docs == [Document("owner/set:validation:0", "a"), Document("owner/set:validation:2", "c")]


def test_hub_errors_are_explained(monkeypatch):
    def offline():
        raise ConnectionError("Couldn't reach 'owner/set' on the Hub (OfflineModeIsEnabled)")

    fake_datasets(monkeypatch, offline)
    with pytest.raises(CorpusError, match=r"could not reach the Hugging Face hub.*local .*python-stdlib"):
        iter_documents(DataConfig(corpus="owner/set"))
    fake_datasets(monkeypatch, lambda: iter([{"content": "x", "id": 1}]))
    with pytest.raises(CorpusError, match=r"no column 'text'; columns: \['content', 'id'\]"):
        list(iter_documents(DataConfig(corpus="owner/set")))


# ---- python-stdlib -------------------------------------------------------------------------------


def test_python_stdlib_has_topics_and_sources_but_no_tests():
    docs = list(iter_documents(DataConfig(corpus="python-stdlib", seed=0)))
    ids = ids_of(docs)
    assert len(ids) == len(set(ids)) > 500
    topics = [i for i in ids if i.startswith("pydoc:")]
    files = [i for i in ids if i.endswith(".py")]
    assert len(topics) > 50 and "pydoc:assert" in topics
    assert len(files) > 400 and {"json/decoder.py", "argparse.py", "asyncio/base_events.py"} <= set(files)
    assert len(topics) + len(files) == len(ids)
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    assert not [i for i in files if skip & set(PurePosixPath(i).parts[:-1])]
    assert "pydoc_data/topics.py" not in ids  # its contents already come in as the topics
    by_id = {d.id: d.text for d in docs}
    assert "class JSONDecoder" in by_id["json/decoder.py"] and by_id["pydoc:assert"].strip()
    assert all(d.text.strip() for d in docs)
    # Seeded shuffle: fixed for a seed, different from sorted order and from another seed.
    assert ids[:30] == ids_of(itertools.islice(iter_documents(DataConfig(seed=0)), 30))
    assert ids != sorted(ids) and ids[:30] != ids_of(itertools.islice(iter_documents(DataConfig(seed=1)), 30))
