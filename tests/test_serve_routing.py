"""Several models in one `facelab serve` (issue #22), the parts that need no Ray: how ``--model``
entries become Serve applications and route prefixes (:func:`facelab.serve.app.plan_models`), and how
the default model's application answers ``/models/<its name>/...`` and refuses other names — on the
in-process app of one replica (:func:`facelab.serve.app.asgi_app`). The real server, several models
over HTTP, is tested in tests/test_serve_hardening.py."""

from __future__ import annotations

import pytest

from test_openapi_contract import _cteg_served


def test_plan_models_puts_the_default_at_the_root_and_the_others_under_models():
    from facelab.serve.app import plan_models

    (one,) = plan_models(["cteg-tiny"])
    assert (one.app_name, one.route_prefix, one.alias, one.default) == ("facelab", "/", "champion", True)
    entries = plan_models(["cteg-tiny", "kf.lora_a@previous", "kf-b"], default="kf-b")
    assert [(e.name, e.alias, e.app_name, e.route_prefix, e.default) for e in entries] == [
        ("kf-b", "champion", "facelab", "/", True),
        ("cteg-tiny", "champion", "facelab-cteg-tiny", "/models/cteg-tiny", False),
        ("kf.lora_a", "previous", "facelab-kf.lora_a", "/models/kf.lora_a", False),
    ]


@pytest.mark.parametrize(
    ("specs", "default", "msg"),
    [
        ([], None, "at least one"),
        (["a", "a@previous"], None, "'a' is given twice"),
        (["a@"], None, "alias after '@'"),
        (["a/b"], None, "route prefix /models/NAME"),
        ([" "], None, "NAME[@ALIAS]"),
        (["a", "b"], "c", "--default 'c' is not one of the --model names (a, b)"),
    ],
)
def test_plan_models_refuses_bad_entries_naming_the_option(specs, default, msg):
    from facelab.serve.app import plan_models

    with pytest.raises(ValueError, match="--") as err:
        plan_models(specs, default)
    assert msg in str(err.value)


def test_route_path_is_below_the_route_prefix():
    from facelab.serve.app import route_path

    assert route_path({"path": "/models/kf/healthz", "root_path": "/models/kf"}) == "/healthz"
    assert route_path({"path": "/models/kf", "root_path": "/models/kf"}) == "/"
    assert route_path({"path": "/models/kf2/healthz", "root_path": "/models/kf"}) == "/models/kf2/healthz"
    assert route_path({"path": "/healthz", "root_path": ""}) == "/healthz"


def test_default_application_answers_its_own_prefix_and_refuses_other_names(tmp_path):
    from starlette.testclient import TestClient

    from facelab.serve import app as serve_app

    app = serve_app.asgi_app(_cteg_served(tmp_path), api_key="k3y")
    serve_app._ROUTING = (("cteg-tiny",), True, ("cteg-tiny", "kf"))
    try:
        c, h = TestClient(app), {"X-API-Key": "k3y"}
        assert c.get("/models/cteg-tiny/healthz").status_code == 200  # open, as /healthz
        assert c.get("/models/cteg-tiny/v1/models").status_code == 401
        body = c.get("/models/cteg-tiny/v1/models", headers=h).json()
        assert body["name"] == "cteg-tiny" and body["models"][0]["route_prefix"] == "/models/cteg-tiny"
        assert body["models"][0]["default"] and body["models"][0]["status"] == "ok"
        r = c.post("/models/cteg-tiny/v1/expressions", json={"text": "hi", "max_frames": 4, "seed": 0}, headers=h)
        assert r.status_code == 200, r.text
        assert c.get("/models/kf/v1/models").status_code == 401  # the key first: no listing for strangers
        r = c.get("/models/nosuch/v1/models", headers=h)
        (d,) = r.json()["detail"]
        assert r.status_code == 404 and d["type"] == "unknown_model" and d["field"] == "model"
        assert "'nosuch'" in d["msg"] and "cteg-tiny, kf" in d["msg"]
        r = c.get("/v1/models", headers={**h, "X-Facelab-Model": "kf"})  # the header names a model of this route
        assert r.status_code == 404 and "X-Facelab-Model 'kf' is not served at this route" in r.text, r.text
        assert c.get("/v1/models", headers={**h, "X-Facelab-Model": "cteg-tiny"}).status_code == 200
        r = c.get("/models/cteg-tiny/v1/models", headers={**h, "X-Facelab-Model": "kf"})
        assert r.status_code == 404, r.text  # route and header disagree
        health = c.get("/healthz").json()
        assert health["models"] == {"cteg-tiny": {"status": "ok", "version": "1", "route_prefix": "/models/cteg-tiny"}}
    finally:
        serve_app._ROUTING = None
        serve_app._API_KEY_CHECK = None


def test_serve_config_gives_each_model_its_settings(tmp_path):
    from facelab.serve.config import ServeConfigError, load_serve_config

    f = tmp_path / "serve.yaml"
    f.write_text(
        "default: kf-a\n"
        "models:\n"
        "  - cteg-tiny@previous\n"
        "  - {model: kf-a+kf-b, replicas: 2, max_batch_size: 1, cpus_per_replica: 0.5}\n"
    )
    cfg = load_serve_config(f)
    assert [m.model for m in cfg.models] == ["cteg-tiny@previous", "kf-a+kf-b"] and cfg.default == "kf-a"
    assert cfg.settings() == {"cteg-tiny": {}, "kf-a": {"replicas": 2, "max_batch_size": 1, "cpus_per_replica": 0.5}}
    f.write_text("models:\n  - cteg-tiny\n  - {model: kf, replicas: 0, replicaz: 2}\nextra: 1\n")
    with pytest.raises(ServeConfigError) as err:
        load_serve_config(f)
    msg = str(err.value)
    assert msg.startswith(f"--config {f}: ") and "models.1.replicas: Input should be greater than or equal to 1" in msg
    assert "models.1.replicaz: unknown key" in msg and "extra: unknown key" in msg
    f.write_text("models: []\n")
    with pytest.raises(ServeConfigError, match="models"):
        load_serve_config(f)
