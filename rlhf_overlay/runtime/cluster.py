"""A two-node test cluster on one machine: node-a and node-b, joined by a veth pair, each with its own sshd.

    python -m rlhf_overlay.runtime.cluster up       # make cluster-up   (root; installs pdsh + openssh-server if missing)
    python -m rlhf_overlay.runtime.cluster run node-b -- make ppo-join RUN=... MACHINE_RANK=1
    python -m rlhf_overlay.runtime.cluster down     # make cluster-down (removes everything `up` made; safe to repeat)
    python -m rlhf_overlay.runtime.cluster install  # only pdsh + openssh-server from Debian, when missing (.ci/run)

What `up` makes (and `down` removes, also after a crash of whatever used it):
- node-b: the network namespace rlhf-node-b with its own hostname (a UTS namespace) and its own /tmp (a tmpfs in
  a mount namespace: node-local scratch, as on a real node); everything else of the file system is shared, as
  shared storage is on a cluster. node-a: this machine's own network namespace, with the hostname node-a.
  A holder process (`sleep infinity`) keeps each node's namespaces alive; `run` enters them.
- the veth pair rlhf-veth-a (10.213.7.1, node-a) / rlhf-veth-b (10.213.7.2, node-b) in the private range
  10.213.7.0/30, used only between this machine's own namespaces: no route leads anywhere else.
- an /etc/hosts block naming node-a and node-b, between marker lines.
- a key pair made for the test, two host keys, and one sshd per node with its own config, listening only on
  its node's veth address and accepting only that key, for root.
- /etc/ssh/ssh_config.d/rlhf-overlay-cluster.conf: `ssh node-b` uses that key and the nodes' host keys.
State (keys, configs, pid files, logs) lives in /run/rlhf-overlay-cluster.

Why hostnames: gloo (torch.distributed on CPU) binds each rank to the address its hostname resolves to; this
machine's own name resolves to 127.0.0.1, so a rank started as "vm" could not be reached from node-b. On a
real cluster each node's name resolves to its address; here `run node-a` (and node-a's sshd) give it one.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from rlhf_overlay.errors import ArgumentParser, UserError, main_guard

NODES = ("node-a", "node-b")
ADDRESS = {"node-a": "10.213.7.1", "node-b": "10.213.7.2"}
PREFIX = 30
NETNS = "rlhf-node-b"
VETH = {"node-a": "rlhf-veth-a", "node-b": "rlhf-veth-b"}
STATE = Path("/run/rlhf-overlay-cluster")
HOSTS = Path("/etc/hosts")
HOSTS_BEGIN = "# >>> rlhf-overlay test cluster (rlhf_overlay.runtime.cluster; `make cluster-down` removes this block)"
HOSTS_END = "# <<< rlhf-overlay test cluster"
SSH_CLIENT_CONF = Path("/etc/ssh/ssh_config.d/rlhf-overlay-cluster.conf")
SSHD = Path("/usr/sbin/sshd")
PRIVSEP = Path("/run/sshd")          # sshd's privilege separation folder (Debian creates it only at boot)
HOLDER = "rlhf-overlay-cluster-holder"
UNSHARE = {"node-a": ["--uts"], "node-b": ["--uts", "--mount", "--propagation", "private"]}
TMPFS = "mount -t tmpfs -o mode=1777,size=4g rlhf-node-b-tmp /tmp && "


def _node_b_tmp() -> str:
    """The shell steps that give node-b its own /tmp. A project that lives under /tmp (a CI clone there) is bound back
    at the same path inside it: on a real cluster every node sees the shared project folder (venv, assets, upstream)
    at one path, and only scratch space is node-local."""
    import shlex

    root = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
    if not (root == "/tmp" or root.startswith("/tmp/")):
        return TMPFS
    stash, root_q = shlex.quote(str(STATE / "node-b" / "project")), shlex.quote(root)
    return (f"mkdir -p {stash} && mount --bind {root_q} {stash} && {TMPFS}mkdir -p {root_q} && "
            f"mount --bind {stash} {root_q} && umount {stash} && ")
PACKAGES = {"pdsh": lambda: shutil.which("pdsh"), "openssh-server": lambda: SSHD.is_file() and shutil.which("ssh")}


class ClusterError(UserError, RuntimeError):
    """The test cluster cannot be made or used here; the message says why and what to do."""


def _run(cmd: Sequence[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    if check and res.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed: {(res.stderr or res.stdout).strip() or res.returncode}")
    return res


# ------------------------------------------------------------------------------------------ can it be made here
def problem() -> str | None:
    """Why no cluster can be made on this machine (None when it can); packages are checked separately."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "making network namespaces, /etc/hosts entries and an sshd needs root"
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"), ("nsenter", "util-linux")):
        if not shutil.which(tool):
            return f"`{tool}` is missing (apt-get install {package})"
    probe = f"rlhf-probe-{os.getpid()}"
    res = _run(["ip", "netns", "add", probe], check=False)
    if res.returncode != 0:
        return f"cannot create a network namespace here: {res.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    return None


def missing_packages() -> list[str]:
    return [name for name, present in PACKAGES.items() if not present()]


def install_packages() -> None:
    """pdsh and openssh-server from Debian when missing (`apt-get update` once, then install). The system's own
    ssh service is not started by the install (a temporary policy-rc.d when none exists)."""
    missing = missing_packages()
    if not missing:
        return
    if not shutil.which("apt-get"):
        raise ClusterError(f"{' and '.join(missing)} missing and no apt-get to install them; install them by hand")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\n# rlhf-overlay cluster: no service starts during this install\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", *missing]):
            res = _run(cmd, check=False, timeout=1200, env=env)
            if res.returncode != 0:
                tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [f"exit code {res.returncode}"]
                raise ClusterError(f"{' and '.join(missing)} missing and `{' '.join(cmd)}` failed: {tail[0]}")
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    still = missing_packages()
    if still:
        raise ClusterError(f"{' and '.join(still)} still missing after apt-get install")


# ------------------------------------------------------------------------------------------------ /etc/hosts
def _write_in_place(path: Path, text: str) -> None:
    """Atomic replace where possible; /etc/hosts is often a bind mount (containers), which only takes a rewrite."""
    tmp = path.with_name(f".{path.name}.rlhf-overlay-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        with open(path, "r+") as f:
            f.write(text)
            f.truncate()


def _without_block(text: str) -> str:
    lines, out, inside = text.splitlines(keepends=True), [], False
    for line in lines:
        if line.strip() == HOSTS_BEGIN:
            inside = True
        elif inside and line.strip() == HOSTS_END:
            inside = False
        elif not inside:
            out.append(line)
    return "".join(out)


def _hosts_add() -> None:
    text = _without_block(HOSTS.read_text())
    if text and not text.endswith("\n"):
        text += "\n"
    block = "".join(f"{ADDRESS[n]} {n}\n" for n in NODES)
    _write_in_place(HOSTS, f"{text}{HOSTS_BEGIN}\n{block}{HOSTS_END}\n")


def _hosts_remove() -> bool:
    text = HOSTS.read_text()
    if HOSTS_BEGIN not in text:
        return False
    _write_in_place(HOSTS, _without_block(text))
    return True


# --------------------------------------------------------------------------------------------- processes
def _pid(name: str) -> int | None:
    try:
        return int((STATE / name).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None) -> bool:
    """The process exists and is not a zombie (a holder started by this process is reaped here)."""
    if pid is None:
        return False
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop(pids: Sequence[int], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds, for the given process ids (ours: in our namespaces)."""
    pids = [p for p in pids if p != os.getpid() and _alive(p)]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _ns(pid: int, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def _members(node: str) -> list[int]:
    """Every process on `node` (in its holder's UTS namespace, and for node-b also in the network namespace)."""
    holder = _pid(f"{node}/holder.pid")
    uts = _ns(holder, "uts") if _alive(holder) else None
    pids = set()
    if uts:
        pids |= {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ns(int(p.name), "uts") == uts}
    if node == "node-b" and NETNS in _netns_list():
        res = _run(["ip", "netns", "pids", NETNS], check=False)
        pids |= {int(x) for x in res.stdout.split() if x.isdigit()}
    return sorted(pids - {os.getpid()})


def _netns_list() -> list[str]:
    return [line.split()[0] for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines() if line.strip()]


def on_node(node: str, cmd: Sequence[str], cwd: str | os.PathLike | None = None) -> list[str]:
    """The command line that runs `cmd` on `node`: in node-b's network namespace (`ip netns exec`) and in the
    node's hostname and mount namespaces (entered through its holder process), in folder `cwd`."""
    holder = _pid(f"{node}/holder.pid")
    if not _alive(holder):
        raise ClusterError(f"{node} is not up; run `make cluster-up` first")
    enter = ["nsenter", f"--target={holder}", "--uts", *(["--mount"] if node == "node-b" else []),
             f"--wd={Path(cwd or os.getcwd()).resolve()}", "--"]
    return (["ip", "netns", "exec", NETNS] if node == "node-b" else []) + enter + [str(c) for c in cmd]


def start_sshd(node: str) -> None:
    """Start `node`'s sshd (daemonizes; its pid file is in the state folder) and wait until it answers."""
    conf = STATE / node / "sshd_config"
    _run(on_node(node, [SSHD, "-f", conf, "-E", STATE / node / "sshd.log"], cwd="/"))
    _wait_port(node, up=True)


def stop_sshd(node: str) -> None:
    _stop([p for p in [_pid(f"{node}/sshd.pid")] if p])
    (STATE / node / "sshd.pid").unlink(missing_ok=True)
    _wait_port(node, up=False)


def _wait_port(node: str, up: bool, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection((ADDRESS[node], 22), timeout=0.5):
                answered = True
        except OSError:
            answered = False
        if answered == up:
            return
        time.sleep(0.05)
    raise ClusterError(f"{node}'s sshd did not {'start' if up else 'stop'} within {timeout:.0f} s; see "
                       f"{STATE / node / 'sshd.log'}")


def set_link(node: str, up: bool) -> None:
    """Take `node`'s end of the veth pair down (the node becomes unreachable; its packets are dropped on this
    machine, the route stays on the link) or up again."""
    prefix = ["ip", "netns", "exec", NETNS] if node == "node-b" else []
    _run(prefix + ["ip", "link", "set", VETH[node], "up" if up else "down"])
    if up:
        _wait_port(node, up=True)


# ------------------------------------------------------------------------------------------------- up/down
def is_up() -> bool:
    return STATE.exists() or NETNS in _netns_list() or Path(f"/sys/class/net/{VETH['node-a']}").exists()


def up() -> None:
    """Make the cluster (see the module docstring); on any failure remove what was made and raise ClusterError."""
    why = problem()
    if why:
        raise ClusterError(f"no test cluster here: {why}")
    install_packages()
    if is_up():
        raise ClusterError(f"a test cluster is already up (or left over: {STATE}); run `make cluster-down` first")
    try:
        _up()
    except BaseException:
        down()
        raise


@contextlib.contextmanager
def running(replace_leftovers: bool = False):
    """`with running():` the cluster is up inside the block and removed after it, also when the block raises.
    `replace_leftovers`: remove a cluster left up (by `make cluster-up` or an interrupted run) first."""
    if replace_leftovers and is_up():
        down()
    up()
    try:
        yield
    finally:
        down()


def _up() -> None:
    STATE.mkdir(mode=0o700)
    for node in NODES:
        (STATE / node).mkdir(mode=0o700)
    if not PRIVSEP.exists():
        PRIVSEP.mkdir(mode=0o755)
        (STATE / "made-run-sshd").touch()
    # network: node-b's namespace and the veth pair, addresses in 10.213.7.0/30 only
    _run(["ip", "netns", "add", NETNS])
    _run(["ip", "link", "add", VETH["node-a"], "type", "veth", "peer", "name", VETH["node-b"], "netns", NETNS])
    inb = ["ip", "netns", "exec", NETNS]
    _run(["ip", "addr", "add", f"{ADDRESS['node-a']}/{PREFIX}", "dev", VETH["node-a"]])
    _run(inb + ["ip", "addr", "add", f"{ADDRESS['node-b']}/{PREFIX}", "dev", VETH["node-b"]])
    _run(["ip", "link", "set", VETH["node-a"], "up"])
    _run(inb + ["ip", "link", "set", VETH["node-b"], "up"])
    _run(inb + ["ip", "link", "set", "lo", "up"])
    _hosts_add()
    # holders: each node's hostname (UTS) and mount namespace; node-b gets its own /tmp
    for node in NODES:
        script = f'hostname {node} && {_node_b_tmp() if node == "node-b" else ""}echo $$ > "$1" && ' \
                 f'exec -a {HOLDER}-{node} sleep infinity'
        cmd = (inb if node == "node-b" else []) + ["unshare", *UNSHARE[node], "bash", "-c", script, "bash",
                                                   str(STATE / node / "holder.pid")]
        subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, cwd="/")
        deadline = time.time() + 10
        while not _alive(_pid(f"{node}/holder.pid")) and time.time() < deadline:
            time.sleep(0.02)
        if not _alive(_pid(f"{node}/holder.pid")):
            raise ClusterError(f"could not start {node}'s namespaces (`{' '.join(cmd)}`)")
    # keys: one client key for the test, one host key per node
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rlhf-overlay-cluster", "-f", str(STATE / "id_ed25519")])
    net = f"{ADDRESS['node-a'].rsplit('.', 1)[0]}.0/{PREFIX}"
    (STATE / "authorized_keys").write_text(f'from="{net}",no-agent-forwarding,no-X11-forwarding '
                                           f'{(STATE / "id_ed25519.pub").read_text()}')
    known = []
    for node in NODES:
        key = STATE / node / "ssh_host_ed25519_key"
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", node, "-f", str(key)])
        known.append(f"{node},{ADDRESS[node]} {' '.join(key.with_suffix('.pub').read_text().split()[:2])}\n")
        (STATE / node / "sshd_config").write_text(
            f"# sshd of {node} in the rlhf-overlay test cluster (rlhf_overlay.runtime.cluster)\n"
            f"ListenAddress {ADDRESS[node]}:22\nHostKey {key}\nPidFile {STATE / node / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {STATE / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            f"PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            f"X11Forwarding no\nAllowAgentForwarding no\nPrintMotd no\nMaxStartups 64:30:128\nLogLevel INFO\n")
    (STATE / "known_hosts").write_text("".join(known))
    SSH_CLIENT_CONF.parent.mkdir(parents=True, exist_ok=True)
    SSH_CLIENT_CONF.write_text(
        f"# rlhf-overlay test cluster (rlhf_overlay.runtime.cluster): `make cluster-down` removes this file\n"
        f"Host {' '.join(NODES)} {' '.join(ADDRESS.values())}\n    User root\n"
        f"    IdentityFile {STATE / 'id_ed25519'}\n    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {STATE / 'known_hosts'}\n    StrictHostKeyChecking yes\n"
        f"    PasswordAuthentication no\n    ConnectTimeout 5\n")
    for node in NODES:
        start_sshd(node)
        res = _run(["ssh", "-o", "BatchMode=yes", node, "hostname"], check=False, timeout=30)
        if res.returncode != 0 or res.stdout.strip() != node:
            raise ClusterError(f"`ssh {node} hostname` gave {res.stdout.strip()!r} ({res.stderr.strip()})")


def down() -> list[str]:
    """Remove everything `up` made (whatever of it exists); returns what was removed."""
    removed = []
    for node in reversed(NODES):
        pids = _members(node) + [p for p in (_pid(f"{node}/sshd.pid"), _pid(f"{node}/holder.pid")) if p]
        if pids:
            _stop(sorted(set(pids)))
            removed.append(f"{node}: {len(set(pids))} process(es) (holder, sshd and what ran there)")
    if Path(f"/sys/class/net/{VETH['node-a']}").exists():
        _run(["ip", "link", "del", VETH["node-a"]], check=False)
        removed.append(f"veth pair {VETH['node-a']}/{VETH['node-b']}")
    if NETNS in _netns_list():
        _run(["ip", "netns", "del", NETNS], check=False)
        removed.append(f"network namespace {NETNS}")
    if _hosts_remove():
        removed.append(f"{HOSTS} block")
    if SSH_CLIENT_CONF.exists():
        SSH_CLIENT_CONF.unlink()
        removed.append(str(SSH_CLIENT_CONF))
    if (STATE / "made-run-sshd").exists() and PRIVSEP.is_dir() and not any(PRIVSEP.iterdir()):
        PRIVSEP.rmdir()
    if STATE.exists():
        shutil.rmtree(STATE)
        removed.append(f"{STATE} (keys, configs, logs)")
    return removed


def leftovers() -> list[str]:
    """What of a cluster exists now (empty after `down`): for tests and `status`."""
    found = []
    if NETNS in _netns_list():
        found.append(f"network namespace {NETNS}")
    found += [f"link {v}" for v in VETH.values() if Path(f"/sys/class/net/{v}").exists()]
    if HOSTS_BEGIN in HOSTS.read_text():
        found.append(f"{HOSTS} block")
    if SSH_CLIENT_CONF.exists():
        found.append(str(SSH_CLIENT_CONF))
    if STATE.exists():
        found.append(str(STATE))
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if any(mark in p.read_bytes() for mark in (str(STATE).encode(), HOLDER.encode())):
                found.append(f"process {p.parent.name}")
        except OSError:
            pass
    return found


@main_guard   # ClusterError and bad flags -> `error: ...`, exit 2
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m rlhf_overlay.runtime.cluster", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="make node-a/node-b (make cluster-up)")
    sub.add_parser("down", help="remove everything up made (make cluster-down)")
    sub.add_parser("status", help="what of a cluster exists now")
    sub.add_parser("install", help="only install pdsh and openssh-server from Debian when missing (.ci/run)")
    r = sub.add_parser("run", help="run a command on a node: run node-b -- make ppo-join ...")
    r.add_argument("node", choices=NODES)
    r.add_argument("cmd", nargs=argparse.REMAINDER)
    ns = p.parse_args(argv)
    if ns.command == "up":
        up()
        print(f"test cluster up: node-a = this machine ({ADDRESS['node-a']}), node-b = network namespace {NETNS} "
              f"({ADDRESS['node-b']}); `ssh node-b hostname` works. Try:\n"
              f"  printf 'node-a slots=1\\nnode-b slots=1\\n' > /var/tmp/hosts\n"
              f"  make rm-llama2 HOSTFILE=/var/tmp/hosts OUTPUT=/var/tmp/rm-two-nodes      # pdsh over ssh\n"
              f"  python -m rlhf_overlay.runtime.cluster run node-a -- make ppo-smoke-test HOSTFILE=/var/tmp/hosts "
              f"OUTPUT=/var/tmp/ppo-two-nodes\n"
              f"  python -m rlhf_overlay.runtime.cluster run node-b -- make ppo-join RUN=/var/tmp/ppo-two-nodes "
              f"MACHINE_RANK=1\n"
              f"(node-b has its own /tmp: keep OUTPUT and DATA elsewhere.) Remove it all with `make cluster-down`.")
    elif ns.command == "down":
        removed = down()
        print("removed: " + ("; ".join(removed) if removed else "nothing (no test cluster was up)"))
    elif ns.command == "install":
        missing = missing_packages()
        install_packages()
        print(f"installed: {' '.join(missing)}" if missing else "pdsh and openssh-server are installed")
    elif ns.command == "status":
        found = leftovers()
        print("test cluster: " + ("; ".join(found) if found else "none"))
    else:
        cmd = ns.cmd[1:] if ns.cmd[:1] == ["--"] else ns.cmd
        if not cmd:
            raise ClusterError("run needs a command after the node, e.g. run node-b -- hostname")
        return subprocess.call(on_node(ns.node, cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
