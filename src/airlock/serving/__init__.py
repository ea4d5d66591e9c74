"""Sampling: the OpenAI surface (models, chat and text completions), the model-id resolver, variant pipelines."""
