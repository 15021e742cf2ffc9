"""Plans and fleets spelled for the tools people run: llama-server, llama-bench, llama-cpp-python, Ollama,
KoboldCpp, llama-swap."""
