"""``med``: MedMCQA (Pal et al., 2022), four-option medical entrance-exam questions.

A record (``openlifescienceai/medmcqa``; other fields such as ``exp`` or ``subject_name`` are
kept and not used)::

    {"question": "Which vitamin deficiency causes scurvy?",
     "opa": "Vitamin A", "opb": "Vitamin B12", "opc": "Vitamin C", "opd": "Vitamin D", "cop": 2}

``cop`` is the correct option, 0-3 for ``opa``-``opd`` (the hub dataset's numbering; MedMCQA's
original JSON files number them 1-4: subtract 1). The prompt shows the question and the four
options; the completion is the correct option's text::

    question: Which vitamin deficiency causes scurvy?
    A. Vitamin A
    B. Vitamin B12
    C. Vitamin C
    D. Vitamin D
    answer:
    ->  " Vitamin C"

Metric: **accuracy** of picking the option with the highest length-normalised log-likelihood
(mean log-probability per token of ``" " + option`` after the prompt); a tie goes to the earlier
option.
"""

from __future__ import annotations

from typing import Any

from molf_ds.train.tasks import scoring
from molf_ds.train.tasks.base import Task, Timer, share

OPTIONS = ("opa", "opb", "opc", "opd")
LETTERS = ("A", "B", "C", "D")


class MedTask(Task):
    name = "med"
    hub_id = "openlifescienceai/medmcqa"
    fields = ("question", *OPTIONS, "cop")
    schema = "MedMCQA's schema: question, opa, opb, opc, opd (text), cop (0-3: the correct option)"

    # ---- records ----------------------------------------------------------------------------
    def check_record(self, record: dict, index: int, source: str) -> dict:
        for field in ("question", *OPTIONS):
            self.text(record[field], source, index, repr(field))
        return {**record, "cop": self._answer(record["cop"], source, index)}

    def _answer(self, value: Any, source: str, index: int) -> int:
        """``cop`` as an int 0-3 (a CSV cell holds it as text)."""
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.bad_value(source, index, "'cop'", f"is {value!r}, not an option number")
        if value == -1:  # MedMCQA's test split hides its answers
            raise self.bad_value(
                source, index, "'cop'", "is -1, no answer (the test split): use train/validation"
            )
        if not 0 <= value <= 3:
            raise self.bad_value(
                source, index, "'cop'", f"is {value}, not 0-3 (1-4 numbering: subtract 1)"
            )
        return value

    # ---- training and evaluation --------------------------------------------------------------
    @staticmethod
    def prompt(record: dict) -> str:
        lines = [f"question: {record['question']}"]
        lines += [f"{letter}. {record[o]}" for letter, o in zip(LETTERS, OPTIONS, strict=True)]
        return "\n".join([*lines, "answer:"])

    @staticmethod
    def option(record: dict, k: int) -> str:
        """Option ``k``'s completion: ``" " + text``."""
        return " " + record[OPTIONS[k]]

    def to_examples(self, records: list[dict]) -> list[dict]:
        return [{"prompt": self.prompt(r), "completion": self.option(r, r["cop"])} for r in records]

    def evaluate(
        self, model: Any, tokenizer: Any, records: list[dict], *, batch_size: int = 16
    ) -> dict[str, float]:
        timer = Timer()
        prompts = [self.prompt(r) for r in records for _ in OPTIONS]
        options = [self.option(r, k) for r in records for k in range(len(OPTIONS))]
        scores = scoring.completion_logprobs(
            model, tokenizer, prompts, options, batch_size=batch_size
        )
        hits = 0
        for i, record in enumerate(records):
            per_token = [total / n for total, n in scores[4 * i : 4 * i + 4]]
            hits += per_token.index(max(per_token)) == record["cop"]
        n = len(records)
        return {
            "accuracy": share(hits, n),
            "examples": n,
            "examples_per_s": timer.rate(n),
        }
