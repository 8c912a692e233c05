"""What a run shows on the command line: what runs, a progress bar per epoch, a line per epoch, the result last.

Ray's own output (its workers' lines, its logging, the C++ core's) stays in its
log directory unless ``-v/--verbose`` asks for it (:func:`start_ray`).

Progress reaches the driver without a ``ray.train.report`` per step (each costs
seconds): the driver opens a :class:`Channel` (a small actor) and passes it to the
run; rank 0 posts a step event at most every :data:`SEND_EVERY_S` seconds (fire and
forget, the loss read only then), the controller's callback posts each epoch's line,
and a :class:`Watch` thread on the driver drains the channel into the
:class:`Console` while ``trainer.fit()`` blocks. On a terminal the console draws a
tqdm bar; elsewhere (CI, ``ray job logs``, a file) it writes plain lines: one per
epoch, and one every :data:`PLAIN_EVERY_S` seconds of a long epoch.
"""

import logging
import os
import re
import sys
import threading
import time

from tqdm import tqdm

__all__ = [
    "Console",
    "Channel",
    "StepProgress",
    "Watch",
    "start_ray",
    "ray_log_dir",
    "failure_report",
    "error_line",
    "worker_failures_line",
]

SEND_EVERY_S = 0.5  # rank 0's step events, at most this often
PLAIN_EVERY_S = 30.0  # off a terminal: a progress line this often during a long epoch
POLL_S = 0.25  # how often the driver drains the channel
_LIVE_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
_PLAIN_FORMAT = "{desc}: {unit} {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
_WAIT_FORMAT = "{desc} [{elapsed}]"


def start_ray(address=None, verbose: bool = False, num_cpus=None) -> None:
    """``ray.init`` for a command: quiet unless ``verbose`` (Ray still writes every log to its log directory).

    Quiet means no worker, controller or C++ core lines forwarded to this
    console (``log_to_driver``), and the driver's ``ray`` logger at ERROR
    (no start-up banner, no token notice). ``num_cpus``: what a local Ray offers
    (:func:`raytopk.preflight.local_ray_cpus`); None: the machine's count.
    """
    import ray

    from raytopk.preflight import check_ray_address

    check_ray_address(address)
    ray.init(
        address=address,
        num_cpus=num_cpus,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
    )
    if not verbose:
        _quiet_ray_data()


def _quiet_ray_data() -> None:
    """Ray Data's lines on this driver (its progress bars, the INFO log it prints while a Parquet dataset is read and
    decoded, and the traceback it logs when a task fails, which raytopk reports in one line) off the console; its log
    file in Ray's log directory keeps them all."""
    import ray.data  # sets up the "ray.data" logger: a handler for its log file, and a stream one for the console

    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.CRITICAL)


def ray_log_dir():
    """The directory Ray writes this session's logs to (on the head node of a cluster), or None without Ray."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    return node.get_logs_dir_path() if node is not None else None


def failure_report(err, log_dir=None) -> list:
    """The lines a failed run prints for Ray Train's ``TrainingFailedError``: who failed with what, where the rest is.

    The full text (every worker's traceback) goes to a file in Ray's log
    directory (``log_dir``, else this session's), named on the second line.
    """
    lines = [f"raytopk: error: {error_line(err)}"]
    log_dir = log_dir or ray_log_dir()
    if log_dir and os.path.isdir(log_dir):
        path = os.path.join(log_dir, f"raytopk-failure-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.err")
        with open(path, "w") as f:
            f.write(re.sub(r"\x1b\[[0-9;]*m", "", f"{err}\n"))  # without Ray's colours
        lines.append(f"raytopk: full traceback in {path}; Ray's logs are in {log_dir}")
    return lines


def error_line(err: BaseException) -> str:
    """One line for a failed training run (Ray Train's ``TrainingFailedError``, or a Ray task error wrapping one)."""
    err = _unwrapped(err)
    failures = getattr(err, "worker_failures", None)
    return (
        worker_failures_line(failures)
        if failures
        else f"training failed: {_one_line(getattr(err, 'controller_failure', err))}"
    )


def worker_failures_line(failures: dict) -> str:
    """``{rank: exception}`` as one line: ``worker 0 failed: ValueError: ...``, ranks with the same error together."""
    by_error = {}
    for rank, exc in sorted(failures.items()):
        by_error.setdefault(_one_line(exc), []).append(str(rank))
    return "; ".join(
        f"worker{'s' * (len(ranks) > 1)} {', '.join(ranks)} failed: {text}" for text, ranks in by_error.items()
    )


def _unwrapped(exc: BaseException) -> BaseException:
    """The exception a Ray task raised, when ``exc`` wraps one (``RayTaskError``)."""
    while isinstance(getattr(exc, "cause", None), BaseException):
        exc = exc.cause
    return exc


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (of the exception a Ray task raised, for a ``RayTaskError``)."""
    exc = _unwrapped(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class Console:
    """Prints a run for a person: lines, and one live progress bar on a terminal (plain lines elsewhere).

    Thread-safe: the :class:`Watch` thread and the caller share it.
    """

    def __init__(self, stream=None, plain_every_s: float = PLAIN_EVERY_S):
        self.stream = stream or sys.stdout
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self._plain_every_s = plain_every_s
        self._lock = threading.RLock()
        self._bar = None  # the live bar (a terminal only)
        self._desc = None  # what the progress is of now, e.g. "epoch 2/3"
        self._shown = 0.0  # off a terminal: when the last plain line was written

    def say(self, text: str) -> None:
        """A line above the bar; the bar stays."""
        with self._lock:
            if self._bar is not None:
                self._bar.clear()
            print(text, file=self.stream, flush=True)
            if self._bar is not None:
                self._bar.refresh()

    def done(self, desc: str, text: str) -> None:
        """The line that ends phase ``desc`` (an epoch): its bar goes, the line stays (a later phase's bar stays below
        it)."""
        with self._lock:
            if desc != self._desc and self._bar is not None and self._bar.total is not None:
                self.say(text)
                return
            self.close()
            print(text, file=self.stream, flush=True)

    def wait(self, desc: str) -> None:
        """On a terminal, a clock while nothing else moves (Ray and the workers starting)."""
        with self._lock:
            if self.live and self._bar is None:
                self._desc = desc
                self._bar = tqdm(desc=desc, file=self.stream, leave=False, bar_format=_WAIT_FORMAT, **self._width())

    def update(self, desc: str, n: int, total: int, elapsed: float, postfix: str, unit: str = "step") -> None:
        """Progress ``n`` of ``total`` ``unit`` in phase ``desc`` (a new phase starts a new bar), ``elapsed`` seconds
        into it."""
        with self._lock:
            if desc != self._desc or (self._bar is not None and n < self._bar.n):  # a new phase, or a restarted one
                self.close()
                self._desc, self._shown = desc, time.monotonic()
                if self.live:
                    self._bar = tqdm(
                        total=total,
                        desc=desc,
                        unit=unit,
                        file=self.stream,
                        leave=False,
                        bar_format=_LIVE_FORMAT,
                        **self._width(),
                    )
            if self._bar is not None:
                self._bar.set_postfix_str(postfix, refresh=False)
                self._bar.update(n - self._bar.n)
            elif time.monotonic() - self._shown >= self._plain_every_s:
                self._shown = time.monotonic()
                line = tqdm.format_meter(
                    n, total, elapsed, prefix=desc, unit=unit, postfix=postfix, bar_format=_PLAIN_FORMAT
                )
                print(line, file=self.stream, flush=True)

    def _width(self) -> dict:
        """tqdm's size: the terminal's, followed as it is resized; 80 x 24 where the terminal reports a size of 0 (a
        pseudo-terminal nobody sized, as ``script`` makes), where tqdm would print nothing at all."""
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
        return {"dynamic_ncols": True} if columns else {"ncols": 80, "nrows": 24}

    def tick(self) -> None:
        """Redraw the bar (its clock and time left move between updates)."""
        with self._lock:
            if self._bar is not None:
                self._bar.refresh()

    def close(self) -> None:
        """Remove the bar, if any."""
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self._desc = None


class _Mailbox:
    """The channel's actor: events, kept in order until the driver takes them."""

    def __init__(self):
        self._events = []

    def post(self, event) -> None:
        self._events.append(event)

    def take(self) -> list:
        events, self._events = self._events, []
        return events


class Channel:
    """A run's events for the driver's console: ``(kind, payload)`` with kind ``step``, ``say``, ``epoch`` or
    ``failure``.

    The payload is a line of text, a step's numbers (``step``) or an epoch's
    ``{"desc": "epoch 2/3", "text": line}``.

    Pickled into the workers and the controller with the run. Without a
    mailbox (a trainer built without a console) the text events are printed
    where they happen, as Ray's own output.
    """

    def __init__(self, mailbox=None):
        self._mailbox = mailbox

    @classmethod
    def open(cls) -> "Channel":
        """A channel with its own actor (no CPU) on the driver's node, so that losing a worker's node leaves it
        standing."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        return cls(ray.remote(num_cpus=0, scheduling_strategy=here)(_Mailbox).remote())

    def post(self, kind: str, payload, wait: bool = False) -> None:
        """Send an event; fire and forget unless ``wait`` (the call then returns once it is queued)."""
        if self._mailbox is None:
            if kind != "step":
                print(payload["text"] if kind == "epoch" else payload, flush=True)
            return
        ref = self._mailbox.post.remote((kind, payload))
        if wait:
            import ray

            ray.get(ref)

    def take(self) -> list:
        """Every event posted since the last take, oldest first."""
        import ray

        return ray.get(self._mailbox.take.remote())

    def close(self) -> None:
        """End the actor (a Ray already shut down has ended it)."""
        import ray

        if ray.is_initialized():
            ray.kill(self._mailbox)


class StepProgress:
    """A worker's side of the progress: rank 0 posts its step, loss, speed and wire bytes every :data:`SEND_EVERY_S`."""

    def __init__(self, channel: Channel, rank: int, epochs: int, steps: int, samples_per_step: int):
        self._channel = channel if rank == 0 else None
        self._epochs, self._steps, self._samples_per_step = epochs, steps, samples_per_step
        self._next = 0.0

    def say(self, text: str) -> None:
        """A line for the user (rank 0's; the others stay quiet)."""
        if self._channel is not None:
            self._channel.post("say", text)

    def step(self, epoch: int, step: int, started: float, loss, wire_bytes) -> None:
        """After micro-batch ``step`` of ``epoch`` (started at ``perf_counter()`` time ``started``): post, if it is
        time.

        ``loss`` (a tensor) is read, and ``wire_bytes()`` (this worker's bytes
        so far) called, only when posting: no device sync on the other steps.
        """
        now = time.perf_counter()
        if self._channel is None or (now < self._next and step < self._steps):
            return
        self._next = now + SEND_EVERY_S
        elapsed = now - started
        self._channel.post(
            "step",
            {
                "epoch": epoch,
                "epochs": self._epochs,
                "step": step,
                "steps": self._steps,
                "elapsed": elapsed,
                "loss": float(loss),
                "samples_per_s": step * self._samples_per_step / max(elapsed, 1e-9),
                "wire_mb": wire_bytes() / 1e6,
            },
        )


class Watch:
    """While its block runs (``trainer.fit()``), a thread drains ``channel`` into ``console``.

    A worker failure that Ray Train recovers from is shown once training goes
    on; if the run fails instead, the caller reports the error.
    """

    def __init__(self, channel: Channel, console: Console, waiting: str):
        self._channel, self._console, self._waiting = channel, console, waiting
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raytopk-progress", daemon=True)
        self._failure = None  # a failure not shown yet: shown when training goes on after it

    def __enter__(self) -> "Watch":
        self._console.wait(self._waiting)
        self._thread.start()
        return self

    def __exit__(self, kind, err, tb) -> None:
        self._stop.set()
        self._thread.join()
        self._console.close()

    def _run(self) -> None:
        try:
            while not self._stop.wait(POLL_S):
                self._drain()
            self._drain()  # what came while fit() returned
        except Exception:  # Ray going down (Ctrl+C): the caller reports
            pass

    def _drain(self) -> None:
        events = self._channel.take()
        for kind, payload in events:
            self._show(kind, payload)
        if not events:
            self._console.tick()

    def _show(self, kind: str, payload) -> None:
        if kind == "failure":
            self._failure = payload
            return
        if self._failure is not None:
            self._console.say(f"raytopk: {self._failure}; Ray Train restarts the workers from the last checkpoint")
            self._failure = None
        if kind == "step":
            p = payload
            postfix = f"loss {p['loss']:.4f}, {p['samples_per_s']:.0f} samples/s, wire {p['wire_mb']:.2f} MB/worker"
            self._console.update(f"epoch {p['epoch']}/{p['epochs']}", p["step"], p["steps"], p["elapsed"], postfix)
        elif kind == "epoch":
            self._console.done(payload["desc"], payload["text"])
        else:
            self._console.say(payload)
