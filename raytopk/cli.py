"""``raytopk train | bench | tune | export``: the command line (also ``python -m raytopk``).

Quiet by default: what runs, a progress bar (plain lines off a terminal), a line
per epoch, the result last; ``-v/--verbose`` adds Ray's own output.
User errors (bad flags, bad config, missing data) print one line to stderr
and exit 2; nothing is written. A failed run prints which worker failed with
what, and where the full traceback and Ray's logs are, and exits 1.
"""

import argparse
import shlex
import sys
from dataclasses import fields
from typing import Optional

from raytopk import __version__
from raytopk.config import DGC_OFF, ConfigError, TrainConfig, load_config
from raytopk.data import DATASETS, DatasetError
from raytopk.models import MODELS

# Flags whose names users know from the seed's train.py, and the rest of TrainConfig.
_FLAG_HELP = {
    "model": " | ".join(MODELS),
    "dataset": " | ".join([*DATASETS, "parquet"]) + " (parquet: your own files, see --data-path)",
    "data_path": "dataset: parquet: a directory, a file or a URI (s3://, gs://) of Parquet files",
    "test_path": (
        "dataset: parquet: the test split's files (else data_path's test/ directory, else --test-fraction of its rows)"
    ),
    "image_shape": "dataset: parquet: [C, H, W] of images stored as lists of numbers, as YAML: '[1, 28, 28]'",
    "compress": "send only the top-k gradient entries (raytopk's hook)",
    "method": (
        "topk | dense | fp16: what the workers exchange (fp16: PyTorch's fp16_compress_hook, for comparison); "
        "sets --compress"
    ),
    "workers": "number of Ray Train workers (the most, with --min-workers)",
    "min_workers": (
        "elastic training: run with anywhere from this many to --workers workers, resizing as nodes come and go"
    ),
    "resources_per_worker": "custom Ray resources each worker needs, as YAML: '{fake_gpu: 1}'",
    "address": "Ray cluster address (else RAY_ADDRESS, else a local Ray)",
    "checkpoint_dir": "storage path for runs and checkpoints",
    "output": "write a JSON summary here",
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="job YAML (jobs/*.yaml); flags override its keys")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a job key (as submit.py passes them); repeatable"
    )
    for f in sorted(fields(TrainConfig), key=lambda f: "help" in f.metadata):  # what to train first, then how
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_help(f))
        else:
            kind = {
                int: flag_type(int, "an integer"),
                Optional[int]: flag_type(int, "an integer"),
                float: flag_type(float, "a number"),
                Optional[float]: flag_type(float, "a number"),
                Optional[dict]: flag_type(_yaml_value, "YAML"),
                Optional[list]: flag_type(_yaml_value, "YAML"),
            }.get(f.type, str)
            parser.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=_help(f))


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with its errors as one line, as every raytopk user error is (argparse prints the usage
    first, which for ``raytopk train`` is a screenful); ``submit.py`` uses it too."""

    def error(self, message: str):
        program = self.prog.split()[0]
        self.exit(2, f"{program}: error: {message.removeprefix('argument ')} (see: {self.prog} --help)\n")


def flag_type(convert, allowed: str):
    """A flag's type: ``convert``, whose failure argparse reports as ``--flag: got 'x'; allowed: <allowed>``."""

    def read(text: str):
        try:
            return convert(text)
        except ConfigError as err:  # already names the value
            raise argparse.ArgumentTypeError(str(err)) from None
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}; allowed: {allowed}") from None

    return read


def _help(f) -> Optional[str]:
    """A flag's help: a compression option's own (raytopk.options), with what it allows, else the line above."""
    if "help" not in f.metadata:
        return _FLAG_HELP.get(f.name)
    allowed = f.metadata["interval"] or ", ".join(f.metadata["choices"] or ())
    return f"{f.metadata['help']}; allowed: {allowed}" if allowed else f.metadata["help"]


def _yaml_value(text: str):
    """``text`` read as YAML (``2`` is an int, ``true`` a bool, ``{a: 1}`` a mapping); a ConfigError if it is not
    YAML."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"got {text[:40]!r}, which is not YAML ({str(err).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"got {text[:40]!r}..., nested too deeply to read") from None


def config_from_args(args, side_by_side: bool = False) -> TrainConfig:
    """Defaults, then the YAML, then ``--set`` pairs, then the per-key flags; its paths checked (``run`` checks them
    too, but here a bad one is refused before PyTorch and Ray load). ``side_by_side``: for ``raytopk bench``."""
    from raytopk.preflight import check_paths

    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    cfg = load_config(args.config, parse_sets(args.set), side_by_side=side_by_side, **flags)
    check_paths(cfg)
    return cfg


def _train(args) -> int:
    cfg = config_from_args(args)
    from raytopk.train import bytes_line, run

    summary = run(cfg, restart=args.restart, command=args.command, verbose=args.verbose)
    wall = "unknown" if summary["wall_s"] is None else f"{summary['wall_s']:.0f} s"  # a run finished long ago
    print(f"test accuracy {100 * summary['test_accuracy']:.2f}%  {bytes_line(summary)}  wall {wall}")
    return 0


def _bench(args) -> int:
    """The same job dense and with top-k; the results (and a plot) written, then the table, last."""
    import dataclasses

    from raytopk.bench import format_table, plot_path, write_plot
    from raytopk.storage import write_json

    cfg = config_from_args(args, side_by_side=True)  # its output path checked too, before either run trains
    from raytopk.train import run

    # The dense row drops the compression-only settings (DGC's); SGD keeps its momentum there.
    dense = dataclasses.replace(cfg, compress=False, method=None, output=None, **DGC_OFF)
    rows = [
        run(job, restart=args.restart, command=args.command, verbose=args.verbose)
        for job in (dense, dataclasses.replace(cfg, compress=True, method=None, output=None))
    ]
    print()
    if cfg.output:
        write_json(cfg.output, rows)
        write_plot(rows, plot_path(cfg.output))
        print(f"results: {cfg.output}  plot: {plot_path(cfg.output)}")
    print(format_table(rows))
    return 0


def parse_sets(pairs) -> dict:
    """``--set key=value`` pairs as a dict; values are read as YAML (``2`` is an int, ``true`` a bool)."""
    values = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set: got {pair!r}; allowed: KEY=VALUE, e.g. --set epochs=2")
        try:
            values[key.strip()] = _yaml_value(text) if text.strip() else None
        except ConfigError as err:
            raise ConfigError(f"--set {key.strip()}: {err}") from None
    return values


def _tune(args) -> int:
    """Run a sweep; print the table and where the results are."""
    from raytopk.storage import join
    from raytopk.sweep_results import BEST_FILE, PLOT_FILE, TRIALS_FILE, format_table
    from raytopk.tune import SweepInterrupted, load_sweep, run_sweep, sweep_dir

    sweep, cfg = load_sweep(args.file, parse_sets(args.set))
    try:
        rows, best = run_sweep(
            sweep, cfg, resume=args.resume, address=args.address, command=args.command, verbose=args.verbose
        )
    except SweepInterrupted as stop:
        print(f"raytopk: {stop}", file=sys.stderr)
        return 130
    directory = sweep_dir(sweep)
    print("\n" + format_table(rows, best))
    print(f"\nresults: {join(directory, TRIALS_FILE)}  plot: {join(directory, PLOT_FILE)}")
    if best is None:
        print(
            f"raytopk: error: no trial that ran every epoch meets select: {sweep.select}"
            + (f" (max_mb_per_worker {sweep.max_mb_per_worker})" if sweep.select == "budget" else ""),
            file=sys.stderr,
        )
        return 1
    print(
        f"best: trial {best['trial']}  test accuracy {100 * best['test_accuracy']:.2f}%  "
        f"wire {best['wire_mb_per_worker']:.2f} MB/worker  job: {join(directory, BEST_FILE)}"
    )
    return 0


def _export(args) -> int:
    """Write a built-in dataset as Parquet, in the layout ``dataset: parquet`` reads."""
    from raytopk.parquet import LAYOUTS, export
    from raytopk.preflight import check_directory

    if args.dataset not in DATASETS:
        raise ConfigError(f"dataset: got {args.dataset!r}; allowed: {', '.join(sorted(DATASETS))}")
    if args.layout not in LAYOUTS:
        raise ConfigError(f"layout: got {args.layout!r}; allowed: {', '.join(LAYOUTS)}")
    check_directory("output", args.output)
    counts = export(args.dataset, args.output, args.layout, data_dir=args.data_dir, download=args.download)
    shape = ""
    if args.layout == "list":
        spec = DATASETS[args.dataset]
        shape = f" --set 'image_shape=[{spec.in_channels}, {spec.image_size}, {spec.image_size}]'"
    print(
        f"wrote {counts['train']} training and {counts['test']} test rows of {args.dataset} ({args.layout}) to "
        f"{args.output}/train and {args.output}/test\ntrain on them with: raytopk train --set dataset=parquet "
        f"--set data_path={shlex.quote(args.output)}{shape}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: each command's flags, and the function that runs it (``args.func``)."""
    parser = ArgumentParser(prog="raytopk", description="Top-k compressed data-parallel training on Ray.")
    parser.add_argument("--version", action="version", version=f"raytopk {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, fn, text in (
        ("train", _train, "train one job"),
        ("bench", _bench, "train a job dense and with top-k, side by side"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        _add_config_flags(sub)
        sub.add_argument(
            "--restart",
            action="store_true",
            help="train from scratch as a new run beside the old one (else the same job resumes)",
        )
        _add_verbose_flag(sub)
        sub.set_defaults(func=fn)
    sub = commands.add_parser(
        "tune",
        help="sweep a job's compression ratio and learning rate with Ray Tune",
        description="Sweep a job's keys (tune_configs/*.yaml) with Ray Tune; print the table, write the results.",
    )
    sub.add_argument("file", help="sweep YAML (tune_configs/*.yaml)")
    sub.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a sweep key or a job key; repeatable"
    )
    sub.add_argument("--resume", action="store_true", help="continue the interrupted sweep of the same name")
    sub.add_argument("--address", help=_FLAG_HELP["address"])
    _add_verbose_flag(sub)
    sub.set_defaults(func=_tune)
    sub = commands.add_parser(
        "export",
        help="write a built-in dataset as Parquet files (dataset: parquet reads them)",
        description="Write a built-in dataset's train and test splits as Parquet under OUTPUT/train and OUTPUT/test.",
    )
    sub.add_argument("--dataset", required=True, help=" | ".join(DATASETS))
    sub.add_argument("--output", required=True, help="directory to write (its train/ and test/ are replaced whole)")
    sub.add_argument("--layout", default="png", help="png: images as PNG bytes (default) | list: lists of uint8 values")
    sub.add_argument("--data-dir", default=TrainConfig.data_dir, help="where torchvision's datasets are (as for train)")
    sub.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    sub.set_defaults(func=_export)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # a bare ``raytopk``: what it can do, not an error line
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    args.command = shlex.join(["raytopk", *(sys.argv[1:] if argv is None else argv)])  # recorded in what it writes
    try:
        return args.func(args)
    except (ConfigError, DatasetError) as err:
        print(f"raytopk: error: {err}", file=sys.stderr)
        return 2
    except Exception as stop:
        # raytopk.train imports PyTorch and Ray, so they are imported here, once a run was started, not before a job is
        # checked.
        from ray.train import TrainingFailedError

        from raytopk.console import failure_report
        from raytopk.train import RunInterrupted

        if isinstance(
            stop, TrainingFailedError
        ):  # its type and message, not Ray's frames; the traceback goes to a file
            print("\n".join(failure_report(stop)), file=sys.stderr)
            return 1
        if not isinstance(stop, RunInterrupted):
            raise
        print(f"raytopk: interrupted; {_resume_line(stop, sys.argv[1:] if argv is None else argv)}", file=sys.stderr)
        return 130


def _add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Ray's own output too (its workers' lines and logging); it is always in Ray's log directory",
    )


def _resume_line(stop, argv) -> str:
    """Where an interrupted run stands, and the command that resumes it (the same one; a --restart run by its name)."""
    if "--restart" in argv:
        argv = [a for a in argv if a != "--restart"] + (["--name", stop.name] if argv[0] == "train" else [])
    command = shlex.join(["raytopk", *argv])
    if stop.recorded is None:
        return f"{stop.name} had no complete checkpoint yet; start it again with: {command}"
    path, meta = stop.recorded
    return f"last complete checkpoint: {path} (epoch {meta['epoch']}); resume with: {command}"


if __name__ == "__main__":
    sys.exit(main())
