"""Embedding models (docs/embeddings.md): the sentence-transformers module pipeline
(`pipeline`), the batching engine (`engine`), the service (`service`) and the OpenAI
`/v1/embeddings` request and response (`requests`)."""
