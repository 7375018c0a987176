"""Sparse feature circuits (Marks et al. 2024) over SAEs at several hooks of one model.

Every SAE is spliced with its error node, so at a hook ``x = decode(f) + e`` holds exactly and the
spliced model *is* the clean model. The nodes of a hook are its latents f[t, i] and its error
nodes e[t] (a D-vector each) at every position t >= ``start`` (BOS is never a node: SAEs are
trained without it). Since x is affine in (f, e), d m / d f_i = W_dec[i] . d m / d x and
d m / d e = d m / d x: one gradient per hook, through the clean model, gives every node's gradient.

- **Node effect** (sign as in SPECS: IE = grad . (a_patch - a_clean)): AtP takes d m / d x at the
  clean run; IG averages it along x(a) = x_clean + a (x_base - x_clean), a = (k + 1/2) / steps, which
  moves every node of that hook together (one hook at a time, as Marks's code does). The IEs of a
  hook then sum to m(x_base at that hook) - m(clean) up to the midpoint rule's O(1/steps^2).
- **Baseline**: patch prompts of the same token length (their own latents and errors), else the
  mean over the clean prompts' tokens (positions >= start) of each latent and of the error vector.
- **Edge** u -> d between consecutive hooks: IE = g_d . (d d / d u) . (u_base - u_clean), g_d the
  node's gradient from the node pass (AtP: clean; IG: path mean); d d / d u is the total derivative
  through the model between the two hooks (intermediate hooks transparent), evaluated at the clean
  upstream x (AtP) or averaged along the upstream path (IG). One backward per kept downstream node.
- **Faithfulness** of a node set C = (m(C) - m(empty)) / (m(M) - m(empty)): every node outside C is
  mean-ablated (the same means as the baseline), hook by hook in forward order, so downstream SAEs
  encode what the ablations upstream produced. M keeps all nodes (the clean model, bit for bit);
  empty ablates them all. Completeness = faithfulness of the complement of C.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saeforge.analysis.metrics import Metric
from saeforge.analysis.prompts import as_prompts
from saeforge.config import UsageError
from saeforge.models.hooks import resolve_hook
from saeforge.models.layout import hf_model

ERROR = -1  # the latent index of an error node


@dataclass
class Site:
    """One SAE at one hook, or a transcoder reading ``hook_in`` and writing ``hook``; ``name`` (a folder) for reports."""

    sae: Any
    hook: str
    name: str = ""
    hook_in: str | None = None  # a transcoder's input hook; its nodes live at ``hook``, where it writes


@dataclass
class SiteData:
    """Clean and baseline values at one hook over the prompts [S, T, ...], and the node effects."""

    site: Site
    x_c: Tensor  # [S, T, D] clean activation at the hook
    df: Tensor  # [S, T, F] f_base - f_clean (0 before start)
    de: Tensor  # [S, T, D] e_base - e_clean (0 before start)
    mean_f: Tensor  # [F] reference means for ablation
    mean_e: Tensor  # [D]
    grad: Tensor | None = None  # [S, T, D] d m / d x (AtP: clean; IG: path mean)
    ie_TF: Tensor | None = None  # node effects, mean over prompts
    ie_err_T: Tensor | None = None


@dataclass(frozen=True)
class Node:
    hook: str
    pos: int
    latent: int  # ERROR for the error node

    def label(self) -> str:
        return f"{self.hook}@{self.pos}:{'err' if self.latent == ERROR else self.latent}"


@dataclass
class Circuit:
    sites: list[SiteData]
    method: str
    start: int
    metric_clean: float
    metric_base: float  # every hook's nodes at baseline at once (the patch prompt's metric for patching)
    nodes: dict[Node, float] = field(default_factory=dict)  # kept nodes -> IE
    edges: dict[tuple[Node, Node], float] = field(default_factory=dict)  # (up, down) -> IE

    def all_nodes(self) -> dict[Node, float]:
        """Every node of every hook (positions >= start) with its IE."""
        out = {}
        for sd in self.sites:
            T, F = sd.ie_TF.shape
            for t in range(self.start, T):
                out[Node(sd.site.hook, t, ERROR)] = float(sd.ie_err_T[t])
                for i in range(F):
                    out[Node(sd.site.hook, t, i)] = float(sd.ie_TF[t, i])
        return out


def kept_nodes(c: Circuit, threshold: float) -> dict[Node, float]:
    """Nodes with |IE| > threshold (the same as filtering ``all_nodes()``, without a Python loop over every latent)."""
    out = {}
    for sd in c.sites:
        ie_TF, ie_T = sd.ie_TF.clone(), sd.ie_err_T.clone()
        ie_TF[: c.start], ie_T[: c.start] = 0, 0
        for t, i in (ie_TF.abs() > threshold).nonzero().tolist():
            out[Node(sd.site.hook, t, i)] = float(ie_TF[t, i])
        for (t,) in (ie_T.abs() > threshold).nonzero().tolist():
            out[Node(sd.site.hook, t, ERROR)] = float(ie_T[t])
    return out


def _ids(lm: Any, prompts: Sequence[str | Tensor] | str) -> tuple[Tensor, int]:
    ps = as_prompts(lm, prompts)
    if len({p.length for p in ps}) != 1 or len({p.start for p in ps}) != 1:
        raise UsageError(f"prompts tokenise to lengths {[p.length for p in ps]}: a circuit needs one length for all")
    return torch.cat([p.ids_1T for p in ps]), ps[0].start


def _forward(lm: Any, ids_ST: Tensor, fns: dict[str, Any] | list[tuple[str, Any]]) -> Tensor:
    """Logits with replacement functions at hooks (fn(x) -> x' or None), run in the order given; removed after."""
    model = hf_model(lm)
    pairs = list(fns.items()) if isinstance(fns, dict) else fns
    handles = [resolve_hook(lm, h).register(fn) for h, fn in pairs]
    try:
        return model(input_ids=ids_ST, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def _record(lm: Any, sites: Sequence[Site], ids_ST: Tensor) -> tuple[list[Site], dict[str, Tensor]]:
    """(sites in forward order, clean x per hook); each hook must fire once and fit its SAE."""
    hooks = [s.hook for s in sites]
    if len(set(hooks)) != len(hooks):
        raise UsageError(f"hooks {hooks} repeat one: give one SAE per hook")
    order: list[str] = []
    xs: dict[str, Tensor] = {}

    def keep(h: str):
        def fn(x_STD: Tensor) -> None:
            order.append(h)
            xs[h] = x_STD.detach()

        return fn

    inputs = sorted({s.hook_in for s in sites if s.hook_in and s.hook_in not in hooks})
    with torch.no_grad():
        _forward(lm, ids_ST, {h: keep(h) for h in [*hooks, *inputs]})
    if sorted(order) != sorted(hooks + inputs):
        raise UsageError(f"hooks fired as {order} for {hooks + inputs}: each hook must run exactly once per forward")
    by_hook = {s.hook: s for s in sites}
    for s in sites:
        for h, width in ((s.hook_in or s.hook, s.sae.W_enc.shape[0]), (s.hook, s.sae.W_dec.shape[1])):
            if xs[h].shape[-1] != width:
                raise UsageError(
                    f"hook {h!r} has width {xs[h].shape[-1]} but {s.name or 'its SAE'} needs {width} there"
                )
    order = [h for h in order if h in by_hook]
    return [by_hook[h] for h in order], xs


def _encode(sae: Any, x_STD: Tensor, y_STD: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(latents, error node) at a site: f = encode(x), e = y - decode(f) (y = x for an SAE). A transcoder's
    skip term W_skip x is part of its error node here: the nodes are its latents and what they miss."""
    S, T, D = x_STD.shape
    f = sae.encode(x_STD.reshape(S * T, D).to(sae.W_dec.dtype)).reshape(S, T, -1)
    return f, (x_STD if y_STD is None else y_STD) - sae.decode(f)


def _site_latents(s: Site, xs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    return _encode(s.sae, xs[s.hook_in or s.hook], xs[s.hook])


def prepare(
    lm: Any, sites: Sequence[Site], clean: Sequence[str | Tensor] | str, patch: Sequence[str | Tensor] | str | None
) -> tuple[list[SiteData], Tensor, Tensor | None, int]:
    """(per-hook data in forward order, clean ids, patch ids or None, start)."""
    ids_c, start = _ids(lm, clean)
    ids_p = None
    if patch is not None:
        ids_p, start_p = _ids(lm, patch)
        if ids_p.shape != ids_c.shape or start_p != start:
            raise UsageError(
                f"patch prompts are {list(ids_p.shape)} tokens (rows x positions) but the clean ones are "
                f"{list(ids_c.shape)}: give one counterfactual per prompt, of the same token length"
            )
    sites, xc = _record(lm, sites, ids_c)
    xp = _record(lm, sites, ids_p)[1] if ids_p is not None else None
    out = []
    with torch.no_grad():
        for s in sites:
            f_c, e_c = _site_latents(s, xc)
            mean_f, mean_e = f_c[:, start:].mean((0, 1)), e_c[:, start:].mean((0, 1))
            if xp is not None:
                f_b, e_b = _site_latents(s, xp)
            else:
                f_b, e_b = mean_f.expand_as(f_c), mean_e.expand_as(e_c)
            df, de = f_b - f_c, e_b - e_c
            df[:, :start], de[:, :start] = 0, 0
            out.append(SiteData(s, xc[s.hook], df, de, mean_f, mean_e))
    return out, ids_c, ids_p, start


def _alphas(method: str, steps: int) -> Tensor:
    if method == "atp":
        return torch.zeros(1)
    if method == "ig":
        if steps < 1:
            raise UsageError(f"--steps {steps}: integrated gradients needs at least 1 step")
        return (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    raise UsageError(f"method {method!r}: expected 'atp' or 'ig'")


def _path(sd: SiteData, alphas: Tensor) -> Tensor:
    """x(a) = x_clean + a (x_base - x_clean) for every a, rows [A * S, T, D] (alpha-major), a leaf."""
    dx = sd.df @ sd.site.sae.W_dec + sd.de
    a = alphas.to(sd.x_c).view(-1, 1, 1, 1)
    return (sd.x_c + a * dx).reshape(-1, *sd.x_c.shape[1:]).requires_grad_(True)


def node_effects(lm: Any, data: list[SiteData], ids_ST: Tensor, metric: Metric, method: str, steps: int) -> None:
    """Fill ``grad``, ``ie_TF`` and ``ie_err_T`` of every hook's data (see the module docstring)."""
    alphas = _alphas(method, steps)
    S = ids_ST.shape[0]
    for sd in data:
        x_path = _path(sd, alphas)
        ids = ids_ST.repeat(len(alphas), 1)
        with torch.enable_grad():
            logits = _forward(lm, ids, {sd.site.hook: lambda x, xp=x_path: xp})
            (g,) = torch.autograd.grad(metric(logits, ids).sum(), x_path)
        sd.grad = g.view(len(alphas), S, *g.shape[1:]).mean(0)
        W_dec = sd.site.sae.W_dec
        sd.ie_TF = ((sd.grad @ W_dec.T) * sd.df).mean(0).detach()
        sd.ie_err_T = (sd.grad * sd.de).sum(-1).mean(0).detach()


def edge_effects(
    lm: Any,
    up: SiteData,
    down: SiteData,
    downs: Sequence[Node],
    ids_ST: Tensor,
    method: str,
    steps: int,
    ups: Sequence[Node] | None = None,
) -> dict[tuple[Node, Node], float]:
    """IE of every (u, d) pair, d in ``downs``, u in ``ups`` (default: every node of the upstream hook at
    positions where it moves). One backward pass per downstream node."""
    if ups is None:
        T = up.df.shape[1]
        moved_TF = (up.df != 0).any(0)
        ups = [Node(up.site.hook, t, i) for t, i in moved_TF.nonzero().tolist()]
        ups += [Node(up.site.hook, t, ERROR) for t in range(T) if bool((up.de[:, t] != 0).any())]
    feat = [(n.pos, n.latent) for n in ups if n.latent != ERROR]
    errs = torch.tensor([n.pos for n in ups if n.latent == ERROR], dtype=torch.long)
    feat_t = torch.tensor([p for p, _ in feat], dtype=torch.long)
    feat_i = torch.tensor([i for _, i in feat], dtype=torch.long)
    ups_f = [n for n in ups if n.latent != ERROR]
    ups_e = [n for n in ups if n.latent == ERROR]
    alphas = _alphas(method, steps)
    S, A = ids_ST.shape[0], len(alphas)
    x_path = _path(up, alphas)
    captured: dict[str, Tensor] = {}

    def grab(h: str):
        return lambda x: captured.__setitem__(h, x)

    out = {}
    W_u = up.site.sae.W_dec
    with torch.enable_grad():
        fns = [(up.site.hook, lambda x: x_path), (down.site.hook, grab(down.site.hook))]
        if down.site.hook_in:
            fns.append((down.site.hook_in, grab(down.site.hook_in)))
        _forward(lm, ids_ST.repeat(A, 1), fns)
        f_d, e_d = _site_latents(down.site, captured)
        g_STF = (down.grad @ down.site.sae.W_dec.T).repeat(A, 1, 1)
        g_STD = down.grad.repeat(A, 1, 1)
        for j, d in enumerate(downs):
            if d.latent == ERROR:
                scalar = (g_STD[:, d.pos] * e_d[:, d.pos]).sum()
            else:
                scalar = (g_STF[:, d.pos, d.latent] * f_d[:, d.pos, d.latent]).sum()
            (v,) = torch.autograd.grad(scalar, x_path, retain_graph=j + 1 < len(downs), allow_unused=True)
            if v is None:  # d does not depend on the upstream hook at all
                v = torch.zeros_like(x_path)
            v = v.view(A, S, *v.shape[1:]).sum(0) / A  # d scalar / d x_u, averaged over the path
            # only the requested upstream latents: [S, N, D] . W_dec rows, times their deltas
            ie_N = ((v[:, feat_t] * W_u[feat_i]).sum(-1) * up.df[:, feat_t, feat_i]).mean(0)
            ie_E = (v[:, errs] * up.de[:, errs]).sum(-1).mean(0)
            out.update({(u, d): float(x) for u, x in zip(ups_f, ie_N.tolist())})
            out.update({(u, d): float(x) for u, x in zip(ups_e, ie_E.tolist())})
    return out


def metric_ablated(
    lm: Any, data: list[SiteData], ids_ST: Tensor, metric: Metric, start: int, keep: set[Node] | None
) -> float:
    """Mean metric with every node outside ``keep`` mean-ablated (``keep=None`` keeps all: the clean model)."""
    fns, captures, seen = [], [], {}  # captures run after the edits at one hook: a transcoder reads the edited input
    for sd in data:
        if keep is None:
            continue
        hook, T, F = sd.site.hook, sd.x_c.shape[1], sd.df.shape[-1]
        kf = torch.zeros(T, F, dtype=torch.bool, device=sd.x_c.device)
        ke = torch.zeros(T, 1, dtype=torch.bool, device=sd.x_c.device)
        kf[:start], ke[:start] = True, True  # BOS is no node: never ablated
        for n in keep:
            if n.hook == hook:
                if n.latent == ERROR:
                    ke[n.pos] = True
                else:
                    kf[n.pos, n.latent] = True
        if bool(kf.all()) and bool(ke.all()):
            continue

        def fn(x, sd=sd, kf=kf, ke=ke):
            f, e = _encode(sd.site.sae, seen[sd.site.hook_in] if sd.site.hook_in else x, x)
            f2 = torch.where(kf, f, sd.mean_f)
            e2 = torch.where(ke, e, sd.mean_e)
            return x + (f2 - f) @ sd.site.sae.W_dec + (e2 - e)

        fns.append((hook, fn))
        if sd.site.hook_in:
            captures.append((sd.site.hook_in, lambda x, h=sd.site.hook_in: seen.__setitem__(h, x)))
    fns += captures
    with torch.no_grad():
        return float(metric(_forward(lm, ids_ST, fns), ids_ST).mean())


def faithfulness(lm: Any, c: Circuit, ids_ST: Tensor, metric: Metric, nodes: set[Node]) -> float:
    """(m(nodes) - m(empty)) / (m(M) - m(empty)); nan when m(M) = m(empty)."""
    m_full = metric_ablated(lm, c.sites, ids_ST, metric, c.start, None)
    m_empty = metric_ablated(lm, c.sites, ids_ST, metric, c.start, set())
    m_c = metric_ablated(lm, c.sites, ids_ST, metric, c.start, nodes)
    den = m_full - m_empty
    return (m_c - m_empty) / den if den != 0 else float("nan")


def feature_circuit(
    lm: Any,
    sites: Sequence[Site],
    clean: Sequence[str | Tensor] | str,
    metric: Metric,
    patch: Sequence[str | Tensor] | str | None = None,
    method: str = "atp",
    steps: int = 10,
    node_threshold: float = 0.1,
    edge_threshold: float = 0.01,
    edges: bool = True,
) -> tuple[Circuit, Tensor]:
    """Nodes with |IE| > node_threshold, edges between kept nodes of consecutive hooks with
    |IE| > edge_threshold (``edges=False`` skips them: one backward per kept node); returns (circuit, clean ids)."""
    if not sites:
        raise UsageError("no SAEs given: a circuit needs at least one (--sae DIR)")
    data, ids_c, ids_p, start = prepare(lm, sites, clean, patch)
    _alphas(method, steps)  # refuse a bad method before any pass
    node_effects(lm, data, ids_c, metric, method, steps)
    with torch.no_grad():
        m_clean = float(metric(_forward(lm, ids_c, {}), ids_c).mean())
        if ids_p is not None:
            m_base = float(metric(_forward(lm, ids_p, {}), ids_p).mean())
        else:
            m_base = metric_ablated(lm, data, ids_c, metric, start, set())
    c = Circuit(data, f"{method} ({steps} steps)" if method == "ig" else method, start, m_clean, m_base)
    c.nodes = kept_nodes(c, node_threshold)
    for up, down in zip(data, data[1:]) if edges else ():
        downs = [n for n in c.nodes if n.hook == down.site.hook]
        ups = [n for n in c.nodes if n.hook == up.site.hook]
        if not downs or not ups:
            continue
        for (u, d), ie in edge_effects(lm, up, down, downs, ids_c, method, steps, ups).items():
            if abs(ie) > edge_threshold:
                c.edges[(u, d)] = ie
    return c, ids_c
