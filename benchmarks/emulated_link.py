"""Two ranks joined by an emulated slow link: each rank in its own network namespace (`ip netns`), the two
joined by a veth pair whose both ends are rate-limited with `tc ... tbf` (netem is not in this kernel). Needs
root; without it a benchmark runs its ranks over loopback and says why (`netns_available`).

    why_not = netns_available()        # None: namespaces work here
    with two_namespaces():             # set up, and torn down even on failure
        net_rate(bytes_per_s)          # both directions; None lifts the limit
        result = launch(script, ["--steps", "6"], port, namespaces=True)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

NS, SUBNET = "mcep", "10.77.0"


def netns_available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "no ip/tc"
    probe = subprocess.run(["ip", "netns", "add", f"{NS}probe"], capture_output=True, text=True)
    if probe.returncode:
        return f"ip netns failed: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"{NS}probe"], check=True)
    return None


def _sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@contextlib.contextmanager
def two_namespaces(enabled: bool = True):
    """The namespaces and the veth pair between them for the duration (nothing when not `enabled`)."""
    if not enabled:
        yield
        return
    _down()  # left by an interrupted run
    for r in (0, 1):
        _sh("ip", "netns", "add", f"{NS}{r}")
    _sh("ip", "link", "add", f"{NS}v0", "type", "veth", "peer", "name", f"{NS}v1")
    for r in (0, 1):
        ns = f"{NS}{r}"
        _sh("ip", "link", "set", f"{NS}v{r}", "netns", ns)
        _sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{r + 1}/24", "dev", f"{NS}v{r}")
        _sh("ip", "-n", ns, "link", "set", f"{NS}v{r}", "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
    try:
        yield
    finally:
        _down()


def net_rate(bytes_per_s: float | None):
    """Limit both directions of the link (None: no limit)."""
    for r in (0, 1):
        dev, ns = f"{NS}v{r}", f"{NS}{r}"
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
        if bytes_per_s is not None:  # a burst of 1 ms of traffic: a message cannot slip through at once
            burst = max(32 << 10, int(bytes_per_s / 1000))
            _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                "rate", f"{int(bytes_per_s * 8)}bit", "burst", str(burst), "latency", "1s")


def _down():
    for r in (0, 1):
        subprocess.run(["ip", "netns", "del", f"{NS}{r}"], capture_output=True)


def worker_args(parser, variants) -> None:
    """The hidden arguments `launch` passes to a benchmark's own ranks: --worker, --out, --variants."""
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--variants", default=",".join(variants), help=argparse.SUPPRESS)


def launch(script: str, worker_args: list[str], port: int, namespaces: bool) -> dict:
    """Run `script --worker --out FILE *worker_args` as ranks 0 and 1 (in the namespaces, or on loopback) and
    return the JSON that rank 0 writes to FILE."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        procs = []
        for r in (0, 1):
            env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       MASTER_ADDR=f"{SUBNET}.1" if namespaces else "127.0.0.1")
            if namespaces:
                env["GLOO_SOCKET_IFNAME"] = f"{NS}v{r}"
            cmd = [sys.executable, script, "--worker", "--out", str(out), *worker_args]
            if namespaces:
                cmd = ["ip", "netns", "exec", f"{NS}{r}"] + cmd
            procs.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"a rank failed (exit codes {codes})")
        return json.loads(out.read_text())
