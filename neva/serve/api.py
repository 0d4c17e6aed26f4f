"""The OpenAI-compatible HTTP API over the engine: ``POST /v1/chat/completions`` (JSON, or server-sent
events with ``stream``), ``GET /v1/models``, ``GET /health``. Every bad request gets a 4xx with an
OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``; an error inside generation fails
only its batch's requests (500); the server keeps serving.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from neva.generate import Sampling
from neva.serve.engine import Engine, Job
from neva.serve.prompts import Prompter, RequestError

MAX_STOPS = 4


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _number(body: dict, key: str, kind, default, lo=None, hi=None, lo_open=False):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
        raise RequestError(f"{key} must be {'a number' if kind is float else 'an integer'}, not {v!r}", param=key)
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        where = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise RequestError(f"{key}={v} is out of range {where}", param=key)
    return kind(v)


def sampling_of(body: dict, prompt_len: int, max_position: int, end: str) -> tuple[Sampling, bool]:
    """The request's sampling fields -> (Sampling, whether a client seed must reproduce)."""
    if _number(body, "n", int, 1) != 1:
        raise RequestError("n must be 1: this server returns one choice per request", param="n")
    room = max_position - prompt_len
    max_tokens = _number(body, "max_completion_tokens", int, None, 1) or _number(body, "max_tokens", int, room, 1)
    if max_tokens > room:
        raise RequestError(f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceed the model's "
                           f"{max_position} positions", param="max_tokens", code="context_length_exceeded")
    temperature = _number(body, "temperature", float, 1.0, 0, 2)
    top_p = _number(body, "top_p", float, 1.0, 0, 1, lo_open=True)
    top_k = _number(body, "top_k", int, 0, -1)
    seed = _number(body, "seed", int, None)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings", param="stop")
    s = Sampling(max_new_tokens=max_tokens, temperature=temperature, top_k=max(top_k, 0), top_p=top_p,
                 stop_strings=tuple(dict.fromkeys(stops + ([end] if end else []))), seed=seed or 0)
    return s, seed is not None and temperature > 0


def app(engine: Engine, prompter: Prompter, name: str, end: str) -> FastAPI:
    """``end``: the template's stop string (besides EOS), always a stop."""
    api = FastAPI(title="neva", docs_url=None, redoc_url=None)
    created = int(time.time())
    max_position = prompter.cfg.llm.max_position

    @api.exception_handler(RequestError)
    async def _bad(request: Request, e: RequestError):
        return _error(e)

    @api.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        return _error(RequestError(f"internal error: {type(e).__name__}: {e}", status=500, kind="server_error"))

    @api.get("/health")
    async def health():
        return {"status": "ok", "waiting": engine.q.qsize(), "batches": engine.batches}

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "neva",
                                            "max_model_len": max_position}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("application/json", ""):     # none given: read the body as JSON anyway
            raise RequestError(f"Content-Type must be application/json, not {ctype}", status=415)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != name:
            raise RequestError(f"the model `{model}` does not exist: this server serves `{name}` (GET /v1/models)",
                               status=404, param="model", code="model_not_found")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("stream must be true or false", param="stream")
        prompt = await run_in_threadpool(prompter, body.get("messages"))
        sampling, seeded = sampling_of(body, len(prompt.ids), max_position, end)
        rid, t0 = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        finished = loop.create_future()         # set from the engine's thread, without a thread waiting here
        job = Job(prompt, sampling, seeded,
                  on_text=(lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d)) if stream else None,
                  on_done=lambda: loop.call_soon_threadsafe(finished.set_result, None))
        engine.submit(job)

        def usage():
            n = job.result["completion_tokens"]
            return {"prompt_tokens": len(prompt.ids), "completion_tokens": n, "total_tokens": len(prompt.ids) + n}

        if not stream:
            await finished
            if job.error is not None:
                raise job.error
            return {"id": rid, "object": "chat.completion", "created": t0, "model": name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": job.result["text"]},
                                 "finish_reason": job.result["finish"], "logprobs": None}], "usage": usage()}

        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict, finish=None, **extra) -> str:
            c = {"id": rid, "object": "chat.completion.chunk", "created": t0, "model": name,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
            return f"data: {json.dumps(c)}\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            while True:
                get = asyncio.ensure_future(deltas.get())
                await asyncio.wait([get, finished], return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    yield chunk({"content": get.result()})
                    continue
                get.cancel()
                while not deltas.empty():
                    yield chunk({"content": deltas.get_nowait()})
                break
            if job.error is not None:
                err = job.error if isinstance(job.error, RequestError) else \
                    RequestError(f"internal error: {type(job.error).__name__}: {job.error}", 500, kind="server_error")
                yield f"data: {json.dumps(err.body())}\n\n"
            else:
                yield chunk({}, job.result["finish"])
                if with_usage:
                    c = {"id": rid, "object": "chat.completion.chunk", "created": t0, "model": name, "choices": [],
                         "usage": usage()}
                    yield f"data: {json.dumps(c)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return api
