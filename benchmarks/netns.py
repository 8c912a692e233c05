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
        child = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, *sys.argv], env=dict(os.environ, **{_INSIDE: netns})
        )
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=True)
    sys.exit(child.returncode)


def shape(rate) -> None:
    """Hold this namespace's loopback to ``rate`` (e.g. ``"1gbit"``), or lift the limit with ``None``."""
    if rate is None:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False, capture_output=True)
        return
    subprocess.run(
        ["tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms"],
        check=True,
    )


def read_tx_bytes() -> int:
    """Bytes this namespace's loopback has sent: every packet of every worker, once."""
    with open(TX_BYTES) as f:
        return int(f.read())


class NodeNetwork:
    """``nodes`` network namespaces, each a "node" whose card is shaped to ``rate``, joined by a bridge.

    Each node namespace has a veth ``eth0`` (address ``10.77.0.<i+1>``) whose
    other end sits on a bridge in a switch namespace; ``tc ... tbf`` on
    ``eth0`` holds what leaves the node to ``rate``, with a small ``burst`` (the
    bytes it may send at once at full speed), so that even one exchange of a
    few hundred kilobytes waits for the link. Ranks on one node talk
    over its loopback (a node's own address routes through ``lo``), which is
    fast and unshaped. MTU 9000 on the cards, as cloud networks commonly use.
    Every namespace is deleted on exit, even on failure; nothing outside them
    is addressed. Root needed.
    """

    SUBNET = "10.77.0"

    def __init__(self, name: str, nodes: int, rate: str, burst: str = "32kb"):
        self.prefix, self.nodes, self.rate, self.burst = f"rtk-{name}-{os.getpid()}", nodes, rate, burst
        self.made = []

    def namespace(self, node: int) -> str:
        return f"{self.prefix}-n{node}"

    def address(self, node: int) -> str:
        return f"{self.SUBNET}.{node + 1}"

    def exec_prefix(self, node: int) -> list:
        return ["ip", "netns", "exec", self.namespace(node)]

    def _ip(self, namespace, *args) -> None:
        subprocess.run(["ip", "netns", "exec", namespace, *args], check=True)

    def __enter__(self):
        if os.geteuid() != 0:
            sys.exit("this benchmark creates network namespaces: run it as root")
        switch = f"{self.prefix}-sw"
        try:
            for namespace in [switch] + [self.namespace(i) for i in range(self.nodes)]:
                subprocess.run(["ip", "netns", "add", namespace], check=True)
                self.made.append(namespace)
                self._ip(namespace, "ip", "link", "set", "lo", "up")
            self._ip(switch, "ip", "link", "add", "br0", "type", "bridge")
            self._ip(switch, "ip", "link", "set", "br0", "mtu", "9000", "up")
            for i in range(self.nodes):
                node = self.namespace(i)
                subprocess.run(
                    [
                        "ip",
                        "link",
                        "add",
                        "eth0",
                        "netns",
                        node,
                        "mtu",
                        "9000",
                        "type",
                        "veth",
                        "peer",
                        "name",
                        f"p{i}",
                        "netns",
                        switch,
                        "mtu",
                        "9000",
                    ],
                    check=True,
                )
                self._ip(switch, "ip", "link", "set", f"p{i}", "master", "br0", "up")
                self._ip(node, "ip", "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                self._ip(node, "ip", "link", "set", "eth0", "up")
                subprocess.run(self.exec_prefix(i) + _card_shaping(self.rate, self.burst), check=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for namespace in reversed(self.made):
            subprocess.run(["ip", "netns", "delete", namespace], check=False)
        self.made = []


def _card_shaping(rate: str, burst: str) -> list:
    return ["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", burst, "latency", "50ms"]


def shape_node_card(rate, burst: str = "32kb") -> None:
    """From inside a node namespace: hold its card to ``rate``, or lift the limit with ``None``."""
    if rate is None:
        subprocess.run(["tc", "qdisc", "del", "dev", "eth0", "root"], check=False, capture_output=True)
    else:
        subprocess.run(_card_shaping(rate, burst), check=True)


def read_node_tx_bytes() -> dict:
    """Bytes this namespace has sent on its card (``eth0``, between nodes) and on ``lo`` (inside the node)."""
    counts = {}
    for device, key in (("eth0", "between_nodes"), ("lo", "inside_node")):
        with open(f"/sys/class/net/{device}/statistics/tx_bytes") as f:
            counts[key] = int(f.read())
    return counts
