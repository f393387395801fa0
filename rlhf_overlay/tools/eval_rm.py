"""Evaluate a reward model on preference pairs: accuracy, mean score margin, and a histogram of the scores.

    make eval-rm RM=runs/rm-llama2-<time>/model DATA=assets/data/preference/eval.jsonl
    make eval-rm RM=runs/rm-bloom-<time>/reward_model                  # DATA defaults to the embedded eval set
    python -m rlhf_overlay.tools.eval_rm --rm <folder> --data pairs.jsonl --output runs/my-eval

Reads reward models from both paths of this project:
- DeepSpeed-Chat critics (`make rm-llama2`): a folder with config.json, pytorch_model.bin holding the RewardModel
  state dict (`rwtransformer.*` + `v_head.weight`) and the tokenizer. Scored as DeepSpeed-Chat's step 2 does:
  prompt + answer + end-of-conversation token, right-padded, value of the last token before the first pad
  (after `num_padding_at_beginning` pads, from the run's eval_results.json when present).
- Value-head reward models of the trlx path (`make rm-bloom`, `make rm-gptj`): loaded with
  rlhf_overlay.trlx_jobs.value_head.load_reward_model and scored with its RewardScorer.

Writes metrics.json (accuracy = share of pairs where chosen scores above rejected; ties count half), scores.jsonl
and score_hist.png (chosen vs rejected distributions) into the output folder, and prints the figures.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from rlhf_overlay import settings
from rlhf_overlay.errors import UserError, main_guard


class EvalError(UserError, RuntimeError):
    """A reward model folder or data file that cannot be evaluated, with what to do about it."""


@dataclass
class EvalConfig:
    rm: str = field(default="", metadata={"help": "reward model folder (RM): a DeepSpeed-Chat critic or a trlx "
                                                  "value-head RM, or the run folder holding one"})
    data: str = field(default="", metadata={"help": "preference .json/.jsonl or folder, its eval split (DATA; empty: "
                                                    "the embedded eval set)"})
    output: str = field(default="", metadata={"help": "run folder (OUTPUT; empty: runs/eval-rm-<time>)"})
    overwrite: bool = field(default=False, metadata={"help": "write into a non-empty output folder (OVERWRITE=1)"})
    max_length: int = field(default=256, metadata={"help": "tokens per prompt+answer (left-truncated for trlx RMs, "
                                                           "right for DeepSpeed-Chat)"})
    batch_size: int = field(default=16, metadata={"help": "texts per forward pass"})
    limit: int = field(default=0, metadata={"help": "evaluate only the first N pairs (0 = all)"})

    def validate(self) -> None:
        if not self.rm:
            raise EvalError("pass RM=<reward model folder> (the model folder of `make rm-llama2`, or the "
                            "reward_model/ folder of `make rm-bloom` / `make rm-gptj`)")
        if not Path(self.rm).is_dir():
            raise EvalError(f"RM={self.rm} does not exist or is not a folder — pass the model folder of `make "
                            f"rm-llama2` or the reward_model/ folder of `make rm-bloom` / `make rm-gptj`")
        self.rm = str(check_reward_model_folder(Path(self.rm)))
        for name in ("max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise EvalError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit < 0:
            raise EvalError(f"limit must be >= 0, got {self.limit}")
        from rlhf_overlay.runtime.preflight import check_output
        check_output(self.output, self.overwrite)


def check_reward_model_folder(path: Path) -> Path:
    """The reward model in `path` (itself, or the model/ / reward_model/ of a run folder) with complete weights;
    any other kind of folder this project writes (a policy, an actor, a checkpoint, ...) is refused by name."""
    from rlhf_overlay.runtime import preflight as pf
    kind = pf.folder_kind(path)
    found = path if kind in (pf.TRLX_RM, pf.DSCHAT_CRITIC) else \
        pf.find_in_run_folder(path, pf.TRLX_RM) or pf.find_in_run_folder(path, pf.DSCHAT_CRITIC)
    todo = ("pass the model folder written by `make rm-llama2` or the reward_model/ folder of `make rm-bloom` / "
            "`make rm-gptj`")
    if found is None and kind in (pf.NOT_A_MODEL, pf.RUN_FOLDER):
        raise EvalError(f"RM={path} is neither a DeepSpeed-Chat critic (config.json + pytorch_model.bin) nor a "
                        f"value-head reward model of the trlx path (reward_model.json + value_head.safetensors) — "
                        f"{todo}")
    if found is None and kind == pf.CAUSAL_LM:
        raise EvalError(f"RM={path} is not a DeepSpeed-Chat reward model or a trlx value-head reward model: it is "
                        f"{pf.DESCRIBE[kind]} — {todo}")
    if found is None:
        raise EvalError(f"RM={path} is {pf.DESCRIBE[kind]}, not a reward model — {todo}")
    pf.check_weights(found)
    return found


# ------------------------------------------------------------------------------------------ DeepSpeed-Chat critics
def is_dschat_critic(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "pytorch_model.bin").is_file()


class DSChatCriticScorer:
    """DeepSpeed-Chat's RewardModel (trunk + linear v_head), rebuilt with transformers only."""

    def __init__(self, path: Path, max_length: int, batch_size: int):
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        prefix = next((p for p in ("rwtransformer.", "rwtranrsformer.") if any(k.startswith(p) for k in state)), None)
        if prefix is None or "v_head.weight" not in state:
            raise EvalError(f"{path}/pytorch_model.bin is not a DeepSpeed-Chat reward model (expected keys "
                            f"'rwtransformer.*' and 'v_head.weight', found e.g. {list(state)[:3]}); pass the output "
                            f"folder of `make rm-llama2`")
        config = AutoConfig.from_pretrained(path)
        self.trunk = AutoModel.from_config(config)
        missing, unexpected = self.trunk.load_state_dict(
            {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=False)
        missing = [k for k in missing if "rotary_emb.inv_freq" not in k]  # buffers recomputed by the model
        if missing or unexpected:
            raise EvalError(f"{path}: weights do not fit config.json (missing {missing[:5]}, unexpected "
                            f"{unexpected[:5]})")
        self.trunk.eval()
        head = state["v_head.weight"].float()
        self.v_head = torch.nn.Linear(head.shape[1], 1, bias=False)
        self.v_head.weight.data.copy_(head)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        meta = {}
        for candidate in (path / "eval_results.json", path.parent / "eval_results.json"):
            if candidate.is_file():
                meta = json.loads(candidate.read_text())
                break
        self.eot = meta.get("end_of_conversation_token") or self.tokenizer.eos_token
        self.num_padding_at_beginning = int(meta.get("num_padding_at_beginning", 0))
        self.max_length, self.batch_size = max_length, batch_size
        self.torch = torch

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        torch = self.torch
        from rlhf_overlay.data.preference_data import join_conversation
        texts = [join_conversation(p, r) + self.eot for p, r in zip(prompts, responses)]
        pad_id = self.tokenizer.pad_token_id
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i:i + self.batch_size], max_length=self.max_length, padding="max_length",
                                   truncation=True, return_tensors="pt")
            with torch.no_grad():
                hidden = self.trunk(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
                values = self.v_head(hidden.float()).squeeze(-1)
            for ids, vals in zip(batch["input_ids"], values):
                pads = (ids == pad_id).nonzero().flatten().tolist()
                end = pads[self.num_padding_at_beginning] if len(pads) > self.num_padding_at_beginning else len(ids)
                out.append(float(vals[end - 1]))
        return out


# ------------------------------------------------------------------------------------------ trlx value-head RMs
class ValueHeadScorer:
    def __init__(self, path: Path, max_length: int, batch_size: int):
        from rlhf_overlay.trlx_jobs.value_head import RewardScorer, load_reward_model

        model, tokenizer, meta = load_reward_model(path)
        self.inner = RewardScorer(model, tokenizer, max_length=int(meta.get("max_length") or max_length),
                                  separator=meta.get("separator", "\n"), batch_size=batch_size)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return self.inner.score(prompts, responses)


def load_scorer(path: Path, max_length: int, batch_size: int):
    from rlhf_overlay.trlx_jobs.value_head import is_reward_model_dir

    if is_reward_model_dir(path):
        return "trlx-value-head", ValueHeadScorer(path, max_length, batch_size)
    if is_dschat_critic(path):
        return "dschat-critic", DSChatCriticScorer(path, max_length, batch_size)
    for sub in ("reward_model", "model", "critic"):
        if (path / sub).is_dir() and (is_reward_model_dir(path / sub) or is_dschat_critic(path / sub)):
            return load_scorer(path / sub, max_length, batch_size)
    raise EvalError(f"RM={path} is neither a DeepSpeed-Chat critic (config.json + pytorch_model.bin) nor a "
                    f"value-head reward model of the trlx path (reward_model.json + value_head.safetensors); pass the "
                    f"model folder written by `make rm-llama2`, `make rm-bloom` or `make rm-gptj`")


# ------------------------------------------------------------------------------------------ metrics and plot
def pair_metrics(chosen: Sequence[float], rejected: Sequence[float]) -> dict:
    n = len(chosen)
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected))
    margins = [c - r for c, r in zip(chosen, rejected)]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"pairs": n, "accuracy": wins / n, "mean_margin": mean(margins), "mean_chosen": mean(chosen),
            "mean_rejected": mean(rejected), "chance_accuracy": 0.5}


def plot_histogram(chosen: Sequence[float], rejected: Sequence[float], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lo, hi = min(min(chosen), min(rejected)), max(max(chosen), max(rejected))
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 31)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(chosen, bins=bins, alpha=0.6, label=f"chosen (mean {np.mean(chosen):.3g})", color="tab:green")
    ax.hist(rejected, bins=bins, alpha=0.6, label=f"rejected (mean {np.mean(rejected):.3g})", color="tab:red")
    ax.set_xlabel("reward score")
    ax.set_ylabel("pairs")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, png)


def evaluate(cfg: EvalConfig) -> tuple[dict, Path]:
    from rlhf_overlay.paths import assets_dir
    from rlhf_overlay.data.preference_data import PreferenceDataError, load_preference_rows
    from rlhf_overlay.runtime.runs import prepare_run_dir, record_invocation

    cfg.validate()
    data = cfg.data
    if not data:
        from rlhf_overlay.data.tiny_assets import ensure_tiny_assets
        ensure_tiny_assets()
        data = str(assets_dir() / "data" / "preference" / "eval.jsonl")
    try:
        rows = load_preference_rows(data, split="eval")
    except PreferenceDataError as exc:
        raise EvalError(str(exc)) from None
    if cfg.limit:
        rows = rows[:cfg.limit]
    if not rows:
        raise EvalError(f"DATA={data} holds no preference pairs")
    kind, scorer = load_scorer(Path(cfg.rm), cfg.max_length, cfg.batch_size)
    run_dir = prepare_run_dir("eval-rm", cfg.output or None, overwrite=cfg.overwrite)
    record_invocation(run_dir, [sys.executable, "-m", "rlhf_overlay.tools.eval_rm", *sys.argv[1:]],
                      {**asdict(cfg), "data": data, "rm_kind": kind})
    prompts = [r["prompt"] for r in rows]
    chosen = scorer.score(prompts, [r["chosen"] for r in rows])
    rejected = scorer.score(prompts, [r["rejected"] for r in rows])
    metrics = {"rm": str(Path(cfg.rm).resolve()), "rm_kind": kind, "data": str(data), **pair_metrics(chosen, rejected)}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(run_dir / "scores.jsonl", "w") as f:
        for row, c, r in zip(rows, chosen, rejected):
            f.write(json.dumps({"prompt": row["prompt"], "chosen_score": c, "rejected_score": r}) + "\n")
    plot_histogram(chosen, rejected, run_dir / "score_hist.png",
                   f"{Path(cfg.rm).name}: accuracy {metrics['accuracy']:.3f}, margin {metrics['mean_margin']:.3g}")
    return metrics, run_dir


def build_parser() -> settings.SettingsParser:
    return settings.build_parser(EvalConfig, prog="python -m rlhf_overlay.tools.eval_rm",
                                 description=__doc__.split("\n\n")[0], epilog=__doc__)


@main_guard   # EvalError, RunDirError, ... -> `error: ...`, exit 2
def main(argv=None) -> int:
    metrics, run_dir = evaluate(settings.config_from_args(EvalConfig, build_parser().parse_args(argv)))
    print(f"eval-rm: {metrics['rm_kind']} {metrics['rm']}")
    print(f"eval-rm: {metrics['pairs']} pairs  accuracy {metrics['accuracy']:.3f} (chance 0.5)  mean margin "
          f"{metrics['mean_margin']:.4g}  chosen {metrics['mean_chosen']:.4g} vs rejected {metrics['mean_rejected']:.4g}")
    print(f"eval-rm: wrote {run_dir}/metrics.json, scores.jsonl, score_hist.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
