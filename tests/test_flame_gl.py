"""FLAME avatars in the browser (facelab/viewer/flame_gl.js, facelab/viewer/flame_payload.py): the mesh
payload, the JS posing maths against Python's flame_vertices in headless Chromium (SwiftShader WebGL),
a run's page with the mesh embedded, and the reasons shown when there is no usable model.

The served route (`GET /v1/flame` of a real `facelab serve`) is tested in tests/test_serve_faults.py,
whose servers are started with FACELAB_FLAME_MODEL naming the model built here (:func:`sphere_flame`)
or set empty. FLAME is licensed: every model here is a synthetic FLAME-format pickle
(tests/test_flame.py's writer)."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest

from facelab.viewer import flame_payload
from facelab.viewer.flame import FLAME_ENV, flame_vertices, load_flame
from facelab.viewer.html import expression_payload, write_run_preview
from test_flame import flame_arrays, write_flame_pkl

CHROMIUM_ARGS = ["--enable-unsafe-swiftshader"]  # WebGL on SwiftShader where no GPU is (headless Chromium)


def sphere_flame(path: Path, seed: int = 3) -> Path:
    """A synthetic FLAME 2020-format pickle whose template is a closed 'head' (a UV sphere, outward faces
    mixed with inward ones so the winding fix is used): every joint has vertices skinned to it, the lower
    half mostly to the jaw; eyes are the jaw's children (a tree deeper than FLAME's, so the world
    transforms are exercised); pose and expression bases random."""
    rng = np.random.default_rng(seed)
    n_lat, n_lon = 18, 28
    lat = np.linspace(0.12, np.pi - 0.12, n_lat)
    lon = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    v = np.stack([np.sin(la) * np.sin(lo), np.cos(la), np.sin(la) * np.cos(lo)], -1).reshape(-1, 3) * 0.1
    faces = []
    for i in range(n_lat - 1):
        for j in range(n_lon):
            a, b = i * n_lon + j, i * n_lon + (j + 1) % n_lon
            faces += [(a, c := a + n_lon, b), (b, c, b + n_lon)]
    arrays = flame_arrays(n_v=len(v), n_f=len(faces), seed=seed)
    w = rng.random((len(v), 5)) * 0.1
    w[v[:, 1] < -0.02, 2] += 1.0  # the lower half turns with the jaw
    w[v[:, 1] >= -0.02, 1] += 1.0
    arrays.update(
        v_template=v,
        f=np.array(faces, dtype=np.uint32),
        weights=w / w.sum(axis=1, keepdims=True),
        shapedirs=rng.normal(size=(len(v), 3, 400)) * 6e-4,
        posedirs=rng.normal(size=(len(v), 3, 36)) * 2e-3,
        kintree_table=np.array([[4294967295, 0, 1, 2, 2], [0, 1, 2, 3, 4]], dtype=np.int64),
    )
    return write_flame_pkl(path, arrays)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return sphere_flame(tmp_path_factory.mktemp("flame-gl") / "generic_model.pkl")


def _sequences(rng, n_items=2, n_samples=2):
    """Per item: a ground truth and samples, (T, 53) each with a jaw that opens and closes."""

    def seq(t):
        s = rng.normal(size=(t, 53)) * 0.8
        s[:, 50:] = 0.0
        s[:, 50] = 0.35 * np.sin(np.linspace(0, np.pi, t))  # the jaw opens and closes
        return s

    truth = [seq(24) for _ in range(n_items)]
    generated = [[seq(int(rng.integers(12, 24))) for _ in range(n_samples)] for _ in range(n_items)]
    return truth, generated


def _launch(pw):
    from test_e2e import _chromium

    return pw.chromium.launch(executable_path=_chromium(), headless=True, args=CHROMIUM_ARGS)


def _pixels(data_url: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def drawn_fraction(data_url: str) -> float:
    """The share of a canvas' pixels that are not the white background."""
    px = _pixels(data_url)
    return float((np.abs(px.astype(int) - 255).sum(axis=2) > 30).mean())


def test_payload_holds_exactly_what_jaw_only_posing_needs(model_path):
    model = load_flame(model_path)
    exact = flame_payload.mesh_arrays(model)
    header, got = flame_payload.read_payload(flame_payload.mesh_payload(model))
    assert header["n_vertices"] == model.n_vertices and header["parents"] == [-1, 0, 1, 2, 2]
    assert header["source"] == "generic_model.pkl"  # the base name only: no server path
    for name, value in exact.items():
        np.testing.assert_array_equal(got[name], value.astype(got[name].dtype), err_msg=name)
    # the jaw's nine pose columns, the regressor folded into joint bases: the same joints for any psi
    psi = np.random.default_rng(0).normal(size=50)
    shaped = model.v_template + model.exprdirs @ psi
    np.testing.assert_allclose(
        exact["joints_template"] + np.tensordot(psi, exact["joints_exprdirs"], 1),
        model.J_regressor @ shaped,
        atol=1e-12,
    )
    np.testing.assert_array_equal(exact["posedirs_jaw"], model.posedirs[:, :, 9:18].transpose(2, 0, 1))
    # the quantized (embedded) form: int16 with a scale per component, error below half a step
    _, q = flame_payload.read_payload(flame_payload.mesh_payload(model, quantize=True))
    step = np.abs(exact["exprdirs"]).reshape(50, -1).max(axis=1) / 32767
    assert (np.abs(q["exprdirs"] - exact["exprdirs"]).reshape(50, -1).max(axis=1) <= 0.51 * step * (1 + 1e-6)).all()
    assert flame_payload.mesh_payload(model) is flame_payload.mesh_payload(model)  # cached


def test_route_answer_without_a_model_and_with_a_hostile_one(tmp_path, model_path):
    code, body = flame_payload.route_answer({})
    assert code == 404 and body["detail"][0]["field"] == FLAME_ENV
    assert body["detail"][0]["msg"].startswith(
        "no FLAME model configured: set FACELAB_FLAME_MODEL to your own FLAME 2020"
    )
    arrays = flame_arrays(n_v=40, n_f=30)
    arrays["weights"] = arrays["weights"][:, :4]  # wrong shape
    bad = write_flame_pkl(tmp_path / "bad.pkl", arrays)
    code, body = flame_payload.route_answer({FLAME_ENV: str(bad)})
    assert code == 500 and body["detail"][0]["type"] == "bad_flame_model"
    assert "key 'weights' has shape (40, 4), expected (40, 5)" in body["detail"][0]["msg"]
    code, data = flame_payload.route_answer({FLAME_ENV: str(model_path)})
    assert code == 200 and data[:4] == b"FLGL"


def test_browser_vertices_equal_flame_vertices_and_the_run_page_draws_the_avatar(tmp_path, model_path, monkeypatch):
    """flame_gl.js's vertices() against flame_vertices, for the route's float32 payload and the run page's
    embedded int16 one, on random expressions with a non-zero jaw (and one at rest, one in the Taylor
    branch); then the run page (opened from disk) draws each sequence on a canvas.flame that changes as
    its play cursor runs."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright (the dev extra) drives the browser")
    model = load_flame(model_path)
    rng = np.random.default_rng(7)
    expr = rng.normal(size=(5, 50)) * 1.5
    jaw = np.array([[0.3, 0.05, -0.02], [0.0, 0.0, 0.0], [1e-5, 0.0, 2e-5], [-0.2, 0.4, 0.1], [0.6, 0.0, 0.0]])
    want = flame_vertices(model, expr, jaw)
    assert np.abs(want - flame_vertices(model, expr, np.zeros_like(jaw))).max() > 1e-2  # the jaw matters here

    monkeypatch.setenv(FLAME_ENV, str(model_path))
    truth, generated = _sequences(rng)
    texts = ["I am so happy to see you!", "What a terrible day."]
    page_path, _ = write_run_preview(expression_payload(texts, generated, truth, title="flame run", fps=24), tmp_path)
    html = page_path.read_text()
    assert 'id="facelab-flame"' in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    route_b64 = base64.b64encode(flame_payload.mesh_payload(model)).decode()

    with sync_api.sync_playwright() as pw:
        browser = _launch(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_path.as_uri())
            page.wait_for_selector("#facelab-root[data-ready='1']")
            got = page.evaluate(
                """([b64, expr, jaw]) => {
                    const F = window.facelabFlame;
                    const route = F.decode(F.fromBase64(b64));
                    const embedded = F.decode(F.fromBase64(JSON.parse(
                        document.getElementById('facelab-flame').textContent).mesh));
                    return [route, embedded].map(m => expr.map((e, t) => Array.from(F.vertices(m, e, jaw[t]))));
                }""",
                [route_b64, expr.tolist(), jaw.tolist()],
            )
            route, embedded = (np.asarray(g).reshape(want.shape) for g in got)
            # float32: the bases are stored as float32 and the result written to a Float32Array (JS itself
            # computes in float64), so each coordinate (|v| ~ 0.1) is off by a few float32 ulps (~1e-8);
            # 1e-4 (0.1 mm on a real FLAME head in metres) leaves room for any order of the sums.
            np.testing.assert_allclose(route, want, rtol=0, atol=1e-4)
            # the embedded int16 bases add at most half a step per component and unit of psi (~1e-6 here)
            np.testing.assert_allclose(embedded, want, rtol=0, atol=1e-4)
            print(
                f"\nJS vs Python: max |diff| {np.abs(route - want).max():.2e} (float32), "
                f"{np.abs(embedded - want).max():.2e} (int16 embedded)"
            )

            # the run page: one avatar per sequence (ground truth + samples), drawn, in step with the cursor
            page.wait_for_selector(".flame-page[data-flame='drawn']")
            canvases = page.locator("canvas.flame")
            assert canvases.count() == sum(1 + len(g) for g in generated)
            first = canvases.first
            before = first.evaluate("c => c.toDataURL()")
            assert first.get_attribute("data-frame") == "0" and drawn_fraction(before) > 0.1
            page.click("button.play")
            page.wait_for_function("() => Number(document.querySelector('canvas.flame').dataset.frame) >= 8")
            later = first.evaluate("c => c.toDataURL()")
            changed = np.abs(_pixels(later).astype(int) - _pixels(before).astype(int)).sum(axis=2) > 30
            assert drawn_fraction(later) > 0.1 and changed.mean() > 0.002, changed.mean()
            # in step: the frame under the cursor, the shorter sample held on its last frame
            time.sleep(1.2)
            frames = canvases.evaluate_all("cs => cs.map(c => [Number(c.dataset.frame), Number(c.dataset.frames)])")
            assert all(0 <= f < n for f, n in frames), frames
            page.screenshot(path=str(tmp_path / "flame-run-page.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()


def test_a_page_without_a_model_says_so(tmp_path, monkeypatch, model_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright (the dev extra) drives the browser")
    truth, generated = _sequences(np.random.default_rng(1), n_items=1, n_samples=1)
    monkeypatch.delenv(FLAME_ENV, raising=False)
    unset, _ = write_run_preview(expression_payload(["hi"], generated, truth, title="no flame"), tmp_path / "unset")
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    monkeypatch.setenv(FLAME_ENV, str(bad))
    refused, _ = write_run_preview(expression_payload(["hi"], generated, truth, title="bad flame"), tmp_path / "bad")
    with sync_api.sync_playwright() as pw:
        browser = _launch(pw)
        try:
            page = browser.new_page()
            page.goto(unset.as_uri())
            box = page.wait_for_selector(".flame-page[data-flame='missing']")
            assert box.inner_text().startswith(
                "FLAME mesh: not configured (no FLAME model configured: set FACELAB_FLAME_MODEL"
            )
            assert page.locator("canvas.flame").count() == 0 and page.locator("canvas.heatmap").count() == 2
            page.goto(refused.as_uri())
            box = page.wait_for_selector(".flame-page[data-flame='error']")
            assert "refused to unpickle global posix.system" in box.inner_text()
        finally:
            browser.close()
