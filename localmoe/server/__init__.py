"""`localmoe serve`: an OpenAI-compatible HTTP API on this machine, so editors, agents and scripts that speak to
llama.cpp, Ollama or LM Studio can use localmoe's models, and its router as the model `localmoe/auto`.

Built on Starlette and uvicorn: a small, well-kept ASGI toolkit (the layer FastAPI itself is built on) and the
reference ASGI server, both pure Python with few dependencies. The API is four routes whose request bodies are
checked by hand to match OpenAI's error shapes exactly, so FastAPI's validation and schema layer (and pydantic's
own error format) would add weight without saving code. Server-sent events, disconnect detection and graceful
shutdown come from Starlette's StreamingResponse and uvicorn.

`protocol` holds the wire format, `app` the routes, the generation queue and `serve()`.
"""
