/* lmscope: logit lens (nostalgebraist 2020; Ecco's layer_predictions). One row per layer; each
   top token is a box with a bar as wide as its probability. Text only through textContent. */
(function () {
  "use strict";
  var lms = window.lmscope;
  if (lms.views.lens) { return; }
  var el = lms.el;

  lms.views.lens = function (body, data, root) {
    var accent = lms.cssVar(root, "--lms-cool", "31, 119, 180");
    body.appendChild(el("div", { className: "lms-title" }, data.title));
    body.appendChild(lms.tokenRow(data.input, { nInput: data.n_input, mark: [data.state_position] }));
    var grid = el("div", { className: "lms-lens-grid" });
    data.layers.forEach(function (layer, i) {
      var row = el("div", { className: "lms-lens-row", "data-layer": String(layer) });
      row.appendChild(el("div", { className: "lms-lens-layer" }, "layer " + layer));
      data.tokens[i].forEach(function (token, j) {
        var p = data.probs[i][j];
        var box = el("div", { className: "lms-lens-box" });
        box.style.backgroundColor = lms.rgba(accent, 0.08 + 0.3 * p);
        box.title = JSON.stringify(token) + " (id " + data.ids[i][j] + "): " + lms.percent(p) + " after layer " + layer;
        box.appendChild(lms.token(token));
        var bar = el("div", { className: "lms-lens-bar" });
        var fill = el("div", { className: "lms-lens-fill" });
        fill.style.width = (100 * Math.max(0, Math.min(1, p))).toFixed(2) + "%";
        fill.style.backgroundColor = lms.rgba(accent, 0.9);
        bar.appendChild(fill);
        box.appendChild(bar);
        box.appendChild(el("div", { className: "lms-lens-p" }, lms.percent(p)));
        row.appendChild(box);
      });
      grid.appendChild(row);
    });
    body.appendChild(grid);
  };
})();
