"""Ray Tune sweeps over the compression ratio and learning rate, Ray Train V2 style.

A sweep YAML (``tune_configs/*.yaml``) is flat, one key a setting::

    base: ../jobs/mnist5k_topk.yaml          # the job every trial starts from (relative to this file)
    train: {epochs: 4}                       # job keys every trial sets on top of the base
    search_space:                            # job keys each trial samples
      ratio: {loguniform: [0.001, 0.1]}      # also uniform: [low, high], choice: [...], grid: [...]
      lr: {loguniform: [0.01, 0.2]}
    scheduler: asha                          # or none; ASHA cuts weak trials at epoch
    grace_period: 1                          #   grace_period, then every reduction_factor-fold
    reduction_factor: 2                      #   more epochs
    num_samples: 8
    max_concurrent_trials: 2                 # 0: no limit (trials beyond what the cluster holds wait for workers)

Ray 2.60 runs Train V2, where a ``TorchTrainer`` cannot be handed to a ``Tuner``.
Each trial is therefore a Tune *function* that builds one ``TorchTrainer`` and
calls ``fit()``; ``TuneReportCallback`` forwards every epoch's report to Tune,
so ASHA sees the accuracy as it comes. The function itself asks for no CPU
(``tune.with_resources(..., {"cpu": 0, "memory": ...})``): the trainer's workers hold the
resources, so trials queue on the cluster instead of deadlocking it.

Each trial's training run is named after its trial id under
``<storage_path>/<name>/trials``; ``Tuner.restore`` keeps trial ids, so a
resumed sweep resumes every unfinished trial from its last epoch checkpoint.
"""

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Optional

from raytopk.config import (
    ConfigError,
    TrainConfig,
    check_compression_used,
    check_fields,
    check_name,
    from_mapping,
    read_yaml_mapping,
    resolved,
)
from raytopk.preflight import check_directory, local_ray_cpus
from raytopk.storage import exists, join, read_text, resolve, write_json
from raytopk.sweep_results import trial_config, trial_rows, write_results

__all__ = ["SweepConfig", "SweepInterrupted", "load_sweep", "sweep_dir", "run_sweep"]

SWEEP_FILE = "sweep.json"  # the resolved sweep, saved on the first run and checked on --resume
# What each trial's driver function reserves: no CPU (its trainer's workers take those) and, since Tune
# needs a non-empty request, a little memory for the driver and the trainer's controller.
TRIAL_DRIVER_MEMORY = 256 * 1024**2
# Job keys a sweep cannot set: each trial gets its own run name and storage, and the summary file is the sweep's.
_NOT_SWEPT = ("name", "checkpoint_dir", "output", "address")


class SweepInterrupted(Exception):
    """The sweep stopped before every trial finished (Ctrl+C); its state is saved for ``--resume``."""


@dataclass
class SweepConfig:
    """A sweep: the trials' job, what they sample, how they are scheduled and how the best is picked."""

    # What each trial trains.
    base: str = ""  # a job YAML; relative paths are relative to the sweep file
    train: dict = field(default_factory=dict)
    search_space: dict = field(default_factory=dict)
    # How trials are sampled and scheduled.
    num_samples: int = 8
    max_concurrent_trials: int = 0
    search_alg: str = "random"
    seed: int = 0
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    metric: str = "test_accuracy"
    mode: str = "max"
    # How the best trial is picked (best by metric; most accurate under a byte budget; fewest bytes near the best).
    select: str = "best"
    max_mb_per_worker: Optional[float] = None
    within_points: float = 0.5
    # Where the sweep is saved.
    name: Optional[str] = None  # default: the sweep file's name
    storage_path: str = "~/raytopk_runs"

    def __post_init__(self):
        check_fields(self, _CHOICES, _INTERVALS)
        check_name("name", self.name)
        if self.mode != _MODES[self.metric]:
            raise ConfigError(f"mode: got {self.mode!r} for metric {self.metric}; allowed: {_MODES[self.metric]}")
        if self.select == "budget" and self.max_mb_per_worker is None:
            raise ConfigError("max_mb_per_worker: got null with select: budget; allowed: a number in (0, inf)")
        if not self.search_space:
            raise ConfigError(
                "search_space: got nothing; allowed: a mapping of job keys to distributions, e.g. ratio: {loguniform: "
                "[0.001, 0.1]}"
            )


_MODES = {"test_accuracy": "max", "loss": "min"}
_CHOICES = {
    "search_alg": ("random", "optuna"),
    "scheduler": ("asha", "none"),
    "metric": tuple(_MODES),
    "mode": ("max", "min"),
    "select": ("best", "budget", "within"),
}
_INTERVALS = {
    "num_samples": "[1, inf)",
    "max_concurrent_trials": "[0, inf)",
    "grace_period": "[1, inf)",
    "reduction_factor": "(1, inf)",
    "max_mb_per_worker": "(0, inf)",
    "within_points": "[0, 100]",
}
# name -> (what its argument is, whether it samples numbers from a range)
_DISTRIBUTIONS = {
    "loguniform": ("[low, high] with 0 < low < high", True),
    "uniform": ("[low, high] with low < high", True),
    "choice": ("a non-empty list of values", False),
    "grid": ("a non-empty list of values", False),
}


def load_sweep(path: str, overrides: Optional[dict] = None) -> tuple:
    """``(SweepConfig, base TrainConfig)`` from the sweep YAML at ``path``, checked end to end.

    ``overrides`` (from ``--set``) may hold sweep keys or job keys; job keys go into ``train``.
    Every bound and value of the search space is checked as a job config, so a sweep
    never starts a trial that would fail validation.
    """
    values = read_yaml_mapping(path)
    values.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    values["train"] = dict(values.get("train") or {})
    sweep_keys = {f.name for f in fields(SweepConfig)}
    job_keys = {f.name for f in fields(TrainConfig)}
    for key, value in (overrides or {}).items():
        if key in sweep_keys:
            values[key] = value
        elif key in job_keys:
            values["train"][key] = value
        else:
            raise ConfigError(
                f"--set {key}: unknown key; allowed: sweep keys ({', '.join(sorted(sweep_keys))}) or job keys"
            )
    try:
        sweep = from_mapping(SweepConfig, values, path)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if not str(err).startswith(path) else str(err)) from None
    if not sweep.base:
        raise ConfigError(f"{path}: base: missing; allowed: the path of a job YAML, e.g. ../jobs/mnist5k_topk.yaml")
    base_path = (
        sweep.base if os.path.isabs(sweep.base) else os.path.join(os.path.dirname(os.path.abspath(path)), sweep.base)
    )
    base = read_yaml_mapping(base_path)
    for key in _NOT_SWEPT:
        if key in sweep.train or key in sweep.search_space:
            raise ConfigError(
                f"{path}: {key}: set per trial by the sweep; allowed in train and search_space: other job keys"
            )
    for key in sorted(sweep.train.keys() & sweep.search_space.keys()):  # the sample would win, silently
        where = f"--set {key}" if key in (overrides or {}) else f"{path}: train.{key}"
        raise ConfigError(
            f"{where}: got {sweep.train[key]!r}, but search_space.{key} samples it for each trial; allowed: a key the "
            "sweep does not sample (--set 'search_space={...}' changes what it samples)"
        )
    try:
        cfg = from_mapping(TrainConfig, {**base, **sweep.train}, f"{base_path} with train")
    except ConfigError as err:
        raise ConfigError(f"{path}: train: {err}") from None
    try:  # a sweep of ratio over a dense job would run dense trials only
        check_compression_used(cfg, {**base, **sweep.train, **sweep.search_space})
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    sweep = dataclasses.replace(sweep, base=os.path.abspath(base_path))
    _check_space(path, sweep, cfg)
    return sweep, cfg


def _check_space(path: str, sweep: SweepConfig, cfg: TrainConfig) -> None:
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    for key, spec in sweep.search_space.items():
        where = f"{path}: search_space.{key}"
        if key not in kinds:
            raise ConfigError(f"{where}: unknown job key; allowed: {', '.join(sorted(set(kinds) - set(_NOT_SWEPT)))}")
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in _DISTRIBUTIONS):
            raise ConfigError(
                f"{where}: got {spec!r}; allowed: one of {', '.join(_DISTRIBUTIONS)} with its values, e.g. "
                f"{{loguniform: [0.001, 0.1]}}"
            )
        name, values = next(iter(spec.items()))
        needs, is_range = _DISTRIBUTIONS[name]
        if is_range:
            numbers = (
                isinstance(values, list)
                and len(values) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            )
            if not numbers or not values[0] < values[1] or (name == "loguniform" and values[0] <= 0):
                raise ConfigError(f"{where}: {name} got {values!r}; allowed: {needs}")
            if kinds[key] is not float:
                raise ConfigError(
                    f"{where}: {name} samples real numbers but {key} takes "
                    f"{'an integer' if kinds[key] is int else 'other values'}; use choice or grid"
                )
        elif not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {name} got {values!r}; allowed: {needs}")
        if name == "grid" and sweep.search_alg != "random":
            raise ConfigError(f"{where}: grid needs search_alg random; got {sweep.search_alg!r}")
        for value in values:
            try:
                dataclasses.replace(cfg, **{key: value})
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
    if sweep.scheduler == "asha" and sweep.grace_period > cfg.epochs:
        raise ConfigError(
            f"{path}: grace_period: got {sweep.grace_period}; allowed: at most the trials' epochs ({cfg.epochs})"
        )


def sweep_dir(sweep: SweepConfig) -> str:
    """The sweep's directory: Tune's experiment files, one training run per trial, and the results."""
    return join(resolve(sweep.storage_path), sweep.name)


def train_trial(sampled: dict, base: dict, trials_dir: str) -> None:
    """One Tune trial: a TorchTrainer for the sampled job, its epoch reports forwarded to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raytopk.train import build_trainer

    cfg = trial_config(TrainConfig(**base), sampled)
    cfg = dataclasses.replace(cfg, name=tune.get_context().get_trial_id(), checkpoint_dir=trials_dir)
    build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()


def _param_space(sweep: SweepConfig) -> dict:
    from ray import tune

    make = {
        "loguniform": lambda v: tune.loguniform(*v),
        "uniform": lambda v: tune.uniform(*v),
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    return {key: make[name](values) for key, spec in sweep.search_space.items() for name, values in spec.items()}


def _trial_count(sweep: SweepConfig) -> int:
    """How many trials the sweep runs: each grid point ``num_samples`` times."""
    count = sweep.num_samples
    for spec in sweep.search_space.values():
        count *= len(spec.get("grid", [None]))
    return count


def _search_alg(sweep: SweepConfig):
    """The searcher; it holds the concurrency limit itself (Tune ignores ``max_concurrent_trials`` for generators)."""
    if sweep.search_alg == "optuna":
        try:
            import optuna  # noqa: F401  (OptunaSearch fails late without it)
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise ConfigError(
                "search_alg: got 'optuna' but optuna is not installed; install it with: pip install 'raytopk[optuna]'"
            ) from None
        from ray.tune.search import ConcurrencyLimiter

        searcher = OptunaSearch(seed=sweep.seed)
        return ConcurrencyLimiter(searcher, sweep.max_concurrent_trials) if sweep.max_concurrent_trials else searcher
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=sweep.max_concurrent_trials, random_state=sweep.seed)


def _scheduler(sweep: SweepConfig, epochs: int):
    if sweep.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # Epochs, not Tune's training_iteration, which restarts at 1 when a trial resumes from a checkpoint.
    return ASHAScheduler(
        time_attr="epoch", max_t=epochs, grace_period=sweep.grace_period, reduction_factor=sweep.reduction_factor
    )


@contextlib.contextmanager
def _tune_output(verbose: bool):
    """Tune's own output as asked: its new engine prints a start block even at ``verbose=0``, so a quiet sweep runs
    with its legacy one (``RAY_AIR_NEW_OUTPUT=0``, Ray's switch), which prints nothing at 0."""
    if verbose:
        yield
        return
    saved = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["RAY_AIR_NEW_OUTPUT"]
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved


def _trial_progress(total: int, epochs: int):
    """A Tune callback (it runs on the driver): a bar over the sweep's ``total`` trials, and a line as each one ends."""
    import time

    from ray import tune

    from raytopk.console import Console, error_line

    class TrialProgress(tune.Callback):
        """Saved with the sweep's state for ``--resume``: its console is made on first use, in the process that shows
        it."""

        def __init__(self):
            self._console, self._started = None, 0.0

        def __getstate__(self):
            return {}

        def __setstate__(self, state):
            self.__init__()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._update(trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            m = trial.last_result or {}
            reached = m.get("epoch", 0)
            end = (
                f"epoch {reached}/{epochs}"
                if reached == epochs
                else f"stopped by the scheduler at epoch {reached}/{epochs}"
            )
            numbers = (
                f"  test acc {100 * m['test_accuracy']:.2f}%  wire {m['bytes_sent'] / m['workers'] / 1e6:.2f} MB/worker"
                if "test_accuracy" in m
                else ""
            )
            self._say(trial, f"{end}{numbers}")
            self._update(trials, ended=trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            error = trial.get_pickled_error()
            self._say(
                trial,
                f"failed: {error_line(error) if error else 'see its error file'}; full error in {trial.error_file}",
            )
            self._update(trials, ended=trial)

        def on_experiment_end(self, trials, **info):
            self._show().close()

        def _show(self) -> Console:
            if self._console is None:
                self._console, self._started = Console(), time.monotonic()
            return self._console

        def _say(self, trial, text: str) -> None:
            sampled = "  ".join(
                f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"
                for key, value in trial.config.items()
            )
            self._show().say(f"trial {trial.trial_id}  {sampled}  {text}")

        def _update(self, trials, ended=None) -> None:
            done = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")} | (
                {ended.trial_id} if ended else set()
            )
            running = sum(t.status == "RUNNING" for t in trials if t.trial_id not in done)
            best = max(
                (t.last_result["test_accuracy"] for t in trials if "test_accuracy" in (t.last_result or {})),
                default=None,
            )
            postfix = f"{running} running" + (f", best test acc {100 * best:.2f}%" if best is not None else "")
            self._show().update("trials", len(done), total, time.monotonic() - self._started, postfix, unit="ended")

    return TrialProgress()


def _saved_form(sweep: SweepConfig, cfg: TrainConfig) -> dict:
    return json.loads(json.dumps({"sweep": dataclasses.asdict(sweep), "base_job": dataclasses.asdict(cfg)}))


def run_sweep(
    sweep: SweepConfig,
    cfg: TrainConfig,
    resume: bool = False,
    address: Optional[str] = None,
    command: Optional[str] = None,
    verbose: bool = False,
):
    """Run (or with ``resume`` continue) the sweep on Ray; return ``(rows, best)`` as in :mod:`raytopk.sweep_results`.

    ``command``, the command line that asked for the sweep, is recorded in ``trials.json``.
    It prints a line saying what runs, a bar over the trials (plain lines off a
    terminal) and a line as each trial ends; Ray's and Tune's own output only
    when ``verbose`` (a resumed sweep keeps the first run's choice for Tune's).
    """
    check_directory("storage_path", sweep.storage_path)
    directory = sweep_dir(sweep)
    saved_path = join(directory, SWEEP_FILE)
    _check_saved(sweep, cfg, resume, directory, saved_path)
    import ray  # after the checks above, so a bad sweep is refused before Ray loads
    from ray import tune

    from raytopk.console import start_ray

    if not ray.is_initialized():
        start_ray(address or cfg.address, verbose, num_cpus=local_ray_cpus(cfg, address))
    trials = _trial_count(sweep)
    print(
        f"raytopk: sweep {sweep.name}: {trials} trial{'s' * (trials != 1)} of {cfg.model} "
        f"on {cfg.dataset} over {', '.join(sweep.search_space)}, {cfg.epochs} epoch{'s' * (cfg.epochs != 1)} each; "
        f"results in {directory}",
        flush=True,
    )

    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=dataclasses.asdict(resolved(cfg)), trials_dir=join(directory, "trials")),
        {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY},
    )
    if resume:
        tuner = tune.Tuner.restore(directory, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(trainable, sweep, cfg, verbose)
        write_json(saved_path, _saved_form(sweep, cfg))
    with _tune_output(verbose):
        grid = tuner.fit()
    _check_finished(sweep, directory)
    rows = trial_rows(grid, cfg)
    best = write_results(directory, rows, sweep, cfg, command)
    return rows, best


def _check_saved(sweep: SweepConfig, cfg: TrainConfig, resume: bool, directory: str, saved_path: str) -> None:
    """Raise ``ConfigError`` unless the sweep's saved form at ``saved_path`` fits: absent for a new sweep, unchanged
    for a resumed one."""
    if resume:
        if not exists(saved_path):
            raise ConfigError(f"--resume: no sweep to resume at {directory}; run without --resume to start it")
        if json.loads(read_text(saved_path)) != _saved_form(sweep, cfg):
            raise ConfigError(
                f"--resume: the sweep file or its base job changed since {directory} started; "
                "restore them or set another name"
            )
    elif exists(saved_path):
        raise ConfigError(
            f"name: a sweep {sweep.name!r} already exists at {directory}; "
            "allowed: --resume to continue it, or another name (--set name=...)"
        )


def _new_tuner(trainable, sweep: SweepConfig, cfg: TrainConfig, verbose: bool):
    """A Tuner that starts the sweep: its search space, searcher, scheduler, storage and progress callback."""
    from ray import tune

    return tune.Tuner(
        trainable,
        param_space=_param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            search_alg=_search_alg(sweep),
            scheduler=_scheduler(sweep, cfg.epochs),
            num_samples=sweep.num_samples,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=resolve(sweep.storage_path),
            verbose=int(verbose),
            callbacks=[_trial_progress(_trial_count(sweep), cfg.epochs)],
        ),
    )


def _check_finished(sweep: SweepConfig, directory: str) -> None:
    """Raise :class:`SweepInterrupted` unless every trial ended: Tune returns normally after Ctrl+C, and the state
    it saved for a restore tells."""
    from ray import tune

    saved = tune.ExperimentAnalysis(directory).trials
    finished = sum(trial.status in ("TERMINATED", "ERROR") for trial in saved)
    if finished < _trial_count(sweep):
        raise SweepInterrupted(
            f"sweep {sweep.name!r} interrupted with {finished} of {_trial_count(sweep)} trials finished; "
            f"its state is saved in {directory}; continue it with --resume"
        )
