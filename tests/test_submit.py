"""Jobs on a real local cluster (``ray start --head``, token auth): submit.py and ``ray job submit``; cluster.yaml's
schema."""

import http.client
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from cluster import RAY, free_ports, job_logs, list_jobs, local_head, stop_job

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def head():
    with local_head(num_cpus=2) as (address, env):
        yield address, env


def _submit(head, *args, env=None, timeout=420):
    address, head_env = head
    return subprocess.run(
        [sys.executable, str(ROOT / "submit.py"), *args, "--address", address],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or head_env,
        cwd=ROOT,
    )


def _jobs(head) -> int:
    return sum(1 for job in list_jobs(*head) if job.get("submission_id"))


@pytest.fixture
def planted_secrets():
    """Secret-looking files in the project, as a user's checkout may hold them (none of them ignored by git); only
    the ones created here are removed after."""
    paths = [ROOT / "planted.key", ROOT / "id_rsa_planted", ROOT / "auth_token"]
    created = [path for path in paths if not path.exists()]
    try:
        for path in created:
            path.write_text("planted by a test\n")
        yield [path.name for path in paths]
    finally:
        for path in created:
            path.unlink(missing_ok=True)


@pytest.mark.integrations  # a whole job through a head, as users submit one
def test_submit_py_runs_the_smoke_job_to_success(head, tmp_path, planted_secrets):
    summary = tmp_path / "smoke.json"
    done = _submit(head, "jobs/smoke.yaml", "--set", f"checkpoint_dir={tmp_path}", "--set", f"output={summary}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SUCCEEDED" in done.stdout and "test accuracy" in done.stdout
    result = json.loads(summary.read_text())
    assert result["epochs"] == 2 and result["compress"] and result["test_accuracy"] > 0.2
    assert result["bytes_sent"] < result["dense_bytes"] / 10
    # The token the head and the client share never shows: not in our output, the results, the
    # process list, nor any log or file the cluster wrote (its own token file aside).
    token_path = head[1]["RAY_AUTH_TOKEN_PATH"]
    token = Path(token_path).read_text().strip()
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert token not in done.stdout + done.stderr + summary.read_text() + processes
    for path in Path(token_path).parent.rglob("*"):
        if path.is_file() and not path.is_socket() and path != Path(token_path):
            assert token.encode() not in path.read_bytes(), f"the token is in {path}"
    # What the head unpacked as the job's working directory: the project, without environments, history or secrets.
    packages = Path(token_path).parent.glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
    package = max((path for path in packages if path.is_dir()), key=lambda path: path.stat().st_mtime)
    assert (package / "raytopk" / "hook.py").is_file() and (package / "jobs" / "smoke.yaml").is_file()
    uploaded = {path.name for path in package.iterdir()}
    assert not uploaded & {".venv", ".git", "runs", *planted_secrets}, uploaded


@pytest.mark.integrations  # the same job as submit.py's test, through Ray's own CLI: with the as-users-run tests
def test_ray_job_submit_cli_runs_the_same_job(head, tmp_path):
    address, env = head
    summary = tmp_path / "cli.json"
    done = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(ROOT),
            "--",
            "python",
            "-m",
            "raytopk",
            "train",
            "--config",
            "jobs/smoke.yaml",
            "--epochs",
            "1",
            "--checkpoint-dir",
            str(tmp_path),
            "--output",
            str(summary),
        ],
        capture_output=True,
        text=True,
        timeout=420,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout.lower()
    assert json.loads(summary.read_text())["epochs"] == 1


@pytest.mark.faults
def test_a_sweep_with_more_trials_than_cpus_queues_and_finishes(head, tmp_path):
    """Three 1-CPU trials, no concurrency limit, on the 2-CPU head: the third waits for a free CPU. Also the Optuna
    searcher: its samples stay inside the search space's bounds."""
    done = _submit(
        head,
        "tune_configs/mnist5k_ratio_lr.yaml",
        "--set",
        "num_samples=3",
        "--set",
        "epochs=1",
        "--set",
        "max_train_batches=5",
        "--set",
        "search_alg=optuna",
        "--set",
        f"storage_path={tmp_path}",
        "--set",
        "name=submitted",
        "--set",
        "max_concurrent_trials=0",
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "submitted" / "trials.json").read_text())["trials"]
    assert len(rows) == 3 and all(row["status"] == "done" for row in rows)
    assert all(0.001 <= row["params"]["ratio"] <= 0.1 and 0.005 <= row["params"]["lr"] <= 0.2 for row in rows)


@pytest.mark.faults
def test_six_jobs_submitted_at_once_all_queue_and_finish(head, tmp_path):
    """Load: six jobs at once on the 2-CPU head. Two train at a time (1 CPU each); the rest wait for workers, none fails
    or is lost."""
    address, env = head
    ids = [f"load{i}-{os.getpid()}" for i in range(6)]
    submitters = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "submit.py"),
                "jobs/smoke.yaml",
                "--address",
                address,
                "--no-wait",
                "--submission-id",
                job_id,
                "--set",
                f"name={job_id}",
                "--set",
                "epochs=1",
                "--set",
                "max_train_batches=5",
                "--set",
                f"checkpoint_dir={tmp_path}",
                "--set",
                f"output={tmp_path / job_id}.json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for job_id in ids
    ]
    for submitter in submitters:
        assert submitter.wait(timeout=300) == 0, submitter.stdout.read()[-2000:]
    deadline = time.time() + 1200
    while time.time() < deadline:
        statuses = {
            job["submission_id"]: job["status"] for job in list_jobs(address, env) if job.get("submission_id") in ids
        }
        if len(statuses) == len(ids) and all(
            status in ("SUCCEEDED", "FAILED", "STOPPED") for status in statuses.values()
        ):
            break
        time.sleep(5)
    assert statuses == {job_id: "SUCCEEDED" for job_id in ids}, statuses
    assert all(json.loads((tmp_path / f"{job_id}.json").read_text())["epochs"] == 1 for job_id in ids)


@pytest.mark.faults
def test_a_job_wanting_more_than_the_cluster_holds_says_it_waits(head, tmp_path):
    """A cluster may grow (an autoscaler, or ``ray start`` on another machine): the job waits for nodes, and says so."""
    address, env = head
    job_id = f"too-big-{os.getpid()}"
    done = _submit(
        head,
        "jobs/smoke.yaml",
        "--no-wait",
        "--submission-id",
        job_id,
        "--set",
        "workers=8",
        "--set",
        f"checkpoint_dir={tmp_path}",
    )
    assert done.returncode == 0, done.stderr
    try:
        deadline = time.time() + 180
        while "raytopk: waiting for nodes" not in job_logs(address, env, job_id) and time.time() < deadline:
            time.sleep(2)
        assert "raytopk: waiting for nodes: 8 workers need 4 CPU in all and this cluster has 2 now" in job_logs(
            address, env, job_id
        )
        assert {job["submission_id"]: job["status"] for job in list_jobs(address, env)}[job_id] == "RUNNING"
    finally:
        stop_job(address, env, job_id)


@pytest.mark.faults
def test_a_failing_job_exits_nonzero_with_its_status_and_last_lines(head, tmp_path):
    done = _submit(
        head,
        "jobs/smoke.yaml",
        "--set",
        "dataset=mnist",
        "--set",
        f"data_dir={tmp_path / 'empty'}",
        "--set",
        f"checkpoint_dir={tmp_path}",
        "--set",
        "max_failures=0",
    )
    assert done.returncode == 1
    assert "ended FAILED; its last log lines:" in done.stderr


def test_the_head_runs_jobs_only_from_loopback_and_serves_nothing_else_without_the_token(head):
    """The dashboard, whose Jobs API runs code, listens on 127.0.0.1 alone. Ray turns a loopback node address into
    the machine's own on purpose, so its other services listen there too: each answers a client without the token
    with 401 (HTTP) or a refusal (gRPC, shown for the GCS), or is a read-only metrics page.

    The head's processes are those of its ``ray start`` session; ``ss`` lists the sockets they listen on.
    """
    address, env = head
    session, gcs_port = _head_session(env)
    ours = []  # (ip, port) of every socket a process of the head listens on
    for line in subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout.splitlines():
        if any(_session(int(pid)) == session for pid in re.findall(r"pid=(\d+)", line)):
            ip, port = line.split()[3].rsplit(":", 1)
            ours.append((ip.strip("[]").removeprefix("::ffff:"), port))
    dashboard_port = address.rsplit(":", 1)[1]
    assert [ip for ip, port in ours if port == dashboard_port] == ["127.0.0.1"], ours
    node_ip = subprocess.run(
        [sys.executable, "-c", "from ray._private.services import get_node_ip_address as ip; print(ip())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    answers = {
        f"{ip}:{port}": _answer_without_token(node_ip if ip == node_ip else "127.0.0.1", port)
        for ip, port in ours
        if ip != "127.0.0.1"
    }
    assert answers and set(answers.values()) <= {"401", "metrics", "grpc"}, answers
    client = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    client.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    refused = subprocess.run(
        [sys.executable, "-c", f"import ray; ray.init(address='{node_ip}:{gcs_port}')"],
        capture_output=True,
        text=True,
        env=client,
        timeout=120,
    )
    assert refused.returncode != 0 and "Failed to connect to Ray cluster" in refused.stderr, refused.stderr[-2000:]


def _session(pid: int):
    try:
        return os.getsid(pid)
    except OSError:  # the process ended meanwhile
        return None


def _head_session(env: dict) -> tuple:
    """``(session id, GCS port)`` of the head: its GCS names the head's temp dir and its port on its command line."""
    temp = str(Path(env["RAY_AUTH_TOKEN_PATH"]).parent).encode()
    for pid in Path("/proc").iterdir():
        try:
            args = (pid / "cmdline").read_bytes().split(b"\0") if pid.name.isdigit() else []
        except OSError:
            continue
        if args and args[0].endswith(b"gcs_server") and any(temp in arg for arg in args):
            (port,) = [arg.split(b"=")[1].decode() for arg in args if arg.startswith(b"--gcs_server_port=")]
            return _session(int(pid.name)), port
    raise AssertionError("no GCS of this head is running")


def _answer_without_token(host: str, port: str) -> str:
    """What a plain HTTP GET without a token gets: "401", "metrics" (Prometheus text), "grpc" (an HTTP/2 server's
    first frame), or else what it was."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=10) as response:
            body = response.read(6)
            return "metrics" if body == b"# HELP" else f"{response.status} {body!r}"
    except urllib.error.HTTPError as err:
        return str(err.code)
    except http.client.BadStatusLine as err:
        return "grpc" if str(err).startswith("\x00\x00") else repr(err)


def test_bad_config_is_refused_before_anything_is_submitted(head):
    before = _jobs(head)
    done = _submit(head, "jobs/smoke.yaml", "--set", "ratio=2")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "ratio: got 2; allowed: a number in (0, 1]" in done.stderr and "Traceback" not in done.stderr
    assert _jobs(head) == before


def test_wrong_token_is_refused_clearly_and_never_printed(head):
    wrong = "0" * 64
    env = {k: v for k, v in head[1].items() if k != "RAY_AUTH_TOKEN_PATH"}
    env["RAY_AUTH_TOKEN"] = wrong
    done = _submit(head, "jobs/smoke.yaml", env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "refused the token" in done.stderr and wrong not in done.stdout + done.stderr


def test_unreachable_cluster_is_one_line(tmp_path):
    (port,) = free_ports(1)
    done = subprocess.run(
        [sys.executable, str(ROOT / "submit.py"), "jobs/smoke.yaml", "--address", f"http://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"cannot reach a Ray cluster at http://127.0.0.1:{port}" in done.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["jobs/smoke.yaml", "--entrypoint-num-cpus", "x"], "--entrypoint-num-cpus: got 'x'; allowed: a number"),
        (["jobs/smoke.yaml", "--entrypoint-num-cpus", "-1"], "--entrypoint-num-cpus: got -1; allowed: a number"),
        ([], "the following arguments are required: config"),
    ],
)
def test_a_bad_flag_is_one_line(args, fragment):
    done = subprocess.run(
        [sys.executable, str(ROOT / "submit.py"), *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("submit.py: error: ") and fragment in done.stderr


def test_cluster_yaml_passes_rays_schema_and_scales_gpu_nodes_from_zero():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    gpu_types = [t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types and all(t["min_workers"] == 0 and t["max_workers"] >= 4 for t in gpu_types)
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu_types)
    # Nothing beyond Ray's own SSH rule is opened to the internet, and the dashboard binds to loopback.
    assert raw["provider"]["security_group"]["IpPermissions"] == []
    assert all("--dashboard-host=127.0.0.1" in c for c in raw["head_start_ray_commands"] if "ray start" in c)
    assert "/home/ray/raytopk" in raw["file_mounts"] and any(
        "pip install" in c and "/home/ray/raytopk" in c for c in raw["setup_commands"]
    )


def test_a_cluster_yaml_typo_is_caught_by_the_schema(tmp_path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    raw["available_node_types"]["gpu_1x"]["min_worker"] = raw["available_node_types"]["gpu_1x"].pop("min_workers")
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(raw))


def test_local_cluster_yaml_passes_rays_schema_and_mirrors_cluster_yaml():
    """clusters/local.yaml: the cloud file's worker types with the same min and max, a custom resource for each GPU."""
    from ray.autoscaler._private.util import validate_config

    local = yaml.safe_load((ROOT / "clusters" / "local.yaml").read_text())
    validate_config(local)  # prepare_config needs the fake provider's example file, which the wheel lacks
    cloud = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert local["available_node_types"][local["head_node_type"]]["resources"] == {"CPU": 0}
    for name, spec in cloud["available_node_types"].items():
        if name == cloud["head_node_type"]:
            continue
        mirror = local["available_node_types"][name]
        assert (mirror["min_workers"], mirror["max_workers"]) == (spec["min_workers"], spec["max_workers"]), name
        assert mirror["resources"]["fake_gpu"] == spec["resources"]["GPU"], name
    assert local["max_workers"] == cloud["max_workers"] and local["provider"]["type"] == "fake_multinode"
