"""The FLAME mesh for the browser (``flame_gl.js``): the few arrays jaw-only posing needs, packed as
little-endian binary behind a small JSON header -- served by ``GET /v1/flame`` and embedded (quantized)
in an expression run's ``viewer/preview.html`` when ``FACELAB_FLAME_MODEL`` names the user's model.

What :func:`facelab.viewer.flame.flame_vertices` computes with only the jaw rotated (FLAME, Li et al.
2017, Sec. 3, Eqs. 1-5) needs, of the whole model:

* ``v_template`` (V, 3) and the 50 expression components ``exprdirs``, sent as (50, V, 3) so that the
  expression blendshapes ``B_E(psi) = sum_k psi_k E_k`` (Eq. 5) are 50 contiguous multiply-adds;
* the joints: ``J = J_regressor @ (T + B_E(psi))`` is linear in ``psi``, so the regressor (5, V) is
  replaced by its two products ``joints_template = J_regressor @ T`` (5, 3) and
  ``joints_exprdirs[k] = J_regressor @ E_k`` (50, 5, 3): ``J = joints_template + sum_k psi_k
  joints_exprdirs[k]`` is the same joints, computed in float64 here;
* the pose blendshapes ``B_P = sum (R - I) P`` (Eq. 4): with every joint but the jaw at identity, only
  the jaw's nine columns of ``posedirs`` are non-zero terms (columns ``9 (jaw - 1)`` to ``9 jaw``,
  ``R - I`` flattened row-major), sent as ``posedirs_jaw`` (9, V, 3);
* linear blend skinning (Eq. 1): ``weights`` (V, 5) and the kinematic tree ``parents`` (in the header);
* ``faces`` (F, 3) uint32, wound so their normals point out of the head (as the GIF draws them).

Layout (:data:`MAGIC`): the 4 bytes ``FLGL``, a uint32 (little endian) header length ``H``, ``H`` bytes of
UTF-8 JSON (padded with spaces so the data starts at a multiple of 8), then the arrays. The header
lists each array's ``name``, ``dtype`` (``float32``, ``uint32`` or ``int16``), ``shape``, ``offset``
(from the start of the data) and, for ``int16``, ``scale``: one float per leading index, value =
``q * scale[k]``. The route sends float32 (exact to float32); an HTML artifact embeds ``exprdirs`` and
``posedirs_jaw`` quantized to int16 (:func:`mesh_payload` ``quantize=True``): FLAME 2020's 5023
vertices then take about 2.1 MB (2.8 MB as base64) instead of 3.9 MB (5.2 MB), at an error of at
most ``max|E_k| / 65534`` per vertex coordinate and unit of ``psi_k`` (a step is 1/32767 of the
component's largest displacement).

Nothing of the user's file is shipped but these derived arrays; the header names the file by its base
name only.
"""

from __future__ import annotations

import base64
import functools
import json
import struct
from pathlib import Path

import numpy as np

from facelab.viewer.flame import FLAME_ENV, JAW_JOINT, N_EXPR, N_JOINTS, FlameError, FlameModel, _outward_faces

MAGIC = b"FLGL"
VERSION = 1
MEDIA_TYPE = "application/vnd.facelab.flame-mesh"
NOT_CONFIGURED = (
    f"no FLAME model configured: set {FLAME_ENV} to your own FLAME 2020 generic_model.pkl or .npz "
    "(FLAME is licensed; facelab never ships or downloads it)"
)
MAX_EMBED_BYTES = 6 * 1024 * 1024
"""An HTML artifact embeds the (quantized) mesh only up to this many bytes (FLAME 2020: about 2.1 MB)."""

_QUANTIZED = ("exprdirs", "posedirs_jaw")


def mesh_arrays(model: FlameModel) -> dict[str, np.ndarray]:
    """The arrays the browser poses the mesh with (float64 here; see the module docstring), in payload order."""
    exprdirs = np.ascontiguousarray(model.exprdirs.transpose(2, 0, 1))  # (50, V, 3)
    jaw_cols = slice(9 * (JAW_JOINT - 1), 9 * JAW_JOINT)
    return {
        "v_template": model.v_template,
        "exprdirs": exprdirs,
        "posedirs_jaw": np.ascontiguousarray(model.posedirs[:, :, jaw_cols].transpose(2, 0, 1)),  # (9, V, 3)
        "joints_template": model.J_regressor @ model.v_template,  # (5, 3)
        "joints_exprdirs": np.einsum("jv,kvc->kjc", model.J_regressor, exprdirs),  # (50, 5, 3)
        "weights": model.weights,
        "faces": _outward_faces(model),
    }


def _quantize(a: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """int16 per leading index: ``q = round(a / s)``, ``s = max|a[k]| / 32767`` (1 for an all-zero slice)."""
    flat = a.reshape(a.shape[0], -1)
    peak = np.abs(flat).max(axis=1)
    scale = np.where(peak > 0, peak / 32767.0, 1.0).astype(np.float32).astype(np.float64)
    q = np.clip(np.rint(flat / scale[:, None]), -32767, 32767).astype("<i2")
    return q.reshape(a.shape), [float(s) for s in scale]


@functools.lru_cache(maxsize=4)
def mesh_payload(model: FlameModel, quantize: bool = False) -> bytes:
    """The packed mesh of ``model`` (see the module docstring); cached per model object and encoding
    (:func:`facelab.viewer.flame.configured_model` keeps one object per file version)."""
    entries, blobs, offset = [], [], 0
    for name, value in mesh_arrays(model).items():
        entry: dict = {"name": name, "shape": list(value.shape)}
        if name == "faces":
            data = np.ascontiguousarray(value, dtype="<u4")
            entry["dtype"] = "uint32"
        elif quantize and name in _QUANTIZED:
            data, entry["scale"] = _quantize(value)
            entry["dtype"] = "int16"
        else:
            data = np.ascontiguousarray(value, dtype="<f4")
            entry["dtype"] = "float32"
        raw = data.tobytes()
        entry["offset"] = offset
        entries.append(entry)
        pad = -len(raw) % 8
        blobs.append(raw + b"\0" * pad)
        offset += len(raw) + pad
    header = {
        "format": "facelab-flame-mesh",
        "version": VERSION,
        "source": Path(model.source).name,
        "n_vertices": model.n_vertices,
        "n_faces": int(model.f.shape[0]),
        "n_expr": N_EXPR,
        "n_joints": N_JOINTS,
        "jaw_joint": JAW_JOINT,
        "parents": [int(p) for p in model.parents],
        "arrays": entries,
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return MAGIC + struct.pack("<I", len(text)) + text + b"".join(blobs)


def read_payload(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """Unpack :func:`mesh_payload` (int16 arrays dequantized to float64): the header and the arrays."""
    if data[:4] != MAGIC:
        raise ValueError("not a facelab FLAME mesh payload (magic)")
    (n,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    dtypes = {"float32": "<f4", "uint32": "<u4", "int16": "<i2"}
    out = {}
    for e in header["arrays"]:
        dt = np.dtype(dtypes[e["dtype"]])
        count = int(np.prod(e["shape"]))
        a = np.frombuffer(data, dtype=dt, count=count, offset=base + e["offset"]).reshape(e["shape"])
        if "scale" in e:
            a = a * np.asarray(e["scale"]).reshape((-1,) + (1,) * (a.ndim - 1))
        out[e["name"]] = a
    return header, out


def embed(environ=None) -> dict:
    """What an expression run's HTML artifact embeds for the avatar: ``{"mesh": base64}`` of the
    quantized payload (``status: ok``) when ``FACELAB_FLAME_MODEL`` names a loadable model that fits
    :data:`MAX_EMBED_BYTES`, else ``{"status": "missing" | "error", "error": why}`` -- the page shows the
    reason instead of the mesh.
    Never raises for a bad file: a preview must not fail a run."""
    from facelab.viewer.flame import configured_model

    try:
        model = configured_model(environ)
    except FlameError as exc:
        return {"status": "error", "error": f"{FLAME_ENV}: {exc}"}
    if model is None:
        return {"status": "missing", "error": NOT_CONFIGURED}
    data = mesh_payload(model, quantize=True)
    if len(data) > MAX_EMBED_BYTES:
        return {
            "status": "error",
            "error": f"the FLAME model's mesh ({len(data) / 2**20:.1f} MB packed) is larger than "
            f"{MAX_EMBED_BYTES / 2**20:.0f} MB; it is not embedded in this page (facelab serve's /viewer shows it)",
        }
    return {"status": "ok", "mesh": base64.b64encode(data).decode("ascii"), "source": Path(model.source).name}


def route_answer(environ=None) -> tuple[int, bytes | dict]:
    """``GET /v1/flame``: ``(200, payload bytes)``, ``(404, error body)`` when no model is configured, or
    ``(500, error body)`` naming the variable and the file's problem (a wrong shape, a refused global)."""
    from facelab.viewer.flame import configured_model

    try:
        model = configured_model(environ)
    except FlameError as exc:
        msg = f"the FLAME model {FLAME_ENV} names cannot be used: {exc}"
        return 500, {"detail": [{"field": FLAME_ENV, "msg": msg, "type": "bad_flame_model"}]}
    if model is None:
        return 404, {"detail": [{"field": FLAME_ENV, "msg": NOT_CONFIGURED, "type": "flame_not_configured"}]}
    return 200, mesh_payload(model)
