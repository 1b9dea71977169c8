"""Two ingress replicas over one engine service, over real HTTP: a local Ray cluster, Serve on
a free loopback port, the tiny model on CPU.

Decisions stay global (one scheduler sees the requests of both replicas), and killing one
replica loses only its own streams: the other's complete, and the engine service's lease on
the dead one releases what its requests held (serve/client_leases.py).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest
from conftest_ray import free_port, tiny_runtime_args
from waiting import async_wait_until, wait_until

from flowprefill_ray.serve.app import REPLICA_HEADER
from loadgen.client import sse_lines

pytestmark = pytest.mark.ray

APP_NAME = "flowprefill-ingress-test"
NAME_PREFIX = "fp-ingress-test"
MODEL = "flowprefill-tiny"
LEASE_S = 2.0
STREAM_TOKENS = 1000  # long enough that a stream cut short shows in the tokens generated
# Long enough to be still decoding when a lease lapses (LEASE_S and a probe after it starts).
LAPSE_TOKENS = 4000


@dataclass(frozen=True)
class TwoReplicaApp:
    url: str
    service: object  # the EngineService deployment handle
    client: object  # a FlowPrefillEngine attached from this test process

    def lease_stats(self) -> dict:
        return self.service.lease_stats.remote().result()


def app_args(cache_dir: str) -> dict:
    # Loose targets: a busy 2-core machine must not turn requests away here.
    runtime = tiny_runtime_args(
        cache_dir,
        NAME_PREFIX,
        decode={"kv_blocks": 512},
        slo={"scale": 50.0},
        requests={"max_output_tokens": LAPSE_TOKENS},
    )
    return {
        "runtime": runtime,
        "api": {"default_max_tokens": 4},
        "ingress": {"lease_s": LEASE_S, "renew_interval_s": 0.25},
    }


@pytest.fixture(scope="module")
def two_replicas(ray_local, runtime_cache_dir):
    from ray import serve

    from flowprefill_ray.runtime.engine import FlowPrefillEngine
    from flowprefill_ray.serve.app import compose_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = compose_app(app_args(runtime_cache_dir), ingress_options={"num_replicas": 2})
    serve.run(app, name=APP_NAME, route_prefix="/")  # returns once both replicas are up
    service = serve.get_deployment_handle("EngineService", APP_NAME)
    client = asyncio.run(FlowPrefillEngine.attach(service.attachment.remote().result()))
    yield TwoReplicaApp(f"http://127.0.0.1:{port}", service, client)
    serve.delete(APP_NAME)
    serve.shutdown()


def engine_stats(app: TwoReplicaApp) -> dict:
    """``FlowPrefillEngine.stats`` through the client attached from this test process: the
    scheduler's counters, every worker's load and their disagreements."""
    return asyncio.run(app.client.stats())


def _prompt(i: int, length: int = 24) -> list[int]:
    return [(i * 7919 + j * 104729) % 400 + 20 for j in range(length)]


async def _complete(http: httpx.AsyncClient, i: int) -> tuple[str, str]:
    response = await http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": _prompt(i), "max_tokens": 4, "slo_class": "file"},
    )
    assert response.status_code == 200, response.text
    return response.headers[REPLICA_HEADER], response.json()["flowprefill"]["request_id"]


def test_two_replicas_serve_one_workload_through_one_scheduler(two_replicas):
    before = engine_stats(two_replicas)["scheduler"]["counts"].get("submitted", 0)

    async def workload() -> list[tuple[str, str]]:
        async with httpx.AsyncClient(base_url=two_replicas.url, timeout=60.0) as http:
            return await asyncio.gather(*(_complete(http, i) for i in range(24)))

    served = asyncio.run(workload())
    per_replica = Counter(replica for replica, _ in served)
    assert len(per_replica) == 2, f"one replica served everything: {per_replica}"
    stats = engine_stats(two_replicas)
    # The one scheduler admitted every request, whichever replica it came through ...
    assert stats["scheduler"]["counts"]["submitted"] - before == 24
    # ... and its timeline, read through either replica, holds them all.
    with httpx.Client(base_url=two_replicas.url, timeout=60.0) as http:
        timeline = http.get("/v1/flowprefill/timeline", params={"last": 200}).json()
    finished = {r["request_id"] for r in timeline["requests"] if r["status"] == "finished"}
    assert {rid for _, rid in served} <= finished


class _Stream:
    """One streamed completion, read to its end (or until its connection breaks)."""

    def __init__(self, http: httpx.AsyncClient, i: int):
        self.first_token = asyncio.Event()
        self.replica: str | None = None
        self.payloads: list = []
        self.broken: BaseException | None = None
        self.task = asyncio.create_task(self._read(http, i))

    async def _read(self, http: httpx.AsyncClient, i: int) -> None:
        body = {
            "model": MODEL,
            "prompt": _prompt(i, 32),
            "max_tokens": STREAM_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "slo_class": "file",
            "stream": True,
        }
        try:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                self.replica = response.headers[REPLICA_HEADER]
                async for line in sse_lines(response.aiter_text()):
                    if line.startswith("data: "):
                        data = line[6:]
                        self.payloads.append(data if data == "[DONE]" else json.loads(data))
                        self.first_token.set()
        except httpx.HTTPError as error:  # the replica died under it
            self.broken = error
        finally:
            self.first_token.set()

    @property
    def finish_reason(self) -> str | None:
        """The last chunk's, or what ended the stream otherwise (an error payload)."""
        chunks = [p for p in self.payloads if p != "[DONE]"]
        if not chunks:
            return None
        last = chunks[-1]
        return last["choices"][0]["finish_reason"] if last.get("choices") else str(last)

    @property
    def completed(self) -> bool:
        return self.payloads[-1:] == ["[DONE]"] and self.finish_reason == "length"


def _settled(stats: dict, used_blocks_before: int) -> dict | None:
    """``stats`` once nothing is in prefill or decoding and nothing is held, else None."""
    decode = stats["decode_workers"]["decode-0"]
    prefill = stats["prefill_workers"]["prefill-0"]
    idle = (
        stats["scheduler"]["in_prefill"] == 0
        and decode["running"] == 0
        and decode["waiting"] == 0
        and decode["used_blocks"] == used_blocks_before
        and prefill["held_bytes"] == 0
        and stats["disagreements"] == []
    )
    return stats if idle else None


def test_a_killed_replica_loses_only_its_own_streams_and_the_engine_frees_them(two_replicas):
    import ray

    before = engine_stats(two_replicas)
    tokens_before = before["decode_workers"]["decode-0"]["tokens_generated"]
    leases_before = two_replicas.lease_stats()

    async def scenario() -> tuple[str, list[_Stream]]:
        async with httpx.AsyncClient(base_url=two_replicas.url, timeout=120.0) as http:
            streams = [_Stream(http, i) for i in range(6)]
            await asyncio.gather(*(s.first_token.wait() for s in streams))
            per_replica = Counter(s.replica for s in streams)
            assert len(per_replica) == 2, f"the streams all went to one replica: {per_replica}"
            victim = min(per_replica, key=lambda r: (per_replica[r], r))
            # At once: its streams carry its lease's id, so none needs a renewal to be released.
            ray.kill(
                ray.get_actor(
                    f"SERVE_REPLICA::{APP_NAME}#OpenAIIngress#{victim}", namespace="serve"
                )
            )
            await asyncio.gather(*(s.task for s in streams))
            return victim, streams

    victim, streams = asyncio.run(scenario())
    lost = [s for s in streams if s.replica == victim]
    kept = [s for s in streams if s.replica != victim]
    assert all(s.completed for s in kept), [
        (s.finish_reason, two_replicas.lease_stats()) for s in kept if not s.completed
    ]
    assert not any(s.completed for s in lost)

    # The service saw the lease lapse and released exactly the dead replica's requests ...
    leases = wait_until(
        lambda: (
            (s := two_replicas.lease_stats())["expired_clients"] > leases_before["expired_clients"]
            and s
        ),
        LEASE_S + 10.0,
        "the dead replica's lease to expire",
    )
    assert leases["released_requests"] - leases_before["released_requests"] == len(lost)
    # ... so that, well before they could have run to their end, nothing is held anywhere.
    used_before = before["decode_workers"]["decode-0"]["used_blocks"]
    after = wait_until(
        lambda: _settled(engine_stats(two_replicas), used_before),
        30.0,
        "the scheduler and the workers to hold nothing",
    )
    generated = after["decode_workers"]["decode-0"]["tokens_generated"] - tokens_before
    survivors_tokens = len(kept) * (STREAM_TOKENS - 1)  # the first token comes from prefill
    assert survivors_tokens <= generated < len(streams) * (STREAM_TOKENS - 1)

    # Serve replaces the dead replica; the app serves on.
    with httpx.Client(base_url=two_replicas.url, timeout=60.0) as http:
        wait_until(
            lambda: http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}).is_success,
            60.0,
            "a request to be served after the replica's death",
            poll_s=0.5,
        )


def test_a_lapsed_lease_whose_replica_still_answers_keeps_its_requests(two_replicas):
    """A replica starved of CPU can miss its renewals while its streams are being read: the
    service asks Ray about the lease's holder first, and releases nothing while it answers.
    Driven by hand: a live actor stands in for the replica and never renews. Its request,
    long enough to be decoding when the lease lapses, runs to its end; once the stand-in is
    killed, the next lapse expires the lease (releasing what is left: nothing, here; the
    killed-replica test above has requests left to release)."""
    import ray

    from flowprefill_ray.sampling_params import SamplingParams

    @ray.remote(num_cpus=0)
    class _Replica:
        def ready(self) -> bool:
            return True

    holder = _Replica.remote()
    ray.get(holder.ready.remote())
    client, service = two_replicas.client, two_replicas.service
    before = two_replicas.lease_stats()
    client_id = service.register_client.remote("stalled-replica", holder).result()
    long = SamplingParams(max_tokens=LAPSE_TOKENS, ignore_eos=True)

    async def leases_once(counter: str) -> dict | None:
        stats = await service.lease_stats.remote()
        return stats if stats[counter] > before[counter] else None

    async def scenario() -> tuple[list, dict, dict]:
        client.client_id = client_id
        stream = client.submit("a request of a replica that stalled", long)
        outs = [await stream.__anext__()]  # in decode now
        client.client_id = None
        extended = await async_wait_until(
            lambda: leases_once("lapsed_alive"),
            LEASE_S + 30.0,
            "the lapsed lease's holder to be asked and found alive",
            poll_s=0.1,
        )
        outs.extend([out async for out in stream])  # never cancelled: it runs to its end
        ray.kill(holder)
        expired = await async_wait_until(
            lambda: leases_once("expired_clients"),
            LEASE_S + 30.0,
            "the dead holder's lease to expire",
            poll_s=0.1,
        )
        return outs, extended, expired

    try:
        outs, extended, expired = asyncio.run(scenario())
    finally:
        client.client_id = None
    assert extended["expired_clients"] == before["expired_clients"]
    assert client_id in extended["clients"]
    assert outs[-1].finish_reason == "length" and len(outs) == LAPSE_TOKENS
    assert expired["expired_clients"] - before["expired_clients"] == 1
    assert client_id not in expired["clients"]
    assert expired["released_requests"] == before["released_requests"]


def test_cancelling_a_client_ends_every_request_it_stamped_and_refuses_its_next(two_replicas):
    """What an expired lease triggers, driven by hand: the request carries its client's id, so
    it is found without any list of ids (none was ever sent); the client's next request is
    refused; another client's request is untouched."""
    from flowprefill_ray.errors import EngineUnavailableError
    from flowprefill_ray.sampling_params import SamplingParams

    client = two_replicas.client
    attachment = two_replicas.service.attachment.remote().result()
    used_before = engine_stats(two_replicas)["decode_workers"]["decode-0"]["used_blocks"]
    long = SamplingParams(max_tokens=STREAM_TOKENS, ignore_eos=True)

    async def scenario() -> tuple[list, list, list[int]]:
        client.client_id = "gone-client"
        doomed = client.submit("a request of a client that died", long)
        first = [await doomed.__anext__()]  # in decode now
        client.client_id = None
        bystander = [
            out
            async for out in client.submit(
                "another client's", SamplingParams(max_tokens=8, ignore_eos=True)
            )
        ]
        found = await asyncio.gather(
            attachment.scheduler.cancel_client.remote("gone-client"),
            *(h.cancel_client.remote("gone-client") for h in attachment.decode.values()),
        )
        rest = [out async for out in doomed]
        return first + rest, bystander, found

    try:
        doomed, bystander, found = asyncio.run(scenario())
    finally:
        client.client_id = None
    assert doomed[-1].finish_reason == "abort" and len(doomed) < STREAM_TOKENS
    assert sum(found) == 1  # on the decode worker, not on the scheduler
    assert bystander[-1].finish_reason == "length" and len(bystander) == 8

    client.client_id = "gone-client"
    try:
        with pytest.raises(EngineUnavailableError, match="lease expired"):
            asyncio.run(client.generate("too late", SamplingParams(max_tokens=4)))
    finally:
        client.client_id = None
    wait_until(
        lambda: _settled(engine_stats(two_replicas), used_before),
        30.0,
        "the scheduler and the workers to hold nothing",
    )
