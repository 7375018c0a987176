"""A self-contained HTML view of a graph JSON (circuits/export.py): one file, no CDN, no requests.

The page's own script draws an SVG from the JSON embedded in it: x = token position, y = layer (embeddings at
the bottom, logits at the top), nodes coloured by kind, links as lines whose width and opacity follow |weight|
(blue positive, red negative). Clicking a node fills a side panel with its top incoming and outgoing links and,
for a feature node with a known feature page, a link to it. Every piece of text (token strings come from the
prompt, untrusted) is set with textContent, and the embedded JSON has ``<`` escaped, so nothing in the graph can
open a tag or end the script.

``feature_urls`` maps a layer (str) to a URL prefix; a feature of that layer links to ``prefix + index``. The
viewer passes ``/feature/{model}/{sae}/`` for layers whose transcoder it serves; a file written by ``saeforge
graph`` has none and shows "layer L feature I" as plain text.
"""

from __future__ import annotations

import json
from typing import Any

_SCRIPT = r"""
(function () {
  const G = JSON.parse(document.getElementById("graph-data").textContent);
  const URLS = JSON.parse(document.getElementById("feature-urls").textContent);
  const NS = "http://www.w3.org/2000/svg";
  const COLOURS = {"embedding": "#6a8", "cross layer transcoder": "#c84", "mlp reconstruction error": "#999",
                   "logit": "#58c"};
  const tokens = G.metadata.prompt_tokens || [];
  const nodes = G.nodes, links = G.links;
  const byId = new Map(nodes.map(n => [n.node_id, n]));
  const nLayers = nodes.filter(n => n.feature_type === "logit").map(n => +n.layer - 1).concat([0])
    .reduce((a, b) => Math.max(a, b), 0);
  const row = n => n.layer === "E" ? 0 : (n.feature_type === "logit" ? nLayers + 1 : +n.layer + 0.5);
  const W = Math.max(640, 110 * tokens.length), H = 90 * (nLayers + 2) + 60;
  const cells = new Map();
  for (const n of nodes) {  // spread the nodes sharing one (row, position) cell across it
    const key = row(n) + "/" + n.ctx_idx;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  const pos = new Map();
  const colW = W / Math.max(1, tokens.length);
  for (const list of cells.values()) {
    list.forEach((n, i) => {
      const x = colW * n.ctx_idx + colW * (i + 1) / (list.length + 1);
      const y = H - 40 - row(n) * 90 + (list.length > 6 ? (i % 3) * 12 - 12 : 0);
      pos.set(n.node_id, [x, y]);
    });
  }
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("id", "graph");
  const maxW = links.reduce((m, l) => Math.max(m, Math.abs(l.weight)), 1e-12);
  for (const l of links) {
    const a = pos.get(l.source), b = pos.get(l.target);
    if (!a || !b) continue;
    const line = document.createElementNS(NS, "line");
    const r = Math.abs(l.weight) / maxW;
    line.setAttribute("x1", a[0]); line.setAttribute("y1", a[1]);
    line.setAttribute("x2", b[0]); line.setAttribute("y2", b[1]);
    line.setAttribute("stroke", l.weight >= 0 ? "#36c" : "#c33");
    line.setAttribute("stroke-width", (0.3 + 4 * r).toFixed(2));
    line.setAttribute("stroke-opacity", (0.1 + 0.8 * r).toFixed(2));
    line.setAttribute("class", "link");
    svg.appendChild(line);
  }
  tokens.forEach((t, i) => {
    const text = document.createElementNS(NS, "text");
    text.setAttribute("x", colW * (i + 0.5)); text.setAttribute("y", H - 8);
    text.setAttribute("text-anchor", "middle"); text.setAttribute("class", "token");
    text.textContent = JSON.stringify(t);
    svg.appendChild(text);
  });
  for (const n of nodes) {
    const [x, y] = pos.get(n.node_id);
    const c = document.createElementNS(NS, "circle");
    c.setAttribute("cx", x); c.setAttribute("cy", y); c.setAttribute("r", 6);
    c.setAttribute("fill", COLOURS[n.feature_type] || "#000");
    c.setAttribute("class", "node"); c.dataset.id = n.node_id; c.dataset.kind = n.feature_type;
    const title = document.createElementNS(NS, "title");
    title.textContent = label(n);
    c.appendChild(title);
    c.addEventListener("click", () => show(n));
    svg.appendChild(c);
  }
  document.getElementById("canvas").appendChild(svg);
  const meta = document.getElementById("meta");
  const s = G.metadata.scores || {};
  meta.textContent = "prompt " + JSON.stringify(G.metadata.prompt || "") + " | " + nodes.length + " nodes, " +
    links.length + " links | replacement " + fmt(s.replacement) + ", completeness " + fmt(s.completeness);

  function fmt(v) { return typeof v === "number" ? v.toFixed(3) : "?"; }
  function label(n) {
    if (n.feature_type === "cross layer transcoder") return "layer " + n.layer + " feature " + n.feature + " @" + n.ctx_idx;
    if (n.feature_type === "mlp reconstruction error") return "error layer " + n.layer + " @" + n.ctx_idx;
    if (n.feature_type === "embedding") return "embedding " + JSON.stringify(tokens[n.ctx_idx]) + " @" + n.ctx_idx;
    return n.clerp || ("logit " + n.feature);
  }
  function el(tag, text) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; return e; }
  function edgeList(title, list, other, cls) {
    const box = el("div"); box.className = cls;
    box.appendChild(el("h3", title));
    const ol = el("ol");
    for (const l of list) {
      const li = el("li");
      li.dataset.id = l[other]; li.dataset.weight = l.weight;
      const o = byId.get(l[other]);
      li.textContent = (l.weight >= 0 ? "+" : "") + l.weight.toPrecision(4) + "  " + (o ? label(o) : l[other]);
      ol.appendChild(li);
    }
    box.appendChild(ol);
    return box;
  }
  function show(n) {
    const panel = document.getElementById("panel");
    panel.replaceChildren();
    panel.appendChild(el("h2", label(n)));
    panel.dataset.id = n.node_id;
    if (n.feature_type === "cross layer transcoder") {
      const prefix = URLS[n.layer];
      if (prefix) {
        const a = el("a", "feature page"); a.href = prefix + n.feature; a.className = "feature-link";
        panel.appendChild(a);
      } else {
        panel.appendChild(el("p", "layer " + n.layer + " feature " + n.feature + " (no feature page served)"));
      }
      panel.appendChild(el("p", "activation " + fmt(n.activation)));
    }
    const top = l => l.slice().sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 10);
    panel.appendChild(edgeList("top incoming", top(links.filter(l => l.target === n.node_id)), "source", "incoming"));
    panel.appendChild(edgeList("top outgoing", top(links.filter(l => l.source === n.node_id)), "target", "outgoing"));
  }
})();
"""

_STYLE = """
body { font-family: sans-serif; margin: 0; display: flex; }
#main { flex: 1; display: flex; flex-direction: column; }
#canvas { flex: 1; overflow: auto; padding: 8px; }
#panel { width: 340px; padding: 8px; border-left: 1px solid #ccc; font-size: 13px; }
#meta { padding: 8px; font-size: 13px; }
.node { cursor: pointer; stroke: #222; stroke-width: 0.5; }
.token { font-size: 11px; font-family: monospace; }
ol { padding-left: 20px; }
"""


def _embed(value: Any) -> str:
    """JSON safe inside a <script> element: no '<' can start '</script>' or '<!--'."""
    return json.dumps(value).replace("<", "\\u003c")


def graph_html(graph: dict[str, Any], feature_urls: dict[str, str] | None = None, nonce: str = "") -> str:
    """The whole page for one graph JSON dict; ``feature_urls``: layer (str) -> URL prefix of its feature pages.

    ``nonce``: set on the inline style and script, for a server whose Content-Security-Policy allows only those.
    """
    n = f" nonce='{nonce}'" if nonce else ""
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>attribution graph</title>"
        f"<style{n}>{_STYLE}</style></head><body>"
        "<div id='main'><div id='meta'></div><div id='canvas'></div></div>"
        "<div id='panel'><p>click a node</p></div>"
        f"<script type='application/json' id='graph-data'>{_embed(graph)}</script>"
        f"<script type='application/json' id='feature-urls'>{_embed(feature_urls or {})}</script>"
        f"<script{n}>{_SCRIPT}</script></body></html>\n"
    )
