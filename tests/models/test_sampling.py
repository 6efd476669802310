"""Samplers: canvases, commit schedules, determinism and argument errors."""

from types import SimpleNamespace

import pytest
import torch

from starquant_plugin.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM
from starquant_plugin.models.sampling import TOP_K_SCORES, dream_generate, llada_generate

MASK = 49


@pytest.fixture(scope="module")
def llada():
    torch.manual_seed(0)
    return LLaDAModelLM(LLaDAConfig(
        d_model=64, n_heads=1, n_kv_heads=1, n_layers=1, mlp_hidden_size=128, vocab_size=50,
        embedding_size=50, mask_token_id=MASK, eos_token_id=1, pad_token_id=1, bos_token_id=0,
    )).eval()


@pytest.fixture(scope="module")
def dream():
    torch.manual_seed(0)
    return DreamModel(DreamConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, vocab_size=50, mask_token_id=MASK, max_window_layers=1,
        eos_token_id=1, pad_token_id=1, bos_token_id=0,
    )).eval()


def test_llada_commits_an_equal_share_per_step_block_by_block(llada):
    prompt = torch.randint(0, 40, (2, 5))
    out = llada_generate(llada, prompt, steps=8, gen_length=8, block_length=4,
                         return_canvases=True)
    assert len(out.canvases) == 8
    masks_left = [(canvas == MASK).sum(1).tolist() for canvas in out.canvases]
    assert masks_left == [[8 - i] * 2 for i in range(8)]
    for canvas in out.canvases[:4]:  # the second block stays masked while the first decodes
        assert (canvas[:, -4:] == MASK).all()
    assert torch.equal(out.sequences[:, :5], prompt)
    assert not (out.sequences == MASK).any()


def test_llada_random_remasking_and_guidance_are_seeded(llada):
    prompt = torch.randint(0, 40, (1, 5))
    kwargs = {"steps": 4, "gen_length": 8, "block_length": 8, "temperature": 1.0,
              "cfg_scale": 1.0, "remasking": "random"}
    a = llada_generate(llada, prompt, generator=torch.Generator().manual_seed(1), **kwargs)
    b = llada_generate(llada, prompt, generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert not (a.sequences == MASK).any()


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
def test_dream_reveals_all_masks(dream, alg):
    prompt = torch.randint(0, 40, (2, 5))
    out = dream_generate(dream, prompt, steps=4, gen_length=8, alg=alg, return_canvases=True,
                         generator=torch.Generator().manual_seed(0))
    left = [(canvas == MASK).sum().item() for canvas in out.canvases]
    assert left[0] == 16 and left == sorted(left, reverse=True)
    assert not (out.sequences == MASK).any()
    assert torch.equal(out.sequences[:, :5], prompt)


def test_gen_length_not_divisible_by_block_length_names_the_fix(llada):
    with pytest.raises(ValueError, match="divisible by block_length"):
        llada_generate(llada, torch.zeros(1, 3, dtype=torch.long), gen_length=10,
                       block_length=4, steps=10)
    with pytest.raises(ValueError, match="steps .* divisible"):
        llada_generate(llada, torch.zeros(1, 3, dtype=torch.long), gen_length=8,
                       block_length=4, steps=3)
    with pytest.raises(ValueError, match="alg must be one of"):
        dream_generate(llada, torch.zeros(1, 3, dtype=torch.long), alg="greedy")


class TopKStatistics:
    """``model`` behind an engine that returns top-k statistics (the vLLM denoiser's form)."""

    def __init__(self, model, top_k: int) -> None:
        self.model, self.config = model, model.config
        setattr(self, TOP_K_SCORES, top_k)

    def __call__(self, input_ids, attention_mask=None):
        top = torch.log_softmax(self.model(input_ids).logits.float(), -1).topk(
            getattr(self, TOP_K_SCORES), -1)
        return SimpleNamespace(logits=torch.cat([top.indices.float(), top.values], -1))


@pytest.mark.parametrize("family, kwargs", [
    ("llada", {"remasking": "low_confidence", "block_length": 4}),
    ("llada", {"remasking": "random", "block_length": 8}),
    ("dream", {"alg": "origin"}), ("dream", {"alg": "maskgit_plus"}),
    ("dream", {"alg": "topk_margin"})])
def test_greedy_sampling_from_top_k_statistics_gives_the_logits_tokens(llada, dream, family,
                                                                        kwargs):
    """The samplers read the top-1 id, its probability and the top-2 margin off top-k
    statistics and commit the tokens they commit from the full logits."""
    model, sampler = (llada, llada_generate) if family == "llada" else (dream, dream_generate)
    prompt = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(7))
    out = [sampler(m, prompt, steps=4, gen_length=8, generator=torch.Generator().manual_seed(0),
                   return_canvases=True, **kwargs)
           for m in (model, TopKStatistics(model, 2))]
    assert torch.equal(out[0].sequences, out[1].sequences)
    assert all(torch.equal(a, b) for a, b in zip(out[0].canvases, out[1].canvases, strict=True))


@pytest.mark.parametrize("family, kwargs, refused", [
    ("llada", {"temperature": 0.5, "block_length": 4}, "temperature > 0"),
    ("llada", {"cfg_scale": 1.0, "block_length": 4}, "cfg_scale"),
    ("dream", {"alg": "entropy"}, "alg='entropy'"), ("dream", {"alg": "topk_margin"}, "top_k=1")])
def test_settings_that_need_the_full_distribution_are_refused_on_top_k_statistics(
        llada, dream, family, kwargs, refused):
    model, sampler = (llada, llada_generate) if family == "llada" else (dream, dream_generate)
    with pytest.raises(ValueError, match="needs the full distribution") as error:
        sampler(TopKStatistics(model, 1), torch.zeros(1, 3, dtype=torch.long), steps=2,
                gen_length=4, **kwargs)
    assert refused in str(error.value) and "starquant_top_k" in str(error.value)
