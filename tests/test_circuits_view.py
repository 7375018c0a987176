"""Circuits, the views and interventions: the graph's HTML page, the viewer's graph API, feature-node edits.

Random (untrained) transcoders on the tiny Llama, as tests/test_circuits.py: the algebra checked here does not
depend on training.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_circuits import PROMPT, random_transcoders
from test_report import CHROMIUM_ARGS

from saeforge.analysis.common import prompt_ids
from saeforge.circuits.graph import attribute
from saeforge.circuits.html import graph_html
from saeforge.circuits.intervene import InterventionError, intervene, parse_edit
from saeforge.circuits.replacement import ReplacementModel
from saeforge.circuits.transcoders import HOOK_IN, HOOK_OUT, MANIFEST
from saeforge.cli import main
from saeforge.saes.formats import save_sae

HOSTILE = '</script><img src=x onerror="window.__pwned=1">'


@pytest.fixture(scope="module")
def tsaes():
    return random_transcoders()


@pytest.fixture(scope="module")
def ids_T(lm):
    return prompt_ids(lm.tokenizer, PROMPT)[0]


@pytest.fixture(scope="module")
def graph(lm, tsaes, ids_T):
    return attribute(ReplacementModel(lm, tsaes), ids_T)


@pytest.fixture(scope="module")
def folder(tiny_model_dirs, text_corpus, tsaes, tmp_path_factory):
    """A transcoder folder (manifest + SAELens folders) holding the random transcoders, as `saeforge transcoders` writes."""
    root = tmp_path_factory.mktemp("plt")
    layers = {}
    for layer, sae in tsaes.items():
        meta = {"model_name": str(tiny_model_dirs["llama"]), "hook_name": HOOK_IN.format(layer=layer),
                "hook_name_out": HOOK_OUT.format(layer=layer), "context_size": 32,
                "dataset_path": str(text_corpus), "prepend_bos": True}  # fmt: skip
        save_sae(sae, root / f"l{layer}" / "sae", meta)
        layers[str(layer)] = f"l{layer}/sae"
    manifest = {"format_version": 1, "model_name": str(tiny_model_dirs["llama"]), "hook_in": HOOK_IN,
                "hook_out": HOOK_OUT, "layers": layers}  # fmt: skip
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def graph_file(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("graphs") / "g.json"
    assert main(["graph", "--transcoders", str(folder), "--prompt", PROMPT + " " + HOSTILE, "--out", str(out)]) == 0
    return out


def node(graph, layer, pos):
    """The first active feature node at (layer, pos) and its spec string."""
    n = int(((graph.layer_N == layer) & (graph.pos_N == pos)).nonzero()[0])
    return n, f"{layer}:{pos}:{int(graph.idx_N[n])}"


# ---- interventions -----------------------------------------------------------------------------------------
def test_edit_specs_parse_and_bad_ones_are_refused(capsys):
    assert parse_edit("1:3:17=zero").op == "zero"
    e = parse_edit("0:-1:5=clamp:2.5")
    assert (e.layer, e.pos, e.index, e.op, e.value, e.apply(7.0)) == (0, -1, 5, "clamp", 2.5, 2.5)
    assert parse_edit("2:0:1=scale:-0.5").apply(4.0) == -2.0
    for bad in ("1:3=zero", "1:3:17=clamp", "a:b:c=zero", "1:3:17=double:2", "1:3:17=scale:x"):
        with pytest.raises(InterventionError):
            parse_edit(bad)
    capsys.readouterr()
    assert main(["intervene", "--transcoders", "nowhere", "--prompt", "x", "--feature", "1:3=zero"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "expected LAYER:POS:INDEX=zero" in err


def test_zero_ablation_in_the_frozen_model_is_what_the_edges_predict(lm, tsaes, graph):
    """Zeroing feature s moves logit node k by exactly -A[k, s] with every other node held (the frozen model is affine)."""
    n, spec = node(graph, 0, 3)
    r = intervene(lm, tsaes, PROMPT, [parse_edit(spec + "=zero")])
    N, K = graph.n_features, graph.n_logits
    A = graph.adjacency_nn
    assert [row["token_id"] for row in r["logits"]] == graph.logit_tokens_K.tolist()
    assert r["edits"][0]["activation"] == pytest.approx(float(graph.act_N[n])) and r["edits"][0]["new_activation"] == 0
    for k, row in enumerate(r["logits"]):
        oracle = -float(A[graph.logit_index(k), n])  # the graph computed by attribute(), another code path
        assert row["predicted"] == pytest.approx(oracle, abs=1e-5)
        assert row["replacement_direct"] == pytest.approx(oracle, abs=1e-4)
    assert max(abs(row["predicted"]) for row in r["logits"]) > 1e-4  # a feature that matters
    # downstream features responding (gates frozen): the sum over all paths, from the graph's rows by hand:
    # d pre_d = sum_s A[d, s] / a_s * d a_s in node order (features are sorted by layer: a topological order)
    delta = torch.zeros(N, dtype=torch.float64)
    delta[n] = -float(graph.act_N[n])
    for d in range(N):
        if d != n:
            delta[d] = (A[d, :N].double() / graph.act_N.double() * delta).sum()
    for k, row in enumerate(r["logits"]):
        total = float((A[graph.logit_index(k), :N].double() / graph.act_N.double() * delta).sum())
        assert row["replacement_total"] == pytest.approx(total, abs=2e-4)
    assert any(abs(row["replacement_total"] - row["predicted"]) > 1e-5 for row in r["logits"])  # layer 0 feeds on
    assert K == len(r["logits"]) and all(isinstance(row["real"], float) for row in r["logits"])


def test_last_layer_clamp_scale_and_the_real_model(lm, tsaes, graph):
    n, spec = node(graph, 2, graph.n_pos - 1)
    a = float(graph.act_N[n])
    r = intervene(lm, tsaes, PROMPT, [parse_edit(spec + "=clamp:1.5")])
    for k, row in enumerate(r["logits"]):
        edge = float(graph.adjacency_nn[graph.logit_index(k), n])
        assert row["predicted"] == pytest.approx(edge * (1.5 - a) / a, abs=1e-5)
        # nothing downstream of the last layer: all paths are the direct one
        assert row["replacement_total"] == pytest.approx(row["replacement_direct"], abs=1e-5)
        assert row["replacement_direct"] == pytest.approx(row["predicted"], abs=1e-4)
        # at the last layer the real model differs only by the final norm's live denominator: close, not equal
        assert row["real"] == pytest.approx(row["predicted"], abs=0.05 * max(abs(row["predicted"]), 0.01))
    # scale by 1 changes nothing anywhere, in the real model bit for bit apart from the added zero
    r1 = intervene(lm, tsaes, PROMPT, [parse_edit(spec + "=scale:1")])
    assert all(abs(row[c]) < 1e-6 for row in r1["logits"] for c in ("predicted", "replacement_total", "real"))
    with pytest.raises(InterventionError, match="not active"):
        inactive = next(i for i in range(96) if i not in graph.idx_N[(graph.layer_N == 2) & (graph.pos_N == 1)])
        intervene(lm, tsaes, PROMPT, [parse_edit(f"2:1:{inactive}=zero")])


def test_intervene_command_prints_and_writes(folder, graph, tmp_path, capsys):
    _, spec = node(graph, 1, 2)
    out = tmp_path / "r.json"
    args = [
        "intervene",
        "--transcoders",
        str(folder),
        "--prompt",
        PROMPT,
        "--feature",
        spec + "=zero",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert "predicted" in capsys.readouterr().out and r["edits"][0]["new_activation"] == 0
    for row in r["logits"]:
        assert row["replacement_direct"] == pytest.approx(row["predicted"], abs=1e-4)
    assert main(args) == 2  # never overwritten


def test_intervene_through_a_cross_layer_transcoder(lm):
    from test_circuits_clt import random_clt

    clt = random_clt(scale=0.05)
    rm = ReplacementModel(lm, clt)
    g = attribute(rm, prompt_ids(lm.tokenizer, PROMPT)[0])
    n, spec = node(g, 0, 2)  # a layer-0 feature writes layers 0, 1 and 2
    r = intervene(lm, clt, PROMPT, [parse_edit(spec + "=scale:3")])
    for k, row in enumerate(r["logits"]):
        oracle = 2 * float(g.adjacency_nn[g.logit_index(k), n])
        assert row["predicted"] == pytest.approx(oracle, abs=1e-5)
        assert row["replacement_direct"] == pytest.approx(oracle, abs=1e-4)
    assert all(isinstance(row["real"], float) for row in r["logits"])
    r1 = intervene(lm, clt, PROMPT, [parse_edit(spec + "=scale:1")])
    assert all(abs(row["real"]) < 1e-6 for row in r1["logits"])
    with pytest.raises(InterventionError, match="named twice"):
        intervene(lm, clt, PROMPT, [parse_edit(spec + "=zero"), parse_edit(spec + "=scale:2")])


# ---- the HTML view -----------------------------------------------------------------------------------------
def test_graph_command_writes_a_self_contained_html_view(graph_file):
    html = graph_file.with_suffix(".html").read_text()
    d = json.loads(graph_file.read_text())
    assert HOSTILE in d["metadata"]["prompt"] and "<img" not in html  # the payload sits escaped in the JSON
    assert re.findall(r"</script", html, re.I).__len__() == 3  # the two data blocks and the script, no more
    assert not re.findall(r'(?:src|href)="', html) and set(re.findall(r"https?://[^\"' ]+", html)) <= {
        "http://www.w3.org/2000/svg"
    }
    assert graph_html(d, nonce="abc").count("nonce='abc'") == 2
    # graph-html redraws the same page from the JSON alone; refuses to overwrite, and a non-graph file
    again = graph_file.with_name("again.html")
    assert main(["graph-html", str(graph_file), "--out", str(again)]) == 0 and again.read_text() == html
    assert main(["graph-html", str(graph_file), "--out", str(again)]) == 2
    assert main(["graph-html", str(graph_file.with_suffix(".html"))]) == 2


@pytest.mark.browser
def test_graph_page_renders_and_a_click_shows_the_top_edges(graph_file):
    from playwright.sync_api import sync_playwright

    d = json.loads(graph_file.read_text())
    page_file = graph_file.with_name("linked.html")
    page_file.write_text(graph_html(d, {"1": "/feature/llama/l1/"}))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            for path, linked in ((graph_file.with_suffix(".html"), False), (page_file, True)):
                page = browser.new_page()
                errors, outside = [], []
                page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("request", lambda r: outside.append(r.url) if not r.url.startswith("file:") else None)
                page.goto(path.as_uri())
                page.wait_for_load_state("load")
                assert errors == [] and outside == []
                assert page.evaluate("window.__pwned") is None
                assert page.locator("circle.node").count() == len(d["nodes"])
                assert page.locator("line.link").count() == len(d["links"])
                feat = next(
                    n for n in d["nodes"]
                    if n["feature_type"] == "cross layer transcoder" and n["layer"] == "1"
                    and any(lk["source"] == n["node_id"] for lk in d["links"])
                )  # fmt: skip
                page.locator(f'circle.node[data-id="{feat["node_id"]}"]').dispatch_event("click")
                shown = page.locator("#panel .outgoing li").evaluate_all(
                    "els => els.map(e => [e.dataset.id, +e.dataset.weight])"
                )
                want = sorted((lk for lk in d["links"] if lk["source"] == feat["node_id"]),
                              key=lambda lk: -abs(lk["weight"]))[:10]  # fmt: skip
                assert shown == [[lk["target"], pytest.approx(lk["weight"])] for lk in want]
                incoming = page.locator("#panel .incoming li").count()
                assert incoming == min(10, sum(lk["target"] == feat["node_id"] for lk in d["links"]))
                link = page.locator("#panel a.feature-link")
                if linked:
                    assert link.get_attribute("href") == f"/feature/llama/l1/{feat['feature']}"
                else:
                    assert link.count() == 0 and "no feature page" in page.locator("#panel").inner_text()
                page.close()
        finally:
            browser.close()


# ---- the viewer --------------------------------------------------------------------------------------------
def test_viewer_lists_and_serves_graphs(graph_file, folder):
    from fastapi.testclient import TestClient

    from saeforge.viewer.graphs import feature_urls
    from saeforge.viewer.server import create_app

    with TestClient(create_app([], live=False, graphs=graph_file.parent)) as c:
        listing = c.get("/api/graphs").json()["graphs"]
        assert [(g["name"], g["nodes"]) for g in listing] == [("g", len(json.loads(graph_file.read_text())["nodes"]))]
        assert c.get("/api/graph/g").json() == json.loads(graph_file.read_text())
        page = c.get("/graph.html", params={"name": "g"})
        assert page.status_code == 200
        nonce = re.search(r"script-src 'nonce-([^']+)'", page.headers["content-security-policy"])[1]
        assert page.text.count(f"nonce='{nonce}'") == 2
        for bad in ("nope", "..%2Fg", "g.json"):
            assert c.get(f"/api/graph/{bad}").status_code == 404
    # feature links: a served database whose sae_dir is layer 1's transcoder folder links layer 1 only
    d = json.loads(graph_file.read_text())
    metas = [{"sae_dir": str(folder / "l1" / "sae"), "model_id": "llama", "sae_id": "l1"}, {"model_id": "x"}]
    assert feature_urls(d, metas) == {"1": "/feature/llama/l1/"}
    assert feature_urls({"metadata": {"transcoder_list": []}}, metas) == {}


def test_graph_page_links_features_to_a_served_database(graph_file, folder):
    """A feature database built from layer 1's transcoder: the served page links layer 1's features to it."""
    from fastapi.testclient import TestClient

    from saeforge.viewer.config import IndexConfig
    from saeforge.viewer.index import build_index
    from saeforge.viewer.server import create_app

    cfg = IndexConfig(tokens=1500, top_k=2, per_interval=1, lm_batch_size=8, n_logits=2, n_neighbours=2, name="l1")
    db = build_index(folder / "l1" / "sae", folder / "l1.db", cfg, {"data": {"holdout_fraction": 0.1}}, progress=False)
    with TestClient(create_app([db], live=False, graphs=graph_file.parent)) as c:
        model = c.get("/api/saes").json()["saes"][0]["model_id"]
        page = c.get("/graph.html", params={"name": "g"}).text
        urls = json.loads(re.search(r"id='feature-urls'>([^<]*)</script>", page)[1])
        assert urls == {"1": f"/feature/{model}/l1/"}
        d = json.loads(graph_file.read_text())
        feat = next(n for n in d["nodes"] if n["layer"] == "1" and n["feature_type"] == "cross layer transcoder")
        assert c.get(urls["1"] + str(feat["feature"])).status_code == 200  # the page the node links to exists


def test_serve_needs_something_to_serve(tmp_path, capsys):
    assert main(["serve"]) == 2
    assert "nothing to serve" in capsys.readouterr().err
    assert main(["serve", "--graphs", str(tmp_path / "absent")]) == 2
    assert "not a folder" in capsys.readouterr().err
