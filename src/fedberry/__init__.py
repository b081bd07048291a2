"""fedberry: federated averaging for small, cheap, badly connected machines."""

__version__ = "0.1.0"
