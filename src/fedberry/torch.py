"""``fedberry.torch.FederatedOptimizer``: see ``fedberry.integrations.torch``."""

from fedberry.integrations.torch import FederatedOptimizer

__all__ = ["FederatedOptimizer"]
