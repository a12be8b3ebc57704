"""A slow, obvious beam search and DVTS over steps, for tests only: every beam decoded alone.

Written from the strategies' definitions (search-and-learn's: beam search keeps the N/M best beams of a round and
gives each M children; DVTS runs N/M subtrees, each expanded M ways and continued with its best child), with none
of the engine's machinery: no batch, no KV cache, no parking or merging of rows, no incremental step rule.

* Every row is its prompt (unpadded) and its own tokens; each decoding step runs the model over the whole row
  (batch of 1, no cache) and applies transformers' logits processors built by transformers for that prompt alone.
* Steps are found from scratch with the slow mask of ``reference.py`` on the row so far; a step's score is the head
  on the feature layer of that full forward, one position before the step token.
* Rounds are per unit (the prompt for beam search, each subtree for DVTS): a unit whose rows have all stopped is
  ranked and expanded in the next decoding step while other units' rows go on decoding.
* Samples follow the documented sampling contract: each decoding step in which the prompt has a row decoding draws
  one ``Exp(1)`` variate per vocabulary entry for each of the prompt's N slots from the prompt's own generator (a
  unit owns slots ``unit * budget + j``), and a row takes ``argmax(p / q[slot])``, which is a ``torch.multinomial``
  draw from ``p``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from reference import reference_score_positions, reference_trajectory_score
from transformers import LogitsProcessorList


@dataclass
class ReferenceNode:
    """One segment of the tree: ``first``/``last`` count the generated tokens before and after it."""

    parent: int | None
    round: int
    group: int
    first: int
    last: int
    status: str = "open"
    step_score: float | None = None


@dataclass
class ReferenceSearch:
    """What the slow search found for one prompt."""

    nodes: list[ReferenceNode]
    candidates: list[list[int]]  # generated tokens of the N returned candidates, in the order they finished
    candidate_nodes: list[int]
    scores: list[float]  # geometric mean of the sigmoid step scores (0 without steps)
    chosen_index: int
    # (draw, slot) -> the log of the distribution that slot sampled from at that draw of the prompt's generator
    distributions: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)


@dataclass
class _Row:
    tokens: list[int]
    generated: int
    node: int
    slot: int
    group: int


def reference_processors(model: Any, prompt: list[int], generation_kwargs: dict[str, Any]):
    """transformers' generation config and logits processors for ``prompt`` decoded alone."""
    config, _ = model._prepare_generation_config(None, do_sample=True, **generation_kwargs)
    model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device="cpu")
    ids = torch.tensor([prompt])
    processors = model._get_logits_processor(
        config,
        input_ids_seq_length=len(prompt),
        encoder_input_ids=ids,
        logits_processor=LogitsProcessorList(),
        device="cpu",
        model_kwargs={"attention_mask": torch.ones_like(ids)},
    )
    return config, processors


@torch.no_grad()
def reference_forward(model: Any, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token logits ``[V]`` float32, SPRM logit of every position ``[T]`` float64) of one row alone."""
    out = model.model(input_ids=torch.tensor([tokens]), output_hidden_states=True, use_cache=False)
    features = out.hidden_states[model.config.feature_layer_index()][0]
    next_logits = model.lm_head(out.last_hidden_state[0, -1]).float()
    return next_logits, model.sprm_head(features).reshape(-1).double()


def _step_logits(model: Any, tokens: list[int]) -> list[float]:
    """The SPRM logits of the steps that count in ``tokens`` (the slow mask on the whole sequence).

    The logit at position ``p`` comes from a forward over ``tokens[: p + 1]`` alone, so trajectories that share a
    prefix share its step logits bit for bit (a longer forward may round them differently), as they do when sampled.
    """
    config = model.config
    positions = reference_score_positions(tokens, config.step_token_ids, config.think_start_token_id,
                                          config.think_end_token_id)  # fmt: skip
    return [float(reference_forward(model, tokens[: p + 1])[1][p]) for p in positions]


def _ends_at_a_step(model: Any, tokens: list[int]) -> bool:
    """The newest token is a step token that counts (so the row stops there for the selection)."""
    config = model.config
    positions = reference_score_positions(tokens, config.step_token_ids, config.think_start_token_id,
                                          config.think_end_token_id)  # fmt: skip
    return bool(positions) and positions[-1] == len(tokens) - 2


def _log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def reference_step_search(
    model: Any,
    prompt: list[int],
    search: str,
    num_candidates: int,
    beam_width: int,
    ranking: str,
    seed: int,
    generation_kwargs: dict[str, Any],
) -> ReferenceSearch:
    """Beam search (``search="beam"``) or DVTS (``"dvts"``) over steps for one prompt, one row at a time."""
    n, m = num_candidates, beam_width
    config, processors = reference_processors(model, prompt, generation_kwargs)
    eos = set(torch.as_tensor(config.eos_token_id).reshape(-1).tolist()) if config.eos_token_id is not None else set()
    max_new_tokens = config.max_new_tokens
    generator = torch.Generator().manual_seed(seed)
    nodes = [ReferenceNode(None, 0, 0, 0, 0, status="root")]
    finished: list[_Row] = []
    distributions: dict[tuple[int, int], torch.Tensor] = {}
    draw = 0
    vocab = model.config.get_text_config().vocab_size
    # Rounds are per unit: the prompt for beam search, each subtree for DVTS (child j of the root starts subtree
    # j // M). A unit whose rows have all stopped is ranked and expanded in the prompt's next decoding step, while
    # the other units' rows keep decoding. A unit owns the slots `unit * budget + j` of the prompt's N.
    budget, width = (n, n // m) if search == "beam" else (m, 1)
    root = _Row(list(prompt), 0, 0, 0, 0)
    pending = [(0, [(root, n)])] if search == "beam" else [(g, [(root, m)]) for g in range(n // m)]
    rounds: dict[int, int] = {}
    live: dict[int, list[_Row]] = {}
    at_step: dict[int, list[_Row]] = {}

    def key(row: _Row) -> float:
        logits = _step_logits(model, row.tokens)
        return sum(_log_sigmoid(z) for z in logits) / len(logits) if ranking == "mean" else logits[-1]

    while True:
        for unit, expansions in pending:
            rounds[unit] = rounds.get(unit, 0) + 1
            j = 0
            for parent, fanout in expansions:
                if rounds[unit] > 1:
                    nodes[parent.node].status = "expanded"
                for _ in range(fanout):
                    nodes.append(ReferenceNode(parent.node, rounds[unit], unit, parent.generated, parent.generated))
                    row = _Row(list(parent.tokens), parent.generated, len(nodes) - 1, unit * budget + j, unit)
                    live.setdefault(unit, []).append(row)
                    j += 1
        pending = []
        decoding = sorted((row for rows in live.values() for row in rows), key=lambda row: row.slot)
        if not decoding:
            break
        noise = torch.empty((n, vocab)).exponential_(1, generator=generator)
        live = {}
        for row in decoding:
            logits, _ = reference_forward(model, row.tokens)
            processed = processors(torch.tensor([row.tokens]), logits[None].clone())[0]
            probs = torch.softmax(processed, dim=-1)
            distributions[(draw, row.slot)] = probs.log()
            token = int((probs / noise[row.slot]).argmax())
            row.tokens.append(token)
            row.generated += 1
            nodes[row.node].last = row.generated
            if token in eos or row.generated >= max_new_tokens:
                finished.append(row)
            elif _ends_at_a_step(model, row.tokens):
                at_step.setdefault(row.group, []).append(row)
            else:
                live.setdefault(row.group, []).append(row)
        draw += 1
        for unit in sorted(at_step):
            if live.get(unit):
                continue  # the unit's round goes on
            stopped = at_step.pop(unit)
            for row in stopped:
                nodes[row.node].step_score = 1.0 / (1.0 + math.exp(-_step_logits(model, row.tokens)[-1]))
                nodes[row.node].status = "dropped"
            if len(finished) >= n:
                continue
            kept = sorted(stopped, key=lambda r: (-key(r), r.slot))[:width]
            base, extra = divmod(budget, len(kept))
            pending.append((unit, [(row, base + (1 if i < extra else 0)) for i, row in enumerate(kept)]))

    order = sorted(finished, key=lambda row: (nodes[row.node].round, row.slot))
    if len(order) < n:
        raise AssertionError(f"the reference search finished {len(order)} of {n} candidates")
    for i, row in enumerate(order):
        nodes[row.node].status = "completed" if i < n else "surplus"
    returned = order[:n]
    scores = [reference_trajectory_score(_step_logits(model, row.tokens)) for row in returned]
    chosen = max(range(n), key=lambda j: (scores[j], -j))  # the first of the best
    return ReferenceSearch(
        nodes=nodes,
        candidates=[row.tokens[len(prompt) :] for row in returned],
        candidate_nodes=[row.node for row in returned],
        scores=scores,
        chosen_index=chosen,
        distributions=distributions,
    )
