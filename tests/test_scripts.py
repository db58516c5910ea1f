"""KeyframeFace §4.1 (Input Standardization) served as ``POST /v1/scripts``: free text → a script that is
always a valid ``POST /v1/keyframes`` request (facelab.families.keyframe_lm.scripts).

1. The schema-constrained decoder, on the tiny (untrained) writer: every seed and text gives JSON of
   exactly the script schema, within ``max_keyframes`` and the length bounds, non-blank without edge
   spaces; the same seed gives the same script; a model that wants to write quotes, backslashes,
   newlines and end-of-turn tokens still cannot break the JSON.
2. Configuration: a writer that cannot be loaded offline is refused naming ``--script-writer`` (also
   by ``facelab serve`` before Ray starts); the serve config takes ``script_writer``.
3. The route, in process (:func:`facelab.serve.app.asgi_app` on the contract test's tiny keyframe
   model): script → keyframes; hostile input → 422 naming the field; a CTEG model → 409; the page
   carries the scripts endpoint.
4. Over HTTP against a real ``facelab serve`` and in Chromium: :func:`check_served_scripts_route` and
   :func:`check_viewer_writes_a_script_in_a_browser`, run by tests/test_serve_hardening.py on its served
   keyframe model (no second training or server for them).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch

from test_openapi_contract import _cteg_served, _keyframe_served

from conftest import BIN, REPO, env_for

TEXTS = [
    "She opens the letter, can't believe it, then bursts out laughing.",
    "x",
    "Ein müder Pfleger hört, dass seine Schicht verlängert wird 😩",
    '{"background": "injected", "keyframes": ["\\"]} quotes \\\\ and\nnewlines',
]


@pytest.fixture(scope="module")
def writer():
    from facelab.families.keyframe_lm.scripts import tiny_script_writer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: threads only contend on a small shared machine
    try:
        yield tiny_script_writer()
    finally:
        torch.set_num_threads(threads)


def assert_script_shape(script: dict, max_keyframes: int, bounds) -> None:
    """What the decoder promises, checked independently of the keyframes request's schema, and that schema."""
    from facelab.serve.schemas import validate_script

    assert validate_script(script) == script  # a valid POST /v1/keyframes request as written
    assert list(script) == ["background", "emotion", "keyframes"], script
    assert isinstance(script["keyframes"], list) and 1 <= len(script["keyframes"]) <= max_keyframes, script
    limits = [bounds.background, bounds.emotion] + [bounds.keyframe] * len(script["keyframes"])
    for s, limit in zip([script["background"], script["emotion"], *script["keyframes"]], limits):
        assert isinstance(s, str) and 1 <= len(s) <= limit, (s, limit)
        assert s == s.strip() and s.isprintable() and '"' not in s and "\\" not in s, s


# ---------------------------------------------------------------------------------------------
# 1. the constrained decoder
# ---------------------------------------------------------------------------------------------


def test_writer_always_writes_a_valid_keyframes_request(writer):
    """40 scripts (10 seeds x 4 texts, max_keyframes cycling 1..5) with tight bounds: each is exactly the
    schema and a valid /v1/keyframes request; the writer decides the count (more than one count occurs)."""
    from facelab.families.keyframe_lm.scripts import ScriptBounds
    from facelab.serve.schemas import KeyframeRequest

    bounds = ScriptBounds(background=24, emotion=12, keyframe=16)
    counts, t0 = set(), time.perf_counter()
    for seed in range(10):
        for i, text in enumerate(TEXTS):
            k = 1 + (seed + i) % 5
            script = writer.write(text, max_keyframes=k, seed=seed, bounds=bounds)
            assert_script_shape(script, k, bounds)
            KeyframeRequest.model_validate_json(json.dumps(script))  # the keyframes route would take it
            counts.add(len(script["keyframes"]))
    print(f"\n40 scripts in {time.perf_counter() - t0:.1f}s; keyframe counts seen: {sorted(counts)}")
    assert len(counts) > 1, counts


def test_default_bounds_and_the_writer_label(writer):
    from facelab.families.keyframe_lm.scripts import TINY_NOTE, ScriptBounds

    stats = {}
    script = writer.write(TEXTS[0], seed=3, stats=stats)
    assert_script_shape(script, 5, ScriptBounds())
    assert 0 < stats["forward_calls"] <= sum((160, 48, 5 * 120)) + 20, stats
    assert writer.info == {"model": writer.name, "tiny": True, "note": TINY_NOTE}
    assert "not a pretrained" in writer.name and "not meaningful" in TINY_NOTE


def test_same_seed_same_script_other_seeds_differ(writer):
    from facelab.families.keyframe_lm.scripts import ScriptBounds

    b = ScriptBounds(30, 15, 20)
    first = writer.write(TEXTS[0], seed=11, bounds=b)
    assert writer.write(TEXTS[0], seed=11, bounds=b) == first
    others = {json.dumps(writer.write(TEXTS[0], seed=s, bounds=b)) for s in range(5)}
    assert len(others) > 1
    greedy = writer.write(TEXTS[0], seed=0, bounds=b, temperature=0)
    assert writer.write(TEXTS[0], seed=99, bounds=b, temperature=0) == greedy  # greedy ignores the seed


class _Hostile(torch.nn.Module):
    """The tiny writer with a huge bonus on every token that could break the JSON: quotes, backslashes,
    newlines, spaces, special tokens -- a model that would write anything but the schema if it could."""

    def __init__(self, model, bonus_ids):
        super().__init__()
        self.inner = model
        self.bonus = torch.zeros(model.config.vocab_size)
        self.bonus[bonus_ids] = 1e4
        self.config = model.config

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=0):
        out = self.inner(input_ids=input_ids, cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep)
        out.logits = out.logits + self.bonus
        return out


def test_a_model_that_wants_to_break_the_json_cannot(writer):
    from facelab.families.keyframe_lm.generate import _tables
    from facelab.families.keyframe_lm.scripts import ScriptBounds, ScriptWriter

    tok = writer.tokenizer
    vocab = _tables(tok).vocab
    bad = [i for i, t in enumerate(vocab) if any(c in t for c in '"\\\n{}[]') or t.startswith(" ") or t.endswith(" ")]
    bad += list(tok.all_special_ids)
    assert len(bad) > 20
    hostile = ScriptWriter(_Hostile(writer.model, bad), tok, name="hostile", tiny=True)
    b = ScriptBounds(20, 10, 12)
    for seed in range(6):
        script = hostile.write(TEXTS[3], max_keyframes=3, seed=seed, bounds=b)
        assert_script_shape(script, 3, b)


def test_writing_stops_between_steps_when_told(writer):
    """A request's deadline: ``should_stop`` is asked before every forward call; True stops the writer
    with GenerationStopped (a TimeoutError: the route answers 408) after exactly that many calls."""
    from facelab.families.keyframe_lm.generate import GenerationStopped

    asked = []

    def stop_after_five() -> bool:
        asked.append(1)
        return len(asked) > 5

    stats = {}
    with pytest.raises(GenerationStopped) as err:
        writer.write(TEXTS[0], seed=0, should_stop=stop_after_five, stats=stats)
    assert isinstance(err.value, TimeoutError) and stats["forward_calls"] == 5


def test_bad_arguments_and_invalid_scripts_are_refused_naming_them(writer):
    from facelab.families.keyframe_lm.scripts import REQUEST_CAPS, ScriptBounds, ScriptError
    from facelab.serve import schemas
    from facelab.serve.schemas import validate_script

    for k in (0, 6, True, "3", 2.0):
        with pytest.raises(ScriptError, match="max_keyframes"):
            writer.write("hello", max_keyframes=k)
    for kw, name in (({"seed": -1}, "seed"), ({"temperature": float("nan")}, "temperature"), ({}, "text")):
        with pytest.raises(ScriptError, match=name):
            writer.write("  " if name == "text" else "hello", **kw)
    with pytest.raises(ScriptError, match="background"):
        ScriptBounds(background=0)
    with pytest.raises(ScriptError, match="keyframe must be"):
        ScriptBounds(keyframe=1001)
    # the writer's bounds are checked against the keyframes request's caps (repeated in its layer)
    assert REQUEST_CAPS == {"background": schemas.MAX_TEXT_CHARS, "emotion": schemas.MAX_TEXT_CHARS,
                            "keyframe": schemas.MAX_DESCRIPTION_CHARS}  # fmt: skip
    ok = {"background": "a", "emotion": "b", "keyframes": ["c"]}
    assert validate_script(ok) == ok
    for bad, field in (
        ({**ok, "keyframes": list("abcdef")}, "keyframes"),
        ({**ok, "emotion": "   "}, "emotion"),
        ({**ok, "extra": 1}, "extra"),
        ({**ok, "keyframes": ["x" * 1001]}, "keyframes.0"),
    ):
        with pytest.raises(ValueError, match=field):
            validate_script(bad)


# ---------------------------------------------------------------------------------------------
# 2. configuration
# ---------------------------------------------------------------------------------------------


def test_a_writer_that_cannot_load_is_refused_naming_the_option(tmp_path):
    from facelab.families.keyframe_lm.scripts import ScriptWriterError, check_script_writer, load_script_writer

    (tmp_path / "empty").mkdir()
    for name in ("nosuch-org/nosuch-model-xyz", str(tmp_path / "empty"), str(tmp_path / "absent")):
        with pytest.raises(ScriptWriterError, match="--script-writer") as err:
            load_script_writer(name)
        assert name in str(err.value) and "offline" in str(err.value)
        with pytest.raises(ScriptWriterError, match="--script-writer"):
            check_script_writer(name)
    assert "hf download" in str(pytest.raises(ScriptWriterError, check_script_writer, "nosuch-org/m").value)


def test_serve_refuses_an_unloadable_writer_before_ray_starts(tmp_path):
    """`facelab serve --script-writer DIR` with nothing loadable there: one line naming the option, exit 2,
    within seconds (no Ray, no tracking store)."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(BIN / "facelab"), "serve", "--script-writer", str(tmp_path / "absent"), "--port", "1"],
        cwd=REPO,
        env=env_for(REPO),
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.perf_counter() - t0
    print(f"\nrefused in {took:.1f}s: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--script-writer" in proc.stderr and str(tmp_path / "absent") in proc.stderr
    assert "Traceback" not in proc.stderr and "ray" not in proc.stdout.lower()


def test_serve_config_takes_a_script_writer_per_model(tmp_path):
    from facelab.serve.config import ServeConfigError, load_serve_config

    f = tmp_path / "serve.yaml"
    f.write_text("models:\n  - model: keyframe-tiny\n    script_writer: Qwen/Qwen3-4B-Instruct-2507\n  - cteg-tiny\n")
    assert load_serve_config(f).settings() == {
        "keyframe-tiny": {"script_writer": "Qwen/Qwen3-4B-Instruct-2507"},
        "cteg-tiny": {},
    }
    f.write_text("models:\n  - model: keyframe-tiny\n    script_writer: ''\n")
    with pytest.raises(ServeConfigError, match=r"models\.0\.script_writer"):
        load_serve_config(f)


# ---------------------------------------------------------------------------------------------
# 3. the route, in process
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kf_client(tmp_path_factory, writer):
    from fastapi.testclient import TestClient

    from facelab.serve import app as serve_app

    served = _keyframe_served(tmp_path_factory.mktemp("kf"))
    with TestClient(serve_app.asgi_app(served)) as client:
        yield client


def test_script_route_writes_what_the_keyframes_route_takes(kf_client):
    t0 = time.perf_counter()
    r = kf_client.post("/v1/scripts", json={"text": TEXTS[0], "max_keyframes": 2, "seed": 5})
    took = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    body = r.json()
    print(f"\n/v1/scripts in {took:.2f}s: {body}")
    assert body["seed"] == 5 and body["writer"]["tiny"] is True and "not meaningful" in body["writer"]["note"]
    assert 1 <= len(body["script"]["keyframes"]) <= 2
    assert kf_client.post("/v1/scripts", json={"text": TEXTS[0], "max_keyframes": 2, "seed": 5}).json() == body
    r = kf_client.post("/v1/keyframes", json=body["script"])
    assert r.status_code == 200, r.text
    assert len(r.json()["keyframes"]) == len(body["script"]["keyframes"])
    r = kf_client.post("/v1/scripts", json={"text": "a smile"})  # seed and max_keyframes left out
    assert r.status_code == 200 and isinstance(r.json()["seed"], int), r.text


@pytest.mark.parametrize(
    "body, field, kind",
    [
        ({}, "text", "missing"),
        ({"text": ""}, "text", "string_too_short"),
        ({"text": " \n\t "}, "text", "string_pattern_mismatch"),
        ({"text": "x" * 2001}, "text", "string_too_long"),
        ({"text": "\U0001f600" * 1001}, "text", "too_many_bytes"),
        ({"text": "\U0001f600" * 1000}, "text", "too_many_tokens"),  # within every cap, too long for the writer
        ({"text": 42}, "text", "string_type"),
        ({"text": "hi", "max_keyframes": 0}, "max_keyframes", "greater_than_equal"),
        ({"text": "hi", "max_keyframes": 6}, "max_keyframes", "less_than_equal"),
        ({"text": "hi", "max_keyframes": "3"}, "max_keyframes", "int_type"),
        ({"text": "hi", "max_keyframes": True}, "max_keyframes", "int_type"),
        ({"text": "hi", "max_keyframes": 2.5}, "max_keyframes", "int_type"),
        ({"text": "hi", "seed": -1}, "seed", "greater_than_equal"),
        ({"text": "hi", "background": "x"}, "background", "extra_forbidden"),
    ],
)
def test_hostile_script_requests_are_422_naming_the_field(kf_client, body, field, kind):
    r = kf_client.post("/v1/scripts", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(d["field"] == field and d["type"] == kind for d in detail), detail


def test_script_route_on_a_cteg_model_is_409_and_documented(tmp_path):
    from fastapi.testclient import TestClient

    from facelab.serve import app as serve_app

    with TestClient(serve_app.asgi_app(_cteg_served(tmp_path))) as client:
        r = client.post("/v1/scripts", json={"text": "hello"})
        assert r.status_code == 409, r.text
        (d,) = r.json()["detail"]
        assert d["field"] == "model" and d["type"] == "wrong_model_kind" and "/v1/scripts" in d["msg"], d
        page = client.get("/viewer").text
        assert '"scripts"' not in page  # an expressions page has no script writer
    doc = serve_app.api.openapi()
    op = doc["paths"]["/v1/scripts"]["post"]
    assert set(op["responses"]) == {"200", "400", "401", "408", "409", "413", "422", "503"}
    req = doc["components"]["schemas"]["ScriptRequest"]["properties"]
    assert req["text"]["maxLength"] == 2000 and req["max_keyframes"]["maximum"] == 5
    assert doc["components"]["schemas"]["ScriptResponse"]["properties"]["script"] == {
        "$ref": "#/components/schemas/KeyframeRequest",
        "description": "Edit it, then send it to `POST /v1/keyframes` as is.",
    }


def test_viewer_page_of_a_keyframes_model_offers_the_script_writer(kf_client):
    page = kf_client.get("/viewer").text
    data = json.loads(page.split('id="facelab-data">', 1)[1].split("</script>", 1)[0])["page"]
    assert data["scripts"]["endpoint"] == "/v1/scripts"
    assert data["scripts"]["writer"] is None or data["scripts"]["writer"]["tiny"] is True
    assert "Write script" in page  # face.js's button


# ---------------------------------------------------------------------------------------------
# 4. over HTTP and in a browser (run by tests/test_serve_hardening.py on its served keyframe model)
# ---------------------------------------------------------------------------------------------


def check_served_scripts_route(base: str) -> None:
    """POST /v1/scripts then POST /v1/keyframes with the script, on a real `facelab serve`; hostile input
    is a 422 naming the field and the server keeps answering."""
    t0 = time.perf_counter()
    r = httpx.post(base + "/v1/scripts", json={"text": TEXTS[0], "max_keyframes": 2, "seed": 1}, timeout=60)
    print(f"\nPOST /v1/scripts: {r.status_code} in {time.perf_counter() - t0:.2f}s: {r.text[:400]}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["writer"]["tiny"] is True and body["writer"]["note"], body
    r = httpx.post(base + "/v1/keyframes", json=body["script"], timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["keyframes"]) == len(body["script"]["keyframes"]) <= 2
    for bad, field in (
        ({"text": ""}, "text"),
        ({"text": "x" * 5000}, "text"),
        ({"text": "hi", "max_keyframes": 0}, "max_keyframes"),
        ({"text": "hi", "max_keyframes": 6}, "max_keyframes"),
        ({"text": ["hi"]}, "text"),
    ):
        r = httpx.post(base + "/v1/scripts", json=bad, timeout=30)
        assert r.status_code == 422 and any(d["field"] == field for d in r.json()["detail"]), (bad, r.text)
    r = httpx.post(base + "/v1/scripts", json={"text": "a smile", "max_keyframes": 1, "seed": 1}, timeout=60)
    assert r.status_code == 200, r.text


def check_viewer_writes_a_script_in_a_browser(base: str, shot) -> None:
    """The served keyframes page in headless Chromium: type free text, click "Write script", the
    background / emotion / keyframes fields are filled with the script the server wrote (its writer's
    label, tiny and untrained, on the page), then "generate" asks /v1/keyframes with them and the page
    draws one face per keyframe. ``shot``: where to save a screenshot."""
    from test_e2e import _chromium

    browser_bin = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright (the dev extra) drives the browser")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_bin, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            outside = []
            page.on("request", lambda q: outside.append(q.url) if not q.url.startswith(base) else None)
            page.goto(base + "/viewer")
            page.wait_for_selector("#facelab-root[data-ready='1']")
            assert "tiny" in page.inner_text("section.script-writer")  # the writer is labelled before use
            page.fill("textarea[name=free_text]", TEXTS[0])
            page.fill("input[name=max_keyframes]", "3")
            with page.expect_response(lambda a: a.url.endswith("/v1/scripts")) as answer:
                page.click("button.write-script")
            assert answer.value.status == 200, answer.value.text()
            assert answer.value.request.post_data_json == {"text": TEXTS[0], "max_keyframes": 3}
            script = answer.value.json()["script"]
            page.wait_for_selector("section.script-writer[data-written='1']", timeout=30_000)
            assert page.input_value("input[name=background]") == script["background"]
            assert page.input_value("input[name=emotion]") == script["emotion"]
            assert page.input_value("textarea[name=keyframes]").split("\n") == script["keyframes"]
            assert "not meaningful" in page.inner_text("section.script-writer")
            with page.expect_response(lambda a: a.url.endswith("/v1/keyframes")) as kf_answer:
                page.click("form.ask button[type=submit]")
            assert kf_answer.value.status == 200, kf_answer.value.text()
            assert kf_answer.value.request.post_data_json == script  # the script as written, unedited
            page.wait_for_selector(".answer[data-answered='1']", timeout=60_000)
            faces = page.locator(".answer section.item[data-item]").count()  # one per keyframe
            assert faces == len(script["keyframes"]), (faces, script)
            page.screenshot(path=str(shot), full_page=True)
            assert not outside, outside
        finally:
            browser.close()
