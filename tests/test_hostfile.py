"""rlhf_overlay.runtime.hostfile: DeepSpeed hostfiles, this-machine detection, reachability, per-machine accelerate configs,
and the early hostfile checks of the make targets (no training here)."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import yaml

from rlhf_overlay import PROJECT_ROOT

from rlhf_overlay.runtime import hostfile
from rlhf_overlay.runtime.hostfile import Host, HostfileError


def write(tmp_path, text: str, name: str = "hostfile"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_reads_hosts_with_comments_and_blank_lines(tmp_path):
    hf = write(tmp_path, "# cluster\n\nnode-a slots=8   # first\nnode-b slots=4\n")
    assert hostfile.read_hostfile(hf) == [Host("node-a", 8, 3), Host("node-b", 4, 4)]


@pytest.mark.parametrize("text, match", [
    ("node-a slots=8\nnode-b eight\n", r"hostfile:2: expected `host slots=N`"),
    ("node-a slots=0\n", r"hostfile:1: expected `host slots=N` \(N >= 1\)"),
    ("node-a\n", r"hostfile:1: expected"),
    ("node-a slots=2 extra=1\n", r"hostfile:1: expected"),
    ("node-a slots=2\nnode-a slots=2\n", r"hostfile:2: host 'node-a' is already listed on line 1"),
    ("# nothing\n\n", r"lists no hosts"),
])
def test_bad_hostfiles_name_file_and_line(tmp_path, text, match):
    with pytest.raises(HostfileError, match=match):
        hostfile.read_hostfile(write(tmp_path, text))


def test_missing_hostfile(tmp_path):
    with pytest.raises(HostfileError, match="no such file; write one `host slots=N` line per node"):
        hostfile.read_hostfile(tmp_path / "nope")


def test_this_machine_is_local_other_names_are_not():
    for name in ("localhost", "127.0.0.1", "::1", socket.gethostname()):
        assert hostfile.is_local(name), name
    assert not hostfile.is_local("nonexistent-host.invalid")
    assert not hostfile.is_local("192.0.2.1")        # TEST-NET-1, never assigned


def test_unresolvable_and_unreachable_hosts_fail_early_and_clearly():
    with pytest.raises(HostfileError, match=r"hosts:3: host 'nonexistent-host.invalid' does not resolve"):
        hostfile.check_reachable([Host("localhost", 1, 1), Host("nonexistent-host.invalid", 1, 3)], "hosts")
    with pytest.raises(HostfileError, match=r"hosts:2: host '192.0.2.1' is not reachable on port 22 \(ssh\).*"
                                            r"passwordless ssh"):
        hostfile.check_reachable([Host("192.0.2.1", 8, 2)], "hosts", timeout=0.5)
    hostfile.check_reachable([Host("localhost", 2, 1)], "hosts")      # this machine: nothing to check


def test_deepspeed_flags_this_machine_alone_runs_without_ssh(tmp_path):
    assert hostfile.deepspeed_launcher_flags(write(tmp_path, "localhost slots=2\n")) == [
        "--no_ssh_check", "--master_addr", "127.0.0.1"]
    with pytest.raises(HostfileError, match="hostfile:1: the first host \\('localhost'\\) is the address the other"):
        hostfile.deepspeed_launcher_flags(write(tmp_path, "localhost slots=2\n192.0.2.1 slots=2\n"))


def test_accelerate_configs_one_per_machine():
    base = yaml.safe_load((PROJECT_ROOT / "configs" / "accelerate" / "zero2.yaml").read_text())
    hosts = [Host("node-a", 8, 1), Host("node-b", 8, 2)]
    c0, c1 = hostfile.accelerate_configs(hosts, base, port=29511)
    for rank, c in enumerate((c0, c1)):
        assert c["machine_rank"] == rank and c["num_machines"] == 2 and c["num_processes"] == 16
        assert c["main_process_ip"] == "node-a" and c["main_process_port"] == 29511
        assert c["distributed_type"] == "DEEPSPEED" and c["deepspeed_config"]["zero_stage"] == 2
    assert base["num_machines"] == 1, "the base config is not modified"
    with pytest.raises(HostfileError, match="line 2: node-b has slots=4 but node-a has slots=8"):
        hostfile.accelerate_configs([Host("node-a", 8, 1), Host("node-b", 4, 2)], base)
    with pytest.raises(HostfileError, match="line 1: 8 processes per node but node-a has slots=4"):
        hostfile.accelerate_configs([Host("node-a", 4, 1)], base, processes_per_node=8)


def test_cli_writes_configs_prints_commands_and_keeps_edited_files(tmp_path):
    hf = write(tmp_path, "node-a slots=8\nnode-b slots=8\n")
    out = tmp_path / "cfg"
    cmd = [sys.executable, "-m", "rlhf_overlay.runtime.hostfile", "accelerate-config", "--hostfile", str(hf), "--base", "cpu",
           "--out", str(out), "--port", "29600"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"on node-b: accelerate launch --config_file {out / 'machine-1.yaml'}" in res.stdout
    m1 = yaml.safe_load((out / "machine-1.yaml").read_text())
    assert m1["machine_rank"] == 1 and m1["main_process_ip"] == "node-a" and m1["main_process_port"] == 29600
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
    assert again.returncode == 0, "same content: a no-op"
    (out / "machine-1.yaml").write_text("# my edits\n" + (out / "machine-1.yaml").read_text())
    edited = (out / "machine-1.yaml").read_text()
    refused = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
    assert refused.returncode == 2 and "exists with other content" in refused.stderr
    assert (out / "machine-1.yaml").read_text() == edited, "an edited config is never overwritten silently"


def test_make_accelerate_config_target(tmp_path):
    hf = write(tmp_path, "node-a slots=2\nnode-b slots=2\n")
    res = subprocess.run(["make", "-s", "accelerate-config", f"HOSTFILE={hf}", f"OUT={tmp_path / 'o'}", "BASE=cpu"],
                         capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["machine-0.yaml", "machine-1.yaml"]
    missing = subprocess.run(["make", "-s", "accelerate-config", f"HOSTFILE={hf}"], capture_output=True, text=True,
                             cwd=PROJECT_ROOT, timeout=60)
    assert missing.returncode != 0 and "needs OUT=" in missing.stderr


def test_targets_check_the_hostfile_before_making_a_run_folder(tmp_path, capsys):
    from rlhf_overlay.trlx_jobs import ppo as trlx_ppo
    from rlhf_overlay.trlx_jobs import reward_model as trlx_reward_model
    bad = write(tmp_path, f"{socket.gethostname()} slots=1\nnonexistent-host.invalid slots=1\n")
    out = tmp_path / "rm"
    rc = trlx_reward_model.main(["--arch", "bloom", "--hostfile", str(bad), "--output", str(out)])
    assert rc == 2 and "hostfile:2: host 'nonexistent-host.invalid' does not resolve" in capsys.readouterr().err
    assert not out.exists()
    loop_first = write(tmp_path, "localhost slots=1\nnonexistent-host.invalid slots=1\n", "loop")
    rc = trlx_reward_model.main(["--arch", "bloom", "--hostfile", str(loop_first), "--output", str(out)])
    assert rc == 2 and "first host ('localhost') is the address the other nodes connect" in capsys.readouterr().err
    assert not out.exists()
    remote_first = write(tmp_path, "nonexistent-host.invalid slots=1\nlocalhost slots=1\n", "remote")
    rc = trlx_ppo.main(["--reward", "rule", "--hostfile", str(remote_first), "--output", str(tmp_path / "ppo")])
    assert rc == 2 and "start the run on nonexistent-host.invalid, its first host" in capsys.readouterr().err
    assert not (tmp_path / "ppo").exists()


def test_join_without_a_started_run_says_what_to_do(tmp_path, capsys):
    from rlhf_overlay.trlx_jobs import ppo as trlx_ppo
    assert trlx_ppo.main(["--join", str(tmp_path), "--machine-rank", "1"]) == 2
    assert "start the run on the first host of the hostfile first" in capsys.readouterr().err
    assert trlx_ppo.main(["--join", str(tmp_path)]) == 2
    assert "--join needs --machine-rank" in capsys.readouterr().err


@pytest.mark.upstream
def test_dschat_targets_check_the_hostfile_before_making_a_run_folder(dschat_dir, tmp_path, capsys):
    from rlhf_overlay.dschat_jobs import reward_model as dschat_reward_model
    bad = write(tmp_path, f"{socket.gethostname()} slots=1\n192.0.2.1 slots=1\n")
    out = tmp_path / "rm"
    rc = dschat_reward_model.main(["--hostfile", str(bad), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "hostfile:2: host '192.0.2.1' is not reachable on port 22 (ssh)" in err, err
    assert not out.exists()
