"""pipegear: GPipe pipeline parallelism on a native LibTorch engine.

>>> import torch, pipegear
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(),
...                             torch.nn.Linear(8, 2))
>>> pipe = pipegear.GPipe(model, balance=[2, 1], chunks=4)
>>> y = pipe(torch.randn(16, 8))
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from pipegear import _C

__version__: str = _C.__version__

__all__ = ["__version__"]
