"""``fedberry.keras.FederatedCallback``: see ``fedberry.integrations.keras``."""

from fedberry.integrations.keras import FederatedCallback

__all__ = ["FederatedCallback"]
