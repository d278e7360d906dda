/* lmscope: heatmaps of interventions (causal tracing: layer x position per site; patching: exact and
   attribution side by side). Blue is positive, red negative; hovering a cell shows its row, column and
   value. Token strings reach the DOM only through textContent. */
(function () {
  "use strict";
  var lms = window.lmscope;
  var CELL = 22, LEFT = 70, TOP = 70;

  function panel(body, p, readout) {
    var rows = p.rows.length, cols = p.columns.length;
    var box = lms.el("div", { className: "lms-iv-panel" });
    box.appendChild(lms.el("div", { className: "lms-iv-name" }, p.name));
    var width = LEFT + cols * CELL + 4, height = TOP + rows * CELL + 4;
    var svg = lms.svg("svg", { width: width, height: height, viewBox: "0 0 " + width + " " + height,
      "class": "lms-iv-map" });
    var scale = p.scale || 1;
    p.columns.forEach(function (label, j) {
      var x = LEFT + j * CELL + CELL / 2;
      var t = lms.svg("text", { x: x, y: TOP - 6, transform: "rotate(-60 " + x + " " + (TOP - 6) + ")",
        "class": "lms-iv-tick" });
      t.textContent = lms.visible(label);
      svg.appendChild(t);
    });
    p.rows.forEach(function (label, i) {
      var t = lms.svg("text", { x: LEFT - 6, y: TOP + i * CELL + CELL / 2 + 4, "text-anchor": "end",
        "class": "lms-iv-tick" });
      t.textContent = label;
      svg.appendChild(t);
      p.values[i].forEach(function (value, j) {
        var v = value === null ? 0 : value / scale;
        var fill = value === null ? "transparent" :
          (v >= 0 ? lms.rgba("31, 119, 180", Math.min(1, v)) : lms.rgba("214, 39, 40", Math.min(1, -v)));
        var rect = lms.svg("rect", { x: LEFT + j * CELL, y: TOP + i * CELL, width: CELL - 1, height: CELL - 1,
          fill: fill, "class": "lms-iv-cell" });
        var text = p.name + ": " + label + " / " + lms.visible(p.columns[j]) + ": " +
          (value === null ? "n/a" : value.toPrecision(4));
        var tip = lms.svg("title", {});
        tip.textContent = text;
        rect.appendChild(tip);
        rect.addEventListener("mouseenter", function () { readout.textContent = text; });
        svg.appendChild(rect);
      });
    });
    box.appendChild(svg);
    body.appendChild(box);
  }

  lms.views.interventions = function (body, data) {
    body.appendChild(lms.el("div", { className: "lms-title" }, data.title));
    (data.notes || []).forEach(function (note) {
      body.appendChild(lms.el("div", { className: "lms-muted" }, note));
    });
    var readout = lms.el("div", { className: "lms-muted lms-iv-readout" }, "hover a cell");
    body.appendChild(readout);
    var row = lms.el("div", { className: "lms-iv-row" });
    data.panels.forEach(function (p) { panel(row, p, readout); });
    body.appendChild(row);
  };
})();
