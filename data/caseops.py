"""CaseOps: the bijective case transform "lossless_caps_caseops_v1" of record #1787 (ANCHORS 7.4), and the per-token
original-byte counts that its validation byte sidecar holds (ANCHORS 2.6).

The transform moves the case of ASCII letters into four private-use operator characters, so a tokenizer sees
"the", "The" and "THE" as the same lowercase word plus an operator:

    TITLE   U+E001  the next letter is uppercase and starts a word that is otherwise lowercase (or mixed, see below)
    ALLCAPS U+E002  the word (>= 2 letters) that follows is all uppercase
    CAPNEXT U+E003  the next letter, inside a mixed-case word, is uppercase
    ESC     U+E004  the next character is a literal U+E001..U+E004 of the input

Per maximal run of ASCII letters [A-Za-z]: all lowercase -> unchanged; all uppercase with >= 2 letters -> ALLCAPS +
lowercased run; first letter uppercase and the rest lowercase -> TITLE + lowercased run; any other mix -> (TITLE if
the first letter is uppercase) + its first letter lowercased, then each later letter lowercased with a CAPNEXT
before it when it was uppercase. Everything else, non-ASCII letters included, is left as it is.

    "The NASA Launch" -> TITLE "the" " " ALLCAPS "nasa" " " TITLE "launch"
    "iPhone" -> "i" CAPNEXT "phone";  "McDonald" -> TITLE "mc" CAPNEXT "donald"

caseops_decode is the exact inverse and accepts only what caseops_encode can produce (CaseOpsError otherwise).
Training never needs the transform: it reads token shards, and val_bpb reads the byte sidecar. Only data building
(data/build_shards.py --caseops) and the tests use this module.
"""
from __future__ import annotations

import re

import numpy as np

TRANSFORM_NAME = "lossless_caps_caseops_v1"
TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)

# A letter run that holds at least one uppercase letter, matched from the run's start only (the lookbehind), so the
# scan stays linear; or a literal operator character of the input, which gets escaped.
_NEEDS_MARKING = re.compile(r"(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*|[\ue001-\ue004]")


class CaseOpsError(ValueError):
    """Text that caseops_encode cannot have produced."""


def _mark_run(match: re.Match) -> str:
    run = match.group()
    if run in OPERATORS:
        return ESC + run
    low = run.lower()
    if len(run) >= 2 and run.isupper():
        return ALLCAPS + low
    if run[0].isupper() and (len(run) == 1 or run[1:].islower()):
        return TITLE + low
    out = [TITLE + low[0] if run[0].isupper() else low[0]]
    out += [CAPNEXT + c.lower() if c.isupper() else c for c in run[1:]]
    return "".join(out)


def caseops_encode(text: str) -> str:
    """The CaseOps transform of text (see the module doc)."""
    return _NEEDS_MARKING.sub(_mark_run, text)


def _is_ascii_letter(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z")


def caseops_decode(text: str) -> str:
    """The original text of a CaseOps-encoded string. Raises CaseOpsError, naming the position, on a misplaced
    operator (TITLE/ALLCAPS inside a word or not before a lowercase letter, CAPNEXT not inside a word, ESC not before
    an operator), an uppercase ASCII letter, or any other string that caseops_encode would not write."""
    out: list[str] = []
    prev_letter = False  # the last character written is an ASCII letter, i.e. we are inside a word
    i, n = 0, len(text)

    def fail(why: str):
        raise CaseOpsError(f"malformed CaseOps text at character {i} ({text[max(0, i - 10):i + 10]!r}): {why}")

    while i < n:
        c = text[i]
        if c == ESC:
            if i + 1 >= n or text[i + 1] not in OPERATORS:
                fail("ESC (U+E004) must be followed by one of U+E001..U+E004")
            out.append(text[i + 1])
            prev_letter = False
            i += 2
        elif c in (TITLE, ALLCAPS):
            name = "TITLE" if c == TITLE else "ALLCAPS"
            if prev_letter:
                fail(f"{name} inside a word (it only starts one)")
            end = i + 1
            while end < n and "a" <= text[end] <= "z":
                end += 1
            if end == i + 1:
                fail(f"{name} must be followed by a lowercase ASCII letter")
            if c == ALLCAPS:
                if end - i - 1 < 2:
                    fail("ALLCAPS needs a word of at least 2 letters (one capital letter is TITLE)")
                if end < n and (text[end] == CAPNEXT or _is_ascii_letter(text[end])):
                    fail("an ALLCAPS word continues with another marker or letter")
                out.append(text[i + 1:end].upper())
                i = end
            else:
                out.append(text[i + 1].upper())
                i += 2
            prev_letter = True
        elif c == CAPNEXT:
            if not prev_letter:
                fail("CAPNEXT (U+E003) must follow a letter of the same word")
            if i + 1 >= n or not "a" <= text[i + 1] <= "z":
                fail("CAPNEXT (U+E003) must be followed by a lowercase ASCII letter")
            out.append(text[i + 1].upper())
            i += 2
        elif "A" <= c <= "Z":
            fail("uppercase ASCII letter (encoded text has only lowercase ones)")
        else:
            out.append(c)
            prev_letter = "a" <= c <= "z"
            i += 1
    decoded = "".join(out)
    # The checks above catch misplaced markers; what remains is markers in the wrong form for their word (e.g. TITLE
    # "x" CAPNEXT "y" for "XY", which is ALLCAPS "xy"). Re-encoding rejects exactly those.
    canonical = caseops_encode(decoded)
    if canonical != text:
        i = next((k for k, (a, b) in enumerate(zip(canonical, text)) if a != b), min(n, len(canonical)))
        fail("markers not in the canonical form caseops_encode writes")
    return decoded


# ---------------------------------------------------------------------------------------------------------------
# Byte sidecar: original-text bytes per token (ANCHORS 2.6)
# ---------------------------------------------------------------------------------------------------------------

class SidecarTables:
    """Per-token-id tables that give each token of a CaseOps stream the bytes of the ORIGINAL text it stands for.

    Built from the piece surfaces with the standard rule of ANCHORS 2.1 (train_gpt.build_byte_tables: a piece's
    UTF-8 length without its leading U+2581, that space worth 1 byte except right after BOS, byte pieces 1, control
    pieces 0), changed only where the transform adds characters: operator pieces are worth 0, except an operator
    that ESC escapes, which is a literal character of the input (3 UTF-8 bytes). A letter is 1 byte in either case,
    so lowercasing changes nothing. Hence the total over a document is the standard accounting's total for the same
    text, i.e. the UTF-8 length of the text after the tokenizer's normalization (collapsed whitespace, NFKC).
    """

    def __init__(self, sp):
        import train_gpt  # the accounting rule itself lives there; imported late so the transform needs no torch

        base, leading, boundary = train_gpt.build_byte_tables(sp, sp.get_piece_size())
        self.operator_ids = list(train_gpt.caseops_operator_ids(sp))
        if len(self.operator_ids) != len(OPERATORS):
            raise ValueError(f"tokenizer has {len(self.operator_ids)} of the 4 CaseOps operator pieces "
                             "U+E001..U+E004 as pieces; it is not a CaseOps tokenizer")
        self.base = base.astype(np.int32)
        self.base[self.operator_ids] = 0
        self.leading, self.boundary = leading, boundary
        self.esc_id = sp.piece_to_id(ESC)
        self.literal_bytes = len(ESC.encode("utf-8"))  # what an escaped operator character was in the input

    def counts(self, tokens: np.ndarray) -> np.ndarray:
        """Original bytes per position of a token stream made of whole documents, each starting with BOS."""
        tokens = np.asarray(tokens, dtype=np.int64)
        counts = self.base[tokens].copy()
        if len(tokens) > 1:
            counts[1:] += self.leading[tokens[1:]] & ~self.boundary[tokens[:-1]]
        self._count_escapes(tokens, counts)
        return counts

    def _count_escapes(self, tokens: np.ndarray, counts: np.ndarray) -> None:
        # Escapes are rare (the input must contain U+E001..U+E004), so a plain loop over ESC runs is fine. In a run of
        # ESC tokens the 1st, 3rd, ... escape the token after them: the 2nd, 4th, ... are literal ESC characters, and
        # after an odd-length run the following operator is a literal one.
        esc = np.flatnonzero(tokens == self.esc_id)
        k = 0
        while k < len(esc):
            start = esc[k]
            while k + 1 < len(esc) and esc[k + 1] == esc[k] + 1:
                k += 1
            end = esc[k] + 1  # one past the run
            counts[start + 1:end:2] = self.literal_bytes
            if (end - start) % 2 and end < len(tokens) and tokens[end] in self.operator_ids:
                counts[end] = self.literal_bytes
            k += 1
