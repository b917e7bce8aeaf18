"""``llmops keys ...``: create and rotate the secrets that sign commands to agents.

A local file tool for the head node: it writes the controller's key store
(:mod:`llm_ops_helper.keys`) and prints what to install on the agent. Secrets are never printed
unless ``--show`` asks for them. Rotation without downtime::

    llmops keys rotate HOST              # k2 beside k1; the controller still signs with k1
    (install k2.key in the agent's commands.keys_dir: both keys are valid now)
    llmops keys activate HOST k2         # the controller signs with k2 from its next command
    llmops keys retire HOST k1           # and remove k1.key from the agent's keys_dir
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llm_ops_helper.cli_format import table
from llm_ops_helper.keys import KeyStore, KeyStoreError, read_key

DEFAULT_KEYS_DIR = "/etc/llmops/keys"
DEFAULT_AGENT_KEYS_DIR = "/etc/llmops/agent-keys"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser(
        "keys", help="create and rotate the secrets that sign commands to agents",
        description="Per-host command keys in the controller's commands.keys_dir "
                    "({keys_dir}/{host}/{id}.key, and {keys_dir}/{host}/current: the id the "
                    "controller signs with). Run on the head node.")
    commands = group.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--keys-dir", type=Path,
                       default=Path(os.environ.get("LLMOPS_KEYS_DIR", DEFAULT_KEYS_DIR)),
                       help="the controller's commands.keys_dir (default: $LLMOPS_KEYS_DIR, "
                            f"else {DEFAULT_KEYS_DIR})")
    install = argparse.ArgumentParser(add_help=False)
    install.add_argument("--agent-keys-dir", default=DEFAULT_AGENT_KEYS_DIR,
                         help="the agent's commands.keys_dir, for the instructions printed "
                              f"(default {DEFAULT_AGENT_KEYS_DIR})")
    install.add_argument("--show", action="store_true", help="print the new secret too")
    install.add_argument("--id", dest="key_id", help="key id (default k1, k2, ...)")

    create = commands.add_parser("create", parents=[store, install],
                                 help="a host's first key, signed with at once")
    create.add_argument("host", metavar="HOST")
    create.set_defaults(local=_create)

    rotate = commands.add_parser("rotate", parents=[store, install],
                                 help="a new key beside the current one (not signed with yet)")
    rotate.add_argument("host", metavar="HOST")
    rotate.set_defaults(local=_rotate)

    activate = commands.add_parser("activate", parents=[store],
                                   help="sign a host's commands with this key from now on")
    activate.add_argument("host", metavar="HOST")
    activate.add_argument("key_id", metavar="KEY_ID")
    activate.set_defaults(local=_activate)

    listing = commands.add_parser("list", parents=[store], help="hosts, their keys, the current")
    listing.add_argument("host", nargs="?", metavar="HOST")
    listing.set_defaults(local=_list)

    retire = commands.add_parser("retire", parents=[store], help="remove a key no longer signed "
                                                                 "with")
    retire.add_argument("host", metavar="HOST")
    retire.add_argument("key_id", metavar="KEY_ID")
    retire.set_defaults(local=_retire)


def run(args: argparse.Namespace) -> int:
    try:
        code: int = args.local(KeyStore(args.keys_dir), args)
    except KeyStoreError as exc:
        print(f"llmops: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"llmops: error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    return code


def _installing(store: KeyStore, args: argparse.Namespace, key_id: str, then: str) -> None:
    path = store.path(args.host, key_id)
    agent_path = f"{args.agent_keys_dir.rstrip('/')}/{key_id}.key"
    print(f"wrote {path} (0600)")
    if args.show:
        print(f"secret: {read_key(path).decode()}")
    print(f"\nOn {args.host}: install it as {agent_path} (owner llmops, mode 0600), e.g.\n"
          f"  scp -p {path} {args.host}:{agent_path}\n"
          "An agent with this in its config reads it without a restart:\n\n"
          f'[commands]\nkeys_dir = "{args.agent_keys_dir}"\n\n'
          "or, listing the key itself (read on start; restart the agent after adding it):\n\n"
          f'[[commands.keys]]\nid = "{key_id}"\nfile = "{agent_path}"\n')
    print(then)


def _create(store: KeyStore, args: argparse.Namespace) -> int:
    key_id = store.create(args.host, args.key_id)
    _installing(store, args, key_id, f"The controller signs {args.host}'s commands with "
                f"{key_id!r} from its next command.")
    return 0


def _rotate(store: KeyStore, args: argparse.Namespace) -> int:
    old = store.current(args.host)
    key_id = store.rotate(args.host, args.key_id)
    _installing(store, args, key_id, f"The controller still signs with {old!r}. Once the agent "
                f"has {key_id}.key:\n  llmops keys activate {args.host} {key_id}\n"
                f"and after that:\n  llmops keys retire {args.host} {old}   "
                f"(and remove {old}.key on {args.host})")
    return 0


def _activate(store: KeyStore, args: argparse.Namespace) -> int:
    store.activate(args.host, args.key_id)
    print(f"{args.host}: commands are signed with {args.key_id!r} from the next one")
    return 0


def _retire(store: KeyStore, args: argparse.Namespace) -> int:
    store.retire(args.host, args.key_id)
    print(f"removed {store.path(args.host, args.key_id)}; remove "
          f"{args.key_id}.key from {args.host}'s commands.keys_dir too")
    return 0


def _list(store: KeyStore, args: argparse.Namespace) -> int:
    hosts = [args.host] if args.host else store.hosts()
    rows = []
    for host in hosts:
        current = store.current(host)
        for key_id in store.key_ids(host):
            rows.append([host, key_id, "yes" if key_id == current else "",
                         str(store.path(host, key_id))])
    if not rows:
        print(f"no keys in {store.root}" + (f" for {args.host}" if args.host else ""))
        return 0 if not args.host else 1
    print(table(["HOST", "KEY", "CURRENT", "FILE"], rows))
    return 0
