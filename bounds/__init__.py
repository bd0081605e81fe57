"""Sound bounds on networks for REaaS: IBP and CROWN bound propagation, sound spectral-norm / Lipschitz upper
bounds, the batched F2I binary search (feature radius -> certified image radius), and feature-space
certification of a downstream classifier (the larger of a CROWN/IBP search and the Lipschitz-margin radius). Depends only on torch / numpy / scipy.

F2I bounds (`BOUNDS_OFFERED`; each a sound upper bound of max_{||d|| <= r} ||f(x + d) - f(x)||, argued in
bounds.feature_distance): "lipschitz" (global, L·r, L = global_lipschitz_upper: min of the layer-norm product and
the midpoint expansion with every ReLU unstable), "ibp", "crown" (the paper's elementwise CROWN -> l2),
"crown_spectral" (CROWN's linear bounds -> l2 through spectral norms), "local_lipschitz" (interval Clarke
Jacobian and midpoint expansion over the ball), "best" (their minimum, CROWN intermediate bounds) and
"best_ibp" (their minimum, IBP intermediate bounds) and "auto" (DEFAULT_BOUND: the closed form R_F(1 - m)/L
where a lower bound of ||J(x)|| proves the local bounds cannot beat it by the search tolerance, best_ibp elsewhere).

Supported layers (anything else raises UnsupportedLayerError): nn.Sequential, nn.Linear, nn.Conv2d (zero padding,
any stride), nn.ReLU, MaxMin, nn.Flatten, nn.AvgPool2d, nn.PixelUnshuffle, nn.Identity, Residual,
nn.BatchNorm1d/2d (eval mode). AOLLinear / AOLConv2d train 1-Lipschitz layers; `materialize` turns them into
plain nn.Linear / nn.Conv2d before bounding. A downstream head Linear -> ClassMax (max-affine: a nearest-prototype
classifier) is certified exactly by bounds.max_affine instead of by propagation.

Cancellation: `f2i_radius(..., should_stop=...)` polls the callable before every bound evaluation and inside each,
and raises SearchCancelled (never a partial radius) once it returns True (bounds.cancellation).
"""

from bounds.attack import pgd_feature_distance, pgd_margin_attack
from bounds.batchnorm import fold_batchnorm
from bounds.cancellation import SearchCancelled
from bounds.f2i import (
    BOUND_DESCRIPTIONS,
    BOUNDS_OFFERED,
    CLOSED_FORM_BOUNDS,
    DEFAULT_BOUND,
    SAFETY_MARGIN,
    F2IResult,
    evaluate_bound_once,
    f2i_radius,
)
from bounds.feature_certification import (
    CERTIFY_METHODS,
    FeatureCertificate,
    certify_feature_radius,
    lipschitz_margin_radius,
)
from bounds.feature_distance import feature_distance_upper
from bounds.graph import BoundGraph, build_graph
from bounds.layers import ClassMax, MaxMin, Residual, UnsupportedLayerError, require_ieee_float32
from bounds.lipschitz import global_lipschitz_upper
from bounds.lipschitz_layers import AOLConv2d, AOLLinear, SpectralNormLinear, materialize
from bounds.max_affine import max_affine_radius
from bounds.propagation import InputBall, compute_bounds, concretize, crown_backward
from bounds.spectral import layer_product_lipschitz_upper, operator_norm_upper

__all__ = [
    "AOLConv2d",
    "AOLLinear",
    "BOUND_DESCRIPTIONS",
    "BOUNDS_OFFERED",
    "CLOSED_FORM_BOUNDS",
    "CERTIFY_METHODS",
    "DEFAULT_BOUND",
    "SAFETY_MARGIN",
    "SpectralNormLinear",
    "BoundGraph",
    "ClassMax",
    "F2IResult",
    "FeatureCertificate",
    "InputBall",
    "MaxMin",
    "Residual",
    "SearchCancelled",
    "UnsupportedLayerError",
    "build_graph",
    "certify_feature_radius",
    "compute_bounds",
    "concretize",
    "crown_backward",
    "evaluate_bound_once",
    "f2i_radius",
    "feature_distance_upper",
    "fold_batchnorm",
    "global_lipschitz_upper",
    "layer_product_lipschitz_upper",
    "lipschitz_margin_radius",
    "materialize",
    "max_affine_radius",
    "operator_norm_upper",
    "require_ieee_float32",
    "pgd_feature_distance",
    "pgd_margin_attack",
]
