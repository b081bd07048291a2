"""Drop-ins for training frameworks: weights <-> numpy arrays over ``fedberry.Worker``.

``torch`` (``FederatedOptimizer``) and ``keras`` (``FederatedCallback``) each import their
framework at load; ``fedberry.torch`` and ``fedberry.keras`` are the short names users import.
"""
