"""localfm: Local Flow Matching generative models (Xu, Cheng and Xie, arXiv 2410.02548).

A :class:`LocalFlow` is a chain of blocks over a standard Gaussian base. Each block is a
flow-matching ODE trained to carry the current distribution to its Ornstein-Uhlenbeck-smoothed
version over a short time step; a final free block carries the result to N(0, I).

Direction convention (one, used everywhere): **forward = data to noise**, each block's ODE
solved for t from 0 to 1 (``encode``, ``log_prob``, the pushforward in training);
**inverse = noise to data**, t from 1 to 0 (``decode``, ``sample``).

Ten-line use::

    import localfm
    flow = localfm.fit(x_train)                    # defaults for low-dimensional data
    nll = -flow.log_prob(x_test).mean()            # exact, nats per point, data units
    x = flow.sample(10_000, generator=torch.Generator().manual_seed(0))
    flow.save("runs/mine"); flow = localfm.load("runs/mine")
"""

__version__ = "0.1.0"

import os  # noqa: E402

# Before torch loads: OpenMP threads that spin while waiting made 2-thread training 4-5x slower on
# a 2-core machine shared with other work (measured 3 vs 14 steps/s); passive waiting costs nothing
# measurable on an idle machine. A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .checkpoint import CheckpointError, load, save  # noqa: E402
from .config import BlocksConfig, FlowConfig, TrainConfig, load_config  # noqa: E402
from .flow import Block, FlowOutput, LocalFlow, Standardizer  # noqa: E402
from .nets import MLP, NetConfig  # noqa: E402
from .ode import SolverConfig  # noqa: E402
from .training import Progress, TrainingDivergedError, fit  # noqa: E402

LocalFlow.save = lambda self, path: save(self, path)  # type: ignore[attr-defined]

__all__ = [
    "fit",
    "load",
    "save",
    "LocalFlow",
    "Block",
    "FlowOutput",
    "Standardizer",
    "FlowConfig",
    "BlocksConfig",
    "TrainConfig",
    "NetConfig",
    "SolverConfig",
    "MLP",
    "Progress",
    "TrainingDivergedError",
    "CheckpointError",
    "load_config",
    "__version__",
]
