"""Universal Neural Functionals: permutation-equivariant layers for any weight space, with derived symmetry specs.

Usable on its own (never imports ``pipeline``)::

    import unf_models as um
    spec = um.WeightSpec.from_module(model)
    layer = um.UNFLinear(spec, 1, 16)
    model = um.UNFPredictor(spec, hidden=(16, 16), head=(512,))
"""

from unf_models.activation import ReLU
from unf_models.basis import bell, num_pair_terms
from unf_models.errors import SpecError, SpecMismatchError, SymmetryError, UNFError, UnsupportedModuleError
from unf_models.layers import UNFLinear, UNFPool
from unf_models.normalize import WeightStats
from unf_models.predictor import UNFPredictor
from unf_models.spec import Part, TensorSpec, WeightSpec

__all__ = [
    "WeightSpec",
    "TensorSpec",
    "Part",
    "UNFLinear",
    "UNFPool",
    "UNFPredictor",
    "WeightStats",
    "ReLU",
    "bell",
    "num_pair_terms",
    "UNFError",
    "SpecError",
    "SpecMismatchError",
    "UnsupportedModuleError",
    "SymmetryError",
]
