"""An OpenAI-compatible server for a NeVA: ``python -m neva.serve MODEL`` (``__main__.py``).

``prompts.py`` turns chat messages (text, images, video) into the prompt training would make;
``engine.py`` queues requests and decodes them in batches; ``api.py`` is the HTTP API (FastAPI).
"""
