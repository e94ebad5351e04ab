"""The HTTP doors: /api/v1, the OpenAI-compatible API, the route table."""
