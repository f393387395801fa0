"""Run an upstream's own test suite against our patched work tree, offline: `make upstream-tests`.

    python -m rlhf_overlay.engine.upstream_tests                       # every suite -> runs/upstream-tests-<time>/
    python -m rlhf_overlay.engine.upstream_tests --suite dschat -- -k "zero3 and offload"   # some matrix cells
    python -m rlhf_overlay.engine.upstream_tests --files test_models.py --out /tmp/ut   # one file, chosen folder
    python -m rlhf_overlay.engine.upstream_tests -- -k save_load       # extra pytest arguments after --

Like Debian's autopkgtest: the upstream's tests, unchanged, run against the upstream as we ship it (pin +
overlays). Each test file runs in its own pytest process from the upstream's root (its tests use paths relative
to it), with
  - HF_HOME = a private cache of tiny random stand-ins for every hub id the suite names
    (rlhf_overlay.engine.hub_standins) and HF_HUB_OFFLINE=1: nothing is downloaded;
  - the test-only dependencies (requirements-upstream-tests.txt: hypothesis, peft) from their own folder
    <venv>/upstream-tests-deps, put on PYTHONPATH only here: peft changes what trlx does at import, so the
    training stack never sees it;
  - our plugin (rlhf_overlay.engine.upstream_tests_plugin): tests that cannot run on CPU are skipped with the reason.
Writes, atomically, into the output folder: junit/<suite>-<file>.xml, logs/<suite>-<file>.log, results.json and
table.md (per file: passed / failed / errors / skipped, then every skip reason and failure). Exit status 0 when
nothing failed, 1 when a test failed or errored, 2 on bad input.

Suites: `trlx` (its tests/), and DeepSpeed-Chat's tests/test_training.py twice: `dschat` as written (actor
facebook/opt-125m = the OPT stand-in) and `dschat-llama` (actor = the embedded tiny LLaMA). That file runs step 3
through training_scripts/opt/single_node/sweep/run_single.sh for each cell of ZeRO 2/3 x hybrid engine x offload x
LoRA; it needs CRITIC_CKPT_DIR (a step-2 reward model: trained here once per stand-in with `make rm-llama2`'s
module and cached) and starts `deepspeed` from PATH. It runs from a folder of symlinks to upstream's files under the
output folder (dschat_shadow), so the cells' outputs never land in the upstream work tree. Here that is a shim (`--as-deepspeed`, see deepspeed_shim)
that starts DeepSpeed's own launcher with 2 CPU ranks and says, in the cell's log, each argument it changed: the
hub dataset Dahoas/rm-static -> the tiny prompt data (same prompt format; offline), a free rendezvous port instead
of the fixed 12346, a tokenized-data cache inside the cell's output folder, and for dschat-llama the actor and
LoRA module name of the tiny LLaMA, and `--on_unhealthy warn` while our step-3 health guard (DSE patch 0024) defaults
to stopping (upstream's main.py never stops a run). ZeRO stage, offload, LoRA rank, batch and sequence shapes, learning rates and
the 5 test steps are upstream's. The hybrid engine cells are skipped with the reason (upstream_tests_plugin).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlhf_overlay import PROJECT_ROOT, paths
from rlhf_overlay.errors import ArgumentParser, UserError, main_guard

DEPS_DIR_NAME = "upstream-tests-deps"
REQUIREMENTS = PROJECT_ROOT / "requirements-upstream-tests.txt"


class UpstreamTestsError(UserError, RuntimeError):
    pass


@dataclass(frozen=True)
class Suite:
    name: str
    root: Path              # cwd for pytest (the suite's tests use paths relative to it)
    tests: str              # folder of the test files, relative to root
    files: tuple[str, ...]  # in the order they run
    model: str = ""         # DeepSpeed-Chat suites: which stand-in the matrix runs on (opt | llama)


def suites() -> dict[str, Suite]:
    dschat_tests = paths.dschat_dir() / "tests"   # test_training.py changes folder to ../training/step3_...
    return {
        "trlx": Suite("trlx", paths.trlx_dir(), "tests",
                      ("test_configs.py", "test_utils.py", "test_pipelines.py", "test_minibatch.py",
                       "test_models.py", "test_peft.py", "test_trainers.py")),
        "dschat": Suite("dschat", dschat_tests, ".", ("test_training.py",), model="opt"),
        "dschat-llama": Suite("dschat-llama", dschat_tests, ".", ("test_training.py",), model="llama"),
    }


@dataclass
class FileResult:
    suite: str
    file: str
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    skips: list = field(default_factory=list)      # [nodeid, reason]
    failures: list = field(default_factory=list)   # [nodeid, first line of the message]


def deps_dir() -> Path:
    return Path(os.environ.get("RLHF_OVERLAY_UPSTREAM_TEST_DEPS") or Path(sys.prefix) / DEPS_DIR_NAME)


def suite_env(hf_home: Path) -> dict:
    from rlhf_overlay.runtime.runs import runtime_env

    env = runtime_env(cpu=True)
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1", WANDB_MODE="disabled")
    env.pop("HF_HUB_CACHE", None)
    env.pop("TRANSFORMERS_CACHE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), str(deps_dir())] +
                                        [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                         if p and p != str(PROJECT_ROOT)])
    return env


# ---------------------------------------------------------------------------------------------- DeepSpeed-Chat
DSCHAT_RANKS = "2"
DSCHAT_CRITIC_VERSION = 2   # bump when the critic recipe below changes (cached critics are keyed by it)
OPT_HUB_ID = "facebook/opt-125m"   # the actor test_training.py names


def _standin_snapshot(hf_home: Path, hub_id: str) -> Path:
    repo = hf_home / "hub" / ("models--" + hub_id.replace("/", "--"))
    return repo / "snapshots" / (repo / "refs" / "main").read_text().strip()


def dschat_critic(model: Path, label: str) -> Path:
    """CRITIC_CKPT_DIR for test_training.py: a step-2 reward model of `model` (same tokenizer), trained once with
    rm-llama2's module (tiny recipe, 20 steps on the tiny preference data) and cached by the model's files."""
    from rlhf_overlay.dschat_jobs.launch import tiny_paths
    from rlhf_overlay.paths import cache_dir
    from rlhf_overlay.runtime.runs import runtime_env

    digest = hashlib.sha256(str(DSCHAT_CRITIC_VERSION).encode())
    for f in sorted(p for p in model.iterdir() if p.is_file()):
        digest.update(f.name.encode() + f.read_bytes())
    dest = cache_dir() / "upstream-tests" / "dschat-critics" / f"{label}-{digest.hexdigest()[:16]}"
    if (dest / "model" / "pytorch_model.bin").is_file():
        return dest / "model"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "rlhf_overlay.dschat_jobs.reward_model", "--model", str(model), "--allow-arch",
           "--recipe", "tiny", "--data", str(tiny_paths()["preference"]), "--max-steps", "20", "--output", str(tmp)]
    print(f"[upstream-tests] training the step-2 critic test_training.py needs (CRITIC_CKPT_DIR) for {label}",
          flush=True)
    env = {k: v for k, v in runtime_env(cpu=True).items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    res = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0 or not (tmp / "model" / "pytorch_model.bin").is_file():
        tail = (res.stdout + res.stderr).strip().splitlines()[-15:]
        shutil.rmtree(tmp, ignore_errors=True)
        raise UpstreamTestsError(f"training the {label} critic failed (exit {res.returncode}): " + "\n".join(tail))
    try:
        os.replace(tmp, dest)
    except OSError:   # another run cached it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / "model"


def dschat_env(suite: Suite, env: dict, hf_home: Path, out: Path) -> dict:
    """The environment test_training.py runs in: CRITIC_CKPT_DIR, DeepSpeed-Chat importable, and the
    `deepspeed` shim first on PATH."""
    from rlhf_overlay.dschat_jobs.launch import tiny_paths

    tiny = tiny_paths()
    actor = _standin_snapshot(hf_home, OPT_HUB_ID) if suite.model == "opt" else tiny["model"]
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), str(paths.dschat_dir())])   # no test-only deps here
    bin_dir = out / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "deepspeed"
    shim.write_text("#!/bin/sh\n# rlhf-overlay: `deepspeed` for DeepSpeed-Chat's tests/test_training.py "
                    "(rlhf_overlay.engine.upstream_tests.deepspeed_shim)\n"
                    f'exec "{sys.executable}" -m rlhf_overlay.engine.upstream_tests --as-deepspeed "$@"\n')
    shim.chmod(0o755)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
               CRITIC_CKPT_DIR=str(dschat_critic(Path(actor), "opt-125m-standin" if suite.model == "opt"
                                                 else "tiny-llama")),
               RLHF_DSCHAT_MODEL=suite.model, RLHF_DSCHAT_ACTOR=str(actor), RLHF_DSCHAT_DATA=str(tiny["prompts"]),
               RLHF_UPSTREAM_TESTS_ARTIFACTS=str(out / "artifacts" / suite.name))
    return env


def dschat_shadow(suite: Suite, out: Path) -> Path:
    """test_training.py changes into ../training/step3_rlhf_finetuning and writes each cell's output folder there.
    So that nothing is written into the upstream work tree (`make upstream` must find it pin + overlays), the suite
    runs from a folder under `out` laid out like DeepSpeed-Chat's tests/ and training/step3_rlhf_finetuning/ whose
    files are symlinks to upstream's (the test file, main.py, training_scripts/): the same code, another cwd.
    Returns the folder to run pytest in."""
    shadow = out / "dschat-tree" / suite.name
    step3, upstream_step3 = (root / "training" / "step3_rlhf_finetuning" for root in (shadow, suite.root.parent))
    links = {**{shadow / "tests" / f: suite.root / suite.tests / f for f in suite.files},
             **{step3 / n: upstream_step3 / n for n in ("main.py", "training_scripts")}}
    for link, target in links.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(target.resolve())
    return shadow / "tests"


def has_health_guard() -> bool:
    """Our step-3 health guard (DSE patch 0024: --on_unhealthy, default stop) is in the DeepSpeed-Chat tree."""
    return (paths.dschat_dir() / "dschat" / "utils" / "health_guard.py").is_file()


def shim_command(argv: list[str], env: dict, port: int,
                 health_guard: bool | None = None) -> tuple[list[str], list[str]]:
    """`deepspeed [launcher args] main.py [args]` as run_single.sh calls it -> (DeepSpeed's launcher command with
    DSCHAT_RANKS CPU ranks, one note per argument changed, with the reason)."""
    if "main.py" not in argv:
        raise UpstreamTestsError("deepspeed shim: no main.py in the command; it only runs DeepSpeed-Chat's step "
                                 "scripts (for DeepSpeed-Chat's tests/test_training.py)")
    i = argv.index("main.py")
    launcher, args, notes = [], list(argv[i + 1:]), []
    it = iter(argv[:i])
    for a in it:
        flag = a.split("=", 1)[0]
        if flag in ("--master_port", "--num_gpus"):
            value = a.split("=", 1)[1] if "=" in a else next(it, "")
            notes.append(f"{flag} {value} dropped (a free port / {DSCHAT_RANKS} CPU ranks instead)")
        else:
            launcher.append(a)
    launcher += ["--num_gpus", DSCHAT_RANKS, "--master_port", str(port)]
    notes.append(f"{DSCHAT_RANKS} CPU ranks (DeepSpeed's CPU accelerator, gloo), rendezvous port {port}")

    def replace(flag: str, old: str, new: str, why: str) -> None:
        k = args.index(flag) + 1 if flag in args else len(args)
        if k < len(args) and args[k] == old:
            notes.append(f"{flag} {old} -> {new} ({why})")
            args[k] = new

    replace("--data_path", "Dahoas/rm-static", env["RLHF_DSCHAT_DATA"],
            "the hub dataset, offline: the tiny synthetic prompts in the same `Human: ... Assistant:` format")
    if "--data_output_path" not in args and "--output_dir" in args:
        cache = os.path.join(args[args.index("--output_dir") + 1], "data_cache")
        args += ["--data_output_path", cache]
        notes.append(f"--data_output_path {cache} added (the default /tmp/data_files/ is shared by every run here)")
    if env.get("RLHF_DSCHAT_MODEL") == "llama":
        replace("--actor_model_name_or_path", OPT_HUB_ID, env["RLHF_DSCHAT_ACTOR"], "the tiny LLaMA row")
        replace("--actor_lora_module_name", "decoder.layers.", "layers.",
                "LLaMA's blocks are model.layers.N: decoder.layers. would match no module")
        replace("--num_padding_at_beginning", "1", "0", "LLaMA has no padding token at the beginning; OPT has one")
    if (has_health_guard() if health_guard is None else health_guard) and "--on_unhealthy" not in args:
        args += ["--on_unhealthy", "warn"]
        notes.append("--on_unhealthy warn added (our step-3 health guard, DSE patch 0024, stops a run with degenerate "
                     "answers by default; upstream's main.py has no such stop, and the random OPT stand-in answers "
                     "degenerately by construction: warnings are printed, the run goes on as upstream's would)")
    return [sys.executable, "-m", "deepspeed.launcher.runner", *launcher, "main.py", *args], notes


def deepspeed_shim(argv: list[str]) -> int:
    """The `deepspeed` the DeepSpeed-Chat suites find on PATH: prints its notes (into the cell's log), then
    becomes DeepSpeed's launcher."""
    from rlhf_overlay.dschat_jobs.launch import free_port
    try:
        cmd, notes = shim_command(argv, dict(os.environ), free_port())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"[rlhf-overlay deepspeed shim] {note}", flush=True)
    print("[rlhf-overlay deepspeed shim] $ " + " ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)
    return 0   # not reached


def _nodeid(case: ET.Element) -> str:
    # junit classname is dotted ("tests.test_models.TestX"); rebuild pytest's node id "tests/test_models.py::TestX::t"
    if not case.get("classname"):   # a collection error: name is the dotted module
        return case.get("name", "").replace(".", "/") + ".py"
    parts = case.get("classname", "").split(".")
    mod_end = next((i for i, p in enumerate(parts) if p.startswith("test_")), len(parts) - 1)
    module = "/".join(parts[:mod_end + 1]) + ".py"
    return "::".join([module, *parts[mod_end + 1:], case.get("name", "")])


def parse_junit(path: Path, result: FileResult) -> None:
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        nodeid = _nodeid(case)
        failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        if failure is not None:
            result.failed += 1
            result.failures.append([nodeid, (failure.get("message") or "").strip().splitlines()[0][:300]
                                    if failure.get("message") else ""])
        elif error is not None:
            result.errors += 1
            # a collection error's message is just "collection failure"; its last `E ` line says what failed
            e_lines = [ln[1:].strip() for ln in (error.text or "").splitlines() if ln.startswith("E ")]
            what = e_lines[-1] if e_lines else error.get("message") or ""
            result.failures.append([nodeid, "ERROR: " + what[:300]])
        elif skipped is not None:
            result.skipped += 1
            result.skips.append([nodeid, (skipped.get("message") or "").strip()])
        else:
            result.passed += 1


def run_file(suite: Suite, name: str, out: Path, env: dict, extra: list[str]) -> FileResult:
    result = FileResult(suite.name, name)
    junit = out / "junit" / f"{suite.name}-{Path(name).stem}.xml"
    log = out / "logs" / f"{suite.name}-{Path(name).stem}.log"
    # -c /dev/null --rootdir .: the suite's own (absent) pytest settings, not ours from a parent folder
    cmd = [sys.executable, "-m", "pytest", "-c", os.devnull, "--rootdir", ".", f"{suite.tests}/{name}",
           "-p", "rlhf_overlay.engine.upstream_tests_plugin",
           "--upstream-suite", suite.name, "-p", "no:cacheprovider", "-rs", "-q", "--junitxml", str(junit), *extra]
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=suite.root, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    result.seconds = round(time.monotonic() - t0, 1)
    if junit.is_file():
        parse_junit(junit, result)
    # 5: nothing collected; 2 with errors in the junit: collection errors (counted above); else pytest itself failed
    if not junit.is_file() or (rc not in (0, 1, 5) and not (result.errors or result.failed)):
        result.errors += 1
        result.failures.append([f"{suite.tests}/{name}", f"pytest exited {rc} (see {log})"])
    return result


def format_table(results: list[FileResult], title: str) -> str:
    lines = [f"### {title}", "", "| suite | file | passed | failed | errors | skipped | s |", "|---|---|---|---|---|---|---|"]
    tot = FileResult("", "total")
    for r in results:
        lines.append(f"| {r.suite} | {r.file} | {r.passed} | {r.failed} | {r.errors} | {r.skipped} | {r.seconds} |")
        for k in ("passed", "failed", "errors", "skipped", "seconds"):
            setattr(tot, k, round(getattr(tot, k) + getattr(r, k), 1))
    lines.append(f"| | **total** | {tot.passed} | {tot.failed} | {tot.errors} | {tot.skipped} | {tot.seconds} |")
    skips = [s for r in results for s in r.skips]
    fails = [s for r in results for s in r.failures]
    if skips:
        lines += ["", "Skipped (reason):"] + [f"- `{n}`: {m}" for n, m in skips]
    if fails:
        lines += ["", "Failed / errors:"] + [f"- `{n}`: {m}" for n, m in fails]
    return "\n".join(lines) + "\n"


def _tree_status(root: Path) -> set[str]:
    res = subprocess.run(["git", "status", "--porcelain=v1", "--untracked-files=all"], cwd=root,
                         capture_output=True, text=True)
    return set(res.stdout.splitlines()) if res.returncode == 0 else set()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def known_suites(names: list[str]) -> dict[str, Suite]:
    """suites(), after checking every one of `names` is among them."""
    all_suites = suites()
    for name in names:
        if name not in all_suites:
            raise UpstreamTestsError(f"--suite {name}: unknown suite; known: {', '.join(all_suites)}")
    return all_suites


def run(suite_names: list[str], out: Path, files: list[str] | None = None, extra: list[str] | None = None,
        hf_home: Path | None = None, tree: Path | None = None) -> list[FileResult]:
    from dataclasses import replace

    from rlhf_overlay.engine.hub_standins import ensure_standins, suite_texts

    all_suites = known_suites(suite_names)
    if tree is not None and len(suite_names) != 1:
        raise UpstreamTestsError("--tree: give exactly one --suite, the one that tree is a checkout of")
    chosen = []
    for name in suite_names:
        suite = all_suites[name] if tree is None else replace(all_suites[name], root=Path(tree).resolve())
        if not (suite.root / suite.tests).is_dir():
            raise UpstreamTestsError(f"upstream {name} is not set up ({suite.root / suite.tests} is missing); "
                                     f"run `make setup` (UPSTREAM_MIRROR=<dir> if GitHub is out of reach)"
                                     + (" or pass a --tree that is a checkout of it" if tree else ""))
        for f in files or []:
            if f not in suite.files:
                raise UpstreamTestsError(f"--files {f}: not a test file of {name}; its files: {', '.join(suite.files)}")
        chosen.append(suite)
    if not deps_dir().is_dir():
        raise UpstreamTestsError(f"the upstream suites' test dependencies are not installed ({deps_dir()} is "
                                 f"missing); run `make setup`, which installs {REQUIREMENTS.name} there")
    # the tokenizers learn the sentences of every suite present (not only the chosen ones), so running one
    # suite does not rebuild the stand-ins another one uses
    files_seen = {s.root / s.tests / f for s in [*all_suites.values(), *chosen] for f in s.files}
    texts = suite_texts(sorted(p for p in files_seen if p.is_file()))
    hf_home = ensure_standins(hf_home, texts)
    base_env = suite_env(hf_home)
    (out / "junit").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    results = []
    for suite in chosen:
        env = dschat_env(suite, base_env, hf_home, out) if suite.model else base_env
        where = replace(suite, root=dschat_shadow(suite, out), tests=".") if suite.model else suite
        before = _tree_status(suite.root)
        for name in (f for f in suite.files if not files or f in files):
            r = run_file(where, name, out, env, list(extra or []))
            print(f"{suite.name}/{suite.tests}/{name}: {r.passed} passed, {r.failed} failed, {r.errors} errors, "
                  f"{r.skipped} skipped ({r.seconds} s)", flush=True)
            results.append(r)
        left = sorted(_tree_status(suite.root) - before)
        if left:
            print(f"warning: the {suite.name} suite left files in {suite.root}: {', '.join(left)}", file=sys.stderr)
    return results


@main_guard   # UserError and bad flags -> `error: ...`, exit 2
def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m rlhf_overlay.engine.upstream_tests", description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--suite", action="append", help="suite to run (default: all; known: trlx, dschat, dschat-llama)")
    ap.add_argument("--files", nargs="+", help="only these test files (names as in the suite's tests/)")
    ap.add_argument("--out", default=os.environ.get("OUTPUT") or None,
                    help="output folder (default: $OUTPUT or runs/upstream-tests-<time>)")
    ap.add_argument("--overwrite", action="store_true", default=os.environ.get("OVERWRITE") == "1",
                    help="allow a non-empty --out (default: $OVERWRITE=1)")
    ap.add_argument("--title", default="upstream test suites", help="heading of the table")
    ap.add_argument("--tree", help="run the tests of this checkout instead of upstream/<suite> (with one --suite; "
                                   "e.g. a copy without our newest patches, to compare before/after). Its package "
                                   "is imported from there: pytest runs in it")
    ap.add_argument("pytest_args", nargs="*", help="after --: passed to every pytest run")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--as-deepspeed"]:   # the `deepspeed` on PATH of the DeepSpeed-Chat suites
        return deepspeed_shim(argv[1:])
    args = ap.parse_args(argv)
    from rlhf_overlay.runtime.runs import prepare_run_dir

    known_suites(args.suite or [])   # before the output folder is made
    out = prepare_run_dir("upstream-tests", output=args.out, overwrite=args.overwrite)
    results = run(args.suite or list(suites()), out, args.files, args.pytest_args, tree=args.tree)
    table = format_table(results, args.title)
    _atomic_write(out / "table.md", table)
    _atomic_write(out / "results.json", json.dumps([asdict(r) for r in results], indent=1) + "\n")
    print("\n" + table + f"\n(junit files, logs, table.md, results.json: {out})")
    return 1 if any(r.failed or r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
