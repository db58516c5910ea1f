/* facelab FLAME avatar: the user's own FLAME mesh posed by an answer's 53 coefficients per frame (50
 * expression + 3 jaw axis-angle) and drawn with WebGL -- own code, no library, no network.
 *
 * Inlined into every page by facelab.viewer.html before face.js; face.js calls two hooks:
 *   facelabFlame.served(container, seqs, opts) -- the served page, after an expressions answer: asks
 *     GET /v1/flame (with the page's API key) and draws each sample, or says why not;
 *   facelabFlame.preview(root, data) -- a run's expressions page: the mesh embedded in the page
 *     (<script type="application/json" id="facelab-flame">), or the reason it is not there.
 * The avatar follows the page's "play over time" cursor (face.js animate() leaves its clock in
 * container.facelabClock): the same frame the cursor is on, held on the last frame of a shorter sample.
 *
 * The mesh payload (facelab/viewer/flame_payload.py): "FLGL", a uint32 header length, a JSON header,
 * little-endian arrays: v_template (V,3), exprdirs (50,V,3), posedirs_jaw (9,V,3), joints_template (5,3),
 * joints_exprdirs (50,5,3), weights (V,5), faces (F,3) uint32; int16 arrays carry a scale per leading index.
 *
 * vertices() is facelab.viewer.flame.flame_vertices with only the jaw rotated (FLAME, Li et al. 2017,
 * Sec. 3): v = T + sum_k psi_k E_k (Eq. 5); J = joints_template + sum_k psi_k joints_exprdirs[k] (the
 * regressor of Eq. 1 applied to T + B_E, folded in by the server); R = Rodrigues(jaw);
 * v += sum_i (R - I)_i P_i over the jaw's nine pose blendshapes (Eq. 4, row-major); world transforms
 * along the kinematic tree (every joint but the jaw at identity); linear blend skinning (Eq. 1):
 * v' = sum_k w_vk (G_k v + t_k - G_k J_k). Arithmetic in float64, the result in a Float32Array.
 * tests/test_flame_gl.py compares it with flame_vertices in headless Chromium.
 */
(function () {
  "use strict";

  var NOT_CONFIGURED = "no FLAME model configured: set FACELAB_FLAME_MODEL to your own FLAME 2020 " +
    "generic_model.pkl or .npz";
  var SKIN = [0.86, 0.70, 0.60], AMBIENT = 0.28;  // as the GIF (flame.py _SKIN, _AMBIENT, _LIGHT)
  var LIGHT = (function () { var l = [0.35, 0.45, 1.0], n = Math.hypot(l[0], l[1], l[2]);
    return [l[0] / n, l[1] / n, l[2] / n]; })();
  var WIDTH = 240, HEIGHT = 280, MARGIN = 0.1;

  // -------------------------------------------------------------------------------------------
  // The payload
  // -------------------------------------------------------------------------------------------

  function fromBase64(s) {
    var bin = atob(s), out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out.buffer;
  }

  function decode(buffer) {
    var bytes = new Uint8Array(buffer);
    if (String.fromCharCode(bytes[0], bytes[1], bytes[2], bytes[3]) !== "FLGL") {
      throw new Error("not a facelab FLAME mesh payload");
    }
    var n = new DataView(buffer).getUint32(4, true);
    var header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n))), base = 8 + n, arrays = {};
    header.arrays.forEach(function (e) {
      var count = e.shape.reduce(function (a, b) { return a * b; }, 1), at = base + e.offset, a;
      if (e.dtype === "float32") a = new Float32Array(buffer.slice(at, at + 4 * count));
      else if (e.dtype === "uint32") a = new Uint32Array(buffer.slice(at, at + 4 * count));
      else if (e.dtype === "int16") {
        var q = new Int16Array(buffer.slice(at, at + 2 * count)), per = count / e.shape[0];
        a = new Float32Array(count);
        for (var i = 0; i < count; i++) a[i] = q[i] * e.scale[Math.floor(i / per)];
      } else throw new Error("FLAME payload: unknown dtype " + e.dtype);
      arrays[e.name] = a;
    });
    return { nV: header.n_vertices, nF: header.n_faces, nExpr: header.n_expr, nJ: header.n_joints,
             jaw: header.jaw_joint, parents: header.parents, source: header.source,
             template: arrays.v_template, exprdirs: arrays.exprdirs, posedirs: arrays.posedirs_jaw,
             joints: arrays.joints_template, jointdirs: arrays.joints_exprdirs, weights: arrays.weights,
             faces: arrays.faces };
  }

  // -------------------------------------------------------------------------------------------
  // The maths: flame.py's axis_angle_to_matrix and flame_vertices (jaw only)
  // -------------------------------------------------------------------------------------------

  /* Rodrigues: R = I + a K + b K^2, a = sin t / t, b = (1 - cos t) / t^2 (Taylor near 0); row-major 9. */
  function rodrigues(r) {
    var x = Number(r[0]) || 0, y = Number(r[1]) || 0, z = Number(r[2]) || 0;
    var t2 = x * x + y * y + z * z, t = Math.sqrt(t2), a, b;
    if (t2 < 1e-8) { a = 1 - t2 / 6; b = 0.5 - t2 / 24; }
    else { a = Math.sin(t) / t; b = (1 - Math.cos(t)) / t2; }
    var K = [0, -z, y, z, 0, -x, -y, x, 0], R = [];
    for (var i = 0; i < 3; i++) {
      for (var j = 0; j < 3; j++) {
        var kk = 0;
        for (var m = 0; m < 3; m++) kk += K[3 * i + m] * K[3 * m + j];
        R.push((i === j ? 1 : 0) + a * K[3 * i + j] + b * kk);
      }
    }
    return R;
  }

  function matmul(A, B) {
    var C = [];
    for (var i = 0; i < 3; i++) for (var j = 0; j < 3; j++) {
      C.push(A[3 * i] * B[j] + A[3 * i + 1] * B[3 + j] + A[3 * i + 2] * B[6 + j]);
    }
    return C;
  }

  function apply(A, v) {
    return [A[0] * v[0] + A[1] * v[1] + A[2] * v[2], A[3] * v[0] + A[4] * v[1] + A[5] * v[2],
            A[6] * v[0] + A[7] * v[1] + A[8] * v[2]];
  }

  var I3 = [1, 0, 0, 0, 1, 0, 0, 0, 1];

  /* The posed vertices (Float32Array of 3V) for one frame: expr (50 values), jaw (3, axis-angle). */
  function vertices(mesh, expr, jaw, out) {
    var n3 = mesh.nV * 3, nJ = mesh.nJ, i, k, m, off;
    var v = mesh._scratch || (mesh._scratch = new Float64Array(n3));
    for (i = 0; i < n3; i++) v[i] = mesh.template[i];
    var J = [];
    for (m = 0; m < nJ * 3; m++) J.push(mesh.joints[m]);
    for (k = 0; k < mesh.nExpr; k++) {
      var p = Number(expr[k]) || 0;
      if (p === 0) continue;
      off = k * n3;
      for (i = 0; i < n3; i++) v[i] += p * mesh.exprdirs[off + i];
      for (m = 0; m < nJ * 3; m++) J[m] += p * mesh.jointdirs[k * nJ * 3 + m];
    }
    var R = rodrigues(jaw);
    for (i = 0; i < 9; i++) {  // pose blendshapes of the jaw: (R - I) flattened row-major
      var c = R[i] - I3[i];
      if (c === 0) continue;
      off = i * n3;
      for (m = 0; m < n3; m++) v[m] += c * mesh.posedirs[off + m];
    }
    // world rotations and translations along the tree, then the rest pose removed: t_k - G_k J_k
    var G = [], T = [], O = [];
    for (k = 0; k < nJ; k++) {
      var rot = k === mesh.jaw ? R : I3, par = mesh.parents[k], Jk = [J[3 * k], J[3 * k + 1], J[3 * k + 2]];
      if (par < 0) { G.push(rot); T.push(Jk); }
      else {
        var d = apply(G[par], [Jk[0] - J[3 * par], Jk[1] - J[3 * par + 1], Jk[2] - J[3 * par + 2]]);
        G.push(matmul(G[par], rot));
        T.push([T[par][0] + d[0], T[par][1] + d[1], T[par][2] + d[2]]);
      }
      var gj = apply(G[k], Jk);
      O.push([T[k][0] - gj[0], T[k][1] - gj[1], T[k][2] - gj[2]]);
    }
    out = out || new Float32Array(n3);
    var w = mesh.weights, M = new Float64Array(9), o = new Float64Array(3);
    for (i = 0; i < mesh.nV; i++) {
      M.fill(0); o.fill(0);
      for (k = 0; k < nJ; k++) {
        var wk = w[i * nJ + k];
        if (wk === 0) continue;
        for (m = 0; m < 9; m++) M[m] += wk * G[k][m];
        o[0] += wk * O[k][0]; o[1] += wk * O[k][1]; o[2] += wk * O[k][2];
      }
      var x = v[3 * i], y = v[3 * i + 1], z = v[3 * i + 2];
      out[3 * i] = M[0] * x + M[1] * y + M[2] * z + o[0];
      out[3 * i + 1] = M[3] * x + M[4] * y + M[5] * z + o[1];
      out[3 * i + 2] = M[6] * x + M[7] * y + M[8] * z + o[2];
    }
    return out;
  }

  /* Per-vertex normals: the sum of the adjacent faces' (area-weighted) normals; normalized by the shader. */
  function normals(mesh, pos, out) {
    out = out || new Float32Array(mesh.nV * 3);
    out.fill(0);
    var f = mesh.faces;
    for (var t = 0; t < mesh.nF; t++) {
      var a = 3 * f[3 * t], b = 3 * f[3 * t + 1], c = 3 * f[3 * t + 2];
      var ux = pos[b] - pos[a], uy = pos[b + 1] - pos[a + 1], uz = pos[b + 2] - pos[a + 2];
      var vx = pos[c] - pos[a], vy = pos[c + 1] - pos[a + 1], vz = pos[c + 2] - pos[a + 2];
      var nx = uy * vz - uz * vy, ny = uz * vx - ux * vz, nz = ux * vy - uy * vx;
      out[a] += nx; out[a + 1] += ny; out[a + 2] += nz;
      out[b] += nx; out[b + 1] += ny; out[b + 2] += nz;
      out[c] += nx; out[c + 1] += ny; out[c + 2] += nz;
    }
    return out;
  }

  // -------------------------------------------------------------------------------------------
  // WebGL: an orthographic front view, Lambert + ambient, two-sided, depth-tested
  // -------------------------------------------------------------------------------------------

  var VS = "attribute vec3 aPos; attribute vec3 aNrm; uniform vec3 uCentre; uniform vec3 uScale;" +
    "varying vec3 vNrm; void main() { vNrm = aNrm; gl_Position = vec4((aPos - uCentre) * uScale, 1.0); }";
  var FS = "precision mediump float; varying vec3 vNrm; uniform vec3 uLight; uniform vec3 uSkin;" +
    "uniform float uAmbient; void main() { float l = length(vNrm);" +
    "vec3 n = l > 0.0 ? vNrm / l : vec3(0.0, 0.0, 1.0); if (!gl_FrontFacing) n = -n;" +
    "float d = max(dot(n, uLight), 0.0); gl_FragColor = vec4(uSkin * (uAmbient + (1.0 - uAmbient) * d), 1.0); }";

  function shader(gl, type, src) {
    var s = gl.createShader(type);
    gl.shaderSource(s, src);
    gl.compileShader(s);
    if (!gl.getShaderParameter(s, gl.COMPILE_STATUS)) throw new Error("WebGL shader: " + gl.getShaderInfoLog(s));
    return s;
  }

  function Renderer(canvas, mesh) {
    var opts = { preserveDrawingBuffer: true, antialias: true };
    var gl = canvas.getContext("webgl2", opts), version = 2;
    if (!gl) { gl = canvas.getContext("webgl", opts) || canvas.getContext("experimental-webgl", opts); version = 1; }
    if (!gl) throw new Error("WebGL is not available in this browser");
    var indexType = gl.UNSIGNED_INT, indices = mesh.faces;
    if (version === 1 && !gl.getExtension("OES_element_index_uint")) {
      if (mesh.nV > 65535) throw new Error("WebGL 1 without 32-bit indices cannot draw " + mesh.nV + " vertices");
      indexType = gl.UNSIGNED_SHORT;
      indices = new Uint16Array(mesh.faces);
    }
    var prog = gl.createProgram();
    gl.attachShader(prog, shader(gl, gl.VERTEX_SHADER, VS));
    gl.attachShader(prog, shader(gl, gl.FRAGMENT_SHADER, FS));
    gl.linkProgram(prog);
    if (!gl.getProgramParameter(prog, gl.LINK_STATUS)) throw new Error("WebGL program: " + gl.getProgramInfoLog(prog));
    gl.useProgram(prog);
    var posBuf = gl.createBuffer(), nrmBuf = gl.createBuffer(), idxBuf = gl.createBuffer();
    gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, idxBuf);
    gl.bufferData(gl.ELEMENT_ARRAY_BUFFER, indices, gl.STATIC_DRAW);
    var aPos = gl.getAttribLocation(prog, "aPos"), aNrm = gl.getAttribLocation(prog, "aNrm");
    // a fixed frame: the template's box, a margin for the open jaw; nearer (larger z) is smaller depth
    var lo = [Infinity, Infinity, Infinity], hi = [-Infinity, -Infinity, -Infinity], t = mesh.template;
    for (var i = 0; i < mesh.nV; i++) for (var c = 0; c < 3; c++) {
      lo[c] = Math.min(lo[c], t[3 * i + c]); hi[c] = Math.max(hi[c], t[3 * i + c]);
    }
    var w = canvas.width, h = canvas.height;
    var px = (1 - 2 * MARGIN) * Math.min(w / Math.max(hi[0] - lo[0], 1e-12), h / Math.max(hi[1] - lo[1], 1e-12));
    gl.uniform3f(gl.getUniformLocation(prog, "uCentre"), (lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, (lo[2] + hi[2]) / 2);
    gl.uniform3f(gl.getUniformLocation(prog, "uScale"), (2 * px) / w, (2 * px) / h, -0.5 / Math.max(hi[2] - lo[2], 1e-12));
    gl.uniform3f(gl.getUniformLocation(prog, "uLight"), LIGHT[0], LIGHT[1], LIGHT[2]);
    gl.uniform3f(gl.getUniformLocation(prog, "uSkin"), SKIN[0], SKIN[1], SKIN[2]);
    gl.uniform1f(gl.getUniformLocation(prog, "uAmbient"), AMBIENT);
    gl.enable(gl.DEPTH_TEST);
    gl.viewport(0, 0, w, h);
    var nrm = new Float32Array(mesh.nV * 3);

    this.webgl = version;
    this.draw = function (pos) {
      normals(mesh, pos, nrm);
      gl.clearColor(1, 1, 1, 1);
      gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
      gl.bindBuffer(gl.ARRAY_BUFFER, posBuf);
      gl.bufferData(gl.ARRAY_BUFFER, pos, gl.DYNAMIC_DRAW);
      gl.enableVertexAttribArray(aPos);
      gl.vertexAttribPointer(aPos, 3, gl.FLOAT, false, 0, 0);
      gl.bindBuffer(gl.ARRAY_BUFFER, nrmBuf);
      gl.bufferData(gl.ARRAY_BUFFER, nrm, gl.DYNAMIC_DRAW);
      gl.enableVertexAttribArray(aNrm);
      gl.vertexAttribPointer(aNrm, 3, gl.FLOAT, false, 0, 0);
      gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, idxBuf);
      gl.drawElements(gl.TRIANGLES, mesh.nF * 3, indexType, 0);
    };
  }

  // -------------------------------------------------------------------------------------------
  // On the page
  // -------------------------------------------------------------------------------------------

  function el(tag, attrs, parent, textContent) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (textContent !== undefined) e.textContent = textContent;
    if (parent) parent.appendChild(e);
    return e;
  }

  function say(box, state, msg) {
    box.setAttribute("data-flame", state);
    var p = box.querySelector(".flame-status");
    if (!p) p = box.insertBefore(el("p", { class: "flame-status" }), box.querySelector(".flame-row"));
    p.className = "flame-status" + (state === "drawn" ? "" : " flame-" + state);
    p.textContent = msg;
  }

  /* One canvas.flame per sequence (T x 53), posed and redrawn when the shown frame changes: the frame
     under the page's play cursor (clockHost.facelabClock = {t0, fps} while it plays; the cursor runs
     over tmax frames, then holds a second), held on a shorter sequence's last frame; without a play
     button on the page, the avatar loops by itself on the same schedule. */
  function stage(box, mesh, seqs, labels, fps, tmax, clockHost) {
    var row = el("div", { class: "side-by-side flame-row" }, box), figs = [];
    for (var s = 0; s < seqs.length; s++) {
      var seq = seqs[s];
      if (!seq.length || seq[0].length < mesh.nExpr + 3) {
        say(box, "error", "FLAME mesh: these sequences are not FLAME parameters (50 expression + 3 jaw per frame)");
        return;
      }
      var fig = el("figure", { class: "flame-figure" }, row);
      var canvas = el("canvas", { class: "flame", width: String(WIDTH), height: String(HEIGHT),
                                  "data-frames": String(seq.length), "data-frame": "-1" }, fig);
      var cap = el("figcaption", {}, fig);
      el("strong", {}, cap, labels[s]);
      var counter = el("span", { class: "flame-frame" }, cap, "");
      var r;
      try { r = new Renderer(canvas, mesh); } catch (e) {
        row.remove();
        say(box, "no-webgl", "FLAME mesh: cannot draw here (" + (e.message || e) + "); the run's " +
            "viewer/flame_<i>.gif shows the same avatar");
        return;
      }
      figs.push({ seq: seq, canvas: canvas, counter: counter, r: r, frame: -1, pos: new Float32Array(mesh.nV * 3) });
    }
    say(box, "drawn", "FLAME mesh (" + (mesh.source || "your model") + ", " + mesh.nV + " vertices): " +
        "expression blendshapes + jaw, " + fps + " fps, in step with the play cursor");
    var hasPlay = !!(clockHost && clockHost.querySelector("button.play")), start = performance.now();
    function show(f, i) {
      if (i === f.frame) return;
      f.frame = i;
      var row = f.seq[i];
      vertices(mesh, row.slice(0, mesh.nExpr), row.slice(mesh.nExpr, mesh.nExpr + 3), f.pos);
      f.r.draw(f.pos);
      f.canvas.setAttribute("data-frame", String(i));
      f.counter.textContent = " frame " + (i + 1) + "/" + f.seq.length + " · " + (i / fps).toFixed(2) + " s";
    }
    function tick(now) {
      if (!box.isConnected) return;  // a new answer replaced it
      var clock = clockHost && clockHost.facelabClock, t = null;
      if (clock) t = ((now - clock.t0) / 1000) * clock.fps;
      else if (!hasPlay) t = ((now - start) / 1000) * fps;
      figs.forEach(function (f) {
        if (t === null) return;
        var k = Math.floor(t % (tmax + (clock ? clock.fps : fps)));
        show(f, Math.max(0, Math.min(f.seq.length - 1, k)));
      });
      requestAnimationFrame(tick);
    }
    figs.forEach(function (f) { show(f, 0); });
    requestAnimationFrame(tick);
  }

  var cache = {};

  /* GET the mesh once per URL and key: resolves to the mesh, or rejects with {status, msg}. */
  function load(url, key) {
    var id = url + "\n" + (key || "");
    if (!cache[id]) {
      var headers = key ? { "X-API-Key": key } : {};
      cache[id] = fetch(url, { headers: headers }).then(function (r) {
        if (r.ok) return r.arrayBuffer().then(decode);
        return r.text().then(function (t) {
          var msg = t;
          try { var j = JSON.parse(t); msg = (j.detail && j.detail[0] && j.detail[0].msg) || JSON.stringify(j.detail || j); }
          catch (e) { /* not JSON: the text itself */ }
          delete cache[id];
          throw { status: r.status, msg: msg };
        });
      });
    }
    return cache[id];
  }

  function flameURL(endpoint) {
    return endpoint.replace(/\/v1\/[^\/?]*(\?.*)?$/, "/v1/flame");
  }

  /* The served page's hook: after an expressions answer drawn into container. */
  function served(container, seqs, opts) {
    var box = el("section", { class: "item flame-box", "data-flame": "loading" }, container);
    el("h2", {}, box, "FLAME mesh");
    say(box, "loading", "FLAME mesh: asking the server …");
    var url = opts.url || flameURL(opts.endpoint), key = (opts.headers || {})["X-API-Key"];
    load(url, key).then(function (mesh) {
      if (!box.isConnected) return;
      var labels = seqs.map(function (_, k) { return "sample " + (k + 1); });
      stage(box, mesh, seqs, labels, opts.fps, opts.tmax, container);
    }, function (e) {
      if (e && e.status === 404) say(box, "missing", "FLAME mesh: not configured (" + e.msg + ")");
      else if (e && e.status) say(box, "error", "FLAME mesh: unavailable (" + e.status + ": " + e.msg + ")");
      else say(box, "error", "FLAME mesh: unavailable (" + String((e && e.message) || e) + ")");
    });
    return box;
  }

  /* A run's expressions page: the mesh embedded in the page, one row of avatars per item. */
  function preview(root, data) {
    var node = document.getElementById("facelab-flame"), info = null;
    try { info = node ? JSON.parse(node.textContent) : null; } catch (e) { info = { status: "error", error: String(e) }; }
    var top = el("div", { class: "flame-box flame-page" }, null);
    root.insertBefore(top, root.querySelector("section.item"));
    if (!info || info.status !== "ok") {
      var why = info && info.error ? info.error : NOT_CONFIGURED + " when the run is made";
      say(top, info && info.status === "error" ? "error" : "missing",
          (info && info.status === "error" ? "FLAME mesh: unavailable (" : "FLAME mesh: not configured (") + why + ")");
      return;
    }
    var mesh;
    try { mesh = decode(fromBase64(info.mesh)); } catch (e) { say(top, "error", "FLAME mesh: " + e.message); return; }
    say(top, "drawn", "FLAME mesh embedded (" + mesh.source + "): each sequence below drawn as the posed mesh");
    data.page.items.forEach(function (item, i) {
      var sec = root.querySelector("section.item[data-item='" + i + "']");
      if (!sec) return;
      var box = el("div", { class: "flame-box" }, sec), seqs = [item.gt].concat(item.samples || []);
      var labels = ["ground truth"].concat((item.samples || []).map(function (_, k) {
        return item.samples.length > 1 ? "generated " + (k + 1) : "generated"; }));
      var tmax = Math.max.apply(null, seqs.map(function (s) { return Math.max(1, s.length); }));
      stage(box, mesh, seqs, labels, data.page.fps, tmax, root);
    });
  }

  window.facelabFlame = { decode: decode, fromBase64: fromBase64, rodrigues: rodrigues, vertices: vertices,
                          normals: normals, Renderer: Renderer, load: load, served: served, preview: preview,
                          flameURL: flameURL };
})();
