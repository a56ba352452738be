"""Fast CPU inference that leans on private transformers internals, behind a version guard."""
