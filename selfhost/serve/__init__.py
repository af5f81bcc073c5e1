"""`selfhost serve`: the OpenAI-compatible server."""
