"""Structured output through the `openai` SDK: `response_format` with a JSON schema makes the
server constrain every token, so the answer parses even from the random demo model.

    python examples/openai_sdk/json_schema.py [URL]   # default http://localhost:1234 ($MISTRALRS_URL)
"""

import json
import os
import sys
from typing import Literal

from openai import OpenAI
from pydantic import BaseModel, ConfigDict, Field

url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MISTRALRS_URL", "http://localhost:1234")
client = OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("MISTRALRS_API_KEY", "none"))

# Bounded fields and compact JSON keep the answer within max_tokens: a cut-off answer
# (finish_reason "length") is not valid JSON, and a random model pads with whitespace.
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 50},
        "is_capital": {"type": "boolean"},
    },
    "required": ["city", "population_millions", "is_capital"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},  # llguidance's option: no whitespace runs
}
res = client.chat.completions.create(
    model="default",
    messages=[{"role": "user", "content": "Describe Paris as JSON."}],
    response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}},
    max_tokens=128,
)
print("json_schema:", json.dumps(json.loads(res.choices[0].message.content), ensure_ascii=False))


# Or let the SDK derive the schema from a pydantic model and parse the answer into it.
class User(BaseModel):
    model_config = ConfigDict(json_schema_extra={"x-guidance": {"whitespace_flexible": False}})
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=150)
    role: Literal["admin", "editor", "viewer"]


res = client.chat.completions.parse(
    model="default", messages=[{"role": "user", "content": "A user record for Ada, 36, admin."}],
    response_format=User, max_tokens=128)
print("pydantic:", repr(res.choices[0].message.parsed))
