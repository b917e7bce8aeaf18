"""Inference-server runtimes: how to launch, probe and scrape each kind of server."""
