"""Which I/O gRPC's core uses in the gateway's process: iomgr's endpoints, not EventEngine's.

With EventEngine's endpoints (gRPC's default since 1.6x), a socket's bytes are read by an EventEngine
thread, which then wakes the thread that polls the completion queue, which wakes the asyncio loop. With
iomgr's (epoll1), the completion-queue thread reads the socket itself: one thread wake-up fewer on every
message in. On the lent H100 machines, whose idle vCPUs halt and wake through the hypervisor, that took
0.1-0.2 ms off each gRPC hop (`python -m benchmarks.grpc_hop --iomgr`, run 87) and 0.25-0.5 ms off the
stack's time to first token, with W1 and the c=32 tail unchanged (runs 88-91, docs/BENCHMARKS.md).

gRPC reads GRPC_EXPERIMENTS once, as it is imported, so the choice is made before anything imports grpc
(codestream/cli.py, for the gateway). An operator's own GRPC_EXPERIMENTS wins; set it empty for gRPC's
default. (Should a later gRPC drop these experiments, it logs them as unknown and keeps its default.)
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

IOMGR_EXPERIMENTS = "-event_engine_listener,-event_engine_client,-event_engine_for_all_other_endpoints"


def use_iomgr(env: MutableMapping[str, str] = os.environ) -> str:
    """Ask this process's gRPC for iomgr's endpoints unless GRPC_EXPERIMENTS is set; returns what is in force.

    Where grpc is imported already (a gateway started inside another program, e.g. a test), it has read the
    variable: nothing is changed, so that what the gateway logs is what gRPC uses."""
    if "grpc" in sys.modules and env is os.environ:
        return env.get("GRPC_EXPERIMENTS", "")
    return env.setdefault("GRPC_EXPERIMENTS", IOMGR_EXPERIMENTS)
