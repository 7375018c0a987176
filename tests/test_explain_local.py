"""The in-process explainer (viewer/llm_local.py) on a tiny random Llama: it answers nonsense, so these
tests check the plumbing (prompt through the chat template, greedy generation against a hand-written
argmax loop, parsers, cache, failures recorded) rather than the quality of what it says."""

import sqlite3

import pytest
import torch
from explainkit import FEATURES, build_db

from saeforge import cli
from saeforge.models import load_model
from saeforge.viewer.explain_run import ExplainConfig, open_rw, run_explain
from saeforge.viewer.llm import MalformedAnswer, explain_messages, parse_explanation
from saeforge.viewer.llm_local import LocalChat, LocalConfig, transcript

TEMPLATE = "{% for m in messages %}<bos>[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
MSG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b): return"}]


@pytest.fixture(scope="module")
def lm(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]), device="cpu")


@pytest.fixture
def feature_db(tmp_path):
    return build_db(tmp_path / "features.db")


def _chat(feature_db, lm, **kw):
    _, con = open_rw(feature_db)
    return LocalChat(LocalConfig(**{"model": "tiny", "max_new_tokens": 6, **kw}), con, lm)


def test_prompt_goes_through_the_chat_template_or_a_plain_transcript(feature_db, lm):
    c = _chat(feature_db, lm)
    tok = lm.tokenizer
    assert not tok.chat_template  # the tiny tokenizer has none: a base model's transcript
    assert transcript(MSG) == "system: Be brief.\n\nuser: def add(a, b): return\n\nassistant:"
    assert c.prompt_ids(MSG)[0].tolist() == tok(transcript(MSG), add_special_tokens=False)["input_ids"]
    tok.chat_template = TEMPLATE
    try:
        want = "<bos>[system] Be brief.\n<bos>[user] def add(a, b): return\n[assistant]"
        ids = c.prompt_ids(MSG)[0].tolist()
        assert ids == tok(want, add_special_tokens=False)["input_ids"]
        assert ids.count(tok.bos_token_id) == 2  # the template's own BOS, not one more added
    finally:
        tok.chat_template = None


def test_answer_is_greedy_generation_and_a_cache_hit_generates_nothing(feature_db, lm):
    c = _chat(feature_db, lm)
    answer = c.chat(MSG, lambda a: a)
    # oracle: argmax decoding by hand over full forward passes
    ids = c.prompt_ids(MSG)
    n_prompt = ids.shape[1]
    with torch.no_grad():
        for _ in range(6):
            nxt = lm.model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
            if nxt.item() == lm.tokenizer.eos_token_id:
                break
    assert answer == lm.tokenizer.decode(ids[0, n_prompt:], skip_special_tokens=True)
    assert c.sent == 1
    assert c.chat(MSG, lambda a: a) == answer and c.sent == 1  # from llm_cache
    again = _chat(feature_db, lm)  # a new run over the same database: still cached
    assert again.chat(MSG, lambda a: a) == answer and again.sent == 0
    longer = _chat(feature_db, lm, max_new_tokens=7)  # another cap is another answer
    longer.chat(MSG, lambda a: a)
    assert longer.sent == 1


def test_rejected_answers_are_not_cached_and_long_prompts_refused(feature_db, lm):
    c = _chat(feature_db, lm)

    def refuse(answer):
        raise MalformedAnswer("no")

    with pytest.raises(MalformedAnswer):
        c.chat(MSG, refuse)
    assert c.con.execute("SELECT COUNT(*) FROM llm_cache").fetchone() == (0,)
    short = _chat(feature_db, lm, max_prompt_tokens=5)
    with pytest.raises(MalformedAnswer, match="max_prompt_tokens=5"):
        short.chat(MSG, lambda a: a)
    assert short.sent == 0
    # the explain prompt itself goes through: answer text -> parse_explanation or MalformedAnswer
    try:
        text = c.chat(explain_messages([]), parse_explanation)
    except MalformedAnswer:
        text = None
    assert text is None or (0 < len(text) <= 500 and "\n" not in text)


def test_run_with_a_model_that_answers_nonsense_records_failures(feature_db, lm):
    cfg = ExplainConfig(explainer="local", n_negatives=2)
    counts = run_explain(feature_db, cfg, progress=False, local=LocalConfig(model="tiny", max_new_tokens=6), lm=lm)
    # 6 tokens of a random model never list a value for every token of a context: simulation fails
    assert counts["explainer"] == "local:tiny"
    assert (counts["done"], counts["failed"]) == (0, len(FEATURES)) and counts["requests"] >= len(FEATURES)
    con = sqlite3.connect(feature_db)
    assert con.execute("SELECT COUNT(*) FROM explanations").fetchone() == (0,)
    rerun = run_explain(feature_db, cfg, progress=False, local=LocalConfig(model="tiny", max_new_tokens=6), lm=lm)
    assert rerun["failed"] == len(FEATURES) and rerun["requests"] <= counts["requests"]


def test_cli_explain_local_loads_the_named_model(feature_db, tiny_model_dirs, capsys):
    argv = ["explain", str(feature_db), "--explainer", "local", "--features", "1", "--quiet"]
    argv += [f"--local.model={tiny_model_dirs['llama']}", "--local.max_new_tokens=4", "--local.device=cpu"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"local:{tiny_model_dirs['llama']}: 0 features explained" in out and "1 failed" in out
    assert cli.main(["explain", str(feature_db), "--explainer", "local", "--local.max_new_tokens=0"]) == 2
