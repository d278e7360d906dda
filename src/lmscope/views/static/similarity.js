/* lmscope: layer-pair similarity heatmap. Cells are colored by value (clipped to [0, 1]); hovering a
   cell shows its layers and value. Text reaches the DOM only through textContent. */
(function () {
  "use strict";
  var lms = window.lmscope;
  var CELL = 22, LEFT = 44, TOP = 40;

  lms.views.similarity = function (body, data) {
    body.appendChild(lms.el("div", { className: "lms-title" }, data.title));
    (data.notes || []).forEach(function (note) {
      body.appendChild(lms.el("div", { className: "lms-muted lms-sim-note" }, note));
    });
    var readout = lms.el("div", { className: "lms-muted lms-sim-readout" }, "hover a cell");
    body.appendChild(readout);
    var rows = data.layers_a.length, cols = data.layers_b.length;
    var width = LEFT + cols * CELL + 4, height = TOP + rows * CELL + 4;
    var svg = lms.svg("svg", { width: width, height: height, viewBox: "0 0 " + width + " " + height,
      "class": "lms-sim-map" });
    var yLabel = lms.svg("text", { x: 2, y: 12, "class": "lms-sim-axis" });
    yLabel.textContent = data.site_a + " \u2193  " + data.site_b + " \u2192";
    svg.appendChild(yLabel);
    data.layers_b.forEach(function (layer, j) {
      var t = lms.svg("text", { x: LEFT + j * CELL + CELL / 2, y: TOP - 6, "text-anchor": "middle",
        "class": "lms-sim-tick" });
      t.textContent = String(layer);
      svg.appendChild(t);
    });
    data.layers_a.forEach(function (layer, i) {
      var t = lms.svg("text", { x: LEFT - 6, y: TOP + i * CELL + CELL / 2 + 4, "text-anchor": "end",
        "class": "lms-sim-tick" });
      t.textContent = String(layer);
      svg.appendChild(t);
      data.matrix[i].forEach(function (value, j) {
        var v = value === null ? 0 : Math.max(0, Math.min(1, value));
        var rect = lms.svg("rect", { x: LEFT + j * CELL, y: TOP + i * CELL, width: CELL - 1, height: CELL - 1,
          fill: lms.rgba("31, 119, 180", 0.05 + 0.95 * v), "class": "lms-sim-cell",
          "data-row": String(i), "data-col": String(j) });
        var label = data.site_a + " L" + layer + " vs " + data.site_b + " L" + data.layers_b[j] + ": " +
          (value === null ? "n/a" : value.toFixed(3));
        var tip = lms.svg("title", {});
        tip.textContent = label;
        rect.appendChild(tip);
        rect.addEventListener("mouseenter", function () { readout.textContent = label; });
        svg.appendChild(rect);
      });
    });
    body.appendChild(svg);
  };
})();
