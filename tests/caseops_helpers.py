"""Shared pieces of the CaseOps tests: synthetic documents that exercise the transform, and tiny tokenizers."""
from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import caseops  # noqa: E402
import train_gpt as tg  # noqa: E402

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she all one there been their has would more will we when who no if out so said what up "
         "its about into than them can only other new some could time these two may then do first any my now nasa "
         "launch monday iphone mcdonald").split()


def synthetic_doc(rng: random.Random) -> str:
    """Raw-ish text: words in every case pattern, digits, punctuation, non-ASCII (some of it NFKC-folded: fullwidth
    letters, a ligature, a combining accent), emoji, paragraph breaks, runs of spaces, leading/trailing whitespace,
    and now and then a literal operator character."""
    out = []
    for _ in range(rng.randint(3, 40)):
        w = rng.choice(WORDS)
        r = rng.random()
        w = (w.capitalize() if r < 0.25 else w.upper() if r < 0.35 else
             "".join(c.upper() if rng.random() < 0.4 else c for c in w) if r < 0.45 else w)
        if rng.random() < 0.1:
            w += rng.choice([str(rng.randint(0, 9999)), ",", ".", "'s", "-" + rng.choice(WORDS).upper()])
        if rng.random() < 0.05:
            w = rng.choice(["caf\u00e9", "Stra\u00dfe", "\u03a3\u03bf\u03c6\u03af\u03b1", "\u4e2d\u6587",
                            "\U0001f600", "\uff21\uff22", "\ufb01ne", "E\u0301t\u00e9"]) + w
        if rng.random() < 0.01:
            w = rng.choice(caseops.OPERATORS) + w
        out.append(w)
        out.append(rng.choice([" "] * 12 + ["  ", "\n\n", " \n", "\t"]))
    return rng.choice(["", " ", "\n"]) + "".join(out)


def train_tiny_tokenizers(root: Path, vocab: int, n_docs: int = 600) -> dict:
    """A CaseOps tokenizer (the recipe plus the four operators as user-defined symbols, trained on transformed
    text, as #1787's) and a standard one, both from the same synthetic documents."""
    rng = random.Random(0)
    docs = [synthetic_doc(rng) for _ in range(n_docs)]
    plain = tg.train_sentencepiece(docs, str(root / "plain"), vocab, num_threads=1)
    cased = tg.train_sentencepiece([caseops.caseops_encode(d) for d in docs], str(root / "caseops"), vocab,
                                   num_threads=1, user_defined_symbols=list(caseops.OPERATORS))
    return {"plain": plain, "caseops": cased}
