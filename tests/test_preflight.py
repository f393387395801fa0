"""preflight: what every training target checks before it creates a run folder. Each case asserts the one-line
message, exit code 2 and that nothing was created or changed (OUTPUT, the data, the model, the upstream tree)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import git
import pytest

import model_folders as mf
from rlhf_overlay import PROJECT_ROOT
from rlhf_overlay.dschat_jobs import ppo as dschat_ppo
from rlhf_overlay.dschat_jobs import reward_model as dschat_reward_model
from rlhf_overlay.tools import eval_rm
from rlhf_overlay.runtime import preflight
from rlhf_overlay.trlx_jobs import ppo as trlx_ppo
from rlhf_overlay.trlx_jobs import reward_model as trlx_reward_model
from rlhf_overlay.runtime.preflight import PreflightError
from test_setup_engine import Sandbox


# ---------------------------------------------------------------------------------------------- upstream trees
@pytest.fixture
def sb(tmp_path, monkeypatch):
    s = Sandbox(tmp_path, monkeypatch)
    s.add_overlay("lib/new.py", "# rlhf-overlay: NEW file\nX = 2\n")
    assert s.run("lock") == 0
    return s


def check(sb, refusal: str | None = None):
    """check_upstream on the sandbox tree: passes, or raises a PreflightError matching `refusal`; either way the
    work tree, its index and the recorded state are left exactly as they were."""
    def state():   # the files, the index and the recorded state (not git's object store or lock files)
        return {k: v for k, v in mf.snapshot(sb.tree).items()
                if "/.git" not in k or k.endswith(("/.git/index", "/.git/rlhf-overlay-state.json"))}

    before = state()
    if refusal is None:
        assert preflight.check_upstream("demo", lock_path=sb.lock) == sb.tree
    else:
        with pytest.raises(PreflightError, match=refusal):
            preflight.check_upstream("demo", lock_path=sb.lock)
    assert state() == before


def test_upstream_not_set_up(sb):
    check(sb, r"upstream/demo is not set up — run `make setup`")
    assert not sb.tree.exists()


def test_upstream_pin_plus_overlays_passes_and_each_half_state_is_named(sb):
    assert sb.run("sync") == 0
    check(sb)
    # an interrupted `make upstream`: the work tree at the bare pin, overlays not laid on it
    repo = git.Repo(sb.tree)
    repo.git.read_tree("--reset", "-u", sb.c1)
    assert not (sb.tree / "lib/new.py").exists()
    check(sb, r"its git index is not pin \+ overlays .* — run `make upstream`")
    applied = json.loads((sb.tree / ".git" / "rlhf-overlay-state.json").read_text())["tree"]
    repo.git.read_tree("--reset", "-u", applied)   # what finishing `make upstream` restores
    check(sb)
    # ... or before it recorded what it applied
    state = sb.tree / ".git" / "rlhf-overlay-state.json"
    saved = state.read_text()
    state.unlink()
    check(sb, r"is not pin \+ the current overlays .*interrupted\) — run `make upstream` \(it lays the overlays on "
              r"the pin\), then `make verify`")
    state.write_text(saved)
    # an overlay edited without `make lock && make upstream`
    sb.add_overlay("lib/new.py", "# rlhf-overlay: NEW file\nX = 3\n")
    check(sb, r"overlays/demo changed since the last `make upstream`")
    sb.add_overlay("lib/new.py", "# rlhf-overlay: NEW file\nX = 2\n")
    # a file edited by hand in the work tree
    (sb.tree / "lib/other.py").write_text("X = 99\n")
    check(sb, r"1 file\(s\) edited by hand \(lib/other.py\) — move the change into overlays/demo")
    (sb.tree / "lib/other.py").write_text("X = 1\n")
    # HEAD moved away from the pin
    repo.git.update_ref("--no-deref", "HEAD", sb.c2)
    check(sb, rf"is at {sb.c2[:12]}, but upstream.lock pins {sb.c1[:12]}")
    repo.git.update_ref("--no-deref", "HEAD", sb.c1)
    check(sb)


def test_dschat_targets_run_the_upstream_check_before_anything(tiny_assets, tmp_path, monkeypatch, capsys):
    def refuse(name, lock_path=None):
        raise PreflightError(f"{name}: half set up — run `make upstream`")

    monkeypatch.setattr(preflight, "check_upstream", refuse)
    out = tmp_path / "out"
    assert dschat_reward_model.main(["--output", str(out)]) == 2
    assert capsys.readouterr().err == "error: DeepSpeedExamples: half set up — run `make upstream`\n"
    assert dschat_ppo.main(["--output", str(out)]) == 2
    assert "DeepSpeedExamples: half set up" in capsys.readouterr().err
    assert trlx_ppo.main(["--output", str(out), "--steps", "1"]) == 2
    assert capsys.readouterr().err == "error: trlx: half set up — run `make upstream`\n"
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- CLI cases
@pytest.fixture
def no_upstream_check(monkeypatch):
    """The tree checks are tested above; here the other checks, whatever state this machine's upstream/ is in."""
    monkeypatch.setattr(preflight, "check_upstream", lambda name, lock_path=None: None)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


def refused(main, argv, capsys, *watch):
    """Run a CLI that must refuse: exit 2, one line on stderr starting with `error: `, nothing created/changed."""
    before = mf.snapshot(*watch)
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == 2, cap.err
    assert cap.err.startswith("error: ") and cap.err.count("\n") == 1 and "Traceback" not in cap.err, cap.err
    assert mf.snapshot(*watch) == before
    return cap.err.strip()


def test_architecture_must_fit_the_target(tiny_assets, tmp_path, capsys, no_upstream_check, offline):
    gptj, llama, bloom = (tiny_assets / "models" / f"tiny-{a}" for a in ("gptj", "llama", "bloom"))
    out = tmp_path / "out"
    data = tiny_assets / "data" / "preference"
    err = refused(dschat_reward_model.main, ["--model", str(gptj), "--data", str(data), "--output", str(out)],
                  capsys, gptj, data, tmp_path)
    assert err == (f"error: MODEL={gptj} is a gptj model, but `make rm-llama2` is a llama recipe (model_type llama / "
                   f"mistral) — use the gptj target if there is one, or pass ALLOW_ARCH=1 (--allow-arch) to try it "
                   f"anyway")
    err = refused(trlx_reward_model.main, ["--arch", "bloom", "--model", str(llama), "--output", str(out)], capsys,
                  llama, tmp_path)
    assert f"MODEL={llama} is a llama model, but `make rm-bloom` is a bloom recipe" in err
    err = refused(trlx_reward_model.main, ["--arch", "gptj", "--model", str(bloom), "--output", str(out)], capsys,
                  tmp_path)
    assert "is a bloom model, but `make rm-gptj` is a gptj recipe" in err
    # --allow-arch lets it through (a dry run prints the launch command and creates nothing)
    assert dschat_reward_model.main(["--model", str(gptj), "--data", str(data), "--allow-arch", "--dry-run"]) == 0
    assert "deepspeed.launcher.runner" in capsys.readouterr().out and not out.exists()


def test_names_that_are_neither_a_folder_nor_a_hub_id(tiny_assets, tmp_path, capsys, monkeypatch,
                                                      no_upstream_check, offline):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").mkdir()
    err = refused(dschat_reward_model.main, ["--model", "models/tinny", "--output", "out"], capsys, tmp_path)
    assert err == (f"error: MODEL='models/tinny': no such file or folder (did you mean models/tiny?) (read as a local "
                   f"path, relative to {tmp_path}) — check the path")
    err = refused(dschat_reward_model.main, ["--model", "someorg/llama-sft", "--output", "out"], capsys, tmp_path)
    assert err == (f"error: MODEL='someorg/llama-sft': no such local path, so it would be the hub model "
                   f"someorg/llama-sft, which is not in the local cache and the hub is off (HF_HUB_OFFLINE=1) — if you "
                   f"meant a local folder, check it (relative to {tmp_path}); if you meant the hub model, download it "
                   f"first (`huggingface-cli download someorg/llama-sft`) or unset HF_HUB_OFFLINE")
    llama = str(tiny_assets / "models" / "tiny-llama")
    err = refused(dschat_reward_model.main, ["--model", llama, "--data", "mydata/prefs", "--output", "out"], capsys,
                  tmp_path)
    assert "DATA='mydata/prefs': no such local path, so it would be the hub dataset mydata/prefs" in err
    err = refused(trlx_reward_model.main, ["--data", "mydata/prefs", "--output", "out"], capsys, tmp_path)
    assert err == ("error: data (DATA)='mydata/prefs': no such file or folder — pass a .json/.jsonl file or a folder "
                   "with train.jsonl (a relative path is taken from the current folder)")


def test_rm_llama2_with_only_model_does_not_fall_back_to_the_hub_silently(tiny_assets, tmp_path, capsys,
                                                                           no_upstream_check, offline):
    llama = str(tiny_assets / "models" / "tiny-llama")
    err = refused(dschat_reward_model.main, ["--model", llama, "--output", str(tmp_path / "out")], capsys, tmp_path)
    assert err == ("error: DATA is not set, so the llama2-7b recipe uses the hub dataset 'Dahoas/rm-static': no such "
                   "local path, so it would be the hub dataset Dahoas/rm-static, which is not in the local cache and "
                   "the hub is off (HF_HUB_OFFLINE=1) — pass DATA=<your local data file or folder>")


def test_cached_hub_ids_are_accepted_and_said_so(tmp_path, monkeypatch, capsys, offline):
    snap = tmp_path / "hf-home" / "hub" / "models--someorg--llama-sft" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "hf-home" / "hub" / "datasets--Dahoas--rm-static").mkdir(parents=True)
    r = preflight.check_model("someorg/llama-sft", "MODEL", (preflight.CAUSAL_LM,), "make rm-llama2")
    assert r.hub_id == "someorg/llama-sft" and r.local is None
    d = preflight.check_data("Dahoas/rm-static", default_of="the llama2-7b recipe")
    preflight.say(r, d)
    assert capsys.readouterr().err == (
        "note: MODEL='someorg/llama-sft': no such local path, so it is the hub model someorg/llama-sft (found in the "
        "local cache)\nnote: DATA is not set, so the llama2-7b recipe uses the hub dataset 'Dahoas/rm-static': no "
        "such local path, so it is the hub dataset Dahoas/rm-static (found in the local cache)\n")


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_truncated_weights_are_named_with_expected_and_actual_size(tiny_assets, tmp_path, capsys,
                                                                   no_upstream_check, layout):
    model = mf.causal_lm(tiny_assets, tmp_path / "model", "bloom")
    weights = model / "model.safetensors"
    if layout == "sharded":
        (model / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
        weights = weights.rename(model / "model-00001-of-00002.safetensors")
    elif layout == "bin":
        import torch
        from safetensors.torch import load_file
        torch.save(load_file(str(weights)), model / "pytorch_model.bin")
        weights.unlink()
        weights = model / "pytorch_model.bin"
    size = mf.truncate(weights, 5000)   # past the header (3 kB), inside the tensors
    out = tmp_path / "out"
    err = refused(trlx_reward_model.main, ["--model", str(model), "--output", str(out)], capsys, tmp_path)
    if layout == "sharded":   # the missing shard is named first
        assert err == (f"error: {model}: model.safetensors.index.json lists 1 shard(s) that are missing "
                       f"(model-00002-of-00002.safetensors) — copy the whole model folder")
        return
    if layout == "bin":
        assert err == (f"error: {weights} is truncated (5,000 bytes, its zip directory is missing) — copy or save the "
                       f"model again (an interrupted download or copy)")
        return
    assert err == (f"error: {weights} is truncated: 5,000 bytes, its header declares {size:,} — copy or save the "
                   f"model again (an interrupted download or copy)")
    llama = mf.causal_lm(tiny_assets, tmp_path / "llama")
    size = mf.truncate(llama / "model.safetensors", 100)
    err = refused(dschat_reward_model.main, ["--model", str(llama), "--data", str(tiny_assets / "data" / "preference"),
                                             "--output", str(out)], capsys, tmp_path)
    assert err.startswith(f"error: {llama / 'model.safetensors'} is truncated: 100 bytes, its header alone declares ")


def test_output_must_be_writable_and_empty(tiny_assets, tmp_path, capsys, no_upstream_check):
    if os.geteuid() == 0:   # root writes through permission bits; /proc/sys refuses even root
        readonly = "/proc/sys/rlhf-overlay-out"
        where = "would go in /proc/sys, which is"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        readonly = str(ro / "out")
        where = f"would go in {ro}, which is"
    err = refused(trlx_reward_model.main, ["--output", readonly], capsys, tmp_path)
    assert err == (f"error: OUTPUT={readonly} {where} not writable (read-only or no permission) — pass "
                   f"OUTPUT=<a folder you can write>")
    full = tmp_path / "full"
    full.mkdir()
    (full / "model.safetensors").write_text("an earlier model")
    err = refused(trlx_ppo.main, ["--output", str(full), "--steps", "1"], capsys, tmp_path)
    assert "is not empty (it holds an earlier run)" in err and "OVERWRITE=1" in err
    (tmp_path / "afile").write_text("x")
    err = refused(dschat_reward_model.main, ["--output", str(tmp_path / "afile" / "out")], capsys, tmp_path)
    assert "is a file, so the folder cannot be made" in err


def test_consumers_refuse_the_wrong_kind_of_folder_by_name(tiny_assets, tmp_path, capsys, no_upstream_check):
    critic = mf.dschat_critic(tiny_assets, tmp_path / "critic")
    rm = mf.trlx_rm(tiny_assets, tmp_path / "rm-run" / "reward_model")
    (tmp_path / "rm-run" / "command.txt").write_text("x\n")
    (tmp_path / "rm-run" / "config.json").write_text("{}")
    policy = mf.causal_lm(tiny_assets, tmp_path / "policy", "bloom")
    ckpt = mf.trlx_checkpoint(tiny_assets, tmp_path / "checkpoint_01")
    out = str(tmp_path / "out")
    D = preflight.DESCRIBE
    err = refused(dschat_ppo.main, ["--actor", str(critic), "--critic", str(critic), "--output", out], capsys, tmp_path)
    assert err == f"error: ACTOR={critic} is {D[preflight.DSCHAT_CRITIC]} — make ppo-llama2 takes {D[preflight.CAUSAL_LM]}"
    llama = str(tiny_assets / "models" / "tiny-llama")
    err = refused(dschat_ppo.main, ["--actor", llama, "--critic", str(rm), "--output", out], capsys, tmp_path)
    assert err == (f"error: critic={str(rm)!r}: it is {D[preflight.TRLX_RM]} — the critic must be a reward model "
                   f"saved by `make rm-llama2`, not a plain base model")
    err = refused(trlx_ppo.main, ["--rm", str(critic), "--output", out, "--steps", "1"], capsys, tmp_path)
    assert err == f"error: RM={critic} is {D[preflight.DSCHAT_CRITIC]} — make ppo-bloom takes {D[preflight.TRLX_RM]}"
    err = refused(trlx_ppo.main, ["--model", str(rm), "--rm", str(rm), "--output", out, "--steps", "1"], capsys,
                  tmp_path)
    assert err == f"error: MODEL={rm} is {D[preflight.TRLX_RM]} — make ppo-bloom takes {D[preflight.CAUSAL_LM]}"
    err = refused(trlx_reward_model.main, ["--model", str(ckpt), "--output", out], capsys, tmp_path)
    assert err == (f"error: MODEL={ckpt} is {D[preflight.TRLX_CHECKPOINT]} — make rm-bloom takes "
                   f"{D[preflight.CAUSAL_LM]}; its exported policy is {ckpt / 'hf_model'}")
    err = refused(eval_rm.main, ["--rm", str(policy), "--output", out], capsys, tmp_path)
    assert err == (f"error: RM={policy} is not a DeepSpeed-Chat reward model or a trlx value-head reward model: it is "
                   f"{D[preflight.CAUSAL_LM]} — pass the model folder written by `make rm-llama2` or the "
                   f"reward_model/ folder of `make rm-bloom` / `make rm-gptj`")
    err = refused(eval_rm.main, ["--rm", str(ckpt), "--output", out], capsys, tmp_path)
    assert f"RM={ckpt} is {D[preflight.TRLX_CHECKPOINT]}, not a reward model" in err
    # a run folder is followed to the model of the kind asked for
    r = preflight.check_model(str(tmp_path / "rm-run"), "RM", (preflight.TRLX_RM,), "make ppo-bloom")
    assert r.local == rm and r.note == f"RM={tmp_path / 'rm-run'}: using its {preflight.TRLX_RM} {rm}"
    assert preflight.folder_kind(tmp_path / "rm-run") == preflight.RUN_FOLDER


def test_folder_kind_tells_every_folder_this_project_writes(tiny_assets, tmp_path):
    P = preflight
    kinds = {
        P.CAUSAL_LM: [mf.causal_lm(tiny_assets, tmp_path / "policy", "bloom"), mf.dschat_actor(tiny_assets, tmp_path / "actor")],
        P.DSCHAT_CRITIC: [mf.dschat_critic(tiny_assets, tmp_path / "critic")],
        P.TRLX_RM: [mf.trlx_rm(tiny_assets, tmp_path / "reward_model")],
        P.TRLX_CHECKPOINT: [mf.trlx_checkpoint(tiny_assets, tmp_path / "checkpoint_01")],
        P.MEGATRON_CHECKPOINT: [mf.megatron(tmp_path / "mg")],
        P.RUN_FOLDER: [mf.run_folder(tmp_path / "run", "actor", lambda o: mf.dschat_actor(tiny_assets, o))],
        P.NOT_A_MODEL: [tmp_path / "missing"],
    }
    ds = tmp_path / "ds-ckpt"
    (ds / "global_step10").mkdir(parents=True)
    (ds / "latest").write_text("global_step10")
    kinds[P.DEEPSPEED_CHECKPOINT] = [ds]
    for kind, folders in kinds.items():
        for folder in folders:
            assert P.folder_kind(folder) == kind, folder
    assert P.find_in_run_folder(tmp_path / "run", P.CAUSAL_LM) == tmp_path / "run" / "actor"
    assert P.find_in_run_folder(tmp_path / "run", P.TRLX_RM) is None
    assert P.not_a_model_reason(tmp_path / "missing") == "no such folder"


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dschat_reward_model, "run", interrupted)
    assert dschat_reward_model.main([]) == 130
    assert capsys.readouterr().err == "\nerror: interrupted (Ctrl-C)\n"
    monkeypatch.setattr(trlx_reward_model, "run", interrupted)
    assert trlx_reward_model.main([]) == 130
    assert capsys.readouterr().err == "\nerror: interrupted (Ctrl-C)\n"
    monkeypatch.setattr(trlx_ppo, "run", interrupted)
    assert trlx_ppo.main([]) == 130
    assert capsys.readouterr().err == "\nerror: interrupted (Ctrl-C)\n"
    monkeypatch.setattr(eval_rm, "evaluate", interrupted)
    assert eval_rm.main(["--rm", "x"]) == 130
    assert capsys.readouterr().err == "\nerror: interrupted (Ctrl-C)\n"


@pytest.mark.slow
def test_ctrl_c_during_a_real_run_prints_no_traceback(tiny_assets, tmp_path):
    """SIGINT to the whole process group (what a terminal's Ctrl-C does) while the reward model trains."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_overlay.trlx_jobs.reward_model", "--output", str(out),
                             "--max-steps", "100000"], cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (out / "training.log").is_file():
        time.sleep(0.5)
    time.sleep(8)   # into the worker's training
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "Traceback" not in stdout, (stdout[-3000:], stderr[-3000:])
    assert stderr.strip().splitlines()[-1] == "error: interrupted (Ctrl-C)"
