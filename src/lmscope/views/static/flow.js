/* lmscope flow view: the information-flow graph of a prediction (LM Transparency Tool figure).
   Positions are columns, layers rows (input at the bottom); circles are residual states, squares
   FFN blocks; edge width and opacity follow weight. The start-token selector re-extracts the
   subgraph from edges reaching any output; clicking a node or edge shows precomputed details.
   Text goes into the DOM only through textContent. */
(function () {
  "use strict";
  var lms = (window.lmscope = window.lmscope || {});
  lms.views = lms.views || {};
  var KINDS = ["attention", "ffn", "residual"];
  var STATES = ["pre", "mid", "post"];
  var COLORS = { attention: "31, 119, 180", ffn: "214, 39, 40", residual: "110, 118, 129" };

  function nodeId(layer, pos, state) {
    if (state === 1) { return "m" + layer + "." + pos; }
    return "x" + (layer + (state === 2 ? 1 : 0)) + "." + pos;
  }

  function edgeId(e) {
    return KINDS[e[1]][0] + e[0] + "." + e[2] + "." + e[4] + "." + STATES[e[5]];
  }

  lms.views.flow = function (body, data, root) {
    var tokens = data.tokens, first = data.layers[0], last = data.layers[1];
    var nLayers = last - first + 1, nPos = tokens.length;
    var colW = Math.max(22, Math.min(46, Math.floor(900 / Math.max(1, nPos)))), rowH = 22;
    var left = 46, top = 14, bottom = 70;
    var width = left + nPos * colW + 10, height = top + 2 * nLayers * rowH + bottom;
    var incoming = {};
    data.edges.forEach(function (e) {
      var t = nodeId(e[0], e[4], e[5]);
      (incoming[t] = incoming[t] || []).push(e);
    });

    function depth(id) {
      var layer = parseInt(id.slice(1).split(".")[0], 10);
      return 2 * (layer - first) + (id[0] === "m" ? 1 : 0);
    }
    function xOf(pos) { return left + pos * colW + colW / 2; }
    function yOf(d) { return top + (2 * nLayers - d) * rowH; }

    var controls = lms.el("div", { className: "lms-controls" });
    controls.appendChild(lms.el("span", { className: "lms-muted" }, "start token"));
    var select = lms.el("select", { className: "lms-flow-start" });
    select.appendChild(lms.el("option", { value: "all" }, "all positions"));
    tokens.forEach(function (t, i) {
      select.appendChild(lms.el("option", { value: String(i) }, i + ": " + lms.visible(t)));
    });
    select.value = data.positions.length === 1 ? String(data.positions[0]) : "all";
    controls.appendChild(select);
    var summary = lms.el("span", { className: "lms-muted lms-flow-summary" });
    controls.appendChild(summary);
    body.appendChild(controls);

    var wrap = lms.el("div", { className: "lms-flow-wrap" });
    var svg = lms.svg("svg", { width: width, height: height, class: "lms-flow-svg" });
    wrap.appendChild(svg);
    body.appendChild(wrap);
    var panel = lms.el("div", { className: "lms-flow-details" });
    panel.appendChild(lms.el("div", { className: "lms-muted" }, "Click a node or an edge for its details."));
    body.appendChild(panel);

    function extract(starts) {
      var seen = {}, queue = [], kept = [];
      starts.forEach(function (p) { var id = "x" + (last + 1) + "." + p; seen[id] = true; queue.push(id); });
      while (queue.length) {
        var id = queue.pop();
        (incoming[id] || []).forEach(function (e) {
          kept.push(e);
          var s = nodeId(e[0], e[2], e[3]);
          if (!seen[s]) { seen[s] = true; queue.push(s); }
        });
      }
      return { edges: kept, nodes: seen };
    }

    function show(title, key, extra) {
      while (panel.firstChild) { panel.removeChild(panel.firstChild); }
      panel.appendChild(lms.el("div", { className: "lms-title" }, title));
      if (extra) { panel.appendChild(extra); }
      var d = data.details[key];
      if (!d) {
        panel.appendChild(lms.el("div", { className: "lms-muted" },
          "No precomputed details here (they cover the subgraph of the chosen position)."));
        return;
      }
      function list(label, rows, fmt) {
        if (!rows || !rows.length) { return; }
        var line = lms.el("div", { className: "lms-flow-list" });
        line.appendChild(lms.el("span", { className: "lms-muted" }, label + ": "));
        rows.forEach(function (r) {
          line.appendChild(lms.token(r[0]));
          line.appendChild(lms.el("small", null, fmt(r[1]) + " "));
        });
        panel.appendChild(line);
      }
      list("logit lens", d.lens, lms.percent);
      list("promoted", d.promoted, function (v) { return v.toFixed(2); });
      list("suppressed", d.suppressed, function (v) { return v.toFixed(2); });
      if (d.neurons && d.neurons.length) {
        var t = lms.el("div", { className: "lms-flow-list" });
        t.appendChild(lms.el("span", { className: "lms-muted" }, "top neurons: "));
        d.neurons.forEach(function (n) {
          t.appendChild(lms.el("span", { className: "lms-flow-neuron" },
            "#" + n[0] + " " + lms.percent(n[1]) + " (act " + n[2].toFixed(2) + ")"));
        });
        panel.appendChild(t);
      }
    }

    function headBars(heads) {
      var box = lms.el("div", { className: "lms-flow-heads" });
      heads.forEach(function (share, h) {
        var row = lms.el("div", { className: "lms-flow-head" });
        row.appendChild(lms.el("span", null, "head " + h));
        var bar = lms.el("span", { className: "lms-flow-bar" });
        bar.style.width = Math.round(120 * share) + "px";
        row.appendChild(bar);
        row.appendChild(lms.el("small", null, lms.percent(share)));
        box.appendChild(row);
      });
      return box;
    }

    function describe(id) {
      var kind = id[0], rest = id.slice(1).split("."), layer = parseInt(rest[0], 10), pos = parseInt(rest[1], 10);
      var tok = lms.visible(tokens[pos]);
      if (kind === "f") { return "FFN block, layer " + layer + ", position " + pos + " (" + tok + ")"; }
      if (kind === "m") { return "after attention, layer " + layer + ", position " + pos + " (" + tok + ")"; }
      if (layer > last) { return "output of layer " + last + ", position " + pos + " (" + tok + ")"; }
      return "input of layer " + layer + ", position " + pos + " (" + tok + ")";
    }

    function draw() {
      while (svg.firstChild) { svg.removeChild(svg.firstChild); }
      var starts = select.value === "all" ? tokens.map(function (_, i) { return i; }) : [parseInt(select.value, 10)];
      var graph = extract(starts);
      summary.textContent = graph.edges.length + " edges, threshold " + data.threshold + " (" + data.mode + ")" +
        (data.error > 0 ? ", weights within \u00b1" + data.error.toPrecision(2) : "");
      for (var l = first; l <= last; l++) {
        var y = yOf(2 * (l - first) + 1);
        svg.appendChild(lms.svg("text", { x: 4, y: y + 4, class: "lms-flow-layer" })).textContent = "L" + l;
      }
      tokens.forEach(function (t, i) {
        var label = lms.svg("text", { x: 0, y: 0, class: "lms-flow-token",
          transform: "translate(" + xOf(i) + "," + (yOf(0) + 14) + ") rotate(45)" });
        label.textContent = lms.visible(t).slice(0, 12);
        svg.appendChild(label);
      });
      var ffn = {};
      graph.edges.forEach(function (e) {
        var kind = KINDS[e[1]], s = nodeId(e[0], e[2], e[3]), t = nodeId(e[0], e[4], e[5]);
        var x1 = xOf(e[2]), y1 = yOf(depth(s)), x2 = xOf(e[4]), y2 = yOf(depth(t));
        var shift = kind === "residual" ? -3 : kind === "ffn" ? 3 : 0;  // keep vertical edges apart
        x1 += shift; x2 += shift;
        var line = lms.svg("line", { x1: x1, y1: y1, x2: x2, y2: y2, class: "lms-flow-edge lms-flow-" + kind,
          stroke: lms.rgba(COLORS[kind], 0.25 + 0.75 * e[6]), "stroke-width": (0.6 + 5 * e[6]).toFixed(2) });
        var tip = lms.svg("title", {});
        tip.textContent = kind + " L" + e[0] + ": " + e[2] + " \u2192 " + e[4] + "  " + e[6].toFixed(3);
        line.appendChild(tip);
        line.setAttribute("data-edge", edgeId(e));  // the web app opens the edge's details from this id
        line.addEventListener("click", function () {
          show(kind + " edge, layer " + e[0] + ": " + lms.visible(tokens[e[2]]) + " (" + e[2] + ") \u2192 " +
            lms.visible(tokens[e[4]]) + " (" + e[4] + "), weight " + e[6].toFixed(3), edgeId(e),
            e[7] ? headBars(e[7]) : null);
        });
        svg.appendChild(line);
        if (kind === "ffn") { ffn["f" + e[0] + "." + e[4]] = [(x1 + x2) / 2, (y1 + y2) / 2]; }
      });
      Object.keys(graph.nodes).forEach(function (id) {
        var pos = parseInt(id.split(".")[1], 10);
        var c = lms.svg("circle", { cx: xOf(pos), cy: yOf(depth(id)), r: 4.5, class: "lms-flow-node" });
        c.setAttribute("data-node", id);
        c.addEventListener("click", function () { show(describe(id), id); });
        svg.appendChild(c);
      });
      Object.keys(ffn).forEach(function (id) {
        var at = ffn[id];
        var sq = lms.svg("rect", { x: at[0] - 5, y: at[1] - 5, width: 10, height: 10, class: "lms-flow-ffn" });
        sq.setAttribute("data-node", id);
        sq.addEventListener("click", function () { show(describe(id), id); });
        svg.appendChild(sq);
      });
      if (starts.length === 1) {  // bring the chosen output column into view when the graph is wider
        wrap.scrollLeft = Math.max(0, xOf(starts[0]) - wrap.clientWidth / 2);
      }
    }
    select.addEventListener("change", draw);
    draw();
  };
})();
