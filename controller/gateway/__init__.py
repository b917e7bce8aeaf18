"""The OpenAI-compatible gateway: routing, keys, metering and guards in front of the replicas."""
