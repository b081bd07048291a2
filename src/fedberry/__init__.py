"""fedberry: federated averaging for small, cheap, badly connected machines."""

__version__ = "0.1.0"

from fedberry.errors import (  # noqa: E402  (after __version__, which cli reads)
    AuthenticationError,
    ChiefUnreachable,
    FederationError,
    ModelMismatchError,
)
from fedberry.privacy import DPConfig
from fedberry.serve import ChiefHandle, run_chief, serve
from fedberry.worker import Worker

__all__ = ["AuthenticationError", "ChiefHandle", "ChiefUnreachable", "DPConfig", "FederationError",
           "ModelMismatchError", "Worker", "run_chief", "serve"]
