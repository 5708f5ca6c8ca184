"""Check modules, one per topic; each registers its checks with ``experiments.registry.check``."""
