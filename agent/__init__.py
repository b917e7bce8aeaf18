"""The GPU-host agent: collectors, publisher, command handling."""
