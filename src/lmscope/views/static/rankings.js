/* lmscope: rankings heatmap (Alammar 2021, "Finding the words to say"). The input above; one row
   per layer, one column per ranked token; each cell prints the rank, its colour on a log scale
   (rank 1 darkest). Token strings reach the DOM only through textContent. */
(function () {
  "use strict";
  var lms = window.lmscope;
  if (lms.views.rankings) { return; }
  var el = lms.el;

  /** 1 at rank 1, 0 at the bottom of the vocabulary, linear in log(rank). */
  function strength(rank, vocab) {
    return Math.max(0, 1 - Math.log(Math.max(1, rank)) / Math.log(Math.max(2, vocab)));
  }

  lms.views.rankings = function (body, data, root) {
    var cool = lms.cssVar(root, "--lms-cool", "31, 119, 180");
    body.appendChild(el("div", { className: "lms-title" }, data.title));
    data.notes.forEach(function (note) { body.appendChild(el("div", { className: "lms-muted" }, note)); });
    body.appendChild(lms.tokenRow(data.input, { nInput: data.n_input, mark: data.mark }));

    var table = el("table", { className: "lms-rk-table" });
    var head = el("tr");
    head.appendChild(el("th", { className: "lms-rk-layer" }, "layer"));
    data.columns.forEach(function (column, j) {
      var th = el("th", { className: "lms-rk-col" });
      var chip = lms.token(column);
      chip.title = data.column_titles[j];
      th.appendChild(chip);
      head.appendChild(th);
    });
    table.appendChild(el("thead")).appendChild(head);
    var rows = table.appendChild(el("tbody"));
    data.layers.forEach(function (layer, i) {
      var tr = el("tr");
      tr.appendChild(el("th", { className: "lms-rk-layer" }, String(layer)));
      data.ranks[i].forEach(function (rank, j) {
        var s = strength(rank, data.vocab);
        var td = el("td", { className: "lms-rk-cell" + (s > 0.55 ? " lms-rk-dark" : "") }, String(rank));
        td.style.backgroundColor = lms.rgba(cool, s);
        td.title = "layer " + layer + ", " + data.column_titles[j] + ": rank " + rank + " of " + data.vocab;
        tr.appendChild(td);
      });
      rows.appendChild(tr);
    });
    body.appendChild(el("div", { className: "lms-rk-scroll" })).appendChild(table);
    body.appendChild(el("div", { className: "lms-legend" },
      "rank 1 = top prediction (strongest colour) \u2026 " + data.vocab + " = bottom (none); colour on a log scale"));
  };
})();
