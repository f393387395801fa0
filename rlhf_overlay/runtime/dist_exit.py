"""Orderly end of a distributed worker: every rank waits for the others, then tears its process group down, before
the interpreter exits.

Why: a worker that returns with its torch.distributed process group still alive leaves the group's C++ state (gloo's
per-peer I/O threads, the TCPStore client and, on rank 0, the store's server thread) to be destroyed during
interpreter shutdown, in whatever order the finalizers run and while the peer ranks may still be talking to it. A
std::thread destroyed while joinable calls std::terminate: "terminate called without an active exception", SIGABRT,
and the launcher reports the rank as failed although training and saving had finished (seen once in a full test run:
a 2-rank rm-bloom through a `localhost slots=2` hostfile, exit 250). destroy_process_group() joins those threads while
the interpreter is intact; the barrier before it makes sure no peer is still inside a collective when a rank leaves.

That was not enough: destroy_process_group() only drops the registry's reference, and objects that still hold the
group (the DDP wrapper inside HF's Trainer or accelerate, DeepSpeed's engine and its own groups) keep the C++ group
alive until interpreter shutdown, where the abort can still happen. So a distributed worker, once its group is torn
down and its output flushed, leaves with os._exit(rc): the interpreter's finalizers (and the C++ destructors they
trigger) are skipped; everything the run writes (models, metrics, status.json, tensorboard, rank reports) is
written and closed explicitly before this point, never by a finalizer. A single process exits normally.
"""
from __future__ import annotations


def end_process_group(rc: int) -> int:
    """Call on the way out of a worker with its exit code. A failed rank (rc != 0) does not wait at the barrier (its
    peers may never arrive); it only tears its own group down. Returns rc only for a process without a process
    group; a distributed worker leaves here through os._exit(rc)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return rc
    if not (dist.is_available() and dist.is_initialized()):
        return rc
    import sys

    if rc == 0:
        try:
            dist.barrier()
        except Exception as e:  # a peer died or hung: this rank's own work is done, but the run is not
            print(f"error: the end-of-run barrier failed ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                  f"another rank did not finish — see its log", file=sys.stderr)
            rc = 1
    try:
        dist.destroy_process_group()
    except Exception:  # tearing down a broken group: nothing more to save
        pass
    _leave(rc)
    return rc


def _leave(rc: int) -> None:
    """Flush what Python buffers, then end the process without running the interpreter's finalizers."""
    import logging
    import os
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to save there
            pass
    os._exit(rc)
