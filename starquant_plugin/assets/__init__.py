"""Files shipped with the package: the tiny trained DLLMs and held-out evaluation text.

See ``assets/README.md`` for provenance and the data licence.
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
TINY_LLADA = ASSETS_DIR / "tiny-llada"
TINY_DREAM = ASSETS_DIR / "tiny-dream"
TINY_MODELS = {"llada": TINY_LLADA, "dream": TINY_DREAM}


def heldout_text() -> str:
    """Held-out English Wikipedia prose (never seen in training), CC BY-SA."""
    return (ASSETS_DIR / "heldout.txt").read_text(encoding="utf-8")
