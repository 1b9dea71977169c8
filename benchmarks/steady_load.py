"""Open-loop load at a fixed rate against a ``FlowPrefillEngine``, with resource samples.

The soak benchmark (long, 70 % of capacity) and the overload test (short, 3x capacity) both
drive the engine through this: requests arrive on a Poisson clock whatever the server does
(open loop, so overload really builds up), each one's outcome is recorded (completed,
rejected with 429, failed with another error), and once a second the memory the system holds
is sampled: requests in the scheduler, KV blocks on decode workers, KV bytes and paused
requests on prefill workers, and the resident memory of every runtime actor process.

A measuring tool, not part of the serving system, so it lives beside ``soak.py`` rather than
in the package; ``tests/test_overload.py`` loads it by path (``tests/repo_scripts.py``).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

import psutil

from flowprefill_ray.errors import RequestRejectedError, RuntimeEngineError
from flowprefill_ray.sampling_params import SamplingParams

# Ray titles actor processes "ray::ClassName..."; these are the runtime's.
_ACTOR_TITLES = ("ray::Scheduler", "ray::PrefillWorker", "ray::DecodeWorker")


@dataclass(frozen=True)
class LoadClass:
    """One kind of request in the mix: prompt length (tokens), TTFT target (seconds), share."""

    name: str
    prompt_tokens: int
    ttft_slo_s: float
    share: float


@dataclass
class Outcome:
    """What happened to one request. ``status``: completed | rejected | failed."""

    cls: str
    status: str
    ttft_s: float | None = None
    ttft_slo_s: float = 0.0
    error: str = ""
    # Seconds from submission until the request was refused (rejected requests only).
    reject_s: float | None = None


@dataclass
class Sample:
    """Resources held at one moment (``at_s`` seconds since the load started)."""

    at_s: float
    client_in_flight: int
    scheduler_in_prefill: int
    decode_used_blocks: int
    prefill_held_kv_bytes: int
    prefill_paused_requests: int
    prefill_paused_bytes: int  # activations and KV kept alive by paused units
    actors_rss_mib: float
    # The same per kind of actor (Scheduler, PrefillWorker, DecodeWorker), to tell which one
    # grows when the total does.
    actors_rss_by_kind_mib: dict[str, float] = field(default_factory=dict)


@dataclass
class LoadReport:
    rate_rps: float
    duration_s: float
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        result = {"sent": len(self.outcomes)}
        for status in ("completed", "rejected", "failed"):
            result[status] = sum(o.status == status for o in self.outcomes)
        return result

    def attainment(self, cls: str | None = None) -> float | None:
        """Share of *admitted* (completed) requests whose TTFT met their target."""
        done = [o for o in self.outcomes if o.status == "completed" and cls in (None, o.cls)]
        if not done:
            return None
        return sum(o.ttft_s <= o.ttft_slo_s for o in done) / len(done)

    def ttft_p(self, q: float, cls: str | None = None) -> float | None:
        ttfts = sorted(
            o.ttft_s for o in self.outcomes if o.status == "completed" and cls in (None, o.cls)
        )
        if not ttfts:
            return None
        return ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))]

    def to_json(self) -> dict:
        classes = sorted({o.cls for o in self.outcomes})
        return {
            "rate_rps": self.rate_rps,
            "duration_s": self.duration_s,
            "counts": self.counts(),
            "attainment": self.attainment(),
            "per_class": {
                c: {
                    "attainment": self.attainment(c),
                    "ttft_p50_s": self.ttft_p(0.5, c),
                    "ttft_p99_s": self.ttft_p(0.99, c),
                    "sent": sum(o.cls == c for o in self.outcomes),
                    "rejected": sum(o.cls == c and o.status == "rejected" for o in self.outcomes),
                }
                for c in classes
            },
            "errors": sorted({o.error for o in self.outcomes if o.status == "failed"})[:20],
            "samples": [asdict(s) for s in self.samples],
        }


def _local_raylet_pid() -> int | None:
    """The raylet of the cluster this driver started (its workers are the raylet's children),
    so processes of other Ray clusters on the same host are not counted."""
    try:
        import ray._private.worker as ray_worker

        return ray_worker._global_node.all_processes["raylet"][0].process.pid
    except (AttributeError, KeyError, IndexError):  # attached to a remote cluster
        return None


def actors_rss_by_kind_mib(pids: set[int] | None = None) -> dict[str, float]:
    """Resident memory of the runtime's actor processes (scheduler, prefill and decode
    workers) of this driver's local cluster, MiB, summed per kind (``Scheduler``,
    ``PrefillWorker``, ``DecodeWorker``); empty when the driver started no cluster. With
    ``pids``, only those processes: one engine's actors, not another's that shares the
    cluster (a test suite's engines do)."""
    raylet = _local_raylet_pid()
    if raylet is None:
        return {}
    try:
        children = psutil.Process(raylet).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    totals: dict[str, int] = {}
    for proc in children:
        if pids is not None and proc.pid not in pids:
            continue
        try:
            title = " ".join(proc.cmdline())
            kind = next((t for t in _ACTOR_TITLES if title.startswith(t)), None)
            if kind is not None:
                name = kind.removeprefix("ray::")
                totals[name] = totals.get(name, 0) + proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return {name: round(rss / 2**20, 1) for name, rss in sorted(totals.items())}


def actors_rss_mib() -> float:
    """All of ``actors_rss_by_kind_mib``, MiB."""
    return sum(actors_rss_by_kind_mib().values())


async def sample_resources(engine, started: float, in_flight: int) -> Sample:
    stats = await engine.stats()
    prefill = [s for s in stats.get("prefill_workers", {}).values() if "error" not in s]
    decode = [s for s in stats.get("decode_workers", {}).values() if "error" not in s]
    # This engine's actors only: in a test suite other engines' actors share the cluster,
    # and their memory is not this run's to judge.
    pids = {s["pid"] for s in (stats["scheduler"], *prefill, *decode) if "pid" in s}
    by_kind = await asyncio.to_thread(actors_rss_by_kind_mib, pids)
    return Sample(
        at_s=round(time.monotonic() - started, 3),
        client_in_flight=in_flight,
        scheduler_in_prefill=stats["scheduler"]["in_prefill"],
        decode_used_blocks=sum(s["used_blocks"] for s in decode),
        prefill_held_kv_bytes=sum(s["held_kv_bytes"] for s in prefill),
        prefill_paused_requests=sum(s["paused_requests"] for s in prefill),
        prefill_paused_bytes=sum(s["paused_bytes"] for s in prefill),
        actors_rss_mib=round(sum(by_kind.values()), 1),
        actors_rss_by_kind_mib=by_kind,
    )


async def measure_prefill_s(engine, prompt_tokens: int, repeats: int = 5) -> float:
    """Median TTFT (seconds) of a lone request of ``prompt_tokens``: the service time that
    capacity and SLO targets are expressed in."""
    rng = random.Random(1)
    vocab = engine.model_config.vocab_size
    times = []
    for _ in range(repeats):
        ids = [rng.randrange(3, vocab) for _ in range(prompt_tokens)]
        outs = await engine.generate(ids, SamplingParams(max_tokens=1, temperature=0.0), slo=1e6)
        times.append(outs[-1].ttft_s)
    return statistics.median(times)


async def run_steady_load(
    engine,
    classes: list[LoadClass],
    rate_rps: float,
    duration_s: float,
    max_tokens: int = 4,
    sample_period_s: float = 1.0,
    request_bound_s: float = 300.0,
    seed: int = 0,
) -> LoadReport:
    """Send Poisson arrivals at ``rate_rps`` for ``duration_s`` seconds, then wait for every
    request to end (each bounded by ``request_bound_s``; one that exceeds it counts as failed).
    Samples resources every ``sample_period_s`` seconds, and once more after the drain."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    report = LoadReport(rate_rps, duration_s)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tasks: set[asyncio.Task] = set()
    started = time.monotonic()

    async def one(cls: LoadClass) -> None:
        ids = [rng.randrange(3, vocab) for _ in range(cls.prompt_tokens)]
        outcome = Outcome(cls.name, "failed", ttft_slo_s=cls.ttft_slo_s)
        submitted = time.monotonic()
        try:
            async with asyncio.timeout(request_bound_s):
                async for out in engine.submit(ids, sampling, slo=cls.ttft_slo_s):
                    if out.index == 0 and outcome.ttft_s is None:
                        outcome.ttft_s = out.ttft_s
                    if out.finish_reason is not None:
                        ok = out.finish_reason in ("stop", "length")
                        outcome.status = "completed" if ok else "failed"
                        outcome.error = "" if ok else f"finish_reason={out.finish_reason}"
        except RequestRejectedError:
            outcome.status = "rejected"
            outcome.reject_s = time.monotonic() - submitted
        except (RuntimeEngineError, TimeoutError) as error:
            outcome.error = f"{type(error).__name__}: {error}"[:200]
        report.outcomes.append(outcome)

    async def sampler() -> None:
        while True:
            report.samples.append(await sample_resources(engine, started, len(tasks)))
            await asyncio.sleep(sample_period_s)

    sampling_task = asyncio.create_task(sampler())
    weights = [c.share for c in classes]
    next_at = started
    while (now := time.monotonic()) < started + duration_s:
        if now < next_at:
            await asyncio.sleep(next_at - now)
            continue
        cls = rng.choices(classes, weights)[0]
        task = asyncio.create_task(one(cls))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        next_at += rng.expovariate(rate_rps)
    while tasks:
        await asyncio.wait(set(tasks))
    sampling_task.cancel()
    report.samples.append(await sample_resources(engine, started, 0))
    return report
