"""A real local Ray cluster for tests: ``ray start --head --block`` on loopback, free ports, its own temp dir and token.

Only what this helper started is stopped: the ``ray start`` process (SIGTERM, it shuts its
cluster down) and then, if anything is left, its process group by id.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
_PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port",
               "--metrics-export-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port")


def free_ports(count: int) -> list:
    """``count`` distinct ports free on 127.0.0.1 right now."""
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@contextlib.contextmanager
def local_head(num_cpus: int = 2, timeout: float = 120):
    """Yield ``(address, env)``: the dashboard URL and the environment a client needs (token auth on)."""
    temp = tempfile.mkdtemp(prefix="rtk")  # short: Ray's socket paths live under it
    token_path = os.path.join(temp, "token")
    with open(token_path, "w") as f:
        f.write(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path, RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # as with the venv activated
    ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS))))
    command = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               "--include-dashboard=true", f"--num-cpus={num_cpus}", f"--temp-dir={temp}", "--disable-usage-stats",
               *(f"{flag}={port}" for flag, port in ports.items())]
    head = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        _wait_for_jobs_api(address, env, head, timeout)
        yield address, env
    finally:
        _stop_jobs(address, env)
        _stop(head)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_jobs_api(address: str, env: dict, head, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            list_jobs(address, env)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    raise RuntimeError(f"no Ray jobs API at {address} after {timeout:.0f} s")


def _api(address: str, env: dict, path: str, method: str = "GET"):
    with open(env["RAY_AUTH_TOKEN_PATH"]) as f:
        request = urllib.request.Request(f"{address}{path}", method=method, headers={"Authorization": f"Bearer {f.read()}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def list_jobs(address: str, env: dict) -> list:
    """Every job the head knows, as its jobs API lists them (``submission_id``, ``status``, ``entrypoint``, ...)."""
    return _api(address, env, "/api/jobs/")


def job_logs(address: str, env: dict, submission_id: str) -> str:
    return _api(address, env, f"/api/jobs/{submission_id}/logs")["logs"]


def stop_job(address: str, env: dict, submission_id: str) -> None:
    _api(address, env, f"/api/jobs/{submission_id}/stop", method="POST")


def _stop_jobs(address: str, env: dict, timeout: float = 60) -> None:
    """Stop every job still running on the head: their drivers run in sessions of their own, outside the head's group."""

    def running():
        return [job["submission_id"] for job in list_jobs(address, env) if job.get("submission_id") and job["status"] in ("PENDING", "RUNNING")]

    try:
        for submission_id in running():
            stop_job(address, env, submission_id)
        deadline = time.time() + timeout
        while running() and time.time() < deadline:
            time.sleep(1)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        pass  # the head is gone already: nothing left to ask


def _stop(head) -> None:
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
    try:
        os.killpg(head.pid, signal.SIGKILL)  # the session ray start led: only processes it started
    except ProcessLookupError:
        pass
