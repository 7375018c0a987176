"""The LLM backend against a real loopback HTTP server speaking the chat-completions protocol with
scripted answers: retries, malformed answers, timeouts, the budget cap, the cache, a killed run resumed,
and the LLM path validated on a latent that is exactly "a Python string literal"."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from explainkit import FEATURES, ChatServer, build_db

from saeforge.viewer import explain as ex
from saeforge.viewer.db import FeatureDB
from saeforge.viewer.explain_run import ExplainConfig, open_rw, run_explain
from saeforge.viewer.llm import (
    LLMClient,
    LLMConfig,
    LLMError,
    MalformedAnswer,
    fuzz_items,
    parse_detection,
    parse_simulation,
    simulate_messages,
)

MSG = [{"role": "user", "content": "Reply with one line: EXPLANATION: <phrase>\n<<'x'>>"}]


@pytest.fixture
def feature_db(tmp_path):
    return build_db(tmp_path / "features.db")


@pytest.fixture
def server():
    s = ChatServer()
    yield s
    s.close()


def _cfg(server, **kw):
    return LLMConfig(url=server.url, backoff=0.01, **{"model": "m", **kw})


def _client(feature_db, server, **kw):
    _, con = open_rw(feature_db)
    return LLMClient(LLMConfig(url=server.url, model="scripted", backoff=0.01, **kw), con)


def test_retry_after_500_then_ok_and_the_key_is_sent(feature_db, server, monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", "sk-test")
    server.script = [500, 429]
    c = _client(feature_db, server, key_env="TEST_LLM_KEY")
    assert c.chat(MSG, lambda a: a) == "EXPLANATION: string literals"
    assert len(server.log) == 3 and c.sent == 3 and server.auth == "Bearer sk-test"
    server.script = [404]
    with pytest.raises(LLMError, match="HTTP 404"):  # a wrong URL or model: no retry
        c.chat([{"role": "user", "content": "another prompt"}], lambda a: a)
    assert len(server.log) == 4


def test_timeout_is_retried_and_gives_up_after_the_last_attempt(feature_db, server):
    server.script = [("sleep", 1.5)]
    c = _client(feature_db, server, timeout=0.3, retries=1)
    assert c.chat(MSG, lambda a: a) == "EXPLANATION: string literals"
    assert len(server.log) == 2
    server.script = [("sleep", 1.5), ("sleep", 1.5)]
    with pytest.raises(MalformedAnswer, match="after 2 attempts"):
        c.chat([{"role": "user", "content": "EXPLANATION: other"}], lambda a: a)


def test_parsers_accept_the_format_and_refuse_the_rest():
    assert parse_simulation(3)("0: 10\n1: 0\n2: 4.5\n") == [10.0, 0.0, 4.5]
    assert parse_simulation(2)("Sure!\n0 = 12\n1\t-3") == [10.0, 0.0]  # chatter ignored, values clamped
    with pytest.raises(MalformedAnswer, match="1 of 2"):
        parse_simulation(2)("0: 3")
    assert parse_detection(4)("2, 4") == [False, True, False, True]
    assert parse_detection(2)("NONE") == [False, False]
    for bad in ("5", "yes", "0"):
        with pytest.raises(MalformedAnswer):
            parse_detection(4)(bad)


def test_fuzzing_items_mark_firing_tokens_or_as_many_silent_ones():
    a = ex.Context(["x", " y", " z", " w"], [0, 2.0, 0, 1.0], 1, "top")  # 2 firing, 2 silent: both versions
    b = ex.Context(["p", " q"], [1.0, 3.0], 1, "quantile")  # no silent token to misplace marks on
    n = ex.Context(["n"], [0.0], 0, "negative")  # never fires: not an item
    items = fuzz_items([a, b, n], seed=0)
    assert sorted(items) == sorted([("x<< y>> z<< w>>", True), ("<<x>> y<< z>> w", False), ("<<p>><< q>>", True)])
    assert fuzz_items([a, b, n], seed=0) == items  # seeded


def test_malformed_answers_are_recorded_as_failed_not_a_crash(feature_db, server):
    server.default = "malformed"
    counts = run_explain(feature_db, ExplainConfig(explainer="llm"), _cfg(server), False)
    assert (counts["done"], counts["failed"]) == (0, len(FEATURES))
    con = sqlite3.connect(feature_db)
    assert con.execute("SELECT COUNT(*) FROM explanations").fetchone() == (0,)
    assert con.execute("SELECT COUNT(*) FROM llm_cache").fetchone() == (0,)  # rejected answers are not kept
    server.default = None  # a later run with a working model explains them all
    again = run_explain(feature_db, ExplainConfig(explainer="llm"), _cfg(server), False)
    assert (again["done"], again["failed"]) == (len(FEATURES), 0)


def test_budget_cap_stops_requests_and_the_cache_makes_a_rerun_free(feature_db, server):
    cfg = ExplainConfig(explainer="llm", n_negatives=2)
    capped = run_explain(feature_db, cfg, _cfg(server, max_requests=5, concurrency=2), False)
    assert len(server.log) == 5 and capped["requests"] == 5 and "max_requests=5" in capped["stopped"]
    assert capped["done"] == 0
    full = run_explain(feature_db, cfg, _cfg(server), False)
    assert full["done"] == len(FEATURES) and full["requests"] == len(server.log) - 5
    assert len(set(server.log)) == len(server.log)  # nothing answered in the capped run was asked again
    n = len(server.log)
    con = sqlite3.connect(feature_db)
    with con:
        con.execute("DELETE FROM explanations")
    rerun = run_explain(feature_db, cfg, _cfg(server), False)
    assert rerun["done"] == len(FEATURES) and rerun["requests"] == 0 and len(server.log) == n


def test_llm_path_scores_the_right_explanation_well_above_a_wrong_one(feature_db, server):
    run_explain(feature_db, ExplainConfig(explainer="llm"), _cfg(server), False)
    d = FeatureDB(feature_db)
    s = FEATURES.index("string literal")
    (e,) = d.explanations(s)
    assert (e["explainer"], e["text"]) == ("llm:m", "string literals")
    assert e["scores"] == pytest.approx({"simulation": 1.0, "detection": 1.0, "fuzzing": 1.0})
    # the wrong explanation, simulated through the same server and scored on the same held-out contexts
    f = d.feature(s)
    _, held = ex.split_contexts(f)
    held += ex.negatives(f, ex.negative_pool(sqlite3.connect(feature_db)), d.texts, 8, 0)
    c = _client(feature_db, server)
    preds = [c.chat(simulate_messages("numbers", x), parse_simulation(len(x.tokens))) for x in held]
    wrong = ex.simulation_score(preds, held)
    assert wrong < 0.1 and e["scores"]["simulation"] - wrong > 0.9


def test_killed_run_resumes_without_asking_answered_prompts_again(feature_db, server, tmp_path):
    server.default = ("sleep", 0.05)
    cmd = [sys.executable, "-m", "saeforge.cli", "explain", str(feature_db), "--explainer", "llm", "--quiet"]
    cmd += [f"--llm.url={server.url}", "--llm.model=m", "--llm.concurrency=1", "--explain.n_negatives=2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(server.log) < 12:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = list(server.log)
    cached = sqlite3.connect(feature_db).execute("SELECT COUNT(*) FROM llm_cache").fetchone()[0]
    assert cached >= len(first) - 2  # every answered prompt but the one in flight was kept
    server.default = None
    counts = run_explain(feature_db, ExplainConfig(explainer="llm", n_negatives=2), _cfg(server))
    assert counts["done"] == len(FEATURES)
    again = server.log[len(first) :]
    assert not set(again) & set(first[:-1])  # at most the prompt in flight at the kill is asked twice
    assert len(first) + len(again) <= len(set(server.log)) + 1
