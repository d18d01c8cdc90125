#!/usr/bin/env python3
"""Checks a HotPrefix server with the official OpenAI Python client (`openai` on PyPI).

Usage: openai-client-check.py --base-url http://127.0.0.1:8000/v1 --model MODEL_ID

Runs what OpenAI-compatible clients do most: the model list, a chat completion (twice, the
second expected to hit the prefix cache), a streamed chat completion with the usage chunk, a
completion, a streamed completion, and two errors the client must map to its exception types.
The answers must name Paris (the default model, greedy, knows it). Prints one line per check and
a JSON summary; exits non-zero on the first failure. scripts/setup-python.sh installs the pinned
client into .venv; engine/tests/openai_client.rs runs this against an in-process server.
"""

import argparse
import json
import sys
import time

import openai
from openai import OpenAI

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"


class CheckFailed(Exception):
    """A check did not hold."""


def expect(cond, what):
    if not cond:
        raise CheckFailed(what)


def check_usage(usage, what):
    """The usage block parses into the client's types, with consistent counts."""
    expect(usage is not None, f"{what}: no usage")
    expect(usage.prompt_tokens > 0, f"{what}: prompt_tokens {usage.prompt_tokens}")
    expect(usage.completion_tokens > 0, f"{what}: completion_tokens {usage.completion_tokens}")
    expect(
        usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
        f"{what}: total_tokens {usage.total_tokens}",
    )
    details = usage.prompt_tokens_details
    expect(details is not None, f"{what}: no prompt_tokens_details")
    cached = details.cached_tokens
    expect(isinstance(cached, int), f"{what}: cached_tokens {cached!r}")
    return cached


def run(client, model):
    summary = {"openai_version": openai.__version__}

    models = client.models.list()
    ids = [m.id for m in models.data]
    expect(model in ids, f"models.list(): {model} not in {ids}")
    summary["models"] = ids
    print(f"ok  models.list(): {ids}")
    one = client.models.retrieve(model)
    expect(one.id == model, f"models.retrieve(): got {one.id}")
    print(f"ok  models.retrieve(): {one.id}")

    chat = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=32
    )
    text = chat.choices[0].message.content
    expect("Paris" in text, f"chat: no Paris in {text!r}")
    expect(chat.choices[0].message.role == "assistant", "chat: role")
    expect(chat.choices[0].finish_reason in ("stop", "length"), "chat: finish_reason")
    check_usage(chat.usage, "chat")
    print(f"ok  chat.completions.create(): {text!r}")

    again = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=32
    )
    cached = check_usage(again.usage, "repeated chat")
    expect(cached > 0, f"repeated chat: cached_tokens {cached}, expected a cache hit")
    expect(again.choices[0].message.content == text, "repeated chat: a different greedy answer")
    summary["cached_tokens"] = cached
    print(f"ok  repeated chat: cached_tokens {cached}")

    parts, finish, usage, roles = [], None, None, []
    for chunk in client.chat.completions.create(
        model=model,
        messages=QUESTION,
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            expect(chunk.choices == [], "streamed chat: the usage chunk has choices")
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    streamed = "".join(parts)
    expect(streamed == text, f"streamed chat: {streamed!r} differs from {text!r}")
    expect(roles == ["assistant"], f"streamed chat: roles {roles}")
    expect(finish == chat.choices[0].finish_reason, f"streamed chat: finish_reason {finish}")
    check_usage(usage, "streamed chat")
    expect(
        usage.completion_tokens == chat.usage.completion_tokens,
        "streamed chat: completion_tokens differ",
    )
    print(f"ok  streamed chat: {streamed!r}, usage {usage.model_dump()}")

    completion = client.completions.create(
        model=model, prompt=PROMPT, temperature=0, max_tokens=8
    )
    ctext = completion.choices[0].text
    expect("Paris" in ctext, f"completion: no Paris in {ctext!r}")
    check_usage(completion.usage, "completion")
    print(f"ok  completions.create(): {ctext!r}")

    streamed_c = "".join(
        c.text
        for chunk in client.completions.create(
            model=model, prompt=PROMPT, temperature=0, max_tokens=8, stream=True
        )
        for c in chunk.choices
    )
    expect(streamed_c == ctext, f"streamed completion: {streamed_c!r} differs from {ctext!r}")
    print("ok  streamed completion")

    try:
        client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=4)
        raise CheckFailed("an unknown model was accepted")
    except openai.NotFoundError as e:
        expect(e.status_code == 404, f"unknown model: status {e.status_code}")
        expect(e.code == "model_not_found", f"unknown model: code {e.code!r}")
        expect(e.param == "model", f"unknown model: param {e.param!r}")
    print("ok  unknown model -> NotFoundError")

    try:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=0)
        raise CheckFailed("max_tokens=0 was accepted")
    except openai.BadRequestError as e:
        expect(e.param == "max_tokens", f"max_tokens=0: param {e.param!r}")
        expect(e.type == "invalid_request_error", f"max_tokens=0: type {e.type!r}")
    print("ok  max_tokens=0 -> BadRequestError")

    summary.update(chat=text, streamed_chat=streamed, completion=ctext)
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True, help="the server's /v1 URL")
    ap.add_argument("--model", required=True, help="the served model id")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    args = ap.parse_args()
    # No retries: a retried request would hide a failure (and double the time).
    client = OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=args.timeout)
    started = time.monotonic()
    try:
        summary = run(client, args.model)
    except CheckFailed as e:
        print(f"FAIL {e}", file=sys.stderr)
        return 1
    except openai.APIError as e:
        print(f"FAIL the client raised {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    summary["seconds"] = round(time.monotonic() - started, 2)
    print("openai-client-check: all checks passed")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
