"""Streams one text completion with OpenAI's official Python SDK, one JSON line per chunk as it
comes (so that a test can act in the middle of the stream), then one line with the finish
reason and usage, or with the error the SDK raised.

Usage: openai_stream.py BASE_URL MODEL PROMPT MAX_TOKENS
"""

import json
import sys

import openai


def say(obj) -> None:
    print(json.dumps(obj), flush=True)


def main() -> None:
    base, model, prompt, max_tokens = sys.argv[1:5]
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", timeout=120, max_retries=0)
    finish, usage = None, None
    try:
        stream = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=int(max_tokens),
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for choice in chunk.choices:
                say({"text": choice.text})
                if choice.finish_reason is not None:
                    finish = choice.finish_reason
    except Exception as e:  # the test reports whatever the SDK raised
        say({"error": f"{type(e).__name__}: {e}"})
        return
    say({"finish": finish, "usage": usage})


if __name__ == "__main__":
    main()
