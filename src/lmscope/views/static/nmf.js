/* lmscope: factor explorer (NMF/PCA/ICA factors, or top neurons). One row per factor with a
   sparkline over the selected text; hovering a row highlights tokens by that factor, otherwise each
   token takes its strongest factor's color. Text reaches the DOM only through textContent. */
(function () {
  "use strict";
  var lms = window.lmscope;
  var PALETTE = ["31, 119, 180", "255, 127, 14", "44, 160, 44", "214, 39, 40", "148, 103, 189",
    "140, 86, 75", "227, 119, 194", "127, 127, 127", "188, 189, 34", "23, 190, 207"];
  var W = 220, H = 26;

  function color(i) { return PALETTE[i % PALETTE.length]; }

  function peak(values) {
    var m = 0;
    values.forEach(function (v) { if (v > m) { m = v; } });
    return m;
  }

  function sparkline(values, rgb) {
    var svg = lms.svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, "class": "lms-nmf-spark" });
    var lo = Math.min(0, Math.min.apply(null, values)), hi = Math.max(0, Math.max.apply(null, values));
    var span = hi - lo || 1, n = values.length, step = n > 1 ? (W - 2) / (n - 1) : 0;
    var points = values.map(function (v, i) {
      return (1 + i * step).toFixed(1) + "," + (H - 2 - ((v - lo) / span) * (H - 4)).toFixed(1);
    });
    svg.appendChild(lms.svg("polyline", { points: points.join(" "), fill: "none", stroke: "rgb(" + rgb + ")",
      "stroke-width": 1.5 }));
    return svg;
  }

  lms.views.nmf = function (body, data) {
    body.appendChild(lms.el("div", { className: "lms-title" }, data.title));
    body.appendChild(lms.el("div", { className: "lms-muted" }, data.subtitle));
    (data.notes || []).forEach(function (note) {
      body.appendChild(lms.el("div", { className: "lms-muted lms-nmf-note" }, note));
    });
    var state = { text: 0, focus: null, pinned: null };
    var controls = lms.el("div", { className: "lms-controls" });
    body.appendChild(controls);
    if (data.texts.length > 1) {
      var select = lms.el("select", { "class": "lms-nmf-select", "aria-label": "text" });
      data.texts.forEach(function (t, i) { select.appendChild(lms.el("option", { value: String(i) }, "text " + i)); });
      select.addEventListener("change", function () { state.text = Number(select.value); draw(); });
      controls.appendChild(lms.el("span", { className: "lms-muted" },
        "showing " + data.texts.length + " of " + data.n_texts + " texts"));
      controls.appendChild(select);
    }
    var rowsBox = lms.el("div", { className: "lms-nmf-rows" });
    var tokensBox = lms.el("div", { className: "lms-nmf-tokens" });
    body.appendChild(rowsBox);
    body.appendChild(tokensBox);

    function active() { return state.focus !== null ? state.focus : state.pinned; }

    function paint() {
      var text = data.texts[state.text], chips = tokensBox.childNodes, f = active();
      var peaks = text.values.map(peak);
      for (var p = 0; p < chips.length; p++) {
        var best = f, strength = 0;
        if (f === null) {
          best = 0;
          text.values.forEach(function (row, i) {
            var s = peaks[i] > 0 ? row[p] / peaks[i] : 0;
            if (s > strength) { strength = s; best = i; }
          });
        } else {
          strength = peaks[f] > 0 ? Math.max(0, text.values[f][p]) / peaks[f] : 0;
        }
        chips[p].style.background = lms.rgba(color(best), 0.08 + 0.72 * strength);
        chips[p].setAttribute("data-strength", strength.toFixed(3));
      }
      Array.prototype.forEach.call(rowsBox.childNodes, function (row, i) {
        row.classList.toggle("lms-nmf-active", i === f);
      });
    }

    function draw() {
      var text = data.texts[state.text];
      rowsBox.textContent = "";
      tokensBox.textContent = "";
      data.rows.forEach(function (info, i) {
        var row = lms.el("div", { className: "lms-nmf-row", tabindex: "0", "data-factor": String(i) });
        row.appendChild(lms.el("span", { className: "lms-nmf-swatch", style: { background: "rgb(" + color(i) + ")" } }));
        row.appendChild(lms.el("span", { className: "lms-nmf-label" }, info.label));
        row.appendChild(sparkline(text.values[i], color(i)));
        row.appendChild(lms.el("span", { className: "lms-muted lms-nmf-detail" }, info.detail));
        row.addEventListener("mouseenter", function () { state.focus = i; paint(); });
        row.addEventListener("mouseleave", function () { state.focus = null; paint(); });
        row.addEventListener("focus", function () { state.focus = i; paint(); });
        row.addEventListener("blur", function () { state.focus = null; paint(); });
        row.addEventListener("click", function () { state.pinned = state.pinned === i ? null : i; paint(); });
        rowsBox.appendChild(row);
      });
      text.tokens.forEach(function (token, p) {
        var chip = lms.token(token, "lms-nmf-token");
        chip.title = JSON.stringify(token) + " @" + p + ": " + text.values.map(function (row, i) {
          return "f" + i + "=" + row[p].toFixed(3);
        }).join(" ");
        tokensBox.appendChild(chip);
      });
      paint();
    }

    draw();
    if (data.top) {
      body.appendChild(lms.el("div", { className: "lms-title lms-nmf-top-title" },
        "Top tokens per factor across " + data.n_texts + " text" + (data.n_texts === 1 ? "" : "s")));
      var table = lms.el("table", { className: "lms-nmf-top" });
      data.top.forEach(function (entries, i) {
        var tr = lms.el("tr");
        var th = lms.el("th");
        th.appendChild(lms.el("span", { className: "lms-nmf-swatch", style: { background: "rgb(" + color(i) + ")" } }));
        th.appendChild(document.createTextNode(data.rows[i].label));
        tr.appendChild(th);
        var td = lms.el("td");
        entries.forEach(function (e) {
          var chip = lms.token(e.token, "lms-nmf-top-token");
          chip.style.background = lms.rgba(color(i), 0.15 + 0.6 * (entries[0].value > 0 ? e.value / entries[0].value : 0));
          chip.title = "text " + e.text + ": \u2026" + e.before.join("") + "[" + e.token + "]  " + e.value.toFixed(3);
          td.appendChild(chip);
        });
        tr.appendChild(td);
        table.appendChild(tr);
      });
      body.appendChild(table);
    }
  };
})();
