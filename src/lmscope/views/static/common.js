/* lmscope: shared view runtime. Views register render functions in window.lmscope.views;
   mount() reads a fragment's JSON data, calls its view and hides the fragment's text twin. Text
   reaches the DOM only through textContent, never innerHTML, so token strings can never become
   markup. Defined once per page and build: every fragment inlines this file, and a copy whose build
   stamp is already defined returns at once; another build (an upgraded lmscope in a long-lived
   JupyterLab page) redefines the runtime and drops the old views so that its own scripts register
   theirs. The object window.lmscope itself is kept, as pages may hold a reference to it. */
(function () {
  "use strict";
  var BUILD = "__LMSCOPE_BUILD__";
  var lms = (window.lmscope = window.lmscope || {});
  if (lms.build === BUILD && lms.views) { return; }
  lms.views = {};
  lms.build = BUILD;

  var WS = { " ": "\u00b7", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d" };

  /** A token with whitespace made visible (· for spaces, ↵ for newlines). */
  lms.visible = function (token) {
    if (token === "") { return "\u2205"; }
    var out = "";
    for (var i = 0; i < token.length; i++) { var c = token[i]; out += WS[c] || c; }
    return out;
  };

  /** Create an element; attrs is an object of attributes, text (optional) becomes a text node. */
  lms.el = function (tag, attrs, text) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        if (k === "style" && typeof attrs[k] === "object") { Object.assign(node.style, attrs[k]); }
        else if (k === "className") { node.className = attrs[k]; }
        else { node.setAttribute(k, attrs[k]); }
      });
    }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  };

  /** An SVG element (attributes set with setAttribute). */
  lms.svg = function (tag, attrs) {
    var node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  };

  /** A token chip: visible whitespace, the raw string in the tooltip. */
  lms.token = function (token, extraClass) {
    var chip = lms.el("span", { className: "lms-token" + (extraClass ? " " + extraClass : "") }, lms.visible(token));
    chip.title = JSON.stringify(token);
    return chip;
  };

  /** Probability as a percentage; below 0.01% shows "<0.01%", never 0. */
  lms.percent = function (p) {
    if (p !== p || p === null) { return "nan"; }
    if (p < 1e-4) { return "<0.01%"; }
    return (100 * p).toFixed(2) + "%";
  };

  /** rgba() of a base "r, g, b" triple with alpha in [0, 1]. */
  lms.rgba = function (rgb, alpha) {
    return "rgba(" + rgb + ", " + Math.max(0, Math.min(1, alpha)).toFixed(3) + ")";
  };

  /** A theme colour from a CSS custom property on root (e.g. "--lms-cool" -> "31, 119, 180"). */
  lms.cssVar = function (root, name, fallback) {
    var value = root ? window.getComputedStyle(root).getPropertyValue(name).trim() : "";
    return value || fallback;
  };

  /** A row of token chips for a sequence. opts: nInput (later tokens get "lms-generated"),
      mark (positions to outline with "lms-mark"). Each chip's tooltip names its position. */
  lms.tokenRow = function (tokens, opts) {
    opts = opts || {};
    var nInput = opts.nInput === undefined ? tokens.length : opts.nInput;
    var mark = opts.mark || [];
    var row = lms.el("div", { className: "lms-token-row" });
    tokens.forEach(function (token, i) {
      var cls = (i >= nInput ? "lms-generated" : "") + (mark.indexOf(i) >= 0 ? " lms-mark" : "");
      var chip = lms.token(token, cls.trim());
      chip.title = "position " + i + ": " + JSON.stringify(token);
      chip.setAttribute("data-pos", String(i));
      row.appendChild(chip);
    });
    return row;
  };

  /** The fragment root: by id, else the element holding the calling script (a shadow root, a
      detached copy). */
  function findRoot(uid, script) {
    var root = document.getElementById(uid);
    if (!root && script && script.parentNode) {
      root = script.parentNode;
      while (root && root.id !== uid) { root = root.parentNode; }
    }
    return root;
  }

  /** Render the fragment with id uid using view name; once it has drawn, hide its text twin. If the
      view fails, the twin stays and the error is shown above it (and thrown for the console). */
  lms.mount = function (uid, view, script) {
    var root = findRoot(uid, script);
    if (!root || root.getAttribute("data-mounted")) { return; }
    var body = lms.el("div", { className: "lms-body" });
    try {
      var render = lms.views[view];
      if (!render) { throw new Error("lmscope: no view named " + view); }
      var data = JSON.parse(root.querySelector("script.lmscope-data").textContent);
      root.appendChild(body);
      render(body, data, root);
    } catch (err) {
      if (body.parentNode) { body.parentNode.removeChild(body); }
      root.insertBefore(lms.el("div", { className: "lms-error" }, "lmscope: this view failed to draw (" +
        (err && err.message ? err.message : String(err)) + "); its text follows."), root.firstChild);
      throw err;
    }
    var fallback = root.querySelector(":scope > .lmscope-static");
    if (fallback) { fallback.hidden = true; fallback.style.display = "none"; }
    root.setAttribute("data-mounted", "1");
  };
})();
