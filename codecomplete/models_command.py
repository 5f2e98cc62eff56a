"""`codecomplete models pull|list|rm`: models from the Hugging Face Hub in the local cache."""

from __future__ import annotations

import json
import sys

from codecomplete.hub import HubError, format_bytes, list_pulled, pull, remove


def register(sub) -> None:
    models = sub.add_parser("models", help="pull models from the Hugging Face Hub, list and remove them")
    actions = models.add_subparsers(dest="models_command", required=True)

    p = actions.add_parser("pull", help="download a model repository's weights into the cache "
                                        "(the only command that uses the network)")
    p.add_argument("repo", help="repository id, e.g. Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF")
    p.add_argument("--file", action="append", default=[], metavar="PATTERN",
                   help="which files (glob, repeatable), e.g. '*Q4_K_M.gguf'; needed when the repository "
                        "has several GGUF files")
    p.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    p.set_defaults(func=run_pull)

    p = actions.add_parser("list", help="the pulled models: name, files, size, path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_list)

    p = actions.add_parser("rm", help="delete a pulled model (REPO, its short name, or REPO:FILE for one GGUF)")
    p.add_argument("name")
    p.set_defaults(func=run_rm)


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def run_pull(args) -> int:
    try:
        model = pull(args.repo, args.file, revision=args.revision, log=_say)
        path = model.model_path(model.gguf_files[-1] if len(model.gguf_files) > 1 else None)
    except HubError as e:
        _say(f"codecomplete: {e}")
        return 2
    _say(f"pulled {model.repo}: use --model {model.repo} (or --model {model.alias})")
    print(path)
    return 0


def _row(model) -> dict:
    try:
        path = str(model.model_path())
    except HubError:  # several GGUFs (named REPO:FILE) or an interrupted pull
        path = str(model.model_dir)
    return {"name": model.repo, "alias": model.alias, "complete": model.complete, "commit": model.commit,
            "files": sorted(model.files), "size_bytes": model.size_bytes, "path": path}


def run_list(args) -> int:
    rows = [_row(m) for m in list_pulled()]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not rows:
        print("no pulled models (codecomplete models pull REPO)")
        return 0
    for row in rows:
        state = "" if row["complete"] else "  [interrupted: pull again to resume]"
        files = ", ".join(row["files"]) or "-"
        print(f"{row['name']}  {format_bytes(row['size_bytes'])}{state}\n  files: {files}\n  path:  {row['path']}")
    return 0


def run_rm(args) -> int:
    try:
        model = remove(args.name)
    except HubError as e:
        _say(f"codecomplete: {e}")
        return 2
    suffix = f" ({args.name.partition(':')[2]})" if ":" in args.name else ""
    print(f"removed {model.repo}{suffix}")
    return 0
