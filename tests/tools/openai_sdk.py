"""Talks to an Endpoint with OpenAI's official Python SDK, as users' tools do.

Usage: openai_sdk.py BASE_URL API_KEY MODEL PROMPT MAX_TOKENS
Prints one JSON object: the model list, a chat answer (whole and streamed), a text completion,
and the error the SDK raises for an unknown model.
"""

import json
import sys

import openai


def main() -> None:
    base, key, model, prompt, max_tokens = sys.argv[1:6]
    max_tokens = int(max_tokens)
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, timeout=60, max_retries=0)
    out = {"models": [m.id for m in client.models.list().data]}
    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0
    )
    out["chat"] = chat.choices[0].message.content
    out["chat_finish"] = chat.choices[0].finish_reason
    out["chat_usage"] = chat.usage.completion_tokens
    pieces = []
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
    out["stream"] = "".join(pieces)
    out["stream_usage"] = usage
    text = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    out["completion"] = text.choices[0].text
    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=1)
        out["unknown_model"] = "accepted"
    except openai.NotFoundError as e:
        out["unknown_model"] = e.status_code
    print(json.dumps(out))


if __name__ == "__main__":
    main()
