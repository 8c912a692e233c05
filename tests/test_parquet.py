"""Own data as Parquet: export, the driver's checks, the split, decoding, and training through Ray Data for real."""

import io
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytopk.checkpoint import MODEL_FILE, SNAPSHOT_FILE
from raytopk.config import ConfigError, load_config
from raytopk.data import pixels
from raytopk.parquet import _in_test, decode, export, inspect
from raytopk.preflight import check_paths


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """mnist5k written by ``export`` in both layouts: ``{"png": dir, "list": dir}``."""
    root = tmp_path_factory.mktemp("exported")
    for layout in ("png", "list"):
        assert export("mnist5k", str(root / layout), layout) == {"train": 4000, "test": 1000}
    return {layout: str(root / layout) for layout in ("png", "list")}


def _cfg(data_path, **overrides):
    return load_config(dataset="parquet", data_path=data_path, **overrides)


@pytest.mark.parametrize("layout, shape", [("png", None), ("list", [1, 28, 28])])
def test_export_round_trips_the_pixels_and_inspect_reads_the_dataset(exported, layout, shape):
    spec = inspect(_cfg(exported[layout], image_shape=shape))
    assert spec.image_shape == (1, 28, 28) and spec.num_classes == 10 and spec.encoded == (layout == "png")
    assert (spec.train_rows, spec.test_rows, spec.test_fraction) == (
        4000,
        1000,
        None,
    )  # train/ and test/ are the splits
    # the sample's mean and std are MNIST's well-known ones: of pixels in [0, 1] from PNG, of the stored values from
    # lists
    scale = 1.0 if layout == "png" else 255.0
    assert spec.mean[0] / scale == pytest.approx(0.1307, abs=0.01) and spec.std[0] / scale == pytest.approx(
        0.3081, abs=0.01
    )
    table = pq.read_table(os.path.join(exported[layout], "test"))
    images, labels = pixels("mnist5k", "")["test"]
    got = decode(table.column("image"), (1, 28, 28), layout == "png", "L")
    # rows are written in a seeded random order: the same images and labels, matched by label and content
    order = np.lexsort((got.reshape(len(got), -1).sum(1), table.column("label").to_numpy()))
    want = np.lexsort((images.reshape(len(images), -1).sum(1) / 255.0 * scale, labels))
    assert np.array_equal(table.column("label").to_numpy()[order], labels[want])
    assert np.allclose(got[order, 0], images[want] / 255.0 * scale)
    assert not np.array_equal(table.column("label").to_numpy(), np.sort(labels)), "rows were left sorted by class"


def test_a_test_fraction_splits_rows_by_hash_the_same_way_every_time():
    hashes = np.random.default_rng(1).integers(0, 2**63, size=20000, dtype=np.uint64)
    test = _in_test(hashes, seed=0, fraction=0.2)
    assert np.array_equal(test, _in_test(hashes, seed=0, fraction=0.2))
    assert test.mean() == pytest.approx(0.2, abs=0.01)
    other = _in_test(hashes, seed=1, fraction=0.2)
    assert 0.1 < (test != other).mean() < 0.5, "the seed should choose other rows"
    # a larger fraction only adds rows: the test split grows, the training split never gains a test row
    assert np.all(_in_test(hashes, seed=0, fraction=0.3)[test])


def _rows(dataset) -> list:
    """Every row of a Ray Dataset as ``(label, pixel sum)``, sorted: the rows, whatever their order."""
    return sorted(
        (int(y), round(float(x.sum()), 2))
        for batch in dataset.iter_batches(batch_size=1024)
        for x, y in zip(batch["x"], batch["y"])
    )


def test_decoded_once_and_streamed_each_epoch_give_the_same_rows(exported, monkeypatch):
    """A dataset that fits in the object store is decoded once (materialised) before training; a larger one is read
    and decoded each epoch. Both give every row once, with the same values."""
    import ray

    from raytopk import parquet

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = _cfg(exported["png"])
        spec = inspect(cfg)
        once = parquet.datasets(cfg, spec)
        monkeypatch.setattr(parquet, "CACHE_SHARE", 0.0)  # as if the decoded images were larger than the store
        streamed = parquet.datasets(cfg, spec)
        assert type(once["test"]).__name__ == "MaterializedDataset" != type(streamed["test"]).__name__
        for split in ("train", "test"):
            assert _rows(once[split]) == _rows(streamed[split]), split
    finally:
        ray.shutdown()


def _png(size: int) -> bytes:
    from PIL import Image

    encoded = io.BytesIO()
    Image.new("L", (size, size), color=128).save(encoded, format="PNG")
    return encoded.getvalue()


@pytest.mark.parametrize(
    "late, what",
    [(_png(32), "is 32 x 32 pixels, the data's first images 28 x 28; allowed: one size"), (b"junk", "is not a PNG")],
    ids=["another size", "not an image"],
)
def test_an_image_past_the_checked_rows_that_does_not_fit_is_one_line_naming_its_file(tmp_path, late, what):
    """The driver's check reads the first file's first rows; an image that does not decode, or not to their size,
    in another file surfaces where Ray Data decodes it, as the same kind of one-line error, naming its file."""
    import ray

    from raytopk import parquet
    from raytopk.data import DatasetError

    good = [_png(28)] * 40
    _write(str(tmp_path / "a.parquet"), image=good, label=[1] * 40)
    _write(str(tmp_path / "b.parquet"), image=good[:30] + [late] * 10, label=[2] * 40)
    cfg = _cfg(str(tmp_path), test_fraction=0.25, batch_size=8)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(DatasetError) as raised:
            parquet.datasets(cfg, inspect(cfg))
    finally:
        ray.shutdown()
    message = str(raised.value)
    assert message.startswith(f"image_column: 'image' in {tmp_path}/b.parquet: an image {what}"), message
    assert "\n" not in message


def test_without_split_directories_the_test_fraction_is_used(exported):
    spec = inspect(_cfg(os.path.join(exported["png"], "train"), test_fraction=0.25))
    assert spec.test_fraction == 0.25 and spec.train_files == spec.test_files
    assert (spec.train_rows, spec.test_rows) == (3000, 1000)
    with_test = inspect(_cfg(os.path.join(exported["png"], "train"), test_path=os.path.join(exported["png"], "test")))
    assert (with_test.train_rows, with_test.test_rows, with_test.test_fraction) == (4000, 1000, None)


def _write(path, **columns):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(columns), path)


@pytest.fixture
def bad(tmp_path):
    """Writes one small Parquet file per call: ``bad(name, image=..., label=...)`` returns its directory."""

    def write(name, **columns):
        _write(str(tmp_path / name / "part.parquet"), **columns)
        return str(tmp_path / name)

    return write


LISTS = [[0.5] * 4 for _ in range(8)]


@pytest.mark.parametrize(
    "columns, overrides, message",
    [
        (
            {"picture": LISTS, "label": list(range(8))},
            {"image_shape": [1, 2, 2]},
            "image_column: got 'image', but {path}/part.parquet has no such column; allowed: one of picture, label",
        ),
        (
            {"image": LISTS, "y": list(range(8))},
            {"image_shape": [1, 2, 2]},
            "label_column: got 'label', but {path}/part.parquet has no such column; allowed: one of image, y",
        ),
        (
            {"image": LISTS, "label": [0.5] * 8},
            {"image_shape": [1, 2, 2]},
            "label_column: 'label' in {path}/part.parquet holds double; allowed: integer class indices",
        ),
        (
            {"image": ["a"] * 8, "label": list(range(8))},
            {},
            "image_column: 'image' in {path}/part.parquet holds string; allowed: encoded images (PNG or JPEG bytes) or "
            "lists of numbers",
        ),
        (
            {"image": LISTS, "label": list(range(8))},
            {},
            "image_shape: not set, but 'image' in {path}/part.parquet holds lists of numbers; allowed: [C, H, W] with "
            "C*H*W values per image",
        ),
        (
            {"image": LISTS, "label": list(range(8))},
            {"image_shape": [1, 3, 3]},
            "image_column: 'image' in {path}/part.parquet: image lists of 4 values, but image_shape [1, 3, 3] needs 9",
        ),
        (
            {"image": [[0.5] * 8] * 8, "label": list(range(8))},
            {"image_shape": [1, 2, 4]},
            "image_shape: the images in {path}/part.parquet are [1, 2, 4]; allowed: square images (H = W), which "
            "raytopk's models take",
        ),
        (
            {"image": LISTS, "label": [-1] + list(range(7))},
            {"image_shape": [1, 2, 2]},
            "label_column: 'label' in {path}/part.parquet holds -1; allowed: class indices 0, 1, 2, ...",
        ),
        (
            {"image": pa.array([], pa.list_(pa.float32())), "label": pa.array([], pa.int64())},
            {"image_shape": [1, 2, 2]},
            "data_path: got '{path}', which holds no rows; allowed: Parquet files with at least one row per worker",
        ),
        (
            {"image": LISTS, "label": list(range(8))},
            {"image_shape": [1, 2, 2], "workers": 8, "batch_size": 1},
            "workers: got 8, but {path} holds 7 training rows; allowed: at most 7",
        ),
        (
            {"image": LISTS, "label": list(range(8))},
            {"image_shape": [1, 2, 2], "batch_size": 8},
            "batch_size: got 8, more than a worker's share ({path} has 7 training rows, 4 per worker with 2 workers), "
            "so no worker would train a step; allowed: at most 4",
        ),
    ],
)
def test_bad_data_is_one_line_naming_it(bad, columns, overrides, message):
    path = bad("data", **columns)
    with pytest.raises(ConfigError) as err:
        check_paths(_cfg(path, **overrides))
    assert str(err.value) == message.format(path=path)


@pytest.mark.parametrize("statistics", [True, False])
def test_null_labels_are_one_line_with_or_without_the_files_statistics(tmp_path, statistics):
    """Null labels would reach the loss as -2**63; a file written without statistics is read for them."""
    path = tmp_path / "data" / "part.parquet"
    path.parent.mkdir()
    table = pa.table({"image": LISTS, "label": pa.array([3, None, 1, None, 0, 1, 2, 3], pa.int64())})
    pq.write_table(table, str(path), write_statistics=statistics)
    with pytest.raises(ConfigError) as err:
        check_paths(_cfg(str(path.parent), image_shape=[1, 2, 2]))
    assert str(err.value) == (
        f"label_column: 'label' in {path} has 2 empty (null) labels; allowed: a class index in every row"
    )


def test_bad_paths_and_keys(tmp_path, bad):
    with pytest.raises(
        ConfigError, match=r"^data_path: got '\S+', which does not exist; allowed: a directory, a file or a URI"
    ):
        check_paths(_cfg(str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"^data_path: got '\S+', which holds no Parquet files \(\*\.parquet\)"):
        check_paths(_cfg(str(tmp_path / "empty")))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ConfigError, match=r"^data_path: \S+broken.parquet is not a readable Parquet file"):
        check_paths(_cfg(str(tmp_path / "broken.parquet")))
    with pytest.raises(ConfigError, match=r"^data_path: not set, but dataset is 'parquet'"):
        load_config(dataset="parquet")
    with pytest.raises(
        ConfigError, match=r"^data_path: set, but dataset is 'mnist5k'; allowed: only with dataset: parquet"
    ):
        load_config(data_path=str(tmp_path))
    with pytest.raises(ConfigError, match=r"^test_fraction: got 1; allowed: a number in \(0, 1\)"):
        _cfg(str(tmp_path), test_fraction=1)
    with pytest.raises(
        ConfigError, match=r"^image_shape: got \[28, 28\]; allowed: \[C, H, W\], three positive integers"
    ):
        _cfg(str(tmp_path), image_shape=[28, 28])
    path = bad("declared", image=[b"\x89PNG not an image"] * 20, label=list(range(20)))
    with pytest.raises(ConfigError, match=r"^image_column: 'image' in \S+: row 0 is not a PNG or JPEG image"):
        check_paths(_cfg(path))


def _train_command(data_path, runs, *flags):
    """``raytopk train`` on the Parquet files at ``data_path``, 2 workers of batch 32, runs under ``runs``."""
    return [sys.executable, "-m", "raytopk", "train", "--set", "dataset=parquet", "--set", f"data_path={data_path}",
            "--workers", "2", "--batch-size", "32", "--checkpoint-dir", str(runs), *flags]  # fmt: skip


def test_the_command_line_refuses_bad_data_in_one_line_before_ray(tmp_path, bad):
    path = bad("data", image=LISTS, label=[0.5] * 8)
    runs = tmp_path / "runs"
    command = _train_command(path, runs, "--set", "image_shape=[1, 2, 2]")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"raytopk: error: label_column: 'label' in {path}/part.parquet holds double; allowed: integer class indices"
    ]
    assert not runs.exists(), "nothing is written for a refused job"


def test_export_refuses_in_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    for args, line in (
        (
            ["--dataset", "imagenet", "--output", str(tmp_path / "out")],
            "raytopk: error: dataset: got 'imagenet'; allowed: cifar10, fashion_mnist, mnist, mnist5k",
        ),
        (
            ["--dataset", "mnist5k", "--output", str(tmp_path / "out"), "--layout", "jpeg"],
            "raytopk: error: layout: got 'jpeg'; allowed: png, list",
        ),
        (
            ["--dataset", "mnist5k", "--output", str(tmp_path / "file")],
            f"raytopk: error: output: got '{tmp_path / 'file'}', which is a file; "
            "allowed: a directory, or a path where one can be created",
        ),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "raytopk", "export", *args], capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stderr.strip()) == (2, line)
    assert not (tmp_path / "out").exists()


def _train(data_path, tmp_path, *flags, timeout=300):
    """``raytopk train`` on Parquet as a user runs it: its summary and what it printed, or the failure's output."""
    output = tmp_path / "summary.json"
    command = _train_command(data_path, tmp_path / "runs", "--output", str(output), *flags)
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(output.read_text()), done.stdout + done.stderr


@pytest.mark.integrations  # a whole run through Ray Data (about 80 s here); the faults suite's resume test trains too
def test_training_on_exported_lists_through_ray_data(exported, tmp_path):
    """The driver reads through Ray Data, the workers iterate their equal shards, every test row is counted."""
    summary, printed = _train(
        exported["list"],
        tmp_path,
        "--set",
        "image_shape=[1, 28, 28]",
        "--compress",
        "--epochs",
        "2",
        "--set",
        "max_train_batches=30",
    )
    assert (
        summary["dataset"] == "parquet" and summary["test_accuracy"] > 0.6
    )  # 60 steps; an untrained model stays near 10%
    # every rank trained the same number of steps, each epoch: the byte counts of the second epoch double the first's
    assert summary["dense_bytes"] == 2 * summary["history"][0]["dense_bytes"]
    assert summary["test_accuracy"] * 1000 == pytest.approx(
        round(summary["test_accuracy"] * 1000)
    )  # 1,000 test rows, each once
    assert sorted(f for f in os.listdir(summary["checkpoint"]) if f.startswith("rank")) == ["rank0.pt", "rank1.pt"]
    # quiet: Ray Data's progress bars and log lines from reading and decoding on the driver stay in Ray's log directory
    assert not re.search("Parquet dataset sampling|parquet_datasource|streaming_executor", printed), printed[-3000:]


@pytest.mark.integrations  # the check, as a user runs it: exported digits train as well as the built-in ones
def test_exported_digits_reach_the_built_in_accuracy(exported, tmp_path):
    built_in = subprocess.run(
        [
            sys.executable,
            "-m",
            "raytopk",
            "train",
            "--workers",
            "2",
            "--epochs",
            "3",
            "--checkpoint-dir",
            str(tmp_path / "runs"),
            "--output",
            str(tmp_path / "built_in.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built_in.returncode == 0, built_in.stderr[-3000:]
    reference = json.loads((tmp_path / "built_in.json").read_text())["test_accuracy"]
    own, _ = _train(exported["png"], tmp_path, "--epochs", "3", "--batch-size", "64")
    assert abs(own["test_accuracy"] - reference) <= 0.01, (own["test_accuracy"], reference)


@pytest.mark.faults
def test_killed_driver_resumes_parquet_run_exactly(exported, tmp_path):
    """With ``shuffle_seed`` a Parquet run's batches are fixed: a run whose driver was killed after epoch 1 and rerun
    ends with the uninterrupted run's weights, which needs every rank's residuals back as they were."""
    import glob

    import torch

    from cluster import kill_tree

    flags = ["--compress", "--epochs", "2", "--set", "shuffle_seed=7", "--set", "image_shape=[1, 28, 28]"]
    straight, _ = _train(exported["list"], tmp_path / "straight", *flags)
    command = _train_command(exported["list"], tmp_path / "killed" / "runs", *flags)
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not glob.glob(str(tmp_path / "killed" / "runs" / "*" / SNAPSHOT_FILE)) and time.time() < deadline:
            time.sleep(0.2)
        assert driver.poll() is None, "the run finished before it could be killed"
    finally:
        kill_tree(driver.pid)
        driver.wait()
    resumed, out = _train(exported["list"], tmp_path / "killed", *flags)
    assert "resuming" in out and "after epoch 1" in out, out[-2000:]
    weights = [torch.load(os.path.join(s["checkpoint"], MODEL_FILE), weights_only=True) for s in (straight, resumed)]
    for key, value in weights[0].items():
        assert torch.equal(weights[1][key], value), key
