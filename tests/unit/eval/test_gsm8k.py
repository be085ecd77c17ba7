"""GSM8K: the official gold solutions all score, perturbed ones never do, and free-text answers are read exactly."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from hdpo_ray.eval.tasks import TaskDataError, get_task
from hdpo_ray.eval.tasks.gsm8k import GSM8K, canonical, extract_answer
from tests.helpers import OFFICIAL_SHA256, shipped_eval_bytes


@pytest.fixture(scope="module")
def gold() -> list[tuple[dict, object]]:
    """(official record, loaded problem) for all 1319 test problems, from the shipped copy of the official file."""
    records = [json.loads(line) for line in shipped_eval_bytes("gsm8k/test.jsonl").decode().split("\n") if line.strip()]
    problems = GSM8K().load()
    assert len(records) == len(problems) == 1319
    return list(zip(records, problems, strict=True))


def _final_number(answer: str) -> int:
    return int(answer.rpartition("####")[2].strip().replace(",", ""))  # every gold answer is an integer, some "1,600"


def test_registry_and_first_problem():
    task = get_task("gsm8k")
    first = task.load(limit=1)[0]
    assert isinstance(task, GSM8K) and task.name == "gsm8k"
    # Janet's ducks: 16 - 3 - 4 = 9 eggs at $2
    assert first.id == "gsm8k/0" and first.target == "18" and first.category == ""
    assert first.prompt.startswith("Janet’s ducks lay 16 eggs per day.") and first.prompt.endswith(
        'in the form "#### <number>".'
    )


def test_every_official_solution_scores(gold):
    task = GSM8K()
    scores = [task.score(problem, record["answer"]) for record, problem in gold]
    assert sum(score.correct for score in scores) == 1319
    assert all(score.extracted == problem.target for score, (_, problem) in zip(scores, gold, strict=True))
    # Spot checks of the canonical targets: commas dropped, negatives kept.
    targets = {problem.target for _, problem in gold}
    assert {"1450000", "-10", "-3", "1600"} <= targets


def test_every_solution_scores_without_the_hashes(gold):
    # The other two readings on real solutions: "The answer is N." (tier 2) and a bare trailing number (tier 3).
    task = GSM8K()
    for record, problem in gold:
        body, _, number = record["answer"].rpartition("####")
        assert task.score(problem, f"{body}The answer is {number.strip()}.").correct, problem.id
        assert task.score(problem, f"{body}{number.strip()}").correct, problem.id


def test_perturbed_solutions_never_score(gold):
    task = GSM8K()
    for record, problem in gold:
        body, _, _ = record["answer"].rpartition("####")
        number = _final_number(record["answer"])
        assert not task.score(problem, f"{body}#### {number + 1}").correct, problem.id
        # 10 * N + 5 (or 10 * N - 5) is never N
        assert not task.score(problem, f"{body}#### {number}5").correct, problem.id


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("Janet has 16 - 3 - 4 = 9 eggs.\n9 * 2 = 18\n#### 18", "18"),
        ("#### 1,234", "1234"),
        ("####**$18**", "18"),
        ("#### -5", "-5"),
        ("#### 10\n\nQuestion: Another problem.\n#### 20", "10"),  # the first ####, as the official scorer
        ("So the total is 42 apples. The answer is 42.", "42"),
        ("The answer is: $1,234.50.", "1234.5"),
        ("**Answer:** 18", "18"),
        ("Answer: -7", "-7"),
        ("ANSWER IS 12", "12"),  # case-insensitive
        ("The answer is\n\n**42**", "42"),
        ("Final Answer: The final answer is $\\boxed{18}$. I hope it is correct.", "18"),
        ("The answer is 5. Wait, 3 + 3 = 6, so the answer is 6 apples.", "6"),  # the last "answer is"
        (
            "The answer is the number of eggs left: 16 - 7 = 9",
            "9",
        ),  # "answer is" without a number falls back to the last number
        ("She pays $1,250 in total.", "1250"),
        ("It costs €3.50 per kilo.", "3.5"),
        ("He makes 18 dollars.", "18"),
        ("The box weighs 5kg", "5"),
        ("That is 50% of the class", "50"),
        ("So she has 7.", "7"),
        ("The total is 3.50", "3.5"),
        ("**18**", "18"),
        ("The temperature drops to −5 degrees", "-5"),  # unicode minus
        ("She lost -$5 on the trade", "-5"),
        ("20-15=5", "5"),  # subtraction, not "-15"
        ("Half of it: 1/2", "0.5"),
        ("a third: 1/3", "1/3"),
        ("the date 1/2/2024", "1"),  # dates are not fractions; only the 1 before the first slash reads as a number
        ("It takes .5 hours", "0.5"),
        ("Use version v1.5 of x2", None),  # numbers glued to words are not answers
        ("I do not know.", None),
        ("", None),
    ],
)
def test_extraction_table(completion, expected):
    assert extract_answer(completion) == expected


def test_comparison_is_numeric_and_exact():
    task = GSM8K()
    problem = GSM8K().problem({"question": "q", "answer": "x\n#### 3.5"}, "test", 0)
    assert problem.target == "3.5"
    assert task.score(problem, "#### 3.50").correct and task.score(problem, "The answer is $3.5").correct
    assert task.score(problem, "#### 7/2").correct  # 7/2 is 3.5 exactly
    assert not task.score(problem, "#### 3.5000001").correct
    tenth = GSM8K().problem({"question": "q", "answer": "x\n#### 0.3"}, "test", 0)
    assert not task.score(tenth, "#### 0.30000000000000001").correct  # float("0.30000000000000001") == float("0.3")
    eighteen = GSM8K().problem({"question": "q", "answer": "x\n#### 18"}, "test", 0)
    assert task.score(eighteen, "18.00").correct and task.score(eighteen, "18.").correct
    score = task.score(eighteen, "no number")
    assert not score.correct and score.extracted is None


def test_canonical_forms():
    from fractions import Fraction

    assert [canonical(Fraction(v)) for v in ("18", "18.00", "-3.50", "1/80", "1/3", "-0", "123456.789")] == [
        "18",
        "18",
        "-3.5",
        "0.0125",
        "1/3",
        "0",
        "123456.789",
    ]


def test_shipped_copy_is_the_official_file():
    assert hashlib.sha256(shipped_eval_bytes("gsm8k/test.jsonl")).hexdigest() == OFFICIAL_SHA256["gsm8k/test.jsonl"]


def test_limit_and_ids_are_positions(tmp_path):
    full = GSM8K().load()
    assert GSM8K().load(limit=5) == full[:5] and [p.id for p in full[:5]] == [f"gsm8k/{i}" for i in range(5)]
    with pytest.raises(TaskDataError, match="holds no problems"):  # nothing to evaluate is an error, not an empty table
        GSM8K().load(limit=0)
    # Ids count records, not lines: a blank line does not skip an id.
    path = tmp_path / "test.jsonl"
    path.write_text('{"question": "a", "answer": "#### 1"}\n\n{"question": "b", "answer": "#### 2"}\n')
    assert [(p.id, p.target) for p in GSM8K().load(str(path))] == [("gsm8k/0", "1"), ("gsm8k/1", "2")]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"question": "c"}', "field 'answer' is missing"),
        ('{"answer": "#### 3"}', "field 'question' is missing"),
        ('{"question": "c", "answer": 3}', "field 'answer' is a int"),
        ('{"question": "c", "answer": "three"}', "does not end in '#### <number>'"),
        ('{"question": "c", "answer": "#### three"}', "does not end in '#### <number>'"),
    ],
)
def test_bad_record_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "#### 1"}\n{"question": "b", "answer": "#### 2"}\n' + bad_line + "\n")
    with pytest.raises(TaskDataError, match=re.escape(f"{path}, line 3: ") + ".*" + re.escape(message)):
        GSM8K().load(str(path))
    assert len(GSM8K().load(str(path), limit=2)) == 2  # the bad row is never read
