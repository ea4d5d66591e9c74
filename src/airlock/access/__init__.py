"""Access control: evaluators, grants, keys, quotas and the audit trail."""
