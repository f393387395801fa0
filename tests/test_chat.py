"""make chat: one-shot answers for scripts, interactive loop, and clear errors for folders that are not policies."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import model_folders
from rlhf_overlay import PROJECT_ROOT
from rlhf_overlay.tools import chat
from rlhf_overlay.runtime import preflight
def test_prompt_mode_answers_once(tiny_assets, capsys):
    model = tiny_assets / "models" / "tiny-llama"
    assert chat.main(["--model", str(model), "--prompt", "tell me about the garden", "--max-new-tokens", "8"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer, "greedy generation from a random model still produces some text"
    # greedy decoding is deterministic
    assert chat.main(["--model", str(model), "--prompt", "tell me about the garden", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == answer


def test_make_chat_prompt_through_the_script(tiny_assets):
    env = dict(os.environ, MODEL=str(tiny_assets / "models" / "tiny-bloom"), PROMPT="hello")
    res = subprocess.run(["make", "-s", "chat"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip()


def test_interactive_loop_keeps_history_and_quits(tiny_assets):
    model = tiny_assets / "models" / "tiny-gptj"
    res = subprocess.run([sys.executable, "-m", "rlhf_overlay.tools.chat", "--model", str(model), "--max-new-tokens", "4"],
                         input="hello\nclear\nhow are you\nquit\n", capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("Assistant:") == 2


def test_bad_model_folders_fail_clearly(tmp_path, capsys):
    assert chat.main(["--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: MODEL=") and "no such file or folder" in err and "Traceback" not in err
    assert chat.main(["--model", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert chat.main(["--model", str(tmp_path)]) == 2
    assert "not a Hugging Face model config (no model_type)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        chat.main(["--help"])


@pytest.mark.parametrize("kind, build, says", [
    ("dschat_critic", model_folders.dschat_critic, "is a DeepSpeed-Chat critic (reward model) written by `make rm-llama2`"),
    ("trlx_rm", model_folders.trlx_rm, "is a trlx value-head reward model written by `make rm-bloom`"),
    ("trlx_checkpoint", model_folders.trlx_checkpoint, "is a trlx training checkpoint"),
    ("megatron", lambda assets, out: model_folders.megatron(out), "is a Megatron checkpoint (convert it"),
    ("empty_run", lambda assets, out: model_folders.run_folder(out), "is a run folder — make chat takes a causal"),
])
def test_every_other_kind_of_folder_is_refused_by_name(tiny_assets, tmp_path, capsys, kind, build, says):
    folder = build(tiny_assets, tmp_path / kind)
    before = model_folders.snapshot(tmp_path)
    assert chat.main(["--model", str(folder), "--prompt", "hello"]) == 2
    out = capsys.readouterr()
    assert out.err.startswith(f"error: MODEL={folder} ") and says in out.err, out.err
    assert out.err.count("\n") == 1 and out.out == ""
    if kind == "trlx_checkpoint":
        assert f"its exported policy is {folder / 'hf_model'}" in out.err
    assert model_folders.snapshot(tmp_path) == before


def test_policies_actors_and_run_folders_are_accepted(tiny_assets, tmp_path, capsys):
    actor = model_folders.dschat_actor(tiny_assets, tmp_path / "actor")
    cfg = chat.ChatConfig(model=str(actor))
    cfg.validate()
    assert cfg.model == str(actor)
    run = model_folders.run_folder(tmp_path / "ppo-run", "policy",
                                   lambda out: model_folders.causal_lm(tiny_assets, out, "bloom"))
    assert chat.main(["--model", str(run), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    assert f"using its causal LM {run / 'policy'}" in out.err and out.out.strip()


def test_truncated_weights_are_named_with_their_sizes(tiny_assets, tmp_path, capsys):
    model = model_folders.causal_lm(tiny_assets, tmp_path / "m")
    size = model_folders.truncate(model / "model.safetensors", 4096)
    assert chat.main(["--model", str(model), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {model / 'model.safetensors'} is truncated: 4,096 bytes, its header declares {size:,} — "
                   f"copy or save the model again (an interrupted download or copy)\n")


def test_make_chat_refuses_a_reward_model(tiny_assets, tmp_path):
    """The issue's case: a value-head RM used to load as a chat model and print `::::::::` with exit 0."""
    rm = model_folders.trlx_rm(tiny_assets, tmp_path / "reward_model")
    env = dict(os.environ, MODEL=str(rm), PROMPT="hello")
    res = subprocess.run(["make", "-s", "chat"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.splitlines()[0] == (f"error: MODEL={rm} is {preflight.DESCRIBE[preflight.TRLX_RM]} — make chat takes "
                                  f"{preflight.DESCRIBE[preflight.CAUSAL_LM]}")


def test_hub_ids_that_are_not_cached_are_refused_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert chat.main(["--model", "someorg/some-model", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no such local path, so it would be the hub model someorg/some-model" in err and "HF_HUB_OFFLINE=1" in err


def test_make_chat_without_model_says_what_to_pass():
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "PROMPT")}
    res = subprocess.run(["make", "-s", "chat"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "pass MODEL=" in res.stderr
