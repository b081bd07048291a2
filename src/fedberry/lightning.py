"""``fedberry.lightning.FederatedCallback``: see ``fedberry.integrations.lightning``."""

from fedberry.integrations.lightning import FederatedCallback

__all__ = ["FederatedCallback"]
