"""K/V folds keep the FP block's function and do what they are for: key smoothing flattens K's
outlier channels into Q, equal on each RoPE pair, for both families (Dream: grouped queries)."""

import pytest
import torch

from starquant_plugin.kv_folding import smooth_keys_
from starquant_plugin.models.families import decoder_blocks, family_of
from starquant_plugin.models.outlier_family import rescale_key_channel_
from starquant_plugin.models.outliers import capture_activations
from tests.models.tiny import MASK_ID, tiny_dream, tiny_llada


def rows(seed: int = 0) -> torch.LongTensor:
    ids = torch.randint(2, 60, (4, 24), generator=torch.Generator().manual_seed(seed))
    return ids.masked_fill(ids % 3 == 0, MASK_ID)


@pytest.mark.parametrize("make", [tiny_llada, tiny_dream])
def test_key_smoothing_keeps_the_logits_and_flattens_a_key_outlier(make):
    model, reference = make(), make()
    family = family_of(model)
    block = decoder_blocks(model, family)[0]
    head_dim = block.get_submodule(family.attention_module).head_dim
    rescale_key_channel_(block, family, channel=3, log2_factor=6, head_dim=head_dim)
    key = block.get_submodule(family.query_key[1])
    before = capture_activations(model, rows(), {0: (key, "output")})[0].abs().amax(0)
    x = capture_activations(model, rows(), {0: (block.get_submodule(family.query_key[0]),
                                                "input")})[0]
    scales = smooth_keys_(block, family, x, alpha=1.0)
    after = capture_activations(model, rows(), {0: (key, "output")})[0].abs().amax(0)
    pairs = scales.reshape(-1, 2, head_dim // 2)
    assert torch.equal(pairs[:, 0], pairs[:, 1])  # commutes with RoPE
    assert before.max() / before.median() > 20 > after.max() / after.median()
    with torch.no_grad():
        torch.testing.assert_close(model(rows(1)).logits, reference(rows(1)).logits,
                                   atol=1e-4, rtol=1e-4)
