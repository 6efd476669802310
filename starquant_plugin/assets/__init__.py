"""Files shipped with the package: the tiny trained DLLMs and held-out evaluation text.

See ``assets/README.md`` for provenance and the data licence.
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
TINY_LLADA = ASSETS_DIR / "tiny-llada"
TINY_DREAM = ASSETS_DIR / "tiny-dream"
TINY_MODELS = {"llada": TINY_LLADA, "dream": TINY_DREAM}
BUNDLED_MODELS = {f"tiny-{family}": path for family, path in TINY_MODELS.items()}
"""The names the command line and the lm-eval model accept for the bundled models."""


def resolve_bundled(model: str | Path) -> str | Path:
    """``tiny-llada``/``tiny-dream`` -> the bundled folder, unless a path of that name exists;
    anything else unchanged."""
    if str(model) in BUNDLED_MODELS and not Path(model).exists():
        return BUNDLED_MODELS[str(model)]
    return model


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
