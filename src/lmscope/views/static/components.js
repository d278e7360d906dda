/* lmscope component views: contribution maps beside attention maps, head shares, top neurons,
   promoted/suppressed tokens. Text goes into the DOM only through textContent. */
(function () {
  "use strict";
  var lms = (window.lmscope = window.lmscope || {});
  lms.views = lms.views || {};

  function title(body, text) { body.appendChild(lms.el("div", { className: "lms-title" }, text)); }

  /** One bar per value; attrs(i) gives a row's data attributes (pages use them to act on a row). */
  function bars(body, labels, values, fmt, attrs) {
    var max = Math.max.apply(null, values.map(Math.abs).concat([1e-12]));
    labels.forEach(function (label, i) {
      var row = lms.el("div", attrs ? attrs(i) : null);
      row.className = "lms-flow-head" + (Math.abs(values[i]) === max ? " lms-top" : "");
      row.appendChild(lms.el("span", null, label));
      var bar = lms.el("span", { className: "lms-flow-bar" });
      bar.style.width = Math.round(160 * Math.abs(values[i]) / max) + "px";
      row.appendChild(bar);
      row.appendChild(lms.el("small", null, fmt(values[i], i)));
      body.appendChild(row);
    });
  }

  var gradients = 0;  // unique ids for the legends' gradients on one page

  /** A token label for an axis: its position and its text (long tokens shortened; the tooltip has all). */
  function axisLabel(tokens, i) {
    var text = lms.visible(tokens[i]);
    return i + " " + (text.length > 16 ? text.slice(0, 15) + "\u2026" : text);
  }

  /** A map [pos_q, pos_k] as an SVG heatmap with token labels on both axes (rows: the query, the
      target position; columns: the key, the source position), a colour legend from 0 to the map's
      maximum, and an outlined cell at mark = {q, k} (the clicked edge) if given. */
  function heatmap(matrix, tokens, rgb, label, mark) {
    var n = tokens.length, cell = Math.max(6, Math.min(22, Math.floor(360 / Math.max(1, n))));
    var font = Math.max(7, Math.min(11, cell - 1)), charW = 0.62 * font;
    var every = Math.max(1, Math.ceil((font + 1) / cell));  // label every k-th token so labels never overlap
    var longest = 0;
    tokens.forEach(function (_, i) { longest = Math.max(longest, axisLabel(tokens, i).length); });
    var left = Math.ceil(longest * charW) + 22, top = 4;
    var bottom = Math.ceil(longest * charW * Math.SQRT1_2 + font) + 20, legendH = 34;
    var width = Math.max(left + n * cell + 8, left + 200), height = top + n * cell + bottom + legendH;
    var max = 1e-12;
    matrix.forEach(function (row) { row.forEach(function (v) { if (v > max) { max = v; } }); });
    var box = lms.el("div", { className: "lms-map" });
    box.appendChild(lms.el("div", { className: "lms-muted" }, label));
    var svg = lms.svg("svg", { width: width, height: height, class: "lms-map-svg" });
    var grid = lms.svg("g", { transform: "translate(" + left + "," + top + ")" });
    svg.appendChild(grid);
    grid.appendChild(lms.svg("rect", { x: 0, y: 0, width: n * cell, height: n * cell, class: "lms-map-frame" }));
    matrix.forEach(function (row, q) {
      row.forEach(function (v, k) {
        if (k > q && v === 0) { return; }
        var rect = lms.svg("rect", { x: k * cell, y: q * cell, width: cell, height: cell,
          fill: lms.rgba(rgb, v / max) });
        var tip = lms.svg("title", {});
        tip.textContent = "from " + k + " " + lms.visible(tokens[k]) + " to " + q + " " + lms.visible(tokens[q]) +
          ": " + v.toFixed(4);
        rect.appendChild(tip);
        grid.appendChild(rect);
      });
    });
    if (mark && mark.q >= 0 && mark.q < n && mark.k >= 0 && mark.k < n) {
      grid.appendChild(lms.svg("rect", { x: mark.k * cell, y: mark.q * cell, width: cell, height: cell,
        class: "lms-map-mark" }));
    }
    tokens.forEach(function (token, i) {
      if (i % every !== 0 && i !== n - 1) { return; }
      var tip = lms.svg("title", {});
      tip.textContent = "position " + i + ": " + JSON.stringify(token);
      var row = lms.svg("text", { x: -4, y: i * cell + cell / 2, class: "lms-map-label lms-map-row",
        "text-anchor": "end", "dominant-baseline": "central", "font-size": font });
      row.textContent = axisLabel(tokens, i);
      row.appendChild(tip);
      grid.appendChild(row);
      var col = lms.svg("text", { x: 0, y: 0, class: "lms-map-label lms-map-col", "text-anchor": "end",
        "font-size": font, transform: "translate(" + (i * cell + cell / 2 + font / 3) + "," + (n * cell + 4) + ") rotate(-45)" });
      col.textContent = axisLabel(tokens, i);
      col.appendChild(tip.cloneNode(true));
      grid.appendChild(col);
    });
    var rowTitle = lms.svg("text", { x: 0, y: 0, class: "lms-map-axis", "text-anchor": "middle",
      transform: "translate(10," + (top + n * cell / 2) + ") rotate(-90)" });
    rowTitle.textContent = "to (query)";
    svg.appendChild(rowTitle);
    var colTitle = lms.svg("text", { x: left + n * cell / 2, y: top + n * cell + bottom - 4, class: "lms-map-axis",
      "text-anchor": "middle" });
    colTitle.textContent = "from (key)";
    svg.appendChild(colTitle);
    // The colour legend: a bar from 0 (transparent) to the map's largest value.
    var id = "lms-map-gradient-" + (++gradients) + "-" + Math.random().toString(36).slice(2, 8);
    var defs = lms.svg("defs", {}), gradient = lms.svg("linearGradient", { id: id });
    gradient.appendChild(lms.svg("stop", { offset: "0", "stop-color": "rgb(" + rgb + ")", "stop-opacity": "0" }));
    gradient.appendChild(lms.svg("stop", { offset: "1", "stop-color": "rgb(" + rgb + ")", "stop-opacity": "1" }));
    defs.appendChild(gradient);
    svg.appendChild(defs);
    var legend = lms.svg("g", { class: "lms-map-legend", transform: "translate(" + left + "," + (top + n * cell + bottom + 4) + ")" });
    legend.appendChild(lms.svg("rect", { x: 0, y: 0, width: 120, height: 10, fill: "url(#" + id + ")", class: "lms-map-scale" }));
    [[0, "0", "start"], [120, max.toPrecision(3), "end"]].forEach(function (tick) {
      var t = lms.svg("text", { x: tick[0], y: 24, class: "lms-map-axis", "text-anchor": tick[2] });
      t.textContent = tick[1];
      legend.appendChild(t);
    });
    var name = lms.svg("text", { x: 130, y: 9, class: "lms-map-axis" });
    name.textContent = label;
    legend.appendChild(name);
    svg.appendChild(legend);
    box.appendChild(svg);
    return box;
  }

  /* Attention map and contribution map of one head at a time. The page can choose the head and
     outline an edge's cell by dispatching "lmscope:select" on the fragment root with detail
     {head, source, target} (the web app does, for the head that dominates a clicked edge). */
  lms.views.contribution_map = function (body, data, root) {
    title(body, "Layer " + data.layer + ": attention map and contribution map per head");
    var controls = lms.el("div", { className: "lms-controls" });
    var select = lms.el("select", { className: "lms-map-head" });
    data.attention.forEach(function (_, h) { select.appendChild(lms.el("option", { value: String(h) }, "head " + h)); });
    controls.appendChild(select);
    var note = lms.el("span", { className: "lms-muted lms-map-note" });
    controls.appendChild(note);
    body.appendChild(controls);
    var maps = lms.el("div", { className: "lms-maps" });
    body.appendChild(maps);
    var mark = null;
    function draw() {
      while (maps.firstChild) { maps.removeChild(maps.firstChild); }
      var h = parseInt(select.value, 10);
      maps.appendChild(heatmap(data.attention[h], data.tokens, "31, 119, 180", "attention weight", mark));
      maps.appendChild(heatmap(data.contributions[h], data.tokens, "214, 39, 40", "contribution", mark));
      note.textContent = mark ? "outlined: from " + mark.k + " " + lms.visible(data.tokens[mark.k]) + " to " +
        mark.q + " " + lms.visible(data.tokens[mark.q]) : "";
    }
    select.addEventListener("change", draw);
    (root || body).addEventListener("lmscope:select", function (event) {
      var d = event.detail || {};
      if (d.head !== undefined && d.head !== null && d.head >= 0 && d.head < data.attention.length) {
        select.value = String(d.head);
      }
      mark = d.target !== undefined && d.target !== null && d.source !== undefined && d.source !== null
        ? { q: d.target, k: d.source } : null;
      draw();
    });
    draw();
  };

  lms.views.head_shares = function (body, data) {
    var where = data.source === null ? "block output" : "edge from " + lms.visible(data.tokens[data.source]);
    title(body, "Head shares, layer " + data.layer + ", position " + data.position + " (" +
      lms.visible(data.tokens[data.position]) + "), " + where);
    bars(body, data.shares.map(function (_, h) { return "head " + h; }), data.shares,
      function (v) { return lms.percent(v); },
      function (h) { return { "data-head": String(h), "data-share": String(data.shares[h]) }; });
  };

  lms.views.top_neurons = function (body, data) {
    title(body, "Top FFN neurons, layer " + data.layer + ", position " + data.position + " (" +
      lms.visible(data.tokens[data.position]) + ")");
    bars(body, data.neurons.map(function (n) { return "#" + n; }), data.contributions,
      function (v, i) { return lms.percent(v) + " (act " + data.activations[i].toFixed(2) + ")"; },
      function (i) { return { "data-neuron": String(data.neurons[i]) }; });
  };

  lms.views.promoted = function (body, data) {
    title(body, "Promoted and suppressed by " + data.component + ", layer " + data.layer + ", position " +
      data.position + " (" + lms.visible(data.tokens[data.position]) + ")");
    [["promoted", data.promoted, data.promoted_logits], ["suppressed", data.suppressed, data.suppressed_logits]]
      .forEach(function (group) {
        var line = lms.el("div", { className: "lms-flow-list lms-" + group[0] });
        line.appendChild(lms.el("span", { className: "lms-muted" }, group[0] + ": "));
        group[1].forEach(function (tok, i) {
          line.appendChild(lms.token(tok));
          line.appendChild(lms.el("small", null, group[2][i].toFixed(2) + " "));
        });
        body.appendChild(line);
      });
  };
})();
