"""IFEval: every instruction checker on hand-made responses, strict vs loose scoring, data errors, and the
GPT-4 responses shipped with IFEval scored close to the published aggregate numbers."""

from __future__ import annotations

import gzip
import hashlib
import json

import pytest

from hdpo_ray.eval.tasks import TaskDataError, get_task
from hdpo_ray.eval.tasks.ifeval import CHECKERS, loose_variants
from hdpo_ray.eval.tasks.ifeval.text import count_words, split_sentences, word_tokenize
from tests.helpers import OFFICIAL_SHA256, data_file, shipped_eval_bytes

# (instruction id, kwargs as in input_data.jsonl, a response that follows it, one that does not)
CASES = [
    (
        "keywords:existence",
        {"keywords": ["planet", "orbit"]},
        "The planet's ORBIT is an ellipse.",
        "The planet is round.",
    ),
    (
        "keywords:frequency",
        {"keyword": "right", "frequency": 2, "relation": "less than"},
        "You are right.",
        "Right, you are right.",
    ),
    (
        "keywords:frequency",
        {"keyword": "tree", "frequency": 3, "relation": "at least"},
        "A tree, a Tree, trees.",
        "A tree and a tree.",
    ),
    (
        "keywords:forbidden_words",
        {"forbidden_words": ["damn", "youngins"]},
        "Damnation is not the word.",
        "Them youngins, damn.",
    ),
    (
        "keywords:letter_frequency",
        {"letter": "#", "let_frequency": 4, "let_relation": "at least"},
        "#a #b #c #d",
        "#a #b #c",
    ),
    (
        "keywords:letter_frequency",
        {"letter": "l", "let_frequency": 3, "let_relation": "less than"},
        "Hello there",
        "Lull all",
    ),
    (
        "language:response_language",
        {"language": "de"},
        "Das Wetter ist heute sehr schön und wir gehen in den Park.",
        "The weather is very nice today and we are going to the park.",
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": "less than"},
        "It rains. We stay in.",
        "It rains. We stay in. We read.",
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "at least"},
        "Dr. Smith came. He sat.",
        "Dr. Smith came at 5 p.m. on Monday.",
    ),
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 2},
        "First part.\n***\nSecond part.",
        "First.\n***\n\n***\nSecond.",
    ),
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": "at least"},
        "one two three four five",
        "one two three, four",
    ),
    ("length_constraints:number_words", {"num_words": 4, "relation": "less than"}, "don't stop", "don't stop now"),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "bonding"},
        'Intro.\n\n"Bonding," she said.\n\nEnd.',
        "Intro.\n\nBonding matters.\n\nMiddle.\n\nEnd.",
    ),
    (
        "detectable_content:number_placeholders",
        {"num_placeholders": 2},
        "Dear [name], see you at [address].",
        "Dear [name], see you.",
    ),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n\np. s. See you.", "Hi. PS see you."),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.S. one\nP.P.S two", "Hi.\nP.S. one"),
    ("detectable_format:constrained_response", {}, "Hmm. My answer is maybe.", "My answer is: yes."),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', 'Here it is: {"a": 1}'),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nA\nSection 2\nB",
        "Section 1\nA\nsection 2\nB",
    ),
    (
        "detectable_format:number_bullet_lists",
        {"num_bullets": 3},
        "* one\n* two\n- three\n**Bold** line",
        "* one\n* two",
    ),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*a* and **b**", "*a* and ** ** and **"),
    ("detectable_format:title", {}, "<<Poem of Joy>>\nRoses are red.", "<< >>\nRoses are red."),
    (
        "combination:repeat_prompt",
        {"prompt_to_repeat": "Write a haiku about rain."},
        "write a haiku about rain. Drops fall...",
        "Sure! Write a haiku about rain.",
    ),
    ("combination:two_responses", {}, "Answer A\n******\nAnswer B", "Answer A\n******\nAnswer A"),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        '"That is all. Any other questions?"',
        "Any other questions? That is all.",
    ),
    ("startend:quotation", {}, '"Hello there."', "Hello there."),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 3, "capital_relation": "at least"},
        "DON'T do THAT.",
        "Don't do THAT.",
    ),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "less than"},
        "Keep CALM and carry on.",
        "KEEP CALM and carry on.",
    ),
    (
        "change_case:english_capital",
        {},
        "THE WEATHER IS VERY NICE TODAY AND WE ARE GOING TO THE PARK.",
        "The weather is very nice today and we are going to the park.",
    ),
    (
        "change_case:english_lowercase",
        {},
        "the weather is very nice today and we are going to the park.",
        "the weather is very nice today and we are going to the Park.",
    ),
    ("punctuation:no_comma", {}, "No commas here; none at all.", "Yes, there is one."),
]


@pytest.fixture(scope="module")
def task():
    return get_task("ifeval")


def problem_of(task, instruction_id, kwargs, key=1, prompt="Do it."):
    record = {"key": key, "prompt": prompt, "instruction_id_list": [instruction_id], "kwargs": [kwargs]}
    return task.problem(record, "test.jsonl, line 1", 0)


@pytest.mark.parametrize(
    ("instruction_id", "kwargs", "follows", "fails"), CASES, ids=[f"{case[0]}-{i}" for i, case in enumerate(CASES)]
)
def test_each_checker_accepts_a_following_response_and_rejects_another(task, instruction_id, kwargs, follows, fails):
    problem = problem_of(task, instruction_id, kwargs)
    assert task.score(problem, follows).details["strict"] == [True]
    assert task.score(problem, fails).details["strict"] == [False]


def test_every_instruction_of_the_shipped_data_has_a_checker_and_a_case(task):
    used = {instruction_id for problem in task.load() for instruction_id in problem.target["instruction_id_list"]}
    assert len(used) == 25
    assert used == set(CHECKERS) == {case[0] for case in CASES}


def test_shipped_copy_is_the_official_file():
    assert (
        hashlib.sha256(shipped_eval_bytes("ifeval/input_data.jsonl")).hexdigest()
        == OFFICIAL_SHA256["ifeval/input_data.jsonl"]
    )


def test_shipped_data_loads_as_problems(task):
    problems = task.load()
    assert len(problems) == 541
    first = problems[0]
    assert first.id == "ifeval/1000" and first.prompt.startswith("Write a 300+ word summary")
    assert first.target["instruction_id_list"][0] == "punctuation:no_comma"
    assert first.target["kwargs"][2] == {"relation": "at least", "num_words": 300}


def test_loose_scoring_rescues_a_response_with_an_extra_first_line_or_markdown(task):
    quoted = problem_of(task, "startend:quotation", {})
    score = task.score(quoted, 'Sure, here it is:\n"Roses are red, violets are blue."')
    assert score.details == {"instruction_ids": ["startend:quotation"], "strict": [False], "loose": [True]}
    assert score.correct is False  # correct is the prompt-level strict verdict

    ending = problem_of(task, "startend:end_checker", {"end_phrase": "Is there anything else I can help with?"})
    score = task.score(ending, "Done.\n**Is there anything else I can help with?**")
    assert (score.details["strict"], score.details["loose"]) == ([False], [True])  # rescued by removing the "*"

    never = task.score(quoted, "Roses are red.\nViolets are blue.")
    assert (never.details["strict"], never.details["loose"]) == ([False], [False])


def test_loose_variants_are_the_official_eight():
    variants = loose_variants("Sure:\n*a*\nb\nBye")
    assert variants == [
        "Sure:\n*a*\nb\nBye",
        "Sure:\na\nb\nBye",
        "*a*\nb\nBye",
        "Sure:\n*a*\nb",
        "*a*\nb",
        "a\nb\nBye",
        "Sure:\na\nb",
        "a\nb",
    ]


def test_a_blank_response_follows_nothing(task):
    problem = problem_of(task, "keywords:forbidden_words", {"forbidden_words": ["damn"]})
    assert task.score(problem, " \n").details["loose"] == [False]


def test_a_prompt_is_followed_only_when_all_its_instructions_are(task):
    record = {
        "key": 7,
        "prompt": "p",
        "instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
        "kwargs": [{}, {}],
    }
    problem = task.problem(record, "x", 0)
    assert task.score(problem, '"No commas here."').correct is True
    score = task.score(problem, '"Yes, a comma."')
    assert score.correct is False and score.details["strict"] == [False, True]


def test_none_valued_kwargs_are_dropped_as_in_the_hugging_face_layout(task):
    kwargs = {"num_highlights": None, "relation": None, "num_words": 3, "keyword": None}
    problem = problem_of(task, "length_constraints:number_words", kwargs | {"relation": "at least"})
    assert problem.target["kwargs"] == [{"num_words": 3, "relation": "at least"}]
    assert task.score(problem, "one two three").correct


def test_an_unknown_instruction_is_a_data_error_naming_the_row(task, tmp_path):
    path = tmp_path / "input_data.jsonl"
    good = {"key": 1, "prompt": "a", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    bad = {"key": 2, "prompt": "b", "instruction_id_list": ["keywords:rhymes"], "kwargs": [{}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(TaskDataError, match=r"input_data\.jsonl, line 2: unknown instruction id 'keywords:rhymes'"):
        task.load(str(path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keyword": "x", "frequency": 2, "relation": "at most"}, "relation must be one of"),
        ({"keyword": "x", "frequency": 2}, "missing 1 required keyword-only argument: 'relation'"),
        ({"keyword": "x", "frequency": "2", "relation": "at least"}, "kwarg 'frequency' is a str, expected int"),
        (
            {"keyword": "x", "frequency": 2, "relation": "at least", "letter": "a"},
            "unexpected keyword argument 'letter'",
        ),
    ],
)
def test_kwargs_that_do_not_fit_are_data_errors(task, kwargs, message):
    with pytest.raises(TaskDataError, match=f"test.jsonl, line 1: keywords:frequency: .*{message}"):
        problem_of(task, "keywords:frequency", kwargs)


def test_summarize_gives_prompt_and_instruction_level_accuracies(task):
    records = [
        {"problem_id": "ifeval/1", "correct": True, "details": {"strict": [True, True], "loose": [True, True]}},
        {"problem_id": "ifeval/2", "correct": False, "details": {"strict": [False, True], "loose": [True, True]}},
        {"problem_id": "ifeval/3", "correct": False, "details": {"strict": [False], "loose": [False]}},
        {
            "problem_id": "ifeval/4",
            "correct": False,
            "details": {"strict": [True, False, True], "loose": [True, False, True]},
        },
    ]
    assert task.summarize(records) == {
        "prompt_strict": 0.25,
        "instruction_strict": 5 / 8,
        "prompt_loose": 0.5,
        "instruction_loose": 6 / 8,
    }
    assert task.summarize([]) == {}


def test_sentences_follow_punkt_not_lines():
    # punkt ends sentences only at . ? ! followed by a space: a title or list line runs into the next sentence.
    assert split_sentences("Title\n\nIt rains. We stay in! Do we? Yes...") == [
        "Title\n\nIt rains.",
        "We stay in!",
        "Do we?",
        "Yes...",
    ]
    assert split_sentences("Dr. Smith left at 5 p.m. on Monday. He slept.") == [
        "Dr. Smith left at 5 p.m. on Monday.",
        "He slept.",
    ]
    assert split_sentences("Wait... What now?") == ["Wait...", "What now?"]
    # Like the English model, which does not know "e.g" as an abbreviation.
    assert split_sentences("Fruit, e.g. apples. Yes.") == ["Fruit, e.g.", "apples.", "Yes."]


def test_words_are_counted_and_tokenized_as_the_official():
    assert count_words("Don't stop, e-mail me at 5:30!") == 9  # don t stop e mail me at 5 30
    assert word_tokenize("DON'T STOP. GO-GO, NOW.") == ["DO", "N'T", "STOP", ".", "GO-GO", ",", "NOW", "."]


# IFEval paper (arXiv 2311.07911), Table: GPT-4 prompt-level strict 76.89, instruction-level strict 83.57,
# prompt-level loose 79.30, instruction-level loose 85.37 (percent).
PUBLISHED_GPT4 = {
    "prompt_strict": 76.89,
    "instruction_strict": 83.57,
    "prompt_loose": 79.30,
    "instruction_loose": 85.37,
}
# 0.75 points is 4 of the 541 prompts and 6 of the 834 instructions. Known differences from the published run:
# - key 2785 was revised after the responses were generated ("at least one placeholder" became "at least 3"):
#   its response, with one placeholder, now fails (1 prompt, 1 instruction, strict and loose);
# - the code of the paper replaced a non-letter `letter` kwarg ("#" of key 1122, "!" of key 1129) by a random
#   letter; the current official code (and this port) counts the "#" and "!" (up to 2 prompts, 2 instructions);
# - the official run's langdetect was unseeded (verdicts of short texts can flip between runs);
# - the response file here differs from the original by one character (at most 1 prompt);
# - NLTK's English punkt model is replaced (ifeval/text.py): no verdict of these responses changes with it.
TOLERANCE_POINTS = 0.75


def test_gpt4_responses_score_close_to_the_published_numbers(task):
    problems = task.load()
    with gzip.open(
        data_file("ifeval/input_response_data_gpt4_20231107_145030.jsonl.gz"), "rt", encoding="utf-8"
    ) as handle:
        responses = [json.loads(line) for line in handle]
    assert len(responses) == len(problems) == 541
    # The official pairs responses with prompts by prompt text; the rows are in the same order, and only the
    # prompt of key 2785 (revised later) differs, so pair them by position.
    assert sum(problem.prompt != response["prompt"] for problem, response in zip(problems, responses, strict=True)) == 1
    records = []
    for problem, response in zip(problems, responses, strict=True):
        score = task.score(problem, response["response"])
        records.append({"problem_id": problem.id, "correct": score.correct, "details": score.details})
    assert sum(len(record["details"]["strict"]) for record in records) == 834

    measured = {name: round(100 * value, 2) for name, value in task.summarize(records).items()}
    print(f"GPT-4 IFEval: measured {measured}, published {PUBLISHED_GPT4}")
    for name, published in PUBLISHED_GPT4.items():
        assert abs(measured[name] - published) <= TOLERANCE_POINTS, (name, measured[name], published)
