"""The MODEL argument of every command: a local folder, a Hub id, or a bundled tiny model.

Checked before anything slow runs, so a typo fails in a second with the fix rather than as a
transformers ``OSError`` after a download attempt.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from starquant_plugin.assets import BUNDLED_MODELS as BUNDLED
from starquant_plugin.cli.errors import UserError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

DTYPES = ("bfloat16", "float32")
"""The ``--dtype`` names (torch dtypes of the same name; torch is imported by ``run`` only)."""


def resolve_model(model: str, what: str = "MODEL") -> str:
    """A local model folder (with config.json), a bundled name, or a Hub id, as a string
    transformers can load; anything else raises ``UserError`` naming the fix. A folder that an
    interrupted overwrite left missing (its previous checkpoint under ``.<name>.old-*``) is
    explained with how to restore it, not reported as a typo."""
    from starquant_plugin.integrations.output_dirs import explain_interrupted_replace

    path = Path(model).expanduser()
    explain_interrupted_replace(path)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{what} {model} is a file; pass the model's folder (the one "
                            "holding config.json).")
        if not (path / "config.json").is_file():
            raise UserError(f"{what} {model} has no config.json; pass a LLaDA or Dream model "
                            "folder (or a checkpoint written by starquant quantize).")
        return str(path)
    if model in BUNDLED:
        return str(BUNDLED[model])
    if _HUB_ID.match(model) and not model.startswith((".", "~")):
        return model
    raise UserError(
        f"{what} {model} does not exist; pass a model folder, a Hub id such as "
        f"GSAI-ML/LLaDA-8B-Base, or a bundled model ({', '.join(BUNDLED)})."
    )


def hub_offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_model(model: str, dtype: str = "float32", what: str = "MODEL"):
    """(model, tokenizer) through ``load_dllm`` (family, mask token and tokenizer checked); a
    folder without a tokenizer or an unreachable Hub id becomes one ``UserError`` line."""
    import torch

    from starquant_plugin.models.loading import load_dllm

    source = resolve_model(model, what)
    try:
        return load_dllm(source, dtype=getattr(torch, dtype))
    except OSError as error:
        reason = " ".join(str(error).split())[:300]
        if isinstance(error, FileNotFoundError) and Path(source).is_dir():
            # load_dllm's own check (no tokenizer, ...) already names the fix
            raise UserError(f"Could not load {what} {model}: {reason}") from error
        if Path(source).is_dir():
            raise UserError(f"Could not load {what} {model}: {reason} (pass a complete LLaDA "
                            "or Dream folder, or a checkpoint folder as starquant quantize "
                            "writes it).") from error
        offline = " (HF_HUB_OFFLINE is set, so only the local cache is read)" if (
            hub_offline()) else ""
        raise UserError(f"Could not load {what} {model} from the Hugging Face Hub{offline}: "
                        f"{reason}. Check the id and your network, or pass a local "
                        "folder.") from error
