"""Where profiles and devices come from: GGUF files (local, HTTP), NVML, llama.cpp, simulation."""
