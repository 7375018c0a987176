// saeforge viewer pages. Token text comes from an untrusted corpus: it only ever reaches the DOM
// through textContent / title (never innerHTML), so a "<script>" in the corpus stays text.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function link(href, text) {
  const a = el("a", text);
  a.href = href;
  return a;
}

async function api(url, opts) {
  const r = await fetch(url, opts);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

const fmt = (x, d = 3) => (x === null || x === undefined ? "" : Number(x).toPrecision(d));
const featureUrl = (model, sae, i) =>
  `/feature/${encodeURIComponent(model)}/${encodeURIComponent(sae)}/${i}`;
// Newlines and tabs shown as visible marks so a context stays on one line.
const shown = (t) => t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192");

function tokenSpans(tokens, values, scale, maxPos) {
  const div = el("div", null, "ctx");
  tokens.forEach((t, i) => {
    const s = el("span", shown(t), "tok");
    const v = values[i] || 0;
    if (v > 0) s.style.backgroundColor = `rgba(232, 146, 58, ${Math.min(1, v / (scale || 1)).toFixed(3)})`;
    if (i === maxPos) s.classList.add("max");
    s.title = `${JSON.stringify(t)}: ${fmt(v, 4)}`;
    div.appendChild(s);
  });
  return div;
}

function fail(target, err) {
  target.textContent = "";
  target.appendChild(el("p", `error: ${err.message}`, "err"));
}

// ---- feature page ---------------------------------------------------------------------
async function featurePage() {
  const parts = location.pathname.split("/").slice(2).map(decodeURIComponent);
  const [model, sae, index] = parts;
  const base = `/api/feature/${encodeURIComponent(model)}/${encodeURIComponent(sae)}/${index}`;
  const xfirst = new URLSearchParams(location.search).get("exclude_first") === "true";
  let f;
  try {
    f = await api(xfirst ? `${base}?exclude_first=true` : base);  // no query: the server's fastest path
  } catch (e) {
    return fail(document.querySelector("main"), e);
  }
  document.title = `${model}/${sae} #${index}`;
  $("title").textContent = `${model} / ${sae} / feature ${index}`;
  const s = f.saeforge;
  $("stats").textContent = `density ${fmt(f.frac_nonzero)} (${s.fire_count} of ${s.n_tokens} tokens) · ` +
    `max activation ${fmt(f.maxActApprox)} · mean when firing ${fmt(s.mean_act)} · hook ${s.hook}`;
  drawHistogram(f.freq_hist_data_bar_heights, s.hist_bin_width);
  firstPosition(s.first_position, xfirst);
  // Explanations are untrusted text too (an LLM wrote them from corpus text): textContent only, via el().
  const eb = $("explanations").querySelector("tbody");
  for (const e of f.explanations) {
    const tr = el("tr", null, "expl");
    for (const v of [e.description, e.explanationModelName, fmt(e.scores.simulation), fmt(e.scores.detection),
      fmt(e.scores.fuzzing)]) {
      tr.appendChild(el("td", v));
    }
    eb.appendChild(tr);
  }
  if (!f.explanations.length) $("explnote").textContent = "no explanations yet: run `saeforge explain` on the database";
  for (const [id, strs, vals] of [["pos", f.pos_str, f.pos_values], ["neg", f.neg_str, f.neg_values]]) {
    const body = $(id).querySelector("tbody");
    strs.forEach((t, i) => {
      const tr = el("tr");
      tr.appendChild(el("td", JSON.stringify(t)));
      tr.appendChild(el("td", fmt(vals[i])));
      body.appendChild(tr);
    });
  }
  if (!f.pos_str.length) $("lensnote").textContent = "no logit lens: the SAE's width differs from the unembedding's";
  const nb = $("neighbours").querySelector("tbody");
  f.topkCosSimIndices.forEach((j, i) => {
    const tr = el("tr");
    const td = el("td");
    td.appendChild(link(featureUrl(model, sae, j), `#${j}`));
    tr.appendChild(td);
    tr.appendChild(el("td", fmt(f.topkCosSimValues[i])));
    nb.appendChild(tr);
  });
  let interval = null;
  for (const a of f.activations) {
    const target = a.kind === "top" ? $("top") : $("quantiles");
    if (a.kind !== "top" && a.interval !== interval) {
      interval = a.interval;
      target.appendChild(el("h3", `interval ${a.interval}: activations ${fmt(a.binMin)} to ${fmt(a.binMax)}`));
    }
    const row = tokenSpans(a.tokens, a.values, f.maxActApprox, a.maxValueTokenIndex);
    row.prepend(el("span", fmt(a.maxValue), "ctxval"));
    target.appendChild(row);
  }
  if (!f.activations.length) $("top").appendChild(el("p", "this feature never fired on the indexed tokens", "note"));
  decoderView(f);
  metaLatents(f.meta, model, sae);
  $("frun").addEventListener("click", async () => {
    const out = $("fout");
    out.textContent = "running…";
    try {
      const r = await api(`/api/activation/${encodeURIComponent(model)}/${encodeURIComponent(sae)}/${index}`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text: $("ftext").value }),
      });
      out.textContent = "";
      out.appendChild(tokenSpans(r.tokens, r.values, Math.max(f.maxActApprox, r.maxValue), r.maxValueTokenIndex));
      out.appendChild(el("p", `max ${fmt(r.maxValue)} at token ${r.maxValueTokenIndex}`, "note"));
    } catch (e) { fail(out, e); }
  });
  steerPanel(model, sae, index);
}

// Encoder vs decoder view: the decoder-projection top contexts and their overlap with the encoder's.
function decoderView(f) {
  const ed = f.saeforge.encoder_decoder;
  if (!f.decoder_contexts) {
    $("encdec").textContent = "Not in this database: rebuild it with `saeforge index` to get them.";
    return;
  }
  const windows = new Set(f.activations.filter((a) => a.kind === "top").map((a) => a.window));
  $("encdec").textContent = ed && ed.jaccard !== null
    ? `Overlap with the encoder's top windows: Jaccard ${fmt(ed.jaccard)} (${ed.n_enc} encoder, ${ed.n_dec} decoder windows).`
    : "";
  const scale = Math.max(...f.decoder_contexts.map((c) => c.maxValue), 1e-9);
  for (const c of f.decoder_contexts) {
    const row = tokenSpans(c.tokens, c.values, scale, c.maxValueTokenIndex);
    row.prepend(el("span", fmt(c.maxValue), "ctxval"));
    if (windows.has(c.window)) row.prepend(el("span", "both", "ctxval"));
    $("dectop").appendChild(row);
  }
}

// Meta-latents (`saeforge meta --db`): each with links to the features that share it.
function metaLatents(meta, model, sae) {
  if (!meta) {
    $("metanote").textContent = "no meta-SAE in this database: add one with `saeforge meta SAE_DIR --db DB`";
    return;
  }
  const body = $("meta").querySelector("tbody");
  for (const m of meta) {
    const tr = el("tr");
    tr.appendChild(el("td", `meta ${m.latent}`));
    tr.appendChild(el("td", fmt(m.activation)));
    const td = el("td");
    for (const o of m.shared_with) {
      td.appendChild(link(featureUrl(model, sae, o.index), `#${o.index}`));
      td.appendChild(document.createTextNode(" "));
    }
    tr.appendChild(td);
    body.appendChild(tr);
  }
  if (!meta.length) $("metanote").textContent = "no meta-latent fires on this feature's decoder direction";
}

// The first-position artefact: the flag and the toggle that reloads the page without that position.
function firstPosition(p, xfirst) {
  $("xfirst").checked = xfirst;
  $("xfirst").addEventListener("change", () => {
    location.search = $("xfirst").checked ? "?exclude_first=true" : "";
  });
  if (!p) {
    $("xfirst").disabled = true;
    $("firstnote").textContent = "no first-position statistics: the database predates them (rebuild with `saeforge index`)";
    return;
  }
  $("firstnote").textContent = `max ${fmt(p.max_act_first)} at the first position after BOS, ` +
    `${fmt(p.max_act_excl_first)} elsewhere; ${fmt(100 * p.first_share, 2)}% of firing windows peak there` +
    (p.first_flag ? " · flagged as a first-position artefact" : "");
}

// The prompt and the generations are untrusted text too: both go in through textContent.
function steerPanel(model, sae, index) {
  $("srun").addEventListener("click", async () => {
    const outs = [$("sclean"), $("ssteered")];
    outs.forEach((o) => { o.textContent = ""; });
    $("sstatus").textContent = "generating (the first run loads the model)…";
    const prompt = $("sprompt").value;  // shown as sent, even if the box is edited while we wait
    try {
      const r = await api(`/api/steer/${encodeURIComponent(model)}/${encodeURIComponent(sae)}/${index}`, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ prompt, alpha: Number($("salpha").value),
          positions: $("spos").value, max_new_tokens: Number($("snew").value) || 24 }),
      });
      [r.clean, r.steered].forEach((text, i) => {
        outs[i].appendChild(el("span", prompt, "prompt"));
        outs[i].appendChild(el("span", text, "cont"));
      });
      $("sstatus").textContent = r.clean === r.steered ? "same text: try a larger alpha" : "";
    } catch (e) { $("sstatus").textContent = `error: ${e.message}`; }
  });
}

function drawHistogram(heights, width) {
  const svg = $("hist");
  const W = 420, H = 120, n = Math.max(heights.length, 1), top = Math.max(1, ...heights);
  const ns = "http://www.w3.org/2000/svg";
  heights.forEach((h, i) => {
    const r = document.createElementNS(ns, "rect");
    const bh = (h / top) * H;
    r.setAttribute("x", String((i * W) / n));
    r.setAttribute("y", String(H - bh));
    r.setAttribute("width", String(Math.max(1, W / n - 1)));
    r.setAttribute("height", String(bh));
    const t = document.createElementNS(ns, "title");
    t.textContent = `[${fmt(i * width)}, ${fmt((i + 1) * width)}): ${h}`;
    r.appendChild(t);
    svg.appendChild(r);
  });
  $("histnote").textContent = heights.length
    ? `${heights.length} bins of width ${fmt(width)}; activation 0 to ${fmt(heights.length * width)}` : "never fired";
}

// ---- feature list ---------------------------------------------------------------------
async function indexPage() {
  let offset = 0;
  const limit = 50;
  const { saes } = await api("/api/saes");
  for (const s of saes) {
    const o = el("option", `${s.model_id} / ${s.sae_id} (${s.hook}, ${s.d_sae} features)`);
    o.value = `${s.model_id}/${s.sae_id}`;
    $("sae").appendChild(o);
  }
  const body = $("features").querySelector("tbody");
  async function show() {
    const [model, sae] = $("sae").value.split("/");
    const q = $("q").value.trim();
    body.textContent = "";
    $("status").textContent = "loading…";
    try {
      let rows;
      if (q) {
        const r = await api(`/api/search?q=${encodeURIComponent(q)}&model=${encodeURIComponent(model)}&sae=${encodeURIComponent(sae)}`);
        rows = r.results;
        $("status").textContent = `${rows.length} features peak on tokens containing ${JSON.stringify(q)} ` +
          "or have an explanation with its words";
      } else {
        const r = await api(`/api/features/${encodeURIComponent(model)}/${encodeURIComponent(sae)}?sort=${$("sort").value}` +
          `&order=${$("order").value}&offset=${offset}&limit=${limit}&exclude_first=${$("xfirst").checked}`);
        rows = r.features.map((x) => ({ model, sae, ...x }));
        $("status").textContent = `features ${offset}–${offset + rows.length - 1} of ${r.total}`;
      }
      for (const f of rows) {
        const tr = el("tr");
        tr.appendChild(el("td", `${f.model}/${f.sae}`));
        const td = el("td");
        td.appendChild(link(featureUrl(f.model, f.sae, f.index), `#${f.index}`));
        tr.appendChild(td);
        const xfirst = $("xfirst").checked && f.max_act_excl_first !== null;
        // the first-position artefact: flagged features peak right after BOS (the share of their windows says how often)
        const first = f.first_flag ? `artefact (${fmt(100 * f.first_share, 2)}%)` : "";
        for (const v of [fmt(f.density), fmt(xfirst ? f.max_act_excl_first : f.max_act), first, fmt(f.enc_dec_jaccard, 2), f.peak_token === null ? "" : JSON.stringify(f.peak_token),
          f.matching_contexts ?? "", f.explanation ?? ""]) tr.appendChild(el("td", v));
        body.appendChild(tr);
      }
    } catch (e) { $("status").textContent = `error: ${e.message}`; }
  }
  $("controls").addEventListener("submit", (ev) => { ev.preventDefault(); offset = 0; show(); });
  $("prev").addEventListener("click", () => { offset = Math.max(0, offset - limit); show(); });
  $("next").addEventListener("click", () => { offset += limit; show(); });
  show();
}

// ---- live box -------------------------------------------------------------------------
async function livePage() {
  $("run").addEventListener("click", async () => {
    $("status").textContent = "running (the first run loads the model)…";
    const thead = $("live").querySelector("thead"), body = $("live").querySelector("tbody");
    thead.textContent = "";
    body.textContent = "";
    try {
      const r = await api("/api/activations", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ text: $("text").value, top: Number($("top").value) || 3 }),
      });
      const head = el("tr");
      head.appendChild(el("th", "token"));
      for (const res of r.results) head.appendChild(el("th", `${res.model} / ${res.sae}`));
      thead.appendChild(head);
      const n = r.results.length ? r.results[0].tokens.length : 0;
      for (let t = 0; t < n; t++) {
        const tr = el("tr", null, "livetok");
        tr.appendChild(el("td", JSON.stringify(r.results[0].tokens[t])));
        for (const res of r.results) {
          const td = el("td");
          if (res.excluded[t]) td.appendChild(el("span", "(special token, not scored)", "note"));
          for (const f of res.features[t]) {
            const span = el("span", null, "feat");
            span.appendChild(link(featureUrl(res.model, res.sae, f.index), `#${f.index}`));
            span.appendChild(document.createTextNode(` ${fmt(f.value)}`));
            td.appendChild(span);
          }
          tr.appendChild(td);
        }
        body.appendChild(tr);
      }
      $("status").textContent = `${n} tokens`;
    } catch (e) { $("status").textContent = `error: ${e.message}`; }
  });
}

const pages = { feature: featurePage, index: indexPage, live: livePage };
const runPage = pages[document.body.dataset.page];
if (runPage) runPage();  // the map page runs its own script (map.js)
