"""The controller daemon: ingest, fleet state, anomaly detection, alerts, HTTP API."""
