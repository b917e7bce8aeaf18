"""``llmops-controller``: not built yet; the agent and the wire contract come first."""

import sys


def main() -> int:
    print("llmops-controller: not implemented in this release; use `llmops watch` to see "
          "agent telemetry on the broker", file=sys.stderr)
    return 69  # EX_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
