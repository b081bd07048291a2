"""fedberry: federated averaging for small, cheap, badly connected machines."""

__version__ = "0.1.0"

from .errors import AuthenticationError, ChiefUnreachable, FederationError, ModelMismatchError
from .serve import ChiefHandle, run_chief, serve
from .worker import Worker

__all__ = ["AuthenticationError", "ChiefHandle", "ChiefUnreachable", "FederationError",
           "ModelMismatchError", "Worker", "run_chief", "serve"]
