"""Files shipped with the package: the tiny trained DLLMs and held-out evaluation text.

See ``assets/README.md`` for provenance and the data licence.
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
TINY_LLADA = ASSETS_DIR / "tiny-llada"
TINY_DREAM = ASSETS_DIR / "tiny-dream"
TINY_MODELS = {"llada": TINY_LLADA, "dream": TINY_DREAM}


CALIBRATION_FRACTION = 0.3


def heldout_text() -> str:
    """Held-out English Wikipedia prose (never seen in training), CC BY-SA."""
    return (ASSETS_DIR / "heldout.txt").read_text(encoding="utf-8")


def _split_point(text: str) -> int:
    return text.index("\n", int(len(text) * CALIBRATION_FRACTION)) + 1


def calibration_text() -> str:
    """The first 30% of the held-out prose: what quantization calibrates on."""
    text = heldout_text()
    return text[: _split_point(text)]


def evaluation_text() -> str:
    """The rest of the held-out prose: what quality is measured on, disjoint from
    calibration."""
    text = heldout_text()
    return text[_split_point(text) :]
