"""``llmops models ...``: push model files and manage versions, stages and aliases."""

from __future__ import annotations

import argparse
from pathlib import Path

from llm_ops_helper.cli_format import emit, human_bytes, key_value, table, version_line, when
from llm_ops_helper.client import LLMOpsHelper, Model, ModelVersion
from llm_ops_helper.progress import TransferBars


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("models", help="the model registry: versions, stages, aliases")
    commands = group.add_subparsers(dest="models_command", required=True, metavar="COMMAND")

    push = commands.add_parser(
        "push", parents=[common], help="upload a model file as a version",
        description="Upload PATH as the next version of a model; or, without PATH, register "
                    "weights the runtime fetches itself (--name and --source-uri).")
    push.add_argument("path", type=Path, nargs="?", metavar="PATH")
    push.add_argument("--name", help="model name (default: from the file name)")
    push.add_argument("--runtime", help="llamacpp, vllm, sglang, sim or command "
                                        "(default: from the file's format)")
    push.add_argument("--tag", type=key_value, action="append", default=[], metavar="K=V")
    push.add_argument("--description", default="")
    push.add_argument("--source-uri", help="where the weights come from (hf://..., s3://...)")
    push.add_argument("--parameters", help="parameter count: 7000000000 or 7B")
    push.add_argument("--quantization", help="e.g. Q4_K_M, fp8, awq")
    push.set_defaults(run=_push)

    listing = commands.add_parser("list", parents=[common], help="every model")
    listing.set_defaults(run=_list)

    show = commands.add_parser("show", parents=[common], help="a model's versions, or one")
    show.add_argument("name", metavar="NAME")
    show.add_argument("version", nargs="?", metavar="VERSION", help="number or alias")
    show.set_defaults(run=_show)

    promote = commands.add_parser("promote", parents=[common], help="move a version to a stage")
    promote.add_argument("name", metavar="NAME")
    promote.add_argument("version", type=int, metavar="VERSION")
    promote.add_argument("--stage", default="production",
                         choices=("staging", "production", "archived", "registered"))
    promote.add_argument("--keep-previous", action="store_true",
                         help="do not archive the version that was in production")
    promote.set_defaults(run=_promote)

    alias = commands.add_parser("alias", parents=[common], help="point an alias at a version")
    alias.add_argument("name", metavar="NAME")
    alias.add_argument("alias", metavar="ALIAS")
    alias.add_argument("version", type=int, nargs="?", metavar="VERSION")
    alias.add_argument("--delete", action="store_true", help="remove the alias")
    alias.set_defaults(run=_alias, parser=alias)

    diff = commands.add_parser("diff", parents=[common], help="compare two versions")
    diff.add_argument("name", metavar="NAME")
    diff.add_argument("a", metavar="A")
    diff.add_argument("b", metavar="B")
    diff.set_defaults(run=_diff)

    pull = commands.add_parser("pull", parents=[common],
                               help="download a version's artifact (resumes, sha256-checked)")
    pull.add_argument("name", metavar="NAME")
    pull.add_argument("version", nargs="?", default="production", metavar="VERSION",
                      help="a number or an alias (default: production)")
    pull.add_argument("-o", "--output", type=Path, help="where (default: its file name, here)")
    pull.set_defaults(run=_pull)

    retire = commands.add_parser("retire", parents=[common], help="retire a version for good")
    retire.add_argument("name", metavar="NAME")
    retire.add_argument("version", type=int, metavar="VERSION")
    retire.set_defaults(run=_retire)


def _push(helper: LLMOpsHelper, args: argparse.Namespace) -> int:
    with TransferBars() as bars:
        version = helper.push_model(args.path, args.name, runtime=args.runtime,
                                    tags=dict(args.tag), description=args.description,
                                    source_uri=args.source_uri, parameters=args.parameters,
                                    quantization=args.quantization, progress=bars)
    emit(args, version, f"pushed {version_line(version)}")
    return 0


def _list(helper: LLMOpsHelper, args: argparse.Namespace) -> int:
    models = helper.list_models()
    rows = [(m.name, m.latest, m.versions, _aliases(m.aliases), when(m.updated_at))
            for m in models]
    emit(args, models, table(("NAME", "LATEST", "VERSIONS", "ALIASES", "UPDATED"), rows)
         if models else "no models; push one with: llmops models push PATH")
    return 0


def _show(helper: LLMOpsHelper, args: argparse.Namespace) -> int:
    if args.version is not None:
        version = helper.get_version(args.name, args.version)
        emit(args, version, _version_details(version))
        return 0
    model = helper.get_model(args.name)
    emit(args, model, _model_table(model))
    return 0


def _promote(helper: LLMOpsHelper, args: argparse.Namespace) -> int:
    version = helper.promote(args.name, args.version, args.stage,
                             archive_previous=not args.keep_previous)
    emit(args, version, f"{version.ref} is now {version.stage}")
    return 0


def _alias(helper: LLMOpsHelper, args: argparse.Namespace) -> int:
    if args.delete == (args.version is not None):
        args.parser.error("give either VERSION or --delete")
    if args.delete:
        change = helper.delete_alias(args.name, args.alias)
        text = f"{args.name}: alias {change.alias} removed (was {change.previous})"
    else:
        change = helper.set_alias(args.name, args.alias, args.version)
        was = f" (was {change.previous})" if change.previous is not None else ""
        text = f"{args.name}: alias {change.alias} -> {change.version}{was}"
    emit(args, change, text)
    return 0


def _diff(helper: LLMOpsHelper, args: argparse.Namespace) -> int:
    diff = helper.diff(args.name, args.a, args.b)
    rows = [(field, a, b) for field, (a, b) in sorted(diff.changes.items())]
    lines = [table(("FIELD", diff.from_.ref, diff.to.ref), rows) if rows else "no field differs"]
    if diff.artifact is not None:
        lines.append("artifact: same" if diff.artifact.same else
                     f"artifact: differs, size {diff.artifact.size_delta_bytes:+d} bytes")
    emit(args, diff, "\n".join(lines))
    return 0


def _pull(helper: LLMOpsHelper, args: argparse.Namespace) -> int:
    with TransferBars() as bars:
        path = helper.pull_model(args.name, args.version, args.output, progress=bars)
    emit(args, {"path": str(path)}, f"wrote {path}")
    return 0


def _retire(helper: LLMOpsHelper, args: argparse.Namespace) -> int:
    version = helper.retire(args.name, args.version)
    emit(args, version, f"{version.ref} is now {version.stage}")
    return 0


def _aliases(aliases: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(aliases.items()))


def _model_table(model: Model) -> str:
    rows = [(v.version, v.stage, ",".join(v.aliases), v.runtime, v.format,
             human_bytes(v.artifact.size_bytes) if v.artifact else None,
             v.artifact.sha256[:12] if v.artifact else None, when(v.created_at), v.created_by,
             v.description) for v in model.versions]
    head = f"model {model.name}; aliases: {_aliases(model.aliases) or 'none'}"
    return head + "\n" + table(("VERSION", "STAGE", "ALIASES", "RUNTIME", "FORMAT", "SIZE",
                                "SHA256", "CREATED", "BY", "DESCRIPTION"), rows)


def _version_details(v: ModelVersion) -> str:
    fields: list[tuple[str, object]] = [
        ("ref", v.ref), ("stage", v.stage), ("aliases", ", ".join(v.aliases)),
        ("runtime", v.runtime), ("format", v.format),
        ("file", v.artifact.filename if v.artifact else None),
        ("size", human_bytes(v.artifact.size_bytes) if v.artifact else None),
        ("sha256", v.artifact.sha256 if v.artifact else None), ("source_uri", v.source_uri),
        ("parameters", v.parameters), ("quantization", v.quantization),
        ("tags", ", ".join(f"{k}={t}" for k, t in sorted(v.tags.items()))),
        ("description", v.description), ("created", f"{when(v.created_at)} by {v.created_by}"),
        ("replaces", f"{v.model}@{v.replaces}" if v.replaces else None),
        ("stage changed", when(v.stage_changed_at) if v.stage_changed_at else None)]
    return "\n".join(f"{k + ':':<15}{'-' if val in (None, '') else val}" for k, val in fields)
