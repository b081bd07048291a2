"""Differential privacy: DP-FedAvg on the chief, local DP on the worker, the accountant.

See docs/privacy.md. The accountant needs the ``dp`` extra (``dp-accounting``), imported when a
run first asks for epsilon.
"""

from fedberry.privacy.config import DPConfig, as_config, parse_dp
from fedberry.privacy.dp_fedavg import DPFedAvg, make_rng
from fedberry.privacy.local import LocalPrivacy

__all__ = ["DPConfig", "DPFedAvg", "LocalPrivacy", "as_config", "make_rng", "parse_dp"]
