#!/usr/bin/env bash
# Talk to `mistralrs serve` with curl: readiness, chat, streaming, JSON schema, Responses API,
# tokenizer. Every answer is printed as the server's raw JSON (pipe it to `jq` to read it).
#
#   mistralrs serve -m demo               # in another terminal (port 1234)
#   bash examples/curl/chat.sh [URL]      # URL or $MISTRALRS_URL, default http://localhost:1234
set -euo pipefail

URL=${1:-${MISTRALRS_URL:-http://localhost:1234}}
# Only needed when the server was started with --api-key (or MISTRALRS_API_KEY).
AUTH="Authorization: Bearer ${MISTRALRS_API_KEY:-none}"

post() {  # post PATH JSON: fail on an HTTP error, but still print the error body
  curl -sS --fail-with-body "$URL$1" -H 'Content-Type: application/json' -H "$AUTH" -d "$2"
  echo
}

# The socket opens before the model is loaded: /health (the readiness probe) and the model
# routes answer 503 until then, so wait for /health to answer 200.
for _ in $(seq 120); do
  curl -sf "$URL/health" >/dev/null && break
  sleep 0.5
done

echo "== models"
curl -sS --fail-with-body "$URL/v1/models" -H "$AUTH"
echo

echo "== chat"
post /v1/chat/completions '{
  "model": "default",
  "messages": [{"role": "user", "content": "Hello!"}],
  "max_tokens": 32
}'

echo "== streaming"  # -N: print each server-sent event as it arrives; the last is data: [DONE]
curl -sS -N --fail-with-body "$URL/v1/chat/completions" -H 'Content-Type: application/json' -H "$AUTH" -d '{
  "messages": "Tell me a story", "max_tokens": 16, "stream": true, "stream_options": {"include_usage": true}
}'

echo "== json schema"  # compact JSON with bounded fields, so it completes within max_tokens
post /v1/chat/completions '{
  "messages": "Describe Paris as JSON.",
  "max_tokens": 96,
  "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "is_capital": {"type": "boolean"}},
    "required": ["city", "is_capital"], "additionalProperties": false,
    "x-guidance": {"whitespace_flexible": false}}}}
}'

echo "== regex grammar"  # a mistral.rs extension
post /v1/chat/completions '{
  "messages": "When did Apollo 11 land?", "max_tokens": 16,
  "grammar": {"type": "regex", "value": "[0-9]{4}-[0-9]{2}-[0-9]{2}"}
}'

echo "== responses"
post /v1/responses '{"input": "My name is Ada.", "instructions": "Be brief.", "max_output_tokens": 16}'

echo "== tokenize"
post /tokenize '{"prompt": "Hello world"}'
