"""Synthetic "stale-fact pointer chase" task for the CPU demo of MetaStone-S1.

Why this task
-------------
The demo has to show, with a tiny model trained from scratch on one or two CPU cores in a few
minutes, the mechanism of the paper: a policy whose sampled trajectories sometimes contain a wrong
step, and a self-supervised process-reward head (SPRM, trained from outcome labels only) that finds
those steps from the policy's own hidden states, so that Best-of-N with the head beats pass@1,
random pick and majority vote.

* **Learnable fast.**  Every token of a step is a one-layer operation for a transformer: copy the
  previous step's end node (fixed offset), decide at that node, then find, by content, the one fact
  that matches the decision token (a whole fact ``x:y`` is ONE token, and so is a decision ``x(new)``,
  see :func:`build_tokenizer`).  With char-level facts the lookup needs an induction circuit and a
  0.2-1M model stayed on the uniform-guess plateau for 900+ steps.
* **Errors concentrate** (so majority vote can fail).  Each problem contains one *stale* fact for a
  node on the chain (written ``x~y`` instead of ``x:y``).  The imperfect teacher follows the stale
  fact with a per-problem probability (:data:`TEACHER_ERROR_RATES`: 90% when the stale fact is listed
  *after* the current one, a "recency" bias visible in the prompt, 25% otherwise; the tiny policy
  learns it).  After the stale edge it continues correctly from the wrong node, so all its wrong
  trajectories end on the SAME wrong answer; where that rate is above 1/2 the wrong answer is the
  plurality and majority vote picks it.
* **Every kind of policy error shows in its own step.**  A step first *decides* which fact it follows
  (``c(new)`` or ``c(old)``: at node ``c``, take the current or the stale fact), then cites that fact,
  then restates the tag as its last token, i.e. exactly where the head reads: ``c>c(new)c:e(new)``.
  Nothing tells the head that ``(old)`` is bad: it learns it from outcome labels only (SPR loss).
  Deciding before citing matters.  When a step cited the fact first and tagged it after, the policy's
  hesitation at the node with two facts leaked into *blended* citations (``c:b`` from ``c:e`` and
  ``c~b``, or some other fact's value) in about 4% of its trajectories; a fifth of those were tagged
  ``(new)`` and scored like correct ones, nothing in the head's features told them apart, and with
  more candidates one of them took the top score more often (BoN-SPRM@32 below @8 on every seed).
  With the decision as its own token the citation is a lookup by key *and* separator, which matches
  exactly one fact: blended citations fell to 0.1-0.3% of trajectories.  One stale fact about an
  off-chain node is added as noise.  :func:`classify_errors` names every kind of error a trajectory
  can contain (:data:`ERROR_TYPES`).

Format (one example)::

    prompt      "e~c g:f c:e b~g a:c e:d b:h d:b h:g f:a ?c"
    completion  "<think>c>c(new)c:e(new).\n\ne>e(new)e:d(new).\n\nd>d(new)d:b(new).\n\n</think>\\boxed{b}<eos>"   correct
    completion  "<think>c>c(new)c:e(new).\n\ne>e(old)e~c(old).\n\nc>c(new)c:e(new).\n\n</think>\\boxed{e}<eos>"   wrong

Facts over the nodes ``a..h`` (the current successor map is one random 8-cycle), the question
``?c`` = "start at ``c``, follow :data:`HOPS` (3) current edges; where do you end?".  ``x>`` = "at node
x".  Steps are separated by the step token ``".\n\n"`` (one token), the last step is also closed by
it, then ``</think>`` and the boxed answer.

The long variant (``metastone demo --task long``)
-------------------------------------------------
Where reasoning is long and errors compound, step-level search pays off over Best-of-N. :data:`TASKS` holds both
tasks as :class:`DemoTask` objects. In the long task (:func:`make_long_problem`) EVERY node has a stale fact, and
the stale fact of ``x`` skips exactly one node (``x~succ(succ(x))``); the teacher
(:func:`long_teacher_trajectory`) follows it at every step with the same probability
(:data:`LONG_TEACHER_ERROR_RATE`, 0.3) independently, over :data:`LONG_HOPS` (7) steps.  A wrong step is visible
in that step (``(old)``), errors compound (a trajectory is right only when all its steps are:
``0.7 ** 7 = 8.2%``), and the wrong answers spread over several nodes (one per number of skips), so majority vote
is near zero, Best-of-N needs one all-correct sample among N, and a search that keeps the best child at every
step fixes each step on its own.  Prompt: the 8 current and 8 stale facts, shuffled, then ``?start``.

The verify variant (``metastone demo --task verify``)
----------------------------------------------------
In both tasks above a wrong step carries its own label (``(old)``, restated where the head reads). In the verify task
(:func:`make_verify_problem`) every fact is written ``x:y``; three nodes are listed twice and the last-listed fact is
the true one. A step is ``c>c:e`` (at ``c``, cite ``c:e``), 2 tokens and the step token; a wrong step cites an
overridden fact, so a right and a wrong step are drawn from the same tokens and only the prompt's order tells them
apart (:func:`verify_step_labels` labels them, ProcessBench's way). The teacher (:func:`verify_teacher_trajectory`)
is careful or sloppy for a whole trajectory (sloppy: 90% of problems whose trap update is listed further down, 25%
where it comes right after), and a sloppy one cites the overridden fact at every updated node, the trap first.

Public API: :func:`make_problem`, :func:`make_split`, :func:`teacher_completion`,
:func:`format_prompt`, :func:`extract_answer`, :func:`reward`, :func:`reward_fn`,
:func:`build_tokenizer`, :func:`fact_tag`, :func:`classify_errors`, :func:`processbench_trace`, constants :data:`STEP_TEXT`, :data:`THINK`,
:data:`END_THINK`, :data:`ERROR_TYPES`; the long task: :func:`make_long_problem`,
:func:`long_teacher_trajectory`, :class:`DemoTask`, :data:`TASKS`, :func:`get_task`; the verify task:
:func:`make_verify_problem`, :func:`verify_teacher_trajectory`, :func:`classify_verify_errors`,
:func:`verify_step_labels`, :func:`verify_processbench_trace`, :func:`verify_paired_completions`,
:func:`current_facts`, :data:`VERIFY_ERROR_TYPES`.
Imports only the standard library at module level; ``transformers``/``tokenizers`` lazily.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "NODES",
    "STEP_TEXT",
    "THINK",
    "END_THINK",
    "Problem",
    "make_problem",
    "make_split",
    "format_prompt",
    "teacher_completion",
    "teacher_trajectory",
    "extract_answer",
    "reward",
    "reward_fn",
    "build_tokenizer",
    "teacher_error_rate",
    "format_completion",
    "format_step",
    "fact_tag",
    "classify_errors",
    "ERROR_TYPES",
    "LONG_HOPS",
    "LONG_TEACHER_ERROR_RATE",
    "LongProblem",
    "make_long_problem",
    "long_teacher_trajectory",
    "DemoTask",
    "TASKS",
    "get_task",
    "VERIFY_HOPS",
    "VERIFY_TEACHER_ERROR_RATES",
    "VERIFY_ERROR_TYPES",
    "VerifyProblem",
    "current_facts",
    "make_verify_problem",
    "verify_teacher_trajectory",
    "format_verify_step",
    "classify_verify_errors",
    "verify_step_errors",
    "verify_step_labels",
    "verify_processbench_trace",
    "verify_paired_completions",
]

NODES = "abcdefgh"
STEP_TEXT = ".\n\n"
THINK = "<think>"
END_THINK = "</think>"
BOX_OPEN = "\\boxed{"
BOX_CLOSE = "}"
TAG_NEW, TAG_OLD = "(new)", "(old)"
PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
HOPS = 3
# The teacher's probability of following the stale fact when it is listed (before, after) the current one. The
# "after" rate is high so that the problems range from easy to hard for the policy: with one sample in ten right
# on the hard half, N = 2 and 8 candidates often hold no correct trajectory and N = 32 almost always does, so
# Best-of-N accuracy keeps rising with N; and majority vote is wrong on that half.
TEACHER_ERROR_RATES = (0.25, 0.90)
# The long task: steps per trajectory and the teacher's probability of following the stale fact at each step.
LONG_HOPS = 7
LONG_TEACHER_ERROR_RATE = 0.3
# Tokens of a well-formed completion: <think>, 5 per step (node, decision, fact, tag, step token), </think>,
# \boxed{, the answer, }, EOS.
TOKENS_PER_STEP = 5


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem.

    Attributes:
        facts: listed facts in prompt order, each ``(key, sep, value)`` with ``sep`` ``":"`` (current)
            or ``"~"`` (stale).
        start: start node.
        hops: number of edges to follow.
        answer: the correct end node (a letter).
        trap_key: node on the chain that also has a stale fact.
        trap_value: the stale successor of ``trap_key``.
        wrong_answer: where a trajectory that takes the stale edge (and is otherwise right) ends.
        stale_after: whether the trap's stale fact is listed after its current fact (the teacher's
            "recency" bias makes it take the stale edge more often then).
        uid: integer seed that generated it (unique id).
    """

    facts: tuple
    start: str
    hops: int
    answer: str
    trap_key: str
    trap_value: str
    wrong_answer: str
    stale_after: bool
    uid: int

    @property
    def prompt(self) -> str:
        return format_prompt(self)


def _succ_map(order: Sequence[str]) -> dict:
    return {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}


def make_problem(uid: int, n_noise_stale: int = 1, hops: int = HOPS) -> Problem:
    """Deterministically build problem number ``uid`` (its own ``random.Random(uid)``).

    The current successor map is a random cycle over :data:`NODES`; ``hops`` edges are followed from a
    random start; one chain node (at a random hop) gets a stale fact pointing to a random other node
    (never its current successor nor itself); ``n_noise_stale`` off-chain nodes get stale facts too.
    """
    rng = random.Random(uid * 7919 + 17)
    order = list(NODES)
    rng.shuffle(order)
    succ = _succ_map(order)
    start = rng.choice(NODES)
    chain = [start]
    for _ in range(hops):
        chain.append(succ[chain[-1]])
    t = rng.randrange(hops)
    trap_key = chain[t]
    trap_value = rng.choice([n for n in NODES if n not in (trap_key, succ[trap_key])])
    node = trap_value
    for _ in range(hops - t - 1):
        node = succ[node]
    wrong = node
    assert wrong != chain[-1]
    facts = [(k, ":", succ[k]) for k in NODES]
    rng.shuffle(facts)
    # insert the stale fact before or after the trap key's current fact
    pos_cur = next(i for i, f in enumerate(facts) if f[0] == trap_key)
    stale_after = rng.random() < 0.5
    lo, hi = (pos_cur + 1, len(facts)) if stale_after else (0, pos_cur)
    facts.insert(rng.randint(lo, hi), (trap_key, "~", trap_value))
    off_chain = [n for n in NODES if n not in chain[:-1]]
    for k in rng.sample(off_chain, min(n_noise_stale, len(off_chain))):
        v = rng.choice([n for n in NODES if n not in (k, succ[k])])
        facts.insert(rng.randint(0, len(facts)), (k, "~", v))
    return Problem(tuple(facts), start, hops, chain[-1], trap_key, trap_value, wrong, stale_after, uid)


def split_uids(split: str, n: int, seed: int = 0) -> list:
    """The ``n`` problem uids of ``split`` (``"train"``: even, ``"test"``: odd, so disjoint for any seed)."""
    if split not in ("train", "test"):
        raise ValueError(split)
    parity = 0 if split == "train" else 1
    base = (seed + 1) * 1_000_003
    return [2 * (base + i) + parity for i in range(n)]


def make_split(split: str, n: int, seed: int = 0, **kw) -> list:
    """``n`` problems of ``split`` (``"train"`` or ``"test"``); the two never share a uid.

    Train uids are even, held-out (``"test"``) uids are odd, so the splits are disjoint for any seed.
    (Identical prompts across splits are possible in principle but astronomically rare:
    8-cycles x start x trap x orderings; 0 found in 2000 train vs 200 test.)
    """
    return [make_problem(uid, **kw) for uid in split_uids(split, n, seed)]


def format_prompt(p: Problem) -> str:
    """``"b:e h:a ... g:b ?a"``: the facts, then ``?`` and the start node (the hop count is fixed)."""
    facts = " ".join(f"{k}{s}{v}" for k, s, v in p.facts)
    return f"{facts} ?{p.start}"


def teacher_error_rate(p: Problem, rates: tuple = TEACHER_ERROR_RATES) -> float:
    """Per-problem probability that the imperfect teacher takes the stale edge.

    ``rates = (when the stale fact is listed before the current one, when it is listed after)``.
    """
    return rates[1] if p.stale_after else rates[0]


def fact_tag(fact: tuple) -> str:
    """The tag of a step that follows ``fact = (key, sep, value)``: :data:`TAG_NEW` for ``":"``, :data:`TAG_OLD` for ``"~"``."""
    return TAG_NEW if fact[1] == ":" else TAG_OLD


def format_step(node: str, fact: tuple) -> str:
    """``"c>c(old)c~b(old)"``: at ``node``, decide (``c(old)``), cite ``fact``, restate the tag (the token the head reads)."""
    tag = fact_tag(fact)
    return f"{node}>{node}{tag}{''.join(fact)}{tag}"


def teacher_trajectory(p: Problem, rng: random.Random, rates: tuple = TEACHER_ERROR_RATES) -> tuple:
    """Sample the teacher's step list and final node. Returns ``(steps, final_node, used_stale)``."""
    facts_cur = {k: v for k, s, v in p.facts if s == ":"}
    node, steps, used = p.start, [], False
    for _ in range(p.hops):
        if node == p.trap_key and rng.random() < teacher_error_rate(p, rates):
            fact, used = (node, "~", p.trap_value), True
        else:
            fact = (node, ":", facts_cur[node])
        steps.append(format_step(node, fact))
        node = fact[2]
    return steps, node, used


def format_completion(steps: Iterable[str], final: str) -> str:
    body = "".join(s + STEP_TEXT for s in steps)
    return f"{THINK}{body}{END_THINK}{BOX_OPEN}{final}{BOX_CLOSE}"


def teacher_completion(p: Problem, rng: random.Random, rates: tuple = TEACHER_ERROR_RATES) -> str:
    """A teacher completion (without EOS) for ``p``; takes the stale edge at ``teacher_error_rate``.

    ``rates=(0, 0)`` gives the perfect teacher.
    """
    steps, final, _ = teacher_trajectory(p, rng, rates)
    return format_completion(steps, final)


# The kinds of error a trajectory can contain (see :func:`classify_errors`), in report order.
def processbench_trace(p: Problem, erroneous: bool) -> dict:
    """A ProcessBench-format row for ``p`` whose first wrong paragraph is known.

    The paragraphs are the steps of the perfect teacher, each ending with a full stop (so ``"\\n\\n".join`` writes
    the step token after it), then the boxed answer. ``erroneous=True`` takes the stale edge at the trap node and
    continues correctly from the wrong node, so the first wrong paragraph is the trap's hop (``label``); otherwise
    every paragraph is right (``label = -1``). ``problem`` is the prompt followed by ``<think>``, as the model reads it.
    """
    facts_cur = {k: v for k, s, v in p.facts if s == ":"}
    node, steps, label = p.start, [], -1
    for hop in range(p.hops):
        if erroneous and node == p.trap_key and label == -1:
            fact, label = (node, "~", p.trap_value), hop
        else:
            fact = (node, ":", facts_cur[node])
        steps.append(format_step(node, fact) + ".")
        node = fact[2]
    steps.append(f"{BOX_OPEN}{node}{BOX_CLOSE}")
    return {"id": f"demo-{p.uid}-{int(erroneous)}", "problem": p.prompt + THINK, "steps": steps, "label": label}


ERROR_TYPES = {
    "stale": "follows the chain node's stale fact (the teacher's designed error)",
    "misread": "cites a fact the prompt does not list for its node (a blended or invented fact, another node's)",
    "mistagged": "a tag that disagrees with the cited fact (e.g. a stale fact tagged (new))",
    "jump": "a step starts on another node than the previous step ended on",
    "hops": "a number of steps other than the problem's hop count",
    "answer": "the boxed answer is missing or is not the last step's node",
    "format": "a step or the completion does not parse",
}

_STEP_RE = re.compile(r"([a-h])>([a-h])(\((?:new|old)\))([a-h])([:~])([a-h])(\((?:new|old)\))")


def classify_errors(p: Problem, completion: str) -> list:
    """The error types (keys of :data:`ERROR_TYPES`) that ``completion`` contains, each once, in that order.

    An empty list means a well-formed trajectory that follows the current facts, hence a correct answer. A
    trajectory with errors can still end on the right node (a misread that lands there by chance).
    """
    if not completion.startswith(THINK) or END_THINK not in completion:
        return ["format"]
    found = set()
    body = completion[len(THINK) :].split(END_THINK, 1)[0]
    *steps, rest = body.split(STEP_TEXT)
    if rest:
        found.add("format")
    node = p.start
    for text in steps:
        match = _STEP_RE.fullmatch(text)
        if match is None:
            found.add("format")
            continue
        at, decided_at, decided, key, sep, value, restated = match.groups()
        fact = (key, sep, value)
        if at != node or decided_at != at:
            found.add("jump")
        if key != at or fact not in p.facts:
            found.add("misread")
        elif sep == "~":
            found.add("stale")
        if decided != fact_tag(fact) or restated != fact_tag(fact):
            found.add("mistagged")
        node = value
    if len(steps) != p.hops:
        found.add("hops")
    if extract_answer(completion) != node:
        found.add("answer")
    return [e for e in ERROR_TYPES if e in found]


_BOX_RE = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_answer(completion: str):
    """The content of the last ``\\boxed{...}`` after the last ``</think>`` (None if absent)."""
    tail = completion.rsplit(END_THINK, 1)
    if len(tail) != 2:
        return None
    found = _BOX_RE.findall(tail[1])
    return found[-1].strip() if found else None


def reward(completion: str, answer: str) -> float:
    """Exact-match outcome reward: 1.0 if the boxed answer after ``</think>`` equals ``answer``."""
    got = extract_answer(completion)
    return 1.0 if got is not None and got == str(answer).strip() else 0.0


def reward_fn(completions, answer, **kwargs):
    """TRL-style reward function (``completions`` as strings or chat messages, ``answer`` column)."""
    out = []
    for c, a in zip(completions, answer):
        if isinstance(c, list):
            c = c[-1]["content"] if c else ""
        out.append(reward(c, a))
    return out


def build_tokenizer():
    """A tiny in-memory ``PreTrainedTokenizerFast`` for this task (no download).

    Tokens: a whole fact ``x:y`` / ``x~y`` (x, y in :data:`NODES`) is ONE token, ``x>`` ("at node x") is
    one token, ``<think>``, ``</think>``, ``\\boxed{``, the tags ``(new)`` / ``(old)`` and the step separator
    ``".\\n\\n"`` are one token each, anything else is one token per character.  This keeps every step a pair of one-layer
    operations for the transformer (copy the previous step's end node at a fixed offset; find the fact
    whose key matches by content), which a tiny model learns in a couple of minutes on one CPU core.

    Specials: ``<pad>`` (id 0), ``<bos>``, ``<eos>``, ``<unk>``; ``padding_side="left"``; decoding
    concatenates tokens (no spaces inserted), so ``decode(encode(text)) == text``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, UNK]
    multi = [THINK, END_THINK, BOX_OPEN, STEP_TEXT, TAG_NEW, TAG_OLD]
    facts = [f"{k}{s}{v}" for s in ":~" for k in NODES for v in NODES]
    keys = [f"{k}>" for k in NODES] + [f"{k}{t}" for k in NODES for t in (TAG_NEW, TAG_OLD)]
    chars = list(NODES) + list("ijklmnopqrstuvwxyz") + list("0123456789") + list(":~?.,=+-*/()[]{}<>|\\ \n")
    vocab = {}
    for t in specials + multi + facts + keys + chars:
        if t not in vocab:
            vocab[t] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    n = f"[{NODES}]"
    pattern = f"{n}\\((?:new|old)\\)|" + "|".join(re.escape(t) for t in multi) + f"|{n}[:~]{n}|{n}>" + r"|[\s\S]"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
    )
    fast.add_tokens([THINK, END_THINK])  # plain (non-special) added tokens, like Qwen's; ids unchanged
    assert fast.encode(STEP_TEXT, add_special_tokens=False) == [vocab[STEP_TEXT]]
    return fast


# ---------------------------------------------------------------------------------------------- the long task
@dataclasses.dataclass(frozen=True)
class LongProblem:
    """One problem of the long task: every node has a current and a stale fact, the stale one skipping a node.

    Attributes:
        facts: listed facts in prompt order, each ``(key, sep, value)``: for every node ``x`` the current fact
            ``(x, ":", succ(x))`` and the stale fact ``(x, "~", succ(succ(x)))``, shuffled.
        start: start node.
        hops: number of edges to follow (the number of steps).
        answer: the correct end node, ``succ`` applied ``hops`` times to ``start``.
        uid: integer seed that generated it (unique id).
    """

    facts: tuple
    start: str
    hops: int
    answer: str
    uid: int

    @property
    def prompt(self) -> str:
        return format_prompt(self)


def make_long_problem(uid: int, hops: int = LONG_HOPS) -> LongProblem:
    """Deterministically build long-task problem number ``uid`` (its own ``random.Random``).

    The current successor map is a random cycle over :data:`NODES`; every node ``x`` also has the stale fact
    ``x~succ(succ(x))``, so following a stale fact skips exactly one node and a trajectory that follows ``k`` of them
    ends ``k`` nodes further along the cycle: for ``hops < len(NODES)`` it is right exactly when it follows none.
    """
    if not 1 <= hops < len(NODES):
        raise ValueError(f"hops must be in [1, {len(NODES) - 1}], got {hops}")
    rng = random.Random(uid * 7919 + 23)
    order = list(NODES)
    rng.shuffle(order)
    succ = _succ_map(order)
    start = rng.choice(NODES)
    facts = [(k, ":", succ[k]) for k in NODES] + [(k, "~", succ[succ[k]]) for k in NODES]
    rng.shuffle(facts)
    node = start
    for _ in range(hops):
        node = succ[node]
    return LongProblem(tuple(facts), start, hops, node, uid)


def long_teacher_trajectory(p: LongProblem, rng: random.Random, rates: tuple = (LONG_TEACHER_ERROR_RATE,)) -> tuple:
    """Sample the long task's teacher: at every step, independently, it follows the current node's stale fact with
    probability ``rates[0]``. Returns ``(steps, final_node, stale_steps)``; ``rates=(0.0,)`` is the perfect teacher."""
    current = {k: v for k, s, v in p.facts if s == ":"}
    stale = {k: v for k, s, v in p.facts if s == "~"}
    node, steps, errors = p.start, [], 0
    for _ in range(p.hops):
        if rng.random() < rates[0]:
            fact, errors = (node, "~", stale[node]), errors + 1
        else:
            fact = (node, ":", current[node])
        steps.append(format_step(node, fact))
        node = fact[2]
    return steps, node, errors


@dataclasses.dataclass(frozen=True)
class DemoTask:
    """One task of the demo: how its problems are made and how its imperfect teacher errs.

    Attributes:
        name: ``"short"`` (three steps, one trap node, errors concentrated on one wrong answer), ``"long"``
            (:data:`LONG_HOPS` steps, a stale fact at every node, errors compounding step after step) or ``"verify"``
            (:data:`VERIFY_HOPS` steps, wrong steps written like right ones).
        hops: steps per trajectory.
        teacher_error_rates: what the teacher's ``rates`` argument means for this task: short, the probability of
            taking the trap's stale fact when it is listed (before, after) the current one; long, ``(e,)``, the
            probability of following a stale fact at each step.
        description: one line for reports and model cards.
        problem_factory: ``(uid, hops=...) -> problem`` (:func:`make_problem` or :func:`make_long_problem`).
        teacher: ``(problem, rng, rates) -> (steps, final_node, errors)`` (:func:`teacher_trajectory`,
            :func:`long_teacher_trajectory` or :func:`verify_teacher_trajectory`).
        tokens_per_step: tokens of a well-formed step, the step token included.
        error_types: the kinds of error :attr:`classify_errors` names, with what each is.
        classify_errors: ``(problem, completion) -> [error type, ...]``.
    """

    name: str
    hops: int
    teacher_error_rates: tuple
    description: str
    problem_factory: Callable
    teacher: Callable
    tokens_per_step: int = TOKENS_PER_STEP
    error_types: dict = dataclasses.field(default_factory=lambda: ERROR_TYPES)
    classify_errors: Callable = classify_errors

    def make_problem(self, uid: int):
        return self.problem_factory(uid, hops=self.hops)

    def make_split(self, split: str, n: int, seed: int = 0) -> list:
        """``n`` problems of ``split``, with the uids of :func:`make_split` (train even, test odd)."""
        return [self.make_problem(uid) for uid in split_uids(split, n, seed)]

    def teacher_completion(self, p, rng: random.Random, rates: tuple | None = None) -> str:
        """A teacher completion (without EOS); ``rates`` default to the task's :attr:`teacher_error_rates`."""
        steps, final, _ = self.teacher(p, rng, self.teacher_error_rates if rates is None else rates)
        return format_completion(steps, final)

    @property
    def completion_tokens(self) -> int:
        """Tokens of a well-formed completion, EOS included: ``<think>``, :attr:`tokens_per_step` per step (5, or 3
        for the verify task), ``</think>\\boxed{x}``, EOS."""
        return 1 + self.tokens_per_step * self.hops + 4 + 1


# ---------------------------------------------------------------------------------------------- the verify task
# Steps per trajectory of the verify task, and the teacher's probability of citing the trap's overridden fact when
# its update is listed (right after it, further down).
VERIFY_HOPS = 4
VERIFY_TEACHER_ERROR_RATES = (0.25, 0.90)
# Tokens of a verify-task step: the node (``c>``), the cited fact (``c:e``), the step token.
VERIFY_TOKENS_PER_STEP = 3


@dataclasses.dataclass(frozen=True)
class VerifyProblem:
    """One problem of the verify task: facts listed with updates, the last-listed value of a node being the true one.

    Attributes:
        facts: listed facts in prompt order, each ``(key, ":", value)``; three nodes have two facts (the earlier one
            overridden by the later one), every other node one.
        start: start node.
        hops: number of edges to follow (the number of steps).
        answer: the correct end node (following the last-listed fact of every node).
        trap_key: the chain node whose overridden fact the teacher sometimes cites.
        trap_old: the trap's overridden value.
        wrong_answer: where a trajectory that cites the trap's overridden fact (and is otherwise right) ends.
        far: whether the trap's update is listed further down than right after its overridden fact (the teacher
            then cites the overridden fact more often, :data:`VERIFY_TEACHER_ERROR_RATES`).
        uid: integer seed that generated it (unique id).
    """

    facts: tuple
    start: str
    hops: int
    answer: str
    trap_key: str
    trap_old: str
    wrong_answer: str
    far: bool
    uid: int

    @property
    def prompt(self) -> str:
        return format_prompt(self)


def current_facts(facts: Iterable[tuple]) -> dict:
    """``{key: value}`` of the current facts: a listed ``x:y`` fact holds unless a later ``x:z`` overrides it (the
    short and long tasks' ``x~y`` facts are never current)."""
    current = {}
    for key, sep, value in facts:
        if sep == ":":
            current[key] = value
    return current


def make_verify_problem(uid: int, hops: int = VERIFY_HOPS) -> VerifyProblem:
    """Deterministically build verify-task problem number ``uid`` (its own ``random.Random``).

    The current successor map is a random cycle over :data:`NODES`, listed as ``x:y`` facts in random order. Three
    nodes also get an overridden fact ``x:z`` (``z`` random, neither ``x`` nor its successor) listed before their
    current one, in the same form: the trap (a chain node, not the last one), the decoy (the chain's node after the
    trap) and the node the trap's overridden fact points to (never on the chain before the trap): whichever fact the
    trap's step cites, the next step is at a node with an update. The decoy's and the other node's update is listed
    right after the overridden fact; the trap's is right after it or further down (``far``), with even odds. Which
    fact of a node is current can only be told from the order. ``wrong_answer`` is where the sloppy teacher (:func:`verify_teacher_trajectory`) ends, never the answer.
    """
    if not 2 <= hops < len(NODES):
        raise ValueError(f"hops must be in [2, {len(NODES) - 1}], got {hops}")
    rng = random.Random(uid * 7919 + 29)
    while True:
        order = list(NODES)
        rng.shuffle(order)
        succ = _succ_map(order)
        start = rng.choice(NODES)
        chain = [start]
        for _ in range(hops):
            chain.append(succ[chain[-1]])
        t = rng.randrange(hops - 1)
        # the decoy is the chain's next node and the other updated node the trap's overridden value, so the step after
        # the trap's is at an updated node on both paths
        trap, decoy = chain[t], chain[t + 1]
        other = rng.choice([n for n in NODES if n not in (*chain[: t + 1], decoy)])  # not on the chain before the trap
        old = {k: rng.choice([n for n in NODES if n not in (k, succ[k])]) for k in (decoy, other)}
        old[trap] = other
        facts = [(k, ":", succ[k]) for k in NODES]
        rng.shuffle(facts)
        far = rng.random() < 0.5
        for key in (trap, decoy, other):
            position = next(i for i, f in enumerate(facts) if f == (key, ":", succ[key]))
            if key == trap and far:  # at least one fact between the overridden fact and its update
                if position == 0:  # move the update down first
                    facts.insert(rng.randint(1, len(facts) - 1), facts.pop(0))
                    position = next(i for i, f in enumerate(facts) if f == (key, ":", succ[key]))
                facts.insert(rng.randint(0, position - 1), (key, ":", old[key]))
            else:
                facts.insert(position, (key, ":", old[key]))
        node = start
        for _ in range(hops):
            node = old.get(node, succ[node])
        if node != chain[-1]:
            break
    assert current_facts(facts) == succ
    return VerifyProblem(tuple(facts), start, hops, chain[-1], trap, old[trap], node, far, uid)


def verify_teacher_trajectory(p: VerifyProblem, rng: random.Random, rates: tuple = VERIFY_TEACHER_ERROR_RATES) -> tuple:
    """Sample the verify task's teacher, careful or sloppy for the whole trajectory: sloppy with probability
    ``rates[1]`` when the trap's update is listed further down than right after its overridden fact, ``rates[0]`` when
    right after. A careful teacher cites the current fact at every step; a sloppy one cites the overridden fact at
    every node with an update, the trap first (so a policy that imitates it has to know, at a later updated node,
    whether it already cited an overridden fact). Returns ``(steps, final_node, sloppy)``; ``rates=(0, 0)`` is the
    perfect teacher."""
    current = current_facts(p.facts)
    overridden = {}
    for key, _, value in p.facts:
        if key not in overridden and value != current[key]:
            overridden[key] = value
    sloppy = rng.random() < rates[1 if p.far else 0]
    node, steps = p.start, []
    for _ in range(p.hops):
        fact = (node, ":", overridden[node] if sloppy and node in overridden else current[node])
        steps.append(format_verify_step(node, fact))
        node = fact[2]
    return steps, node, sloppy


def format_verify_step(node: str, fact: tuple) -> str:
    """``"c>c:e"``: at ``node``, cite ``fact``; a right and a wrong step look alike (both cite a listed fact)."""
    return f"{node}>{''.join(fact)}"


VERIFY_ERROR_TYPES = {
    "overridden": "cites its node's overridden fact, written like the current one (the teacher's designed error)",
    **{e: ERROR_TYPES[e] for e in ("misread", "jump", "hops", "answer", "format")},
}

_VERIFY_STEP_RE = re.compile(r"([a-h])>([a-h]):([a-h])")


def verify_step_errors(p: VerifyProblem, completion: str) -> tuple:
    """Parse ``completion``'s steps against ``p``: ``(per-step error or None, trajectory-level errors)``.

    A step's error is ``"format"``, ``"jump"``, ``"misread"`` or ``"overridden"`` (the first that applies, in that
    order), ``None`` when it cites its node's current fact from the node the previous step ended on; the
    trajectory-level errors are the :data:`VERIFY_ERROR_TYPES` found beyond the steps (``hops``, ``answer``,
    ``format``). ``([], ["format"])`` when there is no think span.
    """
    if not completion.startswith(THINK) or END_THINK not in completion:
        return [], ["format"]
    current, listed = current_facts(p.facts), set(p.facts)
    body = completion[len(THINK) :].split(END_THINK, 1)[0]
    *steps, rest = body.split(STEP_TEXT)
    found, per_step, node = set(), [], p.start
    if rest:
        found.add("format")
    for text in steps:
        match = _VERIFY_STEP_RE.fullmatch(text)
        if match is None:
            per_step.append("format")
            continue
        at, key, value = match.groups()
        if at != node:
            per_step.append("jump")
        elif key != at or (key, ":", value) not in listed:
            per_step.append("misread")
        elif value != current[key]:
            per_step.append("overridden")
        else:
            per_step.append(None)
        node = value
    if len(steps) != p.hops:
        found.add("hops")
    if extract_answer(completion) != node:
        found.add("answer")
    return per_step, [e for e in VERIFY_ERROR_TYPES if e in found]


def classify_verify_errors(p: VerifyProblem, completion: str) -> list:
    """The error types (keys of :data:`VERIFY_ERROR_TYPES`) ``completion`` contains, each once, in that order; empty
    for a well-formed trajectory that cites the current fact at every step (hence a correct answer)."""
    per_step, rest = verify_step_errors(p, completion)
    found = {e for e in per_step if e} | set(rest)
    return [e for e in VERIFY_ERROR_TYPES if e in found]


def verify_step_labels(p: VerifyProblem, completion: str) -> list:
    """Per-step labels up to the first wrong step, ProcessBench's way: ``[(step_text, right), ...]`` with every step
    before the first wrong one (``right=True``) and that one (``False``); the steps after it are left out."""
    per_step, _ = verify_step_errors(p, completion)
    body = completion[len(THINK) :].split(END_THINK, 1)[0]
    labels = []
    for text, error in zip(body.split(STEP_TEXT), per_step):
        labels.append((text, error is None))
        if error is not None:
            break
    return labels


def _verify_perfect_path(p: VerifyProblem, erroneous: bool) -> tuple[list, str, int]:
    """The perfect teacher's steps of ``p`` (``erroneous=True``: its first step at the trap cites the trap's
    overridden fact instead, then the current facts from where that leads): ``(steps, final node, trap hop)``, the
    trap hop being the index of that step (the same on both paths, whose earlier steps are the same)."""
    current = current_facts(p.facts)
    node, steps, trap_hop = p.start, [], None
    for index in range(p.hops):
        fact = (node, ":", current[node])
        if node == p.trap_key and trap_hop is None:
            trap_hop = index
            if erroneous:
                fact = (node, ":", p.trap_old)
        steps.append(format_verify_step(node, fact))
        node = fact[2]
    return steps, node, trap_hop


def verify_processbench_trace(p: VerifyProblem, erroneous: bool) -> dict:
    """A ProcessBench-format row for ``p``: the perfect teacher's steps (each ending with a full stop, so that
    ``"\\n\\n".join`` writes the step token), then the boxed answer; ``erroneous=True`` cites the trap's overridden fact
    and continues correctly from there, so the first wrong paragraph (``label``) is the trap's hop, else ``-1``."""
    steps, final, trap_hop = _verify_perfect_path(p, erroneous)
    label = trap_hop if erroneous else -1
    paragraphs = [step + "." for step in steps] + [f"{BOX_OPEN}{final}{BOX_CLOSE}"]
    return {"id": f"verify-{p.uid}-{int(erroneous)}", "problem": p.prompt + THINK, "steps": paragraphs, "label": label}


def verify_paired_completions(p: VerifyProblem) -> tuple[str, str, int]:
    """Two completions of ``p`` that differ in one step only: the perfect teacher's, and the same with the trap's step
    citing the trap's overridden fact (then following the current facts from where that leads). Returns
    ``(right, wrong, hop)`` with ``hop`` the index of the step that differs, the first wrong step of ``wrong``. The
    prompt and the steps before ``hop`` are the same in both, so a scorer that tells the two steps apart checks the
    cited fact, not the layout of the prompt."""
    (right, right_end, hop), (wrong, wrong_end, _) = (_verify_perfect_path(p, erroneous) for erroneous in (False, True))
    return format_completion(right, right_end), format_completion(wrong, wrong_end), hop


TASKS = {
    "short": DemoTask(
        "short",
        HOPS,
        TEACHER_ERROR_RATES,
        "stale-fact pointer chase: 3 steps, one stale fact on the chain",
        make_problem,
        teacher_trajectory,
    ),
    "long": DemoTask(
        "long",
        LONG_HOPS,
        (LONG_TEACHER_ERROR_RATE,),
        f"long stale-fact pointer chase: {LONG_HOPS} steps, a stale fact at every node, "
        f"{LONG_TEACHER_ERROR_RATE:g} teacher error per step",
        make_long_problem,
        long_teacher_trajectory,
    ),
    "verify": DemoTask(
        "verify",
        VERIFY_HOPS,
        VERIFY_TEACHER_ERROR_RATES,
        f"fact-update pointer chase: {VERIFY_HOPS} steps, the last-listed fact of a node is the true one and a wrong "
        "step cites an overridden fact written in the same form",
        make_verify_problem,
        verify_teacher_trajectory,
        tokens_per_step=VERIFY_TOKENS_PER_STEP,
        error_types=VERIFY_ERROR_TYPES,
        classify_errors=classify_verify_errors,
    ),
}
"""The demo's tasks by name (``metastone demo --task short|long|verify``)."""


def get_task(name: str = "short", hops: int | None = None) -> DemoTask:
    """The task ``name`` of :data:`TASKS`, with ``hops`` steps instead of its default when given (1 to 7)."""
    if name not in TASKS:
        raise ValueError(f"unknown demo task {name!r}; valid: {sorted(TASKS)}")
    demo_task = TASKS[name]
    if hops is None or hops == demo_task.hops:
        return demo_task
    if isinstance(hops, bool) or not isinstance(hops, int) or not 1 <= hops < len(NODES):
        raise ValueError(f"hops must be an int in [1, {len(NODES) - 1}], got {hops!r}")
    description = demo_task.description.replace(f"{demo_task.hops} steps", f"{hops} steps")
    return dataclasses.replace(demo_task, hops=hops, description=description)
