"""Builders that turn agents into a ``RecursiveMAS`` with a particular collaboration graph."""

from recursivemas.patterns.pair import pair
from recursivemas.patterns.sequential import sequential

__all__ = ["pair", "sequential"]
