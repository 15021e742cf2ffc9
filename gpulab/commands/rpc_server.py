"""`gpulab rpc-server [--host H] [--port P] [--device CPU]`: serve a device over llama.cpp's RPC protocol."""

from __future__ import annotations

from .result import Result

__all__ = ["register", "run"]


def register(sub, frontend: str) -> None:
    p = sub.add_parser("rpc-server", help="serve a device over llama.cpp's RPC protocol (no authentication!)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; anything else is exposed)")
    p.add_argument("--port", type=int, default=50052)
    p.add_argument("--device", default="CPU", help="llama.cpp device to serve: CPU, CUDA0, ...")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=None, help="local tensor cache directory")
    p.set_defaults(run=run)


def run(a, session) -> Result:
    from ..runtime.llama_lib import require
    require()   # llama-cpp-python: the `run` extra
    from ..runtime.rpc import serve
    serve(a.host, a.port, device=a.device, threads=a.threads, cache_dir=a.cache_dir)
    return Result()
