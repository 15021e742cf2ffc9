"""Choosing the settings: split policies, llama-server's --fit, Ollama's scheduler, moe-balance, the largest context."""
