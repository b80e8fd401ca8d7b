"""What a task's targets must satisfy before anything is trained on them.

A typo in a label column (`tumor` on some slides, `tumour` on others) silently becomes a third class, and a task
with one class (or a survival task without events) trains to a perfect, meaningless score. These checks refuse both
in one line naming the values and slides, before the splits are made.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import pandas as pd

from ..errors import TrainingDataError

# a token whose one-letter change names another class, not a typo: roman numerals (stage I / stage II)
ROMAN = re.compile(r"^[ivxlcdm]+$")
SIGNIFICANT = set("0123456789+-")  # HER2+ / HER2-, G1 / G2, pT1 / pT2
MIN_TYPO_LENGTH = 5  # below this one edit is usually another class (MSI / MSS, IDC / ILC)


def normalised(value: str) -> str:
    """Case, accents and runs of whitespace removed: `Tumour ` and `tumour` are one value."""
    text = unicodedata.normalize("NFKD", value)
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(text.casefold().split())


def one_edit_apart(a: str, b: str) -> tuple[int, str, str] | None:
    """Where `a` and `b` differ by exactly one insertion, deletion or substitution: (position, a's char, b's char)
    with '' for the missing side; None otherwise."""
    if a == b or abs(len(a) - len(b)) > 1:
        return None
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    if len(a) == len(b):
        return (i, a[i], b[i]) if a[i + 1 :] == b[i + 1 :] else None
    longer, shorter = (a, b) if len(a) > len(b) else (b, a)
    if longer[i + 1 :] != shorter[i:]:
        return None
    return (i, a[i], "") if longer is a else (i, "", b[i])


def _token_at(text: str, pos: int) -> str:
    start = text.rfind(" ", 0, pos) + 1
    end = text.find(" ", pos)
    return text[start : end if end >= 0 else len(text)]


def looks_like_typo(a: str, b: str) -> bool:
    """Two label values that are probably one class written two ways: equal but for case, whitespace or accents, or
    one letter apart in a word (tumor / tumour), unless the letter names the class (a digit or sign, a roman
    numeral, a word's last letter as in LumA / LumB or MSI-H / MSI-L) or the values are short."""
    na, nb = normalised(a), normalised(b)
    if na == nb:
        return True
    edit = one_edit_apart(na, nb)
    if edit is None or min(len(na), len(nb)) < MIN_TYPO_LENGTH:
        return False
    pos, ca, cb = edit
    if {ca, cb} & SIGNIFICANT or not (ca + cb).isalpha():
        return False
    if ROMAN.match(_token_at(na, pos)) and ROMAN.match(_token_at(nb, pos)):  # stage I / stage II
        return False
    word_end = pos + 1 >= len(na) or not na[pos + 1].isalnum()
    return not (ca and cb and word_end)  # a word's last letter replaced names a subtype: LumA / LumB


def label_counts(values: pd.Series) -> str:
    """`tumour: 12, normal: 30` (most frequent first): what a job prints before training."""
    counts = values.value_counts()
    return ", ".join(f"{k}: {int(v)}" for k, v in counts.items())


def refuse_label_typos(values: pd.Series, slides: pd.Series, column: str, task: str, where: str) -> None:
    """One line naming every pair of label values that look like one class spelled twice, with their slides."""
    distinct = sorted(values.unique())
    pairs = [(a, b) for i, a in enumerate(distinct) for b in distinct[i + 1 :] if looks_like_typo(a, b)]
    if not pairs:
        return
    shown = []
    for a, b in pairs[:5]:
        ids = {v: slides[values == v].tolist() for v in (a, b)}
        rare = min((a, b), key=lambda v: len(ids[v]))
        listed = ", ".join(ids[rare][:10]) + (" ..." if len(ids[rare]) > 10 else "")
        shown.append(f"{a!r} ({len(ids[a])} slides) vs {b!r} ({len(ids[b])}; {rare!r} on {listed})")
    raise TrainingDataError(
        f"{where}: task {task!r} column {column!r} has values that look like one class written two ways: "
        + "; ".join(shown)
        + f"; fix the sheet, or list the task's `classes:` to keep them apart (counts: {label_counts(values)})"
    )


def refuse_one_class(classes_present: Sequence[str], task: str, where: str, column: str) -> None:
    if len(set(classes_present)) < 2:
        found = ", ".join(map(repr, sorted(set(classes_present)))) or "none"
        raise TrainingDataError(
            f"{where}: task {task!r} needs at least two classes in column {column!r} among the patients with "
            f"features; found {found}; add patients of another class or drop the task"
        )


def refuse_no_events(n_events: int, n_patients: int, task: str, where: str, column: str) -> None:
    if n_events == 0:
        raise TrainingDataError(
            f"{where}: survival task {task!r} has no events (column {column!r} is 0 for all {n_patients} patients "
            "with features); a C-index needs observed events: add them or drop the task"
        )
