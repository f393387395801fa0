"""DeepSpeed hostfiles (`host slots=N` per line) for every launcher we use, and the accelerate configs made from them.

- `read_hostfile(path)`: the hosts, with `file:line` errors for anything DeepSpeed would reject or misread.
- `is_local(host)` / `all_local(hosts)`: whether a name is this machine (then no ssh is needed to start it).
- `check_reachable(hosts)`: before DeepSpeed's launcher ssh's out (pdsh), every remote host must resolve and accept a
  connection on the ssh port; otherwise a clear error now, instead of a hang or a bare ssh failure later.
- `accelerate_configs(hosts, base)`: one accelerate YAML per machine (machine rank, main process address, process
  counts) from the same hostfile, for trlx PPO over several nodes; `python -m rlhf_overlay.runtime.hostfile
  accelerate-config` writes them and prints the command to run on each node.

Nothing here imports torch.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from rlhf_overlay import PROJECT_ROOT
from rlhf_overlay.errors import ArgumentParser, UserError, main_guard

BASE_CONFIGS = {name: PROJECT_ROOT / "configs" / "accelerate" / f"{name}.yaml" for name in ("cpu", "multi_gpu", "zero2")}
DEFAULT_PORT = 29500


class HostfileError(UserError, ValueError):
    """A hostfile that cannot drive a launch; the message names file:line and what to write instead."""


@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    line: int


def read_hostfile(path: str | os.PathLike) -> list[Host]:
    """Hosts of a DeepSpeed-format hostfile: `host slots=N` per line, `#` comments and blank lines allowed."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise HostfileError(f"HOSTFILE={path}: no such file; write one `host slots=N` line per node")
    hosts: list[Host] = []
    for lineno, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = [x for x in parts[1:] if x.startswith("slots=")]
        if len(parts) != 2 or len(slots) != 1 or not slots[0][6:].isdigit() or int(slots[0][6:]) < 1:
            raise HostfileError(f"{p}:{lineno}: expected `host slots=N` (N >= 1), got {raw.strip()!r}")
        name = parts[0]
        if any(h.name == name for h in hosts):
            first = next(h for h in hosts if h.name == name)
            raise HostfileError(f"{p}:{lineno}: host {name!r} is already listed on line {first.line}; list each "
                                f"node once with all its slots")
        hosts.append(Host(name, int(slots[0][6:]), lineno))
    if not hosts:
        raise HostfileError(f"{p}: lists no hosts; write one `host slots=N` line per node")
    return hosts


# ------------------------------------------------------------------------------------------ which host is this
def _loopback(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return name == "localhost" or name.endswith(".localhost")


def _own_addresses() -> set[str]:
    names = {socket.gethostname(), socket.getfqdn()}
    addresses: set[str] = set()
    for n in names:
        try:
            addresses |= {info[4][0] for info in socket.getaddrinfo(n, None)}
        except OSError:
            pass
    return names | addresses


def _bindable(address: str) -> bool:
    """An address this machine (its network namespace) owns: binding to it works only then."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


def is_local(host: str) -> bool:
    """True when `host` names this machine (localhost, a loopback address, its hostname/FQDN or an address of
    any of its interfaces); no DNS lookup of `host` itself unless it is not obviously local."""
    if _loopback(host) or host in _own_addresses():
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return any(_loopback(i[4][0]) or i[4][0] in _own_addresses() or _bindable(i[4][0]) for i in infos)


def all_local(hosts: Sequence[Host]) -> bool:
    return all(is_local(h.name) for h in hosts)


# ------------------------------------------------------------------------------------------------ checks
def check_reachable(hosts: Sequence[Host], source: str, ssh_port: int | None = None, timeout: float = 5.0) -> None:
    """Every remote host resolves and accepts a TCP connection on the ssh port within `timeout` seconds; DeepSpeed's
    multi-node launcher (pdsh over ssh) needs that, plus passwordless ssh, from this node to every host."""
    port = ssh_port or int(os.environ.get("RLHF_OVERLAY_SSH_PORT", "22"))
    for h in hosts:
        if is_local(h.name):
            continue
        where = f"{source}:{h.line}: host {h.name!r}"
        try:
            infos = socket.getaddrinfo(h.name, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise HostfileError(f"{where} does not resolve ({e.strerror or e}); fix the name or add it to "
                                f"/etc/hosts") from None
        last = None
        for family, kind, proto, _, address in infos:
            try:
                with socket.socket(family, kind, proto) as s:
                    s.settimeout(timeout)
                    s.connect(address)
                    break
            except OSError as e:
                last = e
        else:
            reason = "timed out" if isinstance(last, socket.timeout) else (getattr(last, "strerror", None) or last)
            raise HostfileError(f"{where} is not reachable on port {port} (ssh): {reason}. DeepSpeed's multi-node "
                                f"launcher starts the ranks over ssh (pdsh): every host must be up, and this node "
                                f"needs passwordless ssh to it (`ssh {h.name} hostname` must work)")


def check_main_host(hosts: Sequence[Host], source: str) -> None:
    """With several hosts the first one is the rendezvous address the others connect to: a loopback name there
    only works when every host is this machine."""
    if len(hosts) > 1 and _loopback(hosts[0].name) and not all_local(hosts):
        raise HostfileError(f"{source}:{hosts[0].line}: the first host ({hosts[0].name!r}) is the address the other "
                            f"nodes connect to; write this node's network name or IP instead of a loopback name")


def local_slots_problem(hostfile: str, cuda: bool, gpus: int | None = None) -> str | None:
    """On a GPU machine, a line for this machine asking for more slots than it has visible GPUs (None if fine).
    The ranks of the other hosts are checked by their own launcher."""
    if not cuda:
        return None
    from rlhf_overlay.runtime.runs import gpu_count

    gpus = gpu_count() if gpus is None else gpus
    for h in read_hostfile(hostfile):
        if is_local(h.name) and h.slots > gpus:
            return (f"{hostfile}:{h.line}: {h.name} slots={h.slots} but this machine has {gpus} visible GPU(s); "
                    f"write slots={gpus} (or fewer) for it")
    return None


def check_pdsh_ssh(hosts: Sequence[Host], source: str, timeout: int = 5) -> None:
    """DeepSpeed's multi-node launcher runs `pdsh -w <every host> ...` over ssh, this node included: pdsh and ssh
    must be installed here and `ssh <host>` must log in without a prompt, for every host of the hostfile."""
    import shutil
    import subprocess

    for tool, package in (("pdsh", "pdsh"), ("ssh", "openssh-client")):
        if not shutil.which(tool):
            raise HostfileError(f"{source}: several nodes, but `{tool}` is not installed on this node (DeepSpeed's "
                                f"launcher starts the ranks of every node through pdsh over ssh); install it "
                                f"(Debian/Ubuntu: apt-get install {package})")
    for h in hosts:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout}", h.name, "true"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=3 * timeout, stdin=subprocess.DEVNULL)
            reason = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
        except subprocess.TimeoutExpired:
            res, reason = None, f"no answer within {3 * timeout} s"
        if res is None or res.returncode != 0:
            raise HostfileError(f"{source}:{h.line}: `ssh {h.name} true` failed ({reason}); DeepSpeed's launcher "
                                f"needs passwordless ssh (a key, no prompt) from this node to every host of the "
                                f"hostfile, this one included")


def deepspeed_launcher_flags(hostfile: str | os.PathLike) -> list[str]:
    """Read and check a hostfile for DeepSpeed's launcher and return the extra flags it needs; call it before
    creating anything. A hostfile naming only this machine runs locally without ssh (DeepSpeed otherwise insists
    on `ssh localhost`); with several nodes every host must be reachable, pdsh installed and ssh passwordless,
    and the first host's name is the rendezvous address (DeepSpeed would otherwise take the first address of
    `hostname -I` there, often an interface the other nodes cannot reach)."""
    hosts, source = read_hostfile(hostfile), str(hostfile)
    check_main_host(hosts, source)
    if len(hosts) == 1 and is_local(hosts[0].name):
        return ["--no_ssh_check", "--master_addr", "127.0.0.1"]
    check_reachable(hosts, source)
    check_pdsh_ssh(hosts, source)
    return ["--master_addr", hosts[0].name]


def rendezvous_port(hostfile: str | os.PathLike) -> int:
    """The rank-0 rendezvous port for DeepSpeed's launcher on several nodes. Rank 0 runs on the first host: when
    that is this machine (where the launch starts), a port free here (a fixed one may be taken by another job);
    otherwise DeepSpeed's default, 29500, which must be free on the first host."""
    if is_local(read_hostfile(hostfile)[0].name):
        from rlhf_overlay.runtime.runs import free_port
        return free_port("")
    return DEFAULT_PORT


# variables the ranks on the other nodes need that DeepSpeed's runner does not forward by itself (it forwards
# PYTHON*, MLFLOW*, MV2*, UCX* and, on GPUs, NCCL*): caches, offline mode, threads, CPU accelerator, ours
REMOTE_ENV_PREFIXES = ("RLHF_", "DEEPSPEED_", "HF_", "TRANSFORMERS_", "WANDB_", "NCCL_", "GLOO_", "TORCH_")
REMOTE_ENV_NAMES = ("TOKENIZERS_PARALLELISM", "DS_ACCELERATOR", "OMP_NUM_THREADS")


def remote_env(env: Mapping[str, str], run_dir: str | os.PathLike) -> dict:
    """`env` plus DS_ENV_FILE=<run_dir>/deepspeed_env: DeepSpeed's runner exports the variables listed there on
    every node it starts over pdsh/ssh (an ssh session starts with a fresh environment)."""
    keep = {k: v for k, v in env.items() if (k.startswith(REMOTE_ENV_PREFIXES) or k in REMOTE_ENV_NAMES)
            and "\n" not in v and k != "RLHF_OVERLAY_RUN_DIRS_FILE"}
    path = Path(run_dir) / "deepspeed_env"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(f"{k}={v}\n" for k, v in sorted(keep.items())))
    os.replace(tmp, path)
    return {**env, "DS_ENV_FILE": str(path)}


# ----------------------------------------------------------------------------------- accelerate, several nodes
def accelerate_configs(hosts: Sequence[Host], base: Mapping, port: int = DEFAULT_PORT,
                       processes_per_node: int | None = None) -> list[dict]:
    """One accelerate config per machine from a base config (ours: configs/accelerate/*.yaml): num_machines,
    machine_rank, main_process_ip (the first host), main_process_port and num_processes over all machines
    (accelerate's convention; it starts num_processes / num_machines per node, so slots must be equal)."""
    per_node = processes_per_node or hosts[0].slots
    unequal = [h for h in hosts if h.slots != hosts[0].slots]
    if unequal and processes_per_node is None:
        raise HostfileError(f"line {unequal[0].line}: {unequal[0].name} has slots={unequal[0].slots} but "
                            f"{hosts[0].name} has slots={hosts[0].slots}; accelerate starts the same number of "
                            f"processes on every machine: give all hosts the same slots")
    too_many = [h for h in hosts if per_node > h.slots]
    if too_many:
        raise HostfileError(f"line {too_many[0].line}: {per_node} processes per node but {too_many[0].name} has "
                            f"slots={too_many[0].slots}")
    configs = []
    for rank, _ in enumerate(hosts):
        cfg = {k: v for k, v in base.items()}
        cfg.update(num_machines=len(hosts), machine_rank=rank, main_process_ip=hosts[0].name,
                   main_process_port=port, num_processes=per_node * len(hosts), rdzv_backend="static",
                   same_network=True)
        configs.append(cfg)
    return configs


def load_base_config(base: str) -> tuple[dict, Path]:
    import yaml

    path = BASE_CONFIGS.get(base) or Path(base).expanduser()
    if not path.is_file():
        raise HostfileError(f"BASE={base}: neither one of {', '.join(BASE_CONFIGS)} nor an accelerate YAML file")
    return yaml.safe_load(path.read_text()) or {}, path


def write_yaml(path: Path, data: Mapping, header: str, overwrite: bool = False) -> bool:
    """Write atomically; an existing file with other content is kept (HostfileError) unless `overwrite`.
    Returns False when the file already holds exactly this content."""
    import yaml

    text = header + yaml.safe_dump(dict(data), sort_keys=False)
    if path.exists():
        if path.read_text() == text:
            return False
        if not overwrite:
            raise HostfileError(f"{path} exists with other content; move it away or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


def write_accelerate_configs(hostfile: str, base: str, out: Path, port: int = DEFAULT_PORT,
                             processes_per_node: int | None = None, overwrite: bool = False) -> list[Path]:
    hosts = read_hostfile(hostfile)
    check_main_host(hosts, hostfile)
    base_cfg, base_path = load_base_config(base)
    paths = []
    for cfg, host in zip(accelerate_configs(hosts, base_cfg, port, processes_per_node), hosts):
        path = Path(out) / f"machine-{cfg['machine_rank']}.yaml"
        header = (f"# accelerate config for machine {cfg['machine_rank']} ({host.name}) of {len(hosts)}, generated "
                  f"from {Path(hostfile).resolve()} and {base_path} by rlhf_overlay.runtime.hostfile\n")
        write_yaml(path, cfg, header, overwrite)
        paths.append(path)
    return paths


@main_guard   # HostfileError and bad flags -> `error: ...`, exit 2
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m rlhf_overlay.runtime.hostfile",
                       description="Accelerate configs, one per machine, from a DeepSpeed hostfile.")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("accelerate-config", help="write <out>/machine-<rank>.yaml for every host of the hostfile")
    a.add_argument("--hostfile", required=True, help="DeepSpeed hostfile: `host slots=N` per line (HOSTFILE)")
    a.add_argument("--base", default="zero2", help="cpu, multi_gpu, zero2 (configs/accelerate/) or a YAML file")
    a.add_argument("--out", required=True, help="folder for the configs (OUT)")
    a.add_argument("--port", type=int, default=DEFAULT_PORT, help="main process port on the first host")
    a.add_argument("--overwrite", action="store_true", help="replace existing configs with other content")
    ns = p.parse_args(argv)
    paths = write_accelerate_configs(ns.hostfile, ns.base, Path(ns.out), ns.port, overwrite=ns.overwrite)
    hosts = read_hostfile(ns.hostfile)
    print(f"wrote {len(paths)} accelerate config(s) into {ns.out}; start the same script on every machine:")
    for host, path in zip(hosts, paths):
        print(f"  on {host.name}: accelerate launch --config_file {path} <your script> ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
