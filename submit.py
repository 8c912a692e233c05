"""Submit a raytopk job or sweep to a Ray cluster with the Jobs SDK, stream its logs, exit with its outcome.

The logs are the job's quiet output (what runs, a line per epoch, the result
last); ``--verbose`` adds Ray's own.

    python submit.py jobs/smoke.yaml                              # a training job
    python submit.py tune_configs/mnist5k_ratio_lr.yaml           # a sweep
    python submit.py jobs/cifar10_resnet18.yaml --set epochs=5 --address http://127.0.0.1:8265 --no-wait

The project directory is the job's working directory (without ``.venv``, ``.git``,
results and secrets), so the cluster runs this exact checkout. The config is
checked here first: a bad one is refused before anything is uploaded.

The cluster is ``--address``, else ``RAY_ADDRESS``, else ``http://127.0.0.1:8265``.
Ray 2.60 clusters ask for a token: when ``RAY_AUTH_MODE`` is unset and a token is
available (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``),
it is sent. The token is never printed.

Exit status: 0 when the job SUCCEEDED (or was submitted, with ``--no-wait``);
1 when it ended otherwise; 2 for a bad config or a cluster that cannot be
reached or refuses the token; 130 when interrupted (the job keeps running).
"""

import asyncio
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded: environments, history, results, and anything that looks like a secret.
EXCLUDES = [
    ".venv",
    ".git",
    "runs",
    "benchmarks/results",
    "__pycache__",
    ".pytest_cache",
    "*.egg-info",
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "id_rsa*",
    "*.p12",
    ".aws",
    ".ssh",
    "auth_token",
    "*.pt",
]
LAST_LINES = 20  # of the job's log, shown when it did not succeed


class SubmitError(Exception):
    """A problem the user fixes (config, address, token); the message is one line."""


def entrypoint(config: str, sets: list, verbose: bool = False) -> str:
    """The job's command line: ``raytopk tune`` for a sweep YAML (it has a ``search_space``), else ``raytopk train``.

    It prints what the command prints off a terminal: plain lines, Ray's own output only with ``verbose``.

    The config is checked here first, with the same one-line message the cluster would give.
    """
    from raytopk.cli import parse_sets
    from raytopk.config import load_config, read_yaml_mapping
    from raytopk.tune import load_sweep

    relative = os.path.relpath(os.path.abspath(config), ROOT)
    if relative.startswith(os.pardir):
        raise SubmitError(
            f"{config}: outside the project directory {ROOT}; allowed: a config inside it (it is uploaded with it)"
        )
    overrides = parse_sets(sets)
    if "search_space" in read_yaml_mapping(config):
        load_sweep(config, overrides)
        command = ["python", "-m", "raytopk", "tune", relative]
    else:
        load_config(config, overrides)
        command = ["python", "-m", "raytopk", "train", "--config", relative]
    for pair in sets:
        command += ["--set", pair]
    if verbose:
        command.append("--verbose")
    return " ".join(shlex.quote(part) for part in command)


def _use_token_if_available() -> None:
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        os.environ["RAY_AUTH_MODE"] = "token"


def connect(address: str):
    """A JobSubmissionClient for ``address``, or a SubmitError saying why there is none."""
    _use_token_if_available()
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
        client.list_jobs()  # the first authenticated request
    except AuthenticationError:
        raise SubmitError(
            f"the Ray cluster at {address} refused the token; set the cluster's token in RAY_AUTH_TOKEN or "
            f"RAY_AUTH_TOKEN_PATH (on the head: ray get-auth-token) and RAY_AUTH_MODE=token"
        ) from None
    except (ConnectionError, OSError) as err:
        raise SubmitError(
            f"cannot reach a Ray cluster at {address} ({type(err).__name__}); start one with "
            f"`ray start --head`, or give --address or RAY_ADDRESS"
        ) from None
    except RuntimeError as err:  # the SDK reports refused connections and HTTP errors this way
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "auth" in text.lower() or "401" in text or "403" in text:
            raise SubmitError(f"the Ray cluster at {address} refused the token ({text})") from None
        raise SubmitError(f"cannot reach a Ray cluster at {address} ({text})") from None
    return client


async def _stream(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def main(argv=None) -> int:
    from raytopk.cli import ArgumentParser, flag_type

    parser = ArgumentParser(
        description="Submit a raytopk job (jobs/*.yaml) or sweep (tune_configs/*.yaml) to a Ray cluster."
    )
    parser.add_argument("config", help="jobs/X.yaml or tune_configs/X.yaml, inside this project")
    parser.add_argument("--address", help=f"the cluster's dashboard address (else RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key; repeatable"
    )
    parser.add_argument("--no-wait", action="store_true", help="submit and exit without following the logs")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="the job shows Ray's own output too (raytopk --verbose)"
    )
    parser.add_argument(
        "--entrypoint-num-cpus",
        type=flag_type(float, "a number in [0, inf)"),
        default=0,
        metavar="N",
        help="CPUs the driver holds for as long as the job runs (default 0, as in Ray: it runs on the head and "
        "leaves every CPU to training; jobs beyond what the cluster can train at once queue for workers)",
    )
    parser.add_argument("--submission-id", help="the job's id (default: chosen by Ray)")
    args = parser.parse_args(argv)
    address = args.address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if args.entrypoint_num_cpus < 0:
        return _fail(f"--entrypoint-num-cpus: got {args.entrypoint_num_cpus:g}; allowed: a number in [0, inf)")

    from raytopk.config import ConfigError

    try:
        command = entrypoint(args.config, args.set, args.verbose)
        client = connect(address)
        job_id = client.submit_job(
            entrypoint=command,
            submission_id=args.submission_id,
            runtime_env={"working_dir": ROOT, "excludes": EXCLUDES},
            entrypoint_num_cpus=args.entrypoint_num_cpus,
        )
    except (ConfigError, SubmitError) as err:
        return _fail(str(err))
    print(f"submitted {job_id} to {address}: {command}", flush=True)
    if args.no_wait:
        print(f"follow it with: ray job logs --follow {job_id} --address {address}")
        return 0
    try:
        asyncio.run(_stream(client, job_id))
    except KeyboardInterrupt:
        print(
            f"\nsubmit.py: stopped following; job {job_id} keeps running (ray job stop {job_id} --address {address})",
            file=sys.stderr,
        )
        return 130
    status = str(client.get_job_status(job_id).value)
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED")
        return 0
    last = client.get_job_logs(job_id).rstrip().splitlines()[-LAST_LINES:]
    print(f"submit.py: job {job_id} ended {status}; its last log lines:", file=sys.stderr)
    print("\n".join("  " + line for line in last), file=sys.stderr)
    return 1


def _fail(message: str) -> int:
    print(f"submit.py: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
