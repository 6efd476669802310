"""How ``starquant_cloze.jsonl`` was made (run once; the file is committed): cloze items from
the bundled held-out prose, which the tiny models never saw in training.

Each item: ``context`` = the first 8-16 words of a sentence, ``continuation`` = its next word
(LAMBADA-style), ``choices`` = that word and three words drawn from other sentences,
``answer`` = the index of the true one.
"""

import json
import random
import re
from pathlib import Path

from starquant_plugin.assets import evaluation_text

ITEMS = 24


def make_items(seed: int = 0) -> list[dict]:
    generator = random.Random(seed)
    sentences = [s.split() for s in re.split(r"(?<=[.!?])\s+", evaluation_text())]
    sentences = [s for s in sentences if len(s) >= 20 and all(w.isascii() for w in s)]
    vocabulary = sorted({w for s in sentences for w in s if w.isalpha() and len(w) > 3})
    items = []
    for words in generator.sample(sentences, ITEMS):
        cut = generator.randint(8, 16)
        answer = words[cut]
        distractors = generator.sample([w for w in vocabulary if w != answer], 3)
        choices = [answer, *distractors]
        generator.shuffle(choices)
        items.append({"context": " ".join(words[:cut]),
                      "continuation": " " + answer,
                      "choices": [" " + choice for choice in choices],
                      "answer": choices.index(answer)})
    return items


if __name__ == "__main__":
    path = Path(__file__).with_name("starquant_cloze.jsonl")
    path.write_text("".join(json.dumps(item) + "\n" for item in make_items()))
