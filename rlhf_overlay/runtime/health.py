"""Health guards for PPO: every step is checked for the ways long RLHF runs are known to go wrong silently.

Signals (each a tensorboard scalar `health/<name>` per step; a warning line names the signal, its value, the bound
and the likely causes when it trips):
    nonfinite      NaN/inf among the step's rewards, losses and gradients (count)          bound: 0
    kl_per_token   KL(policy || reference) per answer token, nats                          --max-kl-per-token
    degenerate     share of answers that are empty or repeat one token / n-gram in a row   --max-degenerate
    undecodable    share of answers with undecodable tokens (U+FFFD after decoding)         --max-undecodable
    reward_drop    (reward mean at the start - now) / per-sample reward std at the start   --max-reward-drop
                   (means over `window` steps; > 1 = the mean fell by more than the spread of single rewards)
ON_UNHEALTHY=stop (--on-unhealthy stop): the run writes a checkpoint, marks itself failed with the reason in
status.json and stops; `warn`: it only warns. `auto` = stop with your own MODEL, warn on the tiny CPU defaults: those
are demonstrations whose own verdict (make ppo-smoke-test) already judges reward, fluency and KL at the end, and a
40-step run on a 2-core CPU is better read to its end than cut at the first noisy step.
The defaults are loose enough that a healthy run never trips them (the tiny default ends near 0.2 nats per token,
no degenerate answers, a rising reward).
"""
from __future__ import annotations

import math

from rlhf_overlay.data.synthetic import answer_words, is_degenerate

DEFAULTS = {"max_kl_per_token": 1.0, "max_degenerate": 0.5, "max_undecodable": 0.2, "max_reward_drop": 1.0}
CAUSES = {
    "nonfinite": "learning rate too high, fp16 overflow without loss scaling, a reward model that returns NaN/inf "
                 "(e.g. an all-padding sequence), division by a zero reward std",
    "kl_per_token": "learning rate too high or KL coefficient too small (init_kl_coef / kl_target), the reference "
                    "model is not the policy's starting point, a wrong attention mask for the reference",
    "degenerate": "policy collapse onto a token or phrase the reward likes (reward hacking), KL penalty too weak; "
                  "with DeepSpeed-Chat LLaMA2 ZeRO-3 + the hybrid engine, generation from stale or partitioned "
                  "weights (DeepSpeedExamples #864/#794, DeepSpeed #4788): try without --enable_hybrid_engine",
    "undecodable": "the policy emits byte pieces that do not form text (tokenizer mismatch between policy and "
                   "reference/reward model, collapsed sampling), or fp16 overflow in the logits",
    "reward_drop": "reward collapse: learning rate too high, value-function divergence, reward model exploited "
                   "out of its distribution, or the KL penalty dominating",
}


def answer_shares(outputs: list[str]) -> dict:
    """Shares of empty, degenerate (empty or looping) and undecodable answers in a batch."""
    n = len(outputs)
    if not n:
        return {"empty": float("nan"), "degenerate": float("nan"), "undecodable": float("nan")}
    words = [answer_words(o) for o in outputs]
    return {"empty": sum(1 for w in words if not w) / n,
            "degenerate": sum(1 for w in words if is_degenerate(w)) / n,
            "undecodable": sum(1 for o in outputs if "\ufffd" in o) / n}


def nonfinite_count(values) -> int:
    return sum(1 for v in values if v is not None and not math.isfinite(float(v)))


class HealthGuard:
    """Checks each step's record (a dict with reward_mean, reward_std, kl_per_token, degenerate, undecodable,
    nonfinite) against the bounds; logs `health/*`; returns the tripped signals as warning lines."""

    def __init__(self, bounds: dict | None = None, window: int = 3, log=None):
        self.bounds = dict(DEFAULTS, **(bounds or {}))
        self.window = max(1, window)
        self.log = log or (lambda values, step: None)
        self.history: list[dict] = []

    def check(self, step: dict) -> list[str]:
        self.history.append(step)
        values = {"nonfinite": float(step.get("nonfinite", 0)),
                  "kl_per_token": float(step.get("kl_per_token", float("nan"))),
                  "degenerate": float(step.get("degenerate", float("nan"))),
                  "undecodable": float(step.get("undecodable", float("nan"))),
                  "reward_drop": self.reward_drop()}
        self.log({f"health/{k}": v for k, v in values.items() if math.isfinite(v)}, step["step"])
        bounds = {"nonfinite": 0.0, "kl_per_token": self.bounds["max_kl_per_token"],
                  "degenerate": self.bounds["max_degenerate"], "undecodable": self.bounds["max_undecodable"],
                  "reward_drop": self.bounds["max_reward_drop"]}
        tripped = []
        for name, value in values.items():
            if name == "nonfinite" and value > 0 or name != "nonfinite" and math.isfinite(value) and value > bounds[name]:
                tripped.append(f"unhealthy at step {step['step']}: {name} = {value:.4g} (bound {bounds[name]:g}); "
                               f"likely causes: {CAUSES[name]}")
        return tripped

    def reward_drop(self) -> float:
        """How far the mean reward of the last `window` steps fell below that of the first `window`, in units of
        the first steps' per-sample reward std (NaN until there are 2 windows of steps)."""
        h = [s for s in self.history if math.isfinite(s.get("reward_mean", float("nan")))]
        if len(h) < 2 * self.window:
            return float("nan")
        first, last = h[: self.window], h[-self.window:]
        start = sum(s["reward_mean"] for s in first) / len(first)
        now = sum(s["reward_mean"] for s in last) / len(last)
        std = (sum((s.get("reward_std") or 0.0) ** 2 for s in first) / len(first)) ** 0.5
        return (start - now) / max(std, 1e-8)

    def state(self) -> list[dict]:
        return [{k: s.get(k) for k in ("step", "reward_mean", "reward_std")} for s in self.history]

    def restore(self, history: list[dict]) -> None:
        self.history = list(history)


def hf_callback(stop_on_unhealthy: bool, scalars):
    """Health guard for the HF-Trainer reward models: NaN/inf in the logged training loss, gradient norm or eval loss.
    Logs `health/nonfinite`; warns; with `stop_on_unhealthy` saves a checkpoint and stops training (the caller then
    marks the run failed with `.reason` and exports nothing)."""
    from transformers import TrainerCallback

    class Health(TrainerCallback):
        reason = None

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs:
                return control
            bad = {k: v for k, v in logs.items() if k in ("loss", "grad_norm", "eval_loss")
                   and isinstance(v, (int, float)) and not math.isfinite(v)}
            if state.is_world_process_zero:
                scalars.log({"health/nonfinite": float(len(bad))}, state.global_step)
            if bad:
                line = (f"unhealthy at step {state.global_step}: nonfinite = {len(bad)} "
                        f"({', '.join(f'{k}={v}' for k, v in bad.items())}) (bound 0)")
                if state.is_world_process_zero:
                    print(f"[health] WARNING {line}; likely causes: {CAUSES['nonfinite']}", flush=True)
                if stop_on_unhealthy and self.reason is None:
                    self.reason = line
                    control.should_save = True
                    control.should_training_stop = True
            return control

    return Health()
