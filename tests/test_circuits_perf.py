"""The fast attribution path: one kept forward for every backward, last-position logits, gathered
pre-activations, and ``max_feature_nodes`` (rows for the most influential features only).

Oracles: a plain reference (a fresh forward with all logits per target, one target at a time), the
finite-difference and decomposition tests of test_circuits.py (which run the fast path too), and for the
feature selection the influence of the full graph's own rows.
"""

from __future__ import annotations

import pytest
import torch
from test_circuits import PROMPT, random_transcoders

from saeforge.analysis.common import prompt_ids
from saeforge.circuits.export import build_graph_json
from saeforge.circuits.graph import attribute, target_values
from saeforge.circuits.prune import influence, normalize, partial_influence
from saeforge.circuits.replacement import ReplacementModel
from saeforge.cli import main
from saeforge.config import UsageError


@pytest.fixture(scope="module")
def rm(lm):
    return ReplacementModel(lm, random_transcoders(skip=True))


@pytest.fixture(scope="module")
def ids_T(lm):
    return prompt_ids(lm.tokenizer, PROMPT)[0]


@pytest.fixture(scope="module")
def full(rm, ids_T):
    return attribute(rm, ids_T, batch_size=8)


def reference_rows(rm, ids_T, g, targets):
    """The plain way: per target, a fresh forward of one copy with logits at every position, one backward."""
    state = rm.prepare(ids_T)
    N, L, T = g.n_features, g.n_layers, g.n_pos
    A = torch.zeros_like(g.adjacency_nn)
    for t in targets:
        e, a, err = rm.clean_inputs(state, 1)
        logits_BTV, mlp_in = rm.forward_linear(state, e, a, err)
        v = target_values(rm, state, logits_BTV, mlp_in, [(0, t)], g.logit_tokens_K, N)
        g_e, g_a, g_err = torch.autograd.grad(v.sum(), [e, a, err], allow_unused=True, materialize_grads=True)
        row = torch.cat([(g_a * a)[0], (g_err * err).sum(-1).flatten(), (g_e * e).sum(-1)[0]])
        A[t if t < N else t + L * T + T, : N + L * T + T] = row.detach()
    return A


def test_kept_forward_graph_equals_a_fresh_forward_per_target(rm, ids_T, full):
    assert full.n_features > 40 and full.visited_N.all() and full.max_feature_nodes is None
    N, K = full.n_features, full.n_logits
    # every logit and every 4th feature (all layers and positions among them): a fresh forward each is slow
    targets = [*range(0, N, 4), N - 1, *range(N, N + K)]
    rows = [t if t < N else t + full.n_errors + full.n_pos for t in targets]
    want = reference_rows(rm, ids_T, full, targets)
    torch.testing.assert_close(full.adjacency_nn[rows], want[rows], atol=1e-5, rtol=1e-5)
    assert set(full.layer_N[targets[:-K]].tolist()) == set(range(full.n_layers))
    # the batch size only groups backward passes: a batch of 3 (with a short last batch) gives the same graph
    g3 = attribute(rm, ids_T, batch_size=3)
    torch.testing.assert_close(g3.adjacency_nn, full.adjacency_nn, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g3.value_n, full.value_n, atol=1e-6, rtol=1e-5)


def test_last_logits_and_gathered_pre_acts_equal_the_plain_ones(rm, ids_T):
    state = rm.prepare(ids_T)
    e, a, err = rm.clean_inputs(state, 2)
    with torch.no_grad():
        all_BTV, mlp_in = rm.forward_linear(state, e, a, err)
        last_B1V, _ = rm.forward_linear(state, e, a, err, last_logits_only=True)
        assert last_B1V.shape == (2, 1, all_BTV.shape[-1])
        torch.testing.assert_close(last_B1V[:, 0], all_BTV[:, -1], atol=1e-6, rtol=0)
        N = state.act_N.shape[0]
        rows = [(n % 2, n) for n in range(N - 1, -1, -3)]  # both copies, layers interleaved, any order
        got = rm.feature_pre_acts(state, mlp_in, rows)
        want = torch.stack(
            [rm.pre_acts(int(state.layer_N[n]), mlp_in[state.layer_N[n]][b])[state.pos_N[n], state.idx_N[n]]
             for b, n in rows]
        )  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_partial_influence_is_the_influence_of_the_known_rows():
    gen = torch.Generator().manual_seed(0)
    n = 9
    A = torch.randn(n, n, generator=gen).tril(-1)  # acyclic: sources come before targets
    A[-2:] = torch.randn(2, n, generator=gen).tril(n - 3)[:2]  # two "logits" last, fed by the rest
    w = torch.zeros(n)
    w[-2:] = torch.tensor([0.7, 0.3])
    rows = torch.tensor([2, 5, 7, 8])
    masked = torch.zeros_like(A)
    masked[rows] = A[rows]
    torch.testing.assert_close(partial_influence(A, rows, w), influence(normalize(masked), w))
    torch.testing.assert_close(partial_influence(A, torch.arange(n), w), influence(normalize(A), w))


def test_max_feature_nodes_covering_every_feature_is_the_full_graph(rm, ids_T, full):
    g = attribute(rm, ids_T, batch_size=8, max_feature_nodes=full.n_features)
    assert torch.equal(g.adjacency_nn, full.adjacency_nn) and g.visited_N.all()
    assert g.max_feature_nodes == full.n_features


def replay_selection(full, m, chunk):
    """The features attribute() should visit, replayed on the full graph's rows with the n x n influence."""
    N, n = full.n_features, full.adjacency_nn.shape[0]
    w = full.logit_weights()
    visited = torch.zeros(N, dtype=torch.bool)
    while int(visited.sum()) < m:
        known = torch.zeros(n, dtype=torch.bool)
        known[:N] = visited
        known[-full.n_logits :] = True
        inf_N = influence(normalize(full.adjacency_nn * known[:, None]), w)[:N]
        inf_N[visited] = -1.0
        visited[inf_N.sort(descending=True, stable=True).indices[: min(chunk, m - int(visited.sum()))]] = True
    return visited


@pytest.mark.parametrize(("m", "batch", "interval"), [(10, 4, 4), (11, 2, 2)], ids=["one-round", "three-rounds"])
def test_max_feature_nodes_computes_rows_for_the_most_influential(rm, ids_T, full, m, batch, interval):
    g = attribute(rm, ids_T, batch_size=batch, max_feature_nodes=m, update_interval=interval)
    N, K = g.n_features, g.n_logits
    A, F = g.adjacency_nn, full.adjacency_nn
    assert int(g.visited_N.sum()) == m and int(A[:N].any(1).sum()) == m  # exactly m non-empty feature rows
    assert torch.equal(A[:N].any(1), g.visited_N)
    # computed rows are the full graph's, every source included (unvisited features are exact sources)
    torch.testing.assert_close(A[:N][g.visited_N], F[:N][g.visited_N], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(A[-K:], F[-K:], atol=1e-6, rtol=1e-5)
    assert (A[:, :N][:, ~g.visited_N] != 0).any()
    assert (g.value_n[:N][~g.visited_N] == 0).all() and (g.bias_n[:N][~g.visited_N] == 0).all()
    assert torch.equal(g.visited_N, replay_selection(full, m, batch * interval))
    if m <= batch * interval:
        # one round: the logit rows alone rank them, i.e. by sum_k p_k |A[k, f]| / sum_s |A[k, s]|, by hand
        direct_N = (g.logit_probs_K[:, None] * F[-K:, :N].abs() / F[-K:].abs().sum(1, keepdim=True)).sum(0)
        assert torch.equal(g.visited_N.nonzero().flatten().sort().values, direct_N.topk(m).indices.sort().values)


def test_graph_json_records_the_cap_and_refuses_bad_values(lm, ids_T, tmp_path, capsys):
    d = build_graph_json(lm, random_transcoders(), PROMPT, batch_size=4, max_feature_nodes=5)
    meta = d["metadata"]
    assert meta["max_feature_nodes"] == 5 and meta["batch_size"] == 4 and meta["counts"]["visited_features"] == 5
    assert meta["counts"]["features"] > 5
    feats = [nd for nd in d["nodes"] if nd["feature_type"] == "cross layer transcoder"]
    assert all(nd["input_value"] is not None for nd in feats)  # pruning drops the unvisited (no incoming edge)
    d_all = build_graph_json(lm, random_transcoders(), PROMPT)
    assert d_all["metadata"]["max_feature_nodes"] is None
    assert d_all["metadata"]["counts"]["visited_features"] == d_all["metadata"]["counts"]["features"]
    rm = ReplacementModel(lm, random_transcoders())
    with pytest.raises(UsageError, match="max_feature_nodes -1"):
        attribute(rm, ids_T, max_feature_nodes=-1)
    with pytest.raises(UsageError, match="batch_size 0"):
        attribute(rm, ids_T, batch_size=0)
    args = ["graph", "--transcoders", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "g.json")]
    assert main([*args, "--max-feature-nodes", "-3"]) == 2
    assert "--max-feature-nodes -3: expected 0 or more" in capsys.readouterr().err
