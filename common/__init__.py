"""Code shared by the fedfuse server and client: data, models, privacy maths, the CLI."""

__version__ = "0.1.0"
