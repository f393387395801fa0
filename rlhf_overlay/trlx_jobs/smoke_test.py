"""PPO smoke test: `make ppo-smoke-test` — PPO alone (no SFT, no reward-model training) on trlx.

With no arguments: the embedded pre-trained tiny BLOOM on CPU (it answers in the synthetic language), rewarded by a
simple learnable rule (rlhf_overlay.data.synthetic.rule_reward), nothing downloaded, well under a minute on 2 cores. It
prints one line per PPO step (mean reward, KL, KL per answer token, fluency, lengths, timings) and ends with the three
numbers of a healthy run and the verdict; it exits 1 unless all hold (first/last = means over the first/last few
steps):
    mean reward: <first> -> <last>      clearly rises (last - first > 3 standard errors)
    fluency: base <b> -> end <e>        the base's answers are fluent (>= 0.95) and stay so (>= 0.9 at the end):
                                        words of the synthetic language, not empty, no token/n-gram loops
    KL per answer token at the end      <= 0.5 nats (the policy did not run away from the reference)
With your own MODEL or DATA only the reward rise is checked (the fluency measure knows only the synthetic language).

    make ppo-smoke-test                                  # tiny BLOOM, rule reward, CPU -> runs/ppo-smoke-test-<time>/
    make ppo-smoke-test OUTPUT=/tmp/smoke OVERWRITE=1
    python -m rlhf_overlay.trlx_jobs.smoke_test --steps 10     # any trlx_ppo option works here too
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
import sys
from pathlib import Path
from typing import Sequence

from rlhf_overlay.errors import main_guard
from rlhf_overlay.runtime.verdict import (BASE_FLUENCY_MIN, END_FLUENCY_MIN, END_KL_PER_TOKEN_MAX,  # noqa: F401
                                        failures, health, verdict)   # the bounds of a healthy run, shared
from rlhf_overlay.trlx_jobs.common import write_json
from rlhf_overlay.trlx_jobs.ppo import PPORunConfig, build_parser as _ppo_parser, config_from_args
from rlhf_overlay.trlx_jobs.ppo import print_summary, run as run_ppo

# The embedded default, tuned to finish in well under a minute on 2 CPU cores with a clearly rising reward, fluent
# answers and a bounded KL (trade-off measured across KL coefficients and learning rates: see the README).
SMOKE_DEFAULTS = PPORunConfig(arch="bloom", reward="rule", run_kind="ppo-smoke-test")


def build_parser():
    return _ppo_parser(prog="python -m rlhf_overlay.trlx_jobs.smoke_test", defaults=SMOKE_DEFAULTS, doc=__doc__)


@main_guard   # UserError (bad flag, setting, data row, folder) -> `error: ...`, exit 2; Ctrl-C -> one line, 130
def main(argv: Sequence[str] | None = None, worker=None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.worker:
        from rlhf_overlay.trlx_jobs.ppo_worker import worker_main

        from rlhf_overlay.runtime.dist_exit import end_process_group
        return end_process_group(worker_main(Path(ns.worker)))  # no SIGABRT from a group torn down at exit
    cfg = config_from_args(ns)
    if cfg.reward == "model" and not cfg.rm:
        cfg = dataclasses.replace(cfg, rm_untrained=True)  # the seed's smoke test: an untrained value-head RM
    rc, run_dir = run_ppo(cfg, argv, module="rlhf_overlay.trlx_jobs.smoke_test", worker=worker, dry_run=ns.dry_run,
                          given=set(ns.settings_given))
    if rc != 0 or run_dir is None:   # failed, or a dry run
        return rc
    m = json.loads((run_dir / "metrics.json").read_text())
    steps = m["steps"]
    v = verdict(steps, cfg.summary_window)
    h = health(steps, cfg.summary_window)
    synthetic_language = not cfg.model and not cfg.data   # fluency is measured in the synthetic language
    fails = failures(v, h if synthetic_language else None)
    m["reward_first"], m["reward_last"], m["verdict"], m["rose"] = v["first"], v["last"], v, v["rose"]
    m["health"], m["failed"], m["passed"] = h, fails, not fails
    write_json(run_dir / "metrics.json", m)
    print_summary(run_dir)
    bounds = "" if synthetic_language else " (not checked: the measure knows only the synthetic language)"
    print(f"reward rise: {v['rise']:+.3f} = {v['rise'] / max(v['standard_error'], 1e-12):.1f} standard errors "
          f"(needs > 3)\n"
          f"fluency: base {h['fluency_base']:.2f} (needs >= {BASE_FLUENCY_MIN}) -> end {h['fluency_end']:.2f} "
          f"(needs >= {END_FLUENCY_MIN}){bounds}\n"
          f"KL per answer token at the end: {h['kl_per_token_end']:.3f} nats (needs <= {END_KL_PER_TOKEN_MAX})"
          f"{bounds}", flush=True)
    if "sentences_end" in h:
        print(f"sentences of the language (not a bound; word lists are not): base {h['sentences_base']:.2f} -> end "
              f"{h['sentences_end']:.2f}", flush=True)
    if not fails:
        what = "answers stayed fluent, KL bounded" if synthetic_language else "(fluency and KL not checked)"
        print(f"PASS: the mean reward rose by {v['rise']:+.3f} over {len(steps)} PPO steps; {what}", flush=True)
        return 0
    if cfg.reward == "rule":
        print(f"FAIL: {'; '.join(fails)} (over {len(steps)} PPO steps; see {run_dir / 'training.log'})",
              file=sys.stderr, flush=True)
        return 1
    print(f"note: {'; '.join(fails)} (REWARD=model scores with an untrained reward model, so no rise is promised)",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
