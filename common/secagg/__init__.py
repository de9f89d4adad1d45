"""Secure aggregation (SecAgg+) shared by the site's mod and the server's workflow."""

from common.secagg.params import RoundParams, SecAggSettings
from common.secagg.protocol import SecAggProtocolError, SecAggRoundFailed, Stage

__all__ = ["RoundParams", "SecAggProtocolError", "SecAggRoundFailed", "SecAggSettings", "Stage"]
