"""Action-chunk policies whose action generator is a conditional Local Flow Matching model.

Diffusion-policy style: the policy looks at the last ``T_o`` observations, generates a chunk of
``T_p`` future actions (one flat vector ``x`` of ``T_p * action_dim`` numbers, conditioned on the
flattened, normalised observation history, plus a one-hot task id for a multi-task policy),
executes the first ``T_a`` and plans again. With ``blocks.L: 0`` the same code is a flow-matching
policy.

- :mod:`.data`: demonstrations and the (observation history, action chunk) training windows;
- :mod:`.model`: :class:`PolicyConfig`, :class:`Normalizer`, :class:`Policy` (save/load, ``act``);
- :mod:`.train`: :func:`train_policy` (``localfm.fit`` with ``context=``);
- :mod:`.metaworld`: Meta-World tasks, scripted-expert demonstrations, batched evaluation
  (needs the ``robot`` extra: ``pip install localfm[robot]``);
- :mod:`.cli`: ``localfm policy collect|train|eval``.
"""

from .data import Demonstrations, make_windows
from .model import Normalizer, Policy, PolicyConfig, load_policy
from .train import distill_policy, train_policy

__all__ = [
    "Demonstrations",
    "make_windows",
    "Normalizer",
    "Policy",
    "PolicyConfig",
    "load_policy",
    "train_policy",
    "distill_policy",
]
