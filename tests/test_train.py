"""The Ray Train service end to end on a real local Ray: metrics, checkpoints, TensorBoard, resume, a killed worker."""

import dataclasses
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import ray
import torch

from raytopk.checkpoint import MODEL_FILE, SNAPSHOT_FILE, restore
from raytopk.config import ConfigError, TrainConfig, load_config
from raytopk.data import DatasetError
from raytopk.models import build_model
from raytopk.ray import hook_state, prepare_model, rank_file
from raytopk.train import SUMMARY_FILE, _hook_state, _optimizer, run

from cluster import kill_tree


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _cfg(tmp_path, name, **overrides):
    values = dict(
        dataset="mnist5k",
        epochs=2,
        batch_size=32,
        workers=2,
        compress=True,
        ratio=0.01,
        checkpoint_dir=str(tmp_path),
        name=name,
        max_failures=2,
    )
    values.update(overrides)
    return load_config(**values)


def _weights(checkpoint_path):
    return torch.load(os.path.join(checkpoint_path, MODEL_FILE), weights_only=True)


@pytest.fixture(scope="module")
def straight(local_ray, tmp_path_factory):
    """An uninterrupted 2-epoch compressed run: the reference for resume and recovery."""
    tmp = tmp_path_factory.mktemp("straight")
    return run(_cfg(tmp, "straight", tensorboard=True, output=str(tmp / "summary.json")))


def test_compressed_run_reports_checkpoints_and_tensorboard(straight):
    assert straight["epochs"] == 2 and straight["test_accuracy"] > 0.8
    # 124 steps, 2 of them dense: at most 50x (4 bytes an entry of DDP's ring against 1% of 8), about 28x with the
    # dense steps; int64 indices (12 bytes) would give under 20x, a dense exchange 1x.
    assert 25 < straight["reduction"] < 50 and straight["bytes_sent"] * straight["reduction"] == pytest.approx(
        straight["dense_bytes"]
    )
    # one local node: nothing crosses a network card, and the reduction shown is rank to rank
    assert straight["nodes"] == 1 and straight["network_bytes"] == straight["dense_network_bytes"] == 0
    assert os.path.isfile(os.path.join(os.path.dirname(straight["run_dir"]), "summary.json"))
    files = set(os.listdir(straight["checkpoint"]))
    assert {MODEL_FILE, "optimizer.pt", "meta.json", rank_file(0), rank_file(1)} <= files
    residuals = [
        torch.load(os.path.join(straight["checkpoint"], rank_file(r)), weights_only=True)["hook"]["residuals"]
        for r in (0, 1)
    ]
    name = next(iter(residuals[0]))
    assert residuals[0][name].abs().sum() > 0 and not torch.equal(residuals[0][name], residuals[1][name])
    assert glob.glob(os.path.join(straight["run_dir"], "tensorboard", "events.out.tfevents.*"))


def test_elastic_run_records_every_epoch_with_its_workers(local_ray, tmp_path):
    """Elastic (min_workers) on a local Ray that holds every worker: it trains with all of them, and the summary's
    history keeps all three epochs although only the last checkpoint is kept."""
    summary = run(
        _cfg(tmp_path, "elastic", epochs=3, max_train_batches=4, keep_checkpoints=1, min_workers=1, ranks_per_node=1)
    )
    assert [m["epoch"] for m in summary["history"]] == [1, 2, 3]
    assert [m["workers"] for m in summary["history"]] == [2, 2, 2] and summary["workers"] == 2
    # each epoch records the rate it trained at: the cosine schedule's 1, 3/4 and 1/4 of lr
    lr = _cfg(tmp_path, "elastic").lr
    assert [m["lr"] for m in summary["history"]] == pytest.approx([lr, 0.75 * lr, 0.25 * lr])
    assert len([p for p in glob.glob(os.path.join(summary["run_dir"], "checkpoint_*")) if os.path.isdir(p)]) == 1
    assert summary["history"][-1]["bytes_sent"] == summary["bytes_sent"] > summary["history"][0]["bytes_sent"]
    # ranks_per_node 1: each worker its own node, so every byte of the all-gather's ring and DDP's crosses a card,
    # and the reduction shown is the one across nodes
    assert summary["nodes"] == 2 and summary["network_bytes"] == summary["bytes_sent"]
    assert summary["dense_network_bytes"] == summary["dense_bytes"]
    assert summary["reduction"] == pytest.approx(summary["dense_network_bytes"] / summary["network_bytes"])


def test_dense_run_matches_compressed_accuracy_closely(local_ray, tmp_path, straight):
    dense = run(_cfg(tmp_path, "dense", compress=False))
    assert dense["reduction"] == pytest.approx(1.0)
    assert abs(dense["test_accuracy"] - straight["test_accuracy"]) < 0.03


@pytest.mark.faults
def test_resumed_run_matches_the_uninterrupted_one(local_ray, tmp_path, straight):
    first = run(_cfg(tmp_path, "resumed", epochs=1))
    assert first["epochs"] == 1
    second = run(_cfg(tmp_path, "resumed"))  # same name: continues from the epoch-1 checkpoint
    assert second["epochs"] == 2
    for key, value in _weights(straight["checkpoint"]).items():
        assert torch.equal(_weights(second["checkpoint"])[key], value), key


@pytest.mark.faults
def test_killed_worker_restarts_from_checkpoint_and_finishes_the_same(local_ray, tmp_path, straight):
    from ray.util.state import list_actors

    def train_workers():
        return {
            actor.actor_id: actor
            for actor in list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=10_000)
        }

    before = train_workers()
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(run(_cfg(tmp_path, "killed"))))
    thread.start()
    deadline = time.time() + 180
    while not glob.glob(str(tmp_path / "killed" / "checkpoint_*")) and time.time() < deadline:
        time.sleep(0.2)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert workers, "no live training worker to kill"
    assert thread.is_alive(), "the run finished before a worker could be killed"
    os.kill(workers[0].pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert outcome.get("epochs") == 2, "the run did not finish after the worker died"
    # Ray Train started a second group of 2 workers after the first lost one: a restart, not a run that outlived the
    # kill.
    started = {actor_id: actor for actor_id, actor in train_workers().items() if actor_id not in before}
    assert len(started) == 4 and all(actor.state == "DEAD" for actor in started.values()), started
    for key, value in _weights(straight["checkpoint"]).items():
        assert torch.equal(_weights(outcome["checkpoint"])[key], value), key


def test_accumulation_runs_the_hook_once_per_step_under_bf16_autocast_with_every_dgc_key(local_ray, tmp_path):
    # Dense (start_iter beyond the run) so every hook call sends the whole model: the bytes count the calls.
    # The DGC keys travel through the job config into the hook and the optimizer (check_optimizer runs on each worker);
    # their arithmetic is tested against a reference in test_hook.py.
    summary = run(
        _cfg(
            tmp_path,
            "accumulate",
            model="vit",
            epochs=1,
            max_train_batches=6,
            accumulate=3,
            amp="bf16",
            start_iter=100,
            warmup_ratio=0.25,
            warmup_epochs=1,
            momentum_correction=True,
            momentum=0.7,
            clip_norm=5.0,
            per_layer=True,
            dense_below=256,
            ratio=0.02,
            value_dtype="bf16",
            exchange="allgather",
        )
    )
    model_bytes = 4 * sum(p.numel() for p in build_model("vit").parameters())
    assert summary["bytes_sent"] == summary["dense_bytes"] == 2 * 2 * model_bytes  # 6 / 3 steps, 2 workers
    assert 0 < summary["loss"] < 10
    # What each worker's hook ran with, as its checkpoint records it: every key from the job, warm-up epochs as steps.
    for rank in range(2):
        hook = torch.load(os.path.join(summary["checkpoint"], rank_file(rank)), weights_only=True)["hook"]
        assert {
            key: hook[key]
            for key in (
                "ratio",
                "start_iter",
                "value_dtype",
                "warmup_ratio",
                "warmup_steps",
                "momentum",
                "clip_norm",
                "per_layer",
                "dense_below",
                "exchange",
            )
        } == {
            "ratio": 0.02,
            "start_iter": 100,
            "value_dtype": "bf16",
            "warmup_ratio": 0.25,
            "warmup_steps": 2,
            "momentum": 0.7,
            "clip_norm": 5.0,
            "per_layer": True,
            "dense_below": 256,
            "exchange": "allgather",
        }
        assert hook["iter"] == 2  # one hook call per optimizer step


@pytest.mark.integrations  # a whole Ray Train run of the PyTorch comparison, over a minute: with the as-users-run tests
def test_method_fp16_runs_pytorchs_fp16_hook_and_counts_half_the_bytes(local_ray, tmp_path):
    """``method: fp16``, the comparison PyTorch ships: every bucket allreduced in fp16, half of dense DDP's bytes."""
    summary = run(_cfg(tmp_path, "fp16", method="fp16", epochs=1, max_train_batches=20))
    assert summary["method"] == "fp16" and not summary["compress"] and summary["test_accuracy"] > 0.5
    assert summary["bytes_sent"] * 2 == summary["dense_bytes"] > 0 and summary["name"] == "fp16"


# reruns, and checkpoints that must not be resumed ------------------------------------------


def _files(directory):
    """Every file under ``directory`` with its bytes: to prove nothing was touched."""
    return {
        path: open(path, "rb").read()
        for path in glob.glob(os.path.join(directory, "**", "*"), recursive=True)
        if os.path.isfile(path)
    }


def test_rerun_of_a_finished_run_returns_it_without_training(local_ray, straight, tmp_path):
    before = _files(straight["run_dir"])
    again = run(_cfg(os.path.dirname(straight["run_dir"]), "straight", output=str(tmp_path / "again.json")))
    assert (
        again["history"] == straight["history"]
        and again["epochs"] == 2
        and again["test_accuracy"] == straight["test_accuracy"]
    )
    assert _files(straight["run_dir"]) == before
    # the summary of the command that finished it, its wall time included, though nothing trained now
    assert again == straight and again["wall_s"] > 0
    with open(tmp_path / "again.json") as f:
        assert json.load(f) == straight
    # Moved elsewhere, the run keeps its summary; without it (a run finished before summaries were kept) the
    # summary is made from the checkpoint, and its wall time is unknown.
    moved = tmp_path / "moved"
    shutil.copytree(os.path.dirname(straight["run_dir"]), moved)
    there = run(_cfg(moved, "straight"))
    assert there["wall_s"] == straight["wall_s"] and there["checkpoint"].startswith(str(moved / "straight"))
    os.remove(moved / "straight" / SUMMARY_FILE)
    made = run(_cfg(moved, "straight"))
    assert made["wall_s"] is None and made["history"] == straight["history"]


def _raytopk_train(checkpoint_dir, name, *flags, timeout=120):
    """``raytopk train`` on the straight run's job (the same keys as ``_cfg``), plus ``flags``."""
    command = [
        sys.executable,
        "-m",
        "raytopk",
        "train",
        "--dataset",
        "mnist5k",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--workers",
        "2",
        "--compress",
        "--ratio",
        "0.01",
        "--checkpoint-dir",
        str(checkpoint_dir),
        "--name",
        name,
        *flags,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.faults
@pytest.mark.parametrize(
    "flags, damage, message",
    [
        (
            ["--model", "vit"],
            None,
            "model: got 'vit', but run copy was trained with 'simple_cnn'; allowed: the same value",
        ),
        (["--ratio", "0.05"], None, "ratio: got 0.05, but run copy was trained with 0.01; allowed: the same value"),
        (["--no-compress"], None, "compress: got False, but run copy was trained with True"),
        ([], "model.pt", "model.pt: cannot be loaded"),
        ([], "rank1.pt", "rank1.pt: cannot be loaded"),
        ([], "meta.json", "unreadable meta.json"),
    ],
)
def test_a_checkpoint_of_another_job_or_damaged_is_refused_and_left_alone(straight, tmp_path, flags, damage, message):
    shutil.copytree(straight["run_dir"], tmp_path / "copy")
    if damage:
        latest = sorted(path for path in glob.glob(str(tmp_path / "copy" / "checkpoint_*")) if os.path.isdir(path))[-1]
        with open(os.path.join(latest, damage), "r+b") as f:
            f.truncate(os.path.getsize(os.path.join(latest, damage)) // 2)
    before = _files(tmp_path / "copy")
    done = _raytopk_train(tmp_path, "copy", "--epochs", "3", *flags)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert _files(tmp_path / "copy") == before


class _Payload:
    """Pickles as a call to ``os.system``: what a planted checkpoint would run under a full unpickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(straight, tmp_path):
    shutil.copytree(straight["run_dir"], tmp_path / "planted")
    marker = tmp_path / "it-ran"
    torch.save(
        {"conv.weight": _Payload(marker)}, tmp_path / "planted" / os.path.basename(straight["checkpoint"]) / MODEL_FILE
    )
    done = _raytopk_train(tmp_path, "planted", "--epochs", "3")
    assert done.returncode == 2 and "model.pt: cannot be loaded (Weights only load failed" in done.stderr, done.stderr
    assert not marker.exists()


@pytest.mark.faults
def test_a_checkpoint_cut_off_mid_write_is_never_resumed_from(straight, tmp_path):
    """What a crash while epoch 3 is being copied to storage leaves: a newer checkpoint directory, one file half
    written, that Ray never recorded."""
    shutil.copytree(straight["run_dir"], tmp_path / "cut")
    recorded = tmp_path / "cut" / os.path.basename(straight["checkpoint"])
    partial = tmp_path / "cut" / "checkpoint_2999-01-01_00-00-00.000000"
    shutil.copytree(recorded, partial)
    meta = json.loads((partial / "meta.json").read_text())
    (partial / "meta.json").write_text(json.dumps({**meta, "epoch": 3}))
    with open(partial / MODEL_FILE, "r+b") as f:
        f.truncate(os.path.getsize(partial / MODEL_FILE) // 2)
    before = _files(partial)
    done = _raytopk_train(tmp_path, "cut", "--epochs", "3", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming cut after epoch 2 from {recorded}" in done.stdout, done.stdout[-2000:]
    assert "epoch 3/3" in done.stdout and _files(partial) == before


def test_more_workers_than_a_local_ray_holds_is_refused(local_ray, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"workers: got 8, which need 8 CPU in all, but this local Ray has 2; allowed: at most 2 workers",
    ):
        run(_cfg(tmp_path, "too-big", workers=8))


def test_a_missing_dataset_is_refused_before_any_worker_starts(local_ray, tmp_path):
    with pytest.raises(DatasetError, match="MNIST"):
        run(_cfg(tmp_path, "no-data", dataset="mnist", data_dir=str(tmp_path / "nothing-here")))


def _buckets_per_step(config):
    """A Ray Train loop: one backward through each of ``prepare_model``'s DDP models; how many buckets each
    exchanged."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def buckets(ddp, state=None):
        for _ in range(2):  # DDP lays its buckets out again after the first step, as the gradients arrived
            seen.clear()
            ddp(torch.randn(4, 1, 28, 28)).sum().backward()
        return len(state.residuals.buckets) if state is not None else len(seen)

    seen = set()
    counts = {}
    for setting, kwargs in (
        ("topk", {}),
        ("topk, bucket_cap_mb 1", {"parallel_strategy_kwargs": {"bucket_cap_mb": 1}}),
    ):
        ddp = prepare_model(build_model("simple_cnn"), ratio=0.01, start_iter=0, **kwargs)
        counts[setting] = buckets(ddp, hook_state(ddp))
    dense = prepare_model(build_model("simple_cnn"), ratio=None)
    dense.register_comm_hook(None, lambda group, bucket: seen.add(bucket.index()) or allreduce_hook(group, bucket))
    counts["dense"] = buckets(dense)
    return counts


def test_prepare_model_exchanges_a_small_model_as_one_bucket_with_the_hook_and_takes_ddp_options(local_ray, tmp_path):
    """SimpleCNN's 1.7 MB of gradients: DDP's default (a 1 MB first bucket) makes two buckets, each costing the hook a
    selection and a collective; with the hook, prepare_model makes one, unless parallel_strategy_kwargs say
    otherwise."""
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    result = TorchTrainer(
        _buckets_per_step,
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(tmp_path), name="buckets"),
    ).fit()
    assert result.return_value == {"topk": 1, "topk, bucket_cap_mb 1": 2, "dense": 2}


def _restore_and_keep_the_hook_state(config):
    """A Ray Train loop that builds a worker as raytopk train does, restores a checkpoint through the loop's own
    ``restore`` and writes the hook state it got to ``out/rank{r}.pt``."""
    import ray.train

    cfg = TrainConfig(**config["job"])
    model = build_model(cfg.model, 1, 10, 28)
    optimizer = _optimizer(cfg, model, cfg.lr)
    state = _hook_state(cfg, model, optimizer, steps_per_epoch=1)
    ddp = prepare_model(model, ratio=None, state=state)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    restore(config["checkpoint"], state, ddp.module, optimizer, scheduler, scaler, torch.device("cpu"))
    torch.save(state.state_dict(), os.path.join(config["out"], f"rank{ray.train.get_context().get_world_rank()}.pt"))


def _restored_at(workers, job, checkpoint, storage) -> list:
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    out = storage / f"restored{workers}"
    out.mkdir()
    TorchTrainer(
        _restore_and_keep_the_hook_state,
        train_loop_config={"job": job, "checkpoint": checkpoint, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(storage), name=f"restore{workers}"),
    ).fit()
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(workers)]


@pytest.mark.faults  # a recovery path, and over a minute: with the long tests
def test_resume_at_another_worker_count_gives_every_worker_the_saved_mean(local_ray, tmp_path):
    """A real 2-worker checkpoint (momentum correction: residuals and velocities), restored by the loop's own code at 1
    and at 3 workers: each worker holds the saved workers' mean residual and velocity, and the byte counters sum to
    the saved sum. (Rank 0's own residual, or a sum, would be far off.) Then the loop resumes it for real at 1
    worker."""
    first = run(_cfg(tmp_path, "rescaled", epochs=1, momentum_correction=True))
    saved = [torch.load(os.path.join(first["checkpoint"], rank_file(r)), weights_only=True)["hook"] for r in range(2)]
    job = {
        key: value
        for key, value in dataclasses.asdict(_cfg(tmp_path, "rescaled", epochs=1, momentum_correction=True)).items()
    }
    for workers in (1, 3):
        restored = _restored_at(workers, job, first["checkpoint"], tmp_path)
        for kind in ("residuals", "velocities"):
            assert saved[0][kind].keys() and all(r[kind].keys() == saved[0][kind].keys() for r in restored)
            for name, tensor in saved[0][kind].items():
                mean = (tensor + saved[1][kind][name]) / 2
                assert bool(mean.any()), f"nothing saved in {kind} {name}"
                for rank in restored:
                    torch.testing.assert_close(rank[kind][name], mean, rtol=0, atol=1e-7)
        for counter in ("bytes_sent", "dense_bytes"):
            assert sum(rank["stats"][counter] for rank in restored) == pytest.approx(
                sum(sd["stats"][counter] for sd in saved), rel=1e-9
            )
    second = run(_cfg(tmp_path, "rescaled", workers=1, momentum_correction=True))
    assert second["epochs"] == 2 and second["workers"] == 1
    resumed = second["history"][1]
    assert resumed["resized_from"] == 2 and resumed["residual_mean_error"] < 1e-6, resumed
    assert [m["workers"] for m in second["history"]] == [2, 1]


def _recorded_checkpoint(storage) -> bool:
    """Whether Ray Train has recorded a finished checkpoint of a run under ``storage`` (what a rerun resumes from).

    Its files appear in storage one by one before the record does, so a kill
    between the two leaves nothing to resume, rightly.
    """
    for snapshot in glob.glob(str(storage / "*" / SNAPSHOT_FILE)):
        try:
            with open(snapshot) as f:
                if json.load(f).get("latest_checkpoint_result"):
                    return True
        except (OSError, ValueError):
            continue  # being written
    return False


@pytest.mark.faults
def test_killed_driver_rerun_resumes_and_restart_starts_over(straight, tmp_path):
    """SIGKILL the whole ``raytopk train`` (driver and the local Ray it started) mid-run; the same command resumes."""
    command = [
        sys.executable,
        "-m",
        "raytopk",
        "train",
        "--dataset",
        "mnist5k",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--workers",
        "2",
        "--compress",
        "--ratio",
        "0.01",
        "--checkpoint-dir",
        str(tmp_path),
    ]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not _recorded_checkpoint(tmp_path) and time.time() < deadline:
            time.sleep(0.2)
        assert driver.poll() is None, "the run finished before it could be killed"
    finally:
        kill_tree(driver.pid)  # the driver and every Ray process it started (the workers lead groups of their own)
        driver.wait()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming" in rerun.stdout and "after epoch 1" in rerun.stdout, rerun.stdout[-2000:]
    (run_dir,) = glob.glob(str(tmp_path / "simple_cnn-mnist5k-topk0.01-*"))
    latest = max(
        (p for p in glob.glob(os.path.join(run_dir, "checkpoint_*")) if os.path.isdir(p)), key=os.path.getmtime
    )
    for key, value in _weights(straight["checkpoint"]).items():
        assert torch.equal(_weights(latest)[key], value), key
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already finished 2 epochs" in again.stdout
    fresh = subprocess.run(command + ["--epochs", "1", "--restart"], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert len(glob.glob(str(tmp_path / "simple_cnn-mnist5k-topk0.01-*"))) == 2, (
        "--restart did not start a new run beside the old"
    )


def _tree(pid) -> set:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return {int(pid)} | {p for child in children for p in _tree(child)}


@pytest.mark.faults
def test_ctrl_c_exits_130_names_the_checkpoint_and_the_command_and_leaves_no_ray(tmp_path):
    command = [
        sys.executable,
        "-m",
        "raytopk",
        "train",
        "--dataset",
        "mnist5k",
        "--epochs",
        "40",
        "--batch-size",
        "32",
        "--workers",
        "2",
        "--compress",
        "--checkpoint-dir",
        str(tmp_path),
    ]
    driver = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    started = set()
    try:
        deadline = time.time() + 180
        while not _recorded_checkpoint(tmp_path) and time.time() < deadline:
            time.sleep(0.2)
        started = _tree(driver.pid)  # the driver and the local Ray it started
        driver.send_signal(signal.SIGINT)  # what Ctrl+C sends
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:  # it did not stop: end what this test started
            kill_tree(driver.pid)
    assert driver.returncode == 130, err[-2000:]
    line = err.strip().splitlines()[-1]
    match = re.fullmatch(
        r"raytopk: interrupted; last complete checkpoint: (\S+) \(epoch (\d+)\); resume with: raytopk (.+)", line
    )
    assert match, line
    assert os.path.isdir(match[1]) and shlex.split(match[3]) == command[3:]
    deadline = time.time() + 30
    while (
        left := [
            p for p in started if os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z"
        ]
    ) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, f"left running: {left}"
    epoch = int(match[2])
    resumed = subprocess.run(
        [sys.executable, "-m", "raytopk", *shlex.split(match[3]), "--epochs", str(epoch + 1)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0 and f"after epoch {epoch} from {match[1]}" in resumed.stdout, resumed.stdout[-2000:]
