"""Type stubs of the compiled extension pipegear._C (the C++ engine)."""
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

Tensors = Union[torch.Tensor, tuple[torch.Tensor, ...]]
# What a `count` callable returns for one micro-batch's target: the number
# of terms its mean averages over (the engine weighs micro-batch j by
# count_j / sum(count)).
Count = Union[int, float, torch.Tensor]

__version__: str

def is_checkpointing() -> bool: ...
def is_recomputing() -> bool: ...
def render_schedule(schedule: str, stages: int, micro_batches: int,
                    virtual_stages: int = ...) -> str: ...
def schedule_cells(schedule: str, stages: int, micro_batches: int,
                   virtual_stages: int = ...) -> list[list[tuple[int, str, int]]]: ...
def peak_activations(schedule: str, stages: int, micro_batches: int,
                     virtual_stages: int = ...) -> list[int]: ...
def balance_by_cost(partitions: int, costs: Sequence[float],
                    memory: Optional[Sequence[float]] = None,
                    capacity: Optional[float] = None) -> list[int]: ...

class TraceEvent:
    stage: int
    micro_batch: int
    phase: str
    recompute: bool
    start_ns: int
    end_ns: int
    chunk: int
    duration_ns: int
    def __init__(self, stage: int, micro_batch: int, phase: str,
                 recompute: bool, start_ns: int, end_ns: int,
                 chunk: int = 0) -> None: ...
    def __iter__(self) -> Iterator[Any]: ...

class Trace:
    stages: int
    micro_batches: int
    events: list[TraceEvent]
    makespan: float
    bubble_fraction: float
    theoretical_bubble_fraction: float
    def __init__(self, stages: int = ..., micro_batches: int = ...,
                 events: Sequence[Any] = ...) -> None: ...
    def empty(self) -> bool: ...
    def __len__(self) -> int: ...
    def to_chrome_trace(self) -> str: ...
    def save_chrome_trace(self, path: str) -> None: ...

class DeferredBatchNormStats:
    sum: Optional[torch.Tensor]
    sum_squares: Optional[torch.Tensor]
    count: int
    micro_batches: int
    def __init__(self) -> None: ...
    def empty(self) -> bool: ...
    def reset(self) -> None: ...

def deferred_batch_norm_forward(
    input: torch.Tensor, weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], running_mean: torch.Tensor,
    running_var: torch.Tensor, stats: DeferredBatchNormStats, training: bool,
    eps: float) -> torch.Tensor: ...
def deferred_batch_norm_commit(
    stats: DeferredBatchNormStats, running_mean: torch.Tensor,
    running_var: torch.Tensor, num_batches_tracked: torch.Tensor,
    momentum: Optional[float]) -> bool: ...

class _Pipeline:
    num_stages: int
    last_trace: Trace
    def __init__(self, stages: Sequence[tuple[Any, str, Any]], chunks: int,
                 checkpoint: str, schedule: str, worker_threads: int,
                 virtual_stages: int = ...) -> None: ...
    def forward(self, input: Tensors, training: bool = True) -> Tensors: ...
    def step(self, input: Tensors, target: Optional[Tensors],
             loss_fn: Callable[..., torch.Tensor],
             reduction: str = "mean",
             count: Optional[Callable[[Tensors], Count]] = None,
             training: bool = True) -> torch.Tensor: ...
    def schedule_table(self, micro_batches: int) -> str: ...

class _DistributedPipeline:
    rank: int
    world_size: int
    replica: int
    replicas: int
    broken: bool
    last_events: list[tuple[int, str, bool, int, int, int]]
    def __init__(self, group: Any, modules: Sequence[Any], device: str,
                 hooks: Sequence[Any], chunks: int, checkpoint: str,
                 schedule: str, timeout: float, idle_timeout: float,
                 balance: Sequence[int],
                 skip_pop: Sequence[int] = (), skip_stash: Sequence[int] = (),
                 skip_routes: Sequence[int] = (),
                 dp_group: Any = None,
                 dp_parameters: Sequence[torch.Tensor] = (),
                 dp_buffers: Sequence[torch.Tensor] = (),
                 bucket_bytes: int = 25 << 20,
                 skip_names: Sequence[str] = (),
                 virtual_stages: int = 1) -> None: ...
    def forward(self, input: Optional[Tensors],
                training: bool = True) -> Tensors: ...
    def step(self, input: Optional[Tensors], target: Optional[Tensors],
             loss_fn: Optional[Any], reduction: str = "mean",
             count: Optional[Callable[[Tensors], Count]] = None,
             training: bool = True,
             error: Optional[str] = None,
             error_type: str = "ValueError") -> torch.Tensor: ...
    def backward(self) -> None: ...
    def set_after_backward(self, hook: Optional[Callable[[], None]]) -> None: ...
    def set_before_last_backward(self, hook: Optional[Callable[[], None]]) -> None: ...
