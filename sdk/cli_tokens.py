"""``llmops tokens ...``: the controller's API tokens.

A local tool for the head node, like ``llmops keys``: it writes the controller's SQLite file
(``{state.dir}/controller.db``) directly, so it works before any admin token exists and while
the controller runs (a revocation counts from the controller's next request). A new token is
printed once; only its sha256 is kept::

    llmops tokens create ci-deployer --role operator > /etc/llmops/ci.token
    llmops tokens list
    llmops tokens revoke ci-deployer
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from llm_ops_helper.cli_format import table

if TYPE_CHECKING:  # the controller's code is imported only when a command runs
    from llm_ops_helper.controller.auth import TokenStore

DEFAULT_STATE_DIR = "/var/lib/llmops-controller"
ROLES = ("viewer", "operator", "admin")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser(
        "tokens", help="create, list and revoke the controller's API tokens",
        description="Bearer tokens for the controller's API, with a role: viewer (read), "
                    "operator (deploy, scale, rollback, upload models), admin (model "
                    "lifecycle, audit log). Run on the head node, as the controller's user.")
    commands = group.add_subparsers(dest="tokens_command", required=True, metavar="COMMAND")
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--state-dir", type=Path,
                       default=Path(os.environ.get("LLMOPS_STATE_DIR", DEFAULT_STATE_DIR)),
                       help="the controller's state.dir (default: $LLMOPS_STATE_DIR, else "
                            f"{DEFAULT_STATE_DIR})")

    create = commands.add_parser("create", parents=[store],
                                 help="a new token, printed once (stdout, alone on its line)")
    create.add_argument("name", metavar="NAME", help="who uses it; what the audit log records")
    create.add_argument("--role", choices=ROLES, required=True)
    create.set_defaults(local=_create)

    listing = commands.add_parser("list", parents=[store], help="tokens (never their secret)")
    listing.add_argument("--all", action="store_true", help="revoked ones too")
    listing.set_defaults(local=_list)

    revoke = commands.add_parser("revoke", parents=[store], help="refuse a token from now on")
    revoke.add_argument("name", metavar="NAME")
    revoke.set_defaults(local=_revoke)


def run(args: argparse.Namespace) -> int:
    from llm_ops_helper.controller.auth import TokenError, TokenStore
    from llm_ops_helper.controller.state import DB_FILE

    try:
        tokens = TokenStore(args.state_dir / DB_FILE)
    except TokenError as exc:
        print(f"llmops: error: {exc}", file=sys.stderr)
        return 1
    try:
        code: int = args.local(tokens, args)
    except TokenError as exc:
        print(f"llmops: error: {exc}", file=sys.stderr)
        return 1
    finally:
        tokens.close()
    return code


def _by() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return "cli"


def _create(tokens: TokenStore, args: argparse.Namespace) -> int:
    token = tokens.create(args.name, args.role, _by())
    print(token)
    print(f"created {args.role} token {args.name!r}; it is not shown again", file=sys.stderr)
    return 0


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _list(tokens: TokenStore, args: argparse.Namespace) -> int:
    rows = [[t.name, t.role, _when(t.created_at), t.created_by, _when(t.last_used_at),
             "revoked" if t.revoked else ""] for t in tokens.tokens(include_revoked=args.all)]
    if not rows:
        print(f"no tokens in {tokens.path}")
        return 0
    print(table(["NAME", "ROLE", "CREATED", "BY", "LAST USED", ""], rows))
    return 0


def _revoke(tokens: TokenStore, args: argparse.Namespace) -> int:
    if not tokens.revoke(args.name):
        print(f"llmops: error: no active token named {args.name!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.name!r}")
    return 0

