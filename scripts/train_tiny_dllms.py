"""Train the bundled tiny LLaDA- and Dream-architecture models (deterministic, CPU).

Data: the shortened English Wikipedia dump shipped inside the gensim 4.4.0 wheel
(``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``),
read with ``zipfile``; Wikipedia text is CC BY-SA (see ``starquant_plugin/assets/README.md``).
Articles are split 95/5 into train / held-out by position; the held-out prose is written to
``starquant_plugin/assets/heldout.txt`` for evaluation.

Objective: LLaDA's masked diffusion loss. Per row, t ~ U(0, 1), each token is masked with
probability p = (1 - eps) t + eps, loss = sum of CE on masked tokens / p / (rows * seq).

    pip download gensim==4.4.0 --no-deps -d wheels
    python scripts/train_tiny_dllms.py --wheel wheels/gensim-4.4.0-*.whl --family dream \
        --steps 2000
    python scripts/train_tiny_dllms.py --wheel wheels/gensim-4.4.0-*.whl --family llada \
        --steps 800 --lr 1e-3 --init-from-dream starquant_plugin/assets/tiny-dream

The LLaDA is warm-started from the trained Dream (see ``warm_start_from_dream`` for why).

Each run takes 40-60 minutes on one CPU thread. Never run in CI.
"""

import argparse
import bz2
import html
import json
import math
import re
import time
import zipfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from starquant_plugin.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM
from starquant_plugin.models.families import token_logits

ASSETS = Path(__file__).resolve().parents[1] / "starquant_plugin" / "assets"
WIKI_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
SPECIAL_TOKENS = {"eos": "<|endoftext|>", "bos": "<|startoftext|>", "mask": "<|mdm_mask|>"}
VOCAB_SIZE = 2048
SEQ_LEN = 128
HELDOUT_FRACTION = 0.05
HELDOUT_MAX_CHARS = 120_000
EPS = 1e-3


def clean_wikitext(markup: str) -> str:
    """Wiki markup -> plain prose paragraphs (crude, but enough for a tiny LM)."""
    text = html.unescape(markup)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    for _ in range(5):  # nested templates and tables, innermost first
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
        text = re.sub(r"\{\|[^{}]*?\|\}", "", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    paragraphs = []
    for line in text.split("\n"):
        line = re.sub(r"\s+", " ", line).strip()
        if len(line) > 80 and line[0] not in "|{}!*#:=;[" and "http" not in line:
            paragraphs.append(line)
    return "\n".join(paragraphs)


def read_articles(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        dump = bz2.decompress(archive.read(WIKI_MEMBER)).decode("utf-8")
    pages = re.findall(r"<text[^>]*>(.*?)</text>", dump, flags=re.S)
    articles = [clean_wikitext(page) for page in pages if "#REDIRECT" not in page[:20]]
    return [article for article in articles if len(article) > 500]


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["eos"],
        bos_token=SPECIAL_TOKENS["bos"],
        mask_token=SPECIAL_TOKENS["mask"],
        model_max_length=SEQ_LEN * 8,
    )


def build_model(family: str, tokenizer: PreTrainedTokenizerFast):
    ids = {
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "mask_token_id": tokenizer.mask_token_id,
    }
    if family == "llada":
        config = LLaDAConfig(
            d_model=256, n_heads=4, n_kv_heads=4, n_layers=4, mlp_hidden_size=768,
            max_sequence_length=1024, rope_theta=10000.0, embedding_size=len(tokenizer), **ids,
        )
        config.auto_map = {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        }
        return LLaDAModelLM(config)
    config = DreamConfig(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0,
        max_window_layers=4, **ids,
    )
    config.auto_map = {
        "AutoConfig": "configuration_dream.DreamConfig",
        "AutoModel": "modeling_dream.DreamModel",
    }
    return DreamModel(config)


def warm_start_from_dream(model, dream_dir: Path) -> None:
    """Copy a trained tiny Dream's weights into the same-width LLaDA: names mapped, K/V heads
    repeated to LLaDA's full multi-head attention, Dream's q/k/v biases dropped (LLaDA has
    none). The LLaDA objective then has to re-learn the unshifted prediction.

    Why: trained from scratch, the bias-free 4-layer LLaDA sat at the unigram loss (train loss
    ~6.5) for 950 steps at lr 2e-3, and for 150-350 steps each at lr 4e-3, with a common
    direction added to all embeddings at init, and with larger q/k init. Dream escapes early
    because its shifted logits let an unmasked token at i - 1 predict token i without
    attention (a bigram), which bootstraps attention.
    """
    dream = DreamModel.from_pretrained(dream_dir, dtype=torch.float32)
    source = dream.state_dict()
    heads, kv_heads = model.config.n_heads, dream.config.num_key_value_heads
    head_dim = model.config.head_dim

    def repeat_kv(weight: torch.Tensor) -> torch.Tensor:
        per_head = weight.view(kv_heads, head_dim, -1)
        return per_head.repeat_interleave(heads // kv_heads, dim=0).reshape(heads * head_dim, -1)

    target = {
        "model.transformer.wte.weight": source["model.embed_tokens.weight"],
        "model.transformer.ln_f.weight": source["model.norm.weight"],
        "model.transformer.ff_out.weight": source["lm_head.weight"],
    }
    for n in range(model.config.n_layers):
        d, q = f"model.layers.{n}.", f"model.transformer.blocks.{n}."
        target |= {
            q + "attn_norm.weight": source[d + "input_layernorm.weight"],
            q + "ff_norm.weight": source[d + "post_attention_layernorm.weight"],
            q + "q_proj.weight": source[d + "self_attn.q_proj.weight"],
            q + "k_proj.weight": repeat_kv(source[d + "self_attn.k_proj.weight"]),
            q + "v_proj.weight": repeat_kv(source[d + "self_attn.v_proj.weight"]),
            q + "attn_out.weight": source[d + "self_attn.o_proj.weight"],
            q + "ff_proj.weight": source[d + "mlp.gate_proj.weight"],
            q + "up_proj.weight": source[d + "mlp.up_proj.weight"],
            q + "ff_out.weight": source[d + "mlp.down_proj.weight"],
        }
    model.load_state_dict(target, strict=True)


def masked_diffusion_loss(model, rows: torch.Tensor, mask_id: int, generator) -> torch.Tensor:
    t = torch.rand(rows.shape[0], 1, generator=generator)
    p_mask = (1 - EPS) * t + EPS
    masked = torch.rand(rows.shape, generator=generator) < p_mask
    noisy = torch.where(masked, torch.full_like(rows, mask_id), rows)
    logits = token_logits(model, noisy)
    ce = torch.nn.functional.cross_entropy(
        logits[masked], rows[masked], reduction="none"
    ) / p_mask.expand_as(rows)[masked]
    return ce.sum() / rows.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheel", type=Path, required=True)
    parser.add_argument("--family", choices=["llada", "dream"], required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--init-from-dream", type=Path,
                        help="warm-start LLaDA from a trained tiny Dream directory")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    articles = read_articles(args.wheel)
    n_heldout = max(1, int(len(articles) * HELDOUT_FRACTION))
    train_articles, heldout_articles = articles[:-n_heldout], articles[-n_heldout:]
    (ASSETS / "heldout.txt").write_text("\n".join(heldout_articles)[:HELDOUT_MAX_CHARS])
    tokenizer = train_tokenizer(train_articles)
    stream = []
    for article in train_articles:
        stream.extend(tokenizer(article)["input_ids"] + [tokenizer.eos_token_id])
    n_rows = len(stream) // SEQ_LEN
    data = torch.tensor(stream[: n_rows * SEQ_LEN]).view(n_rows, SEQ_LEN)
    print(f"{len(articles)} articles, {len(stream)} training tokens, {n_rows} rows")

    model = build_model(args.family, tokenizer)
    if args.init_from_dream is not None:
        if args.family != "llada":
            raise ValueError("--init-from-dream applies to --family llada only.")
        if AutoTokenizer.from_pretrained(args.init_from_dream).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"{args.init_from_dream} was trained with another tokenizer.")
        warm_start_from_dream(model, args.init_from_dream)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1
    )
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup)
        * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))),
    )
    generator = torch.Generator().manual_seed(args.seed)
    mask_id = tokenizer.mask_token_id
    start, recent = time.time(), []
    for step in range(args.steps):
        batch = data[torch.randint(0, n_rows, (args.batch_size,), generator=generator)]
        loss = masked_diffusion_loss(model, batch, mask_id, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        recent = (recent + [loss.item()])[-100:]
        if step % 50 == 0 or step == args.steps - 1:
            elapsed = time.time() - start
            print(f"step {step} loss {sum(recent) / len(recent):.4f} {elapsed:.0f}s", flush=True)

    out = ASSETS / f"tiny-{args.family}"
    model.eval()
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    provenance = {
        "script": "scripts/train_tiny_dllms.py",
        "command": f"--family {args.family} --steps {args.steps} --batch-size {args.batch_size} "
        f"--lr {args.lr} --seed {args.seed} --threads {args.threads}"
        + (f" --init-from-dream {args.init_from_dream}" if args.init_from_dream else ""),
        "data": f"gensim-4.4.0 wheel: {WIKI_MEMBER} (English Wikipedia, CC BY-SA)",
        "articles": {"train": len(train_articles), "heldout": len(heldout_articles)},
        "training_tokens": len(stream),
        "seq_len": SEQ_LEN,
        "tokenizer": f"byte-level BPE, vocab {len(tokenizer)}, special {SPECIAL_TOKENS}",
        "objective": "masked diffusion (LLaDA), p = (1 - 1e-3) t + 1e-3",
        "final_train_loss_last100": sum(recent) / len(recent),
        "train_seconds": round(time.time() - start),
        "saved_dtype": "bfloat16",
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(json.dumps(provenance, indent=2))


if __name__ == "__main__":
    main()
