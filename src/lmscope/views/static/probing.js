/* lmscope probing view: accuracy (solid), control accuracy (dashed) and selectivity by layer for hidden
   states and FFN activations, with ±std whiskers, then the table. Text goes in via textContent only. */
(function () {
  "use strict";
  var lms = window.lmscope;
  var COLORS = { hidden: "31, 119, 180", FFN: "214, 39, 40" };
  var W = 360, H = 200, PAD = { left: 40, right: 10, top: 20, bottom: 28 };

  function pct(x) { return (100 * x).toFixed(1); }

  function chart(data, title, keys, lo, hi) {
    var svg = lms.svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, class: "lms-probing-chart" });
    var n = Math.max(data.layers.length - 1, 1);
    var x = function (label) {
      return PAD.left + (data.layers.indexOf(label) / n) * (W - PAD.left - PAD.right);
    };
    var y = function (v) { return H - PAD.bottom - ((v - lo) / (hi - lo)) * (H - PAD.top - PAD.bottom); };
    var heading = lms.svg("text", { x: PAD.left, y: 12 });
    heading.textContent = title;
    svg.appendChild(heading);
    [lo, (lo + hi) / 2, hi].forEach(function (v) {
      svg.appendChild(lms.svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v), class: "lms-axis" }));
      var t = lms.svg("text", { x: PAD.left - 4, y: y(v) + 3, "text-anchor": "end" });
      t.textContent = pct(v) + "%";
      svg.appendChild(t);
    });
    data.layers.forEach(function (label) {
      var t = lms.svg("text", { x: x(label), y: H - PAD.bottom + 14, "text-anchor": "middle" });
      t.textContent = label;
      svg.appendChild(t);
    });
    data.series.forEach(function (series) {
      var rgb = COLORS[series.name] || "85, 85, 85";
      keys.forEach(function (key, k) {
        var pts = series.points.map(function (p) { return x(p.layer) + "," + y(p[key]); }).join(" ");
        var line = lms.svg("polyline", { points: pts, fill: "none", stroke: lms.rgba(rgb, 1), "stroke-width": 1.5 });
        if (k > 0) { line.setAttribute("stroke-dasharray", "4 3"); }
        line.setAttribute("data-series", series.name + ":" + key);
        svg.appendChild(line);
        series.points.forEach(function (p) {
          var std = p[key + "_std"] || 0;
          svg.appendChild(lms.svg("line", { x1: x(p.layer), x2: x(p.layer), y1: y(p[key] - std), y2: y(p[key] + std),
                                            stroke: lms.rgba(rgb, 0.6) }));
          var dot = lms.svg("circle", { cx: x(p.layer), cy: y(p[key]), r: 2.5, fill: lms.rgba(rgb, 1) });
          var tip = lms.svg("title", {});
          tip.textContent = series.name + " layer " + p.layer + " " + key + ": " + pct(p[key]) + " ± " + pct(std) + "%";
          dot.appendChild(tip);
          svg.appendChild(dot);
        });
      });
    });
    return svg;
  }

  function range(data, keys) {
    var lo = Infinity, hi = -Infinity;
    data.series.forEach(function (s) {
      s.points.forEach(function (p) {
        keys.forEach(function (k) {
          var std = p[k + "_std"] || 0;
          lo = Math.min(lo, p[k] - std); hi = Math.max(hi, p[k] + std);
        });
      });
    });
    if (!(hi > lo)) { hi = lo + 0.01; }
    return [Math.floor(lo * 20) / 20, Math.ceil(hi * 20) / 20];
  }

  function table(data) {
    var t = lms.el("table", { className: "lms-probing-table" });
    var head = lms.el("tr");
    head.appendChild(lms.el("th", {}, "layer"));
    data.series.forEach(function (s) {
      ["acc", "control", "selectivity"].forEach(function (c) { head.appendChild(lms.el("th", {}, s.name + " " + c)); });
    });
    t.appendChild(head);
    data.layers.forEach(function (label) {
      var tr = lms.el("tr");
      tr.appendChild(lms.el("th", { scope: "row" }, label));
      data.series.forEach(function (s) {
        var p = s.points.filter(function (q) { return q.layer === label; })[0];
        [["accuracy", "accuracy_std"], ["control", "control_std"], ["selectivity", "selectivity_std"]].forEach(function (c) {
          tr.appendChild(lms.el("td", {}, p ? pct(p[c[0]]) + " ± " + pct(p[c[1]]) : ""));
        });
      });
      t.appendChild(tr);
    });
    return t;
  }

  lms.views.probing = function (body, data) {
    body.appendChild(lms.el("div", { className: "lms-title" }, data.title));
    var legend = lms.el("div", { className: "lms-probing-legend lms-muted" });
    data.series.forEach(function (s) {
      var item = lms.el("span", {}, "\u2014 " + s.name);
      item.style.color = lms.rgba(COLORS[s.name] || "85, 85, 85", 1);
      legend.appendChild(item);
    });
    legend.appendChild(lms.el("span", {}, "dashed: control task; whiskers: \u00b1std over " + data.seeds +
                                        " seeds; majority label " + pct(data.majority) + "%"));
    body.appendChild(legend);
    var charts = lms.el("div", { className: "lms-probing-charts" });
    var acc = range(data, ["accuracy", "control"]);
    charts.appendChild(chart(data, "accuracy (dashed: control)", ["accuracy", "control"], acc[0], acc[1]));
    var sel = range(data, ["selectivity"]);
    charts.appendChild(chart(data, "selectivity", ["selectivity"], sel[0], sel[1]));
    body.appendChild(charts);
    body.appendChild(table(data));
  };
})();
