# rlhf-overlay: NEW file (not in upstream DeepSpeed-Chat). Health guards for the step-2 (reward model, DPO) and
# step-3 (PPO) main.py (patch 0024): a LLaMA2 PPO run with ZeRO-3 + the hybrid engine can produce repeated tokens,
# empty answers or gibberish for hours (DeepSpeedExamples #864, #794, DeepSpeed #4788), and losses can go to inf
# (#586, #444); upstream watches nothing. The signals, bounds and likely causes are rlhf_overlay.runtime.health's
# (the same as trlx PPO's); this file only gathers DeepSpeed-Chat's numbers for them.
"""Health guards for DeepSpeed-Chat training loops.

    health_guard.add_arguments(parser)
    guard = health_guard.Guard(args, writer, tokenizer)
    reason = guard.ppo_step(step, exp_data, reward_mean, kl_per_token, losses, engines)   # PPO, after training
    reason = guard.nonfinite_step(step, {"loss": loss_value}, engines)                     # RM / DPO, each step
    ckpt.step_boundary(..., stop_reason=reason)        # checkpoint, status.json failed, exit 3 (ON_UNHEALTHY=stop)
    guard.stop_without_checkpoints(ckpt, reason)       # the same stop without --checkpoint_dir

`reason` is None while the run is healthy or with --on_unhealthy warn (the warning line is printed either way).
Every signal is a tensorboard scalar `health/<name>` (rank 0).

Fault injection (tests only): RLHF_FAULT_INJECTION=<signal>@<step> corrupts what the guard measures from that step
on — nonfinite: the reward / loss becomes NaN; kl_per_token: +10 nats; degenerate: every answer is its first token
repeated; undecodable: every answer gets U+FFFD; reward_drop: the reward falls by 3 per step — so each guard can be
seen firing in a real run.
"""
import math
import os
import sys

FAULT_ENV = "RLHF_FAULT_INJECTION"
SIGNALS = ("nonfinite", "kl_per_token", "degenerate", "undecodable", "reward_drop")
DSCHAT_CAUSES = ("DeepSpeed-Chat LLaMA2 with ZeRO-3 + the hybrid engine generates from stale or partitioned weights "
                 "(DeepSpeedExamples #864/#794, DeepSpeed #4788): rerun without --enable_hybrid_engine or with "
                 "ZeRO stage 2")


def add_arguments(parser):
    from rlhf_overlay.runtime.health import DEFAULTS
    group = parser.add_argument_group("health guards (rlhf-overlay)")
    group.add_argument("--on_unhealthy", choices=("stop", "warn"), default="stop",
                       help="when a health guard trips: stop (checkpoint, status.json failed, exit 3) or only warn")
    group.add_argument("--max_kl_per_token", type=float, default=DEFAULTS["max_kl_per_token"],
                       help="PPO: KL(actor || reference) per answer token above this (nats) is unhealthy")
    group.add_argument("--max_degenerate", type=float, default=DEFAULTS["max_degenerate"],
                       help="PPO: share of empty or looping answers above this is unhealthy")
    group.add_argument("--max_undecodable", type=float, default=DEFAULTS["max_undecodable"],
                       help="PPO: share of answers with undecodable tokens above this is unhealthy")
    group.add_argument("--max_reward_drop", type=float, default=DEFAULTS["max_reward_drop"],
                       help="PPO: reward mean falling by more than this many start-of-run per-sample reward stds "
                       "is a collapse")
    return parser


def _fault():
    """(signal, first step) of RLHF_FAULT_INJECTION, or (None, 0)."""
    raw = os.environ.get(FAULT_ENV, "").strip()
    if not raw:
        return None, 0
    name, _, at = raw.partition("@")
    if name not in SIGNALS or not at.isdigit():
        raise SystemExit(f"error: {FAULT_ENV}={raw!r}: give <signal>@<step>, signal one of {', '.join(SIGNALS)}")
    return name, int(at)


def grad_norms(engines):
    """The global gradient norm of each DeepSpeed engine's last step (None where DeepSpeed kept none or skipped the
    step for an fp16 overflow)."""
    norms = {}
    for tag, engine in engines.items():
        get = getattr(engine, "get_global_grad_norm", None)
        # an fp16 overflow step is skipped by DeepSpeed's loss scaler (its inf norm is expected, not a fault)
        overflow = bool(getattr(getattr(engine, "optimizer", None), "overflow", False))
        value = get() if get is not None and not overflow else None
        norms[f"{tag}_grad_norm"] = None if value is None else float(value)
    return norms


class Guard:

    def __init__(self, args, writer, tokenizer=None):
        from rlhf_overlay.runtime.health import HealthGuard
        self.stop = args.on_unhealthy == "stop"
        self.writer = writer
        self.tokenizer = tokenizer
        self.rank = args.global_rank
        self.fault, self.fault_at = _fault()
        bounds = {k: getattr(args, k) for k in ("max_kl_per_token", "max_degenerate", "max_undecodable",
                                                 "max_reward_drop")}
        self.guard = HealthGuard(bounds, log=lambda values, step: self._log(values, step - self.tb_offset))
        self.tb_offset = 0

    def _log(self, values, step):
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, global_step=step)

    def _faulty(self, signal, step):
        return self.fault == signal and step >= self.fault_at

    def _answers(self, exp, step):
        answers = exp["input_ids"][:, exp["prompts"].shape[1]:]
        if self._faulty("degenerate", step):
            answers = answers[:, :1].repeat(1, max(answers.shape[1], 4))
        texts = self.tokenizer.batch_decode(answers, skip_special_tokens=True)
        if self._faulty("undecodable", step):
            texts = [t + "\ufffd" for t in texts]
        return texts

    def _report(self, lines, more_causes=""):
        """Warning lines (rank 0 prints them); the reason to stop (the first line without its causes), or None."""
        for line in lines:
            if self.rank <= 0:
                print(f"[health] WARNING {line}{more_causes if '#864' not in line else ''}", flush=True)
        return lines[0].split("; likely causes")[0] if lines and self.stop else None

    def ppo_step(self, step, exp, reward_mean, kl_per_token, losses, engines):
        """After PPO step `step` (1-based; its tensorboard points are at step - 1, as ppo/*): rewards, actor/critic losses and gradient norms for NaN/inf, KL
        per answer token, degenerate and undecodable answers (this rank's last experience batch, decoded), reward
        collapse."""
        from rlhf_overlay.runtime.health import answer_shares, nonfinite_count
        rewards = exp["rewards"].float()
        reward_mean = float(reward_mean)
        reward_std = float(rewards.std()) if rewards.numel() > 1 else 0.0
        if self._faulty("nonfinite", step):
            reward_mean = float("nan")
        if self._faulty("reward_drop", step):
            reward_mean -= 3.0 * (step - self.fault_at + 1) * max(reward_std, 1.0)
        if self._faulty("kl_per_token", step):
            kl_per_token += 10.0
        values = [reward_mean, *losses.values(), *grad_norms(engines).values()]
        self.tb_offset = 1
        record = {"step": step, "reward_mean": reward_mean, "reward_std": reward_std,
                  "kl_per_token": kl_per_token, "nonfinite": nonfinite_count(values)}
        record.update(answer_shares(self._answers(exp, step)))
        return self._report(self.guard.check(record), f"; {DSCHAT_CAUSES}")

    def nonfinite_step(self, step, losses, engines):
        """After a reward-model / DPO step: NaN/inf in the loss and the gradient norm (health/nonfinite)."""
        from rlhf_overlay.runtime.health import CAUSES, nonfinite_count
        values = dict(losses, **grad_norms(engines))
        if self._faulty("nonfinite", step):
            values["loss"] = float("nan")
        bad = {k: v for k, v in values.items() if v is not None and not math.isfinite(v)}
        count = nonfinite_count(values.values())
        self._log({"health/nonfinite": float(count)}, step)
        if not count:
            return None
        line = (f"unhealthy at step {step}: nonfinite = {count} ({', '.join(f'{k}={v}' for k, v in bad.items())}) "
                f"(bound 0); likely causes: {CAUSES['nonfinite']}")
        return self._report([line])

    def stop_without_checkpoints(self, ckpt, reason):
        """With --checkpoint_dir, ckpt.step_boundary(stop_reason=) has already stopped the run; without it, stop here
        (every rank: the decision is agreed, as step_boundary does)."""
        if ckpt.enabled:
            return
        from rlhf_overlay.runtime import checkpoints as ck
        (failed,) = ck.agree([reason is not None], device=ckpt._device())
        if failed:
            if self.rank <= 0:
                print(f"stopped: {reason or 'a health guard tripped on another rank'} (--on_unhealthy stop; no "
                      f"--checkpoint_dir, so no checkpoint)", flush=True)
            sys.stdout.flush()
            raise SystemExit(3)
