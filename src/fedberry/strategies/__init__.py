"""Aggregation rules: small pure objects behind one interface (``Strategy``), no I/O.

One rule per module, each citing its paper: ``fedavg`` (McMahan et al. 2017), ``fedavgm`` (Hsu
et al. 2019), ``fedadam`` (Reddi et al. 2021), ``median`` and ``trimmed_mean`` (Yin et al.
2018). ``spec`` turns ``--strategy`` text such as ``fedadam:lr=0.05,tau=1e-4`` into objects and
back. How to choose one, and how to write your own: docs/strategies.md.
"""

from fedberry.strategies.base import Arrays, Strategy, StrategyState
from fedberry.strategies.fedadam import FedAdam
from fedberry.strategies.fedavg import FedAvg
from fedberry.strategies.fedavgm import FedAvgM
from fedberry.strategies.median import Median
from fedberry.strategies.spec import STRATEGIES, describe, make_strategy, parse
from fedberry.strategies.trimmed_mean import TrimmedMean

__all__ = ["Arrays", "Strategy", "StrategyState", "FedAvg", "FedAvgM", "FedAdam", "Median",
           "TrimmedMean", "STRATEGIES", "describe", "make_strategy", "parse"]
