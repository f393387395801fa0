"""PPO smoke test: `make ppo-smoke-test` — PPO alone (no SFT, no reward-model training) on trlx.

With no arguments: the embedded tiny BLOOM on CPU, rewarded by a simple learnable rule
(rlhf_overlay.synthetic.rule_reward), nothing downloaded, a few minutes on 2 cores. It prints one line per PPO step
(mean reward, KL, lengths, timings) and ends with `mean reward: <first> -> <last>` (means over the first and the last
few steps); it exits 1 if the reward did not clearly rise (last - first > 3 standard errors), so it is a real test.

    make ppo-smoke-test                                  # tiny BLOOM, rule reward, CPU -> runs/ppo-smoke-test-<time>/
    make ppo-smoke-test OUTPUT=/tmp/smoke OVERWRITE=1
    python -m rlhf_overlay.ppo_smoke_test --steps 10     # any trlx_ppo option works here too
The seed's form (trlx_bloom_rlhf_test.py) on real models: policy and an untrained value-head reward model from the
same base model, reward normalised by the reference answer; one GPU, or several through accelerate:
    make ppo-smoke-test MODEL=/models/bloom-7b1 REWARD=model DATA=/data/rl       # rows {prompt, reference}
    make ppo-smoke-test MODEL=/models/bloom-7b1 REWARD=model DATA=/data/rl NUM_GPUS=8
    make ppo-smoke-test MODEL=/models/bloom-7b1 REWARD=model DATA=/data/rl HOSTFILE=/etc/hostfile ZERO_STAGE=2

Output folder: as `make ppo-bloom` (policy/, metrics.json, tensorboard/ with ppo/* scalars, samples.jsonl,
training.log); the verdict is in metrics.json (`rose`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Sequence

from rlhf_overlay.trlx_common import ConfigError, user_errors, write_json
from rlhf_overlay.trlx_ppo import PPORunConfig, build_parser as _ppo_parser, config_from_args
from rlhf_overlay.trlx_ppo import print_summary, run as run_ppo

# The embedded default, tuned to finish in a few minutes on 2 CPU cores with a clearly rising reward.
SMOKE_DEFAULTS = PPORunConfig(arch="bloom", reward="rule", run_kind="ppo-smoke-test")


def build_parser():
    return _ppo_parser(prog="python -m rlhf_overlay.ppo_smoke_test", defaults=SMOKE_DEFAULTS, doc=__doc__)


def verdict(steps: list[dict], window: int) -> dict:
    """Did the mean reward clearly rise? first/last = means of the first/last `window` steps; `clearly` = the
    difference exceeds 3 standard errors (from the per-sample reward spread of those steps)."""
    k = min(window, max(1, len(steps) // 2))
    head, tail = steps[:k], steps[-k:]

    def mean_se(xs):
        m = sum(s["reward_mean"] for s in xs) / len(xs)
        n = sum(s["samples"] for s in xs)
        var = sum((s.get("reward_std") or 0.0) ** 2 * s["samples"] for s in xs) / max(1, n)
        return m, math.sqrt(var / max(1, n))

    first, se1 = mean_se(head)
    last, se2 = mean_se(tail)
    se = math.sqrt(se1 ** 2 + se2 ** 2)
    rise = last - first
    return {"first": first, "last": last, "rise": rise, "standard_error": se, "window": k,
            "rose": bool(rise > 0 and rise > 3 * se)}


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.worker:
        from rlhf_overlay.trlx_ppo import worker_main

        return worker_main(Path(ns.worker))
    cfg = config_from_args(ns)
    if cfg.reward == "model" and not cfg.rm:
        cfg = dataclasses.replace(cfg, rm_untrained=True)  # the seed's smoke test: an untrained value-head RM
    try:
        rc, run_dir = run_ppo(cfg, argv, module="rlhf_overlay.ppo_smoke_test")
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from rlhf_overlay.errors import interrupted
        return interrupted()
    if rc != 0:
        return rc
    m = json.loads((run_dir / "metrics.json").read_text())
    v = verdict(m["steps"], cfg.summary_window)
    m["reward_first"], m["reward_last"], m["verdict"], m["rose"] = v["first"], v["last"], v, v["rose"]
    write_json(run_dir / "metrics.json", m)
    print_summary(run_dir)
    if v["rose"]:
        print(f"PASS: the mean reward rose by {v['rise']:+.3f} ({v['rise'] / max(v['standard_error'], 1e-12):.1f} "
              f"standard errors) over {len(m['steps'])} PPO steps", flush=True)
        return 0
    msg = (f"the mean reward did not clearly rise ({v['rise']:+.3f}, {3 * v['standard_error']:.3f} needed) over "
           f"{len(m['steps'])} PPO steps")
    if cfg.reward == "rule":
        print(f"FAIL: {msg}; see {run_dir / 'training.log'}", file=sys.stderr, flush=True)
        return 1
    print(f"note: {msg} (REWARD=model scores with an untrained reward model, so no rise is promised)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
