"""`gpt2tune serve RUN`: an OpenAI-compatible HTTP server for a fine-tuned run.

- `engine`: the loaded run (causal LM, chat or classifier) and how a request becomes token ids;
- `batching`: the worker thread that micro-batches requests into one decoding batch, behind a
  bounded queue;
- `schemas`: request bodies (OpenAI fields plus verse-form extensions), request size limits and
  OpenAI-style errors;
- `detok`: the text of a completion as tokens come, never a partial character;
- `app`: the FastAPI application (endpoints, server-sent events, API key, the playground in
  `static/index.html`).

Use it from Python without the CLI::

    from gpt2tune.serve.app import create_app
    from gpt2tune.serve.engine import load_engine
    app = create_app(load_engine("runs/quickstart"))   # then uvicorn.run(app)
"""
