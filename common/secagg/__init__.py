"""Secure aggregation (SecAgg+) shared by the site's mod and the server's workflow."""

from fedfuse.common.secagg.params import RoundParams, SecAggSettings
from fedfuse.common.secagg.protocol import SecAggProtocolError, SecAggRoundFailed, Stage

__all__ = ["RoundParams", "SecAggProtocolError", "SecAggRoundFailed", "SecAggSettings", "Stage"]
