/* facelab viewer: the schematic ARKit face, per-channel bars and expression heatmaps/curves.
 *
 * Inlined into every page by facelab.viewer.html (no network, no modules). It reads the page's
 * <script type="application/json" id="facelab-data"> ({rig, channels, regions, page}) and draws into
 * <main id="facelab-root">: a keyframes run, an expressions run, a sweep, or the served model's page
 * (a form that POSTs to the same server's endpoint and draws the answer). The face is facelab/viewer/rig.py's rig evaluated the same way:
 * geometry() = neutral + sum(value * move), then the rotations in rig.rotation_order; segments()
 * is the same Catmull-Rom construction; fmt() the same two-decimal text. tests/test_viewer.py checks
 * that the coordinates written here equal rig.face_svg's.
 */
(function () {
  "use strict";
  var SVGNS = "http://www.w3.org/2000/svg";

  function fmt(x) {
    var s = x.toFixed(2);
    return s === "-0.00" ? "0.00" : s;
  }

  function clip(values, rig) {
    return rig.channels.map(function (ch, c) {
      var v = Number(values[c]);
      if (!isFinite(v)) v = v > 0 ? ch.hi : v < 0 ? ch.lo : 0;
      return Math.min(ch.hi, Math.max(ch.lo, v));
    });
  }

  function geometry(rig, values) {
    var v = clip(values, rig);
    var pts = rig.neutral.map(function (p) { return [p[0], p[1]]; });
    rig.channels.forEach(function (ch, c) {
      if (v[c] === 0) return;
      ch.move.forEach(function (m) {
        pts[m[0]][0] += v[c] * m[1];
        pts[m[0]][1] += v[c] * m[2];
      });
    });
    rig.rotation_order.forEach(function (c) {
      if (v[c] === 0) return;
      rig.channels[c].rotate.forEach(function (r) {
        var t = (v[c] * r[2] * Math.PI) / 180, cos = Math.cos(t), sin = Math.sin(t);
        var px = pts[r[1]][0], py = pts[r[1]][1];
        r[0].forEach(function (i) {
          var dx = pts[i][0] - px, dy = pts[i][1] - py;
          pts[i][0] = px + cos * dx - sin * dy;
          pts[i][1] = py + sin * dx + cos * dy;
        });
      });
    });
    return pts;
  }

  function segments(p, closed, smooth) {
    var n = p.length, out = [[p[0]]], count = closed ? n : n - 1;
    for (var i = 0; i < count; i++) {
      var a = p[i], b = p[(i + 1) % n];
      if (!smooth || n < 3) { out.push([b]); continue; }
      var prev = closed || i > 0 ? p[(i - 1 + n) % n] : a;
      var nxt = closed || i + 2 < n ? p[(i + 2) % n] : b;
      var c1 = [a[0] + (b[0] - prev[0]) / 6, a[1] + (b[1] - prev[1]) / 6];
      var c2 = [b[0] - (nxt[0] - a[0]) / 6, b[1] - (nxt[1] - a[1]) / 6];
      out.push([c1, c2, b]);
    }
    return out;
  }

  function pathD(p, closed, smooth) {
    var parts = segments(p, closed, smooth).map(function (seg, k) {
      var cmd = k === 0 ? "M" : seg.length === 1 ? "L" : "C";
      return cmd + " " + seg.map(function (q) { return fmt(q[0]) + " " + fmt(q[1]); }).join(" ");
    });
    if (closed) parts.push("Z");
    return parts.join(" ");
  }

  function el(tag, attrs, parent, ns) {
    var e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (parent) parent.appendChild(e);
    return e;
  }

  function text(tag, cls, s, parent) {
    var e = el(tag, cls ? { class: cls } : {}, parent);
    e.textContent = s;
    return e;
  }

  /* One face as an <svg class="face" data-drawn="js">; prefix keeps clip ids unique on the page. */
  function faceSVG(rig, values, prefix) {
    var pts = geometry(rig, values);
    var pick = function (ids) { return ids.map(function (i) { return pts[i]; }); };
    var svg = el("svg", { class: "face", viewBox: rig.viewBox.map(fmt).join(" "), "data-drawn": "js",
                          "data-prefix": prefix }, null, SVGNS);
    var defs = el("defs", {}, svg, SVGNS);
    var byId = {};
    rig.shapes.forEach(function (s) { byId[s.id] = s; });
    var clips = {};
    rig.shapes.forEach(function (s) { if (s.clip) clips[s.clip] = true; });
    Object.keys(clips).sort().forEach(function (cid) {
      var cp = el("clipPath", { id: prefix + "-" + cid }, defs, SVGNS);
      el("path", { d: pathD(pick(byId[cid].points), true, byId[cid].smooth) }, cp, SVGNS);
    });
    rig.shapes.forEach(function (s) {
      var a = { "data-shape": s.id, fill: s.fill, stroke: s.stroke, "stroke-width": String(s.width),
                "stroke-linecap": s.cap, "stroke-linejoin": "round" };
      if (s.clip) a["clip-path"] = "url(#" + prefix + "-" + s.clip + ")";
      if (s.kind === "circle") {
        var c = pts[s.points[0]];
        a.cx = fmt(c[0]); a.cy = fmt(c[1]); a.r = fmt(s.r);
        el("circle", a, svg, SVGNS);
      } else {
        a.d = pathD(pick(s.points), s.closed, s.smooth);
        el("path", a, svg, SVGNS);
      }
    });
    return svg;
  }

  /* 61 rows: channel name, then one bar and value per column (ground truth, generated, ...).
     Blendshapes fill from 0 to 1; pose channels ([-1, 1]) from the middle. */
  function bars(data, columns, root) {
    var table = el("table", { class: "bars" }, root);
    var head = el("tr", {}, el("thead", {}, table));
    text("th", "", "channel", head);
    columns.forEach(function (c) { text("th", "", c.label, head); });
    var body = el("tbody", {}, table);
    var regionOf = {};
    Object.keys(data.regions).forEach(function (r) { data.regions[r].forEach(function (n) { regionOf[n] = r; }); });
    data.channels.forEach(function (name, i) {
      var ch = data.rig.channels[i];
      var tr = el("tr", { class: "bar", "data-channel": name, "data-region": regionOf[name] || "" }, body);
      text("td", "name", name, tr);
      columns.forEach(function (col) {
        var td = el("td", { class: "cell " + col.cls }, tr);
        el("span", { class: "fill" }, el("span", { class: "track" + (ch.lo < 0 ? " signed" : "") }, td));
        text("span", "value", "", td);
        setCell(td, ch, Number(col.values[i]));
        if (Math.abs(Number(col.values[i])) >= 0.3) tr.classList.add("strong");
      });
    });
    return table;
  }

  /* One bar cell shows value v: its data-value, the fill (from 0, or from the middle for pose) and the text. */
  function setCell(td, ch, v) {
    var fill = td.querySelector(".fill"), clipped = Math.min(ch.hi, Math.max(ch.lo, isFinite(v) ? v : 0));
    td.setAttribute("data-value", fmt(v));
    if (ch.lo < 0) {
      var w = Math.abs(clipped) * 50;
      fill.style.left = (clipped < 0 ? 50 - w : 50) + "%";
      fill.style.width = w + "%";
    } else {
      fill.style.left = "0%";
      fill.style.width = clipped * 100 + "%";
    }
    td.querySelector(".value").textContent = fmt(v);
  }

  /* A one-column bars table shows a new vector (the animation's current frame). */
  function setBars(table, data, values) {
    table.querySelectorAll("tr.bar").forEach(function (tr, i) {
      setCell(tr.querySelector("td.cell"), data.rig.channels[i], Number(values[i]));
      tr.classList.toggle("strong", Math.abs(Number(values[i])) >= 0.3);
    });
  }

  function topList(data, values, k) {
    var idx = data.channels.map(function (_, i) { return i; });
    idx.sort(function (a, b) { return Math.abs(values[b]) - Math.abs(values[a]) || a - b; });
    return idx.slice(0, k).filter(function (i) { return Math.abs(values[i]) >= 0.05; })
      .map(function (i) { return data.channels[i] + " " + fmt(values[i]); });
  }

  function faceFigure(data, values, label, cls, prefix, parent) {
    var fig = el("figure", { class: "face-figure " + cls }, parent);
    fig.appendChild(faceSVG(data.rig, values, prefix));
    var cap = el("figcaption", {}, fig);
    text("strong", "", label, cap);
    var top = topList(data, values, 4);
    text("span", "top", top.length ? top.join(", ") : "(neutral)", cap);
    return fig;
  }

  // ---------------------------------------------------------------------------------------------
  // Expressions: a (T, D) sequence as a heatmap (time across, coefficient down) and a few curves
  // ---------------------------------------------------------------------------------------------

  function colour(v, scale) {
    var t = Math.max(-1, Math.min(1, v / scale));
    var r, g, b;
    if (t >= 0) { r = 255; g = Math.round(255 * (1 - t * 0.85)); b = Math.round(255 * (1 - t)); }
    else { r = Math.round(255 * (1 + t)); g = Math.round(255 * (1 + t * 0.55)); b = 255; }
    return "rgb(" + r + "," + g + "," + b + ")";
  }

  function heatmap(seq, tmax, scale, parent) {
    var d = seq.length ? seq[0].length : 0, cw = 2, chh = 3;
    var canvas = el("canvas", { class: "heatmap", width: String(tmax * cw), height: String(d * chh),
                                "data-frames": String(seq.length), "data-dims": String(d) }, parent);
    var ctx = canvas.getContext("2d");
    ctx.fillStyle = "#eeeeee";
    ctx.fillRect(0, 0, tmax * cw, d * chh);
    for (var t = 0; t < seq.length; t++) {
      for (var j = 0; j < d; j++) {
        ctx.fillStyle = colour(seq[t][j], scale);
        ctx.fillRect(t * cw, j * chh, cw, chh);
      }
    }
    return canvas;
  }

  var CURVE_COLOURS = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377"];

  function curves(seq, tmax, dims, labels, range, parent) {
    var w = 300, h = 110, svg = el("svg", { class: "curves", viewBox: "0 0 " + w + " " + h,
                                              preserveAspectRatio: "none" }, parent, SVGNS);
    var y = function (v) { return h / 2 - (v / range) * (h / 2 - 4); };
    var x = function (t) { return (t / tmax) * w; };  // frame t's left edge, as in the heatmap
    el("line", { x1: "0", x2: String(w), y1: String(h / 2), y2: String(h / 2), class: "axis" }, svg, SVGNS);
    dims.forEach(function (dim, k) {
      var pts = seq.map(function (f, t) { return fmt(x(t)) + "," + fmt(y(f[dim])); }).join(" ");
      var line = el("polyline", { points: pts, fill: "none", stroke: CURVE_COLOURS[k % CURVE_COLOURS.length],
                                  "stroke-width": "1.4", "data-dim": String(dim),
                                  "vector-effect": "non-scaling-stroke" }, svg, SVGNS);
      text("title", "", labels[dim], line);
    });
    var stop = seq.length;  // the frame after the last: where the heatmap's stop mark is
    el("line", { class: "stop", x1: fmt(x(stop)), x2: fmt(x(stop)), y1: "0", y2: String(h),
                 "data-frame": String(seq.length), "vector-effect": "non-scaling-stroke" }, svg, SVGNS);
    el("line", { class: "cursor", x1: "0", x2: "0", y1: "0", y2: String(h),
                 "vector-effect": "non-scaling-stroke" }, svg, SVGNS);
    return svg;
  }

  function seqPanel(data, seq, label, cls, tmax, scale, range, parent) {
    var fig = el("figure", { class: "seq " + cls, "data-frames": String(seq.length) }, parent);
    var cap = el("figcaption", {}, fig);
    text("strong", "", label, cap);
    text("span", "stop-label", " stops at frame " + seq.length + " (" + (seq.length / data.page.fps).toFixed(2) + " s)", cap);
    var wrap = el("div", { class: "heat-wrap" }, fig);
    heatmap(seq, tmax, scale, wrap);
    var mark = el("div", { class: "stop-mark", title: "stop frame " + seq.length }, wrap);
    mark.style.left = (seq.length / tmax) * 100 + "%";
    var cursor = el("div", { class: "cursor-mark" }, wrap);
    cursor.style.left = "0%";
    curves(seq, tmax, data.page.curves, data.page.dims, range, fig);
    return fig;
  }

  function seqStats(seqs) {
    var tmax = 1, scale = 1e-6;
    seqs.forEach(function (s) {
      tmax = Math.max(tmax, s.length);
      s.forEach(function (f) { f.forEach(function (v) { scale = Math.max(scale, Math.abs(v)); }); });
    });
    return { tmax: tmax, scale: scale };
  }

  function legend(data, parent) {
    var p = el("p", { class: "legend" }, parent);
    text("span", "", "curves: ", p);
    data.page.curves.forEach(function (dim, k) {
      var s = text("span", "swatch", data.page.dims[dim], p);
      s.style.borderColor = CURVE_COLOURS[k % CURVE_COLOURS.length];
    });
    text("span", "", " · heatmap: one row per coefficient (" + data.page.dims.length +
         "), time across, blue < 0 < red · | stop frame", p);
  }

  function animate(root, fps) {
    var button = root.querySelector("button.play");
    if (!button) return;
    var playing = false, t0 = 0;
    function frame(now) {
      if (!playing) return;
      var t = ((now - t0) / 1000) * fps;
      root.querySelectorAll(".heat-wrap").forEach(function (w) {
        var c = w.querySelector("canvas"), tmax = c.width / 2;
        var pos = Math.min(1, (t % (tmax + fps)) / tmax);
        w.querySelector(".cursor-mark").style.left = pos * 100 + "%";
      });
      root.querySelectorAll("svg.curves .cursor").forEach(function (line) {
        var svg = line.ownerSVGElement, wrap = svg.parentNode.querySelector("canvas"), tmax = wrap.width / 2;
        var x = Math.min(1, (t % (tmax + fps)) / tmax) * 300;
        line.setAttribute("x1", fmt(x)); line.setAttribute("x2", fmt(x));
      });
      requestAnimationFrame(frame);
    }
    button.addEventListener("click", function () {
      playing = !playing;
      button.textContent = playing ? "pause" : "play over time";
      if (playing) { t0 = performance.now(); requestAnimationFrame(frame); }
      root.facelabClock = playing ? { t0: t0, fps: fps } : null;  // flame_gl.js follows the cursor
    });
  }

  // ---------------------------------------------------------------------------------------------
  // Keyframes -> animation, as `facelab export` (facelab.data.arkit.interpolate_keyframes): PCHIP
  // ---------------------------------------------------------------------------------------------

  function sgn(x) { return x > 0 ? 1 : x < 0 ? -1 : 0; }

  /* scipy's PchipInterpolator._edge_case: the one-sided three-point end slope, kept shape-preserving. */
  function pchipEdge(h0, h1, m0, m1) {
    var d = ((2 * h0 + h1) * m0 - h0 * m1) / (h0 + h1);
    if (sgn(d) !== sgn(m0)) return 0;
    if (sgn(m0) !== sgn(m1) && Math.abs(d) > 3 * Math.abs(m0)) return 3 * m0;
    return d;
  }

  /* Fritsch-Carlson monotone cubic through (x[k], y[k]), x strictly increasing: the same slopes
     (PchipInterpolator._find_derivatives) and the same piecewise polynomial (CubicHermiteSpline's
     coefficients, evaluated in PPoly's local coordinate) as scipy. Returns t -> value. */
  function pchip(x, y) {
    var n = x.length, h = [], m = [], d = [], k;
    if (n === 1) return function () { return y[0]; };
    for (k = 0; k < n - 1; k++) { h.push(x[k + 1] - x[k]); m.push((y[k + 1] - y[k]) / h[k]); }
    if (n === 2) d = [m[0], m[0]];
    else {
      d[0] = pchipEdge(h[0], h[1], m[0], m[1]);
      for (k = 1; k < n - 1; k++) {
        if (sgn(m[k]) !== sgn(m[k - 1]) || m[k] === 0 || m[k - 1] === 0) { d[k] = 0; continue; }
        var w1 = 2 * h[k] + h[k - 1], w2 = h[k] + 2 * h[k - 1];
        d[k] = 1 / ((w1 / m[k - 1] + w2 / m[k]) / (w1 + w2));
      }
      d[n - 1] = pchipEdge(h[n - 2], h[n - 3], m[n - 2], m[n - 3]);
    }
    var c = [];
    for (k = 0; k < n - 1; k++) {
      var t = (d[k] + d[k + 1] - 2 * m[k]) / h[k];
      c.push([t / h[k], (m[k] - d[k]) / h[k] - t, d[k], y[k]]);
    }
    return function (v) {
      var i = 0;
      while (i < n - 2 && v >= x[i + 1]) i++;
      var s = v - x[i], q = c[i];
      return ((q[0] * s + q[1]) * s + q[2]) * s + q[3];
    };
  }

  /* Keyframes rows (K, 61) placed spacing seconds apart (0, spacing, 2 spacing, ...) -> the frames at
     fps on the grid i / fps up to the last key time (K = 1: one held frame), clipped to the channels'
     ranges: {times, frames, keyFrames} where keyFrames[k] is the first frame at or after keyframe k. */
  function interpolate(rows, spacing, fps, rig) {
    var K = rows.length, keyTimes = rows.map(function (_, k) { return k * spacing; });
    var n = K === 1 ? 1 : Math.floor((keyTimes[K - 1] - keyTimes[0]) * fps + 1e-9) + 1;
    var times = [], frames = [], i;
    for (i = 0; i < n; i++) { times.push(keyTimes[0] + i / fps); frames.push([]); }
    (rig ? rig.channels : rows[0]).forEach(function (ch, c) {
      var f = pchip(keyTimes, rows.map(function (r) { return Number(r[c]); }));
      var lo = rig ? ch.lo : -Infinity, hi = rig ? ch.hi : Infinity;
      for (i = 0; i < n; i++) frames[i].push(Math.min(hi, Math.max(lo, f(times[i]))));
    });
    var keyFrames = keyTimes.map(function (t) {
      return Math.min(n - 1, Math.max(0, Math.ceil((t - keyTimes[0]) * fps - 1e-9)));
    });
    return { times: times, frames: frames, keyFrames: keyFrames };
  }

  // ---------------------------------------------------------------------------------------------
  // Pages
  // ---------------------------------------------------------------------------------------------

  function keyframesPage(data, root) {
    data.page.items.forEach(function (item, i) {
      var sec = el("section", { class: "item", "data-item": String(i) }, root);
      text("h2", "", (i + 1) + ". " + item.text, sec);
      var body = el("div", { class: "item-body" }, sec);
      var row = el("div", { class: "side-by-side" }, body);
      var cols = [{ label: "ground truth", cls: "gt", values: item.gt }];
      (item.samples || []).forEach(function (s, k) {
        cols.push({ label: item.samples.length > 1 ? "generated " + (k + 1) : "generated", cls: "gen", values: s });
      });
      cols.forEach(function (c, k) { faceFigure(data, c.values, c.label, c.cls, "f" + i + "-" + k, row); });
      var det = el("details", { class: "bars-box", open: "" }, body);
      text("summary", "", "61 channels", det);
      bars(data, cols, det);
    });
  }

  function expressionsPage(data, root) {
    el("button", { class: "play", type: "button" }, root).textContent = "play over time";
    legend(data, root);
    data.page.items.forEach(function (item, i) {
      var sec = el("section", { class: "item", "data-item": String(i) }, root);
      text("h2", "", (i + 1) + ". " + item.text, sec);
      var row = el("div", { class: "side-by-side" }, sec);
      var all = [item.gt].concat(item.samples || []);
      var st = seqStats(all);
      seqPanel(data, item.gt, "ground truth", "gt", st.tmax, st.scale, st.scale, row);
      (item.samples || []).forEach(function (s, k) {
        seqPanel(data, s, item.samples.length > 1 ? "generated " + (k + 1) : "generated", "gen",
                 st.tmax, st.scale, st.scale, row);
      });
    });
    animate(root, data.page.fps);
    if (window.facelabFlame) window.facelabFlame.preview(root, data);  // the FLAME avatars (flame_gl.js)
  }

  /* One row per variant (the ground truth first), one column per test item. */
  function sweepPage(data, root) {
    var page = data.page;
    if (page.task === "expressions") {
      el("button", { class: "play", type: "button" }, root).textContent = "play over time";
      legend(data, root);
    }
    var table = el("table", { class: "sweep" }, root);
    var head = el("tr", {}, el("thead", {}, table));
    text("th", "", "variant", head);
    page.columns.forEach(function (c, j) { text("th", "", (j + 1) + ". " + c, head); });
    var body = el("tbody", {}, table);
    var stats = page.columns.map(function (_, j) {
      var seqs = [];
      page.rows.forEach(function (r) { if (r.cells[j]) seqs.push(r.cells[j]); });
      return page.task === "expressions" ? seqStats(seqs) : null;
    });
    page.rows.forEach(function (r, i) {
      var tr = el("tr", { class: "variant-row" + (r.truth ? " gt" : ""), "data-variant": r.label }, body);
      var th = text("th", "", r.label, tr);
      if (r.note) text("small", "", r.note, th);
      r.cells.forEach(function (cell, j) {
        var td = el("td", {}, tr);
        if (!cell) { text("span", "missing", "–", td); return; }
        if (page.task === "keyframes") faceFigure(data, cell, "", r.truth ? "gt" : "gen", "s" + i + "-" + j, td);
        else seqPanel(data, cell, "", r.truth ? "gt" : "gen", stats[j].tmax, stats[j].scale, stats[j].scale, td);
      });
    });
    if (page.task === "expressions") animate(root, page.fps);
  }

  // ---------------------------------------------------------------------------------------------
  // The served model's page: a form that asks this server's endpoint (same origin) and draws the answer
  // ---------------------------------------------------------------------------------------------

  function field(form, label, name, value, kind) {
    var row = el("label", { class: "field" }, form);
    text("span", "", label, row);
    var input = kind === "textarea" ? el("textarea", { name: name, rows: "4" }, row)
      : el("input", { name: name, type: kind || "text" }, row);
    input.value = value;
    return input;
  }

  /* The answered keyframes as a 60 Hz animation (interpolate(): what `facelab export` writes): the face
     and the 61 bars of the current frame, play/pause, a frame slider, previous/next keyframe, the frame
     counter (data-frame), and "download CSV": the same request again with ?format=csv, the API's own file. */
  function player(data, rows, anim, ask, parent) {
    var a = interpolate(rows, anim.spacing, anim.fps, data.rig), n = a.frames.length, fps = anim.fps;
    var sec = el("section", { class: "item player", "data-frames": String(n), "data-fps": String(fps),
                              "data-keyframes": a.keyFrames.join(",") }, parent);
    text("h2", "", "animation: " + rows.length + " keyframe" + (rows.length === 1 ? "" : "s") + " " +
         anim.spacing + " s apart, " + n + " frames at " + fps + " Hz (PCHIP, as facelab export)", sec);
    var bar = el("div", { class: "controls" }, sec);
    var prev = el("button", { class: "anim-prev", type: "button", title: "previous keyframe" }, bar);
    prev.textContent = "\u00ab keyframe";
    var play = el("button", { class: "anim-play", type: "button" }, bar);
    play.textContent = "play";
    var next = el("button", { class: "anim-next", type: "button", title: "next keyframe" }, bar);
    next.textContent = "keyframe \u00bb";
    var ticks = el("datalist", { id: "anim-keyframes" }, bar);
    a.keyFrames.forEach(function (f) { el("option", { value: String(f) }, ticks); });
    var scrub = el("input", { class: "anim-scrub", type: "range", min: "0", max: String(n - 1), step: "1",
                              value: "0", list: "anim-keyframes", "aria-label": "frame" }, bar);
    var counter = el("output", { class: "anim-frame", "data-frame": "0" }, bar);
    var csv = el("button", { class: "anim-csv", type: "button", title: "the server's Live Link Face CSV of these keyframes" }, bar);
    csv.textContent = "download CSV";
    var note = el("span", { class: "anim-note" }, bar);
    var body = el("div", { class: "item-body" }, sec);
    var fig = el("figure", { class: "face-figure gen anim" }, body);
    var svg = faceSVG(data.rig, a.frames[0], "anim");
    fig.appendChild(svg);
    var cap = el("figcaption", {}, fig), capHead = text("strong", "", "", cap), capTop = text("span", "top", "", cap);
    var det = el("details", { class: "bars-box", open: "" }, body);
    text("summary", "", "61 channels (current frame)", det);
    var table = bars(data, [{ label: "frame", cls: "gen", values: a.frames[0] }], det);
    var cur = 0, playing = false, raf = 0, t0 = 0, from = 0;

    function show(i) {
      cur = Math.max(0, Math.min(n - 1, i));
      var values = a.frames[cur], fresh = faceSVG(data.rig, values, "anim");
      fig.replaceChild(fresh, svg);
      svg = fresh;
      setBars(table, data, values);
      scrub.value = String(cur);
      var k = a.keyFrames.indexOf(cur);
      counter.setAttribute("data-frame", String(cur));
      counter.textContent = "frame " + cur + " / " + (n - 1) + " · " + a.times[cur].toFixed(3) + " s" +
        (k >= 0 ? " · keyframe " + (k + 1) : "");
      capHead.textContent = k >= 0 ? "keyframe " + (k + 1) : "frame " + cur;
      var top = topList(data, values, 4);
      capTop.textContent = top.length ? top.join(", ") : "(neutral)";
    }
    function tick(now) {
      if (!playing) return;
      if (!sec.isConnected) { playing = false; return; }  // a new answer replaced this player
      show((from + Math.floor(((now - t0) / 1000) * fps)) % n);
      raf = requestAnimationFrame(tick);
    }
    function stop() {
      playing = false;
      cancelAnimationFrame(raf);
      play.textContent = "play";
      sec.removeAttribute("data-playing");
    }
    play.addEventListener("click", function () {
      if (playing) { stop(); return; }
      if (n < 2) return;
      playing = true;
      from = cur === n - 1 ? 0 : cur;
      t0 = performance.now();
      play.textContent = "pause";
      sec.setAttribute("data-playing", "1");
      raf = requestAnimationFrame(tick);
    });
    scrub.addEventListener("input", function () { stop(); show(Number(scrub.value)); });
    next.addEventListener("click", function () {
      stop();
      var later = a.keyFrames.filter(function (f) { return f > cur; });
      show(later.length ? later[0] : cur);
    });
    prev.addEventListener("click", function () {
      stop();
      var earlier = a.keyFrames.filter(function (f) { return f < cur; });
      show(earlier.length ? earlier[earlier.length - 1] : cur);
    });
    csv.addEventListener("click", function () {
      var url = ask.endpoint + (ask.endpoint.indexOf("?") >= 0 ? "&" : "?") + "format=csv";
      note.className = "anim-note";
      note.textContent = "asking " + url + " …";
      fetch(url, { method: "POST", headers: ask.headers, body: JSON.stringify(ask.body) })
        .then(function (r) {
          if (!r.ok) return r.text().then(function (t) { throw new Error(r.status + ": " + t); });
          var disp = r.headers.get("Content-Disposition") || "", m = /filename="?([^";]+)"?/.exec(disp);
          return r.blob().then(function (b) { return { blob: b, name: m ? m[1] : "keyframes.csv" }; });
        })
        .then(function (got) {
          var href = URL.createObjectURL(new Blob([got.blob], { type: "text/csv" }));
          var link = el("a", { href: href, download: got.name, class: "anim-csv-link" }, bar);
          link.textContent = got.name;
          link.click();
          note.textContent = "";
          setTimeout(function () { URL.revokeObjectURL(href); link.remove(); }, 60000);
        })
        .catch(function (e) { note.className = "anim-note error"; note.textContent = String(e.message || e); });
    });
    show(0);
    return sec;
  }

  /* KeyframeFace §4.1 (Input Standardization) on a served keyframes page: free text -> POST /v1/scripts ->
     the script fills the form's background / emotion / keyframes fields for the user to edit; the form's
     own button then asks /v1/keyframes. The writer is named beside the button (the tiny one: untrained). */
  function writerLabel(w) {
    if (!w) return "script writer: named with its first script";
    return "script writer: " + w.model + (w.tiny ? " \u2014 " + (w.note || "untrained test model") : "");
  }

  function scriptWriter(page, root, form, inputs) {
    var sec = el("section", { class: "script-writer" });
    root.insertBefore(sec, form);
    var row = el("label", { class: "field" }, sec);
    text("span", "", "free text: what the face should show (an LLM writes the script below from it)", row);
    var box = el("textarea", { name: "free_text", rows: "3" }, row);
    var bar = el("div", { class: "controls" }, sec);
    var go = el("button", { type: "button", class: "write-script" }, bar);
    go.textContent = "Write script";
    var kl = el("label", {}, bar);
    text("span", "", "at most ", kl);
    var maxk = el("input", { name: "max_keyframes", type: "number", min: "1", max: "5", value: "5" }, kl);
    text("span", "", " keyframes", kl);
    var w = page.scripts.writer;
    var label = text("span", "writer" + (w && w.tiny ? " tiny" : ""), writerLabel(w), bar);
    var st = el("p", { class: "status script-status" }, sec);
    go.addEventListener("click", function () {
      var headers = { "Content-Type": "application/json" };
      if (inputs.key.value) headers["X-API-Key"] = inputs.key.value;
      var body = { text: box.value };
      if (maxk.value !== "") body.max_keyframes = Number(maxk.value);
      st.className = "status script-status";
      st.textContent = "asking " + page.scripts.endpoint + " \u2026";
      go.disabled = true;
      fetch(page.scripts.endpoint, { method: "POST", headers: headers, body: JSON.stringify(body) })
        .then(function (r) { return r.json().then(function (j) { return { ok: r.ok, code: r.status, json: j }; }); })
        .then(function (r) {
          go.disabled = false;
          if (!r.ok) {
            st.className = "status script-status error";
            st.textContent = r.code + ": " + JSON.stringify(r.json.detail || r.json);
            return;
          }
          var s = r.json.script, wr = r.json.writer;
          inputs.background.value = s.background;
          inputs.emotion.value = s.emotion;
          inputs.keyframes.value = s.keyframes.join("\n");
          label.textContent = writerLabel(wr);
          label.className = "writer" + (wr && wr.tiny ? " tiny" : "");
          st.textContent = "script written (seed " + r.json.seed + "): edit it below, then generate";
          sec.setAttribute("data-written", "1");
        })
        .catch(function (e) { go.disabled = false; st.className = "status script-status error"; st.textContent = String(e); });
    });
  }

  function servePage(data, root) {
    var page = data.page, form = el("form", { class: "ask" }, root);
    var inputs = {};
    if (page.task === "keyframes") {
      inputs.background = field(form, "background", "background", page.example.background || "");
      inputs.emotion = field(form, "emotion", "emotion", page.example.emotion || "");
      inputs.keyframes = field(form, "keyframes (one per line)", "keyframes",
                               (page.example.keyframes || []).join("\n"), "textarea");
    } else {
      inputs.text = field(form, "text", "text", page.example.text || "");
      inputs.num_samples = field(form, "samples", "num_samples", String(page.example.num_samples || 2), "number");
      inputs.max_frames = field(form, "max frames", "max_frames", String(page.example.max_frames || 128), "number");
      inputs.seed = field(form, "seed", "seed", String(page.example.seed === undefined ? 0 : page.example.seed), "number");
    }
    inputs.key = field(form, "API key (if the server needs one)", "key", "", "password");
    el("button", { type: "submit" }, form).textContent = "generate";
    if (page.task === "keyframes" && page.scripts) scriptWriter(page, root, form, inputs);  // §4.1
    var status = el("p", { class: "status" }, root), out = el("div", { class: "answer" }, root);

    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var body;
      if (page.task === "keyframes") {
        body = { background: inputs.background.value, emotion: inputs.emotion.value,
                 keyframes: inputs.keyframes.value.split("\n").map(function (s) { return s.trim(); })
                   .filter(function (s) { return s; }) };
      } else {
        body = { text: inputs.text.value, num_samples: Number(inputs.num_samples.value),
                 max_frames: Number(inputs.max_frames.value),
                 seed: inputs.seed.value === "" ? null : Number(inputs.seed.value) };
      }
      var headers = { "Content-Type": "application/json" };
      if (inputs.key.value) headers["X-API-Key"] = inputs.key.value;
      status.textContent = "asking " + page.endpoint + " …";
      status.className = "status";
      fetch(page.endpoint, { method: "POST", headers: headers, body: JSON.stringify(body) })
        .then(function (r) { return r.json().then(function (j) { return { ok: r.ok, code: r.status, json: j }; }); })
        .then(function (r) {
          out.textContent = "";
          if (!r.ok) {
            status.className = "status error";
            status.textContent = r.code + ": " + JSON.stringify(r.json.detail || r.json);
            return;
          }
          status.textContent = (r.json.model ? (r.json.model.name || "") + " " + (r.json.model.version || "") : "");
          if (page.task === "keyframes") {
            var items = r.json.keyframes.map(function (kf, i) {
              return { text: "keyframe " + kf.index + ": " + (body.keyframes[i] || ""),
                       values: data.channels.map(function (n) { return kf.blendshapes[n]; }) };
            });
            items.forEach(function (it, i) {
              var sec = el("section", { class: "item", "data-item": String(i) }, out);
              text("h2", "", it.text, sec);
              var b = el("div", { class: "item-body" }, sec), row = el("div", { class: "side-by-side" }, b);
              faceFigure(data, it.values, "generated", "gen", "a" + i, row);
              var det = el("details", { class: "bars-box", open: "" }, b);
              text("summary", "", "61 channels", det);
              bars(data, [{ label: "generated", cls: "gen", values: it.values }], det);
            });
            var anim = page.animation || { fps: 60, spacing: 1 };
            var sec = player(data, items.map(function (it) { return it.values; }), anim,
                             { endpoint: page.endpoint, headers: headers, body: body }, out);
            out.insertBefore(sec, out.firstChild);  // the animation first, then each keyframe
          } else {
            var seqs = r.json.sequences.map(function (s) { return s.frames; });
            var d = { rig: data.rig, channels: data.channels, regions: data.regions,
                      page: { fps: r.json.fps || page.fps, dims: page.dims, curves: page.curves } };
            el("button", { class: "play", type: "button" }, out).textContent = "play over time";
            legend(d, out);
            var sec = el("section", { class: "item" }, out);
            text("h2", "", body.text, sec);
            var row = el("div", { class: "side-by-side" }, sec), st = seqStats(seqs);
            seqs.forEach(function (s, k) {
              seqPanel(d, s, "sample " + (k + 1), "gen", st.tmax, st.scale, st.scale, row);
            });
            animate(out, d.page.fps);
            if (window.facelabFlame) {  // the FLAME avatars: GET /v1/flame, or why not (flame_gl.js)
              window.facelabFlame.served(out, seqs, { endpoint: page.endpoint, headers: headers,
                                                      fps: d.page.fps, tmax: st.tmax });
            }
          }
          out.setAttribute("data-answered", "1");
        })
        .catch(function (e) { status.className = "status error"; status.textContent = String(e); });
    });
  }

  function boot() {
    var node = document.getElementById("facelab-data"), root = document.getElementById("facelab-root");
    if (!node || !root) return;
    var data = JSON.parse(node.textContent);
    var kind = data.page.kind;
    if (kind === "keyframes") keyframesPage(data, root);
    else if (kind === "expressions") expressionsPage(data, root);
    else if (kind === "sweep") sweepPage(data, root);
    else if (kind === "serve") servePage(data, root);
    root.setAttribute("data-ready", "1");
  }

  window.FaceLab = { geometry: geometry, segments: segments, pathD: pathD, faceSVG: faceSVG, fmt: fmt, boot: boot,
                     pchip: pchip, interpolate: interpolate };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot);
  else boot();
})();
