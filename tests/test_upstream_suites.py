"""rlhf_overlay.engine.upstream_tests / hub_standins / upstream_tests_plugin: trlx's own test suite against our patched
tree, offline on tiny stand-ins (`make upstream-tests`), and the pieces it is built from.

The full run (test_trlx_suite_passes_on_the_patched_tree) needs upstream/trlx and is skipped, with the reason,
without it; it takes ~2-3 min on 2 cores.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from rlhf_overlay.engine import hub_standins

from rlhf_overlay.engine import upstream_tests

from rlhf_overlay.engine import upstream_tests_plugin
# ---------------------------------------------------------------------------------------------- unit
def test_named_hub_ids_reads_the_places_suites_name_models(tmp_path):
    suite = tmp_path / "test_x.py"
    suite.write_text(textwrap.dedent('''
        PATHS = ["gpt2", "org/model-a"]
        MODEL_TASK_TYPE = {"org/model-b": "causal"}
        def test_a():
            tok = AutoTokenizer.from_pretrained("org/tok-c")
            cfg = ModelConfig(model_path="org/model-d", tokenizer_path="gpt2")
            model_id = "org/model-e"
            name = "not a hub id"
        @pytest.mark.parametrize("model_name", ["org/model-f"])
        def test_b(model_name):
            pass
        '''))
    found = hub_standins.named_hub_ids([suite])
    assert set(found) == {"gpt2", "org/model-a", "org/model-b", "org/tok-c", "org/model-d", "org/model-e",
                          "org/model-f"}
    assert found["org/tok-c"] == ["test_x.py:5"]


def test_suite_texts_are_the_sentences(tmp_path):
    suite = tmp_path / "test_y.py"
    suite.write_text('TEXT = "Once upon a time"\nNAME = "gpt2"\nX = "two words"\n')
    assert hub_standins.suite_texts([suite]) == ["Once upon a time"]


def test_junit_parsing_counts_and_reasons(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text(textwrap.dedent('''\
        <?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
        <testcase classname="tests.test_models.TestA" name="test_ok" time="0.1" />
        <testcase classname="tests.test_models.TestA" name="test_bad" time="0.1">
          <failure message="AssertionError: 1 != 0&#10;more">trace</failure></testcase>
        <testcase classname="tests.test_utils" name="test_p[x]" time="0.0">
          <skipped type="pytest.skip" message="rlhf-overlay: needs a GPU">why</skipped></testcase>
        <testcase classname="" name="tests.test_peft" time="0.0">
          <error message="collection failure">E   ImportError: cannot import name 'x'</error></testcase>
        </testsuite></testsuites>'''))
    result = upstream_tests.FileResult("trlx", "test_models.py")
    upstream_tests.parse_junit(junit, result)
    assert (result.passed, result.failed, result.skipped, result.errors) == (1, 1, 1, 1)
    assert result.skips == [["tests/test_utils.py::test_p[x]", "rlhf-overlay: needs a GPU"]]
    assert ["tests/test_models.py::TestA::test_bad", "AssertionError: 1 != 0"] in result.failures
    assert ["tests/test_peft.py", "ERROR: ImportError: cannot import name 'x'"] in result.failures
    table = upstream_tests.format_table([result], "T")
    assert "| trlx | test_models.py | 1 | 1 | 1 | 1 |" in table and "needs a GPU" in table


def test_known_skips_give_reasons():
    for suite, table in upstream_tests_plugin.KNOWN_SKIPS.items():
        assert suite in upstream_tests.suites()
        for nodeid, reason in table.items():
            assert nodeid.startswith(("tests/", "test_training.py::")) and len(reason) > 40, (nodeid, reason)


def test_dschat_matrix_skips_exactly_the_hybrid_engine_cells():
    for suite in upstream_tests_plugin.DSCHAT_SUITES:
        skipped = set(upstream_tests_plugin.KNOWN_SKIPS[suite])
        cells = {f"test_training.py::test_ds_chat[{z}-{he}-{o}-{lo}]" for z in ("zero2", "zero3")
                 for he in ("he", "") for o in ("offload", "") for lo in ("lora", "")}
        assert skipped == {c for c in cells if "-he-" in c} and len(skipped) == 8
        assert all("CUDA" in r and "NotImplementedBuilder" in r for r in upstream_tests_plugin.KNOWN_SKIPS[suite].values())


def test_deepspeed_shim_rewrites_only_what_cpu_and_offline_need():
    # the command run_single.sh builds for the LoRA + offload cell (abridged), as the `deepspeed` on PATH gets it
    argv = ("--num_nodes=1 main.py --data_path Dahoas/rm-static --data_split 2,4,4 --actor_model_name_or_path "
            "facebook/opt-125m --critic_model_name_or_path /c --num_padding_at_beginning 1 "
            "--per_device_generation_batch_size 4 --max_answer_seq_len 256 --actor_zero_stage 3 --critic_zero_stage 3 "
            "--output_dir z3_he_false_offload_true_lora_true --offload --actor_lora_dim 128 "
            "--actor_lora_module_name decoder.layers. --enable_test_mode --test_stop_step 5").split()
    env = {"RLHF_DSCHAT_DATA": "/tiny/prompts", "RLHF_DSCHAT_MODEL": "opt", "RLHF_DSCHAT_ACTOR": "/tiny/llama"}
    cmd, notes = upstream_tests.shim_command(argv, env, 4242, health_guard=False)
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    launcher, args = cmd[3:cmd.index("main.py")], cmd[cmd.index("main.py") + 1:]
    assert launcher == ["--num_nodes=1", "--num_gpus", "2", "--master_port", "4242"]
    expected = list(argv[argv.index("main.py") + 1:])
    expected[expected.index("Dahoas/rm-static")] = "/tiny/prompts"
    assert args == expected + ["--data_output_path", "z3_he_false_offload_true_lora_true/data_cache"]
    assert len(notes) == 3 and any("Dahoas/rm-static -> /tiny/prompts" in n for n in notes)
    # the LLaMA row: actor, LoRA module names and padding follow the tiny LLaMA; ZeRO/offload/LoRA rank stay
    cmd, notes = upstream_tests.shim_command(argv, dict(env, RLHF_DSCHAT_MODEL="llama"), 4242, health_guard=False)
    args = cmd[cmd.index("main.py") + 1:]
    value = {a: b for a, b in zip(args, args[1:])}
    assert value["--actor_model_name_or_path"] == "/tiny/llama" and value["--actor_lora_module_name"] == "layers."
    assert value["--num_padding_at_beginning"] == "0" and value["--actor_lora_dim"] == "128"
    assert value["--actor_zero_stage"] == "3" and "--offload" in args and len(notes) == 6
    # with our health guard in the tree: upstream's behaviour (warn, never stop) unless the command chose
    cmd, notes = upstream_tests.shim_command(argv, env, 4242, health_guard=True)
    assert cmd[-2:] == ["--on_unhealthy", "warn"] and len(notes) == 4 and "DSE patch 0024" in notes[-1]
    cmd, _ = upstream_tests.shim_command(argv + ["--on_unhealthy", "stop"], env, 4242, health_guard=True)
    assert cmd.count("--on_unhealthy") == 1 and cmd[cmd.index("--on_unhealthy") + 1] == "stop"
    with pytest.raises(upstream_tests.UpstreamTestsError, match="no main.py"):
        upstream_tests.shim_command(["--num_gpus", "2", "train.py"], env, 1)


def test_bad_input_is_one_error_line(tmp_path, capsys):
    rc = upstream_tests.main(["--suite", "nope", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --suite nope: unknown suite")


# ---------------------------------------------------------------------------------------------- trlx
@pytest.mark.upstream
def test_every_hub_id_the_trlx_suite_names_has_a_standin(trlx_dir):
    files = [trlx_dir / "tests" / f for f in upstream_tests.suites()["trlx"].files]
    named = hub_standins.named_hub_ids(files)
    assert "gpt2" in named and "facebook/opt-125m" in named   # the scanner sees them at all
    missing = {k: v for k, v in named.items() if k not in hub_standins.STANDINS}
    assert not missing, f"hub ids the trlx suite names without a stand-in (add them to STANDINS): {missing}"


@pytest.mark.upstream
def test_standins_load_offline_like_the_hub(trlx_dir, monkeypatch):
    import transformers

    files = [trlx_dir / "tests" / f for f in upstream_tests.suites()["trlx"].files]
    hf_home = hub_standins.ensure_standins(texts=hub_standins.suite_texts(files))
    code = textwrap.dedent('''
        import json, sys, transformers
        out = {}
        for hub_id in json.loads(sys.argv[1]):
            tok = transformers.AutoTokenizer.from_pretrained(hub_id)
            cfg = transformers.AutoConfig.from_pretrained(hub_id)
            out[hub_id] = [cfg.model_type, cfg.vocab_size, len(tok),
                           len(tok("Once upon a time there was a happy goose named Louis.").input_ids)]
        print(json.dumps(out))
        ''')
    env = upstream_tests.suite_env(hf_home)
    res = subprocess.run([sys.executable, "-c", code, json.dumps(list(hub_standins.STANDINS))], env=env,
                         capture_output=True, text=True, timeout=300, cwd="/")
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["gpt2"][0] == "gpt2" and info["facebook/opt-125m"][0] == "opt" and info["t5-small"][0] == "t5"
    for hub_id, (model_type, vocab, tok_len, n_tokens) in info.items():
        spare = hub_standins.SPARE_ROWS[hub_standins.STANDINS[hub_id].family]
        assert vocab == tok_len + spare, hub_id
        assert n_tokens <= 14, f"{hub_id}: the suite's sentence takes {n_tokens} tokens (real GPT-2: 12)"
    assert transformers.__version__ == "4.44.2"   # the stand-ins' layout is the hub cache of this version


@pytest.mark.upstream
@pytest.mark.slow
def test_trlx_suite_passes_on_the_patched_tree(trlx_dir, tmp_path):
    """`make upstream-tests`: every test of trlx's own suite passes or is skipped with a reason; the skips are
    exactly upstream's own `unittest.skip`s and our KNOWN_SKIPS (CUDA-only bitsandbytes)."""
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "rlhf_overlay.engine.upstream_tests", "--suite", "trlx", "--out", str(out)],
                         capture_output=True, text=True, timeout=1500)
    assert (out / "table.md").is_file(), res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["file"] for r in results] == list(upstream_tests.suites()["trlx"].files)
    failures = [f for r in results for f in r["failures"]]
    assert res.returncode == 0 and not failures, "\n".join(map(str, failures)) + "\n" + res.stdout[-3000:]
    assert all(r["passed"] > 0 for r in results), results
    assert sum(r["passed"] for r in results) >= 70
    for r in results:
        assert (out / "junit" / f"trlx-{r['file'][:-3]}.xml").is_file()
    skips = {n: reason for r in results for n, reason in r["skips"]}
    assert all(reason for reason in skips.values()), skips
    ours = {n for n, reason in skips.items() if reason.startswith("rlhf-overlay: ")}
    assert ours == set(upstream_tests_plugin.KNOWN_SKIPS["trlx"])
    upstream_own = {n for n in skips if n not in ours}
    assert upstream_own == {"tests/test_models.py::TestAutoModelForSeq2SeqLMWithHydraValueHead::test_forward",
                            "tests/test_models.py::TestAutoModelForSeq2SeqLMWithHydraValueHead::test_lm_heads",
                            "tests/test_peft.py::TestPeft::test_8bits"}


# ---------------------------------------------------------------------------------------------- DeepSpeed-Chat
# DeepSpeed-Chat's tests/test_training.py, unchanged, against our tree (README "DeepSpeed-Chat's own matrix"; all 16
# cells x 2 rows run in `make upstream-tests`, the 8 hybrid-engine cells per row skipped there with the reason). Here:
# the whole tiny-LLaMA row (8 cells, ~7 min on 2 cores: its answers end at EOS) and one OPT cell (the random OPT
# stand-in never ends an answer, so its ZeRO-3 cells generate 256 tokens without a KV cache, DSE patch 0022: ~8 min
# each; its ZeRO-2 cells take 0.5-2 min); plus ~1 min once per row to train and cache its step-2 critic.
@pytest.mark.upstream
@pytest.mark.slow
@pytest.mark.parametrize("suite,cells,passed", [("dschat", "zero2--- and not lora", 1), ("dschat-llama", "", 8)],
                         ids=["dschat-zero2", "dschat-llama-row"])
def test_dschat_matrix_passes_on_the_patched_tree(dschat_dir, tmp_path, suite, cells, passed):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "rlhf_overlay.engine.upstream_tests", "--suite", suite, "--out",
                          str(out), *(["--", "-k", cells] if cells else [])],
                         capture_output=True, text=True, timeout=2400)
    assert (out / "results.json").is_file(), res.stdout[-3000:] + res.stderr[-3000:]
    [result] = json.loads((out / "results.json").read_text())
    log = (out / "logs" / f"{suite}-test_training.log").read_text()
    assert res.returncode == 0 and (result["passed"], result["failed"], result["errors"]) == (passed, 0, 0), log[-5000:]
    if not cells:   # the whole row: the 8 hybrid-engine cells skipped, each with the reason
        assert result["skipped"] == 8 and all("-he-" in n and "CUDA" in why for n, why in result["skips"])
    assert (out / "junit" / f"{suite}-test_training.xml").is_file()
    # each cell's output was moved out of the upstream tree, which is as it was
    cell_dirs = sorted((out / "artifacts" / suite).iterdir())
    assert len(cell_dirs) == passed
    for cell_dir in cell_dirs:
        assert (cell_dir / "actor" / "pytorch_model.bin").is_file() and (cell_dir / "critic" / "pytorch_model.bin").is_file()
        assert not (dschat_dir / "training" / "step3_rlhf_finetuning" / cell_dir.name).exists()
        cell_log = (cell_dir / f"{cell_dir.name}.log").read_text()
        assert "[rlhf-overlay deepspeed shim] --data_path Dahoas/rm-static ->" in cell_log
        assert "dist_world_size=2" in cell_log and "PPO step time" in cell_log
        assert f"actor_zero_stage={cell_dir.name[1]}" in cell_log   # z<stage>_he_false_offload_..._lora_...
        if suite == "dschat-llama" and cell_dir.name.endswith("lora_true"):
            assert "--actor_lora_module_name decoder.layers. -> layers." in cell_log
