"""A prefix-sharing replay over real HTTP: ``python -m loadgen run --trace multiturn[...]``
against a local endpoint that keeps every prompt it is sent, to check what reaches a server's
prefix cache (shared turns are shared token prefixes), not only what the planner computed."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from local_http import serving

from loadgen.cli import main as loadgen_main


class PromptRecorder:
    """An OpenAI-style streaming completions endpoint that answers one token per requested
    output token and records each request's prompt token ids."""

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []
        self.lock = threading.Lock()

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            with self.lock:
                self.prompts.append(body["prompt"])

            async def stream():
                for i in range(body["max_tokens"]):
                    chunk = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": i + 1}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        return app


@pytest.fixture(scope="module")
def recorder():
    rec = PromptRecorder()
    with serving(rec.app(), "the recording endpoint") as url:
        rec.url = url
        yield rec


def test_a_multiturn_replay_sends_each_turn_as_the_previous_prompt_plus_answer(recorder, tmp_path):
    trace = (
        "multiturn[conversations=3,turns=3,system_prompt_tokens=64,question_tokens=20,"
        "answer_tokens=12,think_time_s=1,conversation_interval_s=0.5,block=16]"
    )
    # Rate scale 10: the nine turns leave within about a quarter of a second.
    args = ["run", "--url", recorder.url, "--model", "m", "--trace", trace, "--rate-scale", "10"]
    args += ["--duration", "30", "--drain", "10", "--out", str(tmp_path), "--no-progress"]
    assert loadgen_main(args) == 0
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["summary"]["sent"] == 9
    assert all(r["status"] == "ok" for r in document["requests"])

    prompts = recorder.prompts
    assert sorted(len(p) for p in prompts) == [84] * 3 + [116] * 3 + [148] * 3
    # Each later turn starts with the exact tokens of each earlier turn of its conversation:
    # per conversation turn 1 after 0, turn 2 after 0 and after 1.
    continues = [(a, b) for a in prompts for b in prompts if len(b) > len(a) and b[: len(a)] == a]
    assert len(continues) == 3 * 3
    assert all(len(b) - len(a) in (12 + 20, 2 * (12 + 20)) for a, b in continues)
    # Across conversations only the system prompt's 4 full blocks (64 tokens) are the same.
    first_turns = [p for p in prompts if len(p) == 84]
    for a in first_turns:
        for b in first_turns:
            if a is not b:
                assert a[:64] == b[:64] and a[64:80] != b[64:80]
