"""Load benchmark for `facelab serve`: N concurrent clients on loopback for a bounded time.

Each client (a thread with its own keep-alive httpx connection) sends `POST /v1/expressions` back to
back. Reported: requests/s, p50/p95/p99 latency of the successful requests, and the errors split into
*shed* (503: Serve's max_queued_requests refused it at once) and *failed* (any other 5xx, a timeout
or a connection error). Prints a table and writes JSON.

    # against a running server
    python bench/load_serve.py http://127.0.0.1:8000 --clients 16 --duration 60
    # or start `facelab serve` on an already-promoted model of the project in the current directory
    python bench/load_serve.py --start --clients 16 --duration 60 --max-frames 64 --json load.json

The API key, if the server wants one, is read from $FACELAB_API_KEY (never from the command line).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def run_load(url: str, clients: int, duration: float, body: dict, headers: dict, timeout: float) -> dict:
    lat: list[float] = []
    codes: dict[str, int] = {}
    lock = threading.Lock()
    start = time.perf_counter()
    end = start + duration

    def client() -> None:
        with httpx.Client(headers=headers, timeout=timeout) as c:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    r = c.post(url + "/v1/expressions", json=body)
                    key = str(r.status_code)
                except httpx.HTTPError as e:
                    key = type(e).__name__
                dt = time.perf_counter() - t0
                with lock:
                    codes[key] = codes.get(key, 0) + 1
                    if key == "200":
                        lat.append(dt)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    total = sum(codes.values())
    shed = codes.get("503", 0)
    client_errors = sum(v for k, v in codes.items() if k.isdigit() and 400 <= int(k) < 500)
    failed = total - codes.get("200", 0) - shed - client_errors
    return {
        "clients": clients,
        "duration_s": round(wall, 2),
        "requests": total,
        "ok": codes.get("200", 0),
        "shed_503": shed,
        "client_4xx": client_errors,
        "failed": failed,
        "codes": codes,
        "rps": round(total / wall, 2),
        "ok_rps": round(codes.get("200", 0) / wall, 2),
        "p50_ms": round(percentile(lat, 0.50) * 1e3, 1),
        "p95_ms": round(percentile(lat, 0.95) * 1e3, 1),
        "p99_ms": round(percentile(lat, 0.99) * 1e3, 1),
        "max_ms": round(max(lat, default=float("nan")) * 1e3, 1),
    }


def start_server(port: int, extra: list[str], log: Path) -> subprocess.Popen:
    exe = shutil.which("facelab") or str(Path(sys.executable).parent / "facelab")
    return subprocess.Popen(
        [exe, "serve", "--port", str(port), *extra],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"no healthy server at {url} after {timeout:.0f}s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the server's own session only
        proc.wait()


def versions() -> dict:
    out = {"python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU"}
    for mod in ("ray", "torch", "fastapi", "mlflow", "httpx"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing package is just not reported
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", nargs="?", help="base URL of a running server (or use --start)")
    ap.add_argument(
        "--start", action="store_true", help="start `facelab serve` in the current project and stop it after"
    )
    ap.add_argument("--serve-arg", action="append", default=[], help="extra argument for `facelab serve` (repeatable)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring (not reported)")
    ap.add_argument("--text", default="I am so happy to see you again!")
    ap.add_argument("--max-frames", type=int, default=64)
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=150.0, help="client-side timeout per request (s)")
    ap.add_argument("--json", default="load_serve.json", help="where to write the results")
    a = ap.parse_args(argv)
    if bool(a.url) == a.start:
        ap.error("give a server URL or --start (not both)")

    proc = None
    url = a.url.rstrip("/") if a.url else None
    if a.start:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        proc = start_server(port, a.serve_arg, Path("load_serve_server.log"))
    try:
        wait_healthy(url, proc)
        key = os.environ.get("FACELAB_API_KEY")
        headers = {"X-API-Key": key} if key else {}
        body = {"text": a.text, "num_samples": a.num_samples, "max_frames": a.max_frames}
        model = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()
        if a.warmup > 0:
            run_load(url, a.clients, a.warmup, body, headers, a.timeout)
        res = run_load(url, a.clients, a.duration, body, headers, a.timeout)
    finally:
        if proc is not None:
            stop_server(proc)
    res.update(
        {
            "url": url,
            "request": body,
            "model": model,
            "versions": versions(),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        }
    )
    Path(a.json).write_text(json.dumps(res, indent=2))
    cols = [
        "clients",
        "duration_s",
        "requests",
        "rps",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "max_ms",
        "ok",
        "shed_503",
        "failed",
    ]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    print("| " + " | ".join(str(res[c]) for c in cols) + " |")
    print(f"status codes: {res['codes']}; results in {a.json}")
    return 0 if res["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
