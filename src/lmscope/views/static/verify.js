/* lmscope: the fidelity report of `lmscope verify`: one row per check, its status coloured.
   Text reaches the DOM only through textContent. */
(function () {
  "use strict";
  var lms = window.lmscope;

  lms.views.verify = function (body, data) {
    body.appendChild(lms.el("div", { className: "lms-title" }, data.title));
    body.appendChild(lms.el("div", { className: "lms-muted" }, "layout: " + data.layout));
    var tbl = lms.el("table", { className: "lms-verify" });
    var head = lms.el("tr");
    data.header.forEach(function (name) { head.appendChild(lms.el("th", {}, name)); });
    tbl.appendChild(head);
    data.rows.forEach(function (row) {
      var tr = lms.el("tr", { className: "lms-verify-" + row[4].replace("/", "") });
      row.forEach(function (cell) { tr.appendChild(lms.el("td", {}, cell)); });
      tbl.appendChild(tr);
    });
    body.appendChild(tbl);
    body.appendChild(lms.el("div", { className: data.passed ? "lms-verify-ok" : "lms-verify-bad" }, data.verdict));
  };
})();
