"""The fedfuse coordinator: the Flower ServerApp, its strategy, and the run directory."""
