/* lmscope: an intervention's effect on a prediction: the summary, then the top tokens before and
   after side by side (tokens new to the top list outlined). Token strings reach the DOM only
   through textContent (lms.token). */
(function () {
  "use strict";
  var lms = window.lmscope;

  function column(body, name, rows, cls) {
    var col = lms.el("div", { className: "lms-ef-col " + cls });
    col.appendChild(lms.el("div", { className: "lms-title" }, name));
    var table = lms.el("table");
    rows.forEach(function (row, i) {
      var tr = lms.el("tr", { className: row[2] ? "lms-ef-new" : "" });
      tr.appendChild(lms.el("td", { className: "lms-muted" }, String(i + 1)));
      var cell = lms.el("td");
      cell.appendChild(lms.token(row[0]));
      tr.appendChild(cell);
      tr.appendChild(lms.el("td", null, lms.percent(row[1])));
      var bar = lms.el("td");
      bar.appendChild(lms.el("span", { className: "lms-ef-bar", style: { width: Math.round(80 * row[1]) + "px" } }));
      tr.appendChild(bar);
      table.appendChild(tr);
    });
    col.appendChild(table);
    body.appendChild(col);
  }

  lms.views.effect = function (body, data) {
    body.appendChild(lms.el("div", { className: "lms-title" }, data.title));
    var trend = data.logit_diff < 0 ? " lms-ef-down" : (data.logit_diff > 0 ? " lms-ef-up" : "");
    body.appendChild(lms.el("div", { className: "lms-ef-summary" + trend }, data.summary));
    var cols = lms.el("div", { className: "lms-ef-cols" });
    column(cols, "top tokens before", data.before, "lms-ef-before");
    column(cols, "top tokens after", data.after, "lms-ef-after");
    body.appendChild(cols);
  };
})();
