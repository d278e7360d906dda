/* lmscope: attention views (BertViz's head view, model view and neuron view).
   Lines are drawn on canvases, bucketed by opacity into a few paths per head, so a
   1,000-token head view draws in well under a second. Tokens are DOM text (textContent).
   Queries are data.tokens (left), keys data.key_tokens where they differ (right: cross-attention's
   source tokens); an encoder-decoder result ships data.parts, offered in BertViz's "Attention"
   selector (Encoder, Decoder, Cross). */
(function () {
  "use strict";
  var lms = window.lmscope;
  if (lms.views.attention) { return; }
  var el = lms.el;
  var PALETTE = ["31, 119, 180", "255, 127, 14", "44, 160, 44", "214, 39, 40", "148, 103, 189",
    "140, 86, 75", "227, 119, 194", "127, 127, 127", "188, 189, 34", "23, 190, 207"];
  var ROW = 18;        // px per token row in the head view
  var BUCKETS = 24;    // opacity levels per head (one canvas path each)
  var THUMB = 84;      // px side of a model-view thumbnail
  var KIND = {
    weights: "attention weights",
    rollout: "attention rollout (Abnar & Zuidema 2020)",
    value_norm: "attention \u00d7 value norm \u2016\u03b1\u00b7f(x)\u2016 (Kobayashi et al. 2020)"
  };

  function color(h) { return PALETTE[h % PALETTE.length]; }
  function keyTokens(data) { return data.key_tokens || data.tokens; }
  function segment(data, i) { return data.segment_b !== null && i >= data.segment_b ? "B" : "A"; }
  function fmt(x) { return Math.abs(x) >= 100 ? x.toFixed(0) : x.toPrecision(3); }
  function shown(data, value) { return data.kind === "value_norm" ? fmt(value) : lms.percent(value); }

  /** Call fn(key, opacity, value) for every shipped key of query q in map (one layer and head). */
  function eachKey(data, map, q, fn) {
    var base = q * data.k;
    for (var j = 0; j < data.k; j++) {
      var w = map.w[base + j];
      if (w > 0) { fn(map.idx ? map.idx[base + j] : j, w / data.scale, (w / data.scale) * map.max); }
    }
  }

  /** Does the segment filter ("all", "AA", "AB", "BA", "BB") let query q attend to key k? */
  function passes(data, filter, q, k) {
    return filter === "all" || (filter[0] === segment(data, q) && filter[1] === segment(data, k));
  }

  /** Draw lines from query rows (x=0) to key rows (x=width) of the given heads; returns the count.
      Only lines crossing the band opts.y0..opts.y1 are drawn, clipped to it: a long input draws
      what is near the screen, not n × k lines of thousands of pixels. */
  function drawLines(ctx, data, layer, heads, opts) {
    var n = data.tokens.length, count = 0, width = opts.width, step = opts.step, stepK = opts.stepK || step;
    var y0 = opts.y0 === undefined ? -Infinity : opts.y0, y1 = opts.y1 === undefined ? Infinity : opts.y1;
    ctx.save();
    if (opts.y0 !== undefined) { ctx.beginPath(); ctx.rect(0, y0, width, y1 - y0); ctx.clip(); }
    heads.forEach(function (h) {
      var map = data.maps[layer][h], paths = [];
      for (var b = 0; b < BUCKETS; b++) { paths.push(null); }
      var rows = opts.query !== null ? [opts.query] : null;
      for (var q = rows ? rows[0] : 0; q < (rows ? rows[0] + 1 : n); q++) {
        eachKey(data, map, q, function (k, alpha) {
          if (alpha < opts.floor || (opts.key !== null && k !== opts.key) || !passes(data, opts.filter, q, k)) { return; }
          var yq = (q + 0.5) * step, yk = (k + 0.5) * stepK;
          if ((yq < y0 && yk < y0) || (yq > y1 && yk > y1)) { return; }
          var b = Math.min(BUCKETS - 1, Math.floor(alpha * BUCKETS));
          var path = paths[b] || (paths[b] = new Path2D());
          path.moveTo(0, yq);
          path.lineTo(width, yk);
          count++;
        });
      }
      ctx.lineWidth = opts.lineWidth;
      paths.forEach(function (path, b) {
        if (!path) { return; }
        ctx.strokeStyle = lms.rgba(color(h), Math.max(0.08, (b + 1) / BUCKETS) * opts.alpha);
        ctx.stroke(path);
      });
    });
    ctx.restore();
    return count;
  }

  function layerSelect(data, onChange, initial) {
    var select = el("select", { className: "lms-att-layer", "aria-label": "layer" });
    data.layers.forEach(function (layer, i) {
      var option = el("option", { value: String(i) }, "Layer " + layer);
      if (i === initial) { option.selected = true; }
      select.appendChild(option);
    });
    select.addEventListener("change", function () { onChange(Number(select.value)); });
    return select;
  }

  function filterSelect(data, onChange) {
    var select = el("select", { className: "lms-att-filter", "aria-label": "segments" });
    [["all", "All tokens"], ["AA", "Sentence A \u2192 A"], ["AB", "Sentence A \u2192 B"],
      ["BA", "Sentence B \u2192 A"], ["BB", "Sentence B \u2192 B"]].forEach(function (pair) {
      select.appendChild(el("option", { value: pair[0] }, pair[1]));
    });
    select.addEventListener("change", function () { onChange(select.value); });
    return select;
  }

  function summary(data) {
    var text = KIND[data.kind] + " \u00b7 " + data.model + " \u00b7 " + (data.key_tokens
      ? data.tokens.length + " query tokens \u00d7 " + data.key_tokens.length + " key tokens"
      : data.tokens.length + " tokens");
    if (data.n_kv_heads < data.n_heads && data.kind !== "rollout") {
      text += " \u00b7 " + data.n_heads + " query heads share " + data.n_kv_heads + " key/value heads";
    }
    return el("div", { className: "lms-att-summary lms-muted" }, text);
  }

  function cutoffNote(data, layer) {
    if (data.top_k === null) { return el("div", { className: "lms-att-cutoff lms-muted" }, "All weights shown."); }
    var worst = Math.max.apply(null, data.cutoff[layer]), kept = Math.min.apply(null, data.kept[layer]);
    return el("div", { className: "lms-att-cutoff lms-muted" },
      "Sparsified: the strongest " + data.top_k + " keys per query; the largest weight left out is " +
      shown(data, worst) + " (kept \u2265 " + (100 * kept).toFixed(1) + "% of each head's weight on average).");
  }

  function tokenColumn(data, side) {
    var column = el("div", { className: "lms-att-col lms-att-" + side });
    var keys = side === "right", given = keys ? data.key_n_input : data.n_input;
    (keys ? keyTokens(data) : data.tokens).forEach(function (token, i) {
      var cls = "lms-att-tok" + (segment(data, i) === "B" ? " lms-att-seg-b" : "") +
        (i === data.segment_b ? " lms-att-boundary" : "") + (i >= given ? " lms-att-generated" : "");
      var node = el("div", { className: cls, "data-pos": String(i) }, lms.visible(token));
      node.title = i + ": " + JSON.stringify(token);
      column.appendChild(node);
    });
    return column;
  }

  /** The head view: two token columns and lines between them; opts.layer/opts.heads preselect. */
  function headView(body, data, opts) {
    opts = opts || {};
    var n = data.tokens.length, rows = Math.max(n, keyTokens(data).length), state = {
      layer: opts.layer || 0, filter: "all", query: null, key: null,
      on: data.labels.map(function (_, h) { return opts.heads ? opts.heads.indexOf(h) >= 0 : true; })
    };
    var controls = el("div", { className: "lms-controls" });
    if (data.layers.length > 1 && !opts.fixed) {
      controls.appendChild(layerSelect(data, function (i) { state.layer = i; redraw(); }, state.layer));
    }
    if (data.segment_b !== null) { controls.appendChild(filterSelect(data, function (f) { state.filter = f; redraw(); })); }
    var chips = el("div", { className: "lms-att-heads" });
    data.labels.forEach(function (label, h) {
      var chip = el("button", { type: "button", className: "lms-att-chip", "data-head": String(h) }, label);
      chip.style.borderColor = lms.rgba(color(h), 1);
      chip.addEventListener("click", function () { state.on[h] = !state.on[h]; redraw(); });
      chip.addEventListener("dblclick", function () {
        state.on = state.on.map(function (_, i) { return i === h; }); redraw();
      });
      chips.appendChild(chip);
    });
    controls.appendChild(chips);
    body.appendChild(controls);
    var note = el("div");
    body.appendChild(note);
    var wrap = el("div", { className: "lms-att-head-view" });
    var left = tokenColumn(data, "left"), right = tokenColumn(data, "right");
    var canvas = el("canvas", { className: "lms-att-lines", width: "200", height: String(rows * ROW) });
    canvas.style.height = rows * ROW + "px";
    wrap.appendChild(left); wrap.appendChild(canvas); wrap.appendChild(right);
    body.appendChild(wrap);

    function highlight() {
      var heads = [];
      state.on.forEach(function (on, h) { if (on) { heads.push(h); } });
      [left, right].forEach(function (column) {
        Array.prototype.forEach.call(column.children, function (node) { node.style.backgroundColor = ""; });
      });
      if (state.query === null && state.key === null) { return; }
      var strength = {};
      heads.forEach(function (h) {
        var map = data.maps[state.layer][h];
        for (var q = 0; q < n; q++) {
          if (state.query !== null && q !== state.query) { continue; }
          eachKey(data, map, q, function (k, alpha) {
            if (state.key !== null && k !== state.key) { return; }
            var at = state.query !== null ? k : q;
            if (!strength[at] || strength[at][0] < alpha) { strength[at] = [alpha, h]; }
          });
        }
      });
      var column = state.query !== null ? right : left;
      Object.keys(strength).forEach(function (i) {
        column.children[i].style.backgroundColor = lms.rgba(color(strength[i][1]), 0.15 + 0.6 * strength[i][0]);
      });
    }

    function redraw() {
      Array.prototype.forEach.call(chips.children, function (chip, h) {
        chip.classList.toggle("lms-att-off", !state.on[h]);
        chip.style.backgroundColor = state.on[h] ? lms.rgba(color(h), 0.85) : "";
      });
      note.replaceChildren(cutoffNote(data, state.layer));
      var ctx = canvas.getContext("2d");
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      var heads = [];
      state.on.forEach(function (on, h) { if (on) { heads.push(h); } });
      drawn = nearScreen();
      var count = drawLines(ctx, data, state.layer, heads, {
        width: canvas.width, step: ROW, query: state.query, key: state.key, filter: state.filter,
        floor: 0.004, lineWidth: n > 200 ? 1 : 1.6, alpha: 1, y0: drawn[0], y1: drawn[1]
      });
      canvas.setAttribute("data-lines", String(count));
      canvas.setAttribute("data-band", Math.round(drawn[0]) + "," + Math.round(drawn[1]));
      canvas.setAttribute("data-layer", String(data.layers[state.layer]));
      highlight();
    }

    // The canvas rows within one screen height of the viewport (drawn = the band last drawn).
    var drawn = [0, 0], pending = false;
    function nearScreen() {
      var rect = canvas.getBoundingClientRect(), view = window.innerHeight || 800;
      return [Math.max(0, -rect.top - view), Math.min(canvas.height, 2 * view - rect.top)];
    }
    function onScroll() {
      if (pending) { return; }
      pending = true;
      window.requestAnimationFrame(function () {
        pending = false;
        var rect = canvas.getBoundingClientRect(), view = window.innerHeight || 800;
        var top = Math.max(0, -rect.top), bottom = Math.min(canvas.height, view - rect.top);
        if (bottom > top && (top < drawn[0] || bottom > drawn[1])) { redraw(); }
      });
    }
    if (rows * ROW > (window.innerHeight || 800)) {
      document.addEventListener("scroll", onScroll, { capture: true, passive: true });
      window.addEventListener("resize", onScroll);
    }

    function hover(column, which) {
      column.addEventListener("mouseover", function (event) {
        var pos = event.target.getAttribute && event.target.getAttribute("data-pos");
        if (pos === null || pos === undefined) { return; }
        state.query = which === "query" ? Number(pos) : null;
        state.key = which === "key" ? Number(pos) : null;
        redraw();
      });
      column.addEventListener("mouseleave", function () { state.query = null; state.key = null; redraw(); });
    }
    hover(left, "query");
    hover(right, "key");
    redraw();
    return { redraw: redraw };
  }

  function thumbnail(data, layer, h) {
    var n = data.tokens.length, nk = keyTokens(data).length;
    var canvas = el("canvas", { className: "lms-att-thumb-canvas" }), ctx;
    if (Math.max(n, nk) <= 100) {
      canvas.width = THUMB; canvas.height = THUMB; ctx = canvas.getContext("2d");
      drawLines(ctx, data, layer, [h], {
        width: THUMB, step: THUMB / n, stepK: THUMB / nk, query: null, key: null, filter: "all", floor: 0.01,
        lineWidth: 1, alpha: 1
      });
      return canvas;
    }
    // many tokens: a heatmap (query rows × key columns), max-pooled to the thumbnail size
    var size = THUMB;
    canvas.width = size; canvas.height = size; ctx = canvas.getContext("2d");
    var image = ctx.createImageData(size, size), map = data.maps[layer][h], rgb = color(h).split(", ");
    for (var q = 0; q < n; q++) {
      var y = Math.floor(q * size / n);
      eachKey(data, map, q, function (k, alpha) {
        var at = 4 * (y * size + Math.floor(k * size / nk));
        var a = Math.round(255 * Math.min(1, alpha));
        if (a > image.data[at + 3]) {
          image.data[at] = +rgb[0]; image.data[at + 1] = +rgb[1]; image.data[at + 2] = +rgb[2]; image.data[at + 3] = a;
        }
      });
    }
    ctx.putImageData(image, 0, 0);
    return canvas;
  }

  /** The model view: a grid of layers × heads; clicking a thumbnail opens it large below. */
  function modelView(body, data) {
    var grid = el("table", { className: "lms-att-grid" });
    var header = el("tr");
    header.appendChild(el("th"));
    data.labels.forEach(function (label) { header.appendChild(el("th", null, label)); });
    grid.appendChild(header);
    var detail = el("div", { className: "lms-att-detail" });
    data.layers.forEach(function (layer, li) {
      var row = el("tr");
      row.appendChild(el("th", null, "Layer " + layer));
      data.labels.forEach(function (label, h) {
        var cell = el("td", { className: "lms-att-thumb", "data-layer": String(layer), "data-head": String(h),
          tabindex: "0", title: "layer " + layer + ", " + label });
        cell.appendChild(thumbnail(data, li, h));
        cell.addEventListener("click", function () {
          Array.prototype.forEach.call(grid.querySelectorAll(".lms-att-selected"), function (c) {
            c.classList.remove("lms-att-selected");
          });
          cell.classList.add("lms-att-selected");
          detail.replaceChildren(el("div", { className: "lms-title" }, "Layer " + layer + ", " + label));
          headView(detail, data, { layer: li, heads: [h], fixed: true });
        });
        row.appendChild(cell);
      });
      grid.appendChild(row);
    });
    body.appendChild(grid);
    body.appendChild(detail);
  }

  function strip(values, scale, cell) {
    var canvas = el("canvas", { className: "lms-att-vec", width: String(values.length * cell), height: "12" });
    var ctx = canvas.getContext("2d");
    values.forEach(function (x, d) {
      ctx.fillStyle = lms.rgba(x >= 0 ? "31, 119, 180" : "214, 39, 40", scale > 0 ? Math.abs(x) / scale : 0);
      ctx.fillRect(d * cell, 0, cell - 1, 12);
    });
    return canvas;
  }

  function maxAbs(rows) {
    var m = 0;
    rows.forEach(function (row) { row.forEach(function (x) { m = Math.max(m, Math.abs(x)); }); });
    return m;
  }

  /** softmax(q·k·scaling + bias) of one row, as the model computes it (the same formula as the Python side);
      the bias is T5's relative position bias where the model adds one. */
  function neuronRow(data, li, h, q) {
    var nd = data.neuron, group = data.n_heads / data.n_kv_heads, kv = Math.floor(h / group);
    var query = nd.q[li][q][h], band = nd.band[li][q], scaling = nd.scaling[li], cap = nd.softcap[li];
    var biases = nd.bias ? nd.bias[li][h][q] : null;
    var rows = [], top = -Infinity;
    for (var k = 0; k < keyTokens(data).length; k++) {
      var key = nd.k[li][k][kv], product = [], dot = 0;
      for (var d = 0; d < query.length; d++) { product.push(query[d] * key[d]); dot += query[d] * key[d]; }
      var bias = biases ? biases[k] : 0, score = dot * scaling + bias;
      if (cap) { score = Math.tanh(score / cap) * cap; }
      var visible = k >= band[0] && k <= band[1];
      if (visible) { top = Math.max(top, score); }
      rows.push({ key: key, product: product, dot: dot * scaling, bias: bias, score: score, visible: visible });
    }
    var total = 0;
    rows.forEach(function (r) { r.e = r.visible ? Math.exp(r.score - top) : 0; total += r.e; });
    rows.forEach(function (r) { r.prob = r.e / total; });
    return { kv: kv, query: query, rows: rows };
  }

  /** The neuron view: query vector, key vectors, q×k, scores and softmax for one layer, head and query. */
  function neuronView(body, data) {
    var nd = data.neuron, state = { layer: 0, head: data.head, query: data.query };
    var controls = el("div", { className: "lms-controls" });
    if (data.layers.length > 1) {
      controls.appendChild(layerSelect(data, function (i) { state.layer = i; render(); }, 0));
    }
    var heads = el("select", { className: "lms-att-head", "aria-label": "head" });
    data.labels.forEach(function (label, h) {
      var option = el("option", { value: String(h) }, label);
      if (h === state.head) { option.selected = true; }
      heads.appendChild(option);
    });
    heads.addEventListener("change", function () { state.head = Number(heads.value); render(); });
    controls.appendChild(heads);
    var queries = el("select", { className: "lms-att-query", "aria-label": "query token" });
    data.tokens.forEach(function (token, i) {
      var option = el("option", { value: String(i) }, i + ": " + lms.visible(token));
      if (i === state.query) { option.selected = true; }
      queries.appendChild(option);
    });
    queries.addEventListener("change", function () { state.query = Number(queries.value); render(); });
    controls.appendChild(queries);
    body.appendChild(controls);
    var info = el("div", { className: "lms-att-ninfo lms-muted" });
    body.appendChild(info);
    var table = el("table", { className: "lms-att-neuron" });
    body.appendChild(table);

    function render() {
      var li = state.layer, h = state.head, q = state.query, row = neuronRow(data, li, h, q);
      var group = data.n_heads / data.n_kv_heads, text = "Layer " + data.layers[li] + ", head " + h +
        ", query " + q + " \u00b7 score = (q\u00b7k) \u00d7 " + fmt(nd.scaling[li]) + (nd.bias ? " + position bias" : "");
      if (nd.softcap[li]) { text += ", soft-capped at " + fmt(nd.softcap[li]); }
      if (group > 1) {
        text += " \u00b7 grouped-query attention: head " + h + " reads key/value head " + row.kv +
          ", shared by heads " + (row.kv * group) + "\u2013" + (row.kv * group + group - 1);
      }
      info.textContent = text;
      var vecScale = Math.max(maxAbs([row.query]), maxAbs(row.rows.map(function (r) { return r.key; })));
      var prodScale = maxAbs(row.rows.map(function (r) { return r.product; }));
      var cell = Math.max(3, Math.min(8, Math.floor(256 / row.query.length)));
      table.replaceChildren();
      var head = el("tr");
      var columns = ["", "token", "key k", "q \u00d7 k"];
      if (nd.bias) { columns.push("q\u00b7k \u00d7 scale", "+ bias"); }
      columns.concat(["score", "softmax"]).forEach(function (t) { head.appendChild(el("th", null, t)); });
      table.appendChild(head);
      var qrow = el("tr", { className: "lms-att-qrow" });
      qrow.appendChild(el("th", null, "query"));
      var qtok = el("td");
      qtok.appendChild(lms.token(data.tokens[q]));
      qrow.appendChild(qtok);
      var qcell = el("td");
      qcell.appendChild(strip(row.query, vecScale, cell));
      qrow.appendChild(qcell);
      table.appendChild(qrow);
      row.rows.forEach(function (r, k) {
        var tr = el("tr", { className: "lms-att-nrow" + (r.visible ? "" : " lms-att-masked"), "data-key": String(k),
          "data-prob": String(r.prob), "data-score": String(r.score), "data-bias": String(r.bias) });
        if (segment(data, k) === "B") { tr.classList.add("lms-att-seg-b"); }
        if (k === data.segment_b) { tr.classList.add("lms-att-boundary"); }
        tr.appendChild(el("th", null, String(k)));
        var tok = el("td");
        tok.appendChild(lms.token(keyTokens(data)[k]));
        tr.appendChild(tok);
        var kc = el("td"), pc = el("td");
        kc.appendChild(strip(r.key, vecScale, cell));
        pc.appendChild(strip(r.product, prodScale, cell));
        tr.appendChild(kc); tr.appendChild(pc);
        if (nd.bias) {
          tr.appendChild(el("td", { className: "lms-att-num" }, fmt(r.dot)));
          tr.appendChild(el("td", { className: "lms-att-num lms-att-bias" }, r.visible ? (r.bias < 0 ? "" : "+") + fmt(r.bias) : ""));
        }
        tr.appendChild(el("td", { className: "lms-att-num" }, fmt(r.score)));
        var bar = el("td", { className: "lms-att-prob" });
        if (r.visible) {
          var fill = el("span", { className: "lms-att-bar" });
          fill.style.width = (60 * r.prob).toFixed(1) + "px";
          fill.style.backgroundColor = lms.rgba(color(h), 0.8);
          bar.appendChild(fill);
          bar.appendChild(el("span", null, " " + lms.percent(r.prob)));
        } else {
          bar.appendChild(el("span", { className: "lms-muted" }, "masked"));
        }
        tr.appendChild(bar);
        table.appendChild(tr);
      });
      table.setAttribute("data-head", String(h));
      table.setAttribute("data-query", String(q));
    }
    render();
  }

  function render(body, data) {
    body.appendChild(summary(data));
    if (data.view === "model") { modelView(body, data); }
    else if (data.view === "neuron") { neuronView(body, data); }
    else { headView(body, data); }
  }

  /** An encoder-decoder model: BertViz's "Attention" selector over the parts; each is drawn when first picked. */
  function encoderDecoder(body, data) {
    body.appendChild(el("div", { className: "lms-att-summary lms-muted" }, KIND[data.kind] + " \u00b7 " + data.model +
      " \u00b7 encoder-decoder: " + data.source_tokens.length + " source tokens, " + data.target_tokens.length +
      " target tokens"));
    var controls = el("div", { className: "lms-controls" });
    var select = el("select", { className: "lms-att-part", "aria-label": "attention" });
    data.parts.forEach(function (part, i) { select.appendChild(el("option", { value: String(i) }, part.part_label)); });
    controls.appendChild(el("label", { className: "lms-att-part-label" }, "Attention: "));
    controls.appendChild(select);
    body.appendChild(controls);
    var panes = data.parts.map(function (part) {
      var pane = el("div", { className: "lms-att-pane", "data-part": part.part });
      pane.hidden = true;
      body.appendChild(pane);
      return pane;
    });
    function show(i) {
      panes.forEach(function (pane, j) { pane.hidden = j !== i; });
      if (!panes[i].getAttribute("data-drawn")) {
        render(panes[i], data.parts[i]);
        panes[i].setAttribute("data-drawn", "1");
      }
      body.setAttribute("data-part", data.parts[i].part);
    }
    select.addEventListener("change", function () { show(Number(select.value)); });
    show(0);
  }

  lms.views.attention = function (body, data) {
    if (data.parts) { encoderDecoder(body, data); } else { render(body, data); }
    body.setAttribute("data-drawn", "1");
  };
})();
