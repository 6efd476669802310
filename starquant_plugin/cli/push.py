"""``starquant push``: publish a checkpoint folder on the Hugging Face Hub with a model card.

Over ``integrations.hub.push_to_hub``: the folder is validated (config, every tensor, tokenizer,
recipe) and a card is written from it. Only the files the checkpoint format defines are
uploaded, plus those named with ``--include``; every other file in the folder is listed as
left out. ``--dry-run`` stages copies of exactly the upload (those files + README.md) in a new
local folder instead of uploading.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING

from starquant_plugin.cli.errors import UserError, add_command
from starquant_plugin.messages import shown

if TYPE_CHECKING:  # the hub module imports torch: loaded only when the command runs
    from starquant_plugin.integrations.hub import UploadPlan

EXAMPLE = """examples:
  starquant push tiny-llada-w4a4 me/tiny-llada-w4a4 --dry-run   # look at the card first
  starquant push tiny-llada-w4a4 me/tiny-llada-w4a4 --private
  starquant push tiny-llada-w4a4 me/tiny-llada-w4a4 --include eval/scores.json

Log in first (`hf auth login`) or pass --token / set HF_TOKEN. The folder must hold what
`starquant quantize` writes: the checkpoint, its tokenizer and recipe.yaml; a quality.json
beside it ({row: {metric: value}}) becomes the card's quality table. Other files in the folder
(notes, tokens, logs) are left out unless named with --include, and listed.
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
    parser.add_argument("--include", action="append", default=[], metavar="FILE",
                        help="also upload this file inside DIR (path relative to DIR; "
                             "repeatable)")
    parser.set_defaults(func=run)


def _print_plan(plan: UploadPlan, repo_id: str, private: bool) -> None:
    """Each file that goes up with its size, then what stays behind and why, then where."""
    sizes = plan.sizes()
    for name in plan.files:
        print(f"{sizes[name] / 2**20:10.2f} MiB  {name}")
    print(f"{'':15}README.md (the generated model card)")
    for name, why in plan.left_out:
        print(f"{'left out':>13}  {name} ({why})")
    if plan.left_out:
        print(f"{'':15}(--include FILE uploads a file of the folder that is left out)")
    visibility = "private" if private else "public"
    print(f"{len(plan.files) + 1} files, {sum(sizes.values()) / 2**20:.2f} MiB, to "
          f"https://huggingface.co/{repo_id} ({visibility} repository)")


def run(args: argparse.Namespace) -> None:
    import httpx

    from starquant_plugin.integrations.hub import (
        CLI_WORDING,
        prepare_upload,
        stage_upload,
        upload,
    )
    from starquant_plugin.integrations.output_dirs import explain_interrupted_replace

    if not _REPO_ID.match(args.repo_id):
        raise UserError(f"REPO_ID {shown(args.repo_id)!r} is not a Hub repository id; "
                        "pass owner/name, e.g. me/tiny-llada-w4a4.")
    if args.dry_run_dir and not args.dry_run:
        raise UserError("--dry-run-dir only applies with --dry-run; add --dry-run or drop it.")
    folder = Path(args.directory)
    explain_interrupted_replace(folder)  # a folder an interrupted overwrite left missing
    if not folder.is_dir():
        raise UserError(f"DIR {shown(folder)} is not a directory; pass the folder "
                        "starquant quantize wrote.")
    plan, card = prepare_upload(folder, args.repo_id, base_model=args.base_model,
                                include=args.include,  # validates the folder and its manifest
                                wording=CLI_WORDING)
    if args.dry_run:
        staged = stage_upload(plan, card,
                              args.dry_run_dir or f"{args.repo_id.split('/')[-1]}-upload",
                              CLI_WORDING)
        _print_plan(plan, args.repo_id, args.private)
        print(f"dry run: nothing uploaded; copies of exactly these files are staged in "
              f"{staged} (model card: {staged / 'README.md'})")
        return
    _print_plan(plan, args.repo_id, args.private)
    try:
        url = upload(plan, card, args.repo_id, private=args.private, token=args.token)
    except (OSError, httpx.HTTPError) as error:  # huggingface_hub's network/login/HTTP errors
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"Upload to {args.repo_id} failed: {reason}. Check your network and "
                        "login (`hf auth login` or --token); --dry-run shows the upload "
                        "without the network.") from error
    print(f"uploaded {folder} to {url}")
