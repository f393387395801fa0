"""The PPO reward function trlx calls: the learnable rule (rlhf_overlay.data.synthetic.rule_reward) or a value-head
reward model (rlhf_overlay.trlx_jobs.value_head), optionally minus the score of the row's reference answer (the seed's
normalisation), then normalised by the running mean/std of all rollout rewards (`--normalize-reward running`)."""
from __future__ import annotations

import os

from rlhf_overlay.trlx_jobs.common import ConfigError
from rlhf_overlay.trlx_jobs.ppo import PPORunConfig
from rlhf_overlay.trlx_jobs.ppo_steps import StepRecorder


def strip_eos(text: str, eos: str | None) -> str:
    if eos:
        while text.endswith(eos):
            text = text[: -len(eos)]
    return text



def make_reward_fn(cfg: PPORunConfig, resolved: dict, tokenizer, recorder: StepRecorder | None, device):
    """trlx reward function: one scalar per sample (raw rule score, or RM score [- RM score of the reference])."""
    eos = tokenizer.eos_token
    baseline = resolved["reward_baseline"]
    if cfg.reward == "rule":
        from rlhf_overlay.data.synthetic import rule_reward

        def score(prompts, outputs, references):
            return [float(x) for x in rule_reward(outputs)]
    else:
        import torch

        from rlhf_overlay.trlx_jobs.value_head import RewardScorer, load_reward_model, new_reward_model

        dtype = None
        if str(device).startswith("cuda"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if resolved["rm_path"] == "untrained":  # the seed's PPO smoke test: a fresh value head on the policy's base
            model, rm_tok = new_reward_model(resolved["policy_path"], torch_dtype=dtype, seed=cfg.seed)
            model.to(device).eval()
            max_length, sep = cfg.seq_length, "\n"
        else:
            model, rm_tok, meta = load_reward_model(resolved["rm_path"], device=device, torch_dtype=dtype)
            max_length, sep = int(meta.get("max_length", cfg.seq_length)), meta.get("separator", "\n")
        scorer = RewardScorer(model, rm_tok, max_length=max_length, separator=sep)

        def score(prompts, outputs, references):
            s = scorer.score(prompts, outputs)
            if baseline == "reference":
                ref = scorer.score(prompts, references)
                s = [a - b for a, b in zip(s, ref)]
            return s

    moments = RunningMoments()

    def reward_fn(samples, prompts, outputs, tokenizer=None, **metadata):
        outs = [strip_eos(o, eos) for o in outputs]
        references = metadata.get("reference")
        if baseline == "reference" and (references is None or any(r is None for r in references)):
            raise ConfigError("reward_baseline=reference needs a `reference` in every prompt row")
        rewards = [float(x) for x in score(prompts, outs, references)]
        rollout = recorder is None or recorder.phase == "rollout"
        if recorder is not None:
            recorder.record_rewards(prompts, outs, rewards)
        if cfg.normalize_reward == "running" and rollout:  # evaluation tables show the raw scores
            moments.update(rewards)
            rewards = moments.normalize(rewards)
        return rewards

    reward_fn.moments = moments  # saved in checkpoints: the reward normalisation continues where it was
    return reward_fn



class RunningMoments:
    """Running mean/std of all rollout rewards seen so far (Chan et al. parallel update)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, xs):
        n = len(xs)
        if not n:
            return
        mean = sum(xs) / n
        m2 = sum((x - mean) ** 2 for x in xs)
        delta, total = mean - self.mean, self.n + n
        self.mean += delta * n / total
        self.m2 += m2 + delta ** 2 * self.n * n / total
        self.n = total

    @property
    def std(self) -> float:
        return (self.m2 / (self.n - 1)) ** 0.5 if self.n > 1 else 1.0

    def normalize(self, xs):
        std = self.std if self.std > 1e-8 else 1.0
        return [(x - self.mean) / std for x in xs]



def rm_device(choice: str, policy_device):
    """Where the reward model runs (--rm-device): cpu, the policy's device, cuda:N; auto = a spare GPU, else the
    policy's GPU, else the CPU."""
    import torch

    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu") if choice in ("cpu", "auto", "policy") else torch.device(choice)
    if choice == "policy":
        return policy_device
    if choice == "auto":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return torch.device(f"cuda:{local}") if torch.cuda.device_count() > local else policy_device
    return torch.device(choice)
