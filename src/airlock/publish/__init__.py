"""Publication: evaluator reports, redaction commitments, embargo, public report pages."""
