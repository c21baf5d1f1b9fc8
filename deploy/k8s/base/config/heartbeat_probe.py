"""The worker's probes, until the worker serves a health endpoint of its own: is its heartbeat in Redis?

A worker has no gRPC port. Once its model is loaded and its engine warmed up, it writes its liveness key
`<namespace>:worker:<worker id>` every CODESTREAM_HEARTBEAT_S seconds with a TTL of three periods; the key
goes away when the worker stops heartbeating (wedged, or gone). The worker Deployment mounts this file
(ConfigMap codestream-worker-probe) and runs it with the image's own Python, in the worker container, whose
environment has the worker's settings (CODESTREAM_REDIS_URL, CODESTREAM_NAMESPACE, CODESTREAM_WORKER_ID =
the pod's name), read exactly as the worker reads them:

    python heartbeat_probe.py ready   startup and readiness: 0 only when Redis answers and the key exists
    python heartbeat_probe.py alive   liveness: 1 only when Redis answers and the key is missing; a Redis
                                      that does not answer is not this worker's fault and must not get
                                      every worker restarted (and its model reloaded) at once

tests/test_deploy.py runs it against a real Redis.
"""

from __future__ import annotations

import sys

import redis

from codestream import settings
from protos.keys import Keys
from worker.config import WorkerConfig


def main(argv: list[str]) -> int:
    mode = argv[1] if len(argv) > 1 else "ready"
    if mode not in ("ready", "alive"):
        print(f"usage: {argv[0]} ready|alive", file=sys.stderr)
        return 2
    config = settings.load(WorkerConfig)
    if not config.worker_id:
        print("CODESTREAM_WORKER_ID is not set: the probe cannot name this worker's key", file=sys.stderr)
        return 1
    key = Keys(config.namespace).worker(config.worker_id)
    try:
        client = redis.Redis.from_url(config.redis_url, socket_timeout=3, socket_connect_timeout=3)
        try:
            found = client.exists(key)
        finally:
            client.close()
    except (redis.RedisError, OSError) as exc:
        print(f"Redis did not answer: {exc}", file=sys.stderr)
        return 0 if mode == "alive" else 1
    if not found:
        print(f"no heartbeat: {key} is missing", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
