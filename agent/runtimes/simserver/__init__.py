"""A vLLM-compatible inference simulator, in the spirit of llm-d's inference-sim.

OpenAI-compatible endpoints, vLLM's metric names, a latency model and injected faults, all
read from a TOML model card (:mod:`.card`): how many replicas and how much load are tested on
machines without GPUs.

    python -m llm_ops_helper.agent.runtimes.simserver --model-card CARD --host H --port P
        [--served-model-name NAME] [--seed N] [--log-level LEVEL]

Exit codes: 0 after SIGTERM/SIGINT; 1 for ``faults.exit_at_start``, ``faults.crash_after_s``
or a port that cannot be bound; 2 for a bad card (the message names the file and the key) or
bad arguments.
"""

from llm_ops_helper.agent.runtimes.simserver.card import (
    ModelCard,
    load_card,
    write_model_card,
)

__all__ = ["ModelCard", "load_card", "write_model_card"]
