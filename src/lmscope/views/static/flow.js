/* lmscope flow view: the information-flow graph of a prediction (LM Transparency Tool figure).
   Positions are columns, layers rows (input at the bottom); circles are residual states, squares
   FFN blocks; edge width and opacity follow weight, and the strongest edges are drawn last, on
   top. The graph takes the width of its box and, where it can, fits the layers in the box's
   height; the token labels stay in view at the bottom of the box however the graph is scrolled,
   and are never cut off. The start-token selector re-extracts the subgraph from edges reaching
   any output; it announces a chosen position with a bubbling "lmscope:position" event (detail
   {position}, null for all positions), and a page sets it with "lmscope:select" (detail
   {position}) on the fragment root. Clicking a node or edge shows precomputed details.
   The decoder graph of an encoder-decoder model (data.stack "decoder", data.source_tokens) has
   three states per layer (pre, mid, cross) and a row of encoder output nodes under the graph,
   labelled with the source tokens; cross-attention edges are dashed, in their own colour.
   Text goes into the DOM only through textContent. */
(function () {
  "use strict";
  var lms = (window.lmscope = window.lmscope || {});
  lms.views = lms.views || {};
  var KINDS = ["attention", "ffn", "residual", "cross"];
  var STATES = ["pre", "mid", "post", "cross", "source"];
  var COLORS = { attention: "31, 119, 180", ffn: "214, 39, 40", residual: "110, 118, 129", cross: "44, 160, 44" };

  function nodeId(layer, pos, state) {
    if (state === 1) { return "m" + layer + "." + pos; }
    if (state === 3) { return "c" + layer + "." + pos; }
    if (state === 4) { return "e." + pos; }
    return "x" + (layer + (state === 2 ? 1 : 0)) + "." + pos;
  }

  function edgeId(e) {
    return KINDS[e[1]][0] + e[0] + "." + e[2] + "." + e[4] + "." + STATES[e[5]];
  }

  var CHAR = 6.1, FONT = 10;  // px: the width of one character of the 10 px monospace labels
  var SLANT = Math.SQRT1_2;     // token labels too long for their column are drawn at 45 degrees

  function label(token) {
    var text = lms.visible(token);
    return text.length > 24 ? text.slice(0, 23) + "\u2026" : text;
  }

  lms.views.flow = function (body, data, root) {
    var tokens = data.tokens, first = data.layers[0], last = data.layers[1];
    var nLayers = last - first + 1, nPos = tokens.length;
    var labels = tokens.map(label);
    var source = data.stack === "decoder" && data.source_tokens ? data.source_tokens : null;
    var per = source ? 3 : 2;  // residual states per layer: pre, mid (, cross)
    var below = source ? 5 : 0;  // rows under the graph for the encoder outputs and their labels
    var incoming = {};
    data.edges.forEach(function (e) {
      var t = nodeId(e[0], e[4], e[5]);
      (incoming[t] = incoming[t] || []).push(e);
    });

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
    var svg = lms.svg("svg", { class: "lms-flow-svg" });
    var axisBox = lms.el("div", { className: "lms-flow-axis" });
    var axis = lms.svg("svg", { class: "lms-flow-axis-svg" });
    axisBox.appendChild(axis);
    wrap.appendChild(svg);
    wrap.appendChild(axisBox);
    body.appendChild(wrap);
    var panel = lms.el("div", { className: "lms-flow-details" });
    panel.appendChild(lms.el("div", { className: "lms-muted" }, "Click a node or an edge for its details."));
    body.appendChild(panel);

    /** Column width, row height and margins from the box's width and the window's height. */
    function layout() {
      var avail = wrap.clientWidth || (root && root.clientWidth) || 900;
      var left = 40, longest = 0;
      labels.forEach(function (t) { longest = Math.max(longest, t.length); });
      var fitsFlat = function (w) { return longest * CHAR + 6 <= w; };
      var colW = Math.max(22, Math.min(110, Math.floor((avail - left - 8) / Math.max(1, nPos))));
      var flat = fitsFlat(colW), right = 8;
      if (!flat) {  // slanted labels reach right of their column: keep room for the last ones
        right = 0;
        for (var pass = 0; pass < 2; pass++) {
          right = 0;
          labels.forEach(function (t, i) {
            right = Math.max(right, (i + 0.5) * colW + t.length * CHAR * SLANT + 8 - nPos * colW);
          });
          colW = Math.max(22, Math.min(110, Math.floor((avail - left - right) / Math.max(1, nPos))));
        }
        flat = fitsFlat(colW);
        if (flat) { right = 8; }
      }
      var axisH = flat ? 22 : Math.ceil(longest * CHAR * SLANT + FONT + 8);
      var room = Math.min(720, 0.75 * (window.innerHeight || 900)) - axisH - 14;  // the box's max-height
      var rowH = Math.max(9, Math.min(22, Math.floor(room / (per * nLayers + below + 0.5))));
      var r = Math.max(3, Math.min(4.5, 0.4 * rowH)), half = Math.max(3, Math.min(5, 0.4 * rowH));
      var off = Math.max(r + half + 1, Math.min(14, 0.3 * colW));  // FFN squares sit beside their column
      right = Math.max(right, off + half + 2 - colW / 2);  // the last column's squares stay inside
      return { left: left, top: 10, colW: colW, rowH: rowH, flat: flat, axisH: axisH, r: r, half: half, off: off,
        width: left + nPos * colW + right, height: 10 + (per * nLayers + below) * rowH + 10 };
    }

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
      if (d.experts && d.experts.length) {
        var r = lms.el("div", { className: "lms-flow-list" });
        r.appendChild(lms.el("span", { className: "lms-muted" }, "experts (router's choice): "));
        d.experts.forEach(function (x) {
          r.appendChild(lms.el("span", { className: "lms-flow-neuron" },
            x[0] + " " + lms.percent(x[2]) + " (router " + x[1].toFixed(2) + ")"));
        });
        panel.appendChild(r);
      }
      if (d.neurons && d.neurons.length) {
        var t = lms.el("div", { className: "lms-flow-list" });
        t.appendChild(lms.el("span", { className: "lms-muted" }, "top neurons: "));
        d.neurons.forEach(function (n, i) {
          var owner = d.neuron_experts ? d.neuron_experts[i] + " " : "";
          t.appendChild(lms.el("span", { className: "lms-flow-neuron" },
            owner + "#" + n[0] + " " + lms.percent(n[1]) + " (act " + n[2].toFixed(2) + ")"));
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
      if (kind === "e") {
        pos = parseInt(rest[1], 10);
        return "encoder output, source position " + pos + " (" + lms.visible(source[pos]) + ")";
      }
      var tok = lms.visible(tokens[pos]);
      if (kind === "c") { return "after cross-attention, layer " + layer + ", position " + pos + " (" + tok + ")"; }
      if (kind === "f") { return "FFN block, layer " + layer + ", position " + pos + " (" + tok + ")"; }
      if (kind === "m") { return "after attention, layer " + layer + ", position " + pos + " (" + tok + ")"; }
      if (layer > last) { return "output of layer " + last + ", position " + pos + " (" + tok + ")"; }
      return "input of layer " + layer + ", position " + pos + " (" + tok + ")";
    }

    var drawnWidth = -1;
    function draw() {
      var L = layout();
      drawnWidth = wrap.clientWidth;
      function xOf(pos) { return L.left + pos * L.colW + L.colW / 2; }
      function yOf(d) { return L.top + (per * nLayers - d) * L.rowH; }
      function depth(id) {
        if (id[0] === "e") { return -2; }
        var layer = parseInt(id.slice(1).split(".")[0], 10);
        return per * (layer - first) + (id[0] === "m" ? 1 : id[0] === "c" ? 2 : 0);
      }
      // Encoder outputs spread over the graph's width, under its input row.
      function xSrc(pos) { return L.left + (pos + 0.5) * (nPos * L.colW) / source.length; }
      function xNode(id) { return id[0] === "e" ? xSrc(parseInt(id.split(".")[1], 10)) : xOf(parseInt(id.split(".")[1], 10)); }
      while (svg.firstChild) { svg.removeChild(svg.firstChild); }
      while (axis.firstChild) { axis.removeChild(axis.firstChild); }
      svg.setAttribute("width", L.width);
      svg.setAttribute("height", L.height);
      axis.setAttribute("width", L.width);
      axis.setAttribute("height", L.axisH);
      var starts = select.value === "all" ? tokens.map(function (_, i) { return i; }) : [parseInt(select.value, 10)];
      var graph = extract(starts);
      summary.textContent = graph.edges.length + " edges, threshold " + data.threshold + " (" + data.mode + ")" +
        (data.error > 0 ? ", weights within \u00b1" + data.error.toPrecision(2) : "");
      for (var l = first; l <= last; l++) {
        var y = yOf(per * (l - first) + 1);
        svg.appendChild(lms.svg("text", { x: 4, y: y + 4, class: "lms-flow-layer" })).textContent = "L" + l;
      }
      tokens.forEach(function (t, i) {
        var chosen = starts.length === 1 && starts[0] === i;
        var text = lms.svg("text", L.flat
          ? { x: xOf(i), y: 14, "text-anchor": "middle" }
          : { x: 0, y: 0, transform: "translate(" + (xOf(i) - 3) + ",8) rotate(45)" });
        text.setAttribute("class", "lms-flow-token" + (chosen ? " lms-flow-chosen" : ""));
        text.setAttribute("data-pos", String(i));
        text.textContent = labels[i];
        var tip = lms.svg("title", {});
        tip.textContent = "position " + i + ": " + JSON.stringify(t);
        text.appendChild(tip);
        axis.appendChild(text);
      });
      if (source) {  // the encoder's tokens under their nodes, in the graph itself
        svg.appendChild(lms.svg("text", { x: 4, y: yOf(-2) + 4, class: "lms-flow-layer" })).textContent = "enc";
        source.forEach(function (t, i) {
          var text = lms.svg("text", { x: 0, y: 0, transform: "translate(" + (xSrc(i) - 3) + "," + (yOf(-2) + 9) +
            ") rotate(45)", class: "lms-flow-token lms-flow-source" });
          var shown = lms.visible(t);
          text.textContent = shown.length > 8 ? shown.slice(0, 7) + "\u2026" : shown;
          var tip = lms.svg("title", {});
          tip.textContent = "source position " + i + ": " + JSON.stringify(t);
          text.appendChild(tip);
          svg.appendChild(text);
        });
      }
      var r = L.r, half = L.half, off = L.off;
      var ffn = {};
      // Light edges first, so that the decisive ones lie on top of them.
      graph.edges.slice().sort(function (a, b) { return a[6] - b[6]; }).forEach(function (e) {
        var kind = KINDS[e[1]], s = nodeId(e[0], e[2], e[3]), t = nodeId(e[0], e[4], e[5]);
        var x1 = xNode(s), y1 = yOf(depth(s)), x2 = xOf(e[4]), y2 = yOf(depth(t));
        // A residual edge and a token's attention to itself both run straight up: keep them apart.
        var shift = kind === "residual" ? -2 : kind === "attention" && e[2] === e[4] ? 3 : 0;
        x1 += shift; x2 += shift;
        var w = Math.max(0, Math.min(1, e[6]));
        var style = { class: "lms-flow-edge lms-flow-" + kind, stroke: lms.rgba(COLORS[kind], 0.12 + 0.88 * w),
          "stroke-width": (0.5 + 6.5 * w).toFixed(2) };
        var line;
        if (kind === "ffn") {  // through the block's square: state -> FFN -> state
          var sq = [xOf(e[4]) + off, (y1 + y2) / 2];
          ffn["f" + e[0] + "." + e[4]] = sq;
          style.points = x1 + "," + y1 + " " + sq[0] + "," + sq[1] + " " + x2 + "," + y2;
          line = lms.svg("polyline", style);
        } else {
          style.x1 = x1; style.y1 = y1; style.x2 = x2; style.y2 = y2;
          line = lms.svg("line", style);
        }
        var tip = lms.svg("title", {});
        tip.textContent = kind + " L" + e[0] + ": " + e[2] + " \u2192 " + e[4] + "  " + e[6].toFixed(3);
        line.appendChild(tip);
        line.setAttribute("data-edge", edgeId(e));  // the web app opens the edge's details from this id
        line.setAttribute("data-weight", String(e[6]));
        line.addEventListener("click", function () {
          show(kind + " edge, layer " + e[0] + ": " + lms.visible((kind === "cross" ? source : tokens)[e[2]]) +
            " (" + e[2] + ") \u2192 " +
            lms.visible(tokens[e[4]]) + " (" + e[4] + "), weight " + e[6].toFixed(3), edgeId(e),
            e[7] ? headBars(e[7]) : null);
        });
        svg.appendChild(line);
      });
      Object.keys(graph.nodes).forEach(function (id) {
        var c = lms.svg("circle", { cx: xNode(id), cy: yOf(depth(id)), r: r,
          class: "lms-flow-node" + (id[0] === "e" ? " lms-flow-encoder" : "") });
        c.setAttribute("data-node", id);
        var tip = lms.svg("title", {});
        tip.textContent = describe(id);
        c.appendChild(tip);
        c.addEventListener("click", function () { show(describe(id), id); });
        svg.appendChild(c);
      });
      Object.keys(ffn).forEach(function (id) {
        var at = ffn[id];
        var sq = lms.svg("rect", { x: at[0] - half, y: at[1] - half, width: 2 * half, height: 2 * half,
          class: "lms-flow-ffn" });
        sq.setAttribute("data-node", id);
        var tip = lms.svg("title", {});
        tip.textContent = describe(id);
        sq.appendChild(tip);
        sq.addEventListener("click", function () { show(describe(id), id); });
        svg.appendChild(sq);
      });
      if (starts.length === 1) {  // bring the chosen output column into view when the graph is wider
        wrap.scrollLeft = Math.max(0, xOf(starts[0]) - wrap.clientWidth / 2);
      }
    }
    select.addEventListener("change", function () {
      draw();
      var value = select.value === "all" ? null : parseInt(select.value, 10);
      (root || body).dispatchEvent(new CustomEvent("lmscope:position", { bubbles: true, detail: { position: value } }));
    });
    (root || body).addEventListener("lmscope:select", function (event) {
      var p = event.detail && event.detail.position;
      var value = p === null || p === undefined ? "all" : String(p);
      if (select.querySelector("option[value=\"" + value + "\"]") && select.value !== value) {
        select.value = value;
        draw();
      }
    });
    draw();
    if (window.ResizeObserver) {  // take the new width when the box is resized (or first shown)
      var pending = false;
      new ResizeObserver(function () {
        if (pending || Math.abs(wrap.clientWidth - drawnWidth) < 4) { return; }
        pending = true;
        window.requestAnimationFrame(function () { pending = false; draw(); });
      }).observe(wrap);
    }
  };
})();
