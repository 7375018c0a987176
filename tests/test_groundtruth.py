"""Ground truth on Python: hand-labelled snippets, the token boundary rule, planted coverage / probing / TPP, windows."""

from __future__ import annotations

import importlib
import inspect

import numpy as np
import pytest
import torch

from saeforge.config import DataConfig
from saeforge.data import Document
from saeforge.groundtruth.labels import (
    PROPERTIES,
    OffsetsError,
    check_offsets,
    label_source,
    token_labels,
)
from saeforge.groundtruth.metrics import OrCounts, ThresholdCounts, coverage, reconstruction
from saeforge.groundtruth.probing import ProbeSample, k_sparse_probing
from saeforge.groundtruth.windows import WindowStats, labelled_windows

SNIPPET = '''"""Module doc."""
import os.path as p

@dec(1)
def f(a, b=(1, [2])):
    """Doc."""
    x = f"v{a}"  # note
    "not a docstring"
    return a.b[0] + 0x1F


class C(Base):
    def m(self):
        return (self.y,
                3)
'''


def props_at(text: str, needle: str, offset: int = 0, nth: int = 0) -> set[str]:
    """The properties of the character ``offset`` into the ``nth`` occurrence of ``needle``."""
    i = -1
    for _ in range(nth + 1):
        i = text.index(needle, i + 1)
    chars_PC = label_source(text).chars_PC
    return {name for name, on in zip(PROPERTIES, chars_PC[:, i + offset]) if on}


def test_hand_labelled_snippet():
    s = SNIPPET
    assert props_at(s, '"""Module') >= {"cat_docstring", "in_string", "depth_0", "indent_0", "line_start"}
    assert props_at(s, "import") >= {"cat_keyword", "in_import", "line_start"}
    assert "attribute" not in props_at(s, "path")  # a dotted import name is not an attribute access
    # decorators: '@' through the call, not the def
    assert {"in_decorator", "cat_operator"} <= props_at(s, "@dec")
    assert {"in_decorator", "cat_name"} <= props_at(s, "dec(1)")
    assert "in_decorator" not in props_at(s, "def f") and "in_def" in props_at(s, "def f")
    assert "in_def" not in props_at(s, "@dec")
    assert {"def_name", "cat_name"} <= props_at(s, "f(a,")
    assert "def_name" not in props_at(s, "a,")
    # nested brackets: a bracket sits at the depth outside it
    line = "f(a, b=(1, [2])):"
    depth = {
        o: next(p for p in props_at(s, line, o) if p.startswith("depth_")) for o in (1, 2, 7, 8, 11, 12, 13, 14, 15)
    }
    assert depth == {
        1: "depth_0",  # (
        2: "depth_1",  # a
        7: "depth_1",  # inner (
        8: "depth_2",  # 1
        11: "depth_2",  # [
        12: "depth_3plus",  # 2
        13: "depth_2",  # ]
        14: "depth_1",  # )
        15: "depth_0",  # )
    }
    assert props_at(s, '"""Doc') >= {"cat_docstring", "in_string", "indent_1", "in_def", "line_start"}
    assert "line_start" not in props_at(s, '"""Doc', 1)
    # an f-string is one STRING token on 3.11: its {a} is string, not a name
    fa = props_at(s, 'f"v{a}"', 4)
    assert "cat_string" in fa and "cat_name" not in fa
    assert props_at(s, "# note") >= {"cat_comment", "indent_1"} and "in_string" not in props_at(s, "# note")
    later = props_at(s, '"not a docstring"')
    assert "cat_string" in later and "cat_docstring" not in later
    assert {"attribute", "cat_name", "depth_0"} <= props_at(s, "b[0]") and "attribute" not in props_at(s, "a.b")
    assert "cat_number" in props_at(s, "0x1F", 2)
    assert "in_class" in props_at(s, "Base") and "in_class" not in props_at(s, "return a.b")
    m = props_at(s, "self.y")
    assert {"in_class", "in_def", "indent_2", "depth_1", "cat_name"} <= m
    # a continuation line keeps its statement's indentation level
    assert {"indent_2", "depth_1", "cat_number", "line_start"} <= props_at(s, "3)")


def test_unparseable_documents_are_skipped_and_counted_and_prose_is_prose(tiny_tokenizer):
    assert label_source("def f(:\n    pass\n") is None
    assert label_source("x = '''never closed\n") is None
    docs = [
        Document("a.py", "def add(a, b):\n    return a + b\n" * 20),
        Document("broken.py", "def f(:\n"),
        Document("pydoc:if", "The if statement is used for conditional execution. " * 10),
    ]
    stats = WindowStats()
    cfg = DataConfig(context_size=16)
    windows = list(labelled_windows(docs, tiny_tokenizer, cfg, stats))
    assert (stats.n_code, stats.n_unparseable, stats.n_prose) == (1, 1, 1)
    assert stats.unparseable_ids == ["broken.py"]
    valid_NP = torch.cat([w.valid_TP for w in windows])
    labels_NP = torch.cat([w.labels_TP for w in windows])
    tokens_N = torch.cat([w.tokens_T for w in windows])
    prose = PROPERTIES.index("prose")
    code_rows = valid_NP[:, 1:].all(1)
    prose_rows = valid_NP[:, prose] & ~valid_NP[:, 1:].any(1)
    assert code_rows.any() and prose_rows.any()
    assert labels_NP[prose_rows, prose].all() and not labels_NP[code_rows, prose].any()
    assert not labels_NP[prose_rows, 1:].any()  # prose is left out of the code properties
    special = torch.isin(tokens_N, torch.tensor([tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id]))
    assert special.any() and not valid_NP[special].any()
    assert all(len(w.tokens_T) == 16 and int(w.tokens_T[0]) == tiny_tokenizer.bos_token_id for w in windows)


def test_token_boundary_rule_on_a_merging_tokenizer(tiny_tokenizer):
    text = "def add(a, b):\n    return a + b  # c\n"
    enc = tiny_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    pieces = [text[a:b] for a, b in enc["offset_mapping"]]
    labels = token_labels(label_source(text), enc["offset_mapping"], text)
    got: dict[str, set[str]] = {}
    for piece, row in zip(pieces, labels):  # the first occurrence of each piece
        got.setdefault(piece, {n for n, on in zip(PROPERTIES, row) if on})
    # the tiny BPE merges across label boundaries; each merged token is labelled by its first non-space character
    assert {"):", " b", " return", " #", "\n   "} <= set(pieces)
    assert got["):"] >= {"cat_operator", "depth_0", "in_def"}
    assert {"cat_name", "depth_1"} <= got[" b"]  # the space carries no category; 'b' does
    assert {"cat_keyword", "line_start", "indent_1"} <= got[" return"]  # 'r' starts the line, the space does not
    assert "cat_comment" in got[" #"]
    assert not any(p.startswith("cat_") for p in got["\n   "])  # all whitespace: its first character, '\n'


def test_slow_tokenizer_is_refused_with_what_to_pass(tiny_tokenizer):
    from transformers import ByT5Tokenizer

    slow = ByT5Tokenizer()  # a Python tokenizer: no offsets (transformers 5 just leaves them out)
    with pytest.raises(OffsetsError, match="tokenizer.json"):
        check_offsets(slow, "tiny-slow")
    with pytest.raises(OffsetsError):
        next(labelled_windows([Document("a.py", "x = 1\n")], slow, DataConfig(), WindowStats()))
    check_offsets(tiny_tokenizer)  # a fast one passes


def _f1(pred, y):
    tp = (pred & y).sum()
    return 2 * tp / (pred.sum() + y.sum()) if pred.sum() + y.sum() else 0.0


def test_threshold_counts_match_a_direct_float64_computation():
    g = torch.Generator().manual_seed(0)
    N, P, F = 300, 3, 5
    f_NF = torch.relu(torch.randn(N, F, generator=g, dtype=torch.float64))
    y_NP = torch.rand(N, P, generator=g) < 0.3
    valid_NP = torch.rand(N, P, generator=g) < 0.8
    max_F = f_NF.amax(0)
    counts = ThresholdCounts(P, max_F)
    for a in range(0, N, 70):  # streamed in uneven batches
        counts.update(f_NF[a : a + 70], y_NP[a : a + 70], valid_NP[a : a + 70])
    f, y, v, m = f_NF.numpy(), y_NP.numpy(), valid_NP.numpy(), max_F.numpy()
    f1_PFT = counts.f1_PFT()
    for p in range(P):
        for i in range(F):
            for j, t in enumerate(np.arange(10) / 10):
                pred = (f[:, i] > t * m[i])[v[:, p]]
                assert float(f1_PFT[p, i, j]) == pytest.approx(_f1(pred, y[v[:, p], p]), abs=1e-12)


def test_coverage_is_one_for_a_planted_latent_and_low_for_random_ones():
    g = torch.Generator().manual_seed(1)
    N, F = 4000, 64
    y_NP = torch.rand(N, 2, generator=g) < 0.1
    valid_NP = torch.ones(N, 2, dtype=torch.bool)
    f_NF = torch.relu(torch.randn(N, F, generator=g))  # random latents
    f_NF[:, 7] = y_NP[:, 0] * (0.5 + torch.rand(N, generator=g))  # latent 7 is property 0
    counts = ThresholdCounts(2, f_NF.amax(0))
    counts.update(f_NF, y_NP, valid_NP)
    cov = coverage(counts, ("planted", "random"))
    assert cov["per_property"]["planted"]["f1"] == pytest.approx(1.0)
    assert cov["per_property"]["planted"]["latent"] == 7
    assert cov["per_property"]["random"]["f1"] < 0.5
    assert cov["coverage"] == pytest.approx((1.0 + cov["per_property"]["random"]["f1"]) / 2)
    # reconstruction: two latents, each precise on half the property, OR to F1 = 1; random latents add nothing
    f2_NF = f_NF.clone()
    half = torch.arange(N) % 2 == 0
    f2_NF[:, 7] = (y_NP[:, 0] & half).float()
    f2_NF[:, 8] = (y_NP[:, 0] & ~half).float()
    select = ThresholdCounts(2, f2_NF.amax(0))
    select.update(f2_NF, y_NP, valid_NP)
    assert select.f1_PFT()[0, 7].max() < 0.7
    ors = OrCounts(select.precise_PFT(), f2_NF.amax(0))
    ors.update(f2_NF, y_NP, valid_NP)
    rec = reconstruction(ors, ("planted", "random"))
    assert rec["per_property"]["planted"] == pytest.approx(1.0)
    assert rec["per_property"]["random"] < 0.2


def test_accumulators_do_not_grow_with_tokens():
    g = torch.Generator().manual_seed(2)
    P, F = 4, 32
    sizes = []
    for n_batches in (1, 20):
        counts = ThresholdCounts(P, torch.ones(F))
        sample = ProbeSample(1000)
        for _ in range(n_batches):
            f_NF = torch.rand(256, F, generator=g)
            y_NP = torch.rand(256, P, generator=g) < 0.5
            counts.update(f_NF, y_NP, torch.ones_like(y_NP))
            sample.add(torch.randn(256, 8, generator=g), y_NP, torch.ones_like(y_NP))
        held = [counts.tp_PFT, counts.pp_PFT, counts.pos_P, counts.n_P, *sample.tensors()]
        sizes.append([t.numel() for t in held[:4]] + [min(sample.n, 1000)])
        assert sample.n <= 1000
    assert sizes[0][:4] == sizes[1][:4] and sizes[1][4] == 1000


def test_k_sparse_probing_finds_a_planted_direction():
    g = torch.Generator().manual_seed(3)
    N, D = 1000, 16
    x_ND = torch.randn(N, D, generator=g)
    y_NP = torch.stack([x_ND[:, 3] > 0.5, torch.rand(N, generator=g) < 0.5], dim=1)
    valid_NP = torch.ones_like(y_NP)
    W_DF = torch.cat([torch.eye(D), -torch.eye(D)], dim=1)  # latents: relu(x) and relu(-x)

    def encode(x):
        return torch.relu(x @ W_DF)

    out = k_sparse_probing(x_ND, encode, y_NP, valid_NP, ("planted", "random"), ks=(1, 2))
    assert out["top_latents"]["planted"][0] == 3
    assert out["sae"][1]["per_property"]["planted"] > 0.97
    assert out["residual"][1]["per_property"]["planted"] > 0.97
    assert out["dense"]["per_property"]["planted"] > 0.95
    assert out["sae"][1]["per_property"]["random"] < 0.6  # nothing to find
    assert out["tokens"] == N and out["train_tokens"] == int(0.8 * N)


def test_tpp_is_high_when_each_class_has_its_own_latent_and_zero_when_none_does():
    from saeforge.groundtruth.tpp import tpp

    g = torch.Generator().manual_seed(4)
    N, D = 1500, 8
    cls = torch.randint(0, 3, (N,), generator=g)
    x_ND = torch.randn(N, D, generator=g) * 0.7
    x_ND[torch.arange(N), cls] += 3  # class c pushes dimension c up
    y_NC = torch.nn.functional.one_hot(cls, 3).bool()
    rows, test_N = torch.ones(N, dtype=torch.bool), torch.arange(N) % 5 == 4
    eye = torch.eye(D)  # latent j = relu(x_j), decoder row j = e_j: ablating latent c removes class c's signal
    own = tpp(x_ND, lambda x: torch.relu(x @ eye), eye, y_NC, rows, test_N, n_ablate=1)
    # probe c then misses its class (a third of the rows): its accuracy drops by ~1/3, the others' barely
    assert own["self_drop"] == pytest.approx(1 / 3, abs=0.06) and own["other_drop"] < 0.06
    assert own["tpp"] > 0.25
    blind = eye.clone()
    blind[:3] = 0  # no latent reads or writes the class dimensions
    none = tpp(x_ND, lambda x: torch.relu(x @ blind.T), blind, y_NC, rows, test_N, n_ablate=1)
    assert abs(none["tpp"]) < 0.01 and none["self_drop"] == 0


def test_py_files_are_whole_documents(tmp_path):
    from saeforge.data import iter_documents

    long_src = inspect.getsource(importlib.import_module("heapq"))  # > 20k characters, blank lines inside
    assert len(long_src) > 20_000
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "heapq.py").write_text(long_src)
    (tmp_path / "notes.md").write_text("ignored")
    docs = list(iter_documents(DataConfig(corpus=str(tmp_path))))
    assert [(d.id, d.text) for d in docs] == [("pkg/heapq.py", long_src)]
    assert label_source(docs[0].text) is not None  # whole, so it parses


def test_labelled_windows_hold_the_same_tokens_as_the_eval_packer(tiny_tokenizer):
    from saeforge.data import pack_windows

    docs = [Document(f"m{i}.py", f"def f{i}(a, b):\n    return a * {i} + b  # sum\n" * (i + 1)) for i in range(6)]
    cfg = DataConfig(context_size=24)
    ours = [w.tokens_T for w in labelled_windows(docs, tiny_tokenizer, cfg, WindowStats())]
    theirs = list(pack_windows(docs, tiny_tokenizer, cfg))
    assert len(ours) == len(theirs) > 3 and all(torch.equal(a, b) for a, b in zip(ours, theirs))
