"""Which candidate a search returns: the selection rules and the answers they vote on.

A selection rule maps one prompt's candidate scores (and, for the voting rules, their answers) to the index of the
candidate returned: [`select_sprm`] (the paper's argmax), [`select_sprm_vote`] (answers weighted by SPRM score) and
[`select_majority`] (self-consistency). Every ranking in the search compares scores through [`rankable_scores`].
Answers are read from decoded completions by an extractor, by default [`extract_boxed_answer`].

This file is part of the remote-code set copied into saved checkpoints: it imports only ``torch``; math-verify (for
the default answer extractor) is imported lazily.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

AnswerExtractor = Callable[[str], Hashable | None]
"""Maps a decoded completion to a hashable answer key (equal keys vote together), or ``None`` when it has none."""

SelectionStrategy = Callable[[torch.Tensor, Sequence[Hashable | None] | None], int]
"""``(scores [N], answers or None) -> index`` of the chosen candidate of one prompt."""


def last_boxed_content(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, braces balanced; ``None`` if absent."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    start = starts[-1]
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
    return None  # unbalanced: the completion was cut inside the box


def extract_boxed_answer(text: str) -> str | None:
    r"""Default answer extractor: the last ``\boxed{...}``, normalised with math-verify.

    The content is parsed by ``math_verify.parse`` and keyed by its sympy form, so ``\frac{1}{2}``, ``1/2`` and
    ``0.5`` vote together; content math-verify cannot parse is keyed by its stripped text. ``None`` when the text
    has no complete ``\boxed{}``.

    Raises:
        ImportError: math-verify is not installed (``pip install "math-verify[antlr4_13_2]"``).
    """
    content = last_boxed_content(text)
    if content is None:
        return None
    try:  # lazy, and inside `try` so transformers' remote-code import check does not require it
        from math_verify import LatexExtractionConfig, parse
    except ImportError as error:
        raise ImportError(
            "The default Best-of-N answer extractor needs math-verify: `pip install 'math-verify[antlr4_13_2]'`, "
            "or pass your own `answer_extractor=` (a function str -> hashable answer or None)."
        ) from error
    parsed = parse("\\boxed{" + content + "}", extraction_config=[LatexExtractionConfig(boxed_match_priority=0)])
    return str(parsed[0]) if parsed else content


def rankable_scores(scores: torch.Tensor) -> torch.Tensor:
    """Scores as every ranking in this package compares them: float64, NaN (non-finite features, see
    ``score_trajectories``) ranking last, below every real score."""
    scores = scores.detach().double()  # float64: scores just below 1.0 must not tie
    return scores.masked_fill(scores.isnan(), float("-inf"))


def select_sprm(scores: torch.Tensor, answers: Sequence[Hashable | None] | None = None) -> int:
    """The paper's rule: the candidate with the highest SPRM trajectory score (first one on ties; NaN ranks last)."""
    return int(torch.argmax(rankable_scores(scores)))


def select_sprm_vote(scores: torch.Tensor, answers: Sequence[Hashable | None] | None) -> int:
    """SPRM-weighted vote: each answer collects the sum of its candidates' scores; the best-scored candidate of the
    heaviest answer wins (ties: the answer whose best candidate scores higher, then the first seen). Candidates
    without an answer do not vote, a NaN score weighs 0; if no candidate has an answer, falls back to
    [`select_sprm`]."""
    if answers is None:
        raise ValueError("`select_sprm_vote` needs the candidates' answers.")
    scores = rankable_scores(scores)
    weights: dict[Hashable, float] = {}
    best: dict[Hashable, int] = {}
    for j, answer in enumerate(answers):
        if answer is None:
            continue
        weights[answer] = weights.get(answer, 0.0) + max(float(scores[j]), 0.0)  # a NaN score weighs nothing
        if answer not in best or scores[j] > scores[best[answer]]:
            best[answer] = j
    if not weights:
        return select_sprm(scores)
    winner = max(weights, key=lambda a: (weights[a], float(scores[best[a]])))  # max keeps the first on full ties
    return best[winner]


def select_majority(scores: torch.Tensor, answers: Sequence[Hashable | None] | None) -> int:
    """Plain majority vote (self-consistency), SPRM scores unused: the first candidate of the most frequent answer
    (ties: the answer seen first). Candidates without an answer do not vote; if none has one, returns 0."""
    if answers is None:
        raise ValueError("`select_majority` needs the candidates' answers.")
    counts: dict[Hashable, int] = {}
    first: dict[Hashable, int] = {}
    for j, answer in enumerate(answers):
        if answer is None:
            continue
        counts[answer] = counts.get(answer, 0) + 1
        first.setdefault(answer, j)
    if not counts:
        return 0
    return first[max(counts, key=counts.__getitem__)]


SELECTION_STRATEGIES: dict[str, SelectionStrategy] = {
    "sprm": select_sprm,
    "sprm_vote": select_sprm_vote,
    "majority": select_majority,
}
_STRATEGIES_NEEDING_ANSWERS = {"sprm_vote", "majority"}


def resolve_selection(selection: str | SelectionStrategy) -> tuple[SelectionStrategy, bool]:
    """(strategy, whether it needs answers); a callable gets answers when a tokenizer is available."""
    if callable(selection):
        return selection, False
    if selection not in SELECTION_STRATEGIES:
        raise ValueError(
            f"Unknown `selection`={selection!r}; valid: {sorted(SELECTION_STRATEGIES)} or a callable "
            "(scores [N], answers) -> index."
        )
    return SELECTION_STRATEGIES[selection], selection in _STRATEGIES_NEEDING_ANSWERS


def decode_answers(
    tokenizer: Any, sequences: torch.Tensor, mask: torch.Tensor, prompt_length: int, extractor: AnswerExtractor
) -> list[Hashable | None]:
    """The answer of each row's completion (its real tokens after the prompt's ``prompt_length`` columns)."""
    answers = []
    for row, row_mask in zip(sequences, mask):
        completion = row[prompt_length:][row_mask[prompt_length:].bool()]
        answers.append(extractor(tokenizer.decode(completion.tolist(), skip_special_tokens=True)))
    return answers


__all__ = [
    "SELECTION_STRATEGIES",
    "AnswerExtractor",
    "SelectionStrategy",
    "decode_answers",
    "extract_boxed_answer",
    "last_boxed_content",
    "rankable_scores",
    "resolve_selection",
    "select_majority",
    "select_sprm",
    "select_sprm_vote",
]
