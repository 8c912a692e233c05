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
_PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
    "--metrics-export-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
)


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


# What a fake cluster's head needs (clusters/local.yaml): its nodes find the GCS on port 6379. So that a lost
# node is noticed in seconds, not half a minute, the GCS checks each node every second and gives up after 3 misses;
# and a worker group that cannot be placed (it counted a node that just died) gives up after 20 s and is re-planned.
FAKE_GCS = "127.0.0.1:6379"
FAKE_CLUSTER_ENV = {
    "RAY_FAKE_CLUSTER": "1",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
}


def one_gpu_nodes(cluster_yaml: str, directory: str, max_nodes: int) -> str:
    """A copy of ``cluster_yaml`` (clusters/local.yaml) with only its one-"GPU" node type (one worker per node), at
    most ``max_nodes`` of them, written into ``directory``; its path."""
    import yaml

    with open(cluster_yaml) as f:
        config = yaml.safe_load(f)
    config["available_node_types"] = {
        name: spec for name, spec in config["available_node_types"].items() if name != "gpu_4x"
    }
    config["available_node_types"]["gpu_1x"]["max_workers"] = config["max_workers"] = max_nodes
    path = os.path.join(directory, f"one_gpu_nodes_{max_nodes}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def kill_tree(pid: int) -> list:
    """SIGKILL a process and every process under it at once; return their pids.

    Each is stopped before its children are listed, so none starts another or sees
    the others go and exits on its own terms. Ray's workers lead process groups of
    their own, so killing the group of the process that started Ray misses them.
    """
    stopped = []

    def stop(pid):
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return
        stopped.append(pid)
        for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
            stop(int(child))

    stop(pid)
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return stopped


def lose_node(node_id: str) -> list:
    """Lose a node of a fake cluster as a machine is lost: :func:`kill_tree` its raylet. Returns the pids."""
    found = subprocess.run(
        ["pgrep", "-f", f"raylet .*--node_id={node_id}"], capture_output=True, text=True
    ).stdout.split()
    if len(found) != 1:
        raise RuntimeError(f"expected one raylet for node {node_id}, found {found}")
    return kill_tree(int(found[0]))


@contextlib.contextmanager
def joined_node(env: dict, *args, prefix=()):
    """A node joined to the cluster at :data:`FAKE_GCS` by hand (``ray start --address``, ``args`` after it), as a user
    adds a machine; ``prefix`` runs before it (e.g. a mount namespace). Stopped, with what it started, on exit."""
    command = " ".join([RAY, "start", f"--address={FAKE_GCS}", "--disable-usage-stats", "--block", *args])
    node = subprocess.Popen(
        [*prefix, "sh", "-c", f"exec {command}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield node
    finally:
        _stop(node)


def ray_list(address: str, env: dict, kind: str, *filters) -> list:
    """``ray list KIND`` on the cluster as JSON (dead nodes and actors included unless filtered out)."""
    command = [RAY, "list", kind, "--address", address, "--format", "json", "--limit", "1000", "--detail"]
    for condition in filters:
        command += ["--filter", condition]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return [] if done.stdout.startswith("No resource") else json.loads(done.stdout)


@contextlib.contextmanager
def fake_cluster(config: str, timeout: float = 120):
    """A head of Ray's fake multinode provider with ``config`` (a cluster YAML): nodes come and go as real raylets.

    Yields what :func:`local_head` yields; the GCS is at :data:`FAKE_GCS`. Only one runs at a time on a machine.
    """
    with local_head(
        num_cpus=0,
        timeout=timeout,
        gcs_port=6379,
        extra_env=FAKE_CLUSTER_ENV,
        extra_args=(f"--autoscaling-config={config}",),
    ) as head:
        yield head


@contextlib.contextmanager
def local_head(num_cpus: int = 2, timeout: float = 120, gcs_port=None, extra_env=None, extra_args=()):
    """Yield ``(address, env)``: the dashboard URL and the environment a client needs (token auth on)."""
    temp = tempfile.mkdtemp(prefix="rtk")  # short: Ray's socket paths live under it
    token_path = os.path.join(temp, "token")
    with open(token_path, "w") as f:
        f.write(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path, RAY_USAGE_STATS_ENABLED="0", **(extra_env or {}))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # as with the venv activated
    ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS))))
    if gcs_port is not None:
        ports["--port"] = gcs_port
    command = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        *(f"{flag}={port}" for flag, port in ports.items()),
        *extra_args,
    ]
    head = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
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
        request = urllib.request.Request(
            f"{address}{path}", method=method, headers={"Authorization": f"Bearer {f.read()}"}
        )
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
    """Stop every job still running on the head: their drivers run in sessions of their own, outside the head's
    group."""

    def running():
        return [
            job["submission_id"]
            for job in list_jobs(address, env)
            if job.get("submission_id") and job["status"] in ("PENDING", "RUNNING")
        ]

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
