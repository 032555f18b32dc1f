"""pipegear: GPipe pipeline parallelism on a native LibTorch engine.

>>> import torch, pipegear
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(),
...                             torch.nn.Linear(8, 2))
>>> pipe = pipegear.GPipe(model, balance=[2, 1], chunks=4)
>>> y = pipe(torch.randn(16, 8))
"""
import os as _os

import torch  # noqa: F401  (loads libtorch before the extension)

from pipegear import _C
from pipegear.balance import (balance_by_cost, balance_by_size,
                              balance_by_time, profile_layers)
from pipegear.batchnorm import DeferredBatchNorm, convert_deferred_batch_norm
from pipegear.gpipe import GPipe, Trace

__version__: str = _C.__version__

#: For LibTorch programs, as ``torch.utils.cmake_prefix_path``: the folder to
#: put in CMake's ``CMAKE_PREFIX_PATH`` so that ``find_package(pipegear)``
#: finds the C++ package installed with this one (headers, libpipegear and
#: ``share/cmake/pipegear``; in a wheel, and in the source tree after
#: ``make build``).
cmake_prefix_path: str = _os.path.join(
    _os.path.dirname(_os.path.abspath(__file__)), "share", "cmake")


def is_checkpointing() -> bool:
    """True inside a checkpointed forward (the pass that keeps no graph)."""
    return _C.is_checkpointing()


def is_recomputing() -> bool:
    """True while a checkpointed forward is recomputed before its backward.

    Layers with side effects (statistics, counters) act only when this is
    False, so that a recomputation does not count twice.
    """
    return _C.is_recomputing()


def render_schedule(schedule: str, stages: int, micro_batches: int,
                    virtual_stages: int = 1) -> str:
    """The clock table of a schedule (``'gpipe'``, ``'1f1b'``, ``'zb-h1'``,
    ``'zb-h2'``, ``'interleaved'`` or ``'interleaved-zb'`` with
    ``virtual_stages``) for K stages (workers, when interleaved) and M
    chunks."""
    return _C.render_schedule(schedule, stages, micro_batches, virtual_stages)


def peak_activations(schedule: str, stages: int, micro_batches: int,
                     virtual_stages: int = 1) -> list[int]:
    """Micro-batches each stage (worker, when interleaved) keeps alive at
    its peak under a schedule: forwards run whose backward (W, when split)
    has not; an interleaved worker's count is in micro-batches of one of
    its stages (divide by ``virtual_stages`` for a whole stage's worth)."""
    return _C.peak_activations(schedule, stages, micro_batches,
                               virtual_stages)


__all__ = [
    "__version__", "cmake_prefix_path", "GPipe", "Trace", "DeferredBatchNorm",
    "convert_deferred_batch_norm", "balance_by_cost", "balance_by_size",
    "balance_by_time", "profile_layers", "is_checkpointing", "is_recomputing",
    "render_schedule",
    "peak_activations",
]

from pipegear import distributed  # noqa: E402
from pipegear.distributed import DistributedGPipe  # noqa: E402

__all__ += ["DistributedGPipe", "distributed"]
