"""The chief's status server (the ``status`` extra): a live page, ``/api/status`` JSON and
Prometheus ``/metrics``, fed by the chief's event stream (``chief.events``). See
docs/operations.md."""

from fedberry.status.board import StatusBoard
from fedberry.status.server import StatusServer, check_exposure, require_extra

__all__ = ["StatusBoard", "StatusServer", "check_exposure", "require_extra"]
