"""Test hosts in network namespaces: each host its own network stack, all on one bridge (a LAN).

`with lab("s3", "r1", "r2") as net:` gives `net.address["s3"] == "10.231.N.2"`, ... and the
namespaces `net.namespace["s3"] == "upg<pid>-s3"`, ... The bridge's own address
(`net.client`, 10.231.N.1) is this process: the client.
Traffic only ever goes between these namespaces (addresses the lab made itself); the
namespaces, bridge and veths are removed on exit, whatever happened.

A host that runs Docker loads bridge netfilter and sets iptables' FORWARD policy to DROP, which
drops frames crossing any bridge, this one's too. The lab then accepts forwarding within its own
bridge (one rule at the head of FORWARD, naming the bridge) and deletes that rule on exit; other
traffic, Docker's own included, is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Iterator


@dataclass
class Lab:
    client: str
    address: dict[str, str] = field(default_factory=dict)
    namespace: dict[str, str] = field(default_factory=dict)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _forward_rule(bridge: str) -> list[str]:
    return ["FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]


def _accept_forwarding(bridge: str) -> bool:
    """Let frames cross `bridge` even where FORWARD drops by default; True if a rule was added."""
    if shutil.which("iptables") is None:
        return False  # no iptables, no FORWARD policy to get past
    subprocess.run(["iptables", "-I", *_forward_rule(bridge)], check=True, capture_output=True, text=True)
    return True


def why_unavailable() -> str | None:
    """None if namespaces and bridges can be made here, else why not."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"upgprobe{os.getpid() % 100000}"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
        _ip("link", "add", f"{probe}b", "type", "bridge")
        _ip("link", "del", f"{probe}b")
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create network namespaces or bridges here: {getattr(exc, 'stderr', '') or exc}"
    return None


@contextlib.contextmanager
def lab(*names: str) -> Iterator[Lab]:
    tag = f"upg{os.getpid() % 10000}"
    subnet = f"10.231.{os.getpid() % 250 + 1}"
    bridge = f"{tag}br"
    made: list[tuple[str, str]] = []  # (namespace, host-side veth)
    accepted = False
    try:
        _ip("link", "add", bridge, "type", "bridge")
        accepted = _accept_forwarding(bridge)
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        net = Lab(client=f"{subnet}.1")
        for i, name in enumerate(names):
            ns, outside, inside = f"{tag}-{name}", f"{tag}v{i}", f"{tag}p{i}"
            _ip("netns", "add", ns)
            made.append((ns, outside))
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            address = f"{subnet}.{i + 2}"
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            net.address[name], net.namespace[name] = address, ns
        yield net
    finally:
        for ns, outside in made:
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("link", "del", outside)
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", ns)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", bridge)
        if accepted:
            subprocess.run(["iptables", "-D", *_forward_rule(bridge)], check=False, capture_output=True)
