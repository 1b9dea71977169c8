"""Open-loop load generator for OpenAI-compatible endpoints."""
