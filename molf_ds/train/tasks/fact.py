"""``fact``: CounterFact (Meng et al., 2022, "Locating and Editing Factual Associations in GPT").

A record asks to rewrite one fact of a subject and gives other phrasings of the same question::

    {"case_id": 0,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                           "target_new": {"str": "English"}, "target_true": {"str": "French"}},
     "paraphrase_prompts": ["Danielle Darrieux, a native", ...]}

Training teaches the rewrite: prompt ``"The mother tongue of Danielle Darrieux is"``, completion
``" English"``. Metrics (CounterFact's efficacy and paraphrase scores): **efficacy**, the share of
records whose new target has a higher log-probability (summed over its tokens) than the true one
after the rewrite prompt; **paraphrase**, the same comparison over every paraphrase prompt of
every record (NaN when the records hold none). Other fields (neighborhood prompts, ids) are kept
and not used.
"""

from __future__ import annotations

import json
from typing import Any

from molf_ds.train.tasks import scoring
from molf_ds.train.tasks.base import Task, Timer, share


class FactTask(Task):
    name = "fact"
    hub_id = "azhx/counterfact"
    fields = ("requested_rewrite", "paraphrase_prompts")
    schema = (
        "CounterFact's schema: requested_rewrite {prompt (with {} for the subject), subject, "
        "target_new {str}, target_true {str}}, paraphrase_prompts [text]"
    )

    # ---- records ----------------------------------------------------------------------------
    def check_record(self, record: dict, index: int, source: str) -> dict:
        rewrite = self._parsed(record["requested_rewrite"], source, index, "requested_rewrite")
        if not isinstance(rewrite, dict):
            raise self.bad_value(source, index, "'requested_rewrite'", "is not an object")
        for key in ("prompt", "subject"):
            self.text(rewrite.get(key), source, index, f"requested_rewrite.{key}")
        if "{}" not in rewrite["prompt"]:
            raise self.bad_value(
                source, index, "requested_rewrite.prompt", "has no {} where the subject goes"
            )
        for key in ("target_new", "target_true"):
            target = rewrite.get(key)
            value = target.get("str") if isinstance(target, dict) else None
            self.text(value, source, index, f"requested_rewrite.{key}.str")
        paraphrases = self._parsed(
            record["paraphrase_prompts"], source, index, "paraphrase_prompts"
        )
        if not isinstance(paraphrases, list):
            raise self.bad_value(source, index, "'paraphrase_prompts'", "is not a list of text")
        for k, prompt in enumerate(paraphrases):
            self.text(prompt, source, index, f"paraphrase_prompts[{k}]")
        return {**record, "requested_rewrite": rewrite, "paraphrase_prompts": paraphrases}

    def _parsed(self, value: Any, source: str, index: int, field: str) -> Any:
        """A nested value as a dict/list: as loaded from JSON/Parquet, or JSON text in a CSV
        cell."""
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise self.bad_value(
                source, index, repr(field), "is text that is not JSON (a CSV cell holds it as JSON)"
            ) from None

    # ---- training and evaluation --------------------------------------------------------------
    @staticmethod
    def rewrite_prompt(record: dict) -> str:
        """``prompt`` with the subject in place of ``{}``."""
        rewrite = record["requested_rewrite"]
        return rewrite["prompt"].replace("{}", rewrite["subject"])

    @staticmethod
    def target(record: dict, which: str) -> str:
        """The completion of a target (``"target_new"`` or ``"target_true"``): ``" " + str``."""
        return " " + record["requested_rewrite"][which]["str"]

    def to_examples(self, records: list[dict]) -> list[dict]:
        return [
            {"prompt": self.rewrite_prompt(r), "completion": self.target(r, "target_new")}
            for r in records
        ]

    def evaluate(
        self, model: Any, tokenizer: Any, records: list[dict], *, batch_size: int = 16
    ) -> dict[str, float]:
        timer = Timer()
        # one (prompt, new, true) comparison per rewrite prompt, then per paraphrase prompt
        rewrite_prompts = [self.rewrite_prompt(r) for r in records]
        paraphrase_prompts, paraphrase_of = [], []
        for i, record in enumerate(records):
            paraphrase_prompts += record["paraphrase_prompts"]
            paraphrase_of += [i] * len(record["paraphrase_prompts"])
        owners = list(range(len(records))) + paraphrase_of
        prompts = rewrite_prompts + paraphrase_prompts
        new = [self.target(records[i], "target_new") for i in owners]
        true = [self.target(records[i], "target_true") for i in owners]
        scores = scoring.completion_logprobs(
            model, tokenizer, prompts + prompts, new + true, batch_size=batch_size
        )
        prefers_new = [scores[k][0] > scores[len(prompts) + k][0] for k in range(len(prompts))]
        n, n_para = len(records), len(paraphrase_prompts)
        return {
            "efficacy": share(sum(prefers_new[:n]), n),
            "paraphrase": share(sum(prefers_new[n:]), n_para),
            "examples": n,
            "examples_per_s": timer.rate(n),
        }
