"""Collectors: one small interface, one module per source, failures isolated per collector."""
