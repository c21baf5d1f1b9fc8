"""Every Redis key, stream and channel name codestream uses, in one place.

All names live under a namespace (default ``codestream``) so that several deployments can share one
Redis. Both the gateway and the worker build names only through a ``Keys`` instance.

| name                              | type          | written by | read by  | what                              |
|-----------------------------------|---------------|------------|----------|-----------------------------------|
| ``<ns>:jobs``                     | stream        | gateway    | workers  | one entry per request: field job  |
| group ``workers`` on ``<ns>:jobs``| consumer group| worker     | workers  | each job goes to one worker       |
| ``<ns>:gw:<gateway_id>``          | pub/sub       | workers    | gateway  | EventBatch messages               |
| ``<ns>:cancel``                   | pub/sub       | gateways   | workers  | CancelNotice messages             |
| ``<ns>:cancelled:<request_id>``   | string + TTL  | gateway    | worker   | cancel of a job not yet picked up |
| ``<ns>:req:<request_id>``         | string + TTL  | gateway    | gateway  | id in flight (idempotency)        |
| ``<ns>:worker:<worker_id>``       | string + TTL  | worker     | anyone   | worker heartbeat (JSON info)      |
| ``<ns>:log:<request_id>``         | stream + TTL  | worker     | gateways | the request's events, id = seq-0  |
| ``<ns>:attempt:<request_id>``     | string + TTL  | worker     | worker   | fencing token: current attempt    |
| ``<ns>:dead``                     | stream        | worker     | operators| jobs delivered too many times     |
| ``<ns>:attached:<request_id>``    | string + TTL  | gateway    | gateway  | gateway streaming it (resume)     |
| ``<ns>:inflight``                 | zset          | gateways   | gateways | admitted requests, score=deadline |
| ``<ns>:inflight_tokens``          | hash          | gateways   | gateways | their token costs, and `_total`   |
| ``<ns>:inflight:<tenant>``        | zset          | gateways   | gateways | a tenant's admitted requests      |
| ``<ns>:bucket:<tenant>``          | hash + TTL    | gateways   | gateways | a tenant's token bucket           |
"""

from __future__ import annotations

from dataclasses import dataclass

JOB_FIELD = b"job"  # the stream entry's only field: a serialized codestream.v1.Job
EVENT_FIELD = b"e"  # an event log entry's only field: a serialized codestream.v1.GenerateEvent
WORKER_GROUP = "workers"
# A request's claim on its client id and its gateway attachment live this long past its deadline: the id
# stays taken, and Resume finds the request, for that long. Past it the id may be another request's, so a
# worker drops, without an event, a job it reads later than half of this past the job's deadline (its stream
# ended long before; half: room for clock skew between the gateway's and the worker's hosts).
DEADLINE_SLACK_S = 60
STALE_JOB_S = DEADLINE_SLACK_S // 2


@dataclass(frozen=True)
class Keys:
    namespace: str = "codestream"

    @property
    def jobs(self) -> str:
        return f"{self.namespace}:jobs"

    @property
    def worker_group(self) -> str:
        return WORKER_GROUP

    @property
    def cancel_channel(self) -> str:
        return f"{self.namespace}:cancel"

    def gateway_channel(self, gateway_id: str) -> str:
        return f"{self.namespace}:gw:{gateway_id}"

    def cancelled(self, request_id: str) -> str:
        return f"{self.namespace}:cancelled:{request_id}"

    def request_claim(self, request_id: str) -> str:
        return f"{self.namespace}:req:{request_id}"

    def worker(self, worker_id: str) -> str:
        return f"{self.namespace}:worker:{worker_id}"

    @property
    def worker_pattern(self) -> str:
        return f"{self.namespace}:worker:*"

    def event_log(self, request_id: str) -> str:
        return f"{self.namespace}:log:{request_id}"

    def attempt(self, request_id: str) -> str:
        return f"{self.namespace}:attempt:{request_id}"

    @property
    def dead_letters(self) -> str:
        return f"{self.namespace}:dead"

    def attached(self, request_id: str) -> str:
        return f"{self.namespace}:attached:{request_id}"

    @property
    def inflight(self) -> str:
        return f"{self.namespace}:inflight"

    @property
    def inflight_tokens(self) -> str:
        return f"{self.namespace}:inflight_tokens"

    def tenant_inflight(self, tenant: str) -> str:
        return f"{self.namespace}:inflight:{tenant or '_'}"

    def tenant_bucket(self, tenant: str) -> str:
        return f"{self.namespace}:bucket:{tenant or '_'}"
