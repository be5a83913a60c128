"""A vLLM-behaviour simulator engine: vLLM's OpenAI API over a continuous-batching model."""
