"""Your own data: Parquet files read with Ray Data, decoded on the cluster, streamed to every worker.

A dataset is Parquet files with two columns:

- ``label`` (job key ``label_column``): integers ``0 .. C-1``, the class; C is
  the largest label plus one, read from the files' column statistics;
- ``image`` (``image_column``): encoded images (PNG or JPEG bytes; the shape is
  the first image's, grey or RGB), or numeric lists of ``C*H*W`` values in
  that order, with ``image_shape: [C, H, W]`` in the job.

``data_path`` is a directory, a file or a URI pyarrow reads (``s3://``,
``gs://``). The test split is ``test_path``; else the ``train/`` and ``test/``
directories under ``data_path`` (as ``raytopk export`` writes them); else a
``test_fraction`` of the rows, chosen by a hash of each row's file path and
position mixed with ``seed``: the same rows on every read, every epoch and
every resume (as long as the files stay where they are).

The driver reads only footers and one row group (:func:`inspect`), so a bad
dataset is one line before any worker starts. :func:`datasets` builds the Ray
Datasets: reading, decoding and normalising run as Ray Data tasks on nodes
with CPUs to spare, and each worker iterates its equal share of the training
rows with :func:`shard_batches`. A dataset whose decoded images fit in a
quarter of the object store is decoded once, before training; a larger one is
read and decoded anew each epoch, streaming. With ``shuffle_seed`` the file order (one
for the run) and each epoch's shuffle of the rows are seeded and Ray Data
keeps its order, so a rerun, or a resumed run, sees the same batches;
without it, files are shuffled anew each epoch, unseeded, and order is not kept.
"""

import io
import math
import posixpath
from dataclasses import dataclass
from typing import Optional

from raytopk.config import ConfigError, check_sizes

__all__ = ["ParquetSpec", "inspect", "datasets", "shard_batches", "test_batches", "export", "LAYOUTS"]

LAYOUTS = ("png", "list")  # how export writes images: PNG bytes, or numeric lists (then image_shape is needed)
SAMPLE_ROWS = 1000  # images the driver decodes to learn the shape and each channel's mean and std
SHUFFLE_ROWS = 4096  # rows each worker's local shuffle buffer mixes (after the files' order is shuffled)
DECODE_ROWS = 4096  # rows per Ray Data decode call: few large tasks (per-task overhead outweighs small images)
CACHE_SHARE = 0.25  # decode once and keep the result when it takes at most this share of the object store


@dataclass(frozen=True)
class ParquetSpec:
    """What the driver learns of a Parquet dataset before training: where its splits are and what its images are."""

    filesystem: object  # a pyarrow FileSystem
    train_files: tuple
    test_files: tuple
    test_fraction: Optional[float]  # None when the test split has files of its own
    train_rows: int  # exact with test files; expected (rows x (1 - test_fraction)) otherwise
    test_rows: int
    image_shape: tuple  # (C, H, W)
    num_classes: int
    encoded: bool  # PNG/JPEG bytes, else numeric lists
    mean: tuple  # per channel, of the sample, after scaling bytes to [0, 1]
    std: tuple

    @property
    def model_shape(self) -> dict:
        """What :func:`raytopk.models.build_model` needs, passed to the workers."""
        return {
            "in_channels": self.image_shape[0],
            "image_size": self.image_shape[1],
            "num_classes": self.num_classes,
            "train_rows": self.train_rows,
        }


def inspect(cfg) -> ParquetSpec:
    """Check the job's Parquet files from their footers and first row group; a one-line ConfigError if they will not
    train."""
    fs, train_files, test_files, fraction = _splits(cfg)
    train_rows, test_rows, max_label = _check_schema_and_count(cfg, fs, train_files, test_files)
    if fraction is not None:
        train_rows, test_rows = int(train_rows * (1 - fraction)), round(train_rows * fraction)
    source = cfg.test_path or cfg.data_path
    if train_rows == 0:
        raise ConfigError(
            f"data_path: got {cfg.data_path!r}, which holds no rows; "
            "allowed: Parquet files with at least one row per worker"
        )
    if test_rows == 0:
        raise ConfigError(
            f"{'test_path' if cfg.test_path else 'test_fraction'}: the test split of {source!r} holds no rows; "
            "allowed: a test split with at least one row"
        )
    if cfg.workers > train_rows:
        raise ConfigError(
            f"workers: got {cfg.workers}, but {cfg.data_path} holds {train_rows} training rows; allowed: at most "
            f"{train_rows}"
        )
    shape, encoded, mean, std = _sample_images(cfg, fs, train_files[0])
    check_sizes(cfg, train_rows, f"{cfg.data_path} has {train_rows} training rows")
    return ParquetSpec(
        fs,
        tuple(train_files),
        tuple(test_files),
        fraction,
        train_rows,
        test_rows,
        shape,
        max_label + 1,
        encoded,
        mean,
        std,
    )


def _splits(cfg):
    """``(filesystem, train files, test files, test_fraction or None)`` for the job's paths."""
    fs, root, files = _parquet_files("data_path", cfg.data_path)
    if cfg.test_path:
        return fs, files, _parquet_files("test_path", cfg.test_path)[2], None
    split_dirs = [posixpath.join(root, split) + "/" for split in ("train", "test")]
    train, test = ([f for f in files if f.startswith(d)] for d in split_dirs)
    if train and test:
        return fs, train, test, None
    return fs, files, files, cfg.test_fraction


def _parquet_files(key: str, path: str):
    """``(filesystem, root, sorted Parquet files)`` under ``path`` (a file, a directory or a URI); a ConfigError if
    none."""
    import pyarrow
    import pyarrow.fs

    from raytopk.storage import resolve

    allowed = "allowed: a directory, a file or a URI (s3://, gs://) of Parquet files"
    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(resolve(path))
        kind = fs.get_file_info(root).type
        found = (
            fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
            if kind == pyarrow.fs.FileType.Directory
            else []
        )
    except (pyarrow.ArrowException, OSError, ValueError) as err:
        raise ConfigError(
            f"{key}: got {path!r}, which cannot be read ({str(err).splitlines()[0]}); {allowed}"
        ) from None
    if kind == pyarrow.fs.FileType.NotFound:
        raise ConfigError(f"{key}: got {path!r}, which does not exist; {allowed}")
    if kind == pyarrow.fs.FileType.File:
        return fs, posixpath.dirname(root), [root]
    hidden = ("_", ".")  # Spark's _SUCCESS and _metadata, editors' and writers' temporary files
    files = sorted(
        f.path
        for f in found
        if f.type == pyarrow.fs.FileType.File
        and f.path.endswith(".parquet")
        and not any(part.startswith(hidden) for part in posixpath.relpath(f.path, root).split("/"))
    )
    if not files:
        raise ConfigError(f"{key}: got {path!r}, which holds no Parquet files (*.parquet); {allowed}")
    return fs, root, files


def _check_schema_and_count(cfg, fs, train_files, test_files):
    """``(train rows, test rows, largest label)`` from the footers, each file's columns checked; the largest label from
    statistics."""
    import pyarrow.compute
    import pyarrow.parquet as pq

    rows, largest = {}, -1
    for path in dict.fromkeys(train_files + test_files):
        try:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
                _check_columns(cfg, path, schema)
                rows[path] = meta.num_rows
                low, high, nulls = _label_range(meta, cfg.label_column)
                if nulls is None:  # no statistics in this file: read its label column alone
                    labels = pq.read_table(f, columns=[cfg.label_column]).column(0)
                    extremes, nulls = pyarrow.compute.min_max(labels), labels.null_count
                    low, high = extremes["min"].as_py(), extremes["max"].as_py()
        except ConfigError:
            raise
        except Exception as err:  # a truncated or foreign file: pyarrow's error says which part
            raise ConfigError(
                f"data_path: {path} is not a readable Parquet file ({str(err).splitlines()[0]}); allowed: Parquet files"
            ) from None
        if nulls:
            raise ConfigError(
                f"label_column: {cfg.label_column!r} in {path} has {nulls} empty (null) labels; allowed: a class "
                "index in every row"
            )
        if low is not None and low < 0:
            raise ConfigError(
                f"label_column: {cfg.label_column!r} in {path} holds {low}; allowed: class indices 0, 1, 2, ..."
            )
        largest = max(largest, -1 if high is None else int(high))
    return sum(rows[p] for p in train_files), sum(rows[p] for p in test_files), largest


def _check_columns(cfg, path: str, schema) -> None:
    import pyarrow.types as t

    for key in ("image_column", "label_column"):
        name = getattr(cfg, key)
        if name not in schema.names:
            raise ConfigError(
                f"{key}: got {name!r}, but {path} has no such column; allowed: one of {', '.join(schema.names)}"
            )
    label = schema.field(cfg.label_column).type
    if not t.is_integer(label):
        raise ConfigError(f"label_column: {cfg.label_column!r} in {path} holds {label}; allowed: integer class indices")
    image = schema.field(cfg.image_column).type
    numeric_list = (t.is_list(image) or t.is_large_list(image) or t.is_fixed_size_list(image)) and (
        t.is_integer(image.value_type) or t.is_floating(image.value_type)
    )
    if not (t.is_binary(image) or t.is_large_binary(image) or numeric_list):
        raise ConfigError(
            f"image_column: {cfg.image_column!r} in {path} holds {image}; allowed: encoded images (PNG or JPEG bytes) "
            "or lists of numbers"
        )
    if numeric_list and cfg.image_shape is None:
        raise ConfigError(
            f"image_shape: not set, but {cfg.image_column!r} in {path} holds lists of numbers; "
            "allowed: [C, H, W] with C*H*W values per image"
        )


def _label_range(meta, column: str):
    """``(min, max, nulls)`` of ``column`` over the file's row groups from their statistics, or ``(None, None, None)``
    where any lacks them (an all-null group has no min and max)."""
    low = high = None
    nulls = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        chunk = next(group.column(c) for c in range(group.num_columns) if group.column(c).path_in_schema == column)
        stats = chunk.statistics
        if group.num_rows and (stats is None or not stats.has_min_max or not stats.has_null_count):
            return None, None, None
        if group.num_rows:
            low, high = (stats.min, stats.max) if low is None else (min(low, stats.min), max(high, stats.max))
            nulls += stats.null_count
    return low, high, nulls


def _sample_images(cfg, fs, path: str):
    """``((C, H, W), encoded, mean, std)`` from up to :data:`SAMPLE_ROWS` images of the first file; a ConfigError if
    they do not fit."""
    import numpy as np
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        first = pq.ParquetFile(f)
        column = first.read_row_group(0, columns=[cfg.image_column]).column(0).slice(0, SAMPLE_ROWS)
    encoded = not hasattr(column.type, "value_type")
    try:
        images = decode(column, cfg.image_shape, encoded, mode=None)
    except ValueError as err:
        raise ConfigError(f"image_column: {cfg.image_column!r} in {path}: {err}") from None
    channels, height, width = images.shape[1:]
    if cfg.image_shape is not None and list(images.shape[1:]) != list(cfg.image_shape):
        raise ConfigError(
            f"image_shape: got {cfg.image_shape}, but the images in {path} are {list(images.shape[1:])}; "
            "allowed: their shape, or leave it unset for encoded images"
        )
    if height != width:
        raise ConfigError(
            f"image_shape: the images in {path} are {[channels, height, width]}; allowed: square images (H = W), "
            "which raytopk's models take"
        )
    mean = images.mean(axis=(0, 2, 3))
    std = np.maximum(images.std(axis=(0, 2, 3)), 1e-6)  # a constant channel is centred, not divided by zero
    return (channels, height, width), encoded, tuple(float(m) for m in mean), tuple(float(s) for s in std)


def decode(column, image_shape, encoded: bool, mode: Optional[str]):
    """A pyarrow column of images as float32 N x C x H x W: bytes decoded and scaled to [0, 1], lists reshaped.

    ``mode`` ("L" or "RGB") converts every decoded image to one channel count; None keeps the first image's.
    A ValueError says which image does not fit.
    """
    import numpy as np

    if not encoded:
        values = column.combine_chunks() if hasattr(column, "combine_chunks") else column
        flat = values.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        size = math.prod(image_shape)
        if len(flat) != size * len(values):
            lengths = (
                set(values.value_lengths().to_pylist())
                if hasattr(values, "value_lengths")
                else {len(flat) // max(len(values), 1)}
            )
            raise ValueError(
                f"image lists of {sorted(lengths)[0]} values, but image_shape {list(image_shape)} needs {size}"
            )
        return flat.reshape(len(values), *image_shape)
    from PIL import Image

    images = []
    for i, data in enumerate(column.to_pylist()):
        try:
            image = Image.open(io.BytesIO(data))
            mode = mode or ("L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB")
            pixels = np.asarray(image if image.mode == mode else image.convert(mode))  # 8 bits per channel
        except Exception as err:  # PIL's errors for undecodable bytes are of several kinds
            raise ImageError(i, f"is not a PNG or JPEG image ({type(err).__name__})") from None
        size = tuple(image_shape[1:]) if image_shape is not None else images[0].shape[:2] if images else None
        if size is not None and pixels.shape[:2] != size:
            where = "the data's first images" if image_shape is not None else "the first image"
            raise ImageError(i, f"is {_pixels(pixels.shape)} pixels, {where} {_pixels(size)}; allowed: one size")
        images.append(pixels)
    stacked = np.stack(images).astype(np.float32) / 255.0 if images else np.zeros((0, 1, 1), np.float32)
    return stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)


class ImageError(ValueError):
    """An image that does not decode, or not to the size of the others: its ``row`` in the column, and ``what``."""

    def __init__(self, row: int, what: str):
        super().__init__(f"row {row} {what}")
        self.row, self.what = row, what


def _pixels(shape) -> str:
    return f"{shape[1]} x {shape[0]}"


def _in_test(row_hash, seed: int, fraction: float):
    """Which rows (by Ray Data's row hash) belong to the test split: the hash mixed with ``seed``, below
    ``fraction``."""
    import numpy as np

    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as a hash mix should
        mixed = (row_hash.astype(np.uint64) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)) * np.uint64(
            0xBF58476D1CE4E5B9
        )
    return (mixed >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


def _prepare(batch, image_column: str, label_column: str, image_shape, encoded: bool, mode: str, mean, std, split):
    """Ray Data's map over a pyarrow batch: keep ``split``'s rows, decode and normalise the images, as
    ``{"x", "y"}``."""
    import numpy as np

    if split is not None:  # (seed, fraction, want_test): rows of a hashed split
        seed, fraction, want_test = split
        keep = _in_test(batch.column("row_hash").to_numpy(), seed, fraction) == want_test
        batch = batch.filter(keep)
    try:
        images = decode(batch.column(image_column), image_shape, encoded, mode)
    except ImageError as err:  # found by a worker or Ray Data's task: the file is in the row's path column
        from raytopk.data import DatasetError

        path = batch.column("path")[err.row].as_py()
        raise DatasetError(f"image_column: {image_column!r} in {path}: an image {err.what}") from None
    images = (images - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
    return {"x": images.astype(np.float32), "y": batch.column(label_column).to_numpy().astype(np.int64)}


def datasets(cfg, spec: ParquetSpec) -> dict:
    """``{"train": Dataset, "test": Dataset}``: lazy Ray Datasets of normalised ``x`` and integer ``y``."""
    import ray.data

    def read(files, want_test: bool, shuffled: bool):
        hashed = spec.test_fraction is not None
        shuffle = None
        if shuffled:
            # Seeded: one file order for every epoch (an epoch's own seed goes to the rows' shuffle), so a resumed
            # run sees the batches an uninterrupted one would.
            shuffle = (
                "files"
                if cfg.shuffle_seed is None
                else ray.data.FileShuffleConfig(seed=cfg.shuffle_seed, reseed_after_execution=False)
            )
        ds = ray.data.read_parquet(
            list(files),
            filesystem=spec.filesystem,
            columns=[cfg.image_column, cfg.label_column],
            include_row_hash=hashed,
            include_paths=True,  # for an error's file
            shuffle=shuffle,
        )
        mode = "L" if spec.image_shape[0] == 1 else "RGB"
        split = (cfg.seed, spec.test_fraction, want_test) if hashed else None
        return ds.map_batches(
            _prepare,
            batch_format="pyarrow",
            batch_size=DECODE_ROWS,
            fn_kwargs=dict(
                image_column=cfg.image_column,
                label_column=cfg.label_column,
                image_shape=spec.image_shape,
                encoded=spec.encoded,
                mode=mode,
                mean=spec.mean,
                std=spec.std,
                split=split,
            ),
        )

    # Ray Data's first Parquet reader: its second (the default in Ray 2.60, listing files in a task of its own) took
    # 1.8-4.3 s to a first batch here against 0.12 s, and every epoch and evaluation starts a new read.
    context = ray.data.DataContext.get_current()
    context.raise_original_map_exception = True  # a bad image's DatasetError, not "UDF failed", wherever it decodes
    v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        train, test = read(spec.train_files, False, True), read(spec.test_files, True, False)
    finally:
        context.use_datasource_v2 = v2
    if not _decode_once(spec):
        return {"train": train, "test": test}
    # Decoded once, its blocks in file order (seeded or not), then each epoch in a new order of its blocks (one
    # order with shuffle_seed), mixed further by each worker's shuffle buffer.
    order, context.execution_options.preserve_order = context.execution_options.preserve_order, True
    try:
        return {
            "train": train.materialize().randomize_block_order(seed=cfg.shuffle_seed),
            "test": test.materialize(),
        }
    except Exception as err:
        bad_data = _dataset_error(err)
        if bad_data is None:
            raise
        raise bad_data from None  # one line, as the checks before Ray's start give
    finally:
        context.execution_options.preserve_order = order


def _dataset_error(err: BaseException):
    """The DatasetError a Ray Data task raised (an image that does not decode or fit) in the exceptions Ray wraps it
    in, or None."""
    from raytopk.data import DatasetError

    seen = set()
    while err is not None and id(err) not in seen:
        if type(err) is DatasetError:  # not Ray's copy of a task's error, which also is one and prints a traceback
            return DatasetError(str(err).splitlines()[0])  # without the retry advice Ray Data appends
        seen.add(id(err))
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


def _decode_once(spec: ParquetSpec) -> bool:
    """Whether the decoded images fit in :data:`CACHE_SHARE` of the cluster's object store: then they are decoded
    once, before training, and every epoch reads them from there (as torchvision's path keeps its tensors in
    memory); larger datasets are read and decoded anew each epoch, streaming."""
    import ray

    decoded = (spec.train_rows + spec.test_rows) * (4 * math.prod(spec.image_shape) + 8)
    return decoded <= CACHE_SHARE * ray.cluster_resources().get("object_store_memory", 0)


def data_config(cfg):
    """Ray Train's ingest: equal training shards (every rank takes as many steps), order kept when ``shuffle_seed`` asks
    for it.

    The test split is split too, unevenly: each rank counts what it
    evaluates and the counts are summed, so every test row is seen once.
    """
    from ray.train import DataConfig

    class Ingest(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            rest = {name: ds for name, ds in datasets.items() if name != "test"}
            shards = (
                super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
                if rest
                else [{} for _ in range(world_size)]
            )
            if "test" in datasets:
                for shard, test in zip(shards, datasets["test"].streaming_split(world_size, equal=False)):
                    shard["test"] = test
            return shards

    options = None
    if cfg.shuffle_seed is not None:
        options = DataConfig.default_ingest_options()
        options.preserve_order = True
    return Ingest(execution_options=options)


def shard_batches(cfg, epoch: int, rank: int):
    """This worker's training batches for ``epoch``: ``(x, y)`` tensors, shuffled through a local buffer."""
    import ray.train

    seed = None if cfg.shuffle_seed is None else (cfg.shuffle_seed * 1_000_003 + epoch) * 1009 + rank
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=cfg.batch_size, drop_last=True, local_shuffle_buffer_size=SHUFFLE_ROWS, local_shuffle_seed=seed
    ):
        yield batch["x"], batch["y"]


def test_batches():
    """This worker's share of the test split, in batches of 256."""
    import ray.train

    for batch in ray.train.get_dataset_shard("test").iter_torch_batches(batch_size=256):
        yield batch["x"], batch["y"]


def export(
    name: str,
    output: str,
    layout: str = "png",
    data_dir: str = "~/.cache/raytopk/data",
    download: bool = False,
    rows_per_file: int = 20000,
    seed: int = 0,
) -> dict:
    """Write built-in dataset ``name`` as Parquet under ``output``/train and ``output``/test; return the row counts.

    Rows are written in a seeded random order (built-in datasets are often
    sorted by class, and a worker's shuffle buffer mixes only nearby rows).
    ``layout`` "png" writes PNG bytes; "list" writes each image's values as a
    list of uint8, which a job reads with ``image_shape: [C, H, W]``.
    Each split is written beside its place and renamed onto it, so a failed
    export leaves no partial dataset.
    """
    import os
    import shutil
    import tempfile

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytopk.data import pixels

    if layout not in LAYOUTS:
        raise ConfigError(f"layout: got {layout!r}; allowed: {', '.join(LAYOUTS)}")
    splits = pixels(name, os.path.abspath(os.path.expanduser(data_dir)), download)
    output = os.path.abspath(os.path.expanduser(output))
    os.makedirs(output, exist_ok=True)
    counts = {}
    for split, (images, labels) in splits.items():
        order = np.random.default_rng(seed).permutation(len(labels))
        staging = tempfile.mkdtemp(dir=output, prefix=f".{split}-")
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the data from other users of a shared filesystem
        try:
            for part, start in enumerate(range(0, len(order), rows_per_file)):
                rows = order[start : start + rows_per_file]
                column = _png_column(images[rows]) if layout == "png" else _list_column(images[rows])
                pq.write_table(
                    pa.table({"image": column, "label": pa.array(labels[rows], pa.int64())}),
                    os.path.join(staging, f"part-{part:05d}.parquet"),
                    row_group_size=4096,
                )
            target = os.path.join(output, split)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        counts[split] = len(labels)
    return counts


def _png_column(images):
    import pyarrow as pa
    from PIL import Image

    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return pa.array(encoded, pa.binary())


def _list_column(images):
    """Each image's values in C x H x W order as one list of uint8."""
    import pyarrow as pa

    chw = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    flat = chw.reshape(len(chw), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
