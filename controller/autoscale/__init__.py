"""Autoscaling: load forecasts, the scaling policy, and replay evaluation."""
