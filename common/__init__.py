"""Code shared by the fedfuse server and client: data, models, privacy maths, the CLI."""

import logging

__version__ = "0.1.0"


def _log_each_line_once() -> None:
    """Flower's logger has its own console handler; Opacus calls ``logging.basicConfig`` at
    import, which gives the root logger a second one, so every Flower line printed twice. Flower's
    lines stop at Flower's handler."""
    logging.getLogger("flwr").propagate = False


_log_each_line_once()
