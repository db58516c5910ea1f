"""The face viewer (facelab.viewer): every ARKit channel moves the schematic face, the PNG preview and
the browser draw the same geometry, and a run's HTML page opens from disk in headless Chromium with
its faces, 61 channel bars, heatmaps and stop frames -- and asks the network for nothing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from facelab.data.arkit import CHANNELS, HIGH, INDEX, LOW
from facelab.viewer import html, rig

AUDIT = {  # issue #20: "narrows the eyes and sneers, furious" -- nearly neutral in the old 28-channel face
    "NoseSneerLeft": 0.75,
    "NoseSneerRight": 0.69,
    "MouthUpperUpLeft": 0.38,
    "MouthUpperUpRight": 0.38,
    "CheekSquintLeft": 0.31,
    "CheekSquintRight": 0.31,
}
NUM = re.compile(r"-?\d+\.\d+")


def vec(**values: float) -> np.ndarray:
    v = np.zeros(len(CHANNELS), dtype=np.float32)
    for name, x in values.items():
        v[INDEX[name]] = x
    return v


NEUTRAL = vec()


@pytest.mark.parametrize("name", CHANNELS)
def test_every_channel_moves_the_drawing(name):
    """Each channel alone at its extreme moves at least one drawn point by 2+ units (of a 200-wide
    face) and changes the rendered SVG; pose channels ([-1, 1]) in both directions."""
    neutral_xy, neutral_svg = rig.geometry(NEUTRAL), rig.face_svg(NEUTRAL)
    for extreme in {float(HIGH[INDEX[name]]), float(LOW[INDEX[name]])} - {0.0}:
        v = vec(**{name: extreme})
        moved = np.abs(rig.geometry(v) - neutral_xy).max()
        assert moved >= 2.0, f"{name}={extreme} moves the face by only {moved:.2f} units"
        assert rig.face_svg(v) != neutral_svg


def test_right_channels_mirror_left_ones():
    """The table defines one side; the other is its mirror image (x -> -x, _l <-> _r points)."""
    names = rig.compiled()["points"]
    mirror = [names.index(n[:-2] + ("_r" if n.endswith("_l") else "_l")) if n[-2:] in ("_l", "_r") else i
              for i, n in enumerate(names)]  # fmt: skip
    for left in ("EyeBlinkLeft", "BrowOuterUpLeft", "MouthSmileLeft", "NoseSneerLeft", "MouthLeft", "JawLeft"):
        right = left.replace("Left", "Right")
        a, b = rig.geometry(vec(**{left: 0.8})), rig.geometry(vec(**{right: 0.8}))
        np.testing.assert_allclose(b[mirror] * [-1, 1], a, atol=1e-9)


def test_values_are_clipped_to_channel_ranges():
    over = vec(JawOpen=3.0, HeadRoll=-7.0)
    np.testing.assert_allclose(rig.geometry(over), rig.geometry(vec(JawOpen=1.0, HeadRoll=-1.0)))
    assert np.isfinite(rig.geometry(vec(JawOpen=float("nan")))).all()


def _face_pixels(values, tmp_path, name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from facelab.plots import draw_face  # what keyframe_preview draws each face with

    fig, ax = plt.subplots(figsize=(2.6, 3.0), dpi=100)
    draw_face(ax, values)
    fig.canvas.draw()
    box = ax.get_window_extent()  # the face only: the caption of top channels is below the axes
    img = np.asarray(fig.canvas.buffer_rgba())[:, :, :3].astype(int)
    h = img.shape[0]
    crop = img[int(h - box.y1) : int(h - box.y0), int(box.x0) : int(box.x1)]
    fig.savefig(tmp_path / name)
    plt.close(fig)
    return crop


def test_audit_example_png_differs_visibly_from_neutral(tmp_path):
    """The issue's example (NoseSneer 0.75/0.69, MouthUpperUp 0.38, CheekSquint 0.31): the PNG face
    differs from the neutral one in hundreds of pixels (lifted nostrils, sneer creases, raised upper
    lip showing the teeth, raised cheeks), and keyframe_preview still draws ground truth vs generated."""
    from facelab.plots import keyframe_preview

    audit, neutral = _face_pixels(vec(**AUDIT), tmp_path, "audit.png"), _face_pixels(NEUTRAL, tmp_path, "neutral.png")
    changed = int((np.abs(audit - neutral).sum(axis=2) > 60).sum())
    assert changed > 300, f"only {changed} pixels differ from the neutral face"
    out = keyframe_preview(np.stack([vec(**AUDIT)]), np.stack([NEUTRAL]), ["narrows the eyes and sneers, furious"],
                           tmp_path / "keyframe_preview.png")  # fmt: skip
    assert out.stat().st_size > 5000


def _keyframe_items():
    """Items whose faces the browser test compares with Python's: the audit example, and single
    channels that exercise rotations, mirrored channels, clips and collapsed features."""
    singles = [{"HeadRoll": 0.7, "HeadYaw": -0.4}, {"JawOpen": 0.8, "TongueOut": 1.0}, {"EyeLookInLeft": 1.0,
               "RightEyeRoll": -0.6, "EyeBlinkRight": 0.5}, {"MouthSmileRight": 0.9, "MouthDimpleLeft": 1.0}]  # fmt: skip
    gts = [vec(**AUDIT), *(vec(**s) for s in singles)]
    rng = np.random.default_rng(0)
    preds = [np.clip(g + rng.normal(0, 0.08, g.shape), LOW, HIGH).astype(np.float32) for g in gts]
    texts = ["narrows the eyes and sneers, furious", "tilts the head </script> <b>not bold</b>", "laughs, tongue out",
             "glances aside, winks", "a lopsided smile"]  # fmt: skip
    return np.stack(gts), np.stack(preds), texts


def test_pages_are_self_contained(tmp_path):
    gt, pred, texts = _keyframe_items()
    text = html.render_page(html.keyframe_payload(gt, pred, texts, title="kf", n=5))
    head, _, _ = text.partition('<script type="application/json"')
    assert "</script> <b>" not in text  # the data cannot end its own script element
    for fetch in ("<link", " src=", "@import", "XMLHttpRequest"):
        assert fetch not in text, fetch
    urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"')]*", text))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls  # the SVG namespace is a name, not a request
    assert "<style>" in head and "FaceLab" in text
    data = json.loads(re.search(r'id="facelab-data">(.*?)</script>', text, re.S).group(1))
    assert data["channels"] == list(CHANNELS) and data["page"]["items"][1]["text"] == texts[1]


def test_sweep_payload_rows():
    gt, pred, texts = _keyframe_items()
    a = html.keyframe_payload(gt, pred, texts, title="a", n=3)
    b = html.keyframe_payload(gt[1:], pred[1:], texts[1:], title="b", n=3)
    page = html.sweep_payload([("Tuned", "seed 0", a), ("Base", "seed 0", b)], title="s")
    assert [r["label"] for r in page["rows"]] == ["ground truth", "Tuned", "Base"]
    assert page["columns"] == texts[:3]
    assert page["rows"][2]["cells"][0] is None and page["rows"][2]["cells"][1] == b["items"][0]["samples"][0]


def _expression_items():
    rng = np.random.default_rng(1)
    t = np.linspace(0, 4 * np.pi, 90)[:, None]
    truth = [np.sin(t + np.arange(53) / 9.0) * 0.8, np.cos(t[:60] * 2 + np.arange(53) / 5.0)]
    generated = [
        [truth[0][:70] + rng.normal(0, 0.1, (70, 53)), truth[0][:85] * 0.7],
        [truth[1][:40] + rng.normal(0, 0.2, (40, 53)), truth[1][:60] * 1.1],
    ]
    return ["smiles warmly, then laughs", "frowns in disbelief"], generated, truth


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium, chromium-browser or google-chrome on PATH (apt-get install chromium)")


def _open(page, path, requests):
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(path.as_uri())
    page.wait_for_selector("#facelab-root[data-ready='1']", timeout=10_000)
    assert not errors, errors
    assert all(u.startswith("file:") for u in requests), requests  # nothing from the network


def _svg_numbers(shapes: list[tuple[str, str]]) -> dict[str, list[float]]:
    return {sid: [float(x) for x in NUM.findall(geo)] for sid, geo in shapes}


def _python_shapes(values) -> list[tuple[str, str]]:
    svg = rig.face_svg(values, prefix="py")
    out = [(m.group(1), m.group(2)) for m in re.finditer(r'<path data-shape="([^"]+)" d="([^"]+)"', svg)]
    out += [(m.group(1), f"{m.group(2)} {m.group(3)}") for m in re.finditer(
        r'<circle data-shape="([^"]+)" cx="([^"]+)" cy="([^"]+)"', svg)]  # fmt: skip
    return out


def test_browser_opens_run_pages_from_disk(tmp_path):
    """Headless Chromium opens a keyframe run's, an expression run's and a sweep's HTML artifact from
    disk: the faces are drawn by the page (JS), gt beside generated, 61 bars with values per item, the
    JS geometry equals the Python renderer's (the PNG previews' rules) to the SVG's 0.01, heatmaps and
    curves carry their stop frames; no request leaves file://. Screenshots are saved in tmp_path."""
    browser_bin = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright (the dev extra) drives the browser")
    gt, pred, texts = _keyframe_items()
    kf_payload = html.keyframe_payload(gt, pred, texts, title="keyframe run", n=len(texts))
    kf = html.write_page(kf_payload, tmp_path / "keyframes" / "preview.html")
    ex_texts, generated, truth = _expression_items()
    ex = html.write_page(html.expression_payload(ex_texts, generated, truth, title="expression run"),
                         tmp_path / "expressions" / "preview.html")  # fmt: skip
    other = html.keyframe_payload(pred, gt, texts, title="other", n=len(texts))
    sweep = html.write_page(
        html.sweep_payload([("LoRA-Tuned", "seed 0", kf_payload), ("Base", "seed 0", other)], title="sweep"),
        tmp_path / "sweep.html",
    )

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_bin, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))

            # -- keyframes: faces side by side, 61 bars with values, JS geometry == Python geometry
            _open(page, kf, requests)
            items = page.locator("section.item")
            assert items.count() == len(texts)
            for i in range(len(texts)):
                sec = items.nth(i)
                assert texts[i] in sec.locator("h2").inner_text()
                row = sec.locator(".side-by-side > figure")
                assert row.count() == 2
                assert row.nth(0).get_attribute("class").endswith("gt")
                assert row.nth(1).get_attribute("class").endswith("gen")
                boxes = [row.nth(k).bounding_box() for k in range(2)]
                assert abs(boxes[0]["y"] - boxes[1]["y"]) < 1 and boxes[1]["x"] > boxes[0]["x"]  # side by side
                assert sec.locator('svg.face[data-drawn="js"]').count() == 2
                bars = sec.locator("table.bars tr.bar")
                assert bars.count() == 61
                cells = sec.evaluate(
                    """s => [...s.querySelectorAll('tr.bar')].map(r => [r.dataset.channel,
                         [...r.querySelectorAll('td.cell')].map(td => td.querySelector('.value').textContent)])"""
                )
                assert [c for c, _ in cells] == list(CHANNELS)
                assert [v for _, v in cells] == [[rig.fmt(gt[i][c]), rig.fmt(pred[i][c])] for c in range(61)]
                for k, values in enumerate((gt[i], pred[i])):
                    js = sec.evaluate(
                        """(s, k) => [...s.querySelectorAll('svg.face')[k].querySelectorAll('[data-shape]')].map(
                             e => [e.dataset.shape, e.getAttribute('d') || (e.getAttribute('cx') + ' ' +
                                   e.getAttribute('cy'))])""",
                        k,
                    )
                    got, want = _svg_numbers(js), _svg_numbers(_python_shapes(values))
                    assert got.keys() == want.keys()
                    for sid in want:
                        np.testing.assert_allclose(got[sid], want[sid], atol=0.011, err_msg=f"item {i} {sid}")
            page.screenshot(path=str(tmp_path / "keyframes.png"), full_page=True)

            # -- expressions: gt and samples side by side, heatmaps, curves, stop frames marked
            _open(page, ex, requests)
            items = page.locator("section.item")
            assert items.count() == 2
            for i in range(2):
                panels = items.nth(i).locator("figure.seq")
                assert panels.count() == 3 and "gt" in panels.nth(0).get_attribute("class")
                lengths = [len(truth[i]), *(len(g) for g in generated[i])]
                assert [int(panels.nth(k).get_attribute("data-frames")) for k in range(3)] == lengths
                for k in range(3):
                    p = panels.nth(k)
                    assert int(p.locator("canvas.heatmap").get_attribute("data-dims")) == 53
                    assert p.locator("svg.curves polyline").count() == 4
                    assert int(p.locator("svg.curves line.stop").get_attribute("data-frame")) == lengths[k]
                    assert f"stops at frame {lengths[k]}" in p.locator("figcaption").inner_text()
            page.locator("button.play").click()  # the time cursor runs
            page.wait_for_function("() => document.querySelector('.cursor-mark').style.left !== '0%'")
            page.screenshot(path=str(tmp_path / "expressions.png"), full_page=True)

            # -- sweep: one row per variant, ground truth first, a face per test item
            _open(page, sweep, requests)
            rows = page.locator("tr.variant-row")
            assert [rows.nth(k).get_attribute("data-variant") for k in range(3)] == [
                "ground truth",
                "LoRA-Tuned",
                "Base",
            ]
            assert page.locator('tr.variant-row svg.face[data-drawn="js"]').count() == 3 * len(texts)
            page.screenshot(path=str(tmp_path / "sweep.png"), full_page=True)
        finally:
            browser.close()
    for name in ("keyframes.png", "expressions.png", "sweep.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_runs_log_their_page_and_the_sweep_page_has_a_row_per_variant(tmp_path):
    """The scoring functions the worker loops call log ``viewer/preview.html`` (+ its payload) beside
    the PNG previews, and ``report.sweep_html`` builds the sweep's page from them: the ground truth,
    then one row per variant in the sweep YAML's order (the first seed of each), the variant's own
    generated values in its cells. A real MLflow store (sqlite) in tmp_path."""
    import types

    import torch
    from mlflow import MlflowClient

    from facelab.core import tracking
    from facelab.report import sweep_html
    from facelab.tasks.expressions.scoring import log_trajectories
    from facelab.tasks.keyframes.scoring import log_eval_artifacts

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.create_experiment("kf-sweep", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = c.create_run(exp, run_name="kf-sweep", tags={tracking.TAG_ROLE: "sweep", tracking.TAG_SWEEP: "kf-sweep",
                                                          "facelab.variants": json.dumps(["Tuned", "Base"])})  # fmt: skip
    gt, pred, texts = _keyframe_items()
    per_channel = {"mae": np.abs(pred - gt).mean(0), "mse": ((pred - gt) ** 2).mean(0)}
    for variant, seed, offset in (("Base", 0, 0.3), ("Tuned", 1, 0.1), ("Tuned", 0, 0.0)):
        run = c.create_run(exp, run_name=f"{variant} seed={seed}", tags={
            tracking.PARENT_TAG: parent.info.run_id, tracking.TAG_ROLE: "trial", tracking.TAG_VARIANT: variant,
            tracking.TAG_SEED: str(seed), tracking.TAG_JOB_KIND: "keyframe_lm"})  # fmt: skip
        p = np.clip(pred + offset, LOW, HIGH)
        log_eval_artifacts(c, run.info.run_id, {"gt": gt, "pred": p, "texts": texts, "per_channel": per_channel})
        c.set_terminated(run.info.run_id)
        arts = {a.path for a in c.list_artifacts(run.info.run_id, "viewer")}
        assert arts == {"viewer/preview.html", "viewer/preview.json"}
    trials = tracking.trial_runs(c, exp, parent.info.run_id)
    page = sweep_html(c, c.get_run(parent.info.run_id), trials, tmp_path / "sweep.html", log=True)
    data = json.loads(re.search(r'id="facelab-data">(.*?)</script>', page.read_text(), re.S).group(1))["page"]
    assert [(r["label"], r["note"]) for r in data["rows"]] == [("ground truth", ""), ("Tuned", "seed 0"),
                                                               ("Base", "seed 0")]  # fmt: skip
    assert data["columns"] == texts[:4]
    np.testing.assert_allclose(data["rows"][0]["cells"][0], gt[0], atol=1e-4)
    np.testing.assert_allclose(data["rows"][2]["cells"][0], np.clip(pred[0] + 0.3, LOW, HIGH), atol=1e-4)
    assert "report/sweep.html" in {a.path for a in c.list_artifacts(parent.info.run_id, "report")}

    # an expressions run: n texts x 2 samples beside the ground truth, from the model's generate()
    class Model:
        mean_expression = torch.zeros(53)
        cfg = types.SimpleNamespace(max_frames=40)

        def generate(self, texts, max_frames, generator):
            return [torch.randn(20 + 5 * i, 53, generator=generator) for i in range(len(texts))]

    test = types.SimpleNamespace(texts=["a", "b", "c", "d"], sequences=[np.zeros((30, 53), np.float32)] * 4)
    run = c.create_run(exp, run_name="cteg")
    log_trajectories(Model(), test, {"train": {"seed": 0}, "eval": {"max_frames": 64}}, c, run.info.run_id)
    arts = {a.path for a in c.list_artifacts(run.info.run_id, "viewer")}
    assert arts == {"viewer/preview.html", "viewer/preview.json"}
    local = c.download_artifacts(run.info.run_id, "viewer/preview.json", str(tmp_path))
    payload = json.loads(Path(local).read_text())
    assert [len(it["samples"]) for it in payload["items"]] == [2, 2, 2]
    assert [len(s) for s in payload["items"][1]["samples"]] == [25, 25] and len(payload["items"][0]["gt"]) == 30


def test_browser_served_page_asks_the_endpoint_and_draws_the_answer(tmp_path):
    """The served model's page (serve_payload): the form POSTs the request the API expects to the same
    server and draws the answer -- a face and 61 bars per keyframe; heatmaps per expression sample.
    The server is played by Playwright's router (no socket, no network)."""
    browser_bin = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright (the dev extra) drives the browser")
    from facelab.data.arkit import mapping_from_vector

    pages = {t: html.render_page(html.serve_payload(t, title=f"served {t}")) for t in ("keyframes", "expressions")}
    answers = {
        "keyframes": {"model": {"name": "kf", "version": "3"}, "keyframes": [
            {"index": 1, "blendshapes": mapping_from_vector(vec(**AUDIT))},
            {"index": 2, "blendshapes": mapping_from_vector(vec(JawOpen=0.6, MouthStretchLeft=0.5))}]},
        "expressions": {"model": {"name": "cteg"}, "fps": 25,
                        "sequences": [{"frames": np.full((n, 53), 0.1).tolist()} for n in (30, 44)]},
    }  # fmt: skip
    sent = []

    def handle(route):
        url = route.request.url
        task = url.rsplit("/", 1)[-1] if "/v1/" in url else url.rsplit("/", 1)[-1].split("-", 1)[-1]
        if route.request.method == "POST":
            sent.append((url, route.request.headers.get("x-api-key"), json.loads(route.request.post_data)))
            route.fulfill(status=200, content_type="application/json", body=json.dumps(answers[task]))
        elif task == "flame":  # GET /v1/flame after an expressions answer (flame_gl.js): no model here
            route.fulfill(status=404, content_type="application/json", body=json.dumps({"detail": [{"msg": "none"}]}))
        else:
            route.fulfill(status=200, content_type="text/html", body=pages[task])

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_bin, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.route("http://facelab.test/**", handle)
            page.goto("http://facelab.test/viewer-keyframes")
            page.wait_for_selector("#facelab-root[data-ready='1']")
            page.fill("input[name=key]", "s3cret")
            page.click("form.ask button[type=submit]")
            page.wait_for_selector(".answer[data-answered='1']")
            url, key, body = sent[-1]
            assert url == "http://facelab.test/v1/keyframes" and key == "s3cret"
            assert body == {**html.SERVE_EXAMPLES["keyframes"]}
            keyframes = page.locator(".answer section.item[data-item]")  # one per keyframe (and the player)
            assert keyframes.locator('svg.face[data-drawn="js"]').count() == 2
            assert page.locator(".answer section.player").count() == 1
            assert keyframes.nth(0).locator("tr.bar").count() == 61
            sneer = keyframes.nth(0).locator('tr[data-channel="NoseSneerLeft"] .value')
            assert sneer.inner_text() == "0.75"
            page.screenshot(path=str(tmp_path / "served-keyframes.png"), full_page=True)

            page.goto("http://facelab.test/viewer-expressions")
            page.wait_for_selector("#facelab-root[data-ready='1']")
            page.click("form.ask button[type=submit]")
            page.wait_for_selector(".answer[data-answered='1']")
            assert sent[-1][2] == html.SERVE_EXAMPLES["expressions"] and sent[-1][1] is None
            frames = page.locator(".answer figure.seq").evaluate_all("fs => fs.map(f => f.dataset.frames)")
            assert frames == ["30", "44"]
            page.screenshot(path=str(tmp_path / "served-expressions.png"), full_page=True)
        finally:
            browser.close()


def _pchip_cases():
    """Keyframe vectors that exercise PCHIP's branches: plateaus (zero slopes), sign changes (a peak),
    monotone runs (the weighted harmonic mean), end slopes kept or zeroed, pose channels below 0."""
    rng = np.random.default_rng(2)
    rand = [np.clip(rng.normal(0.3, 0.35, 61), LOW, HIGH) for _ in range(5)]
    shaped = [vec(JawOpen=a, HeadYaw=b, EyeBlinkLeft=c, MouthSmileLeft=d)
              for a, b, c, d in ((0.0, -0.6, 0.0, 0.1), (0.8, 0.2, 0.0, 0.2), (0.1, 0.9, 1.0, 0.9), (0.1, -0.9, 0.0, 0.95))]  # fmt: skip
    return [
        (rand[:1], 1.0, 60.0),  # one keyframe: one held frame
        (rand[:2], 1.0, 60.0),  # two: linear
        (rand[:3], 1.0, 60.0),
        (rand, 1.0, 60.0),
        (shaped, 0.7, 60.0),  # key times off the grid
        (rand[:4], 0.5, 30.0),
    ]


def test_browser_pchip_equals_facelab_export(tmp_path):
    """The page's interpolation (face.js ``FaceLab.interpolate``) gives the frames ``facelab export``
    writes (``arkit.interpolate_keyframes``: scipy's PchipInterpolator on keyframes ``spacing`` s apart,
    the ``i / fps`` grid, clipped) to 1e-6, and ``FaceLab.pchip`` equals PchipInterpolator on uneven
    knots with values outside [0, 1] (no clipping) -- in headless Chromium."""
    browser_bin = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright (the dev extra) drives the browser")
    from scipy.interpolate import PchipInterpolator

    from facelab.data.arkit import interpolate_keyframes

    served = html.write_page(html.serve_payload("keyframes", title="kf"), tmp_path / "served.html")
    rng = np.random.default_rng(3)
    knots = [np.cumsum(rng.uniform(0.2, 1.5, k)) for k in (3, 4, 7)]
    curves = [np.array([0.0, 1.0, 1.0]), np.array([2.0, -1.0, 0.5, 3.0]), rng.normal(0, 2, 7)]
    queries = [np.linspace(x[0] - 0.3, x[-1] + 0.3, 97) for x in knots]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_bin, headless=True)
        try:
            page = browser.new_page()
            _open(page, served, [])
            rig_js = "JSON.parse(document.getElementById('facelab-data').textContent).rig"
            for rows, spacing, fps in _pchip_cases():
                got = page.evaluate(f"([r, s, f]) => FaceLab.interpolate(r, s, f, {rig_js})",
                                    [np.asarray(rows).tolist(), spacing, fps])  # fmt: skip
                times, frames = interpolate_keyframes(np.stack(rows), [k * spacing for k in range(len(rows))], fps=fps)
                assert len(got["frames"]) == len(frames)
                np.testing.assert_allclose(got["times"], times, atol=1e-12)
                np.testing.assert_allclose(np.array(got["frames"]), frames, atol=1e-6, rtol=0)
                want_keys = [min(len(frames) - 1, int(np.ceil(k * spacing * fps - 1e-9))) for k in range(len(rows))]
                assert got["keyFrames"] == want_keys
            for x, y, q in zip(knots, curves, queries):
                got = page.evaluate("([x, y, q]) => { const f = FaceLab.pchip(x, y); return q.map(f); }",
                                    [x.tolist(), y.tolist(), q.tolist()])  # fmt: skip
                np.testing.assert_allclose(got, PchipInterpolator(x, y)(q), atol=1e-9, rtol=0)
        finally:
            browser.close()


def test_browser_served_keyframes_play_as_the_exported_animation(tmp_path):
    """On the served keyframes page, after the answer: the animation player (60 Hz, PCHIP as ``facelab
    export``) plays (the frame counter moves), pauses (it stops), scrubs (the face and the 61 bars show
    that frame of ``interpolate_keyframes``), steps to the previous/next keyframe, and "download CSV"
    asks the endpoint again with ``?format=csv`` (same body, same API key) and saves exactly what the
    server answered. The server is played by Playwright's router."""
    browser_bin = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright (the dev extra) drives the browser")
    from facelab.data.arkit import format_llf_csv, interpolate_keyframes, mapping_from_vector

    rows = np.stack([vec(**AUDIT), vec(JawOpen=0.6, MouthStretchLeft=0.5, HeadYaw=-0.3), vec(EyeBlinkLeft=1.0)])
    answer = {"model": {"name": "kf", "version": "3"},
              "keyframes": [{"index": k + 1, "blendshapes": mapping_from_vector(r)} for k, r in enumerate(rows)]}  # fmt: skip
    csv_text = format_llf_csv(rows)
    _, frames = interpolate_keyframes(rows, [0.0, 1.0, 2.0], fps=60.0)
    body = {**html.SERVE_EXAMPLES["keyframes"], "keyframes": ["sneers", "opens the jaw", "winks"]}
    page_html = html.render_page(html.serve_payload("keyframes", title="served keyframes"))
    sent = []

    def handle(route):
        req = route.request
        if req.method != "POST":
            return route.fulfill(status=200, content_type="text/html", body=page_html)
        sent.append((req.url, req.headers.get("x-api-key"), json.loads(req.post_data)))
        if req.url.endswith("?format=csv"):
            return route.fulfill(status=200, content_type="text/csv", body=csv_text,
                                 headers={"Content-Disposition": 'attachment; filename="keyframes.csv"'})  # fmt: skip
        route.fulfill(status=200, content_type="application/json", body=json.dumps(answer))

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_bin, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.route("http://facelab.test/**", handle)
            page.goto("http://facelab.test/viewer")
            page.wait_for_selector("#facelab-root[data-ready='1']")
            page.fill("textarea[name=keyframes]", "\n".join(body["keyframes"]))
            page.fill("input[name=key]", "s3cret")
            page.click("form.ask button[type=submit]")
            page.wait_for_selector(".answer[data-answered='1']")
            player = page.locator(".answer section.player")
            assert player.get_attribute("data-frames") == str(len(frames)) == "121"
            assert player.get_attribute("data-keyframes") == "0,60,120"
            counter = player.locator("output.anim-frame")

            def frame() -> int:
                return int(counter.get_attribute("data-frame"))

            def shows(i: int) -> None:
                """The player's face and bars are frame i of interpolate_keyframes."""
                assert frame() == i and int(player.locator("input.anim-scrub").input_value()) == i
                shown = player.locator("tr.bar td.cell").evaluate_all("tds => tds.map(t => +t.dataset.value)")
                np.testing.assert_allclose(shown, frames[i], atol=0.0051)
                js = player.evaluate("""s => [...s.querySelectorAll('svg.face [data-shape]')].map(e => [e.dataset.shape,
                                          e.getAttribute('d') || (e.getAttribute('cx') + ' ' + e.getAttribute('cy'))])""")
                got, want = _svg_numbers(js), _svg_numbers(_python_shapes(frames[i]))
                assert got.keys() == want.keys()
                for sid in want:
                    np.testing.assert_allclose(got[sid], want[sid], atol=0.011, err_msg=f"frame {i} {sid}")

            shows(0)
            player.locator("button.anim-play").click()  # plays: the counter moves
            page.wait_for_function("() => +document.querySelector('output.anim-frame').dataset.frame > 5")
            player.locator("button.anim-play").click()  # pauses: it stays
            stopped = frame()
            page.wait_for_timeout(300)
            assert frame() == stopped and player.get_attribute("data-playing") is None
            player.locator("input.anim-scrub").fill("37")  # scrubs
            shows(37)
            player.locator("button.anim-next").click()  # next keyframe: 2nd, at 1 s
            shows(60)
            player.locator("button.anim-next").click()
            shows(120)
            player.locator("button.anim-next").click()  # the last keyframe: stays
            assert frame() == 120
            player.locator("button.anim-prev").click()
            shows(60)
            page.screenshot(path=str(tmp_path / "served-animation.png"), full_page=True)

            with page.expect_download() as got:  # the API's own CSV, same request and key
                player.locator("button.anim-csv").click()
            download = got.value
            assert download.suggested_filename == "keyframes.csv"
            assert Path(download.path()).read_text(encoding="utf-8") == csv_text
            assert sent[-1] == ("http://facelab.test/v1/keyframes?format=csv", "s3cret", body)
            assert sent[-2] == ("http://facelab.test/v1/keyframes", "s3cret", body)
            assert not errors, errors
        finally:
            browser.close()
