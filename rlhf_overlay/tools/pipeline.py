"""The seed's whole chain in one command: `make pipeline-llama2`, `make pipeline-bloom`.

    Megatron SFT checkpoint -> HF (mg2hf) -> reward model -> PPO -> the policy back to Megatron (the input's TP/PP)
    -> that checkpoint back to HF once more, whose logits must equal the PPO policy's.

Each stage is a subprocess that reads the previous stage's files and writes its own folder of the run folder:

    0-megatron-sft/      tiny default only: the pre-trained tiny base (make assets) written as a Megatron checkpoint
                         (hf2mg, legacy format; LLaMA2 TP=2 PP=2, BLOOM TP=2), standing in for a Megatron SFT run
    1-sft-hf/            mg2hf of MEGATRON_SFT (tokenizer: TOKENIZER, default the tiny model's / the checkpoint's)
    2-reward-model/      rm-llama2 (DeepSpeed-Chat step 2) / rm-bloom (trlx value head) on that HF model, DATA
    3-ppo/               ppo-llama2 (DeepSpeed-Chat step 3) / ppo-bloom (trlx) with that reward model
    4-megatron-policy/   hf2mg of the PPO policy with the TP/PP of MEGATRON_SFT
    5-check/             mg2hf of 4-megatron-policy and a logits comparison with the PPO policy (logits.json)
    summary.md           links to every stage's report and the end result: RM accuracy, reward rise, KL per answer
                         token, fluency, and whether the final Megatron checkpoint gives the HF policy's logits

A stage is done when its folder holds STAGE_DONE.json; `RESUME=<pipeline folder>` skips done stages and redoes an
unfinished one from scratch (its folder is removed first).

    make pipeline-llama2                                  # tiny default, CPU, a few minutes -> runs/pipeline-llama2-<time>/
    make pipeline-bloom
    make pipeline-llama2 RESUME=runs/pipeline-llama2-20261129-120000
    make pipeline-llama2 MEGATRON_SFT=/ckpt/llama2-7b-sft TOKENIZER=/models/Llama-2-7b-hf DATA=/data/prefs NUM_GPUS=8
    python -m rlhf_overlay.tools.pipeline run --family bloom --dry-run    # settings + every stage's command
    python -m rlhf_overlay.tools.pipeline run --help
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from rlhf_overlay import settings
from rlhf_overlay.errors import UserError, main_guard

FAMILIES = ("llama2", "bloom")
TINY_LAYOUT = {"llama2": (2, 2), "bloom": (2, 1)}   # (TP, PP) of the tiny default's Megatron checkpoint
TINY_MODEL = {"llama2": "tiny-llama", "bloom": "tiny-bloom"}
STAGES = ("0-megatron-sft", "1-sft-hf", "2-reward-model", "3-ppo", "4-megatron-policy", "5-check")
DONE = "STAGE_DONE.json"
LOGITS_TOLERANCE = 1e-4   # fp32 all the way: the conversions only move and split tensors


class PipelineError(UserError, RuntimeError):
    """Bad pipeline input (the message says what and what to do)."""


@dataclass
class PipelineConfig:
    family: str = field(default="llama2", metadata={"help": "llama2 (DeepSpeed-Chat stages) | bloom (trlx stages)",
                                                    "choices": FAMILIES})
    megatron_sft: str = field(default="", metadata={"help": "Megatron SFT checkpoint: its root, an iter_*/ or "
                                                            "release/ folder (MEGATRON_SFT; empty: the tiny stand-in)"})
    tokenizer: str = field(default="", metadata={"help": "HF tokenizer folder for mg2hf (TOKENIZER; empty: the tiny "
                                                         "model's in the tiny default, else the checkpoint's)"})
    data: str = field(default="", metadata={"help": "preference data for the reward model and, its prompts, for PPO "
                                                    "(DATA; empty: the embedded data)"})
    output: str = field(default="", metadata={"help": "pipeline folder (OUTPUT; empty: runs/pipeline-<family>-<time>)"})
    resume: str = field(default="", metadata={"help": "an earlier pipeline folder: skip its done stages (RESUME)"})
    num_gpus: int = field(default=0, metadata={"help": "ranks per node for the training stages (NUM_GPUS; 0: their "
                                                       "default)"})
    dry_run: bool = field(default=False, metadata={"help": "print the resolved settings and every stage's command; "
                                                           "run nothing, create nothing"})

    @property
    def tiny(self) -> bool:
        return not self.megatron_sft

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise PipelineError(f"family={self.family!r}: must be one of {', '.join(FAMILIES)}")
        if self.megatron_sft and not Path(self.megatron_sft).expanduser().exists():
            raise PipelineError(f"MEGATRON_SFT={self.megatron_sft}: no such folder — pass the Megatron SFT "
                                f"checkpoint (its root, an iter_*/ or release/ folder)")
        if self.tokenizer and not Path(self.tokenizer).expanduser().is_dir():
            raise PipelineError(f"TOKENIZER={self.tokenizer}: not a folder — pass the HF tokenizer folder of the "
                                f"SFT model (tokenizer.json / tokenizer.model)")
        if self.data and not Path(self.data).expanduser().exists():
            raise PipelineError(f"DATA={self.data}: no such file or folder")
        if self.resume:
            r = Path(self.resume).expanduser()
            if not (r / "pipeline.json").is_file():
                raise PipelineError(f"RESUME={self.resume}: not a pipeline folder (no pipeline.json) — pass the "
                                    f"folder an earlier `make pipeline-{self.family}` printed")
            earlier = json.loads((r / "pipeline.json").read_text())["config"]
            if earlier["family"] != self.family:
                raise PipelineError(f"RESUME={self.resume}: a pipeline-{earlier['family']} folder, not "
                                    f"pipeline-{self.family}")
        if self.num_gpus < 0:
            raise PipelineError(f"NUM_GPUS={self.num_gpus}: must be >= 1")


# ---------------------------------------------------------------------------------------------- helpers
def _python() -> list[str]:
    return [sys.executable, "-m"]


def run_stage_command(cmd: list[str], folder: Path, name: str) -> None:
    """Run one stage's command; its output goes to the terminal and to <folder>/stage.log."""
    from rlhf_overlay import PROJECT_ROOT
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "command.txt", "a", encoding="utf-8") as f:   # every command the stage ran, in order
        f.write(" ".join(_quote(c) for c in cmd) + "\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("RLHF_OVERLAY_RUN_DIRS_FILE", None)   # the pipeline writes its own summary
    env.pop("RESUME", None)                       # the pipeline's RESUME is not a stage's
    with open(folder / "stage.log", "a", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(f"[{name}] {line}")
            log.write(line)
        rc = proc.wait()
    if rc != 0:
        raise StageFailed(f"stage {name} failed (exit {rc}); see {folder / 'stage.log'}")


class StageFailed(RuntimeError):
    pass


def _quote(s: str) -> str:
    import shlex
    return shlex.quote(str(s))


def checkpoint_layout(path: Path) -> dict:
    """TP, PP and format of a Megatron checkpoint (read by the converter's own reader)."""
    from toolkits.megatron_hf.megatron_format import MegatronCheckpoint

    from toolkits.megatron_hf.megatron_format import arg

    ckpt = MegatronCheckpoint.open(path)
    fmt = getattr(ckpt, "format", "legacy")
    if fmt == "torch_dist":   # one sharded checkpoint, not TP x PP rank files: the run's layout is in its args
        return {"tp": arg(ckpt.args, "tensor_model_parallel_size", default=1),
                "pp": arg(ckpt.args, "pipeline_model_parallel_size", default=1), "format": fmt}
    return {"tp": ckpt.tp, "pp": ckpt.pp, "format": fmt}


def hf2mg_format_flags(fmt: str = "legacy") -> list[str]:
    """hf2mg writes the legacy format unless told otherwise; if it has grown an output-format option, ask for
    `fmt` explicitly (found in its --help, so a renamed option does not break the pipeline)."""
    out = subprocess.run(_python() + ["toolkits.megatron_hf.convert", "hf2mg", "--help"], capture_output=True,
                         text=True, cwd=_root())
    for opt, choices in re.findall(r"(--[\w-]*format[\w-]*) \{([^}]*)\}", out.stdout):
        if fmt in choices.split(","):
            return [opt, fmt]
    return []


def _root() -> Path:
    from rlhf_overlay import PROJECT_ROOT
    return PROJECT_ROOT


def tiny_flags(cls, arch: str, model: Path, **extra) -> list[str]:
    """The flags that make a trlx entry module use its tiny-default settings with MODEL given (with a model it
    would pick the seed's recipe for big models): every resolved setting where the two differ."""
    import dataclasses

    tiny = cls(arch=arch, **extra).resolve()
    own = cls(arch=arch, model=str(model), **extra).resolve()
    flags = []
    for f in dataclasses.fields(cls):
        a, b = getattr(tiny, f.name), getattr(own, f.name)
        if f.name in ("model", "run_kind") or a == b:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(a, bool):
            if a:
                flags.append(flag)
        else:
            flags += [flag, str(a)]
    return flags


def write_report(run: Path, folder: Path, name: str) -> None:
    """report.png + summary.md of a training stage's run folder (what `make rm-*`/`make ppo-*` write after a run)."""
    run_stage_command(_python() + ["rlhf_overlay.tools.report", str(run)], folder, name)


def _scalars(tb_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags().get("scalars", [])}


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# ---------------------------------------------------------------------------------------------- stages
class Pipeline:
    def __init__(self, cfg: PipelineConfig, run_dir: Path):
        self.cfg, self.run = cfg, run_dir

    def folder(self, stage: str) -> Path:
        return self.run / stage

    def done(self, stage: str) -> dict | None:
        f = self.folder(stage) / DONE
        return json.loads(f.read_text()) if f.is_file() else None

    def stage(self, stage: str, fn) -> dict:
        result = self.done(stage)
        if result is not None:
            print(f"[pipeline] {stage}: done in an earlier run, skipped", flush=True)
            return result
        folder = self.folder(stage)
        if folder.exists():   # unfinished: start it over
            shutil.rmtree(folder)
        print(f"[pipeline] {stage}: starting", flush=True)
        t0 = time.time()
        result = fn(folder)
        result["seconds"] = round(time.time() - t0, 1)
        tmp = folder / (DONE + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, folder / DONE)
        print(f"[pipeline] {stage}: done in {result['seconds']:.0f} s", flush=True)
        return result

    # 0 ------------------------------------------------------------------------------------------
    def megatron_sft_command(self, folder: Path) -> list[str]:
        from rlhf_overlay.data.tiny_assets import ensure_tiny_assets

        fam = self.cfg.family
        tp, pp = TINY_LAYOUT[fam]
        base = ensure_tiny_assets() / "models" / TINY_MODEL[fam]
        return _python() + ["toolkits.megatron_hf.convert", "hf2mg", "--model", fam, "--source", str(base),
                            "--target", str(folder / "checkpoint"), "--tp", str(tp), "--pp", str(pp),
                            "--no-progress"] + hf2mg_format_flags("legacy")

    def megatron_sft(self, folder: Path) -> dict:
        cmd = self.megatron_sft_command(folder)
        run_stage_command(cmd, folder, "0-megatron-sft")
        tp, pp = TINY_LAYOUT[self.cfg.family]
        return {"checkpoint": str(folder / "checkpoint"), "from_hf": cmd[cmd.index("--source") + 1], "tp": tp,
                "pp": pp, "note": "the pre-trained tiny base (make assets), standing in for a Megatron SFT run"}

    # 1 ------------------------------------------------------------------------------------------
    def sft_hf_command(self, folder: Path, source: Path) -> list[str]:
        fam = self.cfg.family
        cmd = _python() + ["toolkits.megatron_hf.convert", "mg2hf", "--model", fam, "--source", str(source),
                           "--target", str(folder / "model"), "--no-progress"]
        tokenizer = self.cfg.tokenizer
        if not tokenizer and self.cfg.tiny:
            from rlhf_overlay.data.tiny_assets import ensure_tiny_assets
            tokenizer = str(ensure_tiny_assets() / "models" / TINY_MODEL[fam])
        if tokenizer:
            cmd += ["--tokenizer", str(Path(tokenizer).expanduser().resolve())]
        return cmd

    def sft_hf(self, folder: Path, source: Path) -> dict:
        run_stage_command(self.sft_hf_command(folder, source), folder, "1-sft-hf")
        return {"model": str(folder / "model"), "source": str(source), "layout": checkpoint_layout(source)}

    # 2 ------------------------------------------------------------------------------------------
    def reward_model_command(self, folder: Path, model: Path, probe: Path | None = None) -> list[str]:
        """`probe`: a model that exists now, to work out the tiny flags before `model` is written (--dry-run)."""
        out = folder / "run"

        def trlx_tiny() -> list[str]:
            from rlhf_overlay.trlx_jobs.reward_model import RewardModelConfig
            return tiny_flags(RewardModelConfig, "bloom", probe or model)

        return self._job_command(
            ["rlhf_overlay.dschat_jobs.reward_model", "--model", str(model), "--output", str(out)],
            ["rlhf_overlay.trlx_jobs.reward_model", "--arch", "bloom", "--model", str(model), "--output", str(out)],
            trlx_tiny)

    def reward_model(self, folder: Path, model: Path) -> dict:
        out = folder / "run"
        run_stage_command(self.reward_model_command(folder, model), folder, "2-reward-model")
        write_report(out, folder, "2-reward-model")
        if self.cfg.family == "llama2":
            r = json.loads((out / "model" / "eval_results.json").read_text())
            return {"run": str(out), "critic": str(out / "model"), "eval_accuracy": r["eval/acc"],
                    "eval_accuracy_before": None, "report": str(out / "summary.md")}
        m = json.loads((out / "metrics.json").read_text())
        return {"run": str(out), "reward_model": str(out / "reward_model"), "eval_accuracy": m["eval_accuracy"],
                "eval_accuracy_before": m.get("eval_accuracy_before"), "report": str(out / "summary.md")}

    # 3 ------------------------------------------------------------------------------------------
    def ppo_command(self, folder: Path, model: Path, rm: str, probe: Path | None = None) -> list[str]:
        """`rm`: the reward model folder of stage 2 (DeepSpeed-Chat critic / trlx value-head RM); `probe` as in
        reward_model_command."""
        out = folder / "run"

        def trlx_tiny() -> list[str]:
            from rlhf_overlay.trlx_jobs.ppo import PPORunConfig
            return tiny_flags(PPORunConfig, "bloom", probe or model, rm=str(probe) if probe else rm)

        return self._job_command(
            ["rlhf_overlay.dschat_jobs.ppo", "--actor", str(model), "--critic", rm, "--output", str(out)],
            ["rlhf_overlay.trlx_jobs.ppo", "--arch", "bloom", "--model", str(model), "--rm", rm, "--output", str(out)],
            trlx_tiny)

    def _job_command(self, dschat: list[str], trlx: list[str], trlx_tiny) -> list[str]:
        """A training stage: the DeepSpeed-Chat job (llama2) or the trlx one (bloom), each with its own spelling of
        the tiny recipe (trlx: trlx_tiny(), its tiny settings as flags) and of the ranks, and DATA."""
        if self.cfg.family == "llama2":
            cmd, ranks = _python() + dschat + (["--recipe", "tiny"] if self.cfg.tiny else []), "--num-gpus"
        else:
            cmd, ranks = _python() + trlx + (trlx_tiny() if self.cfg.tiny else []), "--num-processes"
        if self.cfg.num_gpus:
            cmd += [ranks, str(self.cfg.num_gpus)]
        if self.cfg.data:
            cmd += ["--data", str(Path(self.cfg.data).expanduser().resolve())]
        return cmd

    def ppo(self, folder: Path, model: Path, rm: dict) -> dict:
        out = folder / "run"
        rm_folder = rm["critic"] if self.cfg.family == "llama2" else rm["reward_model"]
        run_stage_command(self.ppo_command(folder, model, rm_folder), folder, "3-ppo")
        write_report(out, folder, "3-ppo")
        if self.cfg.family == "llama2":
            s = _scalars(out / "tensorboard")
            rewards, kl, length = s["ppo/reward_mean"], s["ppo/kl"], s["ppo/response_length"]
            k = max(1, min(3, len(rewards) // 2))
            kl_tok = [a / max(b, 1e-9) for a, b in zip(kl, length)]   # DS-Chat: mean log-ratio summed per answer
            flu = s.get("ppo/fluency", [])
            return {"run": str(out), "policy": str(out / "actor"), "steps": len(rewards),
                    "reward_first": _mean(rewards[:k]), "reward_last": _mean(rewards[-k:]),
                    "kl_per_token_end": _mean(kl_tok[-k:]), "fluency_base": flu[0] if flu else None,
                    "fluency_end": _mean(flu[-k:]) if flu else None, "report": str(out / "summary.md")}
        m = json.loads((out / "metrics.json").read_text())
        from rlhf_overlay.trlx_jobs.smoke_test import health

        h = health(m["steps"], m["summary_window"])
        return {"run": str(out), "policy": str(out / "policy"), "steps": len(m["steps"]),
                "reward_first": m["reward_first"], "reward_last": m["reward_last"],
                "kl_per_token_end": h["kl_per_token_end"], "fluency_base": h["fluency_base"],
                "fluency_end": h["fluency_end"], "report": str(out / "summary.md")}

    # 4 ------------------------------------------------------------------------------------------
    def megatron_policy_command(self, folder: Path, policy: Path, layout: dict) -> list[str]:
        return _python() + ["toolkits.megatron_hf.convert", "hf2mg", "--model", self.cfg.family,
                            "--source", str(policy), "--target", str(folder / "checkpoint"), "--tp", str(layout["tp"]),
                            "--pp", str(layout["pp"]), "--no-progress"] + hf2mg_format_flags(layout.get("format",
                                                                                                      "legacy"))

    def megatron_policy(self, folder: Path, policy: Path, layout: dict) -> dict:
        target = folder / "checkpoint"
        run_stage_command(self.megatron_policy_command(folder, policy, layout), folder, "4-megatron-policy")
        got = checkpoint_layout(target)
        if (got["tp"], got["pp"]) != (layout["tp"], layout["pp"]):
            raise StageFailed(f"{target}: written with TP={got['tp']} PP={got['pp']}, the input had "
                              f"TP={layout['tp']} PP={layout['pp']}")
        return {"checkpoint": str(target), **got}

    # 5 ------------------------------------------------------------------------------------------
    def check_commands(self, folder: Path, checkpoint: Path, policy: Path, vocab) -> list[list[str]]:
        back = folder / "policy-from-megatron"
        return [_python() + ["toolkits.megatron_hf.convert", "mg2hf", "--model", self.cfg.family,
                             "--source", str(checkpoint), "--target", str(back), "--tokenizer", str(policy),
                             "--vocab-size", str(vocab), "--no-progress"],
                _python() + ["rlhf_overlay.tools.pipeline", "compare-logits", str(policy), str(back),
                             "--out", str(folder / "logits.json")]]

    def check(self, folder: Path, checkpoint: Path, policy: Path) -> dict:
        from transformers import AutoConfig

        back = folder / "policy-from-megatron"
        # the policy's own vocabulary size (its tokenizer folder may list a token more than the model has rows)
        vocab = AutoConfig.from_pretrained(policy).vocab_size
        for cmd in self.check_commands(folder, checkpoint, policy, vocab):
            run_stage_command(cmd, folder, "5-check")
        r = json.loads((folder / "logits.json").read_text())
        r["model"], r["report"] = str(back), str(folder / "logits.json")
        if not r["same"]:
            raise StageFailed(f"the Megatron policy's logits differ from the HF policy's (max abs diff "
                              f"{r['max_abs_diff']:.3g} > {LOGITS_TOLERANCE}); see {folder / 'logits.json'}")
        return r

    # ------------------------------------------------------------------------------------------
    def plan(self) -> dict[str, list[str]]:
        """Every stage's command(s) as a fresh run would start them (--dry-run); paths are where each stage
        writes. Only the PPO policy's vocabulary size (stage 5) is known after stage 3."""
        fam, f = self.cfg.family, self.folder
        cmds, probe = {}, None
        if self.cfg.tiny:
            from rlhf_overlay.data.tiny_assets import ensure_tiny_assets
            probe = ensure_tiny_assets() / "models" / TINY_MODEL[fam]   # what stage 1's model is converted from
            cmds["0-megatron-sft"] = self.megatron_sft_command(f("0-megatron-sft"))
            sft = f("0-megatron-sft") / "checkpoint"
            layout = {"tp": TINY_LAYOUT[fam][0], "pp": TINY_LAYOUT[fam][1], "format": "legacy"}
        else:
            sft = Path(self.cfg.megatron_sft).expanduser().resolve()
            layout = checkpoint_layout(sft)
        hf = f("1-sft-hf") / "model"
        rm = f("2-reward-model") / "run" / ("model" if fam == "llama2" else "reward_model")
        policy = f("3-ppo") / "run" / ("actor" if fam == "llama2" else "policy")
        cmds["1-sft-hf"] = self.sft_hf_command(f("1-sft-hf"), sft)
        cmds["2-reward-model"] = self.reward_model_command(f("2-reward-model"), hf, probe)
        cmds["3-ppo"] = self.ppo_command(f("3-ppo"), hf, str(rm), probe)
        cmds["4-megatron-policy"] = self.megatron_policy_command(f("4-megatron-policy"), policy, layout)
        convert, compare = self.check_commands(f("5-check"), f("4-megatron-policy") / "checkpoint", policy,
                                               "POLICY_VOCAB_SIZE")
        cmds["5-check: back to HF (POLICY_VOCAB_SIZE = vocab_size in the PPO policy's config.json)"] = convert
        cmds["5-check: logits"] = compare
        return cmds

    def run_all(self) -> dict:
        if self.cfg.tiny:
            sft = Path(self.stage("0-megatron-sft", self.megatron_sft)["checkpoint"])
        else:
            sft = Path(self.cfg.megatron_sft).expanduser().resolve()
        hf = self.stage("1-sft-hf", lambda f: self.sft_hf(f, sft))
        rm = self.stage("2-reward-model", lambda f: self.reward_model(f, Path(hf["model"])))
        ppo = self.stage("3-ppo", lambda f: self.ppo(f, Path(hf["model"]), rm))
        mg = self.stage("4-megatron-policy", lambda f: self.megatron_policy(f, Path(ppo["policy"]), hf["layout"]))
        chk = self.stage("5-check", lambda f: self.check(f, Path(mg["checkpoint"]), Path(ppo["policy"])))
        results = {"sft_hf": hf, "reward_model": rm, "ppo": ppo, "megatron_policy": mg, "check": chk}
        write_summary(self.run, self.cfg, sft, results)
        return results


def write_summary(run: Path, cfg: PipelineConfig, sft: Path, r: dict) -> None:
    def link(path) -> str:
        p = Path(path)
        rel = os.path.relpath(p, run)
        return f"[{rel}]({rel})"

    rm, ppo, mg, chk, hf = r["reward_model"], r["ppo"], r["megatron_policy"], r["check"], r["sft_hf"]
    fmt = lambda x, spec=".3f": "n/a" if x is None else format(x, spec)   # noqa: E731
    before = f" (before training {fmt(rm['eval_accuracy_before'])})" if rm.get("eval_accuracy_before") is not None else ""
    lay = hf["layout"]
    lines = [
        f"# pipeline-{cfg.family}", "",
        f"Megatron SFT checkpoint `{sft}` (TP={lay['tp']}, PP={lay['pp']}, {lay['format']})"
        + (" — the pre-trained tiny base standing in for a Megatron SFT run" if cfg.tiny else ""), "",
        "| stage | output | report | seconds |", "|---|---|---|---|",
    ]
    for stage in STAGES:
        done = run / stage / DONE
        if not done.is_file():
            continue
        d = json.loads(done.read_text())
        out = d.get("checkpoint") or d.get("model") or d.get("policy") or d.get("run") or ""
        report = d.get("report")
        lines.append(f"| {stage} | {link(out) if out else ''} | "
                     f"{link(report) if report and Path(report).is_file() else link(run / stage / 'stage.log')} | "
                     f"{d.get('seconds', '')} |")
    lines += [
        "", "## End result", "",
        f"- reward model eval accuracy: **{fmt(rm['eval_accuracy'])}**{before}",
        f"- PPO mean reward: **{fmt(ppo['reward_first'])} -> {fmt(ppo['reward_last'])}** over {ppo['steps']} steps "
        f"(rise {fmt(ppo['reward_last'] - ppo['reward_first'], '+.3f')})",
        f"- KL to the reference at the end: **{fmt(ppo['kl_per_token_end'])} nats per answer token**",
        f"- fluency (synthetic language): base {fmt(ppo['fluency_base'], '.2f')} -> end "
        f"**{fmt(ppo['fluency_end'], '.2f')}**" + ("" if cfg.tiny and not cfg.data else
                                                  " (only meaningful on the embedded synthetic data)"),
        f"- final Megatron checkpoint {link(mg['checkpoint'])} (TP={mg['tp']}, PP={mg['pp']}): converted back to HF "
        f"it gives {'**the same logits**' if chk['same'] else '**different logits**'} as the HF policy (max abs "
        f"difference {chk['max_abs_diff']:.2e} over {chk['tokens']} tokens of {chk['prompts']} prompts)", "",
    ]
    tmp = run / "summary.md.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, run / "summary.md")


# ---------------------------------------------------------------------------------------------- logits check
def compare_logits(a: Path, b: Path, out: Path, n_prompts: int = 8) -> dict:
    """Logits of the HF models in `a` and `b` on a few synthetic conversations (fp32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_overlay.data import synthetic
    tok = AutoTokenizer.from_pretrained(a)
    rows = synthetic.preference_rows(n_prompts, seed=7)
    texts = [r["prompt"] + r["chosen"] for r in rows]
    ma = AutoModelForCausalLM.from_pretrained(a, torch_dtype=torch.float32).eval()
    mb = AutoModelForCausalLM.from_pretrained(b, torch_dtype=torch.float32).eval()
    worst, tokens = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"]
            la, lb = ma(ids).logits, mb(ids).logits
            if la.shape != lb.shape:   # a different vocabulary is a difference, not something to trim away
                worst = float("inf")
                break
            worst = max(worst, float((la - lb).abs().max()))
            tokens += ids.shape[1]
    result = {"hf_policy": str(a), "from_megatron": str(b), "prompts": len(texts), "tokens": tokens,
              "max_abs_diff": worst, "tolerance": LOGITS_TOLERANCE, "same": worst <= LOGITS_TOLERANCE}
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> settings.SettingsParser:
    p = settings.SettingsParser(prog="python -m rlhf_overlay.tools.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the chain (make pipeline-llama2 / pipeline-bloom)",
                       description="Run the chain Megatron SFT -> HF -> RM -> PPO -> Megatron (make pipeline-<family>).")
    r.add_settings(PipelineConfig, defaults={"family": dataclasses.MISSING})   # --family is required here
    c = sub.add_parser("compare-logits", help="max |logits(A) - logits(B)| of two HF models (stage 5)")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--out", type=Path, required=True)
    return p


def resumed_config(cfg: PipelineConfig) -> PipelineConfig:
    """RESUME=<pipeline folder>: its own settings (NUM_GPUS and --dry-run may differ; the inputs may not)."""
    earlier = json.loads((Path(cfg.resume).expanduser() / "pipeline.json").read_text())["config"]
    for key in ("megatron_sft", "tokenizer", "data"):
        if getattr(cfg, key) and getattr(cfg, key) != earlier[key]:
            raise PipelineError(f"RESUME={cfg.resume} ran with {key}={earlier[key]!r}, not "
                                f"{getattr(cfg, key)!r}; start a new pipeline folder instead")
    return PipelineConfig(**{**earlier, "resume": cfg.resume, "num_gpus": cfg.num_gpus, "dry_run": cfg.dry_run})


def dry_run(cfg: PipelineConfig) -> int:
    """--dry-run: the resolved settings and every stage's command; nothing is run, no folder is made."""
    from rlhf_overlay.paths import RUNS_DIR

    if cfg.resume:
        run_dir = Path(cfg.resume).expanduser().resolve()
    elif cfg.output:
        run_dir = Path(cfg.output).expanduser().resolve()
    else:
        run_dir = RUNS_DIR / f"pipeline-{cfg.family}-<time>"
    pipe = Pipeline(cfg, run_dir)
    done = [s for s in STAGES if cfg.resume and pipe.done(s) is not None]
    commands = {stage: cmd for stage, cmd in pipe.plan().items() if stage.split(":")[0] not in done}
    settings.print_dry_run(f"pipeline-{cfg.family}", dict(asdict(cfg), run_dir=str(run_dir), tiny=cfg.tiny,
                                                          stages_done=done), commands, cwd=_root())
    return 0


def run(cfg: PipelineConfig) -> tuple[int, Path | None]:
    from rlhf_overlay.runtime.runs import RunDirError, prepare_run_dir

    cfg.validate()
    if cfg.resume:
        cfg = resumed_config(cfg)
    if cfg.dry_run:
        return dry_run(cfg), None
    # The pipeline writes its own summary.md; training_scripts/run.sh must not put a report over it.
    os.environ.pop("RLHF_OVERLAY_RUN_DIRS_FILE", None)
    if cfg.resume:
        run_dir = Path(cfg.resume).expanduser().resolve()
        print(f"[pipeline] resuming {run_dir}", flush=True)
    else:
        try:
            run_dir = prepare_run_dir(f"pipeline-{cfg.family}", output=cfg.output or None, overwrite=False)
        except RunDirError as e:
            raise PipelineError(str(e)) from None
        tmp = run_dir / "pipeline.json.tmp"
        tmp.write_text(json.dumps({"config": asdict(cfg), "stages": STAGES}, indent=2) + "\n")
        os.replace(tmp, run_dir / "pipeline.json")
        print(f"[pipeline] folder {run_dir}", flush=True)
    t0 = time.time()
    try:
        results = Pipeline(cfg, run_dir).run_all()
    except StageFailed as e:
        print(f"error: {e}; fix it and continue with RESUME={run_dir}", file=sys.stderr, flush=True)
        return 1, run_dir
    ppo, chk = results["ppo"], results["check"]
    print(f"[pipeline] done in {time.time() - t0:.0f} s: RM accuracy {results['reward_model']['eval_accuracy']:.3f}, "
          f"reward {ppo['reward_first']:.3f} -> {ppo['reward_last']:.3f}, KL {ppo['kl_per_token_end']:.3f} "
          f"nats/token, fluency {ppo['fluency_end'] if ppo['fluency_end'] is None else round(ppo['fluency_end'], 2)}, "
          f"Megatron policy logits {'match' if chk['same'] else 'DIFFER'} (max diff {chk['max_abs_diff']:.1e})\n"
          f"[pipeline] summary: {run_dir / 'summary.md'}", flush=True)
    return 0, run_dir


@main_guard
def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "compare-logits":
        r = compare_logits(ns.a, ns.b, ns.out)
        print(f"max |logits difference| {r['max_abs_diff']:.3e} over {r['tokens']} tokens: "
              f"{'same' if r['same'] else 'DIFFERENT'}", flush=True)
        return 0
    rc, _ = run(settings.config_from_args(PipelineConfig, ns))
    return rc


if __name__ == "__main__":
    sys.exit(main())
