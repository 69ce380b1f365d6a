"""Structured output: the answer is forced to match a JSON schema, a regex or a Lark grammar,
token by token, so it parses even from the random-weight demo model.

    python examples/python_api/structured_output.py [MODEL]   # default: demo (random text)
"""

import json
import os
import sys

from mistralrs import ChatCompletionRequest, Runner, Which

model_id = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MISTRALRS_MODEL", "demo")

# The grammar fixes the form but max_tokens still applies, and a cut-off answer (finish_reason
# "length") is not valid JSON, so keep outputs bounded: maxLength, minimum/maximum, enum, and
# compact JSON (JSON allows any run of whitespace between tokens; a random model writes long ones).
USER = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "editor", "viewer"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},  # llguidance's option: no whitespace runs
}
DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
ARITHMETIC = 'start: NUMBER (OP NUMBER)*\nOP: " + " | " - "\nNUMBER: /[0-9]{1,3}/\n'

with Runner(which=Which.Plain(model_id=model_id)) as runner:
    # The prompt still says what to produce: the constraint guarantees the form, not the sense.
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages="A user record for Ada, 36, admin, as JSON.", max_tokens=128,
        response_format={"type": "json_schema", "json_schema": {"name": "user", "schema": USER}}))
    user = json.loads(res.choices[0].message.content)
    print("json_schema:", json.dumps(user, ensure_ascii=False))

    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages="When did Apollo 11 land?", max_tokens=16, grammar=DATE, grammar_type="regex"))
    print("regex:", res.choices[0].message.content)

    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages="Write a sum.", max_tokens=32, grammar=ARITHMETIC, grammar_type="lark"))
    print("lark:", res.choices[0].message.content, f"({res.choices[0].finish_reason})")
