"""Run a benchmark inside a private network namespace whose loopback it can shape.

Why: gloo talks TCP over loopback, which is unlimited and shared with the rest
of the machine. In a namespace of its own, loopback carries only the
benchmark's traffic (so ``tx_bytes`` counts exactly its bytes), and ``tc``
can hold it to a real rate::

    tc qdisc replace dev lo root tbf rate 1gbit burst 256kb latency 50ms

Every worker shares that one loopback, so the rate caps the sum of their
traffic: a harsher link than one NIC per node, never a kinder one.

Use: ``main()`` calls :func:`reexec_in_namespace` first; outside a namespace it
creates one (root needed), reruns the same command inside it, deletes the
namespace afterwards, even on failure, and exits with the child's status;
inside, it returns and the benchmark proceeds, calling :func:`shape` as it goes.
"""

import os
import signal
import subprocess
import sys

TX_BYTES = "/sys/class/net/lo/statistics/tx_bytes"
_INSIDE = "RAYTOPK_BENCH_NETNS"


def reexec_in_namespace(name: str) -> None:
    """Return when already inside the namespace; otherwise run this command in a new one and exit."""
    if os.environ.get(_INSIDE):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        return
    if os.geteuid() != 0:
        sys.exit(f"{os.path.basename(sys.argv[0])} creates a network namespace: run it as root")
    netns = f"raytopk-{name}-{os.getpid()}"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` deletes the namespace
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"], check=True)
        child = subprocess.run(["ip", "netns", "exec", netns, sys.executable, *sys.argv], env=dict(os.environ, **{_INSIDE: netns}))
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=True)
    sys.exit(child.returncode)


def shape(rate) -> None:
    """Hold this namespace's loopback to ``rate`` (e.g. ``"1gbit"``), or lift the limit with ``None``."""
    if rate is None:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False, capture_output=True)
        return
    subprocess.run(["tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms"], check=True)


def read_tx_bytes() -> int:
    """Bytes this namespace's loopback has sent: every packet of every worker, once."""
    with open(TX_BYTES) as f:
        return int(f.read())
