// The dictionary map page: points from /api/map drawn on a canvas (no library, no outside requests),
// the cluster tree from /api/tree, PCA of typed features from /api/pca. Uses app.js's helpers.
// Explanations are untrusted text: they reach the page only through textContent.
"use strict";

const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
  "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"];

function ramp(t) {  // 0..1 -> light yellow to dark red
  const u = Math.max(0, Math.min(1, t));
  return `rgb(${Math.round(255 - 80 * u)}, ${Math.round(220 - 200 * u)}, ${Math.round(120 - 100 * u)})`;
}

function colours(m, by) {
  const n = m.index.length;
  if (by === "cluster") return m.cluster.map((c) => PALETTE[c % PALETTE.length]);
  if (by === "first") return m.first_flag.map((f) => (f === null ? "#bbb" : f ? "#d62728" : "#1f77b4"));
  const raw = by === "density" ? m.density.map((d) => (d > 0 ? Math.log10(d) : null)) : m.score;
  const known = raw.filter((v) => v !== null && v !== undefined);
  const lo = Math.min(...known), hi = Math.max(...known);
  const out = new Array(n);
  for (let i = 0; i < n; i++) {
    const v = raw[i];
    out[i] = v === null || v === undefined ? "#ccc" : ramp(hi > lo ? (v - lo) / (hi - lo) : 0.5);
  }
  return out;
}

async function mapPage() {
  const canvas = $("map"), ctx = canvas.getContext("2d"), tip = $("tip");
  const { saes } = await api("/api/saes");
  for (const s of saes) {
    const o = el("option", `${s.model_id} / ${s.sae_id} (${s.d_sae} features)`);
    o.value = `${s.model_id}/${s.sae_id}`;
    $("sae").appendChild(o);
  }
  const state = { m: null, fill: [], scale: 1, tx: 0, ty: 0, model: "", sae: "" };
  // Data -> screen: fit the points into the canvas, then the user's zoom (scale) and pan (tx, ty).
  let fit = { cx: 0, cy: 0, k: 1 };
  const screen = (i) => {
    const m = state.m;
    const x = (m.x[i] - fit.cx) * fit.k, y = -(m.y[i] - fit.cy) * fit.k;
    return [canvas.width / 2 + (x * state.scale) + state.tx, canvas.height / 2 + (y * state.scale) + state.ty];
  };
  function draw() {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const m = state.m;
    if (!m) return;
    for (let i = 0; i < m.index.length; i++) {
      const [sx, sy] = screen(i);
      ctx.fillStyle = state.fill[i];
      ctx.beginPath();
      ctx.arc(sx, sy, 3.5, 0, 2 * Math.PI);
      ctx.fill();
    }
    canvas.dataset.points = String(m.index.length);
  }
  function nearest(ev) {
    const r = canvas.getBoundingClientRect();
    const px = ev.clientX - r.left, py = ev.clientY - r.top;
    let best = -1, bd = 64;  // within 8 px
    const m = state.m;
    if (!m) return -1;
    for (let i = 0; i < m.index.length; i++) {
      const [sx, sy] = screen(i);
      const d = (sx - px) ** 2 + (sy - py) ** 2;
      if (d < bd) { bd = d; best = i; }
    }
    return best;
  }
  // for tests and scripts: where feature j is drawn, in page coordinates
  window.saeMap = {
    pointAt: (j) => {
      const i = state.m.index.indexOf(j), [sx, sy] = screen(i), r = canvas.getBoundingClientRect();
      return [r.left + sx, r.top + sy];
    },
  };
  async function load() {
    [state.model, state.sae] = $("sae").value.split("/");
    $("status").textContent = "loading…";
    try {
      state.m = await api(`/api/map/${encodeURIComponent(state.model)}/${encodeURIComponent(state.sae)}`);
    } catch (e) { state.m = null; draw(); $("status").textContent = `error: ${e.message}`; return; }
    const m = state.m;
    const xs = m.x, ys = m.y;
    const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
    fit = { cx: (x0 + x1) / 2, cy: (y0 + y1) / 2,
      k: 0.9 * Math.min(canvas.width / Math.max(x1 - x0, 1e-9), canvas.height / Math.max(y1 - y0, 1e-9)) };
    state.scale = 1; state.tx = 0; state.ty = 0;
    state.fill = colours(m, $("colour").value);
    $("status").textContent = `${m.index.length} features · layout ${m.method} · ${m.n_clusters} clusters`;
    draw();
    loadTree();
  }
  canvas.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const r = canvas.getBoundingClientRect();
    const px = ev.clientX - r.left - canvas.width / 2, py = ev.clientY - r.top - canvas.height / 2;
    const f = ev.deltaY < 0 ? 1.2 : 1 / 1.2;  // zoom about the cursor
    state.tx = px - (px - state.tx) * f; state.ty = py - (py - state.ty) * f; state.scale *= f;
    draw();
  }, { passive: false });
  let drag = null;
  canvas.addEventListener("mousedown", (ev) => { drag = { x: ev.clientX, y: ev.clientY, moved: false }; });
  window.addEventListener("mouseup", () => { setTimeout(() => { drag = null; }, 0); });
  canvas.addEventListener("mousemove", (ev) => {
    if (drag && ev.buttons) {
      const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 2) drag.moved = true;
      state.tx += dx; state.ty += dy; drag.x = ev.clientX; drag.y = ev.clientY;
      draw();
      return;
    }
    const i = nearest(ev);
    if (i < 0) { tip.hidden = true; return; }
    const m = state.m, r = canvas.getBoundingClientRect();
    tip.textContent = `#${m.index[i]} · cluster ${m.cluster[i]} · density ${fmt(m.density[i])}` +
      (m.first_flag[i] ? " · first-position artefact" : "") + (m.explanation[i] ? ` · ${m.explanation[i]}` : "");
    tip.style.left = `${ev.clientX - r.left + 12}px`;
    tip.style.top = `${ev.clientY - r.top + 12}px`;
    tip.hidden = false;
  });
  canvas.addEventListener("mouseleave", () => { tip.hidden = true; });
  canvas.addEventListener("click", (ev) => {
    if (drag && drag.moved) return;
    const i = nearest(ev);
    if (i >= 0) location.href = featureUrl(state.model, state.sae, state.m.index[i]);
  });
  $("colour").addEventListener("change", () => { if (state.m) { state.fill = colours(state.m, $("colour").value); draw(); } });
  $("sae").addEventListener("change", load);

  async function treeItem(node) {
    const li = el("li");
    if (node.leaf) {
      li.appendChild(link(featureUrl(state.model, state.sae, node.node), `#${node.node}`));
      return li;
    }
    const b = el("button", "+");
    b.type = "button";
    li.appendChild(b);
    li.appendChild(el("span", `${node.size} features · distance ${fmt(node.distance)} · e.g. ` +
      node.features.slice(0, 6).map((f) => `#${f}`).join(" ")));
    const ul = el("ul", null, "tree");
    li.appendChild(ul);
    b.addEventListener("click", async () => {
      if (ul.childElementCount) { ul.textContent = ""; b.textContent = "+"; return; }
      b.textContent = "−";
      try {
        const t = await api(`/api/tree/${encodeURIComponent(state.model)}/${encodeURIComponent(state.sae)}?node=${node.node}`);
        for (const c of t.children) ul.appendChild(await treeItem(c));
      } catch (e) { fail(ul, e); }
    });
    return li;
  }
  async function loadTree() {
    const ul = $("tree");
    ul.textContent = "";
    try {
      const t = await api(`/api/tree/${encodeURIComponent(state.model)}/${encodeURIComponent(state.sae)}`);
      ul.appendChild(await treeItem(t));
    } catch (e) { fail(ul, e); }
  }

  $("pcaform").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const feats = ($("pcafeat").value.match(/\d+/g) || []).map(Number);
    const pc = $("pca"), g = pc.getContext("2d");
    g.clearRect(0, 0, pc.width, pc.height);
    try {
      const r = await api(`/api/pca/${encodeURIComponent(state.model)}/${encodeURIComponent(state.sae)}`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ features: feats }),
      });
      const sx = Math.max(...r.x.map(Math.abs), 1e-9), sy = Math.max(...r.y.map(Math.abs), 1e-9);
      g.font = "11px sans-serif";
      r.features.forEach((f, i) => {
        const x = pc.width / 2 + (0.42 * pc.width * r.x[i]) / sx, y = pc.height / 2 - (0.42 * pc.height * r.y[i]) / sy;
        g.fillStyle = "#1f77b4";
        g.beginPath(); g.arc(x, y, 3.5, 0, 2 * Math.PI); g.fill();
        g.fillStyle = "#222";
        g.fillText(`#${f}`, x + 5, y - 4);  // canvas text: drawn, never parsed
      });
      pc.dataset.points = String(r.features.length);
      $("pcastatus").textContent = `PC1 ${fmt(100 * r.explained[0])}% · PC2 ${fmt(100 * r.explained[1])}% of the variance`;
    } catch (e) { $("pcastatus").textContent = `error: ${e.message}`; }
  });
  await load();
}

mapPage();
