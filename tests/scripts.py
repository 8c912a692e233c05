"""Run an example as the README does (or a script a test wrote), and read the JSON lines it prints."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", "2"]


def json_lines(*command, timeout: float = 300, cwd=ROOT) -> list:
    """Run ``command``; it must exit 0. Every line of its stdout that is a JSON object, parsed."""
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def example(script: str, *args, torchrun: bool = False, timeout: float = 300) -> list:
    """``python examples/SCRIPT ARGS``, or with ``torchrun`` on 2 processes: its JSON lines."""
    return json_lines(*(TORCHRUN if torchrun else [sys.executable]), ROOT / "examples" / script, *args, timeout=timeout)
