"""segment-relay handler plug-in: an email suppression list kept from audience enters and exits."""

from .suppression_list import SuppressionList, read_audit, read_suppressed

__all__ = ["SuppressionList", "read_audit", "read_suppressed"]
