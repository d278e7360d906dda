/* lmscope web app: a single page over the JSON API. Views are the library's own HTML fragments
   (the same ones notebooks show), mounted with their inline scripts executed. Text from the server
   reaches the DOM only through textContent; fragments arrive already escaped by the library.

   One prediction is explained at a time, by every tab: the one read from the residual state at
   the selected position S.position (the token chip outlined, the graph's start token). The
   library names a prediction as Ecco does, by the token it predicts (position p + 1 for the state
   at p in a causal LM; len(tokens) for the prediction after the last token), so every route that
   explains a prediction gets predicted(S.position); routes about one residual position (heads,
   neurons, promoted tokens of a node) get the position itself. */
(function () {
  "use strict";
  var lms = window.lmscope;
  var S = { config: null, run: null, position: -1, tab: null, views: {}, seq: {}, choices: {}, details: null };

  function $(id) { return document.getElementById(id); }

  /* ---------- API and errors ---------- */

  function showError(message) {
    $("error-text").textContent = message;
    $("error").hidden = false;
  }
  function clearError() { $("error").hidden = true; $("error-text").textContent = ""; }

  var pending = 0;
  function busy(delta) { pending += delta; $("busy").hidden = pending <= 0; document.body.classList.toggle("is-busy", pending > 0); }

  /** fetch JSON; any non-2xx answer shows its {"detail"} message and rejects. An answer about a run
      the page has already left (a new run came in meanwhile) rejects without a message. */
  function api(path, options) {
    var run = S.run && S.run.id;
    busy(1);
    return fetch(path, options).then(function (response) {
      var type = response.headers.get("content-type") || "";
      var body = type.indexOf("application/json") >= 0 ? response.json() : response.text().then(function (t) { return { detail: t }; });
      return body.then(function (data) {
        if (!response.ok) {
          var message = (data && data.detail) || ("request failed with status " + response.status);
          throw new Error(typeof message === "string" ? message : JSON.stringify(message));
        }
        return data;
      });
    }).catch(function (error) {
      if ((S.run && S.run.id) === run) { showError(error.message || String(error)); }
      throw error;
    }).finally(function () { busy(-1); });
  }

  function runUrl(route, params) {
    return "/api/runs/" + encodeURIComponent(S.run.id) + "/" + route + query(params || {});
  }

  function query(params) {
    var parts = [];
    Object.keys(params).forEach(function (k) {
      var values = Array.isArray(params[k]) ? params[k] : [params[k]];
      values.forEach(function (v) {
        if (v !== undefined && v !== null) { parts.push(encodeURIComponent(k) + "=" + encodeURIComponent(v)); }
      });
    });
    return parts.length ? "?" + parts.join("&") : "";
  }

  /* ---------- the explained prediction ---------- */

  function causal() { return !S.run || S.run.causal !== false; }

  /** The library's position (Ecco's meaning) of the prediction read from the state at p. */
  function predicted(p) { return causal() ? p + 1 : p; }

  function quoted(i) { return "'" + lms.visible(S.run.tokens[i]) + "'"; }

  /** The sentence the library's views use: "prediction of '·are' at 5, read from the state at 4 ('·cabinet')". */
  function predictionSentence(p) {
    var n = S.run.tokens.length;
    if (!causal()) { return "prediction of " + quoted(p) + " at " + p + ", read from its own state"; }
    var read = "read from the state at " + p + " (" + quoted(p) + ")";
    if (p + 1 >= n) { return "prediction after the last token, " + read; }
    return "prediction of " + quoted(p + 1) + " at " + (p + 1) + ", " + read;
  }

  /** A line at the top of a panel naming the prediction it explains (the same in every tab). */
  function explains(parent, what, after) {
    var line = lms.el("p", { className: "explains muted", "data-explains": String(S.position) },
      (what || "Explains the") + " " + predictionSentence(S.position) + (after || "") + ".");
    parent.appendChild(line);
    return line;
  }

  /* ---------- fragments ---------- */

  /** Put a view fragment (self-contained HTML from the library) into container and run its scripts. */
  function mountFragment(container, html) {
    var template = document.createElement("template");
    template.innerHTML = html;
    container.replaceChildren(template.content);
    container.querySelectorAll("script").forEach(function (old) {
      if (old.type && old.type !== "text/javascript") { return; }
      var script = document.createElement("script");
      script.textContent = old.textContent;
      old.replaceWith(script);
    });
  }

  /** A standalone HTML page around a fragment, downloaded as a file. */
  function exportView(name, html) {
    var page = "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>lmscope " + name +
      "</title><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"></head><body>" + html + "</body></html>\n";
    var url = URL.createObjectURL(new Blob([page], { type: "text/html" }));
    var link = lms.el("a", { href: url, download: "lmscope-" + name + ".html" });
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 1000);
  }

  /** A titled box holding one view, with an Export button. */
  function viewBox(parent, name, title, before) {
    var box = lms.el("div", { className: "view-box", "data-view-box": name });
    var head = lms.el("div", { className: "view-head" });
    head.appendChild(lms.el("span", { className: "view-title" }, title));
    var button = lms.el("button", { type: "button", className: "export", "data-export": name }, "Export view");
    button.addEventListener("click", function () {
      var html = S.views[name];
      if (!html) { return; }
      if (name !== "flow") { exportView(name, html); return; }
      // The app shows node and edge details beside the graph; the exported graph carries its own.
      var params = flowParams();
      params.details = true;
      api(runUrl("flow", params)).then(function (r) { exportView(name, r.html); }, function () { return null; });
    });
    head.appendChild(button);
    var body = lms.el("div", { className: "view-body" });
    box.appendChild(head);
    box.appendChild(body);
    parent.insertBefore(box, before || null);
    return body;
  }

  /** Fetch an analysis of the current run and show its fragment in body (latest request wins). */
  function showAnalysis(body, name, route, params) {
    if (!S.run) { return Promise.resolve(null); }
    var seq = (S.seq[name] || 0) + 1;
    S.seq[name] = seq;
    return api(runUrl(route, params)).then(function (result) {
      if (S.seq[name] !== seq) { return null; }
      S.views[name] = result.html;
      mountFragment(body, result.html);
      body.setAttribute("data-kind", result.kind);
      return result;
    }, function () { body.replaceChildren(lms.el("p", { className: "muted" }, "(failed: see the message above)")); return null; });
  }

  /* ---------- tabs ---------- */

  /** A row of labelled selects above a view; onChange re-renders. Returns {values()}. */
  function controls(panel, specs, onChange) {
    var row = lms.el("div", { className: "view-controls" });
    var selects = {};
    specs.forEach(function (spec) {
      var label = lms.el("label", null, spec.label + " ");
      var select = lms.el("select", { "data-control": spec.name });
      spec.options.forEach(function (o) {
        var option = lms.el("option", { value: o[0] }, o[1]);
        if (String(o[0]) === String(S.choices[spec.name] !== undefined ? S.choices[spec.name] : spec.value)) { option.selected = true; }
        select.appendChild(option);
      });
      select.addEventListener("change", function () { clearError(); S.choices[spec.name] = select.value; onChange(); });
      label.appendChild(select);
      row.appendChild(label);
      selects[spec.name] = select;
    });
    panel.appendChild(row);
    return { values: function () {
      var out = {};
      Object.keys(selects).forEach(function (k) { if (selects[k].value !== "") { out[k] = selects[k].value; } });
      return out;
    } };
  }

  function layerOptions(all) {
    var options = all ? [["", all]] : [];
    S.run.layers.forEach(function (l) { options.push([l, "layer " + l]); });
    return options;
  }

  var TITLES = {
    LayerPredictions: "Logit lens of this residual state",
    HeadShares: "Head importances (click a head for what it promotes)",
    ContributionMap: "Attention map and contribution map",
    TopNeurons: "Top neurons (click a neuron for what it promotes)",
    Promoted: "Promoted and suppressed tokens"
  };

  /* ---------- the graph's details column ---------- */

  /** What a node or edge id of the flow graph names: {id, what, kind, layer, pos} (pos: the
      residual position whose update it is; edges also source). */
  function parseId(id) {
    var parts = id.slice(1).split(".");
    var c = { id: id, kind: id[0], layer: parseInt(parts[0], 10) };
    if (parts.length === 2) { c.what = "nodes"; c.pos = parseInt(parts[1], 10); }
    else { c.what = "edges"; c.source = parseInt(parts[1], 10); c.pos = parseInt(parts[2], 10); }
    return c;
  }

  function detailsColumn() { return document.querySelector("#panel-flow .details"); }

  function placeholder(details, text) {
    details.replaceChildren(lms.el("p", { className: "muted details-note" }, text));
    details.removeAttribute("data-details");
    S.details = null;
  }

  /** Show a node's or edge's details (several views) in the details column. */
  function showDetails(details, id) {
    if (!S.run) { return Promise.resolve(null); }
    var c = parseId(id);
    var seq = (S.seq.details || 0) + 1;
    S.seq.details = seq;
    var params = { norm: $("norm").checked, topk: 10 };
    return api(runUrl(c.what + "/" + encodeURIComponent(id), params)).then(function (reply) {
      if (S.seq.details !== seq) { return null; }
      S.details = c;
      details.replaceChildren();
      details.removeAttribute("data-dominant-head");
      details.setAttribute("data-details", id);
      reply.views.forEach(function (view, i) {
        var name = "details-" + view.kind.toLowerCase() + "-" + i;
        S.views[name] = view.html;
        var body = viewBox(details, name, TITLES[view.kind] || view.kind);
        body.parentNode.setAttribute("data-kind", view.kind);
        mountFragment(body, view.html);
      });
      focusable(details);
      if (S.run.capabilities && S.run.capabilities.intervene) { interveneBar(details, id); }
      if (c.kind === "a") { selectHead(dominantHead(details), true); }
      if (c.kind === "m" && S.run.n_heads) {  // after attention: which heads wrote the update here
        var body = viewBox(details, "details-block-heads", "Head importances in this block (click a head for what it promotes)");
        body.parentNode.setAttribute("data-kind", "HeadShares");
        return showAnalysis(body, "details-block-heads", "head_shares", { layer: c.layer, position: c.pos, data: false })
          .then(function () { focusable(body); return reply; });
      }
      return reply;
    }, function () { return null; });
  }

  /** "Ablate" and "Patch from…" a node or edge of the graph: the run's input runs again with it
      removed (or replaced by its value in the run of another text of as many tokens), and the
      prediction at the selected position shows before and after (the library's InterventionEffect). */
  function interveneBar(details, id) {
    var bar = lms.el("div", { className: "intervene", "data-intervene": id });
    var ablate = lms.el("button", { type: "button", className: "intervene-ablate" }, "Ablate");
    var patch = lms.el("button", { type: "button", className: "intervene-patch" }, "Patch from\u2026");
    var source = lms.el("input", { type: "text", className: "intervene-source", "aria-label": "text to patch from",
      placeholder: "a text of the same number of tokens" });
    source.value = S.run.text || "";
    var result = lms.el("div", { className: "intervene-result" });
    function go(op) {
      clearError();
      var params = { element: id, op: op, position: S.position, topk: 10, data: false };
      if (op === "patch") { params.source = source.value; }
      result.replaceChildren(lms.el("p", { className: "muted" }, op === "patch" ? "patching\u2026" : "ablating\u2026"));
      result.removeAttribute("data-kind");
      return showAnalysis(result, "intervene", "intervene", params);
    }
    ablate.addEventListener("click", function () { go("ablate"); });
    patch.addEventListener("click", function () { go("patch"); });
    source.addEventListener("keydown", function (event) { if (event.key === "Enter") { event.preventDefault(); go("patch"); } });
    var row = lms.el("div", { className: "intervene-row" });
    row.appendChild(lms.el("span", { className: "view-title" }, "Intervene on " + id + ":"));
    row.appendChild(ablate);
    row.appendChild(patch);
    row.appendChild(source);
    bar.appendChild(row);
    bar.appendChild(result);
    details.insertBefore(bar, details.firstChild);
    return bar;
  }

  /** A residual edge has no details of its own (its nodes do): only the intervention bar. */
  function showResidualEdge(details, id) {
    S.seq.details = (S.seq.details || 0) + 1;
    S.details = parseId(id);
    details.replaceChildren(lms.el("p", { className: "muted details-note" },
      "A residual edge carries the state unchanged: ablating it leaves only the sublayer's update."));
    details.setAttribute("data-details", id);
    interveneBar(details, id);
  }

  /** Heads and neurons in the details answer the keyboard as well as clicks. */
  function focusable(container) {
    container.querySelectorAll("[data-head], [data-neuron]").forEach(function (row) {
      row.setAttribute("tabindex", "0");
      row.setAttribute("role", "button");
    });
  }

  /** The head with the largest share in the details' head importances (-1 if none shown). */
  function dominantHead(details) {
    var best = -1, share = -1;
    details.querySelectorAll("[data-kind=HeadShares] [data-head]").forEach(function (row) {
      var s = parseFloat(row.getAttribute("data-share"));
      if (s > share) { share = s; best = parseInt(row.getAttribute("data-head"), 10); }
    });
    return best;
  }

  /** Outline head h in the head importances and open the contribution map on it (with the edge's cell). */
  function selectHead(h, initial) {
    var details = detailsColumn();
    if (!details || h < 0) { return; }
    details.querySelectorAll("[data-kind=HeadShares] [data-head]").forEach(function (row) {
      row.classList.toggle("selected", parseInt(row.getAttribute("data-head"), 10) === h);
    });
    var map = details.querySelector("[data-kind=ContributionMap] .lmscope");
    var c = S.details;
    if (map && c) {
      map.dispatchEvent(new CustomEvent("lmscope:select", { detail: {
        head: h, source: c.what === "edges" ? c.source : null, target: c.what === "edges" ? c.pos : null } }));
      map.setAttribute("data-head", String(h));
    }
    if (initial) { details.setAttribute("data-dominant-head", String(h)); }
  }

  /** What one head or one neuron promotes and suppresses, in a box after the list it was picked from. */
  function showPromoted(row) {
    var c = S.details;
    if (!c || !S.run) { return; }
    var head = row.getAttribute("data-head"), neuron = row.getAttribute("data-neuron");
    var list = row.closest(".view-box");
    var params = { layer: c.layer, position: c.pos, topk: 10, norm: $("norm").checked, data: false };
    var name, title;
    if (head !== null) {
      params.component = "attention";
      params.head = head;
      name = "details-head-promoted";
      title = "Head " + head + ", layer " + c.layer + ": tokens its output at " + c.pos + " promotes and suppresses";
      selectHead(parseInt(head, 10), false);
    } else {
      params.component = "ffn";
      params.neuron = neuron;
      name = "details-neuron-promoted";
      title = "Neuron #" + neuron + ", layer " + c.layer + ": tokens its update at " + c.pos + " promotes and suppresses";
    }
    list.parentNode.querySelectorAll("[data-kind=HeadPromoted], [data-kind=NeuronPromoted]").forEach(function (b) { b.remove(); });
    list.querySelectorAll("[data-head], [data-neuron]").forEach(function (r) { r.classList.toggle("selected", r === row); });
    var body = viewBox(list.parentNode, name, title, list.nextSibling);
    body.parentNode.setAttribute("data-kind", head !== null ? "HeadPromoted" : "NeuronPromoted");
    body.parentNode.setAttribute("data-for", head !== null ? "head " + head : "neuron " + neuron);
    showAnalysis(body, name, "promoted", params);
  }

  /** After the graph changed (threshold, start token), drop details of a node or edge no longer drawn. */
  function dropPrunedDetails() {
    var details = detailsColumn(), c = S.details;
    if (!details || !c) { return; }
    var svg = document.querySelector("#panel-flow svg.lms-flow-svg");
    var attr = c.what === "nodes" ? "data-node" : "data-edge";
    if (svg && !svg.querySelector("[" + attr + "=\"" + c.id + "\"]")) {
      placeholder(details, "The " + (c.what === "nodes" ? "node " : "edge ") + c.id + " you had open is not in the graph " +
        "any more (threshold " + $("threshold").value + ", start token " + S.position + "): click another one.");
    }
  }

  function flowParams() {
    return { position: predicted(S.position), threshold: $("threshold").value, renormalize: $("renormalize").checked,
      details: false, data: false };
  }

  /** The graph's own start-token menu shows positions only (no "all positions"), in step with the chips. */
  function wireGraph(body) {
    var all = body.querySelector("select.lms-flow-start option[value=all]");
    if (all) { all.remove(); }
    var select = body.querySelector("select.lms-flow-start");
    if (select) { select.value = String(S.position); }
  }

  var TABS = [
    { name: "flow", label: "Graph", render: function (panel) {
      explains(panel, "The graph traces the");
      var area = lms.el("div", { className: "graph-area" });
      var details = lms.el("div", { className: "details" });
      panel.appendChild(area);
      panel.appendChild(details);
      placeholder(details, "Click a node for its logit lens, an attention edge for its heads and maps, an FFN square for its neurons.");
      var body = viewBox(area, "flow", "Information flow to the selected position");
      body.addEventListener("click", function (event) {
        var target = event.target;
        var node = target.closest && target.closest("[data-node]");
        var edge = target.closest && target.closest("[data-edge]");
        var picked = (node && node.getAttribute("data-node")) || (edge && edge.getAttribute("data-edge")) || "";
        if (/^(e\.|c\d)/.test(picked)) {  // encoder-decoder: an encoder output, a cross state or edge
          clearError();
          placeholder(details, picked + ": cross-attention has no details here yet; the Attention tab's Cross view " +
            "shows each head's cross-attention from the source tokens.");
          details.setAttribute("data-details", picked);
        }
        else if (node) { clearError(); showDetails(details, node.getAttribute("data-node")); }
        else if (edge && edge.getAttribute("data-edge")[0] !== "r") { clearError(); showDetails(details, edge.getAttribute("data-edge")); }
        else if (edge && S.run.capabilities && S.run.capabilities.intervene) { clearError(); showResidualEdge(details, edge.getAttribute("data-edge")); }
      });
      body.addEventListener("lmscope:position", function (event) {
        var p = event.detail && event.detail.position;
        if (p !== null && p !== undefined) { setPosition(p, true); }
      });
      details.addEventListener("click", function (event) {
        var row = event.target.closest && event.target.closest("[data-head], [data-neuron]");
        if (row && row.closest(".details") === details) { clearError(); showPromoted(row); }
      });
      details.addEventListener("keydown", function (event) {
        var row = event.target.closest && event.target.closest("[data-head], [data-neuron]");
        if (row && (event.key === "Enter" || event.key === " ")) { event.preventDefault(); clearError(); showPromoted(row); }
      });
      return refreshFlow();
    } },
    { name: "saliency", label: "Saliency", render: function (panel) {
      var body;
      explains(panel, "Saliency attributes the");
      var ctl = controls(panel, [
        { name: "method", label: "Method", value: "grad_x_input", options: [["grad_x_input", "gradient \u00d7 input"], ["gradient", "gradient"], ["input_x_gradient", "input \u00d7 gradient (signed)"], ["integrated_gradients", "integrated gradients"], ["occlusion", "occlusion (erase each token)"]] },
        { name: "style", label: "Style", value: "minimal", options: [["minimal", "minimal"], ["detailed", "detailed"]] }
      ], function () { draw(); });
      body = viewBox(panel, "saliency", "Input saliency of the selected prediction");
      function draw() {
        var params = ctl.values();
        params.position = predicted(S.position);
        params.data = false;
        return showAnalysis(body, "saliency", "saliency", params);
      }
      return draw();
    } },
    { name: "rankings", label: "Rankings", render: function (panel) {
      var body = viewBox(panel, "rankings", "Rank of each output token after every layer (1 = top)");
      var row = lms.el("form", { className: "view-controls watch-form" });
      var input = lms.el("input", { type: "text", id: "watch", placeholder: "words, comma-separated: is, are" });
      input.value = S.choices.watch || "";
      row.appendChild(lms.el("label", null, "Watch at the selected prediction "));
      row.appendChild(input);
      row.appendChild(lms.el("button", { type: "submit" }, "Watch"));
      panel.appendChild(row);
      explains(panel, "The watched words are ranked for the");
      var watchBody = viewBox(panel, "rankings_watch", "Rank of the watched words at the selected prediction");
      function watch(event) {
        if (event) { event.preventDefault(); clearError(); }
        S.choices.watch = input.value;
        // Words go as typed: the library ranks a word without its leading space as the word
        // mid-sentence and notes it (the same rule as Python's rankings_watch and `lmscope watch`).
        var words = input.value.split(",").map(function (w) { return w.trim(); })
          .filter(function (w) { return w !== ""; });
        if (!words.length) { watchBody.replaceChildren(lms.el("p", { className: "muted" }, "Type words to follow their rank.")); return Promise.resolve(null); }
        return showAnalysis(watchBody, "rankings_watch", "rankings_watch", { watch: words, position: predicted(S.position), norm: $("norm").checked, data: false });
      }
      row.addEventListener("submit", watch);
      watch();
      return showAnalysis(body, "rankings", "rankings", { norm: $("norm").checked, data: false });
    } },
    { name: "lens", label: "Logit lens", render: function (panel) {
      explains(panel, "The logit lens shows the");
      var body = viewBox(panel, "lens", "Logit lens of the selected prediction after every layer");
      return showAnalysis(body, "lens", "lens", { position: predicted(S.position), norm: $("norm").checked, topk: 10, data: false });
    } },
    { name: "attention", label: "Attention", render: function (panel) {
      var body, specs = [
        { name: "view", label: "View", value: "head", options: [["head", "head view"], ["model", "model view"], ["neuron", "neuron view"]] },
        { name: "kind", label: "Map", value: "weights", options: [["weights", "attention weights"], ["rollout", "rollout"], ["value_norm", "weight \u00d7 value norm"]] },
        { name: "layer", label: "Layer", value: "", options: layerOptions("all layers") }
      ];
      explains(panel, "Attention into the", "; the neuron view starts at that state");
      if (S.run.source_tokens) {  // encoder-decoder: BertViz's Encoder / Decoder / Cross, source and target tokens
        specs.unshift({ name: "part", label: "Attention", value: "", options: [["", "Encoder, Decoder, Cross"],
          ["encoder", "Encoder"], ["decoder", "Decoder"], ["cross", "Cross (target \u2192 source)"]] });
        [["source", "Source (encoder)", S.run.source_tokens, S.run.source_tokens.length],
          ["target", "Target (decoder)", S.run.tokens, S.run.n_input]].forEach(function (side) {
          var line = lms.el("div", { className: "lmscope seq2seq-tokens", "data-side": side[0] }, side[1] + ": ");
          line.style.padding = "2px 0";
          side[2].forEach(function (token, i) { line.appendChild(lms.token(token, i >= side[3] ? "lms-generated" : "")); });
          panel.appendChild(line);
        });
      }
      var ctl = controls(panel, specs, function () { draw(); });
      body = viewBox(panel, "attention", "Attention (BertViz views); the neuron view starts at the selected position");
      function draw() {
        var params = ctl.values();
        params.query = S.position;
        return showAnalysis(body, "attention", "attention", params);
      }
      return draw();
    } }
  ];

  function buildTabs() {
    var nav = $("tabs"), panels = $("panels");
    nav.replaceChildren();
    panels.replaceChildren();
    var caps = (S.run && S.run.capabilities) || {};
    var shown = TABS.filter(function (t) { return caps[t.name]; });
    shown.forEach(function (tab) {
      var button = lms.el("button", { type: "button", role: "tab", "data-tab": tab.name }, tab.label);
      button.addEventListener("click", function () { clearError(); selectTab(tab.name); });
      nav.appendChild(button);
      panels.appendChild(lms.el("div", { className: "panel", id: "panel-" + tab.name, role: "tabpanel", hidden: "" }));
    });
    if (!shown.length && S.run) {
      panels.appendChild(lms.el("p", { className: "muted" }, "No analysis works on this run (the model has no LM head, or it was opened without its model)."));
    }
    var keep = shown.some(function (t) { return t.name === S.tab; });
    if (shown.length) { selectTab(keep ? S.tab : shown[0].name); }
  }

  function selectTab(name) {
    S.tab = name;
    document.querySelectorAll("#tabs [data-tab]").forEach(function (b) {
      b.setAttribute("aria-selected", String(b.getAttribute("data-tab") === name));
    });
    document.querySelectorAll("#panels .panel").forEach(function (p) { p.hidden = p.id !== "panel-" + name; });
    return refreshTab();
  }

  function refreshTab() {
    var tab = TABS.filter(function (t) { return t.name === S.tab; })[0];
    var panel = tab && $("panel-" + tab.name);
    if (!panel || !S.run) { return Promise.resolve(null); }
    panel.replaceChildren();
    S.details = null;
    return tab.render(panel);
  }

  /** Draw the graph again (threshold, renormalization, start token); the details column stays
      unless what it shows was pruned. */
  function refreshFlow() {
    var body = document.querySelector("[data-view-box=flow] .view-body");
    if (!body) { return refreshTab(); }
    return showAnalysis(body, "flow", "flow", flowParams()).then(function (result) {
      if (result) { wireGraph(body); dropPrunedDetails(); }
      return result;
    });
  }

  /* ---------- runs ---------- */

  function showRun(run) {
    S.run = run;
    S.views = {};
    S.choices = {};
    S.details = null;
    S.position = run.tokens.length - 1;
    $("empty").hidden = true;
    $("run-info").hidden = false;
    $("export-trace").disabled = false;
    var title = run.model + " \u00b7 " + (run.source_tokens ? run.source_tokens.length + " source tokens \u00b7 target " : "") +
      run.tokens.length + " tokens (" + run.n_input + " input) \u00b7 " +
      run.n_layers + " layers" + (run.has_model ? "" : " \u00b7 opened without its model");
    $("run-title").textContent = title;
    drawTokens();
    buildTabs();
    showTarget();
    refreshStatus();
  }

  /** The target field: shown for an encoder-decoder model (known from the config, or from a run of it). */
  function showTarget() {
    var model = $("model").value;
    var known = (S.config && S.config.seq2seq_models) || [];
    $("target-field").hidden = !(known.indexOf(model) >= 0 || (S.run && S.run.seq2seq && S.run.model === model));
  }

  /** The token chips (the selected one outlined) and the sentence naming the explained prediction. */
  function drawTokens() {
    var box = $("tokens");
    box.replaceChildren();
    var run = S.run;
    if (run.source_tokens) {  // encoder-decoder: the source (encoder) above the target (decoder) tokens
      var source = lms.el("div", { className: "source-tokens", "data-side": "source" }, "Source: ");
      run.source_tokens.forEach(function (token) { source.appendChild(lms.token(token, "")); });
      box.appendChild(source);
      box.appendChild(lms.el("span", { className: "muted" }, "Target: "));
    }
    run.tokens.forEach(function (token, i) {
      var chip = lms.token(token, i >= run.n_input ? "generated" : "");
      chip.setAttribute("data-pos", String(i));
      chip.title = "position " + i + ": " + JSON.stringify(token) + " (click to explain the prediction read from here)";
      if (i === S.position) { chip.classList.add("selected"); }
      chip.setAttribute("tabindex", "0");
      chip.setAttribute("role", "button");
      chip.addEventListener("click", function () { clearError(); selectPosition(i); });
      chip.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); clearError(); selectPosition(i); }
      });
      box.appendChild(chip);
    });
    var prediction = run.predictions && run.predictions[S.position];
    if (prediction) {
      var next = lms.el("span", { className: "prediction" }, "\u2192 ");
      next.appendChild(lms.token(prediction.token, "predicted"));
      next.appendChild(lms.el("small", null, " " + lms.percent(prediction.prob)));
      box.appendChild(next);
    }
    var line = $("explained");
    line.textContent = "Every tab explains the " + predictionSentence(S.position) +
      (prediction ? "; the model's top prediction there: " + lms.visible(prediction.token) + " " + lms.percent(prediction.prob) : "") + ".";
    line.setAttribute("data-explains", String(S.position));
  }

  /** The selected position, one source of truth: the chips, the graph's start token, every tab. From
      the graph's own menu (fromGraph) the graph has redrawn itself already. */
  function setPosition(i, fromGraph) {
    if (!S.run || i < 0 || i >= S.run.tokens.length) { return Promise.resolve(null); }
    S.position = i;
    drawTokens();
    if (S.tab !== "flow") { return refreshTab(); }
    var root = document.querySelector("[data-view-box=flow] .view-body .lmscope");
    if (!root) { return refreshTab(); }
    if (!fromGraph) { root.dispatchEvent(new CustomEvent("lmscope:select", { detail: { position: i } })); }
    document.querySelectorAll("#panel-flow [data-explains]").forEach(function (line) {
      line.textContent = "The graph traces the " + predictionSentence(i) + ".";
      line.setAttribute("data-explains", String(i));
    });
    dropPrunedDetails();
    return Promise.resolve(null);
  }

  function selectPosition(i) { return setPosition(i, false); }

  /** The sidebar's prompt fields follow the run on show (a trace opened from a file). */
  function fillPrompt(run) {
    if (typeof run.text === "string") { $("text").value = run.text; }
    $("generate").value = String(run.tokens.length - run.n_input);
    $("target").value = run.target || "";
    var model = $("model");
    if (Array.prototype.some.call(model.options, function (o) { return o.value === run.model; })) { model.value = run.model; }
  }

  function runText(event) {
    if (event) { event.preventDefault(); }
    clearError();
    var body = {
      text: $("text").value,
      model: $("model").value || null,
      device: $("device").value || null,
      dtype: $("dtype").value || null,
      generate: parseInt($("generate").value || "0", 10) || 0
    };
    if (!$("target-field").hidden) { body.target = $("target").value; }  // encoder-decoder: empty generates
    return api("/api/runs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })
      .then(function (run) { clearError(); showRun(run); }, function () { return null; });
  }

  function openTrace() {
    var file = $("open-trace").files[0];
    if (!file) { return; }
    clearError();
    api("/api/traces?name=" + encodeURIComponent(file.name), { method: "POST", headers: { "Content-Type": "application/octet-stream" }, body: file })
      .then(function (run) { clearError(); fillPrompt(run); showRun(run); }, function () { return null; })
      .finally(function () { $("open-trace").value = ""; });
  }

  function exportTrace() {
    if (!S.run) { return; }
    var link = lms.el("a", { href: "/api/runs/" + encodeURIComponent(S.run.id) + "/trace", download: "lmscope-" + S.run.id + ".safetensors" });
    document.body.appendChild(link);
    link.click();
    link.remove();
  }

  function refreshStatus() {
    return fetch("/api/status").then(function (r) { return r.ok ? r.json() : null; }).then(function (status) {
      if (!status) { return; }
      var runs = status.runs;
      $("memory").textContent = "run cache: " + runs.runs + "/" + runs.max_runs + " runs, " +
        (runs.bytes / 1048576).toFixed(1) + " of " + (runs.max_bytes / 1048576).toFixed(0) + " MB";
    }, function () { return null; });
  }

  /* ---------- start ---------- */

  function fill(select, values, labels, chosen) {
    select.replaceChildren();
    values.forEach(function (v, i) {
      var option = lms.el("option", { value: v }, labels ? labels[i] : v);
      if (v === chosen) { option.selected = true; }
      select.appendChild(option);
    });
  }

  function start() {
    api("/api/config").then(function (config) {
      S.config = config;
      var names = Object.keys(config.models);
      fill($("model"), names, names.map(function (n) { return n + (config.models[n] ? " \u2014 " + config.models[n] : ""); }), config.default_model);
      fill($("device"), config.devices);
      fill($("dtype"), config.dtypes);
      config.sample_prompts.forEach(function (p) { $("samples").appendChild(lms.el("option", { value: p }, p)); });
      $("generate").max = String(config.max_generate);
      if (config.sample_prompts.length) { $("text").value = config.sample_prompts[0]; }
      showTarget();
      refreshStatus();
    }, function () { return null; });
    $("run-form").addEventListener("submit", runText);
    $("samples").addEventListener("change", function () { if (this.value) { $("text").value = this.value; } });
    $("model").addEventListener("change", showTarget);
    $("error-close").addEventListener("click", clearError);
    $("export-trace").addEventListener("click", exportTrace);
    $("open-trace").addEventListener("change", openTrace);
    $("threshold").addEventListener("input", function () { $("threshold-value").textContent = this.value; });
    $("threshold").addEventListener("change", function () { clearError(); if (S.tab === "flow") { refreshFlow(); } });
    $("renormalize").addEventListener("change", function () { clearError(); if (S.tab === "flow") { refreshFlow(); } });
    $("norm").addEventListener("change", function () { clearError(); refreshTab(); });
  }

  // For tests and debugging: the app's state and actions.
  window.lmscopeApp = { state: S, run: runText, selectTab: selectTab, selectPosition: selectPosition, predicted: predicted };
  start();
})();
