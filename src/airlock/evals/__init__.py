"""Evaluations: Inspect provider and sandbox, built-in proxy suites, attested results."""
