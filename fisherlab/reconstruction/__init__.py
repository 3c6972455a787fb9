"""Reconstructed networks: local Fisher layers that turn plain GD into natural gradient descent (docs/method.md).

``reconstruct(model, data, structure=...)`` returns a :class:`ReconstructedNetwork`: the same function written in
coordinates θ' = G^{1/2} θ (or θ' = R θ for another root R with RᵀR = G, ``sqrt=`` in :data:`ROOT_METHODS`),
where one plain gradient step on θ' maps back to the G-preconditioned NGD step −η G⁻¹ ∇L. Linear and Conv layers
get explicit local Fisher layers (:mod:`.local_layers`), every other tensor a
``torch.nn.utils.parametrize`` parametrization (:mod:`.parametrize`).

Example:
    >>> net = reconstruct(model, (X, y), structure="kfac", damping=1e-3)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1); net.attach(opt)
    >>> ...  # train net like any module; every k steps: net.refresh((xb, yb))
    >>> net.load_into(model)  # write θ back into the original model
"""

from fisherlab.errors import ReadOnlyTensorError
from fisherlab.reconstruction.build import STRUCTURES, MetricMismatchError, reconstruct
from fisherlab.reconstruction.local_layers import (
    FOLD_MODES,
    LAYER_FORMS,
    InputWhitening,
    LocalFisherConv,
    LocalFisherLayer,
    LocalFisherLinear,
    OutputFisher,
    register_layer_form,
)
from fisherlab.reconstruction.network import ReconstructConfig, ReconstructedNetwork, UnitPlan
from fisherlab.reconstruction.parametrize import (
    DenseRoot,
    DiagonalRoot,
    EigenbasisRoot,
    FisherParametrization,
    FisherRoot,
    KroneckerRoot,
    UnitRoot,
    parametrize_group,
)
from fisherlab.reconstruction.roots import (
    ROOT_METHODS,
    CombinedLayout,
    LocalFisherUnit,
    TransposedLayout,
    lowrank_roots,
)

__all__ = [
    "FOLD_MODES",
    "LAYER_FORMS",
    "ROOT_METHODS",
    "STRUCTURES",
    "CombinedLayout",
    "DenseRoot",
    "DiagonalRoot",
    "EigenbasisRoot",
    "FisherParametrization",
    "FisherRoot",
    "InputWhitening",
    "KroneckerRoot",
    "LocalFisherConv",
    "LocalFisherLayer",
    "LocalFisherLinear",
    "LocalFisherUnit",
    "MetricMismatchError",
    "OutputFisher",
    "ReadOnlyTensorError",
    "ReconstructConfig",
    "ReconstructedNetwork",
    "TransposedLayout",
    "UnitPlan",
    "UnitRoot",
    "lowrank_roots",
    "parametrize_group",
    "reconstruct",
    "register_layer_form",
]
