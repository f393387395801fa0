"""What one PPO step measured, in the worker: StepRecorder (rewards as scored, KL, fluency, losses, timings: one
line per step, the common ppo/* tensorboard names, samples.jsonl, metrics.json) and AnswerKL (KL(policy ||
reference) per answer token of trlx's rollouts)."""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path


class StepRecorder:
    """Per-PPO-step statistics: the rollout rewards (raw, before trlx's clipping/scaling), response lengths, KL,
    losses and timings. Prints one line per step (and a progress bar on a terminal), writes the common tensorboard
    names, and keeps everything for metrics.json."""

    def __init__(self, run_dir: Path, total_steps: int, scalars, tty: bool):
        self.run_dir, self.total, self.scalars = run_dir, total_steps, scalars
        self.steps: list[dict] = []
        self.phase = "rollout"
        self._rewards: list[float] = []
        self._outputs: list[str] = []
        self._kl_tokens = [0.0, 0]   # summed KL over answer tokens, answer tokens (this step's rollouts)
        self._lengths: list[int] = []
        self._samples: list[dict] = []
        self._losses: list[dict] = []
        self._cur: dict | None = None
        self.bar = None
        if tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="PPO", unit="step", file=sys.stdout, dynamic_ncols=True)

    def record_rewards(self, prompts, outputs, rewards):
        if self.phase != "rollout":
            return
        self._rewards += [float(r) for r in rewards]
        self._outputs += list(outputs)
        if len(self._samples) < 4:
            self._samples += [{"prompt": p, "output": o, "reward": float(r)}
                              for p, o, r in list(zip(prompts, outputs, rewards))[: 4 - len(self._samples)]]

    def record_losses(self, stats: dict):
        self._losses.append({k: stats[k] for k in ("losses/policy_loss", "losses/value_loss") if k in stats})

    def start_rollouts(self):
        """A make_experience call starts: the previous step's updates are done."""
        self.close_step()
        self.phase = "rollout"
        self._rewards, self._lengths, self._samples, self._losses = [], [], [], []
        self._outputs, self._kl_tokens = [], [0.0, 0]

    def add_answer_kl(self, kl_sum: float, tokens: int):
        """KL(policy || reference) summed over the answer tokens of some rollouts, and their count."""
        self._kl_tokens[0] += kl_sum
        self._kl_tokens[1] += tokens

    def rollouts_done(self, rollout_seconds: float, kl: float, lengths: list[int]):
        """A make_experience call ended: open the step whose updates follow."""
        from rlhf_overlay.data.synthetic import fluency

        self._lengths = list(lengths)
        n = len(self._rewards)
        flu = fluency(self._outputs)
        self._cur = {
            "step": len(self.steps) + 1,
            "reward_mean": sum(self._rewards) / n if n else float("nan"),
            "reward_min": min(self._rewards) if n else float("nan"),
            "reward_max": max(self._rewards) if n else float("nan"),
            "reward_std": (sum((r - sum(self._rewards) / n) ** 2 for r in self._rewards) / max(1, n - 1)) ** 0.5
            if n else float("nan"),
            "response_length": sum(self._lengths) / max(1, len(self._lengths)),
            "kl": kl, "samples": n, "rollout_seconds": rollout_seconds, "train_start": time.time(),
            "kl_per_token": self._kl_tokens[0] / self._kl_tokens[1] if self._kl_tokens[1] else float("nan"),
            "fluency": flu["fluency"], "in_language": flu["in_language"], "degenerate": flu["degenerate"],
            "sentences": flu["sentences"],
            "eval_seconds": 0.0, "examples": self._samples,
        }
        from rlhf_overlay.runtime.health import answer_shares, nonfinite_count
        self._cur.update(answer_shares(self._outputs), nonfinite=nonfinite_count(self._rewards))  # health guards
        self._rewards, self._lengths, self._samples, self._losses = [], [], [], []
        self._outputs, self._kl_tokens = [], [0.0, 0]

    def add_eval_time(self, seconds: float):
        if self._cur is not None:
            self._cur["eval_seconds"] += seconds

    def close_step(self):
        cur, self._cur = self._cur, None
        if cur is None:
            return
        n_opt = len(self._losses)
        train_s = time.time() - cur.pop("train_start") - cur["eval_seconds"]
        cur["optimizer_steps"] = n_opt
        cur["ppo_step_seconds"] = train_s / n_opt if n_opt else float("nan")
        for k, name in (("losses/policy_loss", "policy_loss"), ("losses/value_loss", "value_loss")):
            vals = [x[k] for x in self._losses if k in x]
            cur[name] = sum(vals) / len(vals) if vals else float("nan")
        self._losses = []
        if n_opt == 0:  # rollouts collected after the last update (trlx does not do this, but be safe)
            return
        self.steps.append(cur)
        self.scalars.log({"ppo/reward_mean": cur["reward_mean"], "ppo/kl": cur["kl"],
                          "ppo/kl_per_token": cur["kl_per_token"], "ppo/fluency": cur["fluency"],
                          "ppo/sentences": cur["sentences"],
                          "ppo/policy_loss": cur["policy_loss"], "ppo/value_loss": cur["value_loss"],
                          "ppo/response_length": cur["response_length"]}, cur["step"])
        with open(self.run_dir / "samples.jsonl", "a") as f:
            for ex in cur["examples"]:
                f.write(json.dumps({"step": cur["step"], **ex}) + "\n")
        line = (f"step {cur['step']:>3}/{self.total}  mean reward {cur['reward_mean']:+.3f}  kl {cur['kl']:.3f}  "
                f"kl/token {cur['kl_per_token']:.3f}  fluency {cur['fluency']:.2f}  "
                f"len {cur['response_length']:.1f}  policy_loss {cur['policy_loss']:+.3f}  "
                f"value_loss {cur['value_loss']:.3f}  [rollout {cur['rollout_seconds']:.1f}s, "
                f"{n_opt} updates {cur['ppo_step_seconds'] * 1000:.0f} ms each]")
        if self.bar is not None:
            self.bar.write(line)
            self.bar.set_postfix_str(f"reward {cur['reward_mean']:+.3f}")
            self.bar.update(1)
        else:
            print(line, flush=True)

    def close(self):
        self.close_step()
        if self.bar is not None:
            self.bar.close()



class AnswerKL:
    """KL(policy || reference) per answer token of trlx's rollouts. trlx's own `mean_kl` sums over the prompt
    positions too (its attention mask covers prompt and answer) and its estimator exp(r) - 1 - r (r = log pi -
    log pi_ref) estimates KL(reference || policy), which explodes where the policy grew confident. This keeps the
    log-probs trlx computes in make_experience (its logprobs_of_labels calls, 2 per chunk: policy then reference)
    and sums the unbiased, non-negative estimator of KL(policy || reference) for tokens sampled from the policy,
    exp(-r) - 1 + r ("k3"), over the answer tokens only (not padding)."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id
        self.calls: list = []
        self._on = False

    @contextlib.contextmanager
    def recording(self):
        import trlx.trainer.accelerate_ppo_trainer as ppo_module

        original = ppo_module.logprobs_of_labels

        def recorded(logits, labels):
            out = original(logits, labels)
            self.calls.append((out.detach().float().cpu(), labels.detach().cpu()))
            return out

        self.calls = []
        ppo_module.logprobs_of_labels = recorded
        try:
            yield
        finally:
            ppo_module.logprobs_of_labels = original

    def answer_kl(self, elements) -> tuple[float, int]:
        """(KL summed over the answer tokens, answer tokens) of the rollouts just recorded; `elements` are the
        PPORLElements they produced, in order (each chunk's prompts share one padded width)."""
        import torch

        total, tokens, i = 0.0, 0, 0
        for (logprobs, labels), (ref_logprobs, _) in zip(self.calls[0::2], self.calls[1::2]):
            n = logprobs.shape[0]
            if i + n > len(elements):
                break
            start = elements[i].query_tensor.shape[0] - 1   # logprobs[:, t] scores token t + 1
            mask = (labels[:, start:] != self.pad).float()
            r = (logprobs[:, start:] - ref_logprobs[:, start:]) * mask
            total += float(((torch.exp(-r) - 1 + r) * mask).sum())
            tokens += int(mask.sum())
            i += n
        self.calls = []
        return total, tokens
