"""``fedberry.keras.FederatedCallback`` and ``load_weights``: see ``integrations.keras``."""

from fedberry.integrations.keras import FederatedCallback, load_weights

__all__ = ["FederatedCallback", "load_weights"]
