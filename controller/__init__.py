"""The controller daemon (issue 3 fills it)."""
