"""Test-time-scaling metrics of MetaStone-S1 (pass@1, majority@N, SPRM-weighted vote@N, BoN-SPRM@N, SPRM AUC).

An ``evaluate`` metric module: ``evaluate.load`` copies this file into its modules cache and imports it from
there, so it imports ``metastone_hf`` by absolute name and computes nothing itself; every number comes from
:func:`metastone_hf.metrics.compute_scaling_metrics`.
"""

import datasets
import evaluate

from metastone_hf.metrics import compute_scaling_metrics

_CITATION = """\
@article{wang2025metastone,
  title   = {Test-Time Scaling with Reflective Generative Model},
  author  = {Wang, Zixiao and Wang, Yuxin and Wang, Xiaorui and Xing, Mengting and Gao, Jie and Xu, Jianjun and
             Liu, Guangcan and Jin, Chenhui and Wang, Zhuo and Zhang, Shengzhuo and Xie, Hongtao},
  journal = {arXiv preprint arXiv:2507.01951},
  year    = {2025}
}
"""

_DESCRIPTION = """\
Best-of-N test-time-scaling metrics with the official MetaStone-S1 averaging. Each question has M sampled
candidates; for a budget N they are split into K = M // N consecutive groups of N, a method picks one candidate
per group, and the question's accuracy is the mean over its K groups. Reported values are means over questions:
pass@1 (mean single-sample accuracy), majority@N (majority vote over final answers), random@N (a uniformly random
pick), sprm_vote@N (votes weighted by SPRM scores), bon_sprm@N (the highest SPRM score) and sprm_auc (how well
the scores separate correct from incorrect candidates, pooled over questions).
"""

_KWARGS_DESCRIPTION = """
Args:
    correct (`list` of `list` of `float` or `bool`): per question, is each of its M candidates right (1/0).
    scores (`list` of `list` of `float`): per question, each candidate's SPRM score (higher is better; NaN or a
        missing score ranks last).
    answers (`list` of `list` of `str` or `None`): per question, each candidate's canonical final answer, compared
        as strings for voting (`None`: the candidate gave no answer).
    budgets (`dict` of `str` to `int`, or `list` of `int`, defaults to `[2, 8, 32]`): the Ns to report; a dict
        (effort -> N) labels the keys, e.g. `{"medium": 8}` gives `bon_sprm@8 (medium)`. An N above M is left out.
    confidence (`float`, *optional*): also return a percentile bootstrap interval over questions for each metric,
        under `intervals`, e.g. `0.95`.
    resamples (`int`, defaults to 2000) and seed (`int`, defaults to 0): of the bootstrap.
Returns:
    `pass@1`, then `majority@N`, `random@N`, `sprm_vote@N`, `bon_sprm@N` for each N (fractions in [0, 1]),
    `sprm_auc` (NaN when every candidate is right or every one is wrong) and, with a confidence,
    `intervals`: {metric: [low, high]}.
Examples:
    >>> import evaluate
    >>> from metastone_hf.metrics import evaluate_module_path
    >>> metric = evaluate.load(str(evaluate_module_path()), keep_in_memory=True)
    >>> results = metric.compute(correct=[[1, 0]], scores=[[0.9, 0.2]], answers=[["4", "5"]], budgets=[2])
    >>> results["pass@1"], results["bon_sprm@2"], results["sprm_auc"]
    (0.5, 1.0, 1.0)
"""


class TestTimeScaling(evaluate.Metric):
    """The module's metric; ``evaluate.load`` finds it as the module's first ``EvaluationModule`` subclass."""

    __test__ = False  # its name starts with "Test": keep pytest from taking it for a test class

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "correct": datasets.Sequence(datasets.Value("float64")),
                    "scores": datasets.Sequence(datasets.Value("float64")),
                    # large_string, not string: evaluate rejects a `string` column whose first row holds no str at
                    # all, i.e. a first question where no candidate gave an answer (None everywhere).
                    "answers": datasets.Sequence(datasets.Value("large_string")),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2507.01951", "https://github.com/MetaStone-AI/MetaStone-S1"],
        )

    def _compute(
        self,
        correct: list[list[float]],
        scores: list[list[float | None]],
        answers: list[list[str | None]],
        budgets: dict[str, int] | list[int] | int = (2, 8, 32),
        confidence: float | None = None,
        resamples: int = 2000,
        seed: int = 0,
    ) -> dict:
        scores = [[float("nan") if s is None else s for s in row] for row in scores]
        return compute_scaling_metrics(correct, scores, answers, budgets, confidence, resamples, seed)
