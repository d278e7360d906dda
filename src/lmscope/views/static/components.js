/* lmscope component views: contribution maps beside attention maps, head shares, top neurons,
   promoted/suppressed tokens. Text goes into the DOM only through textContent. */
(function () {
  "use strict";
  var lms = (window.lmscope = window.lmscope || {});
  lms.views = lms.views || {};

  function title(body, text) { body.appendChild(lms.el("div", { className: "lms-title" }, text)); }

  function bars(body, labels, values, fmt) {
    var max = Math.max.apply(null, values.map(Math.abs).concat([1e-12]));
    labels.forEach(function (label, i) {
      var row = lms.el("div", { className: "lms-flow-head" });
      row.appendChild(lms.el("span", null, label));
      var bar = lms.el("span", { className: "lms-flow-bar" });
      bar.style.width = Math.round(160 * Math.abs(values[i]) / max) + "px";
      row.appendChild(bar);
      row.appendChild(lms.el("small", null, fmt(values[i], i)));
      body.appendChild(row);
    });
  }

  function heatmap(matrix, tokens, rgb, label) {
    var n = tokens.length, cell = Math.max(6, Math.min(22, Math.floor(360 / Math.max(1, n))));
    var max = 1e-12;
    matrix.forEach(function (row) { row.forEach(function (v) { if (v > max) { max = v; } }); });
    var box = lms.el("div", { className: "lms-map" });
    box.appendChild(lms.el("div", { className: "lms-muted" }, label));
    var svg = lms.svg("svg", { width: n * cell, height: n * cell, class: "lms-map-svg" });
    matrix.forEach(function (row, q) {
      row.forEach(function (v, k) {
        if (k > q && v === 0) { return; }
        var rect = lms.svg("rect", { x: k * cell, y: q * cell, width: cell, height: cell,
          fill: lms.rgba(rgb, v / max) });
        var tip = lms.svg("title", {});
        tip.textContent = lms.visible(tokens[k]) + " \u2192 " + lms.visible(tokens[q]) + ": " + v.toFixed(4);
        rect.appendChild(tip);
        svg.appendChild(rect);
      });
    });
    box.appendChild(svg);
    return box;
  }

  lms.views.contribution_map = function (body, data) {
    title(body, "Layer " + data.layer + ": attention map and contribution map per head");
    var controls = lms.el("div", { className: "lms-controls" });
    var select = lms.el("select", { className: "lms-map-head" });
    data.attention.forEach(function (_, h) { select.appendChild(lms.el("option", { value: String(h) }, "head " + h)); });
    controls.appendChild(select);
    body.appendChild(controls);
    var maps = lms.el("div", { className: "lms-maps" });
    body.appendChild(maps);
    function draw() {
      while (maps.firstChild) { maps.removeChild(maps.firstChild); }
      var h = parseInt(select.value, 10);
      maps.appendChild(heatmap(data.attention[h], data.tokens, "31, 119, 180", "attention"));
      maps.appendChild(heatmap(data.contributions[h], data.tokens, "214, 39, 40", "contribution"));
    }
    select.addEventListener("change", draw);
    draw();
  };

  lms.views.head_shares = function (body, data) {
    var where = data.source === null ? "block output" : "edge from " + lms.visible(data.tokens[data.source]);
    title(body, "Head shares, layer " + data.layer + ", position " + data.position + " (" +
      lms.visible(data.tokens[data.position]) + "), " + where);
    bars(body, data.shares.map(function (_, h) { return "head " + h; }), data.shares,
      function (v) { return lms.percent(v); });
  };

  lms.views.top_neurons = function (body, data) {
    title(body, "Top FFN neurons, layer " + data.layer + ", position " + data.position + " (" +
      lms.visible(data.tokens[data.position]) + ")");
    bars(body, data.neurons.map(function (n) { return "#" + n; }), data.contributions,
      function (v, i) { return lms.percent(v) + " (act " + data.activations[i].toFixed(2) + ")"; });
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
