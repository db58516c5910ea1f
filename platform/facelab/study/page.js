/* facelab study: the rater's page (served by `facelab study serve`; no network beyond this server).
 *
 * /?rater=NAME shows item i of N: the text and the K outputs labelled A, B, C … in this rater's order
 * (the server shuffles them; it never sends method names). Expression outputs are drawn as a heatmap
 * (coefficient x time) with a few curves and a cursor that plays at the study's frame rate (24 fps,
 * as in the paper's study), or as the avatar video (GIF) when the study has one; keyframe outputs as the schematic
 * face (facelab/viewer/face.js) animated through the keyframes, interpolated as `facelab export`.
 * The rater gives each output a rank (1 = most emotionally consistent with the text; each rank once)
 * and submits; the server checks the ranking and the page moves to the next unranked item.
 */
(function () {
  "use strict";
  var SVGNS = "http://www.w3.org/2000/svg";
  var CURVES = [0, 1, 2, 50], COLOURS = ["#4477aa", "#ee6677", "#228833", "#ccbb44"];
  var data = JSON.parse(document.getElementById("study-data").textContent);
  var root = document.getElementById("study-root");
  var players = [];

  function el(tag, attrs, parent, ns) {
    var e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (parent) parent.appendChild(e);
    return e;
  }
  function text(tag, attrs, s, parent) { var e = el(tag, attrs, parent); e.textContent = s; return e; }

  function api(path, body) {
    var opts = body ? { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) } : {};
    return fetch(path, opts).then(function (r) {
      return r.json().then(function (j) {
        if (!r.ok) throw new Error(j.error || ("HTTP " + r.status));
        return j;
      });
    });
  }

  // --- drawing -----------------------------------------------------------------------------------

  function colour(v, scale) {
    var t = Math.max(-1, Math.min(1, v / scale)), r, g, b;
    if (t >= 0) { r = 255; g = Math.round(255 * (1 - t * 0.85)); b = Math.round(255 * (1 - t)); }
    else { r = Math.round(255 * (1 + t)); g = Math.round(255 * (1 + t * 0.55)); b = 255; }
    return "rgb(" + r + "," + g + "," + b + ")";
  }

  function expressionView(frames, tmax, scale, parent) {
    var d = frames.length ? frames[0].length : 0, cw = 3, ch = 3;
    var wrap = el("div", { class: "heat-wrap" }, parent);
    var canvas = el("canvas", { class: "heatmap", width: String(tmax * cw), height: String(d * ch),
                                "data-frames": String(frames.length) }, wrap);
    var ctx = canvas.getContext("2d");
    ctx.fillStyle = "#eeeeee";
    ctx.fillRect(0, 0, tmax * cw, d * ch);
    frames.forEach(function (f, t) {
      f.forEach(function (v, j) { ctx.fillStyle = colour(v, scale); ctx.fillRect(t * cw, j * ch, cw, ch); });
    });
    var cursor = el("div", { class: "cursor" }, wrap);
    var w = 300, h = 90, svg = el("svg", { class: "curves", viewBox: "0 0 " + w + " " + h,
                                           preserveAspectRatio: "none" }, parent, SVGNS);
    CURVES.filter(function (c) { return c < d; }).forEach(function (dim, k) {
      var pts = frames.map(function (f, t) {
        return ((t / tmax) * w).toFixed(1) + "," + (h / 2 - (f[dim] / scale) * (h / 2 - 3)).toFixed(1);
      }).join(" ");
      el("polyline", { points: pts, fill: "none", stroke: COLOURS[k], "stroke-width": "1.3",
                       "vector-effect": "non-scaling-stroke" }, svg, SVGNS);
    });
    var line = el("line", { class: "cursor", x1: "0", x2: "0", y1: "0", y2: String(h),
                            "vector-effect": "non-scaling-stroke" }, svg, SVGNS);
    var n = frames.length;
    players.push(function (t) {
      var f = Math.min(n - 1, Math.floor(t * data.fps) % (n + Math.round(data.fps / 2)));
      var x = (Math.max(0, f) / tmax);
      cursor.style.left = (x * 100) + "%";
      line.setAttribute("x1", (x * w).toFixed(1)); line.setAttribute("x2", (x * w).toFixed(1));
    });
  }

  function keyframeView(rows, parent, prefix) {
    var anim = window.FaceLab.interpolate(rows, 1.0, data.fps, data.rig);
    var box = el("div", { class: "face-box", "data-keyframes": String(rows.length) }, parent);
    var current = -1;
    function show(k) {
      if (k === current) return;
      current = k;
      box.textContent = "";
      box.appendChild(window.FaceLab.faceSVG(data.rig, anim.frames[k], prefix));
    }
    show(0);
    var n = anim.frames.length;
    players.push(function (t) { show(Math.max(0, Math.min(n - 1, Math.floor(t * data.fps) % (n + data.fps)))); });
  }

  function play() {
    var t0 = performance.now();
    function tick(now) {
      var t = Math.max(0, now - t0) / 1000;  // a frame's timestamp may precede t0
      players.forEach(function (p) { p(t); });
      requestAnimationFrame(tick);
    }
    requestAnimationFrame(tick);
  }

  // --- pages -------------------------------------------------------------------------------------

  function askName() {
    root.textContent = "";
    var form = el("form", { method: "get", action: "/", class: "name-form" }, root);
    text("p", {}, "Enter your rater name (letters, digits, - or _) to start.", form);
    el("input", { name: "rater", required: "", pattern: "[A-Za-z0-9][A-Za-z0-9_-]{0,63}" }, form);
    text("button", { type: "submit" }, "start", form);
    root.setAttribute("data-ready", "1");
  }

  function finished(n) {
    root.textContent = "";
    text("h2", { id: "done" }, "Thank you: all " + n + " items are ranked.", root);
    text("p", {}, "You may close this page. To change an answer, open an item again with &i=NUMBER.", root);
    root.setAttribute("data-done", "1");
    root.setAttribute("data-ready", "1");
  }

  function showItem(rater, i, done) {
    root.removeAttribute("data-ready");
    return api("/api/item?rater=" + encodeURIComponent(rater) + "&i=" + i).then(function (item) {
      players = [];
      root.textContent = "";
      root.setAttribute("data-item", String(i));
      text("p", { id: "progress" }, "Item " + (i + 1) + " of " + item.n_items + " · " + done.length +
           " ranked · rater " + rater, root);
      var head = el("section", { class: "prompt" }, root);
      text("h2", { id: "item-text" }, item.text, head);
      if (item.descriptions) {
        var ol = el("ol", { class: "descriptions" }, head);
        item.descriptions.forEach(function (d) { text("li", {}, d, ol); });
      }
      text("p", { class: "hint" }, "Rank the " + item.options.length + " outputs by how well their expression " +
           "fits the emotion of the text: 1 = most consistent. Use each rank once.", root);
      if (data.task === "expressions") {
        text("p", { class: "hint legend" }, "Each output: a heatmap (one row per expression coefficient, time " +
             "across, blue < 0 < red) and curves of expression 0-2 and the jaw; the cursor plays at " + data.fps +
             " frames per second.", root);
      }
      var form = el("form", { id: "rank-form" }, root);
      var grid = el("div", { class: "options" }, form);
      var tmax = 1, scale = 1e-6;
      item.options.forEach(function (o) {
        (o.frames || []).forEach(function (f) { f.forEach(function (v) { scale = Math.max(scale, Math.abs(v)); }); });
        if (o.frames) tmax = Math.max(tmax, o.frames.length);
      });
      var k = item.options.length;
      item.options.forEach(function (o) {
        var card = el("figure", { class: "option", "data-label": o.label }, grid);
        text("figcaption", { class: "label" }, o.label, card);
        if (o.gif) el("img", { src: o.gif, alt: "output " + o.label, class: "avatar" }, card);
        if (o.frames) expressionView(o.frames, tmax, scale, card);
        if (o.keyframes) keyframeView(o.keyframes, card, "o" + o.label);
        var lab = el("label", { class: "rank" }, card);
        text("span", {}, "rank ", lab);
        var sel = el("select", { name: "rank-" + o.label, "data-label": o.label }, lab);
        text("option", { value: "" }, "–", sel);
        for (var r = 1; r <= k; r++) text("option", { value: String(r) }, String(r), sel);
        if (item.ranks && item.ranks[o.label]) sel.value = String(item.ranks[o.label]);
      });
      var status = text("p", { id: "status", role: "alert", class: "status" }, "", form);
      text("button", { type: "submit", id: "submit" }, i + 1 < item.n_items ? "submit and next" : "submit", form);
      form.addEventListener("submit", function (ev) {
        ev.preventDefault();
        var ranks = {};
        form.querySelectorAll("select").forEach(function (s) { ranks[s.getAttribute("data-label")] = s.value ? Number(s.value) : null; });
        status.className = "status";
        status.textContent = "sending…";
        api("/api/rank", { rater: rater, item: i, ranks: ranks }).then(function (res) {
          return api("/api/progress?rater=" + encodeURIComponent(rater)).then(function (p) {
            var next = -1;
            for (var j = 1; j <= p.n_items; j++) {
              var c = (i + j) % p.n_items;
              if (p.done.indexOf(c) < 0) { next = c; break; }
            }
            if (next < 0) finished(p.n_items); else showItem(rater, next, p.done);
          });
        }).catch(function (e) { status.className = "status error"; status.textContent = e.message; });
      });
      play();
      root.setAttribute("data-ready", "1");
    });
  }

  function boot() {
    var q = new URLSearchParams(window.location.search), rater = q.get("rater");
    if (!rater) return askName();
    api("/api/progress?rater=" + encodeURIComponent(rater)).then(function (p) {
      var want = q.get("i");
      var i = want !== null ? Number(want) : -1;
      if (i < 0) { for (var j = 0; j < p.n_items; j++) { if (p.done.indexOf(j) < 0) { i = j; break; } } }
      if (i < 0) return finished(p.n_items);
      return showItem(rater, i, p.done);
    }).catch(function (e) {
      root.textContent = "";
      text("p", { id: "status", role: "alert", class: "status error" }, e.message, root);
      root.setAttribute("data-ready", "1");
    });
  }

  boot();
})();
