"""The OpenAI graders: values against hand computation and the reference libraries, the error
flags, and ``POST /fine_tuning/alpha/graders/run`` / ``/validate`` through the real platform."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import openai
import pytest
from nltk.translate.gleu_score import sentence_gleu
from rouge_score import rouge_scorer

from services.eval.grader_schemas import GraderHolder
from services.eval.graders import (
    GraderContext,
    cosine,
    make_sample,
    render,
    run_grader,
    string_check,
    text_similarity,
)
from tests.conftest import Project
from tests.helpers_eval import FakeJudge, letter_vector, register_judge, start_fake_judge


def grader(obj: dict):  # type: ignore[no-untyped-def]
    return GraderHolder.model_validate({"grader": obj}).grader


async def run(obj: dict, sample: str, item: object = None) -> dict:
    context = GraderContext(project_id="p")
    try:
        result = await run_grader(grader(obj), sample=make_sample(sample), item=item, context=context)
    finally:
        await context.close()
    return result.response()


# --- values -------------------------------------------------------------------------------------


def test_string_check_operations() -> None:
    assert string_check("eq", "Paris", "Paris") == 1.0 and string_check("eq", "Paris", "paris") == 0.0
    assert string_check("ne", "a", "b") == 1.0 and string_check("ne", "a", "a") == 0.0
    assert string_check("like", "The capital is Paris.", "Paris") == 1.0
    assert string_check("like", "The capital is PARIS.", "Paris") == 0.0
    assert string_check("ilike", "The capital is PARIS.", "paris") == 1.0


def test_text_similarity_by_hand_and_by_reference_library() -> None:
    # fuzzy_match: normalized Indel similarity; "kitten"/"sitting": 1 - 5/13 by hand.
    assert text_similarity("fuzzy_match", "kitten", "sitting") == pytest.approx(1 - 5 / 13)
    assert text_similarity("bleu", "the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert text_similarity("bleu", "completely different words", "the cat sat on the mat") < 0.1
    # rouge_1 F1 "the cat" vs "the cat sat": P=1, R=2/3 -> 0.8 by hand.
    assert text_similarity("rouge_1", "the cat", "the cat sat") == pytest.approx(0.8)
    # rouge_2 "the cat sat" vs "the cat ran": one shared bigram of two each -> 0.5.
    assert text_similarity("rouge_2", "the cat sat", "the cat ran") == pytest.approx(0.5)
    scorer = rouge_scorer.RougeScorer(["rougeL", "rouge5"])
    reference, hypothesis = "a b c d e f g h", "a b c x d e f g h"
    expected = scorer.score(reference, hypothesis)
    assert text_similarity("rouge_l", hypothesis, reference) == pytest.approx(expected["rougeL"].fmeasure)
    assert text_similarity("rouge_5", hypothesis, reference) == pytest.approx(expected["rouge5"].fmeasure)
    reference_words, hypothesis_words = "the cat sat on the mat", "the cat sat on a mat"
    gleu = sentence_gleu([reference_words.split()], hypothesis_words.split())
    assert text_similarity("gleu", "the cat sat on a mat", "the cat sat on the mat") == pytest.approx(gleu)


def test_cosine_by_hand() -> None:
    assert cosine([1, 0], [0, 1]) == 0.0
    assert cosine([1, 2], [2, 4]) == pytest.approx(1.0)
    assert cosine([1, 1], [1, 0]) == pytest.approx(1 / math.sqrt(2))


def test_templates_render_item_and_sample() -> None:
    sample = make_sample('{"city": "Paris", "n": 3}')
    item = {"answer": "Paris", "meta": {"tags": ["x", "y"]}}
    assert render("{{ item.answer }}={{sample.output_json.city}}", sample=sample, item=item) == "Paris=Paris"
    assert render("{{sample.output_json.n}} {{item.meta.tags.1}}", sample=sample, item=item) == "3 y"
    assert render("{{sample.output_json}}", sample=sample, item=item) == '{"city":"Paris","n":3}'


async def test_string_check_and_multi_formula() -> None:
    check = {
        "type": "string_check",
        "name": "exact",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "eq",
    }
    assert (await run(check, "Paris", {"answer": "Paris"}))["reward"] == 1.0
    multi = {
        "type": "multi",
        "name": "combined",
        "graders": {
            "exact": check,
            "fuzzy": {
                "type": "text_similarity",
                "name": "fuzzy",
                "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}",
                "evaluation_metric": "fuzzy_match",
            },
        },
        "calculate_output": "0.5 * exact + 0.5 * fuzzy",
    }
    answer = await run(multi, "kitten", {"answer": "sitting"})
    assert answer["reward"] == pytest.approx(0.5 * (1 - 5 / 13))
    assert answer["sub_rewards"] == {"exact": 0.0, "fuzzy": pytest.approx(1 - 5 / 13)}
    assert answer["metadata"]["type"] == "multi" and answer["metadata"]["name"] == "combined"


async def test_missing_template_variable_is_flagged_not_raised() -> None:
    check = {
        "type": "string_check",
        "name": "c",
        "input": "{{item.nope}}",
        "reference": "x",
        "operation": "eq",
    }
    answer = await run(check, "x", {"answer": 1})
    assert answer["reward"] == 0.0 and answer["metadata"]["errors"]["invalid_variable_error"] is True


async def test_python_grader_in_the_sandbox() -> None:
    source = (
        "def grade(sample, item):\n"
        "    return 1.0 if sample['output_json']['city'] == item['city'] else 0.25\n"
    )
    python = {"type": "python", "name": "py", "source": source}
    assert (await run(python, '{"city": "Paris"}', {"city": "Paris"}))["reward"] == 1.0
    assert (await run(python, '{"city": "Rome"}', {"city": "Paris"}))["reward"] == 0.25
    failing = await run({**python, "source": "def grade(sample, item):\n    return 1 / 0\n"}, "x")
    errors = failing["metadata"]["errors"]
    assert failing["reward"] == 0.0 and errors["python_grader_runtime_error"] is True
    assert "ZeroDivisionError" in errors["python_grader_runtime_error_details"]


# --- the HTTP routes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def judge() -> AsyncIterator[FakeJudge]:
    fake, server, task = await start_fake_judge()
    yield fake
    server.should_exit = True
    await task


@pytest.fixture
async def judged(project: Project, judge: FakeJudge, running) -> Project:  # type: ignore[no-untyped-def]
    async with project.client() as http:
        await register_judge(http, judge)
    running.platform.app.state.grader_embedding_model = "openpipe:judge/text-embedding-3-large"
    return project


def score_model(text: str, **extra: object) -> dict:
    return {
        "type": "score_model",
        "name": "judge",
        "model": "openpipe:judge/grader",
        "input": [
            {"role": "system", "content": "Score the answer from 0 to 1."},
            {"role": "user", "content": text},
        ],
        **extra,
    }


async def test_run_route_with_the_openai_sdk(judged: Project) -> None:
    client = openai.AsyncOpenAI(api_key=judged.key, base_url=judged.base_url, max_retries=0)
    answer = await client.fine_tuning.alpha.graders.run(
        grader={
            "type": "string_check",
            "name": "exact",
            "input": "{{sample.output_text}}",
            "reference": "{{item.answer}}",
            "operation": "ilike",
        },
        model_sample="The answer is PARIS",
        item={"answer": "paris"},
    )
    assert answer.reward == 1.0 and answer.metadata.errors.other_error is False
    assert answer.metadata.type == "string_check" and answer.metadata.execution_time >= 0
    validated = await client.fine_tuning.alpha.graders.validate(
        grader={
            "type": "text_similarity",
            "name": "b",
            "input": "x",
            "reference": "y",
            "evaluation_metric": "bleu",
        }
    )
    assert validated.grader.type == "text_similarity"


async def test_score_and_label_model_graders_through_the_router(judged: Project, judge: FakeJudge) -> None:
    async with judged.client() as http:
        scored = (
            await http.post(
                "/fine_tuning/alpha/graders/run",
                json={"grader": score_model("{{sample.output_text}} [score=0.7]"), "model_sample": "Paris"},
            )
        ).json()
        assert scored["reward"] == pytest.approx(0.7), scored
        usage = scored["model_grader_token_usage_per_model"]["openpipe:judge/grader"]
        assert usage["total_tokens"] == 25 and scored["metadata"]["token_usage"] == 25
        sent = judge.requests[-1]
        assert sent["messages"][1]["content"] == "Paris [score=0.7]"
        assert sent["response_format"]["json_schema"]["name"] == "score_model"

        out_of_range = (
            await http.post(
                "/fine_tuning/alpha/graders/run",
                json={"grader": score_model("[score=7]"), "model_sample": "x"},
            )
        ).json()
        assert out_of_range["reward"] == 0 and out_of_range["metadata"]["errors"]["model_grader_parse_error"]
        ranged = (
            await http.post(
                "/fine_tuning/alpha/graders/run",
                json={"grader": score_model("[score=7]", range=[0, 10]), "model_sample": "x"},
            )
        ).json()
        assert ranged["reward"] == 7
        refused = (
            await http.post(
                "/fine_tuning/alpha/graders/run",
                json={"grader": score_model("[refuse]"), "model_sample": "x"},
            )
        ).json()
        assert refused["metadata"]["errors"]["model_grader_refusal_error"] is True

        label = {
            "type": "label_model",
            "name": "sentiment",
            "model": "openpipe:judge/grader",
            "labels": ["positive", "negative"],
            "passing_labels": ["positive"],
            "input": [{"role": "user", "content": "{{sample.output_text}}"}],
        }
        good = await http.post(
            "/fine_tuning/alpha/graders/run", json={"grader": label, "model_sample": "great [label=positive]"}
        )
        bad = await http.post(
            "/fine_tuning/alpha/graders/run", json={"grader": label, "model_sample": "meh [label=negative]"}
        )
        assert good.json()["reward"] == 1.0 and bad.json()["reward"] == 0.0


async def test_cosine_uses_embeddings_through_the_router(judged: Project, judge: FakeJudge) -> None:
    body = {
        "grader": {
            "type": "text_similarity",
            "name": "cos",
            "input": "{{sample.output_text}}",
            "reference": "{{item.reference}}",
            "evaluation_metric": "cosine",
        },
        "model_sample": "ab",
        "item": {"reference": "aab"},
    }
    async with judged.client() as http:
        answer = (await http.post("/fine_tuning/alpha/graders/run", json=body)).json()
        direct = await http.post("/embeddings", json={"model": "openpipe:judge/e", "input": "abc"})
    expected = cosine(letter_vector("ab"), letter_vector("aab"))
    assert answer["reward"] == pytest.approx(expected), answer
    assert direct.status_code == 200 and direct.json()["data"][0]["embedding"][:3] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("grader_obj", "param"),
    [
        (
            {"type": "string_check", "name": "x", "input": "a", "reference": "b", "operation": "regex"},
            "operation",
        ),
        (
            {
                "type": "string_check",
                "name": "x",
                "input": "{{foo.bar}}",
                "reference": "b",
                "operation": "eq",
            },
            "input",
        ),
        ({"type": "python", "name": "x", "source": "def grade(:"}, "source"),
        ({"type": "python", "name": "x", "source": "def other(): pass"}, "source"),
        (
            {
                "type": "label_model",
                "name": "x",
                "model": "m",
                "labels": ["a"],
                "passing_labels": ["b"],
                "input": [{"role": "user", "content": "x"}],
            },
            "passing_labels",
        ),
        (
            {
                "type": "multi",
                "name": "m",
                "graders": {
                    "a": {
                        "type": "string_check",
                        "name": "a",
                        "input": "x",
                        "reference": "x",
                        "operation": "eq",
                    }
                },
                "calculate_output": "a + b",
            },
            "calculate_output",
        ),
        (
            {
                "type": "multi",
                "name": "m",
                "graders": {
                    "a": {
                        "type": "string_check",
                        "name": "a",
                        "input": "x",
                        "reference": "x",
                        "operation": "eq",
                    }
                },
                "calculate_output": "__import__('os')",
            },
            "calculate_output",
        ),
        (
            {
                "type": "text_similarity",
                "name": "m",
                "input": "a",
                "reference": "b",
                "evaluation_metric": "meteor",
            },
            "evaluation_metric",
        ),
        ({"type": "nope", "name": "x"}, "grader"),
    ],
)
async def test_invalid_graders_are_400s_naming_the_field(
    project: Project, grader_obj: dict, param: str
) -> None:
    async with project.client() as http:
        for path, body in (
            ("/fine_tuning/alpha/graders/validate", {"grader": grader_obj}),
            ("/fine_tuning/alpha/graders/run", {"grader": grader_obj, "model_sample": "x"}),
        ):
            response = await http.post(path, json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert param in (error["param"] or "") or param in error["message"], error
    if param == "evaluation_metric":
        assert "wordnet" in error["message"]


async def test_graders_routes_need_a_key_and_a_body(running) -> None:  # type: ignore[no-untyped-def]
    import httpx

    async with httpx.AsyncClient(base_url=running.base_url) as http:
        assert (await http.post("/fine_tuning/alpha/graders/run", json={})).status_code == 401
    async with httpx.AsyncClient(
        base_url=running.base_url, headers={"Authorization": "Bearer opk_test_bootstrap_key"}
    ) as http:
        missing = await http.post("/fine_tuning/alpha/graders/run", json={"grader": {"type": "string_check"}})
        assert missing.status_code == 400 and "model_sample" in missing.text
        broken = await http.post(
            "/fine_tuning/alpha/graders/run",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert broken.status_code == 400
