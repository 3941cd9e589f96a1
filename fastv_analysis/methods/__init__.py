"""The field's token-reduction methods, one module each, registered as strategies.

Each module implements one published method's criterion from its paper and its authors'
released code (read, never copied; the repository and commit in the module docstring and
in its fidelity test) and registers it with :func:`fastv_analysis.strategies.register`,
stating where it prunes (``where``), the positions policy of the authors' code
(``positions``) and, for a merge, the :class:`~fastv_analysis.strategies.Merge` plan it returns.
Importing this package or :mod:`fastv_analysis.strategies` registers them all.
"""

MODULES = ("divprune", "dart", "pooling", "cdpruner", "sparsevlm", "visionzip", "vispruner")
"""The method modules, in registration order (after the strategies of :mod:`..strategies`):
:mod:`fastv_analysis.strategies` imports each, so the registry is complete whichever module
is imported first."""

from .. import strategies  # noqa: E402,F401  (imports and so registers every module in MODULES)
