"""Which process of a launch this is: rank and world size under ``torchrun`` / ``accelerate
launch`` (capture and eval split the samples by them), and a refusal of launches that asked for
several processes but started one.
"""

from __future__ import annotations

import os

import torch

SEVERAL_PROCESSES = ("torchrun --nproc_per_node N $(which fastv-analyze) ... or accelerate launch --multi_gpu "
                     "--num_processes N $(which fastv-analyze) ... (--device cpu: CPU processes, gloo)")


def process_group(device: str = "auto"):
    """(rank, world_size, state) under accelerate/torchrun, else (0, 1, None).

    ``PartialState()`` without ``cpu=True`` only sets up a process group when it finds an
    accelerator: under torchrun on a CPU-only machine (or with ``--device cpu``) it would
    report rank 0 of 1 in every process, and they would all capture every sample into the
    same part names. So ask for the CPU (gloo) group explicitly there, and check that the
    group has the size the launcher announced.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from accelerate import PartialState

        cpu = (device == "cpu" or (device == "auto" and not torch.cuda.is_available())
               or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
        state = PartialState(cpu=cpu)
        if state.num_processes != world:
            raise RuntimeError(f"WORLD_SIZE={world} but the process group has {state.num_processes} process(es) "
                               f"({state.distributed_type}); start with torchrun/accelerate launch and a matching "
                               "--device")
        return state.process_index, state.num_processes, state
    refuse_single_process_launch()
    return 0, 1, None


def refuse_single_process_launch() -> None:
    """Stop a launch that asked for several processes but started this one alone.

    ``accelerate launch --cpu --num_processes N`` (and ``--num_processes N`` without
    ``--multi_gpu`` on a machine without GPUs) runs N processes only through mpirun; without it
    accelerate starts one process with MASTER_ADDR set and no WORLD_SIZE (accelerate 1.15), which
    would silently do the work of N. Under mpirun no process sets WORLD_SIZE either.
    """
    env = os.environ
    if "WORLD_SIZE" in env:
        return
    mpi = max(int(env.get(k, "1")) for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"))
    accelerate_alone = "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env
    if mpi > 1 or accelerate_alone:
        how = "mpirun" if mpi > 1 else "accelerate launch without --multi_gpu"
        raise ValueError(f"{how} started this process alone (no WORLD_SIZE): several processes need "
                         f"{SEVERAL_PROCESSES}")
