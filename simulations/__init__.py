"""Local federations over Flower's simulation engine: the runner, scenarios, experiments."""
