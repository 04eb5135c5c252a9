"""Multi-process runs: one process per host (or per GPU node), SPMD over one global mesh.

`initialize` starts JAX's distributed runtime before anything touches a device:
- with `coordinator_address` (option or `DPO_JAX_COORDINATOR_ADDRESS`), `num_processes` and `process_id`
  (options or `DPO_JAX_NUM_PROCESSES` / `DPO_JAX_PROCESS_ID`): explicitly, e.g. GPU nodes without SLURM, or
  several processes on one machine;
- on a SLURM job with several tasks or Open MPI with several ranks (one process per GPU: JAX gives each
  process the GPU of its local rank), or where `TPU_WORKER_HOSTNAMES` lists several TPU hosts (GKE): JAX
  detects the cluster itself;
- `distributed=true` calls JAX's detection unconditionally: on Cloud TPU VMs, whose workers JAX finds from
  the VM's metadata (scripts/launch.py passes it); `false` never initializes.
CPU collectives use gloo, so the same code runs as several processes on one machine (the tests do).
"""

from __future__ import annotations

import logging
import os

from .errors import UserError

log = logging.getLogger(__name__)

ENV = {"coordinator_address": "DPO_JAX_COORDINATOR_ADDRESS", "num_processes": "DPO_JAX_NUM_PROCESSES",
       "process_id": "DPO_JAX_PROCESS_ID"}


def cluster_detected() -> str | None:
    """The kind of multi-process launch this environment shows, if any."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
        return "SLURM"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "Open MPI"
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "Cloud TPU"
    return None


def _env_int(name: str) -> int | None:
    text = os.environ.get(ENV[name])
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{ENV[name]}={text!r} is not an integer") from None


def initialize(distributed: str = "auto", coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Start the distributed runtime when this is a multi-process run; True when it was started."""
    import jax

    coordinator_address = coordinator_address or os.environ.get(ENV["coordinator_address"])
    if num_processes is None:
        num_processes = _env_int("num_processes")
    if process_id is None:
        process_id = _env_int("process_id")
    if distributed == "false" or (distributed == "auto" and not coordinator_address and not cluster_detected()):
        return False
    if coordinator_address and (num_processes is None or process_id is None):
        raise UserError("coordinator_address needs num_processes and process_id too (or their environment "
                        "variables DPO_JAX_NUM_PROCESSES, DPO_JAX_PROCESS_ID)")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise UserError(f"process_id must be in [0, {num_processes}), not {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; accelerators use their own
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except Exception as e:  # unreachable coordinator, a timeout, a cluster that is not one
        raise UserError(f"could not start the distributed runtime ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        f"check coordinator_address / num_processes / process_id, or run with --distributed false") from e
    log.info("process %d of %d, %d local devices of %d", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True
