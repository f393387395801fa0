"""The verdict of a tiny PPO run: did it learn, and is it still healthy? Shared by trlx (`make ppo-smoke-test`,
`make ppo-bloom`, `make ppo-gptj`) and DeepSpeed-Chat (`make ppo-llama2`).

A run is a list of PPO steps, each a dict with `reward_mean`, `samples`, `fluency`, `kl_per_token` and, when the
framework reports it, `reward_std` (the per-sample spread) and `sentences`. Over the first / last `window` steps:
    mean reward: <first> -> <last>      clearly rises (last - first > 3 standard errors)
    fluency: base <b> -> end <e>        the base's answers are fluent (>= 0.95) and stay so (>= 0.9 at the end):
                                        words of the synthetic language, not empty, no token/n-gram loops
    KL per answer token at the end      <= 0.5 nats (the policy did not run away from the reference)
The bounds describe the embedded tiny world (tiny bases, synthetic language, tiny reward). A run on your own model
or data prints the same numbers but is not judged by them: the fluency measure knows only the synthetic language,
and how far a real policy may move is the user's call.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

BASE_FLUENCY_MIN = 0.95
END_FLUENCY_MIN = 0.9
END_KL_PER_TOKEN_MAX = 0.5
RISE_STANDARD_ERRORS = 3.0


def verdict(steps: list[dict], window: int) -> dict:
    """Did the mean reward clearly rise? first/last = means of the first/last `window` steps; `clearly` = the
    difference exceeds 3 standard errors. The standard error comes from the per-sample reward spread of those steps
    (`reward_std`, `samples`) when every step has it, else from the spread of the steps' means (which also holds
    any trend within the window: more cautious, never less)."""
    k = min(window, max(1, len(steps) // 2))
    head, tail = steps[:k], steps[-k:]
    per_sample = all(s.get("reward_std") is not None for s in steps)

    def mean_se(xs):
        m = sum(s["reward_mean"] for s in xs) / len(xs)
        if per_sample:
            n = sum(s["samples"] for s in xs)
            var = sum(s["reward_std"] ** 2 * s["samples"] for s in xs) / max(1, n)
            return m, math.sqrt(var / max(1, n))
        if len(xs) < 2:
            return m, math.inf   # one step and no per-sample spread: nothing to measure the noise with
        var = sum((s["reward_mean"] - m) ** 2 for s in xs) / (len(xs) - 1)
        return m, math.sqrt(var / len(xs))

    first, se1 = mean_se(head)
    last, se2 = mean_se(tail)
    se = math.sqrt(se1 ** 2 + se2 ** 2)
    rise = last - first
    return {"first": first, "last": last, "rise": rise, "standard_error": se, "window": k,
            "rose": bool(rise > 0 and rise > RISE_STANDARD_ERRORS * se)}


def health(steps: list[dict], window: int) -> dict:
    """Fluency of the base (the first step's rollouts are sampled before any update), fluency and KL per answer
    token at the end (means over the last `window` steps), each against its bound."""
    k = min(window, max(1, len(steps) // 2))
    tail = steps[-k:]
    base = steps[0]["fluency"]
    end = sum(s["fluency"] for s in tail) / k
    kl = sum(s["kl_per_token"] for s in tail) / k
    sentences = [s.get("sentences") for s in (steps[0], *tail)]
    if None not in sentences:   # reported, not a bound: the share of answers that are sentences, not word lists
        out_sentences = {"sentences_base": sentences[0], "sentences_end": sum(sentences[1:]) / k}
    else:
        out_sentences = {}
    return {**out_sentences, "fluency_base": base, "fluency_end": end, "kl_per_token_end": kl,
            "base_fluent": bool(base >= BASE_FLUENCY_MIN), "fluent_at_end": bool(end >= END_FLUENCY_MIN),
            "kl_bounded": bool(kl <= END_KL_PER_TOKEN_MAX)}


def failures(v: dict, h: dict | None) -> list[str]:
    """What failed, one phrase each (empty = a healthy run)."""
    out = []
    if not v["rose"]:
        need = RISE_STANDARD_ERRORS * v["standard_error"]
        out.append(f"the mean reward did not clearly rise ({v['rise']:+.3f}, {need:.3f} needed)")
    if h is not None:
        if not h["base_fluent"]:
            out.append(f"the base model is not fluent (fluency {h['fluency_base']:.2f} < {BASE_FLUENCY_MIN})")
        if not h["fluent_at_end"]:
            out.append(f"the answers stopped being fluent (fluency at the end {h['fluency_end']:.2f} < "
                       f"{END_FLUENCY_MIN})")
        if not h["kl_bounded"]:
            out.append(f"the KL to the reference ran away ({h['kl_per_token_end']:.3f} nats per answer token at the "
                       f"end > {END_KL_PER_TOKEN_MAX})")
    return out


def judge(steps: list[dict], window: int, tiny: bool, full_length: int = 0) -> dict:
    """verdict + health + failures of one run. Judged: a tiny-world run (embedded model, reward and data) of at
    least 2 * window steps (fewer leave no separate first and last steps to compare) and at least `full_length`
    steps, the tiny default's own length (the bounds are a promise about the default run; a shortened one — a test's
    or a user's quick try — is measured, not judged). Otherwise measured only, and `not_judged` says why."""
    v, h = verdict(steps, window), health(steps, window)
    fails = failures(v, h)
    why = ("" if len(steps) >= 2 * window else f"{len(steps)} PPO steps are too few to judge (needs >= {2 * window})")
    if not why and len(steps) < full_length:
        why = (f"{len(steps)} PPO steps, shorter than the tiny default's {full_length}: the bounds judge the default "
               f"run, a shortened one is only measured")
    if not tiny:
        why = ("these bounds describe the embedded tiny world (tiny base, synthetic language, tiny reward), not a run "
               "on your own model, reward model or data")
    judged = not why
    return {"verdict": v, "health": h, "judged": judged, "not_judged": why, "failed": fails if judged else [],
            "would_fail": fails, "passed": (not fails) if judged else None, "steps": len(steps)}


def report(result: dict, what: str, log: Path | None = None, reward_line: bool = True) -> int:
    """Print the three numbers and the verdict; 0 = passed (or not judged), 1 = failed (the FAIL line, on stderr,
    names what)."""
    v, h = result["verdict"], result["health"]
    lines = [f"mean reward: {v['first']:.3f} -> {v['last']:.3f}"] if reward_line else []
    se = v["standard_error"]
    rise_in_se = v["rise"] / se if 0 < se < math.inf else math.nan
    lines += [f"reward rise: {v['rise']:+.3f} = {rise_in_se:.1f} standard errors (needs > {RISE_STANDARD_ERRORS:g})",
              f"fluency: base {h['fluency_base']:.2f} (needs >= {BASE_FLUENCY_MIN}) -> end {h['fluency_end']:.2f} "
              f"(needs >= {END_FLUENCY_MIN})",
              f"KL per answer token at the end: {h['kl_per_token_end']:.3f} nats (needs <= {END_KL_PER_TOKEN_MAX})"]
    if "sentences_end" in h:
        lines.append(f"sentences of the language (not a bound; word lists are not): base {h['sentences_base']:.2f} "
                     f"-> end {h['sentences_end']:.2f}")
    print("\n".join(lines), flush=True)
    if not result["judged"]:
        print(f"note: not judged: {result['not_judged']}", flush=True)
        return 0
    where = f"; see {log}" if log else ""
    if not result["failed"]:
        print(f"PASS: {what}: the mean reward rose by {v['rise']:+.3f} over {result['steps']} PPO steps; answers "
              f"stayed fluent, KL bounded", flush=True)
        return 0
    print(f"FAIL: {what}: {'; '.join(result['failed'])} (over {result['steps']} PPO steps{where})",
          file=sys.stderr, flush=True)
    return 1


def record(path: Path, result: dict) -> None:
    """Add the result to a run's JSON results file under "verdict_of_run" (written atomically)."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["verdict_of_run"] = result
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def dschat_steps(tensorboard_dir: Path) -> list[dict]:
    """PPO steps of a DeepSpeed-Chat step-3 run from its tensorboard scalars (overlay patch 0009): ppo/reward_mean,
    ppo/kl (summed over the answer), ppo/response_length, ppo/fluency. No per-sample reward spread is logged, so
    the verdict's standard error comes from the steps' spread. A step logged twice (a resumed run) keeps its last
    value, as tensorboard shows it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    need = ("ppo/reward_mean", "ppo/kl", "ppo/response_length", "ppo/fluency")
    missing = [t for t in need if t not in tags]
    if missing:
        raise ValueError(f"{tensorboard_dir}: no {', '.join(missing)} scalars (is DeepSpeed-Chat overlay patch 0009 "
                         f"applied? `make verify`)")
    series = {t: {e.step: e.value for e in acc.Scalars(t)} for t in need}
    steps = []
    for step in sorted(series["ppo/reward_mean"]):
        length = series["ppo/response_length"].get(step, 0.0)
        steps.append({"step": step, "reward_mean": series["ppo/reward_mean"][step], "samples": None,
                      "fluency": series["ppo/fluency"][step], "length": length,
                      "kl_per_token": series["ppo/kl"][step] / length if length else 0.0})
    return steps


def judge_trlx_run(run_dir: Path, what: str, full_length: int = 0) -> int:
    """`make ppo-bloom` / `make ppo-gptj`: the run's three numbers and, for the tiny default (no MODEL, RM or DATA
    in its config.json), the verdict; recorded in its metrics.json. 0 = passed or not judged, 1 = failed."""
    settings = json.loads((run_dir / "config.json").read_text())["ppo"]
    m = json.loads((run_dir / "metrics.json").read_text())
    tiny = not (settings.get("model") or settings.get("rm") or settings.get("data"))
    result = judge(m["steps"], m.get("summary_window") or settings.get("summary_window", 3), tiny, full_length)
    record(run_dir / "metrics.json", result)
    return report(result, what, log=run_dir / "training.log", reward_line=False)
