/* lmscope: faithfulness curves. One line chart per quantity (the target's logit, its probability)
   over k: the method's top-k removed, k random removed, and for tokens only the top-k kept, with the
   intact run dashed. Hovering a point shows its value. Token strings reach the DOM only through
   textContent (lms.tokenRow / lms.el). */
(function () {
  "use strict";
  var lms = window.lmscope;
  var W = 360, H = 220, L = 54, R = 12, T = 12, B = 34;

  function chart(body, c, ks, readout) {
    var box = lms.el("div", { className: "lms-fa-panel" });
    box.appendChild(lms.el("div", { className: "lms-fa-name" }, c.name));
    var values = [c.base];
    c.series.forEach(function (s) { values = values.concat(s.values); });
    var lo = Math.min.apply(null, values), hi = Math.max.apply(null, values);
    if (hi - lo < 1e-9) { hi = lo + 1; }
    var k0 = Math.min.apply(null, ks), k1 = Math.max.apply(null, ks);
    if (k1 === k0) { k1 = k0 + 1; }
    function x(k) { return L + (k - k0) / (k1 - k0) * (W - L - R); }
    function y(v) { return T + (hi - v) / (hi - lo) * (H - T - B); }
    var svg = lms.svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, "class": "lms-fa-chart" });
    svg.appendChild(lms.svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, "class": "lms-fa-axis" }));
    svg.appendChild(lms.svg("line", { x1: L, y1: T, x2: L, y2: H - B, "class": "lms-fa-axis" }));
    [lo, hi].forEach(function (v) {
      var t = lms.svg("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" });
      t.textContent = v.toPrecision(3);
      svg.appendChild(t);
    });
    ks.forEach(function (k) {
      var t = lms.svg("text", { x: x(k), y: H - B + 12, "text-anchor": "middle" });
      t.textContent = String(k);
      svg.appendChild(t);
    });
    var label = lms.svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" });
    label.textContent = "k";
    svg.appendChild(label);
    svg.appendChild(lms.svg("line", { x1: L, y1: y(c.base), x2: W - R, y2: y(c.base), "class": "lms-fa-base" }));
    c.series.forEach(function (s) {
      var points = s.values.map(function (v, i) { return x(ks[i]) + "," + y(v); }).join(" ");
      svg.appendChild(lms.svg("polyline", { points: points, "class": "lms-fa-line lms-fa-" + s.style }));
      s.values.forEach(function (v, i) {
        var dot = lms.svg("circle", { cx: x(ks[i]), cy: y(v), r: 3, "class": "lms-fa-dot lms-fa-" + s.style });
        var text = s.name + ", k=" + ks[i] + ": " + v.toPrecision(4);
        var tip = lms.svg("title", {});
        tip.textContent = text;
        dot.appendChild(tip);
        dot.addEventListener("mouseenter", function () { readout.textContent = text; });
        svg.appendChild(dot);
      });
    });
    box.appendChild(svg);
    body.appendChild(box);
  }

  lms.views.faithfulness = function (body, data) {
    body.appendChild(lms.el("div", { className: "lms-title" }, data.title));
    (data.notes || []).forEach(function (note) {
      body.appendChild(lms.el("div", { className: "lms-muted" }, note));
    });
    var key = lms.el("div", { className: "lms-muted" });
    data.charts[0].series.forEach(function (s) {
      key.appendChild(lms.el("span", { className: "lms-fa-key lms-fa-" + s.style }));
      key.appendChild(document.createTextNode(s.name));
    });
    body.appendChild(key);
    if (data.tokens) {
      var top = Math.max.apply(null, data.scores.map(Math.abs)) || 1;
      var row = lms.el("div", { className: "lms-fa-tokens" });
      data.tokens.forEach(function (token, i) {
        var span = lms.token(token);
        var v = data.scores[i] / top;
        span.style.background = v >= 0 ? lms.rgba("214, 39, 40", Math.min(1, v)) : lms.rgba("31, 119, 180", -v);
        span.title = "attribution " + data.scores[i].toPrecision(4);
        row.appendChild(span);
      });
      body.appendChild(row);
    }
    var readout = lms.el("div", { className: "lms-muted" }, "hover a point");
    body.appendChild(readout);
    var charts = lms.el("div", { className: "lms-fa-row" });
    data.charts.forEach(function (c) { chart(charts, c, data.ks, readout); });
    body.appendChild(charts);
  };
})();
