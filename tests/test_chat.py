"""make chat: one-shot answers for scripts, interactive loop, and clear errors for folders that are not policies."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rlhf_overlay import PROJECT_ROOT, chat


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
    res = subprocess.run([sys.executable, "-m", "rlhf_overlay.chat", "--model", str(model), "--max-new-tokens", "4"],
                         input="hello\nclear\nhow are you\nquit\n", capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("Assistant:") == 2


def test_bad_model_folders_fail_clearly(tmp_path, capsys):
    assert chat.main(["--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert chat.main(["--model", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    from safetensors.torch import save_file
    (tmp_path / "config.json").write_text("{}")
    save_file({"base_model.transformer.wte.weight": torch.zeros(2, 2), "v_head.weight": torch.zeros(1, 2)},
              str(tmp_path / "model.safetensors"))
    assert chat.main(["--model", str(tmp_path)]) == 2
    assert "wrapped checkpoint" in capsys.readouterr().err
    # a DeepSpeed-Chat critic folder (pytorch_model.bin with rwtransformer.* + v_head.weight)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"rwtransformer.embed_tokens.weight": torch.zeros(2, 2), "v_head.weight": torch.zeros(1, 2)},
               tmp_path / "pytorch_model.bin")
    assert chat.main(["--model", str(tmp_path)]) == 2
    assert "wrapped checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        chat.main(["--help"])


def test_make_chat_without_model_says_what_to_pass():
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "PROMPT")}
    res = subprocess.run(["make", "-s", "chat"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "pass MODEL=" in res.stderr
