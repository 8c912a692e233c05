"""Bad config values and flags: one line naming the value and what is allowed, exit 2, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import raytopk
from raytopk.config import ConfigError, default_run_name, load_config

from cluster import free_ports

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ratio": 0}, "ratio: got 0; allowed: a number in (0, 1]"),
        ({"ratio": -0.5}, "ratio: got -0.5; allowed: a number in (0, 1]"),
        ({"ratio": 1.5}, "ratio: got 1.5; allowed: a number in (0, 1]"),
        ({"ratio": float("nan")}, "ratio: got nan; allowed: a number in (0, 1]"),
        ({"ratio": "lots"}, "ratio: got 'lots'; allowed: a number"),
        ({"model": "vgg"}, "model: got 'vgg'; allowed: resnet18, resnet20, resnet50, simple_cnn, vit"),
        ({"dataset": "imagenet"}, "dataset: got 'imagenet'; allowed: cifar10, fashion_mnist, mnist, mnist5k, parquet"),
        ({"optimizer": "adam"}, "optimizer: got 'adam'; allowed: sgd, adamw"),
        ({"backend": "mpi"}, "backend: got 'mpi'; allowed: auto, gloo, nccl"),
        ({"batch_size": 0}, "batch_size: got 0; allowed: a number in [1, inf)"),
        ({"epochs": -1}, "epochs: got -1; allowed: a number in [1, inf)"),
        ({"compress": "yes"}, "compress: got 'yes'; allowed: true or false"),
        ({"method": "powersgd"}, "method: got 'powersgd'; allowed: topk, dense, fp16"),
        (
            {"method": "fp16", "per_layer": True},
            "per_layer: set, but compress is false; allowed: only with compress: true",
        ),
        ({"lr": float("inf")}, "lr: got inf; allowed: a number in (0, inf)"),
        ({"amp": "fp8"}, "amp: got 'fp8'; allowed: none, bf16, fp16"),
        ({"amp": "fp16"}, "amp: got 'fp16' without use_gpu; allowed on CPU: none, bf16"),
        ({"accumulate": 0}, "accumulate: got 0; allowed: a number in [1, inf)"),
        (
            {"accumulate": 8, "max_train_batches": 4},
            "accumulate: got 8, more than max_train_batches 4; allowed: at most max_train_batches",
        ),
        ({"compress": True, "warmup_ratio": 1.5}, "warmup_ratio: got 1.5; allowed: a number in (0, 1]"),
        (
            {"compress": True, "warmup_epochs": 2},
            "warmup_epochs: got 2, but warmup_ratio is null; allowed: set warmup_ratio too",
        ),
        ({"compress": True, "clip_norm": 0}, "clip_norm: got 0; allowed: a number in (0, inf)"),
        ({"per_layer": True}, "per_layer: set, but compress is false; allowed: only with compress: true"),
        (
            {"compress": True, "momentum_correction": True, "optimizer": "adamw"},
            "momentum_correction: true with optimizer 'adamw'; allowed: only with optimizer: sgd",
        ),
        (
            {"compress": True, "momentum_correction": True, "momentum": 0.0},
            "momentum: got 0.0 with momentum_correction; allowed: a number in (0, 1)",
        ),
        ({"exchange": "ring"}, "exchange: got 'ring'; allowed: auto, allgather, sharded, hierarchical"),
        (
            {"min_workers": 3, "workers": 2},
            "min_workers: got 3, more than workers 2; allowed: 0 (always workers) or 1 to workers",
        ),
        ({"min_workers": -1}, "min_workers: got -1; allowed: a number in [0, inf)"),
        ({"resize_interval_s": 0}, "resize_interval_s: got 0; allowed: a number in (0, inf)"),
        ({"resources_per_worker": "fake_gpu"}, "resources_per_worker: got 'fake_gpu'; allowed: a mapping or null"),
        (
            {"resources_per_worker": {"GPU": 1}},
            "resources_per_worker: got {'GPU': 1}; allowed: custom resource names (CPU and GPU "
            "come from cpus_per_worker and use_gpu) with numbers > 0",
        ),
        (
            {"resources_per_worker": {"fake_gpu": -1}},
            "resources_per_worker: got {'fake_gpu': -1}; allowed: custom resource names (CPU and GPU "
            "come from cpus_per_worker and use_gpu) with numbers > 0",
        ),
        (
            {"resources_per_worker": {"fake_gpu": "one"}},
            "resources_per_worker: got {'fake_gpu': 'one'}; allowed: custom resource names (CPU and GPU "
            "come from cpus_per_worker and use_gpu) with numbers > 0",
        ),
        (
            {"compress": True, "per_layer": True, "exchange": "sharded"},
            "exchange: got 'sharded' with per_layer: true; allowed with per_layer: auto, allgather",
        ),
        ({"capacity_factor": 0.9}, "capacity_factor: got 0.9; allowed: a number in [1, inf)"),
        ({"link_gbps": 0}, "link_gbps: got 0; allowed: a number in (0, inf)"),
        ({"link_latency_us": -1}, "link_latency_us: got -1; allowed: a number in [0, inf)"),
        ({"bucket_cap_mb": 0}, "bucket_cap_mb: got 0; allowed: a number in (0, inf)"),
        ({"bucket_cap_mb": "big"}, "bucket_cap_mb: got 'big'; allowed: a number or null"),
        ({"backend": "nccl"}, "backend: got 'nccl' without use_gpu; allowed on CPU: auto, gloo"),
    ],
)
def test_bad_values_name_key_value_and_allowed(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(**overrides)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "text, message",
    [
        ("- a\n- b\n", "must be a mapping of keys to values, got list"),
        ("ratio: 0.01\nratoi: 0.1\n", "unknown key 'ratoi'; allowed keys:"),
        ("epochs: three\n", "epochs: got 'three'; allowed: an integer"),
        ("model: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_yaml_files(tmp_path, text, message):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(str(path))


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("compress: true\nratio: 0.001\nepochs: 4\n")
    cfg = load_config(str(path), epochs=2, ratio=None)
    assert (cfg.ratio, cfg.epochs) == (0.001, 2)


def test_a_compression_key_for_a_job_that_does_not_compress_is_refused_unless_dense_is_said_outright(tmp_path):
    """``--ratio 0.001`` without ``--compress`` would train dense and say nothing; a top-k job run dense on purpose
    (``--no-compress``, a ``method``) keeps its keys, and ``raytopk bench`` uses them in its top-k row."""
    job = tmp_path / "job.yaml"
    job.write_text("ratio: 0.001\n")
    for refused, message in (
        (lambda: load_config(sets={"ratio": 0.001}), "ratio: got 0.001, but compress is false, so nothing uses it"),
        (lambda: load_config(exchange="sharded"), "exchange: got 'sharded', but compress is false"),
        (lambda: load_config(str(job)), "ratio: got 0.001, but compress is false"),
    ):
        with pytest.raises(ConfigError) as err:
            refused()
        assert str(err.value).startswith(message) and "allowed: with compress: true (--compress)" in str(err.value)
    assert [
        (c.compress, c.ratio)
        for c in (
            load_config(str(ROOT / "jobs" / "mnist5k_topk.yaml"), compress=False),
            load_config(str(job), compress=False),
            load_config(method="dense", exchange="sharded", ratio=0.001),
            load_config(method="fp16", ratio=0.001),
            load_config(str(job), side_by_side=True),
        )
    ] == [(False, 0.01), (False, 0.001), (False, 0.001), (False, 0.001), (False, 0.001)]


def test_method_names_the_comparison_and_sets_compress():
    """``method`` wins over ``compress`` (a job file's ``compress: true`` run as ``--method dense`` for comparison);
    unset, ``compress`` decides, and names and checkpoints of such jobs stay as they were."""
    assert [
        (c.compress, c.method)
        for c in (
            load_config(method="topk"),
            load_config(compress=True, method="dense"),
            load_config(compress=True, method="fp16"),
            load_config(compress=True),
        )
    ] == [(True, "topk"), (False, "dense"), (False, "fp16"), (True, None)]
    assert default_run_name(load_config(method="topk")) == default_run_name(load_config(compress=True))
    assert "-fp16-" in default_run_name(load_config(method="fp16"))
    assert default_run_name(load_config(method="fp16")) != default_run_name(load_config(method="dense"))


def test_every_shipped_job_is_valid():
    import glob

    jobs = sorted(glob.glob("jobs/*.yaml"))
    assert len(jobs) >= 6
    for job in jobs:
        load_config(job)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--ratio", "0"], "ratio: got 0.0; allowed: a number in (0, 1]"),
        (["--model", "vgg"], "model: got 'vgg'"),
        (["--config", "no/such.yaml"], "config file not found: no/such.yaml"),
        (["--batch-size", "0"], "batch_size: got 0"),
        (["--optimizer", "adam"], "optimizer: got 'adam'; allowed: sgd, adamw"),
        (["--backend", "mpi"], "backend: got 'mpi'; allowed: auto, gloo, nccl"),
        (["--epochs", "-1"], "epochs: got -1"),
        (["--workers", "64", "--batch-size", "8"], "workers: got 64, which need 64 CPU in all"),
        (
            ["--workers", "64", "--min-workers", "8", "--batch-size", "8"],
            "min_workers: got 8, which need 8 CPU in all, but this local Ray has 2; allowed: at most 2",
        ),
        (["--set", "resources_per_worker={a: ["], "--set resources_per_worker: got '{a: [', which is not YAML"),
        (
            ["--resources-per-worker", "{fake_gpu: 1}"],
            "workers: got 2, which need 2 fake_gpu in all, but this local Ray has 0; allowed: a cluster whose nodes "
            "offer fake_gpu",
        ),
        (
            ["--dataset", "mnist", "--data-dir", "/nonexistent/raytopk-data"],
            "MNIST not found or unreadable under /nonexistent/raytopk-data",
        ),
        (["--name", "../other-job"], "name: got '../other-job'; allowed: up to 200 letters, digits"),
        (["--name", ".hidden"], "name: got '.hidden'; allowed:"),
        (["--name", "a/b"], "name: got 'a/b'; allowed:"),
        (
            ["--batch-size", "2001"],
            "batch_size: got 2001, more than a worker's share (mnist5k has 4000 training images, 2000 per worker",
        ),
        (
            ["--batch-size", "1000", "--accumulate", "3"],
            "accumulate: got 3, more than the 2 batches an epoch holds per worker",
        ),
        (["--save-every", "4", "--epochs", "3"], "save_every: got 4, more than epochs 3; allowed: 1 to 3"),
        (["--workers", "4001", "--batch-size", "1"], "workers: got 4001, but mnist5k has 4000 training images"),
        (["--address", "127.0.0.1:1"], "address: got '127.0.0.1:1', where nothing answers (Connection refused)"),
        (["--ratio", "0.001"], "ratio: got 0.001, but compress is false, so nothing uses it"),
        # argparse's own errors, one line too (not its usage first)
        (["--epochs", "abc"], "--epochs: got 'abc'; allowed: an integer (see: raytopk train --help)"),
        (["--lr", "fast"], "--lr: got 'fast'; allowed: a number"),
        (["--resources-per-worker", "{a: ["], "--resources-per-worker: got '{a: [', which is not YAML"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_cli_user_errors_are_one_line_exit_2(args, fragment, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "raytopk", "train", *args, "--checkpoint-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("raytopk: error: "), done.stderr
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_failed_download_on_a_local_ray_is_one_line_before_ray_starts(tmp_path):
    """The download goes through a proxy where nothing listens, so it fails at once with or without a network."""
    (port,) = free_ports(1)
    proxy = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    done = subprocess.run(
        [sys.executable, "-m", "raytopk", "train", "--dataset", "mnist", "--download", "--data-dir", str(tmp_path)]
        + ["--checkpoint-dir", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(env, http_proxy=proxy, https_proxy=proxy, HTTP_PROXY=proxy, HTTPS_PROXY=proxy),
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"MNIST not found or unreadable under {tmp_path} (Error downloading" in done.stderr
    assert (
        done.stderr.rstrip().endswith("check the network and the directory") and "raytopk: training" not in done.stdout
    )


def test_paths_are_checked_before_ray_starts_and_nothing_is_left(tmp_path):
    """Each path a user gives, wrong in its own way: one line, exit 2, and nothing written, before Ray starts."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    runs = tmp_path / "runs"
    cases = [
        (["--checkpoint-dir", str(a_file)], f"checkpoint_dir: got '{a_file}', which is a file; allowed: a directory"),
        (["--checkpoint-dir", str(a_file / "runs")], f"'{a_file}' is a file; allowed: a path under a directory"),
        (
            ["--checkpoint-dir", "nosuch://bucket/runs"],
            "checkpoint_dir: got 'nosuch://bucket/runs' (Unrecognized filesystem",
        ),
        (["--checkpoint-dir", "/proc/raytopk-runs"], "but this user cannot create anything in /proc"),
        (
            ["--checkpoint-dir", str(runs), "--output", str(tmp_path)],
            f"output: got '{tmp_path}', which is a directory; allowed: a file path",
        ),
        (
            ["--checkpoint-dir", str(runs), "--output", str(a_file / "s.json")],
            f"output: got '{a_file / 's.json'}', but '{a_file}' is a file",
        ),
        (
            ["--checkpoint-dir", str(runs), "--dataset", "mnist", "--data-dir", str(a_file)],
            f"data_dir: got '{a_file}', which is a file",
        ),
    ]
    for args, fragment in cases:
        done = subprocess.run(
            [sys.executable, "-m", "raytopk", "train", *args], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and fragment in done.stderr, (args, done.stderr)
    sweep = subprocess.run(
        [
            sys.executable,
            "-m",
            "raytopk",
            "tune",
            str(ROOT / "tune_configs" / "mnist5k_ratio_lr.yaml"),
            "--set",
            f"storage_path={a_file}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sweep.returncode == 2 and f"storage_path: got '{a_file}', which is a file" in sweep.stderr, sweep.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"] and a_file.read_text() == ""


def test_version():
    done = subprocess.run([sys.executable, "-m", "raytopk", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"raytopk {raytopk.__version__}"


def test_a_bare_raytopk_prints_its_commands_and_a_wrong_one_is_one_line():
    bare = subprocess.run([sys.executable, "-m", "raytopk"], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2 and bare.stderr.startswith("usage: raytopk") and "train one job" in bare.stderr
    wrong = subprocess.run([sys.executable, "-m", "raytopk", "trian"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1, wrong.stderr
    assert wrong.stderr.startswith("raytopk: error: command: invalid choice: 'trian' (choose from 'train'")


def test_a_ray_address_is_checked_only_where_it_names_a_host_and_port(monkeypatch):
    """HOST:PORT and ray://HOST:PORT, from --address or RAY_ADDRESS, must answer; other forms (auto, the jobs API's
    http:// address that users export for ray job submit) go to Ray as they are."""
    from raytopk.preflight import check_ray_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for address in ("auto", "http://127.0.0.1:1", "localhost", None):
        check_ray_address(address)
    with pytest.raises(ConfigError, match=r"^address: got 'ray://127.0.0.1:1', where nothing answers"):
        check_ray_address("ray://127.0.0.1:1")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"^RAY_ADDRESS: got '127.0.0.1:1', where nothing answers"):
        check_ray_address(None)
