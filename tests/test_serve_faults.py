"""Serving under faults, for real: `facelab serve` (Ray Serve) on a promoted quickstart CTEG model,
attacked over HTTP with bad input, a missing API key, a flood (503 shedding), a slow body (408) and a
replica SIGKILLed under load. One project per module; two servers (A: API key + 2 replicas; B: tiny
limits) started with start_new_session=True and stopped by their own session id — never `ray stop`.
Timings are printed, never asserted beyond generous bounds."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import BIN, QUICKSTART_FAST, clone_with_runs, env_for, facelab, free_port

pytestmark = pytest.mark.slow

FAST = QUICKSTART_FAST
SLOW_TEXT = " ".join(["wonderful surprising terrible"] * 60)[:1990]  # the longest text the schema allows
SLOW = {"text": SLOW_TEXT, "num_samples": 16, "max_frames": 1024}  # the most work one request may ask for
OK = {"text": "I am so happy to see you!", "num_samples": 1, "max_frames": 16, "seed": 3}


@pytest.fixture(scope="module")
def project(tmp_path_factory, quickstart_runs) -> Path:
    p = clone_with_runs(quickstart_runs[0], tmp_path_factory.mktemp("serve-faults") / "p")
    facelab(p, "promote", "quickstart")
    return p


_RUNNING: list["Server"] = []


class Server:
    """`facelab serve` in its own session; stop() interrupts it, then kills what is left of *that* session.
    Starting one stops the module's other server first (two Ray clusters on 2 cores would skew everything)."""

    def __init__(self, project: Path, name: str, *args: str, **env: str):
        for other in list(_RUNNING):
            other.stop()
        _RUNNING.append(self)
        self.project = project
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = project / f"serve-{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(BIN / "facelab"), "serve", "--port", str(self.port), *args],
            cwd=project,
            env=env_for(project, **env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started = time.time()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("server exited:\n" + self.log()[-5000:])
            try:
                if httpx.get(self.base + "/healthz", timeout=3).status_code == 200:
                    print(f"server healthy after {time.time() - self.started:.0f}s")
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError("server never became healthy:\n" + self.log()[-5000:])

    def session(self) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getsid(p.pid) == self.proc.pid:
                    out.append(p)
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
        return out

    def replica_pids(self) -> set[int]:
        pids = set()
        for p in self.session():
            try:
                if "ServeReplica:facelab" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                    pids.add(p.pid)
            except psutil.Error:
                pass
        return pids

    def stop(self) -> None:
        if self not in _RUNNING:
            return
        _RUNNING.remove(self)
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        for p in self.session():  # only processes of this server's own session
            try:
                p.kill()
            except psutil.Error:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def api_key() -> str:
    return secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def flame_model(tmp_path_factory) -> Path:
    """A synthetic FLAME-format model (FLAME is licensed, never shipped) for server A's GET /v1/flame."""
    from test_flame_gl import sphere_flame

    return sphere_flame(tmp_path_factory.mktemp("flame") / "generic_model.pkl")


@pytest.fixture(scope="module")
def secured(project, api_key, flame_model):
    """Server A: API key from FACELAB_API_KEY, two replicas, default limits, looking for a new champion every
    second, FACELAB_FLAME_MODEL naming a synthetic FLAME model (the viewer's avatars)."""
    s = Server(
        project,
        "secured",
        "--replicas",
        "2",
        "--watch-champion",
        "1",
        FACELAB_API_KEY=api_key,
        FACELAB_FLAME_MODEL=str(flame_model),
    )
    try:
        s.wait_healthy()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def tight(project):
    """Server B: one replica running one request at a time with two waiting, 2 s per request."""
    s = Server(
        project,
        "tight",
        "--max-ongoing-requests",
        "1",
        "--max-queued-requests",
        "2",
        "--request-timeout-s",
        "2",
        FACELAB_FLAME_MODEL="",  # no FLAME model: the viewer says so
    )
    try:
        s.wait_healthy()
        yield s
    finally:
        s.stop()


def _h(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def test_api_key_required_except_healthz(secured, api_key):
    b = secured.base
    assert httpx.get(b + "/healthz").status_code == 200  # liveness probes need no key
    for headers in (
        {},
        {"X-API-Key": "wrong"},
        {"Authorization": f"Bearer {api_key}x"},
        {"Authorization": api_key},
        {"X-API-Key": ""},
    ):
        for method, path in (
            ("GET", "/v1/models"),
            ("POST", "/v1/expressions"),
            ("GET", "/docs"),
            ("GET", "/openapi.json"),
        ):
            r = httpx.request(method, b + path, headers=headers, json=OK if method == "POST" else None)
            assert r.status_code == 401, (headers, path, r.status_code, r.text)
            assert "X-API-Key" in json.dumps(r.json()["detail"]), r.text
    # refused before the body is read: a huge unauthenticated body is still a 401, not a 413
    r = httpx.post(b + "/v1/expressions", content=b"x" * 300_000, headers={"content-type": "application/json"})
    assert r.status_code == 401
    assert httpx.get(b + "/v1/models", headers=_h(api_key)).json()["name"] == "cteg-tiny"
    assert httpx.get(b + "/v1/models", headers={"Authorization": f"Bearer {api_key}"}).status_code == 200
    r = httpx.post(b + "/v1/expressions", json=OK, headers=_h(api_key), timeout=60)
    assert r.status_code == 200 and len(r.json()["sequences"]) == 1
    deadline = time.time() + 120  # the banner is printed once serve.run returns, which can trail /healthz
    while "API key: required" not in secured.log() and time.time() < deadline:
        time.sleep(1)
    log = secured.log()
    assert "API key: required" in log and api_key not in log  # the key is never logged


def test_viewer_page_asks_the_real_server_in_a_browser(secured, api_key, tmp_path):
    """Issue #20: `GET /viewer` of a real `facelab serve` (with an API key) in headless Chromium: the page is
    open and holds no key; typed into its field, the key goes with the form's request; the page draws
    each sample the server answered (53-row heatmap, stop frame) -- the same frames as the API's answer."""
    from test_flame_gl import CHROMIUM_ARGS, drawn_fraction

    from test_e2e import _chromium

    browser_bin = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright (the dev extra) drives the browser")
    r = httpx.get(secured.base + "/viewer", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and api_key not in r.text
    assert "http://" not in r.text.replace("http://www.w3.org/2000/svg", "")  # no network, no CDN
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_bin, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            outside = []
            page.on("request", lambda q: outside.append(q.url) if not q.url.startswith(secured.base) else None)
            page.goto(secured.base + "/viewer")
            page.wait_for_selector("#facelab-root[data-ready='1']")
            page.fill("input[name=key]", api_key)
            with page.expect_response(lambda a: a.url.endswith("/v1/expressions")) as answer:
                page.click("form.ask button[type=submit]")
            assert answer.value.status == 200, answer.value.text()
            sent = answer.value.request.post_data_json
            page.wait_for_selector(".answer[data-answered='1']", timeout=60_000)
            frames = page.locator(".answer figure.seq").evaluate_all("fs => fs.map(f => Number(f.dataset.frames))")
            expected = [len(q["frames"]) for q in answer.value.json()["sequences"]]
            assert frames == expected and len(frames) == sent["num_samples"], (frames, expected)
            # the FLAME avatars: the page asks GET /v1/flame with its key and poses each sample (flame_gl.js)
            page.wait_for_selector(".answer .flame-box[data-flame='drawn']", timeout=60_000)
            canvases = page.locator(".answer canvas.flame")
            assert canvases.count() == sent["num_samples"]
            before = canvases.first.evaluate("c => c.toDataURL()")
            assert drawn_fraction(before) > 0.1
            page.click(".answer button.play")  # the avatars follow the play cursor
            page.wait_for_function(
                "() => Number(document.querySelector('.answer canvas.flame').dataset.frame) >= 6", timeout=30_000
            )
            assert canvases.first.evaluate("c => c.toDataURL()") != before
            page.screenshot(path=str(tmp_path / "served-viewer.png"), full_page=True)
            assert not outside, outside
        finally:
            browser.close()
    # the API key rules are the server's: the page's request without the key is refused
    r = httpx.post(secured.base + "/v1/expressions", json=OK)
    assert r.status_code == 401


def test_flame_route_serves_the_users_model_and_refuses_a_hostile_file(secured, api_key, flame_model, tmp_path):
    """GET /v1/flame (issue #20): the mesh of the model FACELAB_FLAME_MODEL names, behind the API key, the
    same bytes as facelab.viewer.flame_payload builds; a hostile file put in its place (wrong shapes, a
    pickled os.system call) is a 500 naming the problem, nothing runs, the replicas live on; the good
    file is served again once back (the replicas reload per file version)."""
    from facelab.viewer.flame import load_flame
    from facelab.viewer.flame_payload import mesh_payload
    from test_flame import flame_arrays, write_flame_pkl

    b, h = secured.base, _h(api_key)
    assert httpx.get(b + "/v1/flame", timeout=30).status_code == 401
    r = httpx.get(b + "/v1/flame", headers=h, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "application/vnd.facelab.flame-mesh"
    assert r.content == mesh_payload(load_flame(flame_model))
    good, pids = flame_model.read_bytes(), secured.replica_pids()
    arrays = flame_arrays(n_v=60, n_f=40)
    arrays["shapedirs"] = arrays["shapedirs"][:, :, :320]  # 300 shape + 20: fewer than 50 expression components
    marker = tmp_path / "ran"
    hostile = [
        (write_flame_pkl(tmp_path / "shapes.pkl", arrays).read_bytes(), "key 'shapedirs' has shape (60, 3, 320)"),
        (
            b"\x80\x02cposix\nsystem\nX"
            + len(f"touch {marker}").to_bytes(4, "little")
            + f"touch {marker}".encode()
            + b"\x85R.",
            "refused to unpickle global posix.system",
        ),
    ]
    try:
        for data, msg in hostile:
            flame_model.write_bytes(data)
            for _ in range(4):  # both replicas
                r = httpx.get(b + "/v1/flame", headers=h, timeout=60)
                assert r.status_code == 500, r.text
                d = r.json()["detail"][0]
                assert d["field"] == "FACELAB_FLAME_MODEL" and d["type"] == "bad_flame_model" and msg in d["msg"], d
    finally:
        flame_model.write_bytes(good)
    assert not marker.exists()
    assert httpx.get(b + "/healthz", timeout=30).status_code == 200 and secured.replica_pids() == pids
    r = httpx.get(b + "/v1/flame", headers=h, timeout=60)
    assert r.status_code == 200 and r.content == mesh_payload(load_flame(flame_model))


def test_st_cli_finds_no_openapi_contract_failure_over_http(secured, api_key, tmp_path):
    """`st run --checks all` (Schemathesis' CLI) over HTTP against server A, with its API key: the
    document the replicas serve is the contract they keep (the fast, in-process tier is in
    tests/test_openapi_contract.py, whose one failure filter the CLI loads through SCHEMATHESIS_HOOKS)."""
    import test_openapi_contract

    b, key = secured.base, api_key
    assert httpx.get(f"{b}/openapi.json", timeout=30).status_code == 401
    doc = httpx.get(f"{b}/openapi.json", headers=_h(key), timeout=30).json()
    assert doc["paths"]["/v1/expressions"]["post"]["security"]  # the replica's document asks for the key
    config = tmp_path / "schemathesis.toml"
    config.write_text(test_openapi_contract.ST_CONFIG.format(max_examples=20))
    here = Path(__file__).parent
    env = env_for(secured.project, SCHEMATHESIS_HOOKS=str(here / "test_openapi_contract.py"), PYTHONPATH=str(here))
    cmd = [str(BIN / "st"), "--config-file", str(config), "--no-color", "run", f"{b}/openapi.json"]
    cmd += ["--checks", "all", "-H", f"X-API-Key: {key}", "--max-examples", "20"]
    cmd += ["--generation-deterministic", "--workers", "1"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    print(f"\nst run --checks all over HTTP: exit {proc.returncode} in {time.perf_counter() - t0:.0f}s\n{out[-3000:]}")
    assert proc.returncode == 0, out[-12000:]
    assert "No issues found" in out and " generated, " in out, out[-6000:]


def _chunked(data: bytes, size: int = 8192):
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_bad_input_is_4xx_with_detail_and_server_keeps_serving(secured, api_key):
    b, h = secured.base, _h(api_key)
    reference = httpx.post(b + "/v1/expressions", json=OK, headers=h, timeout=60).json()
    cases = [  # (name, body bytes or json-able, extra headers, field the detail must name or None)
        ("empty body", b"", {}, "body"),
        ("invalid JSON", b"{not json", {}, None),
        ("non-UTF-8", b'{"text": "\xff\xfe hi"}', {}, None),
        ("lone surrogate", b'{"text": "\\ud800 hi"}', {}, "text"),
        ("JSON array", b"[1, 2]", {}, "body"),
        ("JSON null", b"null", {}, "body"),
        ("deeply nested", b"[" * 20000 + b"]" * 20000, {}, None),
        ("text/plain", json.dumps(OK).encode(), {"content-type": "text/plain"}, None),
        ("missing text", {"max_frames": 5}, {}, "text"),
        ("text not a string", {"text": ["hi"]}, {}, "text"),
        ("blank text", {"text": " \n\t"}, {}, "text"),
        ("text too long", {"text": "x" * 2001}, {}, "text"),
        ("unknown field", {"text": "hi", "temperature": 2}, {}, "temperature"),
        ("max_frames 0", {"text": "hi", "max_frames": 0}, {}, "max_frames"),
        ("max_frames huge", {"text": "hi", "max_frames": 10**12}, {}, "max_frames"),
        ("max_frames bool", {"text": "hi", "max_frames": True}, {}, "max_frames"),
        ("max_frames string", {"text": "hi", "max_frames": "64"}, {}, "max_frames"),
        ("max_frames float", {"text": "hi", "max_frames": 6.5}, {}, "max_frames"),
        ("max_frames inf", b'{"text": "hi", "max_frames": 1e999}', {}, "max_frames"),
        ("num_samples 0", {"text": "hi", "num_samples": 0}, {}, "num_samples"),
        ("num_samples 17", {"text": "hi", "num_samples": 17}, {}, "num_samples"),
        ("num_samples negative", {"text": "hi", "num_samples": -1}, {}, "num_samples"),
        ("seed NaN", b'{"text": "hi", "seed": NaN}', {}, "seed"),
        ("seed negative", {"text": "hi", "seed": -1}, {}, "seed"),
        ("seed too big", {"text": "hi", "seed": 2**64}, {}, "seed"),
    ]
    outcomes = []
    for name, body, headers, field in cases:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs = {"content-type": "application/json", **h, **headers}
        r = httpx.post(b + "/v1/expressions", content=raw, headers=hdrs, timeout=60)
        outcomes.append((name, r.status_code))
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
        detail = r.json()["detail"]
        if field:
            assert field in json.dumps(detail), (name, detail)
    # keyframes: too many / none / wrong type — validated before the model kind is even looked at
    for name, body, field in (
        ("6 keyframes", {"background": "a", "emotion": "b", "keyframes": list("abcdef")}, "keyframes"),
        ("0 keyframes", {"background": "a", "emotion": "b", "keyframes": []}, "keyframes"),
        ("keyframes str", {"background": "a", "emotion": "b", "keyframes": "abc"}, "keyframes"),
        ("long keyframe", {"background": "a", "emotion": "b", "keyframes": ["x" * 1001]}, "keyframes"),
    ):
        r = httpx.post(b + "/v1/keyframes", json=body, headers=h, timeout=60)
        outcomes.append((name, r.status_code))
        assert r.status_code == 422 and field in json.dumps(r.json()["detail"]), (name, r.status_code, r.text)
    r = httpx.post(b + "/v1/keyframes", json={"background": "a", "emotion": "b", "keyframes": ["c"]}, headers=h)
    assert r.status_code == 409 and "model" in json.dumps(r.json()["detail"])  # a CTEG model serves no keyframes
    # huge bodies: declared Content-Length, chunked (no length), and a chunked megabyte
    big = json.dumps({"text": "x" * 200_000}).encode()
    for name, content in (
        ("huge, content-length", big),
        ("huge, chunked", _chunked(big)),
        ("1 MiB, chunked", _chunked(b'{"text": "' + b"y" * (1 << 20) + b'"}')),
    ):
        r = httpx.post(
            b + "/v1/expressions", content=content, headers={"content-type": "application/json", **h}, timeout=60
        )
        outcomes.append((name, r.status_code))
        assert r.status_code == 413 and r.json()["detail"][0]["field"] == "body", (name, r.status_code, r.text[:200])
    # odd but valid text is answered (NUL, emoji, RTL)
    r = httpx.post(b + "/v1/expressions", json={"text": "hi\u0000 😀 مرحبا", "max_frames": 5}, headers=h, timeout=60)
    assert r.status_code == 200, r.text
    print("\n" + "\n".join(f"  {n:24s} -> {s}" for n, s in outcomes))
    # still serving, and still correct: the same seeded request gives the same frames (on either replica)
    assert httpx.get(b + "/healthz").json()["status"] == "ok"
    for _ in range(4):
        again = httpx.post(b + "/v1/expressions", json=OK, headers=h, timeout=60)
        assert again.status_code == 200 and again.json() == reference


def test_replica_killed_under_load_is_replaced(secured, api_key):
    b, h = secured.base, _h(api_key)
    before = secured.replica_pids()
    assert len(before) == 2, before
    results: list[tuple[float, float, int | str]] = []  # (start, end, status or exception)
    lock = threading.Lock()
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(headers=h, timeout=60) as c:
            while not stop.is_set():
                t0 = time.time()
                try:
                    st: int | str = c.post(b + "/v1/expressions", json={**OK, "seed": i}).status_code
                except httpx.HTTPError as e:
                    st = type(e).__name__
                with lock:
                    results.append((t0, time.time(), st))

    n_clients = 6
    with ThreadPoolExecutor(n_clients) as ex:
        try:
            for i in range(n_clients):
                ex.submit(client, i)
            time.sleep(5)
            victim = sorted(before)[0]
            t_kill = time.time()
            os.kill(victim, signal.SIGKILL)  # a replica of *this* server (found in its own session)
            deadline = t_kill + 180
            while time.time() < deadline:
                now = secured.replica_pids()
                if len(now) == 2 and victim not in now:
                    break
                time.sleep(0.5)
            t_new = time.time()
            new = secured.replica_pids() - before
            assert new, f"no replacement replica within 180 s: {secured.replica_pids()}"
            time.sleep(15)  # the new replica loads the model and passes its health check
            t_recovered = time.time()
            time.sleep(8)  # post-recovery load
        finally:
            stop.set()

    kill_window = [r for r in results if r[1] >= t_kill and r[0] < t_recovered]
    errors = [r for r in kill_window if r[2] != 200]
    before_kill = [r for r in results if r[1] < t_kill]
    after = [r for r in results if r[0] >= t_recovered]
    print(
        f"\nreplica {victim} killed; replacement {sorted(new)} seen after {t_new - t_kill:.1f}s; "
        f"{len(before_kill)} requests before the kill (all 200: {all(r[2] == 200 for r in before_kill)}), "
        f"{len(kill_window)} in the kill window with {len(errors)} errors "
        f"({sorted({str(r[2]) for r in errors})}), {len(after)} after recovery"
    )
    assert all(r[2] == 200 for r in before_kill)
    assert after and all(r[2] == 200 for r in after), [r for r in after if r[2] != 200][:5]
    assert not [r for r in results if r[2] != 200 and r[1] < t_kill]  # errors only in the kill window
    survivors = secured.replica_pids()
    assert len(survivors) == 2 and survivors & new
    assert httpx.get(b + "/healthz").status_code == 200


def _register_variant(project: Path, name: str, version: str, alter) -> str:
    """A new version of the registered model ``name``: the files of ``version``, changed by ``alter(dir)``,
    logged to a fresh run and made champion directly in the registry (as a person with MLflow access
    could) — no check on the way, so only the serving side stands between it and users."""
    import tempfile

    import mlflow.artifacts

    from facelab.core import tracking
    from facelab.core.checkpoint import servable_dir

    c = tracking.client(tracking.default_tracking_uri(project))
    champ = c.get_model_version(name, version)
    with tempfile.TemporaryDirectory() as d:
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=champ.source, dst_path=d, tracking_uri=c.tracking_uri)
        )
        local = servable_dir(local)  # the checkpoint inside the registered pyfunc model
        alter(local)
        run = c.create_run(c.get_run(champ.run_id).info.experiment_id, run_name=f"hand-made {alter.__name__}")
        c.log_artifacts(run.info.run_id, str(local), "checkpoint")
        c.set_terminated(run.info.run_id)
    mv = c.create_model_version(
        name,
        source=f"{run.info.artifact_uri.rstrip('/')}/checkpoint",
        run_id=run.info.run_id,
        tags={tracking.TAG_JOB_KIND: champ.tags.get(tracking.TAG_JOB_KIND, "")},
    )
    c.set_registered_model_alias(name, "champion", mv.version)
    return str(mv.version)


def missing_file(d: Path) -> None:
    (d / "model.safetensors").unlink()


def wrong_shapes(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["d_model"] //= 2  # the weights were trained at the full width
    (d / "config.json").write_text(json.dumps(cfg))


def nan_weights(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    w = load_file(d / "model.safetensors")
    save_file(
        {k: (v * float("nan") if v.is_floating_point() and "weight" in k else v) for k, v in w.items()},
        d / "model.safetensors",
    )


def unchanged(d: Path) -> None:
    pass


def test_broken_promotion_is_refused_and_the_champion_keeps_serving(project, secured, api_key):
    """Broken models made champion under load (missing file, wrong shapes, NaN outputs): each fails the
    replicas' health probe and is refused, the previous champion answers every request, then a good
    new version is swapped in on both replicas — zero failed requests throughout."""
    from facelab.core import tracking

    s, hdr = secured, _h(api_key)
    first = httpx.get(s.base + "/healthz").json()
    name = first["model"]
    results: list[tuple[float, int | str, str | None]] = []  # (time, status, version that answered)
    stop = threading.Event()
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(headers=hdr, timeout=60) as c:
            while not stop.is_set():
                try:
                    r = c.post(s.base + "/v1/expressions", json={**OK, "seed": i})
                    st, ver = r.status_code, (r.json()["model"]["version"] if r.status_code == 200 else None)
                except (httpx.HTTPError, ValueError) as e:
                    st, ver = type(e).__name__, None
                with lock:
                    results.append((time.time(), st, ver))

    def wait_for(pred, what: str, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            # /healthz gives refused version numbers only; the reasons are behind the key at /v1/status
            h = httpx.get(s.base + "/v1/status", headers=hdr, timeout=10).json()
            if pred(h):
                return h
            time.sleep(0.5)
        raise AssertionError(f"{what} not seen within {timeout:.0f}s; last /v1/status: {h}\n" + s.log()[-3000:])

    refused: dict[str, str] = {}
    broken: list[str] = []
    # The clients stop on every way out of the block: a failed wait must fail the test, not leave
    # four threads looping (the executor joins them on exit, and the interpreter at shutdown).
    swapped = False
    with ThreadPoolExecutor(4) as ex:
        try:
            for i in range(4):
                ex.submit(client, i)
            time.sleep(3)
            for alter in (missing_file, wrong_shapes, nan_weights):
                v = _register_variant(project, name, first["version"], alter)
                broken.append(v)
                h = wait_for(lambda h: v in h["refused"], f"refusal of version {v} ({alter.__name__})")
                assert h["version"] == first["version"], h
                refused[alter.__name__] = h["refused"][v]
            good = _register_variant(project, name, first["version"], unchanged)
            t_good = time.time()
            wait_for(lambda h: h["version"] == good, f"swap to good version {good}")
            t_swapped = time.time()
            swapped = True
            time.sleep(3)
        finally:
            stop.set()
            if not swapped:
                # a failure left a broken version as champion: give the alias back, so the module's
                # next server (and its fallback) starts on the model the project promoted
                tracking.client(tracking.default_tracking_uri(project)).set_registered_model_alias(
                    name, "champion", first["version"]
                )

    print("\nrefused:", json.dumps(refused, indent=1))
    print(
        f"good version {good} in service {t_swapped - t_good:.1f}s after it became champion; "
        f"{len(results)} requests during the swaps"
    )
    assert "model.safetensors" in refused["missing_file"]
    assert "CheckpointError" in refused["wrong_shapes"]
    assert "non-finite" in refused["nan_weights"]
    failed = [r for r in results if r[1] != 200]
    assert not failed, failed[:5]
    versions = [r[2] for r in results]
    assert set(versions) <= {first["version"], good}  # no broken version ever answered
    assert versions[0] == first["version"] and versions[-1] == good
    c = tracking.client(tracking.default_tracking_uri(project))
    tags = [c.get_model_version(name, v).tags.get("facelab.serve_refused") for v in broken]
    assert len(tags) == 3 and all(tags), tags  # the reason is on record in the registry


def test_viewer_says_flame_is_not_configured_without_a_model(tight, tmp_path):
    """Server B has no FACELAB_FLAME_MODEL: GET /v1/flame is 404 saying how to configure one, and the viewer
    page shows that message under an expressions answer instead of the avatars."""
    from test_flame_gl import CHROMIUM_ARGS

    from test_e2e import _chromium

    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright (the dev extra) drives the browser")
    r = httpx.get(tight.base + "/v1/flame", timeout=30)
    assert r.status_code == 404 and r.json()["detail"][0]["msg"].startswith(
        "no FLAME model configured: set FACELAB_FLAME_MODEL to your own FLAME 2020 generic_model.pkl or .npz"
    )
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(tight.base + "/viewer")
            page.wait_for_selector("#facelab-root[data-ready='1']")
            page.fill("input[name=num_samples]", "1")
            page.fill("input[name=max_frames]", "16")
            page.click("form.ask button[type=submit]")
            box = page.wait_for_selector(".answer .flame-box[data-flame='missing']", timeout=60_000)
            said = box.inner_text().splitlines()[-1]
            assert said.startswith("FLAME mesh: not configured (no FLAME model configured: set FACELAB_FLAME_MODEL")
            assert page.locator("canvas.flame").count() == 0 and page.locator(".answer canvas.heatmap").count() == 1
            page.screenshot(path=str(tmp_path / "served-viewer-no-flame.png"), full_page=True)
        finally:
            browser.close()


def test_overload_is_shed_quickly_with_503(tight):
    b = tight.base

    def one(_):
        t0 = time.perf_counter()
        try:
            st: int | str = httpx.post(b + "/v1/expressions", json=SLOW, timeout=120).status_code
        except httpx.HTTPError as e:
            st = type(e).__name__
        return st, time.perf_counter() - t0

    n = 40
    with ThreadPoolExecutor(n) as ex:
        res = list(ex.map(one, range(n)))
    by: dict = {}
    for st, dt in res:
        by.setdefault(st, []).append(dt)
    print("\n" + ", ".join(f"{st}: {len(v)} (max {max(v):.2f}s)" for st, v in sorted(by.items(), key=str)))
    assert set(by) <= {200, 503, 408}, by  # nothing else: no 500, no dropped connection
    assert len(by.get(503, [])) >= n - 20, by  # 1 running + 2 queued: most of the flood is shed
    assert 200 in by
    # shed at once rather than after queueing: the fastest 503 beats the request timeout by far
    assert min(by[503]) < 30
    r = httpx.post(b + "/v1/expressions", json=OK, timeout=60)
    assert r.status_code == 200 and len(r.json()["sequences"][0]["frames"]) >= 1
    assert httpx.get(b + "/healthz").status_code == 200


def test_request_timeout_answers_408(tight):
    """A body that trickles in for longer than --request-timeout-s (2 s) gets 408, and the server goes on."""

    def trickle():
        yield b'{"text": "'
        for _ in range(10):
            time.sleep(0.5)
            yield b"a"
        yield b'"}'

    t0 = time.perf_counter()
    r = httpx.post(
        tight.base + "/v1/expressions", content=trickle(), headers={"content-type": "application/json"}, timeout=60
    )
    print(f"\ntrickled body: {r.status_code} after {time.perf_counter() - t0:.1f}s: {r.text[:100]}")
    assert r.status_code == 408, r.text
    assert httpx.post(tight.base + "/v1/expressions", json=OK, timeout=60).status_code == 200
