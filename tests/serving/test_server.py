"""``starquant serve`` end to end: the server started as a user starts it (a fresh process on
127.0.0.1), called with the ``openai`` client and raw HTTP.

Two servers: a W4A4 STaR-Quant LLaDA whose tokenizer has a chat template (completions, chat,
streaming, concurrency, bad requests, a disconnect) and the FP Dream with tight limits (one
running request, no queue, a 3 s timeout). Generated text is compared with the transformers
sampler on the same checkpoint (float32 both sides), which the engine tests show the offline
driver equals.
"""

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import starquant_plugin  # noqa: F401  (registers the transformers loader)
from starquant_plugin.assets import TINY_DREAM, TINY_LLADA
from starquant_plugin.config import StarQuantArgs
from starquant_plugin.integrations.saving import save_starquant
from starquant_plugin.integrations.vllm.openai_server import (
    BadRequest,
    ChatRequest,
    DiffusionServer,
    diffusion_defaults,
)
from starquant_plugin.models.families import mask_token_id
from starquant_plugin.models.loading import load_dllm
from starquant_plugin.models.sampling import llada_generate
from starquant_plugin.pipeline import quantize_dllm

pytestmark = pytest.mark.slow

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
LLADA_NAME = "tiny-llada-w4a4"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(checkpoint: Path, name: str, log: Path, *options: str) -> tuple[subprocess.Popen,
                                                                           str]:
    port = _free_port()
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "starquant_plugin.cli", "serve", str(checkpoint), "--port",
         str(port), "--served-model-name", name, *options],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"starquant serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    pytest.fail(f"starquant serve did not answer /health in 300 s:\n{log.read_text()}")


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(2)  # Ctrl-C, as a user stops it
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def llada_checkpoint(tmp_path_factory) -> Path:
    """A W4A4 STaR-Quant tiny LLaDA (0 SGAT epochs: the format, not the quality, is tested)
    whose tokenizer has a chat template."""
    model, tokenizer = load_dllm(TINY_LLADA)
    rows = torch.randint(3, model.config.vocab_size - 2, (4, 48),
                         generator=torch.Generator().manual_seed(0))
    rows = rows.masked_fill(rows % 2 == 0, mask_token_id(model))
    args = StarQuantArgs(scheme="W4A4", epochs=0)
    quantize_dllm(model, rows, args, progress=False)
    path = save_starquant(model, tmp_path_factory.mktemp("ckpt") / LLADA_NAME, args=args)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llada_server(llada_checkpoint, tmp_path_factory):
    process, url = _start(llada_checkpoint, LLADA_NAME,
                          tmp_path_factory.mktemp("log") / "serve.log", "--max-model-len", "512")
    yield SimpleNamespace(url=url, client=openai.OpenAI(base_url=f"{url}/v1", api_key="none"))
    _stop(process)


@pytest.fixture(scope="module")
def reference(llada_checkpoint):
    """Text of the transformers sampler on the checkpoint, as the server finishes it."""
    model = AutoModelForCausalLM.from_pretrained(llada_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(llada_checkpoint)
    end = {model.config.eos_token_id, tokenizer.eos_token_id}

    def generate(prompt_ids: list[int], **settings) -> str:
        out = llada_generate(model, torch.tensor([prompt_ids]), **settings)
        tokens = out.sequences[0, len(prompt_ids):].tolist()
        cut = next((i for i, token in enumerate(tokens) if token in end), len(tokens))
        return tokenizer.decode(tokens[:cut], skip_special_tokens=True)

    return SimpleNamespace(generate=generate, tokenizer=tokenizer)


SETTINGS = {"steps": 8, "gen_length": 16, "block_length": 8}


def test_completions_and_chat_generate_the_samplers_text(llada_server, reference):
    client = llada_server.client
    assert [m.id for m in client.models.list().data] == [LLADA_NAME]
    prompt = "The history of"
    ids = reference.tokenizer(prompt)["input_ids"]
    completion = client.completions.create(model=LLADA_NAME, prompt=prompt, max_tokens=16,
                                           extra_body={"steps": 8, "block_length": 8})
    assert completion.choices[0].text == reference.generate(ids, **SETTINGS)
    assert completion.usage.prompt_tokens == len(ids)
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    chat = client.chat.completions.create(model=LLADA_NAME, messages=messages,
                                          extra_body=SETTINGS)
    chat_ids = reference.tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert chat.choices[0].message.content == reference.generate(list(chat_ids), **SETTINGS)
    assert chat.choices[0].message.role == "assistant"


def test_a_stream_sends_each_blocks_committed_text_that_adds_up(llada_server):
    client, body = llada_server.client, {"steps": 16, "block_length": 8}
    response = client.completions.create(model=LLADA_NAME, prompt="Once upon a", max_tokens=32,
                                         extra_body=body)
    whole, whole_usage = response.choices[0], response.usage
    chunks = list(client.completions.create(model=LLADA_NAME, prompt="Once upon a",
                                            max_tokens=32, extra_body=body, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [chunk.choices[0].text for chunk in chunks if chunk.choices]
    assert len(texts) >= 2, "expected the text to arrive block by block"
    assert "".join(texts) == whole.text
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == \
        whole.finish_reason
    assert chunks[-1].usage == whole_usage


def test_concurrent_requests_get_what_each_gets_alone(llada_server):
    """Eight requests with different prompt lengths and settings at once: the engine
    batches their steps, and each gets exactly its sequential answer."""
    client = llada_server.client
    requests = [{"prompt": "word " * (1 + i), "max_tokens": 8 * (1 + i % 3),
                 "extra_body": {"steps": 8 * (1 + i % 3), "block_length": 8,
                                "remasking": ("low_confidence", "random")[i % 2],
                                "seed": i}} for i in range(8)]

    def complete(request: dict) -> str:
        return client.completions.create(model=LLADA_NAME, **request).choices[0].text

    alone = [complete(request) for request in requests]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(complete, requests))
    assert together == alone


BAD_REQUESTS = [
    ({"model": "nope", "prompt": "a"}, 404, "does not exist"),
    ({"model": LLADA_NAME, "prompt": "a", "steps": -1}, 400, "steps"),
    ({"model": LLADA_NAME, "prompt": "a", "max_tokens": 5000}, 400, "exceeds"),
    ({"model": LLADA_NAME, "prompt": "a", "logprobs": 2}, 400, "logprobs"),
    ({"model": LLADA_NAME, "prompt": "a", "stop": ["."]}, 400, "stop"),
    ({"model": LLADA_NAME, "prompt": "a", "n": 2}, 400, "n"),
    ({"model": LLADA_NAME, "prompt": "a", "temperature": 0.7}, 400, "full distribution"),
    ({"model": LLADA_NAME, "prompt": "a", "alg": "entropy"}, 400, "do not apply"),
    ({"model": LLADA_NAME, "prompt": "a", "gen_length": 16, "block_length": 5}, 400,
     "divisible"),
    ({"model": LLADA_NAME, "prompt": "a", "colour": "blue"}, 400, "unknown field"),
    ({"model": LLADA_NAME, "prompt": ""}, 400, "empty"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_a_status_and_a_message(llada_server, body, status, message):
    response = httpx.post(f"{llada_server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status and message in error["message"]


def test_malformed_json_is_a_400(llada_server):
    response = httpx.post(f"{llada_server.url}/v1/completions", content=b'{"model": "x"',
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


def test_a_client_that_disconnects_mid_stream_stops_its_request(llada_server):
    body = {"model": LLADA_NAME, "messages": [{"role": "user", "content": "hi"}],
            "stream": True, "gen_length": 448, "steps": 448}
    with httpx.stream("POST", f"{llada_server.url}/v1/chat/completions", json=body,
                      timeout=60) as response:
        lines = response.iter_lines()
        first = json.loads(next(lines).removeprefix("data: "))
        assert first["choices"][0]["delta"]["role"] == "assistant"
        next(lines)  # the blank line that ends the event
        assert httpx.get(f"{llada_server.url}/health").json()["running"] == 1
    start = time.time()  # the whole request takes 448 steps (over 10 s on these CPUs)
    while httpx.get(f"{llada_server.url}/health").json()["running"] and time.time() - start < 5:
        time.sleep(0.2)
    assert httpx.get(f"{llada_server.url}/health").json() == {"status": "ok", "running": 0,
                                                              "waiting": 0}
    # the engine goes on serving
    assert llada_server.client.completions.create(model=LLADA_NAME, prompt="a", max_tokens=8,
                                                  extra_body={"steps": 2}).choices


def test_a_full_server_answers_503_and_a_slow_request_504(tmp_path):
    process, url = _start(TINY_DREAM, "tiny-dream", tmp_path / "serve.log", "--max-running",
                          "1", "--max-waiting", "0", "--request-timeout", "3")
    try:
        slow = {"model": "tiny-dream", "prompt": "a", "max_tokens": 512, "steps": 4000}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/completions", json=slow, timeout=60)
            deadline = time.time() + 10
            while httpx.get(f"{url}/health").json()["running"] == 0 and time.time() < deadline:
                time.sleep(0.1)
            second = httpx.post(f"{url}/v1/completions", json=slow, timeout=60)
            assert second.status_code == 503
            assert "at capacity" in second.json()["error"]["message"]
            assert first.result().status_code == 504
            assert "timeout" in first.result().json()["error"]["message"]
        quick = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "tiny-dream", "prompt": "a", "max_tokens": 8, "steps": 2})
        assert quick.status_code == 200 and quick.json()["choices"][0]["finish_reason"]
    finally:
        _stop(process)


def test_chat_needs_a_chat_template_and_defaults_follow_the_model_cards():
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLADA)
    config = AutoModelForCausalLM.from_pretrained(TINY_LLADA).config
    scheduler = SimpleNamespace(config=config, top_k=2)
    server = DiffusionServer(scheduler, tokenizer, "m", 256)
    with pytest.raises(BadRequest, match="no chat template"):
        server.prompt_ids(ChatRequest(model="m", messages=[{"role": "user", "content": "x"}]))
    assert diffusion_defaults("llada", 128, 2) == {
        "gen_length": 128, "steps": 128, "temperature": 0.0, "block_length": 32,
        "remasking": "low_confidence"}
    assert diffusion_defaults("dream", 48, 2)["alg"] == "maskgit_plus"
    assert diffusion_defaults("dream", 48, 0)["alg"] == "entropy"
