"""Load test of ``starquant serve``: N concurrent clients x M requests against one server,
then the offline driver on the same requests one at a time; local only, stops by itself.

Run in the serving environment (``.venv-serve``, see ``docs/serving.md``)::

    .venv-serve/bin/python benchmarks/serve_load.py --family llada --scheme FP W4A4 \
        --clients 8 --requests 4

For each checkpoint (the bundled tiny model, or it quantized with ``epochs=0`` as in
``serve.py``: speed and correctness, not quality), the server is started on 127.0.0.1 as a user
starts it, the ``openai`` client sends ``--clients`` x ``--requests`` completions (prompts of
different lengths from the held-out text, the same diffusion settings), and each request's
latency, status and text are recorded; a request that gets no answer at all is "lost". The
same requests are sent first by one client, one after another (sequential serving);
``--repeats`` alternates the two that many times and keeps the median run of each. The
server is stopped and the offline driver (``driver.denoise`` on ``vllm.LLM``, the same engine
settings) runs the same requests one after the other (each its own batch: the prompts
differ in length; its median over ``--repeats``), and on that engine, ``--clients``
canvases scored in one call against one per call (``engine_batching_gain``: the most that
batching can give on this machine, "engine max"). Reported: generated tokens/s of the three,
the concurrent run's ratio to the other two, its p50/p99 latency, errors, lost requests
(every server run), and how many requests got the offline driver's text in both median
server runs. Prints a table and writes ``results/serve-load-<family>[-<dtype>].json``
(``--dtype``: the engine's, float32 by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import torch
from serve import make_checkpoints  # benchmarks/ is the script's own folder

from starquant_plugin.assets import TINY_MODELS, evaluation_text

ENGINE = {"max_model_len": 256, "dtype": "float32", "top_k": 2}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def sampler_settings(family: str, gen_length: int, steps: int) -> dict:
    if family == "llada":
        return {"gen_length": gen_length, "steps": steps, "block_length": gen_length}
    return {"gen_length": gen_length, "steps": steps, "alg": "maskgit_plus"}


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    """``count`` prompts of 4-40 tokens cut from the held-out text."""
    ids = tokenizer(evaluation_text(), add_special_tokens=False)["input_ids"]
    return [ids[i * 53 % (len(ids) - 64):][: 4 + (i * 7) % 37] for i in range(count)]


def start_server(checkpoint: str, name: str, clients: int, log: Path) -> tuple:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "starquant_plugin.cli", "serve", checkpoint, "--port", str(port),
         "--served-model-name", name, "--max-model-len", str(ENGINE["max_model_len"]),
         "--dtype", ENGINE["dtype"], "--top-k", str(ENGINE["top_k"]), "--max-running",
         str(clients)], stdout=log.open("w"), stderr=subprocess.STDOUT,
        env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(1)
    process.kill()
    raise RuntimeError(f"the server did not start; its log:\n{log.read_text()[-5000:]}")


async def load(url: str, name: str, prompts: list[list[int]], clients: int,
               settings: dict) -> dict:
    """``clients`` tasks, each sending its share of ``prompts`` one after another."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                                timeout=3600)
    results: list[dict | None] = [None] * len(prompts)

    async def one_client(index: int) -> None:
        for request in range(index, len(prompts), clients):
            start = time.perf_counter()
            try:
                response = await client.completions.create(
                    model=name, prompt=prompts[request], extra_body=settings)
                results[request] = {"ok": True, "text": response.choices[0].text,
                                    "seconds": time.perf_counter() - start}
            except openai.APIStatusError as error:
                results[request] = {"ok": False, "status": error.status_code,
                                    "seconds": time.perf_counter() - start}
            except openai.APIConnectionError:
                pass  # no answer at all: lost

    start = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(clients)))
    seconds = time.perf_counter() - start
    await client.close()  # inside the loop that opened it
    return {"seconds": seconds, "results": results}


def engine_batching_gain(llm, mask_id: int, prompts: list[list[int]], clients: int,
                         gen_length: int, calls: int = 30) -> float:
    """The most batching can give on this machine: ``clients`` canvases (first denoising
    step of the first prompts) scored in one engine call vs one canvas per call, as
    ``clients * t(one) / t(all)`` (medians of ``calls`` calls each, alternating)."""
    canvases = [{"prompt_token_ids": p + [mask_id] * gen_length} for p in prompts[:clients]]
    times: dict[int, list[float]] = {1: [], clients: []}
    for _ in range(calls):
        for count in times:
            start = time.perf_counter()
            llm.encode(canvases[:count], pooling_task="token_classify", use_tqdm=False)
            times[count].append(time.perf_counter() - start)
    one, together = (statistics.median(times[count]) for count in (1, clients))
    return clients * one / together


def offline(checkpoint: str, prompts: list[list[int]], settings: dict, repeats: int,
            clients: int) -> dict:
    """The offline driver on the same requests, one at a time (batch of one each), timed
    ``repeats`` times (the median; the sequences are the same every time); then
    ``engine_batching_gain`` on the same engine."""
    from vllm import LLM

    from starquant_plugin.integrations.vllm.driver import denoise, shutdown
    from starquant_plugin.integrations.vllm.pooler import TOP_K_ATTRIBUTE

    llm = LLM(checkpoint, runner="pooling", enforce_eager=True, dtype=ENGINE["dtype"],
              max_model_len=ENGINE["max_model_len"], skip_tokenizer_init=True,
              hf_overrides={TOP_K_ATTRIBUTE: ENGINE["top_k"]})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sequences = []
        for prompt in prompts:
            generator = torch.Generator().manual_seed(0)  # the server's default seed
            out = denoise(llm, [prompt], generator=generator, **settings)
            sequences.append(out.sequences[0, len(prompt):].tolist())
        times.append(time.perf_counter() - start)
    gain = engine_batching_gain(llm, llm.model_config.hf_config.mask_token_id, prompts,
                                clients, settings["gen_length"])
    shutdown(llm)
    return {"seconds": statistics.median(times), "sequences": sequences,
            "engine_batching_gain": gain}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=["llada", "dream"], default="llada")
    parser.add_argument("--scheme", nargs="+", default=["FP", "W4A4"],
                        choices=["FP", "W8A8", "W4A4"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1,
                        help="time each of the three runs this many times (alternating "
                        "sequential and concurrent serving) and report the medians: on a "
                        "small shared machine one run's times vary up to 2x")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the engine's dtype (server and offline driver)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    ENGINE["dtype"] = args.dtype
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODELS[args.family])
    prompts = make_prompts(tokenizer, args.clients * args.requests)
    settings = sampler_settings(args.family, args.gen_length, args.steps)
    end_ids = {tokenizer.eos_token_id}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        paths = make_checkpoints(args.family, Path(work))
        for scheme in args.scheme:
            name = f"tiny-{args.family}-{scheme.lower()}"
            process, url = start_server(paths[scheme], name, args.clients,
                                        Path(work) / f"{scheme}.log")
            try:
                asyncio.run(load(url, name, prompts[:2], 1, settings))  # warm-up
                runs = [(asyncio.run(load(url, name, prompts, 1, settings)),
                         asyncio.run(load(url, name, prompts, args.clients, settings)))
                        for _ in range(args.repeats)]
            finally:
                process.send_signal(signal.SIGINT)
                process.wait(timeout=120)
            one_client, served = (sorted(kind, key=lambda run: run["seconds"])[len(runs) // 2]
                                  for kind in zip(*runs, strict=True))
            every_answer = [a for pair in runs for run in pair for a in run["results"]]
            sequential = offline(paths[scheme], prompts, settings, args.repeats, args.clients)
            answers = served["results"]
            texts = []
            for sequence in sequential["sequences"]:
                cut = next((i for i, t in enumerate(sequence) if t in end_ids), len(sequence))
                texts.append(tokenizer.decode(sequence[:cut], skip_special_tokens=True))
            ok = [a for a in answers if a and a["ok"]]
            latencies = [a["seconds"] for a in ok]
            tokens = len(prompts) * args.gen_length
            rows.append({
                "scheme": scheme, "requests": len(prompts), "clients": args.clients,
                "server_seconds": served["seconds"], "offline_seconds": sequential["seconds"],
                "one_client_seconds": one_client["seconds"],
                "server_tokens_per_s": tokens / served["seconds"],
                "one_client_tokens_per_s": tokens / one_client["seconds"],
                "offline_tokens_per_s": tokens / sequential["seconds"],
                "ratio_to_one_client": one_client["seconds"] / served["seconds"],
                "ratio_to_offline": sequential["seconds"] / served["seconds"],
                "engine_batching_gain": sequential["engine_batching_gain"],
                "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
                "repeats": args.repeats,
                "errors": sum(1 for a in every_answer if a and not a["ok"]),
                "lost": sum(1 for a in every_answer if a is None),
                "equal_to_offline": sum(
                    1 for a, b, text in zip(answers, one_client["results"], texts, strict=True)
                    if a and b and a["ok"] and b["ok"] and a["text"] == b["text"] == text)})
    header = (f"{'scheme':<7}{'req':>5}{'N clients tok/s':>17}{'1 client':>10}{'offline':>9}"
              f"{'x 1 client':>12}{'x offline':>11}{'engine max':>12}{'p50 s':>8}{'p99 s':>8}"
              f"{'errors':>8}"
              f"{'lost':>6}{'= offline':>11}")
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; {args.family}, {args.clients} "
          f"clients x {args.requests} requests, gen_length {args.gen_length}, {args.steps} "
          f"steps, {args.dtype}")
    print(header)
    for row in rows:
        print(f"{row['scheme']:<7}{row['requests']:>5}{row['server_tokens_per_s']:>17.1f}"
              f"{row['one_client_tokens_per_s']:>10.1f}{row['offline_tokens_per_s']:>9.1f}"
              f"{row['ratio_to_one_client']:>12.2f}{row['ratio_to_offline']:>11.2f}"
              f"{row['engine_batching_gain']:>12.2f}"
              f"{row['p50_s']:>8.2f}{row['p99_s']:>8.2f}{row['errors']:>8}{row['lost']:>6}"
              f"{row['equal_to_offline']:>7}/{row['requests']}")
    suffix = "" if args.dtype == "float32" else f"-{args.dtype}"
    out = args.out or Path(__file__).parent / "results" / f"serve-load-{args.family}{suffix}.json"
    out.write_text(json.dumps({"cpu": cpu_name(), "torch": torch.__version__,
                               "settings": settings, "engine": ENGINE, "rows": rows},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
