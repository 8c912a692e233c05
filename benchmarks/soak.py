"""A soak of a local Ray head: many short jobs through ``submit.py``, a few at a time, some failing and some stopped on
purpose.

What is run: a fresh ``ray start --head`` on loopback (2 CPUs, token auth, as the tests
start it). ``--jobs`` jobs of ``jobs/smoke.yaml`` (1 epoch, 3 batches, 2 workers of half a CPU)
go through ``submit.py``, ``--parallel`` at a time, each submit following its job to the end.
Every third job of a kind is made to fail (``dataset: mnist`` with an empty ``data_dir`` and
``max_failures: 0``), and as many are long runs stopped with ``ray job stop`` once they have
finished an epoch.

What is checked and measured:

- every job ends as intended (SUCCEEDED, FAILED or STOPPED), and ``submit.py`` exits 0 or 1 to match;
- every successful job wrote its ``--output`` summary, and no failed or stopped one wrote any;
- the resident memory of the head's GCS and raylet, sampled every second: at the start, after the
  first ``--parallel`` * 2 jobs (Ray's caches are warm by then), at the end, and the growth between;
- the processes that carry this head's token path in their environment (every process the head,
  its jobs and their workers started): how many while idle before and after, and how many are left
  30 seconds after the head is stopped (none may be).

The CPU, not a link, is the bottleneck: everything runs on one machine.

Reproduce (from the repository root)::

    python benchmarks/soak.py

Results go to ``benchmarks/results/soak.json``.
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from cluster import RAY, job_logs, list_jobs, local_head  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = "python benchmarks/soak.py"
EXPECTED = {"ok": ("SUCCEEDED", 0), "fail": ("FAILED", 1), "stop": ("STOPPED", 1)}
SHORT = ["--set", "epochs=1", "--set", "max_train_batches=3"]


def kinds(jobs: int) -> list:
    """Which job fails or is stopped: every third is one of them, alternately."""
    return ["fail" if i % 6 == 2 else "stop" if i % 6 == 5 else "ok" for i in range(jobs)]


def head_processes(token_path: str) -> list:
    """Pids of the processes whose environment names this head's token file: the head's, its jobs' and their
    workers'."""
    marker = f"RAY_AUTH_TOKEN_PATH={token_path}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:  # it ended meanwhile
                pass
    return found


def _wait_until_gone(token_path: str, timeout: float = 30) -> list:
    """The head's processes still alive ``timeout`` seconds after it was stopped (killed ones take a moment to go)."""
    deadline = time.time() + timeout
    while (left := head_processes(token_path)) and time.time() < deadline:
        time.sleep(1)
    return left


def _rss_mb(pids: dict) -> dict:
    """Resident memory, in MB, of each named process (``{"gcs": pid, "raylet": pid}``)."""
    sizes = {}
    for name, pid in pids.items():
        with open(f"/proc/{pid}/status") as f:
            (kb,) = [int(line.split()[1]) for line in f if line.startswith("VmRSS:")]
        sizes[name] = kb / 1024
    return sizes


def _head_daemons(token_path: str) -> dict:
    """The pids of this head's GCS and raylet."""
    daemons = {}
    for pid in head_processes(token_path):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            program = os.path.basename(f.read().split(b"\0")[0]).decode()
        if program in ("gcs_server", "raylet"):
            daemons["gcs" if program == "gcs_server" else "raylet"] = pid
    if set(daemons) != {"gcs", "raylet"}:
        raise RuntimeError(f"expected this head's gcs_server and raylet, found {daemons}")
    return daemons


class MemorySampler(threading.Thread):
    """Samples the head daemons' RSS every ``interval`` seconds, each sample tagged with how many jobs had ended."""

    def __init__(self, daemons: dict, interval: float = 1.0):
        super().__init__(daemon=True)
        self.daemons, self.interval = daemons, interval
        self.samples, self.ended = [], 0
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            self.samples.append({"jobs_ended": self.ended, **_rss_mb(self.daemons)})
            self.halt.wait(self.interval)


def _run_job(address, env, storage, index, kind) -> dict:
    job_id = f"soak{index}-{os.getpid()}"
    output = os.path.join(storage, f"{job_id}.json")
    flags = ["--set", f"name={job_id}", "--set", f"checkpoint_dir={storage}", "--set", f"output={output}"]
    if kind == "fail":
        flags += SHORT + [
            "--set",
            "dataset=mnist",
            "--set",
            f"data_dir={os.path.join(storage, 'empty')}",
            "--set",
            "max_failures=0",
        ]
    elif kind == "stop":
        flags += ["--set", "epochs=50", "--set", "max_train_batches=3"]
    else:
        flags += SHORT
    start = time.time()
    submit = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "submit.py"),
            "jobs/smoke.yaml",
            "--address",
            address,
            "--submission-id",
            job_id,
            *flags,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if kind == "stop":
        threading.Thread(target=_stop_after_an_epoch, args=(address, env, job_id), daemon=True).start()
    log = submit.communicate(timeout=900)[0]
    status = {job["submission_id"]: job["status"] for job in list_jobs(address, env) if job.get("submission_id")}.get(
        job_id
    )
    return {
        "job": job_id,
        "kind": kind,
        "status": status,
        "exit": submit.returncode,
        "seconds": round(time.time() - start, 1),
        "summary": _summary_epochs(output),
        "log_tail": log[-1500:],
    }


def _stop_after_an_epoch(address, env, job_id, timeout=600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if "epoch 1/" in job_logs(address, env, job_id):
                break
        except OSError:  # not yet known to the head
            pass
        time.sleep(1)
    subprocess.run([RAY, "job", "stop", "--address", address, job_id], env=env, capture_output=True, timeout=120)


def _summary_epochs(path):
    """The epochs an ``--output`` summary records, or None when there is no summary."""
    try:
        with open(path) as f:
            return json.load(f)["epochs"]
    except FileNotFoundError:
        return None


def soak(jobs: int = 30, parallel: int = 3) -> dict:
    """Run the soak on a fresh local head and return its record (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="soak") as storage, local_head(num_cpus=2) as (address, env):
        token_path = env["RAY_AUTH_TOKEN_PATH"]
        time.sleep(5)  # let the head's own start-up settle
        idle_before = len(head_processes(token_path))
        sampler = MemorySampler(_head_daemons(token_path))
        sampler.start()
        start = time.time()
        records = []
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            pending = [pool.submit(_run_job, address, env, storage, i, kind) for i, kind in enumerate(kinds(jobs))]
            for done in concurrent.futures.as_completed(pending):
                records.append(done.result())
                sampler.ended = len(records)
        wall = time.time() - start
        time.sleep(10)  # the last jobs' workers go idle and the head settles
        sampler.halt.set()
        sampler.join()
        idle_after = len(head_processes(token_path))
    left = _wait_until_gone(token_path)
    records.sort(key=lambda record: int(record["job"][4:].split("-")[0]))
    return {
        "command": COMMAND,
        "date": time.strftime("%Y-%m-%d"),
        "head": "ray start --head on loopback, 2 CPUs, token auth",
        "jobs": jobs,
        "parallel": parallel,
        "wall_s": round(wall, 1),
        "kinds": {kind: kinds(jobs).count(kind) for kind in EXPECTED},
        "all_as_expected": all(_as_expected(record) for record in records),
        "memory_mb": _memory(sampler.samples, warm=2 * parallel),
        "processes": {"idle_before": idle_before, "idle_after": idle_after, "left_after_stop": len(left)},
        "runs": [{k: v for k, v in record.items() if k != "log_tail"} for record in records],
        "unexpected": [record for record in records if not _as_expected(record)],
    }


def _as_expected(record) -> bool:
    status, code = EXPECTED[record["kind"]]
    summary = 1 if record["kind"] == "ok" else None
    return (record["status"], record["exit"], record["summary"]) == (status, code, summary)


def _memory(samples: list, warm: int) -> dict:
    """Per daemon and summed: the RSS at the start, once ``warm`` jobs had ended, at the end, its peak, and the growth
    from warm to the end (the median of the samples at each point, so one spike does not decide it)."""
    last = max(sample["jobs_ended"] for sample in samples)
    report = {}
    for name in ("gcs", "raylet", "both"):

        def value(sample):
            return sample["gcs"] + sample["raylet"] if name == "both" else sample[name]

        def at(ended):
            return round(statistics.median(value(s) for s in samples if s["jobs_ended"] == ended), 1)

        warm_point = min(warm, last)
        report[name] = {
            "start": round(value(samples[0]), 1),
            "warm": at(warm_point),
            "end": at(last),
            "peak": round(max(value(s) for s in samples), 1),
        }
        report[name]["growth_after_warm"] = round(report[name]["end"] - report[name]["warm"], 1)
    report["growth_per_job_after_warm_kb"] = round(1024 * report["both"]["growth_after_warm"] / max(1, last - warm), 1)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--parallel", type=int, default=3)
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "soak.json"))
    args = parser.parse_args(argv)
    from raytopk.storage import write_json

    result = soak(args.jobs, args.parallel)
    write_json(args.output, result)
    memory = result["memory_mb"]["both"]
    print(
        f"{args.jobs} jobs, {args.parallel} at a time, {result['wall_s']:.0f} s; all as expected: "
        f"{result['all_as_expected']}; "
        f"GCS + raylet RSS {memory['start']} -> {memory['warm']} (warm) -> {memory['end']} MB (growth after warm-up "
        f"{memory['growth_after_warm']} MB); processes idle {result['processes']['idle_before']} -> "
        f"{result['processes']['idle_after']}, left after stop {result['processes']['left_after_stop']}"
    )
    return 0 if result["all_as_expected"] and not result["processes"]["left_after_stop"] else 1


if __name__ == "__main__":
    sys.exit(main())
