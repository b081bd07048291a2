"""The chief: the round state machine (``state``), the runtime that carries out its actions for
every transport (``runtime``), the broadcast, checkpoints, metrics and receive buffers."""
