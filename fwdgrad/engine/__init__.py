"""The fast forward-mode engine (to be split into a package: the mode, and rules by op family).

Public interface, stable for the estimators: :func:`forward_tangents`, the tangent types :class:`RankOne`,
:class:`Regenerated`, ``Tangent``, :func:`tangent_slice`, :func:`supported_functions`, and
:class:`~fwdgrad.errors.Unsupported`.
"""

from fwdgrad.errors import Unsupported
from fwdgrad.fast import RankOne, Regenerated, Tangent, forward_tangents, supported_functions, tangent_slice

__all__ = ["RankOne", "Regenerated", "Tangent", "Unsupported", "forward_tangents", "supported_functions",
           "tangent_slice"]
