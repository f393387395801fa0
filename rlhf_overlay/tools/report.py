"""Training reports: curves as one PNG (a panel per metric) and a summary.md, from tensorboard event files.

    python -m rlhf_overlay.tools.report runs/ppo-smoke-test-20261123-212000          # -> that folder/report.png, summary.md
    python -m rlhf_overlay.tools.report runs/a runs/b --out runs/compare-a-b         # overlay two runs' curves
    make report RUN="runs/a runs/b"

Every training target writes its scalars under common names (COMMON_METRICS below) next to the framework's
own, so runs of either framework read the same. Event files are read with tensorboard's own reader, from the
run folder and all its subfolders; a run still in progress is reported as far as it has been flushed.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from rlhf_overlay import settings
from rlhf_overlay.errors import UserError, main_guard

# The project's common scalar names, in panel order. `lower_is_better` decides what "best" means.
COMMON_METRICS = ["rm/loss", "rm/acc", "ppo/reward_mean", "ppo/kl", "ppo/policy_loss", "ppo/value_loss",
                  "ppo/response_length", "dpo/loss", "dpo/acc", "dpo/reward_margin"]
MAX_PANELS = 16  # default cap: common metrics first, then the framework's own, alphabetically


class ReportError(UserError, RuntimeError):
    """A run folder that cannot be reported, with what to do about it."""


def lower_is_better(tag: str) -> bool:
    t = tag.lower()
    return any(k in t for k in ("loss", "kl", "perplexity", "error", "time"))


@dataclass
class Series:
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    wall_times: list[float] = field(default_factory=list)


@dataclass
class RunScalars:
    run_dir: Path
    series: dict[str, Series]

    @property
    def label(self) -> str:
        return self.run_dir.name


def read_scalars(run_dir: Path) -> RunScalars:
    """All scalar series of a run folder (recursively). A tag found in several event folders keeps the folder
    as a prefix, so e.g. actor and critic logs of the same tag do not mix."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ReportError(f"run folder {run_dir} does not exist; pass the OUTPUT folder of a training run "
                          f"(e.g. RUN=runs/<name>)")
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is a file; pass the run folder that contains it")
    event_dirs = sorted({f.parent for f in run_dir.rglob("events.out.tfevents.*") if f.is_file()})
    if not event_dirs:
        raise ReportError(f"{run_dir} holds no tensorboard event files (events.out.tfevents.*) yet: the run has "
                          f"not logged anything, or this is not a training run folder")
    per_dir: dict[Path, dict[str, Series]] = {}
    for d in event_dirs:
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})  # 0 = keep every point
        acc.Reload()
        per_dir[d] = {}
        for tag in acc.Tags().get("scalars", []):
            s = Series()
            for ev in acc.Scalars(tag):
                s.steps.append(int(ev.step))
                s.values.append(float(ev.value))
                s.wall_times.append(float(ev.wall_time))
            per_dir[d][tag] = s
    counts: dict[str, int] = {}
    for tags in per_dir.values():
        for tag in tags:
            counts[tag] = counts.get(tag, 0) + 1
    merged: dict[str, Series] = {}
    for d, tags in per_dir.items():
        rel = d.relative_to(run_dir).as_posix()
        for tag, s in tags.items():
            key = tag if counts[tag] == 1 or rel == "." else f"{rel}:{tag}"
            if key in merged:  # same tag, same folder label (several event files): one series, by step
                m = merged[key]
                pts = sorted(zip(m.steps + s.steps, m.values + s.values, m.wall_times + s.wall_times))
                merged[key] = Series([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts])
            else:
                merged[key] = s
    if not any(s.values for s in merged.values()):
        raise ReportError(f"{run_dir} has event files but no scalars yet; report again once the run has logged "
                          f"a step")
    return RunScalars(run_dir, merged)


def choose_panels(runs: list[RunScalars], max_panels: int = MAX_PANELS) -> tuple[list[str], list[str]]:
    """Tags to draw (common names first) and the ones left out by the cap."""
    tags = sorted({t for r in runs for t in r.series})
    common = [t for t in COMMON_METRICS if t in tags]
    rest = [t for t in tags if t not in common]
    chosen = (common + rest)[:max_panels]
    return chosen, [t for t in tags if t not in chosen]


def plot(runs: list[RunScalars], tags: list[str], png: Path) -> tuple[int, int]:
    """One panel per tag, each run a line; returns the image size in pixels."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    cols = min(3, len(tags))
    rows = math.ceil(len(tags) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, tag in zip(axes.flat, tags):
        for r in runs:
            s = r.series.get(tag)
            if s and s.values:
                ax.plot(s.steps, s.values, marker="o" if len(s.values) < 20 else None, markersize=3,
                        label=r.label)
        ax.set_title(tag, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tags):]:
        ax.axis("off")
    fig.suptitle(" vs ".join(r.label for r in runs), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_size_inches()[1]))  # leave room for the title
    tmp = png.with_name(f".{png.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=80)
    width, height = (int(v) for v in fig.get_size_inches() * 80)
    plt.close(fig)
    os.replace(tmp, png)
    return width, height


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def status_line(run_dir: Path) -> str | None:
    """One line from the run's status.json (rlhf_overlay.runtime.status): state, progress, why it stopped, how to resume."""
    from rlhf_overlay.runtime.status import read_status
    st = read_status(run_dir)
    if st is None:
        return None
    parts = [f"**{st.get('state', 'unknown')}**"]
    if st.get("state") == "completed" and st.get("total_steps"):
        parts.append(f"{st['total_steps']} steps")
    elif st.get("total_steps"):
        parts.append(f"newest checkpoint at step {st.get('last_step') or 0}/{st['total_steps']}")
    if st.get("state") != "completed" and st.get("reason"):
        parts.append(str(st["reason"]))
    if st.get("state") != "completed" and st.get("checkpoint") and st.get("resume_command"):
        parts.append(f"resume: `{st['resume_command']}`")
    return "Status: " + "; ".join(parts)


def summarize(runs: list[RunScalars], tags: list[str], left_out: list[str]) -> str:
    lines = [f"# Training report", "", f"Generated {_dt.datetime.now().isoformat(timespec='seconds')} "
             f"by `python -m rlhf_overlay.tools.report`.", ""]
    for r in runs:
        lines += [f"## {r.label}", "", f"Folder: `{r.run_dir}`", ""]
        state = status_line(r.run_dir)
        if state:
            lines += [state, ""]
        command = r.run_dir / "command.txt"
        if command.exists():
            lines += ["Command:", "", "```", command.read_text().strip(), "```", ""]
        config = r.run_dir / "config.json"
        if config.exists():
            try:
                cfg = json.loads(config.read_text())
                lines += ["| setting | value |", "|---|---|"]
                lines += [f"| {k} | `{v}` |" for k, v in sorted(cfg.items())]
                lines.append("")
            except ValueError:
                lines += [f"(config.json is not valid JSON)", ""]
        walls = [w for s in r.series.values() for w in s.wall_times]
        steps = [st for s in r.series.values() for st in s.steps]
        wall = max(walls) - min(walls) if walls else 0.0
        step_span = (max(steps) - min(steps)) if steps else 0
        rate = f"{step_span / wall:.3g}" if wall > 0 else "n/a"
        lines += [f"Wall time (first to last logged scalar): {wall:.1f} s; steps {min(steps)}..{max(steps)}; "
                  f"steps/s: {rate}", ""]
        lines += ["| metric | points | start | end | best | best at step |", "|---|---|---|---|---|---|"]
        for tag in tags:
            s = r.series.get(tag)
            if not s or not s.values:
                continue
            best_i = (min if lower_is_better(tag) else max)(range(len(s.values)), key=lambda i: s.values[i])
            lines.append(f"| {tag} | {len(s.values)} | {_fmt(s.values[0])} | {_fmt(s.values[-1])} | "
                         f"{_fmt(s.values[best_i])} | {s.steps[best_i]} |")
        lines.append("")
    if left_out:
        lines += [f"Not drawn (over the panel cap; pass --max-panels): {', '.join(left_out)}", ""]
    return "\n".join(lines)


def write_report(run_dirs: list[Path], out_dir: Path | None = None, max_panels: int = MAX_PANELS) -> tuple[Path, Path]:
    """Write report.png and summary.md; into the run folder for one run, into `out_dir` for several."""
    run_dirs = [Path(r) for r in run_dirs]
    if not run_dirs:
        raise ReportError("no run folder given; pass one or more, e.g. RUN=runs/<name>")
    if out_dir is None:
        if len(run_dirs) > 1:
            from rlhf_overlay.paths import RUNS_DIR
            out_dir = RUNS_DIR / ("compare-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
        else:
            out_dir = run_dirs[0]
    runs = [read_scalars(r) for r in run_dirs]
    tags, left_out = choose_panels(runs, max_panels)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, md = out_dir / "report.png", out_dir / "summary.md"
    plot(runs, tags, png)
    text = summarize(runs, tags, left_out) + f"![curves]({png.name})\n"
    tmp = md.with_name(f".{md.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, md)
    return png, md


def report_job_runs(run_dirs_file: Path, job_rc: int) -> None:
    """report.png + summary.md for every top-level run folder a job made (listed one a line in `run_dirs_file` by
    rlhf_overlay.runtime.runs; a folder inside another one is part of that one's report): training_scripts/run.sh
    and the seed's commands call this after the job. After a job that failed (job_rc != 0) only folders whose
    training completed (status.json `completed`: e.g. a PPO run that finished but failed its tiny-world verdict,
    exit 1) are reported; a crashed or interrupted run is not. A folder without event files is skipped."""
    from rlhf_overlay.runtime.status import read_status

    dirs = sorted({line.strip() for line in Path(run_dirs_file).read_text().splitlines() if line.strip()})
    for d in dirs:
        if any(d != o and d.startswith(o + os.sep) for o in dirs) or not Path(d).is_dir():
            continue
        if job_rc != 0 and (read_status(Path(d)) or {}).get("state") != "completed":
            continue
        if next(Path(d).rglob("events.out.tfevents.*"), None) is not None:
            if main([d]) != 0:
                print(f"warning: the run {'succeeded' if job_rc == 0 else 'finished'} but its report could not be "
                      f"written (see above)", file=sys.stderr)


@dataclass
class ReportConfig:
    runs: list[str] = field(default_factory=list, metadata={"help": "run folder(s); several are overlaid panel by "
                                                                    "panel (RUN)", "rest": True})
    out: str = field(default="", metadata={"help": "output folder (default: the run folder for one run, "
                                                   "runs/compare-<time> for several)"})
    max_panels: int = field(default=MAX_PANELS, metadata={"help": "most panels to draw"})
    after_job: str = field(default="", metadata={"help": "instead of RUN: report the run folders a job made, listed "
                                                         "in this file (training_scripts/run.sh)"})
    job_exit_code: int = field(default=0, metadata={"help": "with --after-job: the job's exit code (after a failed "
                                                            "job only folders whose training completed)"})


def build_parser() -> settings.SettingsParser:
    return settings.build_parser(ReportConfig, prog="python -m rlhf_overlay.tools.report",
                                 description=__doc__.split("\n\n")[0], raw=False)


@main_guard
def main(argv=None) -> int:
    args = settings.config_from_args(ReportConfig, build_parser().parse_args(argv))
    if args.after_job:
        report_job_runs(Path(args.after_job), args.job_exit_code)
        return 0
    png, md = write_report([Path(r) for r in args.runs], Path(args.out) if args.out else None, args.max_panels)
    for r in args.runs:
        state = status_line(Path(r))
        if state:
            print(f"report: {r}: {state.replace('**', '').replace('`', '')}")
    print(f"report: wrote {png} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
