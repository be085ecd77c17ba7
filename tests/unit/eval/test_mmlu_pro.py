"""MMLU-Pro: the official prompt and letter extraction, on all 12,032 questions and on hand-made outputs."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from hdpo_ray.eval.tasks import TaskDataError, get_task
from hdpo_ray.eval.tasks.mmlu_pro import LETTERS, MMLUPro, extract_answer, format_prompt
from tests.helpers import OFFICIAL_SHA256, shipped_eval_bytes


@pytest.fixture(scope="module")
def gold() -> list[tuple[dict, object]]:
    """(official record, loaded problem) for all 12,032 test questions, from the shipped copy of the official file."""
    text = shipped_eval_bytes("mmlu_pro/test.jsonl").decode()
    # not splitlines: one question holds U+0085
    records = [json.loads(line) for line in text.split("\n") if line.strip()]
    problems = MMLUPro().load()
    assert len(records) == len(problems) == 12032
    return list(zip(records, problems, strict=True))


def test_problems_carry_the_official_fields(gold):
    for record, problem in gold:
        assert problem.id == f"mmlu_pro/{record['question_id']}"
        assert problem.target == record["answer"] == LETTERS[record["answer_index"]]
        assert problem.category == record["category"]
        assert (
            f"\n{LETTERS[len(record['options']) - 1]}. {record['options'][-1]}\nAnswer: Let's think step by step."
            in problem.prompt
        )
    assert len({problem.id for _, problem in gold}) == 12032
    assert len({problem.category for _, problem in gold}) == 14


def test_gold_letters_score_and_wrong_letters_do_not(gold):
    task = MMLUPro()
    right = [
        task.score(
            problem,
            f"Let's think step by step. Option {problem.target} fits best, so the answer is ({problem.target}).",
        )
        for _, problem in gold
    ]
    assert sum(score.correct for score in right) == 12032
    assert all(score.extracted == problem.target for score, (_, problem) in zip(right, gold, strict=True))
    # The next letter, wrapping within the question's own options
    # (5 questions have a single option: none is wrong there).
    wrong = [
        task.score(problem, f"the answer is ({LETTERS[(LETTERS.index(problem.target) + 1) % len(record['options'])]})")
        for record, problem in gold
        if len(record["options"]) > 1
    ]
    assert len(wrong) == 12027 and sum(score.correct for score in wrong) == 0


def test_prompt_text():
    problem = MMLUPro().problem(
        {
            "question_id": 7,
            "question": "What is 2 + 2?",
            "options": ["3", "4", "N/A"],
            "answer": "B",
            "category": "math",
        },
        "test",
        0,
    )
    assert problem.prompt == (
        "The following is a multiple choice question (with answer) about math. "
        'Think step by step and then output the answer in the format of "The answer is (X)" at the end.\n\n'
        "Question:\nWhat is 2 + 2?\nOptions:\nA. 3\nB. 4\nAnswer: Let's think step by step."
    )  # the "N/A" padding option is dropped, as the official preprocess does
    assert (problem.id, problem.target, problem.category) == ("mmlu_pro/7", "B", "math")
    assert format_prompt("law", "Q?", ["x"]).endswith(
        "Question:\nQ?\nOptions:\nA. x\nAnswer: Let's think step by step."
    )


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("Newton's second law gives F = ma = 10 N. The answer is (C).", "C"),
        ("so the answer is C", "C"),  # parentheses optional
        ("Let me check each option.\nAnswer: D", "D"),  # extract_again
        ("**Answer: B**", "B"),
        (
            "Therefore, the answer is **(B)**, not A.",
            "B",
        ),  # "**" removed first, as the official 0-shot script (else: the last letter, A)
        ("Answer:\nE", "E"),  # \s* crosses the line break
        ("Step A: compute.\nAnswer: F\nNote: J is a distractor.", "F"),  # "Answer:" before the last letter
        ("The answer is (A). On reflection, the answer is (B).", "A"),  # official: the first "answer is"
        ("Options B and H both look plausible, but only H matches.", "H"),  # extract_final: last standalone capital
        ("ANSWER IS (C)", "C"),  # upper-case "ANSWER IS" misses the first regex; the last standalone capital is still C
        (
            "I think it is option c.",
            "I",
        ),  # official: lowercase letters are not read, and the pronoun "I" is a standalone A-J
        ("the answer is c", None),  # lowercase only, no capital A-J anywhere
        ("The answer is (K).", None),  # K is outside A-J and "The" is no standalone letter
        ("No idea.", None),
        ("", None),
    ],
)
def test_extraction_table(completion, expected):
    assert extract_answer(completion) == expected


def test_no_letter_scores_wrong():
    task = MMLUPro()
    problem = task.problem(
        {"question_id": 1, "question": "q", "options": ["a", "b"], "answer": "A", "category": "law"}, "test", 0
    )
    score = task.score(problem, "I cannot tell.")  # extracts "I", not A
    assert not score.correct and score.extracted == "I"
    assert task.score(problem, "it is (a).").extracted is None and not task.score(problem, "it is (a).").correct


def test_summarize_by_hand():
    records = [
        {"problem_id": "mmlu_pro/1", "category": "math", "correct": True},
        {"problem_id": "mmlu_pro/2", "category": "math", "correct": False},
        {"problem_id": "mmlu_pro/3", "category": "math", "correct": True},
        {"problem_id": "mmlu_pro/4", "category": "law", "correct": False},
        {"problem_id": "mmlu_pro/5", "category": "computer science", "correct": True},
    ]
    # overall 3 of 5; math 2 of 3; law 0 of 1; computer science 1 of 1
    assert MMLUPro().summarize(records) == {
        "accuracy": 0.6,
        "accuracy/computer science": 1.0,
        "accuracy/law": 0.0,
        "accuracy/math": 2 / 3,
    }
    assert MMLUPro().summarize([]) == {}


def test_registry_and_shipped_copy_equals_the_original():
    task = get_task("mmlu_pro")
    assert isinstance(task, MMLUPro) and task.name == "mmlu_pro"
    shipped = task.load()
    assert (
        hashlib.sha256(shipped_eval_bytes("mmlu_pro/test.jsonl")).hexdigest() == OFFICIAL_SHA256["mmlu_pro/test.jsonl"]
    )
    assert task.load(limit=3) == shipped[:3] and shipped[0].id == "mmlu_pro/70" and shipped[0].target == "I"


GOOD = {"question_id": 1, "question": "q", "options": ["a", "b", "c", "d"], "answer": "B", "category": "law"}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"options": []}, "field 'options' has 0 options, expected 1 to 10"),
        ({"options": [str(i) for i in range(11)]}, "field 'options' has 11 options, expected 1 to 10"),
        ({"options": ["N/A", "N/A"]}, "field 'options' has 0 options"),
        ({"options": ["a", 2]}, "field 'options' must be a list of strings"),
        ({"options": "a, b"}, "field 'options' is a str, expected list"),
        ({"answer": "E"}, "field 'answer' is 'E', expected one letter A..D for 4 options"),
        ({"answer": "K"}, "field 'answer' is 'K'"),
        ({"answer": "b"}, "field 'answer' is 'b'"),
        ({"answer": "AB"}, "field 'answer' is 'AB'"),
        ({"answer": ""}, "field 'answer' is ''"),
        ({"answer": 1}, "field 'answer' is a int, expected str"),
        (
            {"options": ["a", "N/A", "c"], "answer": "C"},
            "field 'answer' is 'C', expected one letter A..B for 2 options",
        ),
        ({"question_id": "1"}, "field 'question_id' is a str, expected int"),
        ({"category": None}, "field 'category' is missing"),
        ({"question": None}, "field 'question' is missing"),
    ],
)
def test_bad_record_names_file_and_line(tmp_path, change, message):
    path = tmp_path / "bad.jsonl"
    bad = {key: value for key, value in (GOOD | change).items() if value is not None}
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(TaskDataError, match=re.escape(f"{path}, line 2: {message}")):
        MMLUPro().load(str(path))


def test_a_repeated_question_id_is_a_data_error(tmp_path):
    """Samples are grouped by problem id: two problems under one id would merge their pass@k counts."""
    record = {
        "question_id": 1,
        "question": "q",
        "options": ["a", "b"],
        "answer": "A",
        "answer_index": 0,
        "category": "law",
        "src": "x",
    }
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(record | {"question": "r"}) + "\n")
    with pytest.raises(TaskDataError, match=r"test.jsonl, line 2: problem id mmlu_pro/1 appears twice"):
        MMLUPro().load(str(path))
