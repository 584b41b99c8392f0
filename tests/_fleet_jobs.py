"""A job function for the fleet engine tests, in a module light enough that a spawned worker
imports it in milliseconds (a test module would import torch first)."""

from __future__ import annotations

import os


def die_on_request(job) -> str:
    """Return ``"<machine> done"``, or kill this worker process when the machine is "dies"."""
    if job.machine == "dies":
        os._exit(3)  # a worker killed mid-job: out of memory, a crash in native code
    return f"{job.machine} done"


def dask_settings(keys) -> dict:
    """This Dask worker's values of the configuration ``keys``."""
    import dask

    return {key: dask.config.get(key) for key in keys}


def threads_after_late_imports(job) -> dict[str, int]:
    """Pin this worker to one thread, then load libraries that bring their own OpenMP and
    BLAS (scikit-learn's k-means, SciPy's linear algebra) and use them; the thread count
    of every thread pool in the process, by library file."""
    import os

    import numpy as np

    from stethoscope import fleet

    fleet.pin_threads(1)
    import scipy.linalg
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_info

    points = np.random.default_rng(0).standard_normal((200, 4))
    KMeans(2, n_init=1, random_state=0).fit(points)
    scipy.linalg.cholesky(points.T @ points)
    return {os.path.basename(pool["filepath"]): pool["num_threads"]
            for pool in threadpool_info()}
