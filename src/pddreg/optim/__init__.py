"""Instance optimisation and training-free discrete registration.

* :func:`instance_optimise` (Adam against a cost volume) and :func:`feature_optimise` (Adam on
  the SSD of warped features), see :mod:`pddreg.optim.instance`;
* :func:`discrete_register` with :class:`LevelConfig` / :class:`InstanceConfig`: the generic
  multi-level discrete search for any feature extractor, see :mod:`pddreg.optim.discrete`;
* :func:`register_mind` with :class:`MindConfig`: the MIND-SSC method (``--method mind``);
* :class:`Posterior`, :func:`uncertainty_map`, :func:`soft_label_transfer`: registration
  uncertainty and soft label transfer from the displacement probabilities
  (:mod:`pddreg.optim.uncertainty`).
"""

from __future__ import annotations

from .discrete import (
    InstanceConfig,
    LevelConfig,
    LevelOutput,
    discrete_register,
    level_step,
    pool_features,
)
from .instance import cost_objective, feature_objective, feature_optimise, instance_optimise
from .mindreg import (
    MindConfig,
    block_capture_level,
    capture_start,
    default_levels,
    keep_better,
    mind_features,
    refine_mind,
    register_mind,
    restore_layers,
)
from .uncertainty import Posterior, soft_label_transfer, uncertainty_map

__all__ = [
    "InstanceConfig",
    "LevelConfig",
    "LevelOutput",
    "MindConfig",
    "Posterior",
    "block_capture_level",
    "capture_start",
    "cost_objective",
    "default_levels",
    "discrete_register",
    "feature_objective",
    "feature_optimise",
    "instance_optimise",
    "keep_better",
    "level_step",
    "mind_features",
    "pool_features",
    "refine_mind",
    "register_mind",
    "restore_layers",
    "soft_label_transfer",
    "uncertainty_map",
]
