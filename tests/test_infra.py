"""Every deployment file in infra/ loads and says what infra/README.md promises.

Static checks only (PyYAML and the standard library): no cluster, no Docker, no network. They pin
what a deployment depends on: kinds and API versions, a CPU-only head and GPU workers with sane
autoscaling bounds, Ray token auth wherever Ray starts, a RayJob that sweeps a file that exists, a
Serve import path facelab can satisfy, an MLflow stack with auth on and no literal secrets, and one
Ray version everywhere (the pin in pyproject.toml).
"""

from __future__ import annotations

import ast
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "cluster-launcher" / "aws-gpu.yaml"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
MLFLOW_DOCKERFILE = INFRA / "mlflow" / "Dockerfile"
ENV_EXAMPLE = INFRA / "mlflow" / ".env.example"
README = INFRA / "README.md"

MANIFESTS = [KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml", KUBERAY / "rayservice.yaml", LAUNCHER, COMPOSE]
GPU = "nvidia.com/gpu"
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)  # KubeRay refuses authOptions.mode=token below this rayVersion
GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|p3|p4d|p4de|p5)\.")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==(\d+\.\d+\.\d+)", d.strip()))]
    assert len(pins) == 1, f"pyproject.toml should pin ray exactly once, found {pins}"
    return pins[0]


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def one(path: Path, kind: str) -> dict:
    docs = [d for d in load_docs(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec the manifests create: (label, spec)."""
    return [
        ("RayCluster", one(KUBERAY / "raycluster.yaml", "RayCluster")["spec"]),
        ("RayJob", one(KUBERAY / "rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"]),
        ("RayService", one(KUBERAY / "rayservice.yaml", "RayService")["spec"]["rayClusterConfig"]),
    ]


SWEEP_CLUSTERS = ("RayCluster", "RayJob")  # these run sweeps: GPU workers + the shared volume


def ray_container(template: dict) -> dict:
    return template["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def all_groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def resources_of(container: dict) -> tuple[dict, dict]:
    r = container.get("resources") or {}
    return r.get("requests") or {}, r.get("limits") or {}


def env_map(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def facelab_driver_env_keys() -> set[str]:
    """Env vars facelab's ray.init() puts in its runtime_env (facelab.runtime.sweep.init_ray)."""
    src = (ROOT / "platform" / "facelab" / "runtime" / "sweep.py").read_text()
    body = src.split("def init_ray", 1)[1].split("\ndef ", 1)[0]
    block = body.split('"env_vars"', 1)[1].split("ray.init(", 1)[0]
    keys = set(re.findall(r'"([A-Z][A-Z0-9_]+)"\s*:', block))
    assert keys, "could not read the env_vars of facelab.runtime.sweep.init_ray"
    return keys


# ------------------------------------------------------------------------------------------------
# every file loads
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(INFRA)))
def test_manifest_is_valid_yaml(path):
    docs = load_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)


def test_every_yaml_under_infra_is_checked_here():
    found = {p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml")}
    assert found == set(MANIFESTS), f"add new infra YAML to tests/test_infra.py: {sorted(found - set(MANIFESTS))}"


def test_kuberay_kinds_and_api_versions():
    kinds = {p.name: [(d["apiVersion"], d["kind"]) for d in load_docs(p)] for p in KUBERAY.glob("*.yaml")}
    assert kinds == {
        "raycluster.yaml": [("v1", "ConfigMap"), ("v1", "PersistentVolumeClaim"), ("ray.io/v1", "RayCluster")],
        "rayjob.yaml": [("ray.io/v1", "RayJob")],
        "rayservice.yaml": [("ray.io/v1", "RayService")],
    }
    for p in KUBERAY.glob("*.yaml"):
        for d in load_docs(p):
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), d["metadata"]


# ------------------------------------------------------------------------------------------------
# KubeRay: head, workers, autoscaling
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label,spec", cluster_specs(), ids=[c[0] for c in cluster_specs()])
def test_head_is_cpu_only(label, spec):
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0", f"{label}: the head advertises no GPU"
    assert head["rayStartParams"].get("num-cpus") == "0", f"{label}: the head schedules no trials or replicas"
    for c in head["template"]["spec"]["containers"]:
        requests, limits = resources_of(c)
        assert not any("gpu" in k for k in {**requests, **limits}), (
            f"{label}: head container {c['name']} asks for a GPU"
        )
        assert requests.get("cpu") and limits.get("memory"), (
            f"{label}: head container {c['name']} has no CPU/memory size"
        )
    assert not any("gpu" in str(t.get("key", "")) for t in head["template"]["spec"].get("tolerations", []))


@pytest.mark.parametrize("label,spec", cluster_specs(), ids=[c[0] for c in cluster_specs()])
def test_worker_groups_have_autoscaling_bounds(label, spec):
    assert spec.get("enableInTreeAutoscaling") is True, f"{label}: autoscaler off"
    groups = spec.get("workerGroupSpecs") or []
    assert groups, f"{label}: no worker group"
    for g in groups:
        lo, n, hi = g["minReplicas"], g["replicas"], g["maxReplicas"]
        assert all(isinstance(x, int) for x in (lo, n, hi)), g["groupName"]
        assert 0 <= lo <= n <= hi and hi > lo, f"{label}/{g['groupName']}: need minReplicas <= replicas <= maxReplicas"
        # facelab sweep checks one trial fits the cluster as it is before starting: never autoscale from zero
        assert lo >= 1, f"{label}/{g['groupName']}: keep minReplicas >= 1 (infra/README.md)"
        assert "rayStartParams" in g


@pytest.mark.parametrize("label", SWEEP_CLUSTERS)
def test_sweep_clusters_have_a_gpu_worker_group(label):
    spec = dict(cluster_specs())[label]
    gpu_groups = []
    for g in spec["workerGroupSpecs"]:
        requests, limits = resources_of(ray_container(g["template"]))
        if GPU in requests or GPU in limits:
            assert int(requests.get(GPU, 0)) >= 1 and requests.get(GPU) == limits.get(GPU), (
                f"{label}/{g['groupName']}: request and limit the same whole number of GPUs"
            )
            tolerations = g["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == GPU for t in tolerations), f"{label}/{g['groupName']}: tolerate GPU node taints"
            gpu_groups.append(g["groupName"])
    assert gpu_groups, f"{label}: no worker group requests {GPU}"


def test_serving_cluster_needs_no_gpu():
    # FacelabServer loads the model on the CPU (facelab/serve/app.py): GPU nodes would sit idle.
    spec = dict(cluster_specs())["RayService"]
    for g in spec["workerGroupSpecs"]:
        requests, limits = resources_of(ray_container(g["template"]))
        assert GPU not in requests and GPU not in limits


# ------------------------------------------------------------------------------------------------
# KubeRay: token auth, configuration, image
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label,spec", cluster_specs(), ids=[c[0] for c in cluster_specs()])
def test_token_auth_on_every_ray_container(label, spec):
    auth = spec.get("authOptions") or {}
    assert auth.get("mode") == "token", f"{label}: authOptions.mode must be token"
    secret = auth.get("secretName")
    assert secret, f"{label}: authOptions.secretName names the token Secret (never a generated, unknown token)"
    assert version_tuple(spec["rayVersion"]) >= MIN_RAY_FOR_TOKEN_AUTH
    for group, g in all_groups(spec):
        env = env_map(ray_container(g["template"]))
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{label}/{group}: RAY_AUTH_MODE=token"
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
        assert ref == {"name": secret, "key": "auth_token"}, f"{label}/{group}: RAY_AUTH_TOKEN from Secret {secret}"
        assert "value" not in env["RAY_AUTH_TOKEN"], f"{label}/{group}: a literal token"


@pytest.mark.parametrize("label,spec", cluster_specs(), ids=[c[0] for c in cluster_specs()])
def test_ray_containers_get_tracking_settings_from_configmap_and_secret(label, spec):
    cm = one(KUBERAY / "raycluster.yaml", "ConfigMap")
    assert {"MLFLOW_TRACKING_URI", "FACELAB_STORAGE"} <= set(cm["data"])
    assert not any(SECRET_KEY.search(k) for k in cm["data"]), "secrets belong in a Secret"
    for group, g in all_groups(spec):
        c = ray_container(g["template"])
        sources = c.get("envFrom", [])
        assert {"name": cm["metadata"]["name"]} in [s.get("configMapRef") for s in sources], f"{label}/{group}"
        assert any(s.get("secretRef", {}).get("name") == "facelab-mlflow-auth" for s in sources), f"{label}/{group}"
        assert not ({"MLFLOW_TRACKING_URI", "FACELAB_STORAGE"} & set(env_map(c))), "set once, in the ConfigMap"


@pytest.mark.parametrize("label", SWEEP_CLUSTERS)
def test_sweep_clusters_mount_the_shared_volume_under_facelab_storage(label):
    # facelab writes FACELAB_STORAGE as a local path and hands workers absolute data paths: every pod
    # of a sweep cluster mounts the same ReadWriteMany claim at the same place.
    pvc = one(KUBERAY / "raycluster.yaml", "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    storage = one(KUBERAY / "raycluster.yaml", "ConfigMap")["data"]["FACELAB_STORAGE"]
    assert storage.startswith("/"), "FACELAB_STORAGE must be a POSIX path (facelab does not take s3:// URIs)"
    spec = dict(cluster_specs())[label]
    for group, g in all_groups(spec):
        pod = g["template"]["spec"]
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = [
            m
            for m in ray_container(g["template"]).get("volumeMounts", [])
            if vols.get(m["name"], {}).get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
        ]
        assert len(mounts) == 1, f"{label}/{group}: mount claim {pvc['metadata']['name']} once"
        assert storage.startswith(mounts[0]["mountPath"].rstrip("/") + "/"), (
            f"{label}/{group}: FACELAB_STORAGE off the volume"
        )


def test_one_project_image_everywhere_with_the_pinned_ray():
    images = set()
    for label, spec in cluster_specs():
        for _, g in all_groups(spec):
            images |= {c["image"] for c in g["template"]["spec"]["containers"]}
    submitter = one(KUBERAY / "rayjob.yaml", "RayJob")["spec"].get("submitterPodTemplate")
    if submitter:
        images |= {c["image"] for c in submitter["spec"]["containers"]}
    assert len(images) == 1, f"one image for head, workers and submitter: {images}"
    image = images.pop()
    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"pin a tag: {image}"
    assert f"ray{ray_pin()}" in image, f"the image tag names its Ray ({ray_pin()}): {image}"
    for label, spec in cluster_specs():
        assert spec["rayVersion"] == ray_pin(), f"{label}: rayVersion {spec['rayVersion']} != pyproject pin"


# ------------------------------------------------------------------------------------------------
# RayJob and RayService
# ------------------------------------------------------------------------------------------------


def test_rayjob_entrypoint_sweeps_an_existing_sweep_file():
    spec = one(KUBERAY / "rayjob.yaml", "RayJob")["spec"]
    entry = spec["entrypoint"]
    # KubeRay pastes the entrypoint into a shell command line and Ray Jobs runs it in a shell again:
    # one single-quoted `bash -c` script survives both.
    argv = shlex.split(entry)
    assert argv[:2] == ["bash", "-c"] and len(argv) == 3, argv
    script = argv[2]
    sweeps = re.findall(r"(?:^|[;&|]\s*|exec\s+)facelab sweep (\S+)", script)
    assert len(sweeps) == 1, f"exactly one `facelab sweep FILE` in {script!r}"
    sweep = ROOT / sweeps[0]
    assert sweep.is_file() and sweep.parent == ROOT / "sweeps", f"{sweeps[0]} is not a file in sweeps/"
    sweep_doc = yaml.safe_load(sweep.read_text())
    assert {"name", "job"} <= set(sweep_doc) and (ROOT / sweep_doc["job"]).is_file()
    assert "dvc pull" in script, "the job's working directory has no data/ (.gitignore): it must pull it"
    assert spec.get("shutdownAfterJobFinishes") is True


def test_rayjob_runtime_env_ships_a_git_checkout_and_does_not_clash_with_facelab():
    spec = one(KUBERAY / "rayjob.yaml", "RayJob")["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and runtime_env.get("working_dir")
    # Ray refuses to merge a job's runtime_env with a driver's that sets the same env var.
    clash = set(runtime_env.get("env_vars", {})) & facelab_driver_env_keys()
    assert not clash, f"facelab's ray.init() sets {sorted(clash)} itself"
    # Ray leaves .git out of working_dir by default; DVC and facelab's lineage need it.
    containers = spec["submitterPodTemplate"]["spec"]["containers"]
    excludes = env_map(containers[0]).get("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", {}).get("value")
    assert excludes is not None and ".git" not in excludes.split(","), excludes


def test_rayservice_import_path_is_module_colon_builder():
    spec = one(KUBERAY / "rayservice.yaml", "RayService")["spec"]
    assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML string"
    serve_cfg = yaml.safe_load(spec["serveConfigV2"])
    apps = serve_cfg["applications"]
    assert apps
    for app in apps:
        path = app["import_path"]
        assert isinstance(path, str) and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", path), path
        module = path.split(":")[0]
        assert module.startswith("facelab.") and module_file(module).is_file(), f"{module} is not in platform/"
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in app.get("args", {}).items())
        assert [d["name"] for d in app["deployments"]] == ["FacelabServer"]
    port = serve_cfg["http_options"]["port"]
    for group, g in all_groups(spec["rayClusterConfig"]):
        ports = {p.get("name"): p["containerPort"] for p in ray_container(g["template"]).get("ports", [])}
        assert ports.get("serve") == port, f"{group}: container port 'serve' must be the Serve HTTP port {port}"


def test_rayservice_applications_agree_with_plan_models():
    """Several models: every application lists the same models, and its name and route prefix are the
    ones `facelab serve` gives that model (facelab.serve.app.plan_models)."""
    from facelab.serve.app import plan_models

    spec = one(KUBERAY / "rayservice.yaml", "RayService")["spec"]
    apps = yaml.safe_load(spec["serveConfigV2"])["applications"]
    listed = {app["args"].get("models") for app in apps}
    assert len(listed) == 1 and None not in listed, listed
    entries = {e.name: e for e in plan_models(listed.pop().split(","), apps[0]["args"].get("default_model"))}
    assert sorted(entries) == sorted(app["args"]["model"] for app in apps)
    for app in apps:
        e = entries[app["args"]["model"]]
        assert (app["name"], app["route_prefix"]) == (e.app_name, e.route_prefix), app["name"]


def module_file(module: str) -> Path:
    return ROOT / "platform" / (module.replace(".", "/") + ".py")


def test_rayservice_builder_takes_exactly_one_argument():
    # Ray Serve calls an application builder with the `args` mapping, and only if the function takes
    # exactly one parameter (ray.serve._private.api.call_user_app_builder_with_args_if_necessary).
    spec = one(KUBERAY / "rayservice.yaml", "RayService")["spec"]
    for app in yaml.safe_load(spec["serveConfigV2"])["applications"]:
        module, attr = app["import_path"].split(":")
        tree = ast.parse(module_file(module).read_text())
        defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        if attr not in defs:
            pytest.skip(f"{module}:{attr} is not defined yet: rayservice.yaml needs it")
        a = defs[attr].args
        assert len(a.posonlyargs) + len(a.args) == 1 and not a.kwonlyargs and not a.vararg, (
            f"{module}:{attr} must take exactly one parameter (the args mapping)"
        )


# ------------------------------------------------------------------------------------------------
# cluster launcher
# ------------------------------------------------------------------------------------------------


def test_cluster_launcher_has_a_cpu_head_and_gpu_workers_with_bounds():
    cfg = yaml.safe_load(LAUNCHER.read_text())
    assert cfg["cluster_name"] and cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not GPU_INSTANCE.match(head["node_config"]["InstanceType"]), "the head is a CPU instance"
    assert head.get("resources", {}).get("CPU") == 0, "the head schedules no trials"
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    families = set()
    for name, t in workers.items():
        itype = t["node_config"]["InstanceType"]
        assert GPU_INSTANCE.match(itype), f"{name}: {itype} is not a GPU instance"
        families.add(itype.split(".")[0])
        lo, hi = t["min_workers"], t["max_workers"]
        assert isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= cfg["max_workers"], name
    assert {"g5", "p4d"} <= families
    assert sum(t["min_workers"] for t in workers.values()) >= 1, "keep one GPU worker up (infra/README.md)"
    assert sum(t["min_workers"] for t in workers.values()) <= cfg["max_workers"]


def test_cluster_launcher_installs_facelab_and_starts_ray_with_token_auth():
    cfg = yaml.safe_load(LAUNCHER.read_text())
    setup = " ".join(cfg["setup_commands"])
    assert re.search(r"pip install .*facelab", setup), "setup_commands install facelab"
    assert re.search(r"ray\[[^\]]*\]==" + re.escape(ray_pin()), setup), "setup_commands pin pyproject's Ray"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts, key
        for c in starts:
            assert re.search(r"RAY_AUTH_MODE=token\s+ray start", c), f"{key}: {c!r}"
    assert any("export RAY_AUTH_MODE=token" in c for c in cfg["initialization_commands"])
    mounts = cfg["file_mounts"]
    token = [remote for remote in mounts if remote.endswith("/.ray/auth_token")]
    assert token and mounts[token[0]].startswith("~/"), "the token comes from a local file, never the YAML"


# ------------------------------------------------------------------------------------------------
# MLflow server
# ------------------------------------------------------------------------------------------------

SECRET_KEY = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|(?:^|_)TOKEN(?:$|_)")
REQUIRED_REF = re.compile(r"\$\{([A-Z_][A-Z0-9_]*):\?[^}]*\}")  # ${VAR:?message}: set and non-empty
ANY_REF = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(:?[-?+])?[^}]*\}")


def compose_values(node) -> list[str]:
    """Every string value of the compose file (comments excluded)."""
    if isinstance(node, dict):
        return [v for x in node.values() for v in compose_values(x)]
    if isinstance(node, list):
        return [v for x in node for v in compose_values(x)]
    return [str(node)] if node is not None else []


def compose_required_vars() -> set[str]:
    return {m for v in compose_values(yaml.safe_load(COMPOSE.read_text())) for m in REQUIRED_REF.findall(v)}


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def test_compose_runs_postgres_minio_and_mlflow_with_auth():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    mlflow = services["mlflow"]
    cmd = mlflow["command"] if isinstance(mlflow["command"], str) else " ".join(mlflow["command"])
    assert "--serve-artifacts" in cmd and re.search(r"--app-name[ =]basic-auth", cmd), cmd
    env = compose_env(mlflow)
    assert REQUIRED_REF.fullmatch(env["MLFLOW_AUTH_ADMIN_PASSWORD"]), "admin password: ${VAR:?...}, no default"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://") and "minio" in env["MLFLOW_S3_ENDPOINT_URL"]
    assert {"postgres", "minio-init"} <= set(mlflow["depends_on"])
    assert (COMPOSE.parent / mlflow["build"]["context"] / "Dockerfile").is_file()
    for name, s in services.items():
        if "image" in s and "build" not in s:
            assert re.search(r":[\w.-]+$", s["image"]) and not s["image"].endswith(":latest"), (
                f"{name}: pin {s['image']}"
            )


def test_compose_has_no_literal_secrets_and_no_secret_defaults():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, s in services.items():
        for key, value in compose_env(s).items():
            if SECRET_KEY.search(key):
                assert REQUIRED_REF.fullmatch(value), f"{name}.{key}={value!r}: use ${{VAR:?message}} (no default)"
    for value in compose_values(yaml.safe_load(COMPOSE.read_text())):
        for m in ANY_REF.finditer(value):
            if SECRET_KEY.search(m.group(1)):
                assert m.group(2) == ":?", f"{m.group(0)}: a secret must not have a default"
        assert not re.search(r"://[^\s/:@$]+:[^\s/@$]+@", value), f"credentials inside a URL: {value}"


def test_env_example_lists_every_required_variable_with_an_empty_value():
    required = compose_required_vars()
    example = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            example[key.strip()] = value.strip()
    assert required and required <= set(example), f"missing in .env.example: {sorted(required - set(example))}"
    for key in required:
        assert example[key] == "", f".env.example: {key} must be empty so an unedited copy cannot start"
    for key, value in example.items():
        if SECRET_KEY.search(key):
            assert value == "", f".env.example: {key} has a value"


def test_mlflow_image_pins_the_client_mlflow_version():
    docker = MLFLOW_DOCKERFILE.read_text()
    assert re.search(r"^FROM \S+:\S+", docker, re.M) and ":latest" not in docker
    version = re.search(r"^ARG MLFLOW_VERSION=(\S+)", docker, re.M).group(1)
    assert '"mlflow[auth]==${MLFLOW_VERSION}"' in docker
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]
    assert str(compose["build"]["args"]["MLFLOW_VERSION"]) == version
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"mlflow\b", d))
    lo, hi = re.search(r">=([\d.]+)", spec).group(1), re.search(r"<([\d.]+)", spec).group(1)
    assert version_tuple(lo) <= version_tuple(version) < version_tuple(hi), f"server {version} vs clients {spec}"
    assert "basic-auth" in docker and "--serve-artifacts" in docker


# ------------------------------------------------------------------------------------------------
# across all of infra/
# ------------------------------------------------------------------------------------------------

INFRA_TEXT_FILES = sorted(p for p in INFRA.rglob("*") if p.is_file())


def test_one_ray_version_everywhere():
    pin = ray_pin()
    seen: list[tuple[str, str]] = []
    patterns = [
        r"rayVersion:\s*\"?(\d+\.\d+\.\d+)",
        r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)",
        r"\bray(?:\[[^\]]*\])?==(\d+\.\d+\.\d+)",
        r"-ray(\d+\.\d+\.\d+)\b",
    ]
    for p in INFRA_TEXT_FILES:
        text = p.read_text()
        for pat in patterns:
            seen += [(p.name, v) for v in re.findall(pat, text)]
    assert len(seen) >= 8, seen
    assert {v for _, v in seen} == {pin}, f"Ray versions in infra/ differ from pyproject's {pin}: {sorted(set(seen))}"
    assert pin.startswith("2.60."), "the manifests were written and checked for Ray 2.60"


@pytest.mark.parametrize("path", INFRA_TEXT_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_no_secrets_committed(path):
    text = path.read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an AWS access key id"
    assert not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text), "a private key"
    assert not re.search(r"\b(ghp|gho|ghs|github_pat|glpat|xox[baprs])[-_][A-Za-z0-9_]{16,}", text), "an access token"
    # KEY = value / KEY: value where KEY names a password, secret or token; values may be empty, a
    # reference ($VAR, ${VAR}, $(cmd)), a path, a <placeholder>, change-me, or another variable's NAME.
    allowed = re.compile(r"^(|[$~/<].*|\.\.\.|.*change-me.*|[A-Z_][A-Z0-9_]*|token|disabled)$")
    pattern = re.compile(
        r"(?i)(?<![{\w$])([a-z0-9_.-]*(?:password|passwd|secret|token)(?![a-z])[a-z0-9_]*)[\"']?[ \t]*[:=][ \t]*([^\s,}]*)"
    )
    for m in pattern.finditer(text):
        key, value = m.group(1), m.group(2).strip("\"'")
        if key.lower() in ("token", "tokens") or key.lower().endswith("name"):  # prose, `mode: token`, secretName
            continue
        assert allowed.match(value), f"{path.name}: literal value for {key}: {m.group(0)!r}"


def test_readme_names_every_file_secret_and_setting():
    readme = README.read_text()
    for p in MANIFESTS + [MLFLOW_DOCKERFILE, ENV_EXAMPLE]:
        assert str(p.relative_to(INFRA)) in readme, f"infra/README.md does not mention {p.relative_to(INFRA)}"
    secrets = set()
    for label, spec in cluster_specs():
        secrets.add(spec["authOptions"]["secretName"])
        for _, g in all_groups(spec):
            c = ray_container(g["template"])
            secrets |= {s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s}
    config_keys = set(one(KUBERAY / "raycluster.yaml", "ConfigMap")["data"]) - {
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "TOKENIZERS_PARALLELISM",
    }
    compose_vars = compose_required_vars()
    for name in sorted(secrets | config_keys | compose_vars):
        assert name in readme, f"infra/README.md does not name {name}"
    assert "change-me" in readme and "| setting | where | set it to |" in readme
    for command in (
        "ray start --head",
        "ray start --address",
        "RAY_ADDRESS=",
        "ray job submit",
        "--working-dir .",
        "dvc remote add -d",
        "dvc push",
        "dvc pull",
        "ray up",
        "kubectl apply -f infra/kuberay/",
    ):
        assert command in readme, f"infra/README.md lacks `{command}`"


def test_project_dockerfile_builds_the_image_the_manifests_run():
    """The image of every Ray container: the pinned Ray base, torch as the Makefile pins it, this
    checkout at /app with its .git, facelab installed; data and run stores never in the image."""
    text = (ROOT / "Dockerfile").read_text()
    ray_pin = re.search(r'"ray\[[^\]]+\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f"ARG BASE=rayproject/ray:{ray_pin}-py311-gpu" in text
    assert '"torch==2.13.0"' in text and "pip install --no-cache-dir /app" in text and "COPY" in text
    assert "WORKDIR /app" in text and "facelab families" in text  # the build fails if the registry breaks
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", "data", "models", "mlruns.db", "mlartifacts", "ray_results"} <= ignored
    assert ".git" not in ignored  # DVC opens the repository; runs record its SHA
    for manifest in ("raycluster.yaml", "rayservice.yaml"):
        images = re.findall(r"^\s*image: (\S+)", (ROOT / "infra" / "kuberay" / manifest).read_text(), re.M)
        assert images and all(i.endswith(f":0.1.0-ray{ray_pin}-py311-gpu") for i in images), images
