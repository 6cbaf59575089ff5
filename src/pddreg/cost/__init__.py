"""Cost volumes: correlation layer, regularisation (min-convolution, mean-field), soft fields.

Layout ``(B, |L|, *G)`` (displacement-major); the displacement set is
``displacement_set(radius, spacing, ndim)`` (C order, axis 0 slowest); control point ``k`` of a
grid ``G`` inside a map ``S`` sits at ``(k + 0.5) * S / G - 0.5`` per axis.
"""

from __future__ import annotations

from .correlation import correlation, displacement_set, expected_values
from .field import (
    expected_displacement,
    probabilities,
    probabilities_and_field,
    soft_field,
)
from .masks import mask_cost, valid_weights
from .regularise import (
    DEFAULT_ALPHA,
    EXACT_WEIGHT,
    meanfield,
    minconv,
    minconv_exact,
    regularise,
)
from .spread import prob_variance, soft_variance

__all__ = [
    "DEFAULT_ALPHA",
    "EXACT_WEIGHT",
    "correlation",
    "displacement_set",
    "expected_displacement",
    "expected_values",
    "mask_cost",
    "meanfield",
    "minconv",
    "minconv_exact",
    "prob_variance",
    "probabilities",
    "probabilities_and_field",
    "regularise",
    "soft_field",
    "soft_variance",
    "valid_weights",
]
