"""Tasks (`molf_ds.train.tasks`): the public datasets' schemas read from local files, the
prompts made from them, their metrics, and batched evaluation.

Expected values come from construction, not from the code under test: the fixtures in
tests/fixtures/ are made-up records in each dataset's real schema (CounterFact as a JSON array,
MedMCQA and Gretel as JSON lines), written again here as CSV/Parquet; metrics are checked with
models whose preferences are set by hand (a bigram table, an oracle that writes given answers);
batched generation and scoring are checked against one example at a time through plain
`model.generate` / a full forward pass on real tiny models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from molf_ds.errors import MoLFConfigError
from molf_ds.train import sql_task, tasks
from molf_ds.train.config import TASKS
from molf_ds.train.data import DataError
from molf_ds.train.tasks import scoring
from molf_ds.train.tokenizer import VOCAB_SIZE

FIXTURES = Path(__file__).parent / "fixtures"
SOURCES = {
    "sql": FIXTURES / "gretel_sql.jsonl",
    "med": FIXTURES / "medmcqa.jsonl",
    "fact": FIXTURES / "counterfact.json",
}
FIXTURE_RECORDS = 12


pytestmark = pytest.mark.usefixtures("datasets_cache")


def raw_records(name: str) -> list[dict]:
    """A fixture's records as its file holds them (no checks, no conversion)."""
    text = SOURCES[name].read_text()
    if SOURCES[name].suffix == ".json":
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_records(path: Path, records: list[dict]) -> str:
    """``records`` as a .jsonl/.json/.csv/.parquet file; in a CSV a nested value is JSON text."""
    import datasets
    import pandas

    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".csv":
        flat = [
            {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()}
            for r in records
        ]
        pandas.DataFrame(flat).to_csv(path, index=False)
    else:
        datasets.Dataset.from_list(records).to_parquet(str(path))
    return str(path)


def assert_one_line(message: str) -> None:
    assert len(message.splitlines()) == 1 and 0 < len(message) <= 600, repr(message)


# ---- names ------------------------------------------------------------------------------------
def test_get_every_task_and_refuse_unknown_names():
    assert tasks.NAMES == TASKS == ("sql", "med", "fact")
    for name in tasks.NAMES:
        task = tasks.get(name)
        assert task.name == name and "/" in task.hub_id
    with pytest.raises(MoLFConfigError, match="unknown task 'math': choose one of sql, med, fact"):
        tasks.get("math")


# ---- loading: every file format, the generated SQL task, the sources molf-train reads -----------
@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
@pytest.mark.parametrize("name", tasks.NAMES)
def test_fixture_reads_the_same_from_every_file_format(tmp_path, name, fmt):
    task = tasks.get(name)
    path = write_records(tmp_path / f"data.{fmt}", raw_records(name))
    records = task.load(path)
    assert len(records) == FIXTURE_RECORDS
    examples = task.to_examples(records)
    assert examples == task.to_examples(task.load(str(SOURCES[name])))
    assert len({e["prompt"] for e in examples}) == FIXTURE_RECORDS


def test_prompts_and_completions_follow_the_documented_formats():
    fact = tasks.get("fact")
    first = fact.load(str(SOURCES["fact"]))[0]
    assert fact.to_examples([first]) == [
        {"prompt": "The mother tongue of Ilse Marovny is", "completion": " Dutch"}
    ]
    assert first["paraphrase_prompts"][0] == "Ilse Marovny was born speaking"
    med = tasks.get("med")
    record = med.load(str(SOURCES["med"]))[0]
    assert med.to_examples([record]) == [
        {
            "prompt": "question: Which vitamin deficiency causes scurvy?\nA. Vitamin A\n"
            "B. Vitamin B12\nC. Vitamin C\nD. Vitamin D\nanswer:",
            "completion": " Vitamin C",
        }
    ]
    sql = tasks.get("sql")
    record = sql.load(str(SOURCES["sql"]))[0]
    assert sql.to_examples([record]) == [
        {
            "prompt": "schema: CREATE TABLE ships (id INT, name TEXT, tonnage INT);\n"
            "question: How many ships are there?\nsql:",
            "completion": " SELECT COUNT(*) FROM ships;",
        }
    ]


def test_generated_sql_is_the_embedded_task_in_gretels_schema():
    """One pipeline for generated and real data: the embedded generator writes Gretel records,
    whose prompts are the ones molf-train has always trained on."""
    task = tasks.get("sql")
    records = task.load("generated", seed=3, num_generated=300)
    assert all(set(r) == {"sql_context", "sql_prompt", "sql"} for r in records)
    assert records == sql_task.generate(300, seed=3)
    assert task.to_examples([{"sql_context": "t(a)", "sql_prompt": "how many?", "sql": "S;"}]) == [
        {"prompt": "schema: t(a)\nquestion: how many?\nsql:", "completion": " S;"}
    ]
    assert records != task.load("generated", seed=4, num_generated=300)
    with pytest.raises(DataError, match="num_generated"):
        task.load("generated", num_generated=10**6)


def test_training_records_default_sources_files_and_plain_prompt_completion(tmp_path):
    sql, med = tasks.get("sql"), tasks.get("med")
    generated = sql.load("generated", seed=1)
    for source in ("default", "sql", "generated"):  # data=sql: molf-train's original name
        records, scorer = tasks.training_records(sql, source, seed=1)
        assert records == generated and scorer is sql
    records, scorer = tasks.training_records(med, str(SOURCES["med"]))
    assert scorer is med and records == med.load(str(SOURCES["med"]))
    # a plain prompt/completion file trains as it is with any task, scored by loss only
    rows = [{"prompt": f"q{i}", "completion": f" a{i}", "extra": i} for i in range(5)]
    plain = write_records(tmp_path / "plain.jsonl", rows)
    for name in tasks.NAMES:
        records, scorer = tasks.training_records(tasks.get(name), plain)
        assert scorer is None
        assert records == [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    renamed = write_records(tmp_path / "renamed.csv", [{"q": "x", "a": " y"}])
    records, scorer = tasks.training_records(sql, renamed, prompt_field="q", completion_field="a")
    assert records == [{"prompt": "x", "completion": " y"}] and scorer is None


@pytest.mark.parametrize(
    ("task", "source", "match"),
    [
        ("med", "sql", "data=sql is the embedded SQL task; with task=med use data=default"),
        ("fact", "generated", "with task=fact use data=default .the hub dataset azhx/counterfact"),
        ("med", "neither", r"no 'opa' field \(fields: question, answer\); task=med reads MedMCQA"),
        ("fact", "neither", "has neither the fields of task=fact .CounterFact's schema"),
        ("sql", "neither", r"neither .* nor 'prompt'/'completion' \(fields: question, answer\)"),
    ],
)
def test_training_records_refuses_sources_that_do_not_fit_the_task(tmp_path, task, source, match):
    if source == "neither":
        source = write_records(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=match) as info:
        tasks.training_records(tasks.get(task), source)
    assert_one_line(str(info.value))


def _without(records: list[dict], field: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k != field} for r in records]


def _first_with(name: str, change) -> list[dict]:
    """The fixture's first record, changed (one record: a column of one type)."""
    record = json.loads(json.dumps(raw_records(name)[0]))
    change(record)
    return [record]


BAD_RECORDS = [
    ("sql", lambda: _without(raw_records("sql"), "sql_prompt"), "no 'sql_prompt' field"),
    ("sql", lambda: _first_with("sql", lambda r: r.update(sql=5)), "'sql' is int, not text"),
    ("med", lambda: _without(raw_records("med"), "cop"), "no 'cop' field"),
    ("med", lambda: _without(raw_records("med"), "opd"), "no 'opd' field"),
    ("med", lambda: _first_with("med", lambda r: r.update(cop=4)), "'cop' is 4, not 0-3"),
    ("med", lambda: _first_with("med", lambda r: r.update(cop=-1)), "'cop' is -1, no answer"),
    ("med", lambda: _first_with("med", lambda r: r.update(cop="b")), "'cop' is 'b', not an"),
    ("med", lambda: _first_with("med", lambda r: r.update(opb=None)), "'opb' is NoneType"),
    (
        "fact",
        lambda: _without(raw_records("fact"), "paraphrase_prompts"),
        "no 'paraphrase_prompts' field",
    ),
    (
        "fact",
        lambda: _first_with("fact", lambda r: r["requested_rewrite"]["target_true"].pop("str")),
        "requested_rewrite.target_true.str is NoneType, not text",
    ),
    (
        "fact",
        lambda: _first_with("fact", lambda r: r["requested_rewrite"].pop("subject")),
        "requested_rewrite.subject is NoneType",
    ),
    (
        "fact",
        lambda: _first_with("fact", lambda r: r["requested_rewrite"].update(prompt="Paris is")),
        r"requested_rewrite.prompt has no \{\} where the subject goes",
    ),
    (
        "fact",
        lambda: _first_with("fact", lambda r: r.update(paraphrase_prompts=[3])),
        r"paraphrase_prompts\[0\] is int",
    ),
]


@pytest.mark.parametrize(("name", "records", "match"), BAD_RECORDS)
def test_bad_records_are_one_line_naming_the_field_and_the_schema(tmp_path, name, records, match):
    task = tasks.get(name)
    path = write_records(tmp_path / "bad.jsonl", records())
    with pytest.raises(DataError, match=match) as info:
        task.load(path)
    message = str(info.value)
    assert_one_line(message)
    assert task.schema in message


def test_a_csv_cell_that_is_not_json_is_one_line(tmp_path):
    path = tmp_path / "bad.csv"
    rows = raw_records("fact")[:1]
    write_records(path, rows)
    text = path.read_text()
    assert '{""prompt""' in text  # the cell as CSV quotes JSON text
    path.write_text(text.replace('{""prompt""', "{prompt", 1))
    with pytest.raises(DataError, match="'requested_rewrite' is text that is not JSON"):
        tasks.get("fact").load(str(path))


@pytest.mark.parametrize(("name", "anchor"), [("med", b"Which"), ("fact", b"Ilse")])
def test_text_that_is_not_utf8_is_one_line(tmp_path, name, anchor):
    raw = SOURCES[name].read_bytes()
    at = raw.index(anchor)
    path = tmp_path / f"bad{SOURCES[name].suffix}"
    path.write_bytes(raw[:at] + b"\xff\xfe" + raw[at:])
    with pytest.raises(DataError, match="UTF-8") as info:
        tasks.get(name).load(str(path))
    assert_one_line(str(info.value))


@pytest.mark.parametrize("name", ["med", "fact"])
def test_hub_dataset_offline_is_one_line_pointing_at_a_local_file(monkeypatch, name):
    """The default source of med/fact is the hub; without network it is one line saying to pass
    a local file via data= (HF_HUB_OFFLINE set here, so nothing is even tried)."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    task = tasks.get(name)
    with pytest.raises(DataError) as info:
        tasks.training_records(task, "default")
    message = str(info.value)
    assert_one_line(message)
    assert f"could not load hub dataset '{task.hub_id}'" in message
    assert "pass a local .jsonl/.json/.csv/.parquet file with" in message
    assert "via data=PATH" in message and task.schema in message


# ---- metrics on models whose preferences are known by construction ---------------------------
class BigramLM(nn.Module):
    """A causal LM whose next-token logits depend only on the current token: ``table[prev]``.

    Log-probabilities of any text are then sums of ``log_softmax(table[prev])[next]``, which the
    tests compute by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        logits = self.table[input_ids]
        return CausalLMOutputWithPast(logits=logits[:, -logits_to_keep:])


def bigram_logprob(table: torch.Tensor, text: str, after: str) -> float:
    """log p(text | ...after) under `BigramLM` (byte tokenizer: one token per byte)."""
    previous = after.encode()[-1]
    total = 0.0
    for byte in text.encode():
        total += float(torch.log_softmax(table[previous], -1)[byte])
        previous = byte
    return total


def _uniform() -> torch.Tensor:
    return torch.zeros(VOCAB_SIZE, VOCAB_SIZE)


def test_completion_logprobs_equal_hand_computed_sums_in_any_batch_size(tok):
    table = torch.randn(VOCAB_SIZE, VOCAB_SIZE, generator=torch.Generator().manual_seed(1))
    model = BigramLM(table)
    prompts = ["a", "longer prompt here:", "xy", "schema: t(a)\nsql:", "q"]
    completions = [" b", " yes", " SELECT a FROM t;", "!", " zz top"]
    expected = [bigram_logprob(table, c, p) for p, c in zip(prompts, completions, strict=True)]
    for batch_size in (1, 2, 5):
        got = scoring.completion_logprobs(model, tok, prompts, completions, batch_size=batch_size)
        assert [n for _, n in got] == [len(c.encode()) for c in completions]
        for (total, _), want in zip(got, expected, strict=True):
            assert total == pytest.approx(want, abs=1e-4)


def _med_record(options: tuple[str, str, str, str], cop: int) -> dict:
    opa, opb, opc, opd = options
    return {"question": "q?", "opa": opa, "opb": opb, "opc": opc, "opd": opd, "cop": cop}


def test_med_accuracy_uses_per_token_likelihood_and_ties_go_to_the_earlier_option(tok):
    """Four records with known outcomes: (1) a 9-token option whose tokens are likely beats a
    2-token one per token although its sum is lower; (2)/(3) all options equally likely: the
    first is picked (right when cop=0, wrong when cop=3); (4) one option boosted."""
    table = _uniform()
    table[ord("z"), ord("z")] = 2.0  # "zz..." is likely once it has started
    table[ord(" "), ord("o")] = 3.0  # " o" is likely
    records = [
        _med_record(("q", "zzzzzzzz", "k", "k"), cop=1),
        _med_record(("a", "b", "c", "d"), cop=0),
        _med_record(("a", "b", "c", "d"), cop=3),
        _med_record(("m", "n", "o", "p"), cop=2),
    ]
    task = tasks.get("med")
    prompt = task.prompt(records[0])
    long_total = bigram_logprob(table, " zzzzzzzz", prompt)
    assert long_total < bigram_logprob(table, " q", prompt)  # by sum, option A would win
    for batch_size in (1, 3, 16):
        metrics = task.evaluate(BigramLM(table), tok, records, batch_size=batch_size)
        assert metrics["accuracy"] == 3 / 4
        assert metrics["examples"] == 4 and metrics["examples_per_s"] > 0


def _fact_record(new: str, true: str, paraphrases: list[str]) -> dict:
    rewrite = {
        "prompt": "{} speaks",
        "subject": "Someone",
        "target_new": {"str": new},
        "target_true": {"str": true},
    }
    return {"requested_rewrite": rewrite, "paraphrase_prompts": paraphrases}


def test_fact_efficacy_and_paraphrase_count_strict_preferences_for_the_new_target(tok):
    """Record 0 prefers its new target (" A" boosted), record 1 its true one (" G" boosted),
    record 2 neither (a tie is not a success): efficacy 1/3; paraphrase prompts follow their
    record: 2 of 4."""
    table = _uniform()
    table[ord(" "), ord("A")] = 3.0
    table[ord(" "), ord("G")] = 3.0
    records = [
        _fact_record("Ab", "Cd", ["One paraphrase", "Another one"]),
        _fact_record("Ef", "Gh", ["A third"]),
        _fact_record("Ij", "Kl", ["A tie"]),
    ]
    for batch_size in (1, 4, 16):
        metrics = tasks.get("fact").evaluate(BigramLM(table), tok, records, batch_size=batch_size)
        assert metrics["efficacy"] == 1 / 3 and metrics["paraphrase"] == 2 / 4
        assert metrics["examples"] == 3 and metrics["examples_per_s"] > 0
    no_paraphrases = [_fact_record("Ab", "Cd", [])]
    metrics = tasks.get("fact").evaluate(BigramLM(table), tok, no_paraphrases)
    assert metrics["efficacy"] == 1.0 and math.isnan(metrics["paraphrase"])


class OracleConfig(PretrainedConfig):
    model_type = "molf-test-oracle"


class OracleLM(PreTrainedModel, GenerationMixin):
    """A causal LM that writes a given answer after each known prompt, then eos: greedy
    generation's output is known by construction. It reads the whole (unpadded) sequence at
    every step instead of keeping a cache."""

    config_class = OracleConfig

    def __init__(self, answers: dict[tuple[int, ...], list[int]], eos: int) -> None:
        super().__init__(OracleConfig(vocab_size=VOCAB_SIZE, num_hidden_layers=1))
        self.answers, self.eos = answers, eos
        self.unused = nn.Parameter(torch.zeros(1))  # a device and dtype for generate

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, VOCAB_SIZE)
        if attention_mask is None:  # (generate leaves out a mask of ones)
            attention_mask = torch.ones_like(input_ids)
        rows = zip(input_ids.tolist(), attention_mask.tolist(), strict=True)
        for row, (ids, mask) in enumerate(rows):
            tokens = tuple(t for t, m in zip(ids, mask, strict=True) if m)
            prompt = next(p for p in self.answers if tokens[: len(p)] == p)
            answer, written = self.answers[prompt], len(tokens) - len(prompt)
            logits[row, -1, answer[written] if written < len(answer) else self.eos] = 10.0
        return CausalLMOutputWithPast(logits=logits)


def test_sql_exact_match_of_the_first_generated_line(tok):
    gold = [
        "SELECT COUNT(*) FROM ships;",
        "SELECT name FROM ships WHERE tonnage > 5000;",
        "SELECT MIN(depth) FROM wells;",
        "SELECT id FROM wells WHERE country = 'Norway';",
        "SELECT title FROM books WHERE year < 1950;",
        "SELECT SUM(amount) FROM donors;",
    ]
    written = [
        " SELECT COUNT(*) FROM ships;",  # right
        " select name  from ships where tonnage>5000",  # right: case and spacing only
        " SELECT MIN(depth) FROM wells;\nSELECT junk",  # right: the first line counts
        " SELECT id FROM wells WHERE country = 'norway';",  # wrong: a literal's case matters
        "\n SELECT title FROM books WHERE year < 1950;",  # wrong: the first line is empty
        " SELECT MAX(amount) FROM donors;",  # wrong
    ]
    task = tasks.get("sql")
    records = [
        {"sql_context": f"t{i}(a, b)", "sql_prompt": f"question {i}?" + "!" * i, "sql": sql}
        for i, sql in enumerate(gold)
    ]
    answers = {
        tuple(tok(task.prompt(r))["input_ids"]): tok(w, add_special_tokens=False)["input_ids"]
        for r, w in zip(records, written, strict=True)
    }
    model = OracleLM(answers, tok.eos_token_id).eval()
    for batch_size in (1, 4, 16):
        metrics = task.evaluate(model, tok, records, batch_size=batch_size)
        assert metrics["exact_match"] == 3 / 6 and metrics["examples"] == 6


# ---- batched == one at a time on real tiny models --------------------------------------------
def _tiny(preset: str):
    """A real tiny model of ``preset`` with large random weights and untied embeddings, so
    greedy outputs vary with the context (with the presets' small init, or Gemma's scaled tied
    embeddings, they repeat one token)."""
    import transformers

    from molf_ds.train.models import JOB_PRESETS

    model_preset = JOB_PRESETS[preset]
    shape = {**model_preset.fields, "num_hidden_layers": 2, "tie_word_embeddings": False}
    config = transformers.CONFIG_MAPPING[model_preset.model_type](
        vocab_size=VOCAB_SIZE + 5, initializer_range=0.3, **shape
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


PROMPTS = [
    "schema: employees(id, name, dept, salary)\nquestion: how many employees are there?\nsql:",
    "x",
    "The mother tongue of Ilse Marovny is",
    "question: q?\nA. a\nB. b\nC. c\nD. d\nanswer:",
    "ab",
    "a much longer prompt than the others, so that the batch is padded a lot on the left",
    "sql:",
]


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-llama", "tiny-gemma3"])
def test_batched_greedy_generation_equals_one_prompt_at_a_time(tok, preset):
    """Reference: plain `model.generate` on each prompt alone (no padding at all). The byte
    tokenizer pads on the right; batched generation must pad on the left with a mask."""
    model = _tiny(preset)
    expected = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        expected.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    assert len(set(expected)) == len(PROMPTS)  # outputs that differ: a mix-up would show
    for batch_size in (3, len(PROMPTS)):
        got = scoring.greedy_generate(model, tok, PROMPTS, batch_size=batch_size, max_new_tokens=24)
        assert got == expected


def test_generation_stops_at_the_models_window(tok):
    """An untrained model answers with runaway text: it must end where the model's positions
    end (the longest row of a batch fills the window), never past it, and a prompt that fills
    the window alone gets an empty answer. Reference: plain `model.generate` of each prompt
    alone with exactly the room its batch leaves."""
    model = _tiny("tiny-qwen2")
    window = 48
    model.config.max_position_embeddings = window
    prompts = [p for p in PROMPTS if len(tok(p)["input_ids"]) < window]
    prompts.append("y" * window)  # no room left at all

    def alone(prompt: str, room: int) -> str:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=room,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    pairs = list(zip(prompts, lengths, strict=True))
    got = scoring.greedy_generate(model, tok, prompts, batch_size=1, max_new_tokens=500)
    expected = [alone(p, window - n) if n < window else "" for p, n in pairs]
    assert got == expected and got[-1] == ""
    assert any(len(text) >= 10 for text in got)  # the cap bound; the model did not stop itself
    # one batch: every row gets the room its longest row leaves
    fits = [n for n in lengths if n < window]
    room = window - max(fits)
    batched = scoring.greedy_generate(model, tok, prompts, batch_size=64, max_new_tokens=500)
    expected = [alone(p, room) if n < window else "" for p, n in pairs]
    assert batched == expected


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-gemma3"])
def test_batched_scoring_equals_a_full_forward_of_each_sequence(tok, preset):
    model = _tiny(preset)
    completions = [" SELECT COUNT(*) FROM employees;", " y", " Dutch", " a", "c", " z", " x"]
    expected = []
    with torch.no_grad():
        for prompt, completion in zip(PROMPTS, completions, strict=True):
            p, c = tok(prompt)["input_ids"], tok(completion, add_special_tokens=False)["input_ids"]
            logprobs = torch.log_softmax(model(torch.tensor([p + c])).logits[0].float(), -1)
            expected.append(sum(float(logprobs[len(p) - 1 + k, t]) for k, t in enumerate(c)))
    for batch_size in (1, 4):
        got = scoring.completion_logprobs(model, tok, PROMPTS, completions, batch_size=batch_size)
        assert [total for total, _ in got] == pytest.approx(expected, abs=1e-4)


def test_length_batches_cover_every_index_once_longest_first():
    lengths = [3, 9, 1, 9, 5]
    batches = list(scoring.length_batches(lengths, 2))
    assert batches == [[1, 3], [4, 0], [2]]
    with pytest.raises(ValueError, match="batch_size=0"):
        list(scoring.length_batches(lengths, 0))


# ---- the evaluation at the end of molf-train ------------------------------------------------
def test_evaluate_merged_reports_loss_the_task_metric_and_examples_per_s(tmp_path, tok):
    """On a saved model, as molf-train evaluates its export: the held-out loss equals the
    model's own (Hugging Face) loss over the completions, token-weighted."""
    from molf_ds.train.evaluate import evaluate_merged

    model = _tiny("tiny-qwen2")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    task = tasks.get("med")
    records = task.load(str(SOURCES["med"]))[:5]
    result = evaluate_merged(tmp_path / "model", records, task=task, batch_size=2)
    assert set(result) == {"examples", "loss", "examples_per_s", "accuracy"}
    assert result["examples"] == 5 and result["examples_per_s"] > 0
    assert result["accuracy"] in {k / 5 for k in range(6)}
    total, count = 0.0, 0
    with torch.no_grad():
        for example in task.to_examples(records):
            p = tok(example["prompt"])["input_ids"]
            c = tok(example["completion"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p + c + [tok.eos_token_id]])
            labels = torch.tensor([[-100] * len(p) + c + [tok.eos_token_id]])
            total += float(model(input_ids=ids, labels=labels).loss) * (len(c) + 1)
            count += len(c) + 1
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    plain = task.to_examples(records)
    result = evaluate_merged(tmp_path / "model", plain, task=None, batch_size=2)
    assert set(result) == {"examples", "loss", "examples_per_s"}
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
