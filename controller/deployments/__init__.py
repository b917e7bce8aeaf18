"""Deployments: desired state in SQLite, the reconciler that makes the fleet match it, the
scheduler that places replicas and the rollout planner that replaces them."""
