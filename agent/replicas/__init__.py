"""The replica supervisor: inference-server processes this agent starts, watches and stops.

``supervisor`` keeps the table of replicas, answers commands, adopts after a restart and
reports; ``life`` runs one replica (launch, probes, restarts, drain, stop); ``policy`` holds
the pure crash-loop decision; ``process`` does the process I/O (spawn, signals, adoption
checks); ``statefile`` remembers what runs across agent restarts; ``artifacts`` is the model
cache; ``ports`` finds free ports; ``probes`` reads health and in-flight requests; ``handlers``
turns commands into supervisor calls.
"""
