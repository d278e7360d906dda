/* lmscope saliency view (Ecco's minimal and detailed views). Hover, focus or click an output
   token: every token before it is coloured by its attribution; the detailed style adds a bar and
   a figure under each. Tokens are drawn once; a selection only restyles them, so a few hundred
   tokens stay responsive. Encoder-decoder data adds a source row (source_tokens,
   source_attributions) coloured on the decoder prefix's scale. Text enters the DOM only through
   textContent. */
(function () {
  "use strict";
  var lms = window.lmscope;

  lms.views.saliency = function (body, data, root) {
    var HOT = lms.cssVar(root, "--lms-hot", "214, 39, 40");
    var COOL = lms.cssVar(root, "--lms-cool", "31, 119, 180");
    var title = "Saliency: " + data.method + " of each output token's " + data.target;
    body.appendChild(lms.el("div", { className: "lms-title" }, title));
    if (data.note) { body.appendChild(lms.el("div", { className: "lms-muted lms-sal-note" }, data.note)); }
    var controls = lms.el("div", { className: "lms-controls" });
    var buttons = {};
    ["minimal", "detailed"].forEach(function (name) {
      var button = lms.el("button", { type: "button", "data-style": name }, name);
      button.addEventListener("click", function () { setStyle(name); });
      buttons[name] = button;
      controls.appendChild(button);
    });
    var info = lms.el("span", { className: "lms-muted lms-sal-info" });
    controls.appendChild(info);
    body.appendChild(controls);
    var source = [];
    if (data.source_tokens) {  // encoder-decoder: the source tokens, labelled, above the decoder tokens
      var srcText = lms.el("div", { className: "lms-sal-text lms-sal-source" });
      srcText.appendChild(lms.el("span", { className: "lms-muted lms-sal-label" }, "source"));
      source = data.source_tokens.map(function (token, pos) {
        var cell = lms.el("span", { className: "lms-sal-cell", "data-src-pos": String(pos) });
        var chip = lms.token(token, "lms-sal-src");
        var bar = lms.el("span", { className: "lms-sal-bar" });
        var fill = lms.el("span", { className: "lms-sal-fill" });
        var figure = lms.el("span", { className: "lms-sal-figure" });
        bar.appendChild(fill);
        cell.appendChild(chip);
        cell.appendChild(bar);
        cell.appendChild(figure);
        srcText.appendChild(cell);
        return { cell: cell, chip: chip, fill: fill, figure: figure };
      });
      body.appendChild(srcText);
    }
    var text = lms.el("div", { className: "lms-sal-text" });
    if (data.source_tokens) { text.appendChild(lms.el("span", { className: "lms-muted lms-sal-label" }, "target")); }
    body.appendChild(text);

    var outputOf = {};
    data.positions.forEach(function (pos, i) { outputOf[pos] = i; });
    var cells = data.tokens.map(function (token, pos) {
      var cell = lms.el("span", { className: "lms-sal-cell", "data-pos": String(pos) });
      var chip = lms.token(token, pos < data.n_input ? "" : "lms-generated");
      var bar = lms.el("span", { className: "lms-sal-bar" });
      var fill = lms.el("span", { className: "lms-sal-fill" });
      var figure = lms.el("span", { className: "lms-sal-figure" });
      bar.appendChild(fill);
      cell.appendChild(chip);
      cell.appendChild(bar);
      cell.appendChild(figure);
      if (Object.prototype.hasOwnProperty.call(outputOf, pos)) {
        var index = outputOf[pos];
        cell.classList.add("lms-sal-output");
        cell.setAttribute("tabindex", "0");
        cell.addEventListener("mouseenter", function () { select(index); });
        cell.addEventListener("focus", function () { select(index); });
        cell.addEventListener("click", function () { select(index); });
      }
      text.appendChild(cell);
      return { cell: cell, chip: chip, fill: fill, figure: figure };
    });

    function figureOf(value) {
      return data.signed ? (value >= 0 ? "+" : "") + value.toPrecision(3) : lms.percent(value);
    }

    function select(index) {
      var target = data.positions[index];
      var row = data.attributions[index];
      var srcRow = data.source_attributions ? data.source_attributions[index] : [];
      var scale = 0;
      row.concat(srcRow).forEach(function (v) { scale = Math.max(scale, Math.abs(v)); });
      scale = scale || 1;
      function paint(c, v) {
        var share = Math.abs(v) / scale;
        var rgb = v >= 0 ? HOT : COOL;
        c.chip.style.background = lms.rgba(rgb, share);
        c.chip.style.color = share > 0.6 ? "#ffffff" : "";
        c.fill.style.width = (100 * share).toFixed(1) + "%";
        c.fill.style.background = lms.rgba(rgb, 0.85);
        c.figure.textContent = figureOf(v);
        c.cell.title = "attribution " + figureOf(v);
      }
      source.forEach(function (c, pos) { paint(c, srcRow[pos]); });
      cells.forEach(function (c, pos) {
        c.cell.classList.toggle("lms-sal-selected", pos === target);
        c.cell.classList.toggle("lms-sal-after", pos > target);
        if (pos < target) {
          paint(c, row[pos]);
        } else {
          c.chip.style.background = "";
          c.chip.style.color = "";
          c.fill.style.width = "0";
          c.figure.textContent = "";
          c.cell.removeAttribute("title");
        }
      });
      var value = data.values[index];
      var shown = data.target === "probability" ? lms.percent(value) : value.toFixed(3);
      var label = "output " + JSON.stringify(data.tokens[target]) + " at " + target;
      if (data.contrast) { label += " rather than " + JSON.stringify(data.contrast[index]); }
      info.textContent = label + ": " + data.target + " " + shown;
      root.setAttribute("data-selected", String(target));
    }

    function setStyle(name) {
      text.classList.toggle("lms-sal-detailed", name === "detailed");
      Object.keys(buttons).forEach(function (k) { buttons[k].classList.toggle("lms-sal-active", k === name); });
      root.setAttribute("data-style", name);
    }

    setStyle(data.style);
    if (data.positions.length) { select(data.positions.length - 1); }
  };
})();
