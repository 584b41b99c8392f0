"""A job function for the fleet engine tests, in a module light enough that a spawned worker
imports it in milliseconds (a test module would import torch first)."""

from __future__ import annotations

import os


def die_on_request(job) -> str:
    """Return ``"<machine> done"``, or kill this worker process when the machine is "dies"."""
    if job.machine == "dies":
        os._exit(3)  # a worker killed mid-job: out of memory, a crash in native code
    return f"{job.machine} done"


def dask_profiler_enabled() -> bool:
    """Whether this Dask worker runs Dask's sampling profiler."""
    import dask

    return bool(dask.config.get("distributed.worker.profile.enabled"))
