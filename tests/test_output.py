"""What ``raytopk`` prints: the run, not Ray's internals; a bar on a terminal, plain lines elsewhere; the result last.

The commands run for real (a local Ray each), under a pseudo-terminal or with
their output on a pipe, as users and CI see them.
"""

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from io import StringIO
from pathlib import Path

import pytest

from raytopk.bench import format_table, plot_path, write_plot
from raytopk.console import Channel, Console, failure_report, worker_failures_line

from cluster import kill_tree

ROOT = Path(__file__).resolve().parent.parent
# Lines of Ray's own that a quiet run must not show.
RAY_MARKERS = (
    "TrainingReport(",
    "core_worker",
    "Checkpoint successfully created",
    "Started training worker group",
    "pid=",
)
RESULT = re.compile(r"^test accuracy \d+\.\d\d%  wire .* MB/worker .*  wall \d+ s$")


def _command(tmp_path, *flags):
    return [
        sys.executable,
        "-m",
        "raytopk",
        "train",
        "--config",
        "jobs/mnist5k_topk.yaml",
        "--checkpoint-dir",
        str(tmp_path),
        "--set",
        "max_train_batches=20",
        *flags,
    ]


def _env():
    # The checkout under test first: Ray's workers inherit PYTHONPATH.
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def _on_a_pipe(command, timeout=240):
    """Run ``command`` with stdout and stderr on one pipe; ``(returncode, text)``."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        out, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
            process.wait()
    return process.returncode, out


def _on_a_terminal(command, timeout=240):
    """Run ``command`` on a pseudo-terminal (160 columns) until it exits; ``(returncode, raw output)``."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen(
        command, stdin=child, stdout=child, stderr=child, env=_env(), cwd=ROOT, start_new_session=True
    )
    os.close(child)
    chunks, deadline = [], time.time() + timeout
    try:
        while time.time() < deadline:
            if select.select([main], [], [], 0.5)[0]:
                try:
                    data = os.read(main, 65536)
                except OSError:  # every writer closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:  # exited, and nothing more to read
                break
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
        process.wait()
        os.close(main)
    return process.returncode, b"".join(chunks).decode(errors="replace")


def _screen(raw: str) -> list:
    """The lines a terminal shows at the end: carriage returns overwrite, escape sequences dropped."""
    lines = []
    for line in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw).replace("\r\n", "\n").split("\n"):
        shown = ""
        for part in line.split("\r"):
            shown = part + shown[len(part) :]
        lines.append(shown.rstrip())
    return [line for line in lines if line]


def _check_quiet(text: str, lines: list) -> None:
    for marker in RAY_MARKERS:
        assert marker not in text, f"{marker!r} shown:\n{text[-3000:]}"
    assert lines[0].startswith(
        "raytopk: training simple_cnn on mnist5k, 2 workers, top-k 0.01 (exchange auto); checkpoints in "
    )
    assert [line.split("  ")[0] for line in lines if line.startswith("epoch ")] == [
        "epoch 1/3",
        "epoch 2/3",
        "epoch 3/3",
    ], lines
    assert RESULT.match(lines[-1]), lines[-1]


@pytest.mark.integrations  # a whole run under a pseudo-terminal; make test keeps the pipe's run
def test_a_run_on_a_terminal_draws_a_bar_and_ends_with_the_result(tmp_path):
    returncode, raw = _on_a_terminal(_command(tmp_path))
    assert returncode == 0, raw[-3000:]
    _check_quiet(raw, _screen(raw))
    # The live bar (tqdm's), with its speed, loss and wire bytes, erased before each epoch's line.
    assert re.search(
        r"epoch 1/3 +\d+%\|.*\| \d+/20 \[.*loss \d\.\d{4}, \d+ samples/s, wire \d+\.\d\d MB/worker\]", raw
    ), raw[-3000:]
    assert not any("%|" in line for line in _screen(raw)), _screen(raw)


@pytest.mark.integrations  # a whole run, as CI or ray job logs shows it
def test_a_run_on_a_pipe_writes_plain_lines_only(tmp_path):
    returncode, text = _on_a_pipe(_command(tmp_path))
    assert returncode == 0, text[-3000:]
    lines = [line for line in text.splitlines() if line.strip()]
    _check_quiet(text, lines)
    assert "\r" not in text and len(text.splitlines()) <= 15, text


@pytest.mark.parametrize("verbose", [False, pytest.param(True, marks=pytest.mark.integrations)])
def test_a_failing_worker_is_one_line_with_where_the_traceback_is(tmp_path, verbose):
    """A real failure on every worker: sharded slots for 1e12 times each worker's share cannot be allocated."""
    command = _command(
        tmp_path,
        "--epochs",
        "1",
        "--exchange",
        "sharded",
        "--capacity-factor",
        "1e12",
        "--set",
        "max_failures=0",
        *(["--verbose"] if verbose else []),
    )
    returncode, text = _on_a_pipe(command)
    assert returncode == 1, text[-3000:]
    error = [line for line in text.splitlines() if line.startswith("raytopk: error: ")]
    assert (
        error == [error[0]]
        and "workers 0, 1 failed: RuntimeError: " in error[0]
        and "can't allocate memory" in error[0]
    ), text[-3000:]
    where = re.search(r"^raytopk: full traceback in (\S+); Ray's logs are in (\S+)$", text, re.MULTILINE)
    assert where and Path(where[1]).parent == Path(where[2]) and Path(where[2]).is_dir(), text[-3000:]
    assert "Traceback (most recent call last)" in Path(where[1]).read_text()
    if verbose:  # Ray's own lines are back, the worker's traceback among them
        assert "(RayTrainWorker pid=" in text and "Setting up process group" in text, text[-3000:]
    else:
        assert "Traceback" not in text and not any(marker in text for marker in RAY_MARKERS), text[-3000:]
        assert len(text.splitlines()) == 3, text


def test_plain_progress_lines_on_long_epochs_and_a_bar_never():
    console = Console(StringIO(), plain_every_s=0.0)
    assert not console.live
    console.wait("starting")
    for step in (1, 5, 10):
        console.update(
            "epoch 1/2", step, 10, elapsed=step * 2.0, postfix="loss 0.5000, 80 samples/s, wire 1.00 MB/worker"
        )
    console.done("epoch 1/2", "epoch 1/2  loss 0.5")
    lines = console.stream.getvalue().splitlines()
    assert lines == [
        "epoch 1/2: step 1/10 [00:02<00:18, loss 0.5000, 80 samples/s, wire 1.00 MB/worker]",
        "epoch 1/2: step 5/10 [00:10<00:10, loss 0.5000, 80 samples/s, wire 1.00 MB/worker]",
        "epoch 1/2: step 10/10 [00:20<00:00, loss 0.5000, 80 samples/s, wire 1.00 MB/worker]",
        "epoch 1/2  loss 0.5",
    ]
    quiet = Console(StringIO())  # every 30 s by default: a short epoch shows only its line
    quiet.update("epoch 1/2", 5, 10, elapsed=1.0, postfix="")
    quiet.done("epoch 1/2", "epoch 1/2  loss 0.5")
    assert quiet.stream.getvalue() == "epoch 1/2  loss 0.5\n"


@pytest.mark.parametrize("columns", [0, 60])
def test_the_bar_shows_on_a_terminal_of_any_reported_size(columns):
    """A pseudo-terminal nobody sized reports 0 x 0, where tqdm's own sizing prints nothing at all."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", columns and 20, columns, 0, 0))
    with os.fdopen(child, "w") as terminal:
        console = Console(terminal)
        assert console.live
        console.wait("starting Ray Train's workers")
        console.update("epoch 1/2", 5, 10, elapsed=1.0, postfix="loss 0.5000")
        console.tick()  # drawn now, not at tqdm's next interval
        console.close()
    raw = b""
    while select.select([main], [], [], 0.5)[0]:
        try:
            data = os.read(main, 65536)
        except OSError:  # the terminal's only writer closed it
            break
        if not data:
            break
        raw += data
    os.close(main)
    text = raw.decode(errors="replace")
    assert "starting Ray Train's workers [00:00]" in text and "epoch 1/2  50%" in text and "5/10" in text, text
    assert max(len(part) for part in re.split(r"[\r\n]", text)) <= (columns or 80), text


def test_a_channel_without_a_console_prints_its_lines(capsys):
    channel = Channel()
    channel.post("step", {"step": 1})
    channel.post("say", "a note")
    channel.post("epoch", {"desc": "epoch 1/1", "text": "epoch 1/1  loss 0.1"})
    assert capsys.readouterr().out == "a note\nepoch 1/1  loss 0.1\n"


def test_failures_read_as_type_and_message(tmp_path):
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    failures = {1: ValueError("bad value\nmore"), 0: ValueError("bad value\nmore"), 2: KeyError("x")}
    assert (
        worker_failures_line(failures) == "workers 0, 1 failed: ValueError: bad value; worker 2 failed: KeyError: 'x'"
    )
    lines = failure_report(WorkerGroupError("the whole text", failures), log_dir=str(tmp_path))
    assert lines[0] == "raytopk: error: workers 0, 1 failed: ValueError: bad value; worker 2 failed: KeyError: 'x'"
    path = re.match(r"raytopk: full traceback in (\S+); Ray's logs are in (\S+)$", lines[1])[1]
    assert "the whole text" in Path(path).read_text()
    wrapped = RayTaskError("setup", "Traceback ...", ValueError("no GPUs found!"))
    assert failure_report(ControllerError(wrapped), log_dir=str(tmp_path / "absent")) == [
        "raytopk: error: training failed: ValueError: no GPUs found!"
    ]


def test_bench_plot_is_written_whole_beside_the_output(tmp_path):
    def row(compress, accuracies, mb):
        history = [{"epoch": i + 1, "test_accuracy": a} for i, a in enumerate(accuracies)]
        return {
            "compress": compress,
            "ratio": 0.01 if compress else 1.0,
            "history": history,
            "wire_mb_per_worker": mb,
            "model": "simple_cnn",
            "dataset": "mnist5k",
            "workers": 2,
            "epochs": len(accuracies),
            "test_accuracy": accuracies[-1],
            "network_bytes": None,
            "nodes": 1,
            "reduction": 300.0 / mb,
            "wall_s": 41.6 if compress else None,  # None: a run finished before summaries were kept
        }

    dense, topk = row(False, [0.9, 0.95, 0.97], 300.0), row(True, [0.88, 0.94, 0.96], 9.6)
    assert format_table([dense, topk]).splitlines()[1:] == [
        "dense             97.00%          300.00    one node       1.0x       -",
        "top-k 0.01        96.00%            9.60    one node      31.2x      42",
    ]
    path = plot_path(str(tmp_path / "demo.json"))
    assert path == str(tmp_path / "demo.png")
    write_plot([dense, topk], path)
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(tmp_path) == ["demo.png"]
