"""A real OpenAI-compatible server for the endpoint judge's tests: llama.cpp's own HTTP server
(the `xllamacpp` wheel, no compiler needed), serving a GGUF on 127.0.0.1 until SIGTERM.

    .venv/bin/python tests/llamacpp_server.py MODEL.gguf PORT [API_KEY|-] [ALIAS]

Prints `READY <address>` once it listens. One slot, two threads, and F32 key/value cache, so
that an F32 GGUF computes what the kit's float32 model computes (up to summation order).
"""
import signal
import sys
import time

import xllamacpp

model, port = sys.argv[1], int(sys.argv[2])
key = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
alias = sys.argv[4] if len(sys.argv) > 4 else None
params = xllamacpp.CommonParams()
params.model.path = model
params.hostnames = ["127.0.0.1"]
params.port = port
params.n_ctx = 4096
params.n_parallel = 1
params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 2
params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
if key:
    params.api_keys = [key]
if alias:
    params.model_alias = {alias}  # a set: a plain string would become its characters
server = xllamacpp.Server(params)
print(f"READY {server.listening_address}", flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(1)
