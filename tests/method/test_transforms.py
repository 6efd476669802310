"""Fixed rotations: the per-head Hadamard and its fold into the value/output projections."""

import pytest
import torch

from starquant_plugin.method import hadamard, random_orthogonal, rotate_value_heads


def test_hadamard_is_symmetric_orthogonal_and_refuses_other_sizes():
    h = hadamard(64)
    assert torch.equal(h, h.T)
    assert torch.allclose(h @ h, torch.eye(64), atol=1e-6)
    with pytest.raises(ValueError, match="powers of two"):
        hadamard(96)


def test_random_orthogonal_is_orthogonal_and_seeded():
    a = random_orthogonal(24, torch.Generator().manual_seed(3))
    assert torch.allclose(a @ a.T, torch.eye(24), atol=1e-5)
    assert torch.equal(a, random_orthogonal(24, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2)])
def test_value_rotation_keeps_the_attention_block_output_and_spreads_a_v_outlier(heads,
                                                                                  kv_heads):
    torch.manual_seed(0)
    head_dim, d, tokens = 8, 16, 5
    v_weight = torch.randn(kv_heads * head_dim, d, dtype=torch.float64)
    v_weight[3] *= 50  # an outlier channel of V
    v_bias = torch.randn(kv_heads * head_dim, dtype=torch.float64)
    o_weight = torch.randn(d, heads * head_dim, dtype=torch.float64)
    x = torch.randn(tokens, d, dtype=torch.float64)
    probs = torch.softmax(torch.randn(heads, tokens, tokens, dtype=torch.float64), -1)

    def block(vw, vb, ow):
        v = (x @ vw.T + vb).reshape(tokens, kv_heads, head_dim).transpose(0, 1)
        v = v.repeat_interleave(heads // kv_heads, dim=0)  # query head h reads KV h // groups
        z = (probs @ v).transpose(0, 1).reshape(tokens, -1)
        return z @ ow.T, v

    y, v = block(v_weight, v_bias, o_weight)
    y_rot, v_rot = block(*rotate_value_heads(v_weight, v_bias, o_weight, head_dim))
    assert torch.allclose(y_rot, y, atol=1e-9)
    # the outlier channel's share of its head's largest entry drops once rotated
    peak = v[0].abs().amax(-1) / v[0].abs().median(-1).values
    peak_rot = v_rot[0].abs().amax(-1) / v_rot[0].abs().median(-1).values
    assert peak_rot.mean() < peak.mean() / 2
