"""``starquant eval``: how well a diffusion LM (FP or STaR-Quant) predicts held-out text.

Masked-token cross-entropy and accuracy at fixed mask ratios t, the Monte-Carlo ELBO per token
of each row's continuation, and, with ``--reference``, the share of greedy-generated tokens
equal to the reference's. Every model sees the same masks (fixed seed). Prints a table; writes
JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from starquant_plugin.cli.errors import UserError, add_command, positive_int
from starquant_plugin.cli.loading import DTYPES, load_model, resolve_model
from starquant_plugin.cli.logs import status
from starquant_plugin.cli.table import markdown_table

EXAMPLE = """examples:
  starquant eval tiny-llada-w4a4 --reference tiny-llada
  starquant eval llada-8b-w4a4 --reference GSAI-ML/LLaDA-8B-Base --text wiki.txt --rows 128 \\
      --json llada-8b-w4a4.json

Scores the bundled held-out prose (assets.evaluation_text) unless --text is given. Columns:
ce@t / acc@t: masked-token cross-entropy (nats) and accuracy with round(t * seq-len) random
positions masked (--mask-draws masks per row; 8 cover every position at t = 0.15); elbo:
Monte-Carlo ELBO per target token of each row's continuation after its first --prompt-len
tokens (higher is better); gen_agreement: share of greedy-generated tokens equal to the
reference model's (needs --reference).
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "eval",
        "masked-token CE/accuracy, ELBO and generation agreement on held-out text",
        __doc__, EXAMPLE)
    parser.add_argument("model", metavar="MODEL", help="model folder, Hub id or tiny-llada/dream")
    parser.add_argument("--reference", metavar="MODEL",
                        help="FP model to compare against (adds gen_agreement)")
    parser.add_argument("--text", metavar="FILE", help="UTF-8 text to score (default bundled)")
    parser.add_argument("--rows", type=positive_int, metavar="N", default=64,
                        help="rows of text to score")
    parser.add_argument("--seq-len", type=positive_int, metavar="N", default=128,
                        help="tokens per row")
    parser.add_argument("--mask-draws", type=positive_int, metavar="N", default=1,
                        help="masks per row and ratio, covering every position before "
                             "repeating one")
    parser.add_argument("--elbo-rows", type=positive_int, metavar="N", default=16,
                        help="rows for the ELBO")
    parser.add_argument("--prompt-len", type=positive_int, metavar="N", default=32,
                        help="clean prompt tokens before the ELBO's continuation")
    parser.add_argument("--mc-num", type=positive_int, metavar="N", default=16,
                        help="ELBO Monte-Carlo draws")
    parser.add_argument("--prompts", type=positive_int, metavar="N", default=4,
                        help="prompts for generation agreement (4, of 16 tokens each)")
    parser.add_argument("--seed", type=int, metavar="N", default=0,
                        help="seed of the masks and draws")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="compute dtype (float32: bf16 checkpoints upcast exactly)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json")
    parser.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if not 0 < args.prompt_len < args.seq_len:
        raise UserError(f"--prompt-len {args.prompt_len} must be between 1 and --seq-len - 1 "
                        f"({args.seq_len - 1}) so the ELBO has a continuation to score.")
    if args.json:
        path = Path(args.json)
        if path.is_dir():
            raise UserError(f"--json {path} is a directory; pass a file path.")
        if path.exists() and not args.overwrite:
            raise UserError(f"--json {path} already exists; pass --overwrite to replace it or "
                            "choose another file.")


def _text(args: argparse.Namespace) -> tuple[str, str]:
    """The text to score: at most what ``--rows`` rows of ``--seq-len`` tokens need (with
    margin), so a large file is not read and tokenized whole."""
    from starquant_plugin.assets import evaluation_text
    from starquant_plugin.integrations.calibration_texts import (
        calibration_char_budget,
        read_text_file,
    )

    if not args.text:
        return evaluation_text(), "bundled held-out prose (assets.evaluation_text)"
    budget = calibration_char_budget(args.rows, args.seq_len)
    (text,) = read_text_file(args.text, max_chars=budget, what="--text")
    return text, f"text file {args.text}"


def _check_same_family(model, reference, args: argparse.Namespace) -> None:
    """Refuse a reference of another family: its greedy generations and scores are not the
    FP baseline of ``model``, so the table would compare unrelated models."""
    from starquant_plugin.models.families import family_of

    family, reference_family = family_of(model), family_of(reference)
    if family.name != reference_family.name:
        raise UserError(f"--reference {args.reference} is a {reference_family.name} model but "
                        f"{args.model} is a {family.name} model; pass the FP {family.name} "
                        "model it was quantized from as --reference.")


def score(model, rows, prompts, reference, args: argparse.Namespace) -> dict[str, float]:
    """One flat row of metrics for ``model`` (``reference`` None: no agreement column)."""
    from starquant_plugin.models.evaluation import (
        MASK_RATIOS,
        generation_agreement,
        greedy_generate,
        heldout_elbo,
        masked_token_metrics,
    )

    metrics = masked_token_metrics(model, rows, seed=args.seed, draws=args.mask_draws)
    row = {f"ce@{t}": metrics[t]["ce"] for t in MASK_RATIOS}
    row |= {f"acc@{t}": metrics[t]["acc"] for t in MASK_RATIOS}
    row["elbo"] = heldout_elbo(model, rows[:args.elbo_rows], prompt_len=args.prompt_len,
                               mc_num=args.mc_num, seed=args.seed)
    if reference is not None:
        row["gen_agreement"] = generation_agreement(greedy_generate, reference, model, prompts)
    return row


def run(args: argparse.Namespace) -> None:
    from starquant_plugin.integrations.integrity import check_saved_checkpoint
    from starquant_plugin.integrations.saving import write_text_atomic
    from starquant_plugin.models.evaluation import MASK_RATIOS, text_rows

    _check(args)
    resolve_model(args.model)  # both names checked before either model is loaded
    check_saved_checkpoint(args.model)  # the files the save wrote, unchanged (a folder only)
    if args.reference:
        resolve_model(args.reference, what="--reference")
    text, source = _text(args)
    status(f"loading {args.model} ...")
    model, tokenizer = load_model(args.model, args.dtype)
    reference = None
    if args.reference:
        status(f"loading reference {args.reference} ...")
        reference, ref_tokenizer = load_model(args.reference, args.dtype, what="--reference")
        _check_same_family(model, reference, args)
        if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UserError(f"--reference {args.reference} has a different tokenizer than "
                            f"{args.model}; compare a quantized model with its own FP model.")
    rows = text_rows(tokenizer, text, seq_len=args.seq_len, max_rows=args.rows)
    prompts = rows[:args.prompts, :16]
    start = time.time()
    results = {}
    if reference is not None:
        status(f"scoring reference {args.reference} on {len(rows)} rows ...")
        results[f"{args.reference} (reference)"] = score(reference, rows, prompts, reference,
                                                         args)
    status(f"scoring {args.model} on {len(rows)} rows ...")
    results[args.model] = score(model, rows, prompts, reference, args)
    columns = [*(f"ce@{t}" for t in MASK_RATIOS), *(f"acc@{t}" for t in MASK_RATIOS), "elbo"]
    columns += ["gen_agreement"] if reference is not None else []
    print(markdown_table(results, columns))
    print(f"\n{len(rows)} rows x {args.seq_len} tokens of {source}, {args.mask_draws} "
          f"mask draw(s) per row and ratio; ELBO on "
          f"{min(args.elbo_rows, len(rows))} rows ({args.prompt_len}-token prompt, "
          f"{args.mc_num} draws); seed {args.seed}; {time.time() - start:.0f} s.")
    if args.json:
        setup = {k: getattr(args, k) for k in ("model", "reference", "rows", "seq_len",
                                               "mask_draws", "elbo_rows", "prompt_len",
                                               "mc_num", "prompts", "seed", "dtype")}
        setup |= {"text": source, "scored_rows": len(rows)}
        write_text_atomic(args.json, json.dumps({"setup": setup, "results": results},
                                                indent=2) + "\n")
        print(f"wrote {args.json}")
