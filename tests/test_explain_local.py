"""The in-process explainer (viewer/llm_local.py, viewer/local_scores.py) on a tiny random Llama: it says
nonsense, so these tests check the mechanics against hand computations from the model's own logits
(prefilled greedy generation, yes/no probabilities, expected digits), batching, the cache, and that every
feature gets an explanation and scores whatever the model says."""

import json
import sqlite3

import pytest
import torch
from explainkit import FEATURES, build_db

from saeforge import cli
from saeforge.models import load_model
from saeforge.viewer import explain as ex
from saeforge.viewer.db import FeatureDB
from saeforge.viewer.explain_run import ExplainConfig, open_rw, run_explain
from saeforge.viewer.llm import MalformedAnswer, explain_messages, parse_explanation
from saeforge.viewer.llm_local import LocalChat, LocalConfig, transcript
from saeforge.viewer.local_scores import (
    SIM_HEAD,
    auroc,
    detect_one_messages,
    local_feature,
    local_scores,
    simulate_one_messages,
)

TEMPLATE = "{% for m in messages %}<bos>[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
MSG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b): return"}]


@pytest.fixture(scope="module")
def lm(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]), device="cpu")


@pytest.fixture
def feature_db(tmp_path):
    return build_db(tmp_path / "features.db")


def _chat(db, lm, **kw):
    _, con = open_rw(db)
    return LocalChat(LocalConfig(**{"model": "tiny", **kw}), con, lm)


def _contexts(db, feature=1):
    return ex.split_contexts(FeatureDB(db).feature(feature))


def _forwards(lm):
    calls = []
    handle = lm.model.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_prompt_goes_through_the_chat_template_or_a_plain_transcript(feature_db, lm):
    c = _chat(feature_db, lm)
    tok = lm.tokenizer
    assert not tok.chat_template  # the tiny tokenizer has none: a base model's transcript
    assert transcript(MSG) == "system: Be brief.\n\nuser: def add(a, b): return\n\nassistant:"
    assert c.prompt_text(MSG) == transcript(MSG)
    tok.chat_template = TEMPLATE
    try:
        want = "<bos>[system] Be brief.\n<bos>[user] def add(a, b): return\n[assistant]"
        assert c.prompt_text(MSG) == want
        ids = c.ids(c.prompt_text(MSG))
        assert ids == tok(want, add_special_tokens=False)["input_ids"]
        assert ids.count(tok.bos_token_id) == 2  # the template's own BOS, not one more added
    finally:
        tok.chat_template = None


def test_prefilled_answer_is_greedy_stops_at_newline_and_always_parses(feature_db, lm):
    c = _chat(feature_db, lm, max_new_tokens=8)
    tok = lm.tokenizer
    explain_ctx, _ = _contexts(feature_db)
    msgs = explain_messages([x for x in explain_ctx if x.fires])
    text = c.complete(msgs, "EXPLANATION:")
    # oracle: argmax decoding by hand over full forward passes after the prefilled prefix; at the first step
    # no blank token (whitespace only or special); stop at a token holding a newline or a special token
    special = set(tok.all_special_ids)
    ids = torch.tensor([tok(transcript(msgs) + "EXPLANATION:", add_special_tokens=False)["input_ids"]])
    new = []
    with torch.no_grad():
        for step in range(8):
            logits = lm.model(ids).logits[0, -1].clone()
            if step == 0:
                for i in range(len(tok)):
                    if not tok.decode([i]).strip() or i in special:
                        logits[i] = -float("inf")
            nxt = int(logits.argmax())
            if "\n" in tok.decode([nxt]) or nxt in special:
                new.append(nxt)
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    want = tok.decode(new, skip_special_tokens=True).split("\n")[0].strip()
    assert text == want and text and "\n" not in text
    assert parse_explanation("EXPLANATION: " + text) == text  # the llm parser reads the prefilled line too
    assert c.sent == 1


def test_answer_ends_at_the_first_newline(feature_db, lm):
    tok = lm.tokenizer
    nl = tok.convert_tokens_to_ids("Ċ")  # the byte-level BPE's "\n"
    c = _chat(feature_db, lm, max_new_tokens=10)
    blank, stop = c.blank_and_stop_ids()
    assert nl in blank and nl in stop and tok.eos_token_id in stop and tok.bos_token_id in blank
    # make "\n" the model's favourite token everywhere: forbidden first, it ends the answer at the second step
    handle = lm.model.lm_head.register_forward_hook(
        lambda m, i, out: out.index_add(-1, torch.tensor([nl]), out[..., [nl]] * 0 + 1e4)
    )
    try:
        text = c.complete(MSG, "EXPLANATION:")
        ids = torch.tensor([tok(transcript(MSG) + "EXPLANATION:", add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = lm.model(ids).logits[0, -1]
    finally:
        handle.remove()
    logits[blank] = -float("inf")
    assert text == tok.decode([int(logits.argmax())]).strip() and text


def test_yes_no_probabilities_equal_a_hand_softmax(feature_db, lm):
    c = _chat(feature_db, lm)
    tok = lm.tokenizer
    _, held = _contexts(feature_db)
    msgs = detect_one_messages("string literals", "".join(held[0].tokens))
    [(p_yes, p_no)] = c.choice_probs([(msgs, "Answer:")], (" yes", " no"))
    # by hand: the tiny tokenizer writes " yes" as Ġ y e s and " no" as Ġ n o, so the choice is y vs n after Ġ
    prompt = transcript(msgs) + "Answer:"
    y = tok(prompt + " yes", add_special_tokens=False)["input_ids"]
    n = tok(prompt + " no", add_special_tokens=False)["input_ids"]
    k = len(tok(prompt + " ", add_special_tokens=False)["input_ids"])
    assert y[:k] == n[:k] and y[k] != n[k] and tok.convert_ids_to_tokens([y[k], n[k]]) == ["y", "n"]
    with torch.no_grad():
        p = torch.softmax(lm.model(torch.tensor([y[:k]])).logits[0, -1].double(), -1)
    assert p_yes == pytest.approx(p[y[k]].item(), abs=1e-5) and p_no == pytest.approx(p[n[k]].item(), abs=1e-5)
    assert 0 < p_yes < 1 and 0 < p_no < 1 and p_yes + p_no < 1


def test_expected_digits_equal_a_hand_computation(feature_db, lm):
    c = _chat(feature_db, lm)
    tok = lm.tokenizer
    _, held = _contexts(feature_db)
    lines = [json.dumps(t) for t in held[0].tokens[:6]]
    msgs = simulate_one_messages("string literals")
    [means] = c.digit_means([(msgs, SIM_HEAD, lines)])

    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    ids, at = enc(transcript(msgs) + SIM_HEAD), []
    for line in lines:
        ids += enc(line + "\t")
        at.append(len(ids) - 1)
        ids += enc("?\n")
    assert [tok.decode([ids[i]]) for i in at] == ["\t"] * 6
    digit = [enc(str(d))[0] for d in range(10)]
    with torch.no_grad():
        p = torch.softmax(lm.model(torch.tensor([ids])).logits[0].double(), -1)
    for j, i in enumerate(at):
        q = p[i, digit] / p[i, digit].sum()
        assert means[j] == pytest.approx(sum(d * q[d].item() for d in range(10)), abs=1e-5)
    assert len(set(round(m, 6) for m in means)) > 1  # not a constant: positions differ


def test_batches_give_the_one_by_one_results(tmp_path, lm):
    db_a, db_b = build_db(tmp_path / "a.db"), build_db(tmp_path / "b.db")  # separate caches
    _, held = _contexts(db_a)
    texts = ["".join(h.tokens[: 4 + 3 * i]) for i, h in enumerate(held[:5])]  # rows of different lengths
    prompts = [(detect_one_messages("numbers", t), "Answer:") for t in texts]
    sims = [
        (simulate_one_messages("numbers"), SIM_HEAD, [json.dumps(t) for t in h.tokens[: 3 + i]])
        for i, h in enumerate(held[:3])
    ]
    batched, single = _chat(db_a, lm, batch=8), _chat(db_b, lm, batch=1)
    a, b = batched.choice_probs(prompts, (" yes", " no")), single.choice_probs(prompts, (" yes", " no"))
    assert (batched.sent, single.sent) == (1, 5)
    assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    da, db_ = batched.digit_means(sims), single.digit_means(sims)
    for x, y in zip(da, db_):
        assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-5, rtol=0)


def test_auroc_by_hand():
    # pairs (pos, neg): 0.9>0.4, 0.9>0.1, 0.4=0.4 (1/2), 0.4>0.1 -> 3.5 / 4
    assert auroc([True, True, False, False], [0.9, 0.4, 0.4, 0.1]) == 0.875
    assert auroc([True, True], [0.1, 0.2]) is None


def test_every_feature_is_explained_and_a_rerun_runs_the_model_for_nothing(feature_db, lm):
    cfg = ExplainConfig(explainer="local", n_negatives=2)
    counts = run_explain(feature_db, cfg, progress=False, local=LocalConfig(model="tiny"), lm=lm)
    assert counts["explainer"] == "local:tiny"
    assert (counts["done"], counts["failed"]) == (len(FEATURES), 0)
    con = sqlite3.connect(feature_db)
    texts = [t for (t,) in con.execute("SELECT text FROM explanations WHERE explainer = 'local:tiny'")]
    assert len(texts) == len(FEATURES) and all(t and "\n" not in t for t in texts)
    scores = dict(((f, s), v) for f, s, v in con.execute("SELECT feature, scorer, value FROM scores"))
    for f in range(len(FEATURES)):
        assert -1 <= scores[f, "simulation"] <= 1 and 0 <= scores[f, "detection"] <= 1
        assert 0 <= scores[f, "fuzzing"] <= 1 and 0 <= scores[f, "fuzzing_auc"] <= 1
    # the same feature scored again by a new client over the same database: every answer comes from the cache
    calls, handle = _forwards(lm)
    try:
        again = _chat(feature_db, lm)
        explain_ctx, held = _contexts(feature_db, 2)
        text, got = local_feature(again, explain_ctx, held, cfg.seed + 2)
    finally:
        handle.remove()
    assert (len(calls), again.sent) == (0, 0)
    assert (text,) == con.execute("SELECT text FROM explanations WHERE feature = 2").fetchone()
    assert got["detection"] == pytest.approx(scores[2, "detection"])
    # the method is part of the key: a different question or cap on the same messages runs the model again
    calls, handle = _forwards(lm)
    try:
        c = _chat(feature_db, lm, max_new_tokens=5)
        c.complete(explain_messages([x for x in explain_ctx if x.fires]), "EXPLANATION:")
        assert len(calls) > 0 and c.sent == 1
        local_scores(again, text + " and more", held[:1], 0)
        assert again.sent > 0
    finally:
        handle.remove()


def test_long_prompts_fail_the_feature_and_nothing_is_cached(feature_db, lm):
    c = _chat(feature_db, lm, max_prompt_tokens=5)
    with pytest.raises(MalformedAnswer, match="max_prompt_tokens=5"):
        c.complete(MSG, "EXPLANATION:")
    with pytest.raises(MalformedAnswer, match="max_prompt_tokens=5"):
        c.choice_probs([(MSG, "Answer:")], (" yes", " no"))
    assert c.sent == 0
    assert c.con.execute("SELECT COUNT(*) FROM llm_cache").fetchone() == (0,)


def test_cli_explain_local_loads_the_named_model(feature_db, tiny_model_dirs, capsys):
    argv = ["explain", str(feature_db), "--explainer", "local", "--features", "1", "--quiet"]
    argv += [f"--local.model={tiny_model_dirs['llama']}", "--local.max_new_tokens=4", "--local.device=cpu"]
    argv += ["--explain.n_negatives=2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"local:{tiny_model_dirs['llama']}: 1 features explained" in out and "0 failed" in out
    assert cli.main(["explain", str(feature_db), "--explainer", "local", "--local.batch=0"]) == 2
