"""Explanations without an LLM: scores against hand-computed values, the baseline explainer on latents that
are exact Python-syntax properties, the tables in the database (old files, FTS search), the API, the page
and the Neuronpedia export."""

import json
import math
import sqlite3

import loopback
import pytest
from explainkit import FEATURES, build_db

from saeforge.cli import main
from saeforge.viewer import explain as ex
from saeforge.viewer.db import FeatureDB
from saeforge.viewer.explain_run import ExplainConfig, open_rw, run_explain

HOSTILE = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'


@pytest.fixture
def feature_db(tmp_path):
    return build_db(tmp_path / "features.db")


def test_pearson_and_balanced_accuracy_match_hand_computed_values():
    # a = [1, 0, 0, 1], b = [2, 0, 1, 1]: means 0.5, 1; cov = 0.5*1 + -0.5*-1 + -0.5*0 + 0.5*0 = 1;
    # var_a = 4 * 0.25 = 1; var_b = 1 + 1 + 0 + 0 = 2  ->  r = 1 / sqrt(2)
    assert ex.pearson([1, 0, 0, 1], [2, 0, 1, 1]) == pytest.approx(1 / math.sqrt(2))
    assert ex.pearson([1, 1, 1], [0, 1, 2]) == 0.0  # a constant prediction carries nothing
    # truth: 3 firing, 2 not; predicted firing on 2 of the 3, and on 1 of the 2 -> (2/3 + 1/2) / 2
    assert ex.balanced_accuracy([1, 1, 1, 0, 0], [1, 1, 0, 1, 0]) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert ex.balanced_accuracy([1, 1], [1, 0]) == 0.5  # one class: its rate alone


def test_simulation_score_of_a_baseline_explanation_by_hand():
    ctx = ex.Context(["a", " def", " f", "(", " def", " g"], [0, 0, 3.0, 0, 0, 1.0], 2, "top")
    assert ex.simulate_baseline('after: " def"', ctx) == [0, 0, 1, 0, 0, 1]
    assert ex.simulate_baseline('tokens: " f"; after: " def"', ctx) == [0, 0, 1, 0, 0, 0]
    # pred [0,0,1,0,0,1] vs acts [0,0,3,0,0,1]: means 1/3 and 2/3; cov = 4 * (1/3)(2/3) + (2/3)(7/3) + (2/3)(1/3)
    # = 24/9; var_pred = 12/9; var_acts = 4 * 4/9 + 49/9 + 1/9 = 66/9  ->  r = 24 / sqrt(12 * 66) = 8 / sqrt(88)
    assert ex.simulation_score([ex.simulate_baseline('after: " def"', ctx)], [ctx]) == pytest.approx(8 / math.sqrt(88))
    with pytest.raises(ex.ExplanationFormatError, match="tokens:"):
        ex.parse_baseline("function names")


def test_baseline_clauses_whose_strings_hold_the_separators_read_back():
    """A ";" or "," inside a JSON string is part of the token (Python source is full of both)."""
    text = 'tokens: " otherwise", " Otherwise"; after: ";", ","'
    assert ex.parse_baseline(text) == {"tokens": {" otherwise", " Otherwise"}, "after": {";", ","}}
    assert ex.parse_baseline('tokens: "a;b"') == {"tokens": {"a;b"}}
    for bad in ("", 'tokens: "a" after: "b"', 'tokens: "a";; after: "b"', 'tokens: "a"; words'):
        with pytest.raises(ex.ExplanationFormatError):
            ex.parse_baseline(bad)


def test_baseline_finds_the_syntax_property_and_scores_it_above_a_wrong_one(feature_db):
    counts = run_explain(feature_db, ExplainConfig(), progress=False)
    assert counts["done"] == len(FEATURES) and counts["failed"] == 0
    d = FeatureDB(feature_db)
    texts = {FEATURES[i]: d.explanations(i)[0]["text"] for i in range(len(FEATURES))}
    assert texts["def name"] == 'after: "def"'  # the name right after the keyword, whatever the name is
    assert texts["string literal"] == 'after: "("'  # print("...") is the only string in the corpus
    # right vs wrong explanation of the def-name latent, on its held-out contexts and negatives
    f = d.feature(0)
    _, held = ex.split_contexts(f)
    held += ex.negatives(f, ex.negative_pool(sqlite3.connect(feature_db)), d.texts, 8, 0)
    right = ex.baseline_scores(texts["def name"], held)
    wrong = ex.baseline_scores(texts["number"], held)
    assert right == {"simulation": 1.0, "detection": 1.0}
    assert wrong["simulation"] < 0.05 and right["simulation"] - wrong["simulation"] > 0.95
    assert d.explanations(0)[0]["scores"] == right  # what the run stored is what we recompute


def test_old_database_opens_and_a_second_run_skips_explained_features(feature_db):
    con = sqlite3.connect(feature_db)
    assert "explanations" not in {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
    con.close()
    d = FeatureDB(feature_db)
    assert d.explanations(0) == [] and d.search_explanations("def") == {}
    first = run_explain(feature_db, ExplainConfig(features="2"), progress=False)
    assert (first["done"], first["skipped"]) == (2, 0)
    d = FeatureDB(feature_db)
    first_ids = [i for i in range(len(FEATURES)) if d.explanations(i)]
    assert len(first_ids) == 2
    con = sqlite3.connect(feature_db)
    with con:  # mark the stored rows, to see whether the second run rewrites them
        con.execute("UPDATE explanations SET created = 'first run'")
    second = run_explain(feature_db, ExplainConfig(), progress=False)
    assert (second["done"], second["skipped"]) == (2, 2)  # the two explained before are kept
    assert [FeatureDB(feature_db).explanations(i)[0]["created"] == "first run" for i in range(4)] == [
        i in first_ids for i in range(4)
    ]


def test_fts_search_finds_a_feature_by_a_word_of_its_explanation(feature_db):
    d, con = open_rw(feature_db)
    ex.write_results(con, "llm:toy", [(2, "integer literals in arithmetic", {"simulation": 0.5})])
    ex.write_results(con, "llm:toy", [(1, "string literals passed to print", {"simulation": 0.7})])
    assert d.search_explanations("arithmetic") == {2: ["integer literals in arithmetic"]}
    assert set(d.search_explanations("literals")) == {1, 2}
    assert d.search_explanations('print "') == {1: ["string literals passed to print"]}  # quotes are not syntax
    res = d.search("arithmetic")
    assert [(r["index"], r["matching_contexts"], r["matching_explanations"]) for r in res] == [
        (2, 0, ["integer literals in arithmetic"])
    ]
    run_explain(feature_db, ExplainConfig(), progress=False)  # baseline rows beside the llm ones
    listed = {r["index"]: r["explanation"] for r in d.list_features(sort="index", desc=False)}
    assert listed == {
        0: 'after: "def"',
        1: "string literals passed to print",
        2: "integer literals in arithmetic",
        3: listed[3],
    }
    assert listed[3].startswith('tokens: "    return"')
    # rewriting an explanation replaces its FTS row
    ex.write_results(con, "llm:toy", [(2, "numbers", {"simulation": 0.5})])
    assert d.search_explanations("arithmetic") == {} and d.search_explanations("numbers") == {2: ["numbers"]}


def test_api_page_and_export_carry_explanations_with_hostile_text_inert(feature_db, tmp_path):
    from fastapi.testclient import TestClient

    from saeforge.viewer.export import export_neuronpedia
    from saeforge.viewer.server import create_app

    _, con = open_rw(feature_db)
    ex.write_results(con, "llm:gpt-x", [(1, HOSTILE, {"simulation": 0.25, "detection": 0.75})])
    con.close()
    http = TestClient(create_app([feature_db], live=False))
    f = http.get("/api/feature/toy/py/1").json()
    assert f["explanations"] == [
        {
            "description": HOSTILE,
            "typeName": "saeforge-llm",
            "explanationModelName": "gpt-x",
            "score": 0.25,
            "scores": {"simulation": 0.25, "detection": 0.75},
            "created": f["explanations"][0]["created"],
        }
    ]
    page = http.get("/feature/toy/py/1").text
    assert "<script>window" not in page and 'id="explanations"' in page  # data reaches the page only as JSON
    js = http.get("/static/app.js").text
    block = js[js.index('$("explanations")') : js.index("explnote")]
    assert (
        "el(" in block and ".innerHTML" not in js and "insertAdjacentHTML" not in js
    )  # explanation text goes in through textContent
    hits = http.get("/api/search", params={"q": "pwned"}).json()["results"]
    assert [(r["index"], r["matching_explanations"]) for r in hits] == [(1, [HOSTILE])]
    export_neuronpedia(feature_db, tmp_path / "np", batch_size=8, progress=False)
    rec = json.loads((tmp_path / "np" / "batch-0.json").read_text())["features"]
    assert rec[1]["explanations"] == [
        {
            "description": HOSTILE,
            "explanation_model_name": "llm:gpt-x",
            "scores": {"simulation": 0.25, "detection": 0.75},
        }
    ]
    assert rec[0]["explanations"] == []


def test_cli_explain_baseline_and_its_errors(feature_db, capsys):
    assert main(["explain", str(feature_db), "--features", "1", "--quiet"]) == 0
    assert "baseline: 1 features explained" in capsys.readouterr().out
    assert main(["explain", str(feature_db), "--explain.features", "zero"]) == 2
    assert "expected all or a positive count" in capsys.readouterr().err
    assert main(["explain", str(feature_db), "--explainer", "llm", "--quiet"]) == 2
    assert "--llm.url" in capsys.readouterr().err
    assert main(["explain", str(feature_db.with_name("missing.db"))]) == 2


@pytest.mark.browser
def test_browser_feature_page_shows_a_hostile_explanation_as_text(feature_db, tmp_path):

    from playwright.sync_api import sync_playwright

    from saeforge.viewer.server import create_app

    _, con = open_rw(feature_db)
    ex.write_results(con, "llm:gpt-x", [(1, HOSTILE, {"simulation": 0.25, "detection": 0.75})])
    con.close()
    app = create_app([feature_db], live=False)
    with loopback.serve(app) as url:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"])
            pg = browser.new_page()
            errors = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.goto(f"{url}/feature/toy/py/1")
            pg.wait_for_selector("#explanations tr.expl")
            cells = pg.locator("#explanations tr.expl td").all_text_contents()
            assert cells == [HOSTILE, "gpt-x", "0.250", "0.750", ""]  # no fuzzing score: an empty cell
            assert pg.evaluate("window.__pwned") is None and pg.locator("#explanations img").count() == 0
            pg.goto(f"{url}/feature/toy/py/0")
            pg.wait_for_selector("#explnote:not(:empty)")
            assert "saeforge explain" in pg.locator("#explnote").text_content()
            assert not errors, errors
            browser.close()


@pytest.mark.slow
def test_baseline_on_a_database_built_by_saeforge_index(tiny_model_dirs, text_corpus, tmp_path):
    """The real index's contexts (trimmed at window edges, maxima at position 0) go through explain."""
    import torch

    from saeforge.saes.formats import save_sae
    from saeforge.saes.registry import config_class, sae_class
    from saeforge.viewer.config import IndexConfig
    from saeforge.viewer.index import build_index

    sae = sae_class("topk")(config_class("topk")(d_in=64, d_sae=64, k=4))
    torch.nn.init.normal_(sae.b_enc, std=0.05, generator=torch.Generator().manual_seed(0))
    meta = {"model_name": str(tiny_model_dirs["llama"]), "hook_name": "blocks.1.hook_resid_post"}
    save_sae(sae, tmp_path / "sae", meta | {"context_size": 32, "dataset_path": str(text_corpus), "prepend_bos": True})
    cfg = IndexConfig(tokens=2000, top_k=6, per_interval=2, lm_batch_size=8, n_logits=3, n_neighbours=2)
    path = build_index(tmp_path / "sae", tmp_path / "f.db", cfg, {"data": {"holdout_fraction": 0.1}}, progress=False)
    counts = run_explain(path, ExplainConfig(n_negatives=4), progress=False)
    d = FeatureDB(path)
    alive = [i for (i,) in d.query("SELECT idx FROM features WHERE fire_count > 0")]
    assert counts["done"] == len(alive) > 0 and counts["failed"] == 0
    for i in alive:
        (e,) = d.explanations(i)
        ex.parse_baseline(e["text"])  # every stored text reads back
        assert -1 <= e["scores"]["simulation"] <= 1 and 0 <= e["scores"]["detection"] <= 1
