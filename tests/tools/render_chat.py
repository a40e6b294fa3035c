"""Reference renderer for chat-template tests.

Renders a chat template with Jinja2 configured the way Hugging Face transformers'
apply_chat_template configures it (trim_blocks, lstrip_blocks, loop controls,
raise_exception, strftime_now, a tojson without ASCII or HTML escaping), so the engine's
minijinja rendering can be compared with it. Reads one JSON request per line on stdin and
writes one JSON answer per line: {"text": ...} or {"error": ...}.
"""

import json
import sys
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(fmt):
    return datetime.now().strftime(fmt)


def environment():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def main():
    env = environment()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            template = env.from_string(request["template"])
            context = dict(request.get("extra") or {})
            context.update(
                messages=request["messages"],
                add_generation_prompt=request["add_generation_prompt"],
                bos_token=request["bos_token"],
                eos_token=request["eos_token"],
            )
            answer = {"text": template.render(**context)}
        except Exception as e:  # the test compares failures too
            answer = {"error": str(e)}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
