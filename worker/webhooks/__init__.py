"""Signed webhooks announcing audit events to customers' endpoints (docs/webhooks.md).

The API and `scripts/webhooks` call the functions re-exported here; the worker's delivery tasks
live in `worker.webhooks.tasks`.
"""

from worker.webhooks.addresses import UnsafeUrlError
from worker.webhooks.deliveries import DeliveryInfo, list_deliveries
from worker.webhooks.endpoints import (
    EVENT_TYPES,
    TEST_EVENT_TYPE,
    CreatedEndpoint,
    EndpointInfo,
    EndpointLimitError,
    EndpointNotFoundError,
    create_endpoint,
    disable,
    enable,
    list_endpoints,
    operator_endpoint_organization,
    operator_event_organization,
    operator_list_all_endpoints,
    replay_event,
    rotate_secret,
    send_test_event,
)
from worker.webhooks.signing import SecretKeyError

__all__ = [
    "EVENT_TYPES",
    "TEST_EVENT_TYPE",
    "CreatedEndpoint",
    "DeliveryInfo",
    "EndpointInfo",
    "EndpointLimitError",
    "EndpointNotFoundError",
    "SecretKeyError",
    "UnsafeUrlError",
    "create_endpoint",
    "disable",
    "enable",
    "list_deliveries",
    "list_endpoints",
    "operator_endpoint_organization",
    "operator_event_organization",
    "operator_list_all_endpoints",
    "replay_event",
    "rotate_secret",
    "send_test_event",
]
