"""``starquant verify``: check a checkpoint folder against the sha256 manifest its save wrote.

``save_starquant`` (so ``starquant quantize`` and ``demo``) records the sha256 of every file
of the checkpoint in ``starquant_manifest.json``. This command recomputes them and names each
file that changed, is missing, or was added where a loader would read it, so a truncated copy,
a half-finished download or a hand-edited config is found before it is evaluated or uploaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from starquant_plugin.cli.errors import UserError, add_command

EXAMPLE = """examples:
  starquant verify tiny-llada-w4a4
  starquant verify ~/.cache/huggingface/hub/models--me--tiny-llada-w4a4/snapshots/<rev>

Exits 0 when every file matches; 1, naming each changed, missing or added file, when one does
not, or when the folder has no starquant_manifest.json. Files no loader reads (notes, the Hub's
README.md, a quality.json written after the save) are listed as extra and do not fail it.
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "verify", "check a checkpoint's files against its sha256 manifest",
        __doc__, EXAMPLE)
    parser.add_argument("directory", metavar="DIR", help="checkpoint folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from starquant_plugin.integrations.integrity import MANIFEST_FILE, verify_checkpoint
    from starquant_plugin.integrations.output_dirs import explain_interrupted_replace

    folder = Path(args.directory)
    explain_interrupted_replace(folder)
    if not folder.is_dir():
        raise UserError(f"DIR {folder} is not a directory; pass the checkpoint folder "
                        "starquant quantize wrote.")
    report = verify_checkpoint(folder)
    if not report.manifest_found:
        raise UserError(f"{folder} has no {MANIFEST_FILE}, so there is nothing to verify it "
                        "against (written by an older starquant-plugin, or not by starquant "
                        "quantize or save_starquant); quantize it again to add one.")
    for what, names in (("changed", report.changed), ("missing", report.missing),
                        ("added", report.added)):
        for name in names:
            print(f"{what:8} {name}")
    for name in report.extra:
        print(f"extra    {name} (not in the manifest; no loader reads it)")
    if not report.ok:
        raise UserError(f"{folder} does not match its {MANIFEST_FILE}: {report.problems()}. "
                        "Download or save the checkpoint again.")
    print(f"ok: the {report.checked} files of {folder} match {MANIFEST_FILE} (sha256)")
