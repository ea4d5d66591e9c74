"""Persistent job queue: a DB-backed state machine with an in-process worker pool."""
