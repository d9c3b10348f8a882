"""Exporters: one registered class per target format (see exporters.registry)."""
