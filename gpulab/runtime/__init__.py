"""llama.cpp in-process: loading with a SplitConfig, log capture, dry runs, RPC servers."""
