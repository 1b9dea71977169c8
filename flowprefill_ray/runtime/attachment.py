"""What a client needs to use an engine that another process started and owns.

``FlowPrefillEngine.start`` creates the scheduler and the workers; the process that called it
owns them (Ray ends non-detached actors with their owner). Any number of other processes - the
Serve ingress replicas - use the same actors through ``FlowPrefillEngine.attach``: each submits
to the one scheduler, so every decision stays global, and streams its requests' tokens straight
from the decode workers. An attachment is plain data plus actor handles, so it travels through
a Ray or Serve call as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import RuntimeConfig
from .placement import Workers


@dataclass(frozen=True)
class EngineAttachment:
    """The owner's config and its scheduler's and workers' handles. The client loads the
    tokenizer and model config from ``config.model`` as each worker does."""

    config: RuntimeConfig
    scheduler: object
    prefill: dict[str, object]
    decode: dict[str, object]
    # KV pool of each decode worker, blocks, as the workers sized it.
    decode_kv_blocks: dict[str, int] = field(default_factory=dict)

    def workers(self) -> Workers:
        """The handles as the engine keeps them; the placement group stays with the owner."""
        return Workers(
            prefill=dict(self.prefill),
            decode=dict(self.decode),
            decode_kv_blocks=dict(self.decode_kv_blocks),
        )
