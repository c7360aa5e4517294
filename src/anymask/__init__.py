"""anymask: exact attention with any mask, fast on the hardware at hand.

    import anymask
    from anymask import masks
    out = anymask.attention(q, k, v, masks.documents(lengths=[300, 700, 24]) & masks.causal())
"""

from . import masks
from .attention import attention, backends, which_backend
from .backend import BackendUnavailable
from .masks import Mask
from .tuning import tune

__version__ = "0.1.0"

__all__ = ["attention", "backends", "which_backend", "masks", "Mask", "BackendUnavailable", "tune", "__version__"]
