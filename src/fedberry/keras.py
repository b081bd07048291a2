"""``fedberry.keras.FederatedCallback``: see ``fedberry.integrations.keras``."""

from .integrations.keras import FederatedCallback

__all__ = ["FederatedCallback"]
