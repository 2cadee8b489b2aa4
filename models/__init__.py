"""The schema shared by the worker and the API. Imports nothing from `worker`."""

from models.account import AccountStatus, AwsAccount, OutcomeKind
from models.api import (
    AccountDetail,
    AccountListItem,
    format_timestamp,
    render_account_detail,
    render_account_list_item,
)
from models.audit import AuditEvent, AuditEventType
from models.base import Base
from models.organization import Organization
from models.webhooks import WebhookDelivery, WebhookEndpoint

__all__ = [
    "AccountDetail",
    "AccountListItem",
    "AccountStatus",
    "AuditEvent",
    "AuditEventType",
    "AwsAccount",
    "Base",
    "Organization",
    "OutcomeKind",
    "WebhookDelivery",
    "WebhookEndpoint",
    "format_timestamp",
    "render_account_detail",
    "render_account_list_item",
]
