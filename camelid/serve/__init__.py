"""`camelid serve`: OpenAI's API over a continuous-batching engine, with a web chat.

engine.py        the scheduler: a slotted KV cache, sequences admitted and retired at every step, batched decode
prefix_cache.py  keys and values of prompt blocks already computed, reused by prompts that share them
structured.py    response_format (JSON mode, JSON schema) by constrained decoding with llguidance
app.py           the HTTP API (FastAPI, server-sent events), its guards and errors; protocol.py: request bodies
metrics.py       Prometheus metrics; embeddings.py: BERT sentence embeddings; static/index.html: the chat page
"""
