"""Site data: the on-disk format, loaders per modality, validation, synthetic data."""
