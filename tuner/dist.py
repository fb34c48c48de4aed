"""Data parallelism across processes: `mpirun -n N pyllm finetune ...`.

mpi4py is imported only when the process was started by an MPI launcher with more than
one rank (the launchers' environment variables say so), so a plain run never needs it.
What the trainer needs is small: rank, size, a sum over ranks of a float64 vector, and a
barrier; rank 0 alone prints and writes files.
"""

import os

import numpy as np
from pyllm.base import PyllmError

# world-size variables set by the common launchers: MPICH/Hydra and Intel MPI (PMI),
# Open MPI, PMIx-based launchers, MVAPICH
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


class Single:
    """One process: every collective is the identity."""

    rank, size = 0, 1

    def allreduce_sum(self, x: np.ndarray) -> np.ndarray:
        return x

    def barrier(self):
        pass


class MPIComm:
    def __init__(self, comm):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    def allreduce_sum(self, x: np.ndarray) -> np.ndarray:
        """The elementwise sum over all ranks, in place (x: a contiguous numpy array)."""
        from mpi4py import MPI

        self.comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)
        return x

    def barrier(self):
        self.comm.Barrier()


def launched_size() -> int:
    for var in _SIZE_VARS:
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 1


def local_size() -> int:
    """Ranks on this machine (Hydra's MPI_LOCALNRANKS, Open MPI's local size), 1 if unknown."""
    for var in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCAL_NRANKS"):
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 1


def world():
    """The communicator this process belongs to: Single unless launched with 2+ MPI ranks."""
    size = launched_size()
    if size <= 1:
        return Single()
    try:
        from mpi4py import MPI
    except ImportError:
        raise PyllmError(f"started by an MPI launcher with {size} ranks, but mpi4py is not installed "
                         "(pip install mpi4py mpich)") from None
    return MPIComm(MPI.COMM_WORLD)
