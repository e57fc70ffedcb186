"""``POST /datasets/{id}/export`` is a job with progress, reading entries in primary-key order."""

from __future__ import annotations

import orjson

from services.api.dataset_files import service as files
from services.api.datasets.rows import to_training_row
from tests.conftest import Project, RunningPlatform, wait_until
from tests.helpers import assert_error, export_and_wait, new_dataset

PAGES = 2 * files.ENTRY_PAGE + 500  # three pages: the keyset continues across page ends


def row(i: int) -> dict:
    return {
        "messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"{i}"}],
        "metadata": {"i": str(i)},
    }


async def test_export_job_writes_every_entry_in_the_order_they_were_added(
    running: RunningPlatform, project: Project
) -> None:
    async with project.client() as client:
        dataset_id = await new_dataset(client, "ordered")
        for start in range(0, PAGES, 1000):
            batch = [row(i) for i in range(start, min(start + 1000, PAGES))]
            added = await client.post(f"/datasets/{dataset_id}/entries", json={"entries": batch})
            assert added.json()["entries_created"] == len(batch), added.text
        export = await export_and_wait(client, dataset_id)
        assert export["entry_count"] == PAGES
        body = (await client.get(export["download"].removeprefix("/api/v1"))).content
    lines = [orjson.loads(line) for line in body.splitlines()]
    assert [int(line["metadata"]["i"]) for line in lines] == list(range(PAGES))
    assert len(body) == export["bytes"]


async def test_export_of_a_dataset_deleted_meanwhile_ends_quietly(project: Project) -> None:
    async with project.client() as client:
        dataset_id = await new_dataset(client, "doomed")
        added = await client.post(
            f"/datasets/{dataset_id}/entries", json={"entries": [row(i) for i in range(50)]}
        )
        assert added.status_code == 200, added.text
        started = await client.post(f"/datasets/{dataset_id}/export")
        assert started.status_code == 202, started.text
        assert (await client.delete(f"/datasets/{dataset_id}")).status_code == 200
        job_path = f"/datasets/{dataset_id}/jobs/{started.json()['id']}"

        async def gone() -> bool:
            return (await client.get(job_path)).status_code == 404

        await wait_until(gone, timeout=10, what="the job to go with its dataset")
        assert_error(await client.post(f"/datasets/{dataset_id}/export"), 404)
        # The platform still serves exports afterwards.
        other = await new_dataset(client, "after")
        assert (await export_and_wait(client, other))["entry_count"] == 0


def test_export_lines_spliced_from_stored_json_equal_the_training_row() -> None:
    messages = [{"role": "user", "content": 'q "quoted" ✓'}]
    output = {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]}
    tools = [{"type": "function", "function": {"name": "f"}}]
    compact = (
        "dse_1",
        "TRAIN",
        orjson.dumps(messages).decode(),
        orjson.dumps(output).decode(),
        orjson.dumps(tools).decode(),
        "null",  # a JSON column holding None
        None,
        '{"role":"assistant","content":"no"}',
        '{"k":"v"}',
    )
    expected = to_training_row(
        messages=messages,
        output=output,
        tools=tools,
        rejected_message={"role": "assistant", "content": "no"},
        split="TRAIN",
        metadata={"k": "v"},
    )
    assert orjson.loads(files._export_line(compact)) == expected
    spaced = ("dse_2", None, ' [ {"role": "user", "content": "q"} ] ', '{"role": "assistant"}', *[None] * 5)
    assert orjson.loads(files._export_line(spaced)) == {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant"}],
        "metadata": {},
    }
