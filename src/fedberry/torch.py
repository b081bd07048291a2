"""``fedberry.torch.FederatedOptimizer``: see ``fedberry.integrations.torch``."""

from .integrations.torch import FederatedOptimizer

__all__ = ["FederatedOptimizer"]
