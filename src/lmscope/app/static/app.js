/* lmscope web app: a single page over the JSON API. Views are the library's own HTML fragments
   (the same ones notebooks show), mounted with their inline scripts executed. Text from the server
   reaches the DOM only through textContent; fragments arrive already escaped by the library. */
(function () {
  "use strict";
  var lms = window.lmscope;
  var S = { config: null, run: null, position: -1, tab: null, views: {}, seq: {}, choices: {} };

  function $(id) { return document.getElementById(id); }

  /* ---------- API and errors ---------- */

  function showError(message) {
    $("error-text").textContent = message;
    $("error").hidden = false;
  }
  function clearError() { $("error").hidden = true; $("error-text").textContent = ""; }

  var pending = 0;
  function busy(delta) { pending += delta; $("busy").hidden = pending <= 0; document.body.classList.toggle("is-busy", pending > 0); }

  /** fetch JSON; any non-2xx answer shows its {"detail"} message and rejects. */
  function api(path, options) {
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
      showError(error.message || String(error));
      throw error;
    }).finally(function () { busy(-1); });
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
  function viewBox(parent, name, title) {
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
      api("/api/runs/" + encodeURIComponent(S.run.id) + "/flow" + query(params)).then(function (r) {
        exportView(name, r.html);
      }, function () { return null; });
    });
    head.appendChild(button);
    var body = lms.el("div", { className: "view-body" });
    box.appendChild(head);
    box.appendChild(body);
    parent.appendChild(box);
    return body;
  }

  /** Fetch an analysis of the current run and show its fragment in body (latest request wins). */
  function showAnalysis(body, name, route, params) {
    if (!S.run) { return Promise.resolve(null); }
    var seq = (S.seq[name] || 0) + 1;
    S.seq[name] = seq;
    var url = "/api/runs/" + encodeURIComponent(S.run.id) + "/" + route + query(params);
    return api(url).then(function (result) {
      if (S.seq[name] !== seq) { return null; }
      S.views[name] = result.html;
      mountFragment(body, result.html);
      body.setAttribute("data-kind", result.kind);
      return result;
    }, function () { body.replaceChildren(lms.el("p", { className: "muted" }, "(failed: see the message above)")); return null; });
  }

  /* ---------- tabs ---------- */

  function lensParams(extra) {
    var params = { position: S.position, norm: $("norm").checked, topk: 10, data: false };
    Object.keys(extra || {}).forEach(function (k) { params[k] = extra[k]; });
    return params;
  }

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
      select.addEventListener("change", function () { S.choices[spec.name] = select.value; onChange(); });
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

  function headOptions() {
    var options = [];
    for (var h = 0; h < S.run.n_heads; h++) { options.push([h, "head " + h]); }
    return options;
  }

  var TITLES = {
    LayerPredictions: "Logit lens of this residual state",
    HeadShares: "Head importances",
    ContributionMap: "Attention map and contribution map",
    TopNeurons: "Top neurons",
    Promoted: "Promoted and suppressed tokens"
  };

  /** Show a node's or edge's details (several views) in the details column. */
  function showDetails(details, what, id) {
    if (!S.run) { return Promise.resolve(null); }
    var seq = (S.seq.details || 0) + 1;
    S.seq.details = seq;
    var params = { norm: $("norm").checked, topk: 10 };
    var url = "/api/runs/" + encodeURIComponent(S.run.id) + "/" + what + "/" + encodeURIComponent(id) + query(params);
    return api(url).then(function (reply) {
      if (S.seq.details !== seq) { return null; }
      details.replaceChildren();
      details.setAttribute("data-details", id);
      reply.views.forEach(function (view, i) {
        var name = "details-" + view.kind.toLowerCase() + "-" + i;
        S.views[name] = view.html;
        var body = viewBox(details, name, TITLES[view.kind] || view.kind);
        body.parentNode.setAttribute("data-kind", view.kind);
        mountFragment(body, view.html);
      });
      return reply;
    }, function () { return null; });
  }

  function flowParams() {
    return { position: S.position, threshold: $("threshold").value, renormalize: $("renormalize").checked,
      details: false, data: false };
  }

  var TABS = [
    { name: "flow", label: "Graph", render: function (panel) {
      var area = lms.el("div", { className: "graph-area" });
      var details = lms.el("div", { className: "details" });
      details.appendChild(lms.el("p", { className: "muted" }, "Click a node for its logit lens, an attention edge for its heads and maps, an FFN square for its neurons."));
      panel.appendChild(area);
      panel.appendChild(details);
      var body = viewBox(area, "flow", "Information flow to the selected position");
      body.addEventListener("click", function (event) {
        var target = event.target;
        var node = target.closest && target.closest("[data-node]");
        var edge = target.closest && target.closest("[data-edge]");
        if (node) { showDetails(details, "nodes", node.getAttribute("data-node")); }
        else if (edge && edge.getAttribute("data-edge")[0] !== "r") { showDetails(details, "edges", edge.getAttribute("data-edge")); }
      });
      return showAnalysis(body, "flow", "flow", flowParams());
    } },
    { name: "saliency", label: "Saliency", render: function (panel) {
      var body;
      var ctl = controls(panel, [
        { name: "method", label: "Method", value: "grad_x_input", options: [["grad_x_input", "gradient \u00d7 input"], ["gradient", "gradient"], ["input_x_gradient", "input \u00d7 gradient (signed)"], ["integrated_gradients", "integrated gradients"]] },
        { name: "style", label: "Style", value: "minimal", options: [["minimal", "minimal"], ["detailed", "detailed"]] }
      ], function () { draw(); });
      body = viewBox(panel, "saliency", "Input saliency of each output token");
      function draw() { var params = ctl.values(); params.data = false; return showAnalysis(body, "saliency", "saliency", params); }
      return draw();
    } },
    { name: "rankings", label: "Rankings", render: function (panel) {
      var body = viewBox(panel, "rankings", "Rank of each output token after every layer (1 = top)");
      var row = lms.el("form", { className: "view-controls watch-form" });
      var input = lms.el("input", { type: "text", id: "watch", placeholder: "words, comma-separated: is, are" });
      input.value = S.choices.watch || "";
      row.appendChild(lms.el("label", null, "Watch at the selected position "));
      row.appendChild(input);
      row.appendChild(lms.el("button", { type: "submit" }, "Watch"));
      panel.appendChild(row);
      var watchBody = viewBox(panel, "rankings_watch", "Rank of the watched words at the selected position");
      function watch(event) {
        if (event) { event.preventDefault(); }
        S.choices.watch = input.value;
        // Words go as typed: the library ranks a word without its leading space as the word
        // mid-sentence and notes it (the same rule as Python's rankings_watch and `lmscope watch`).
        var words = input.value.split(",").map(function (w) { return w.trim(); })
          .filter(function (w) { return w !== ""; });
        if (!words.length) { watchBody.replaceChildren(lms.el("p", { className: "muted" }, "Type words to follow their rank.")); return Promise.resolve(null); }
        return showAnalysis(watchBody, "rankings_watch", "rankings_watch", { watch: words, position: S.position, norm: $("norm").checked, data: false });
      }
      row.addEventListener("submit", watch);
      watch();
      return showAnalysis(body, "rankings", "rankings", { norm: $("norm").checked, data: false });
    } },
    { name: "lens", label: "Logit lens", render: function (panel) {
      var body = viewBox(panel, "lens", "Logit lens at the selected position");
      return showAnalysis(body, "lens", "lens", lensParams());
    } },
    { name: "attention", label: "Attention", render: function (panel) {
      var body;
      var ctl = controls(panel, [
        { name: "view", label: "View", value: "head", options: [["head", "head view"], ["model", "model view"], ["neuron", "neuron view"]] },
        { name: "kind", label: "Map", value: "weights", options: [["weights", "attention weights"], ["rollout", "rollout"], ["value_norm", "weight \u00d7 value norm"]] },
        { name: "layer", label: "Layer", value: "", options: layerOptions("all layers") }
      ], function () { draw(); });
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
      button.addEventListener("click", function () { selectTab(tab.name); });
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
    return tab.render(panel);
  }

  /** Redraw only the graph (the details column stays), e.g. after a threshold change. */
  function refreshFlow() {
    var body = document.querySelector("[data-view-box=flow] .view-body");
    return body ? showAnalysis(body, "flow", "flow", flowParams()) : refreshTab();
  }

  /* ---------- runs ---------- */

  function showRun(run) {
    S.run = run;
    S.views = {};
    S.choices = {};
    S.position = run.tokens.length - 1;
    $("empty").hidden = true;
    $("run-info").hidden = false;
    $("export-trace").disabled = false;
    var title = run.model + " \u00b7 " + run.tokens.length + " tokens (" + run.n_input + " input) \u00b7 " +
      run.n_layers + " layers" + (run.has_model ? "" : " \u00b7 opened without its model");
    $("run-title").textContent = title;
    drawTokens();
    buildTabs();
    refreshStatus();
  }

  function drawTokens() {
    var box = $("tokens");
    box.replaceChildren();
    var run = S.run;
    run.tokens.forEach(function (token, i) {
      var chip = lms.token(token, i >= run.n_input ? "generated" : "");
      chip.setAttribute("data-pos", String(i));
      if (i === S.position) { chip.classList.add("selected"); }
      chip.addEventListener("click", function () { selectPosition(i); });
      box.appendChild(chip);
    });
    var prediction = run.predictions && run.predictions[S.position];
    if (prediction) {
      var next = lms.el("span", { className: "prediction" }, "\u2192 ");
      next.appendChild(lms.token(prediction.token, "predicted"));
      next.appendChild(lms.el("small", null, " " + lms.percent(prediction.prob)));
      box.appendChild(next);
    }
  }

  function selectPosition(i) {
    S.position = i;
    drawTokens();
    return refreshTab();
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
    return api("/api/runs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })
      .then(showRun, function () { return null; });
  }

  function openTrace() {
    var file = $("open-trace").files[0];
    if (!file) { return; }
    clearError();
    api("/api/traces", { method: "POST", headers: { "Content-Type": "application/octet-stream" }, body: file })
      .then(showRun, function () { return null; })
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
      refreshStatus();
    }, function () { return null; });
    $("run-form").addEventListener("submit", runText);
    $("samples").addEventListener("change", function () { if (this.value) { $("text").value = this.value; } });
    $("error-close").addEventListener("click", clearError);
    $("export-trace").addEventListener("click", exportTrace);
    $("open-trace").addEventListener("change", openTrace);
    $("threshold").addEventListener("input", function () { $("threshold-value").textContent = this.value; });
    $("threshold").addEventListener("change", function () { if (S.tab === "flow") { refreshFlow(); } });
    $("renormalize").addEventListener("change", function () { if (S.tab === "flow") { refreshFlow(); } });
    $("norm").addEventListener("change", function () { refreshTab(); });
  }

  // For tests and debugging: the app's state and actions.
  window.lmscopeApp = { state: S, run: runText, selectTab: selectTab, selectPosition: selectPosition };
  start();
})();
