"""clx_core: the fast, tested core behind the clx continual-learning notebooks.

One module per concept: data -> scenarios -> models (+ methods) -> train -> metrics -> results
-> plotting. Notebook-level experiments live in :mod:`clx_core.experiments`.
"""

__version__ = "0.1.0"
