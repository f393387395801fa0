"""Orderly end of a distributed worker: every rank waits for the others, then tears its process group down, before
the interpreter exits.

Why: a worker that returns with its torch.distributed process group still alive leaves the group's C++ state (gloo's
per-peer I/O threads, the TCPStore client and, on rank 0, the store's server thread) to be destroyed during
interpreter shutdown, in whatever order the finalizers run and while the peer ranks may still be talking to it. A
std::thread destroyed while joinable calls std::terminate: "terminate called without an active exception", SIGABRT,
and the launcher reports the rank as failed although training and saving had finished (seen once in a full test run:
a 2-rank rm-bloom through a `localhost slots=2` hostfile, exit 250). destroy_process_group() joins those threads while
the interpreter is intact; the barrier before it makes sure no peer is still inside a collective when a rank leaves.
"""
from __future__ import annotations


def end_process_group(rc: int) -> int:
    """Call on the way out of a worker with its exit code; returns it. A failed rank (rc != 0) does not wait at the
    barrier (its peers may never arrive); it only tears its own group down."""
    try:
        import torch.distributed as dist
    except ImportError:
        return rc
    if not (dist.is_available() and dist.is_initialized()):
        return rc
    try:
        if rc == 0:
            dist.barrier()
    finally:
        dist.destroy_process_group()
    return rc
