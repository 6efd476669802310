"""``starquant push``: publish a checkpoint folder on the Hugging Face Hub with a model card.

Over ``integrations.hub.push_to_hub``: the folder is validated (config, every tensor, tokenizer,
recipe) and a card is written from it. ``--dry-run`` stages exactly the upload (checkpoint
files + README.md) in a new local folder instead of uploading.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from starquant_plugin.cli.errors import UserError, add_command

EXAMPLE = """examples:
  starquant push tiny-llada-w4a4 me/tiny-llada-w4a4 --dry-run   # look at the card first
  starquant push tiny-llada-w4a4 me/tiny-llada-w4a4 --private

Log in first (`hf auth login`) or pass --token / set HF_TOKEN. The folder must hold what
`starquant quantize` writes: the checkpoint, its tokenizer and recipe.yaml; a quality.json
beside it ({row: {metric: value}}) becomes the card's quality table.
"""

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "push", "upload a checkpoint to the Hugging Face Hub with a model card",
        __doc__, EXAMPLE)
    parser.add_argument("directory", metavar="DIR", help="checkpoint folder")
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub repository, owner/name")
    parser.add_argument("--dry-run", action="store_true",
                        help="write the upload to --dry-run-dir instead of uploading")
    parser.add_argument("--dry-run-dir", metavar="DIR",
                        help="where --dry-run stages the upload (default ./<name>-upload)")
    parser.add_argument("--private", action="store_true", help="create a private repository")
    parser.add_argument("--token", help="Hub token (default: the logged-in one, HF_TOKEN)")
    parser.add_argument("--base-model", metavar="ID", help="base model id for the card")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import httpx

    from starquant_plugin.integrations.hub import push_to_hub

    if not _REPO_ID.match(args.repo_id):
        raise UserError(f"REPO_ID {args.repo_id!r} is not a Hub repository id; pass "
                        "owner/name, e.g. me/tiny-llada-w4a4.")
    if args.dry_run_dir and not args.dry_run:
        raise UserError("--dry-run-dir only applies with --dry-run; add --dry-run or drop it.")
    folder = Path(args.directory)
    if not folder.is_dir():
        raise UserError(f"DIR {folder} is not a directory; pass the folder starquant quantize "
                        "wrote.")
    if args.dry_run:
        stage = Path(args.dry_run_dir or f"{args.repo_id.split('/')[-1]}-upload")
        staged = Path(push_to_hub(folder, args.repo_id, private=args.private,
                                  dry_run_dir=stage, base_model=args.base_model))
        for file in sorted(staged.iterdir()):
            print(f"{file.stat().st_size / 2**20:10.2f} MiB  {file.name}")
        print(f"dry run: nothing uploaded; this is what would go to {args.repo_id} "
              f"({'private' if args.private else 'public'}), staged in {staged} "
              f"(model card: {staged / 'README.md'})")
        return
    try:
        url = push_to_hub(folder, args.repo_id, private=args.private, token=args.token,
                          base_model=args.base_model)
    except (OSError, httpx.HTTPError) as error:  # huggingface_hub's network/login/HTTP errors
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"Upload to {args.repo_id} failed: {reason}. Check your network and "
                        "login (`hf auth login` or --token); --dry-run shows the upload "
                        "without the network.") from error
    print(f"uploaded {folder} to {url}")
