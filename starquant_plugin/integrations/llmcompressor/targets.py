"""Which linears of each decoder block a block modifier's ``targets``/``ignore`` select."""

from compressed_tensors.utils import match_named_modules
from loguru import logger
from torch import nn

from starquant_plugin.models.families import DLLMFamily


def resolve_block_groups(
    model: nn.Module, family: DLLMFamily, blocks: list[nn.Module],
    targets: str | list[str] | None, ignore: list[str] | None,
) -> dict[int, tuple[tuple[str, ...], ...]]:
    """Which linear groups of each block ``targets`` minus ``ignore`` select.

    Defaults: every linear of the decoder blocks, ignoring the LM head. Raises when nothing
    matches, when a group is only partly targeted, or when a non-block linear other than
    the LM head is targeted; warns when the LM head is targeted (it stays 16 bit).
    """
    targets = [f"re:{family.block_pattern}"] if targets is None else targets
    targets = [targets] if isinstance(targets, str) else list(targets)
    ignore = [family.lm_head] if ignore is None else list(ignore)
    matched = {name for name, module in match_named_modules(model, targets, ignore)
               if isinstance(module, nn.Linear)}
    block_names = {id(module): name for name, module in model.named_modules()}
    groups: dict[int, tuple[tuple[str, ...], ...]] = {}
    for index, block in enumerate(blocks):
        prefix = block_names[id(block)]
        chosen = []
        for group in family.linear_groups:
            names = [f"{prefix}.{linear}" for linear in group]
            hits = [name for name in names if name in matched]
            if hits and len(hits) < len(names):
                raise ValueError(
                    f"targets/ignore select {hits} but not "
                    f"{sorted(set(names) - set(hits))}: these linears share one STaR "
                    "transform, so target all of them or none."
                )
            if hits:
                chosen.append(group)
            matched -= set(names)
        groups[index] = tuple(chosen)
    if family.lm_head in matched:
        logger.warning(
            f"targets {targets} match the LM head {family.lm_head!r} and ignore {ignore} does "
            f"not exclude it; STaR-Quant keeps the LM head in 16 bit, so it is left as is. "
            f"Add {family.lm_head!r} to ignore to silence this."
        )
        matched.discard(family.lm_head)
    if matched:
        raise ValueError(
            f"targets select linears outside the decoder blocks' groups: {sorted(matched)}; "
            f"STaR-Quant fits only {[list(g) for g in family.linear_groups]} inside each "
            f"{family.block_class}. Add them to ignore."
        )
    if not any(groups.values()):
        example = f"{block_names[id(blocks[0])]}.{family.linear_groups[0][0]}"
        raise ValueError(
            f"targets {targets} (ignore {ignore}) match no decoder-block "
            f"linear of {type(model).__name__}, e.g. {example!r}. Fix targets, or leave them "
            f"unset for the {family.name} default ['re:{family.block_pattern}']."
        )
    return groups
