"""Fine-tuning access: training files (``/v1/files``) and, later, fine-tuning jobs."""
