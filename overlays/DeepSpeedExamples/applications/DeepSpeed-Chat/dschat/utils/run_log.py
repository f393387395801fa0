# rlhf-overlay: NEW file (not in upstream DeepSpeed-Chat). What the step-2 (reward model, DPO) and step-3 (PPO)
# main.py have in common in our patches 0008, 0009, 0012 and 0018, written once: the tensorboard writer of rank 0,
# step times, the results file, and the end-of-conversation token (the tokenizer's EOS instead of upstream's
# hard-coded "<|endoftext|>", which LLaMA2's tokenizer splits into text pieces).
"""Tensorboard scalars, step times, results file and end-of-conversation token for DeepSpeed-Chat steps 2 and 3.

    run_log.add_arguments(parser, "step2_tensorboard", "train/loss, eval/acc", "Appended to every answer")
    args = parser.parse_args(argv); run_log.resolve_tensorboard_path(args, "step2_tensorboard")
    writer = run_log.open_writer(args, purge_step)        # rank 0: a SummaryWriter; other ranks: None
    run_log.end_of_conversation_token(args, tokenizer, args.model_name_or_path)   # after loading the tokenizer
    times = run_log.StepTimes()
    for ...: times.start(); ...train...; times.stop(); run_log.log_scalars(writer, {...}, step)
    print_rank_0(times.summary("step time"), rank); run_log.write_results(path, {...}, rank)

Works without rlhf-overlay importable (upstream's scripts run by hand).
"""
import json
import os
import time

from dschat.utils.run_checks import SettingError


def add_arguments(parser, default_folder, scalars, eot_use):
    """Upstream's --enable_tensorboard, --tensorboard_path and --add_eot_token, and our --end_of_conversation_token.
    `scalars` names what is always written, `eot_use` says what the token is for (both for the help)."""
    parser.add_argument(
        '--enable_tensorboard',
        action='store_true',
        help=f"Also enable DeepSpeed's own tensorboard monitor (our scalars {scalars} are always written)")
    parser.add_argument(
        '--tensorboard_path',
        type=str,
        default=None,
        help=f"Folder for the tensorboard event files (default: <output_dir>/tensorboard, or {default_folder} "
        f"without --output_dir)")
    parser.add_argument(
        "--end_of_conversation_token",
        type=str,
        default=None,
        help=f"{eot_use}; default: the tokenizer's EOS token (</s> for LLaMA2). Upstream used <|endoftext|>.")
    parser.add_argument(
        "--add_eot_token",
        action='store_true',
        help="Add the end-of-conversation token as an additional special token to the tokenizer (only useful "
        "with a custom --end_of_conversation_token)")
    return parser


def resolve_tensorboard_path(args, default_folder):
    """Default: <output_dir>/tensorboard (upstream's `default_folder` in the current folder without --output_dir)."""
    if args.tensorboard_path is None:
        args.tensorboard_path = (os.path.join(args.output_dir, "tensorboard")
                                 if args.output_dir else default_folder)
    return args.tensorboard_path


def open_writer(args, purge_step=None):
    """Rank 0 writes the scalars (upstream opened a writer on every rank, and only with --enable_tensorboard);
    purge_step hides the points a killed run logged after the checkpoint it resumes from."""
    if args.global_rank > 0:
        return None
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(args.tensorboard_path, purge_step=purge_step)
    print(f"Tensorboard scalars: {args.tensorboard_path}", flush=True)
    return writer


def log_scalars(writer, scalars, step, flush=False):
    """{tag: value} at one global step (rank 0's writer; a no-op elsewhere)."""
    if writer is None:
        return
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, global_step=step)
    if flush:
        writer.flush()


def close_writer(writer):
    if writer is not None:
        writer.close()


def end_of_conversation_token(args, tokenizer, model_name):
    """--end_of_conversation_token, else the tokenizer's EOS; sets and returns args.end_of_conversation_token."""
    if args.end_of_conversation_token is None:
        if tokenizer.eos_token is None:
            raise SettingError(f"the tokenizer of {model_name} has no EOS token; pass --end_of_conversation_token")
        args.end_of_conversation_token = tokenizer.eos_token
    return args.end_of_conversation_token


class StepTimes:
    """Seconds per training step. The first step includes one-off warm-up (allocations, kernel selection), so the
    mean is over the steps after it (all of them when there is only one). `times`: those of a resumed run."""

    def __init__(self, times=()):
        self.times = list(times)
        self._start = None

    def start(self):
        self._start = time.time()

    def elapsed(self):
        return time.time() - self._start

    def stop(self):
        self.times.append(self.elapsed())
        return self.times[-1]

    def __bool__(self):
        return bool(self.times)

    @property
    def last(self):
        return self.times[-1]

    @property
    def first(self):
        return self.times[0] if self.times else None

    @property
    def steady(self):
        return self.times[1:] or self.times

    def mean(self):
        steady = self.steady
        return sum(steady) / len(steady) if steady else None

    def recent_mean(self, n):
        recent = self.times[-n:]
        return sum(recent) / len(recent)

    def summary(self, what="step time"):
        """`<what>: 0.1234 s/step over N steps (first step 0.567 s)`."""
        return (f"{what}: {self.mean():.4f} s/step over {len(self.steady)} steps "
                f"(first step {self.first:.3f} s)")


def write_results(path, results, rank=0):
    """The run's final figures as JSON (rank 0; written to a temporary file and renamed, never half there)."""
    if rank > 0:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, path)
