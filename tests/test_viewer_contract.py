"""The viewer's API against its own OpenAPI description: schemathesis with every check, on a small database.

Bounded examples per operation keep it to seconds; the live endpoints run with live mode off (their declared
503), steering and activations included."""

import pytest
import schemathesis
from explainkit import build_db
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from saeforge.viewer.server import create_app

    return create_app([build_db(tmp_path_factory.mktemp("contract") / "f.db")], live=False)


LIVE = ("/api/activations", "/api/activation/", "/api/steer/")  # 503 with live mode off, as declared


def test_api_conforms_to_its_openapi_description_under_all_checks(app):
    from schemathesis.checks import CHECKS, load_all_checks, not_a_server_error
    from schemathesis.generation import GenerationMode

    load_all_checks()
    every = CHECKS.get_all()
    assert len(every) >= 14, [c.__name__ for c in every]
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = {}
    n_ops = 0
    for result in schema.get_all_operations():
        op = result.ok()
        n_ops += 1

        live = op.path.startswith(LIVE)
        checks = [c for c in every if not (live and c is not_a_server_error)]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def run(case):
                case.call_and_validate(checks=checks)

            try:
                run()
            except Unsatisfiable:  # no parameter or body to make invalid (GET /api/saes): nothing negative to send
                assert mode is GenerationMode.NEGATIVE, op.label
            except (Exception, BaseExceptionGroup) as e:  # collect every failure, then report them together
                failures[f"{op.label} {mode.value}"] = str(e)[:1500]
    assert n_ops >= 12, n_ops  # every API route is in the schema
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())


def test_405_names_the_allowed_methods_and_an_empty_search_is_an_empty_list(app):
    from starlette.testclient import TestClient

    c = TestClient(app)
    r = c.delete("/api/saes")
    assert r.status_code == 405 and r.headers["allow"] == "GET" and "error" in r.json()
    r = c.get("/api/search", params={"q": ""})
    assert r.status_code == 200 and r.json() == {"q": "", "results": []}


def test_cached_feature_json_shows_a_new_explanation_at_once(tmp_path):
    """The feature JSON is served from a cache; a commit by `saeforge explain` changes the file's generation."""
    import json

    from starlette.testclient import TestClient

    from saeforge.viewer import explain as ex
    from saeforge.viewer.explain_run import open_rw
    from saeforge.viewer.jsoncache import encode
    from saeforge.viewer.server import create_app

    path = build_db(tmp_path / "f.db")
    c = TestClient(create_app([path], live=False))
    first = c.get("/api/feature/toy/py/1")
    assert first.json()["explanations"] == [] and c.get("/api/feature/toy/py/1").content == first.content
    _, con = open_rw(path)
    ex.write_results(con, "baseline", [(1, 'tokens: "x"', {"simulation": 0.5})])
    con.close()
    got = c.get("/api/feature/toy/py/1").json()["explanations"]
    assert [(e["description"], e["score"]) for e in got] == [('tokens: "x"', 0.5)]
    assert json.loads(encode({"a": [1.5, "é"]})) == {"a": [1.5, "é"]}
