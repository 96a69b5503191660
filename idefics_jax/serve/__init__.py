"""Serving: the continuous-batching engine (engine.py) and the OpenAI-compatible server and chat page (app.py)."""
