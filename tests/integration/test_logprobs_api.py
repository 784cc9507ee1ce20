"""logprobs, top_logprobs and prompt_logprobs through the real gRPC server and client.

Unary values match PEFT's log_softmax on the embedded model; stream messages carry exactly
the entries of their own token ids (also while a stop sequence holds text back) and
prompt_logprobs on the first message only; bad values are INVALID_ARGUMENT and the server
keeps serving; `loraserve generate --logprobs N` prints them in text, JSON and stream modes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from peft import PeftModel
from serving_support import KEYS, client_for, integration_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraserve.cli import main
from loraserve.client.results import merge_stream, token_logprobs
from loraserve.client.sync import LoraServeClient
from loraserve.server.background import BackgroundServer
from loraserve.v1 import inference_pb2

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(
    default_model: Path, tenants_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackgroundServer]:
    """The integration server, but streaming one message per engine step (no pacing
    interval): a step whose text a stop sequence holds back is then a message of its own,
    never merged into the next one, so the held-back path is always exercised."""
    config = integration_config(
        default_model,
        tenants_file,
        tmp_path_factory.mktemp("data"),
        stream_interval_seconds=0.0,
    )
    thread = BackgroundServer(config).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def peft(default_model: Path, adapter_dirs: dict[str, Path]) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(default_model, local_files_only=True).eval()
    return PeftModel.from_pretrained(base, adapter_dirs["qv"]).eval()


@pytest.fixture(scope="module")
def tokenizer(default_model: Path):
    return AutoTokenizer.from_pretrained(default_model, local_files_only=True)


@pytest.fixture
def scorer(acme: LoraServeClient, adapter_dirs: dict[str, Path]):
    acme.upload_adapter(adapter_dirs["qv"], "scorer")
    yield "scorer"
    acme.delete_adapter("scorer")


def _ids(entries) -> list[int]:
    return [e.token_id for e in entries]


def test_unary_logprobs_match_peft(
    acme: LoraServeClient, scorer: str, peft: PeftModel, tokenizer
) -> None:
    response = acme.generate(
        PROMPT,
        adapter=scorer,
        max_new_tokens=8,
        temperature=0.8,
        seed=3,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=5,
        prompt_logprobs=True,
    )
    prompt = tokenizer(PROMPT)["input_ids"]
    assert response.usage.prompt_tokens == len(prompt)
    full = prompt + list(response.token_ids)
    with torch.no_grad():
        logits = peft(input_ids=torch.tensor([full])).logits[0].float()  # (len(full), vocab)
    generated = torch.log_softmax(logits[len(prompt) - 1 : -1] / 0.8, dim=-1)
    scored = torch.log_softmax(logits[: len(prompt) - 1], dim=-1)
    for entries, expected, targets in (
        (response.logprobs, generated, list(response.token_ids)),
        (response.prompt_logprobs, scored, prompt[1:]),
    ):
        assert _ids(entries) == targets
        want = expected.gather(1, torch.tensor(targets)[:, None])[:, 0]
        got = torch.tensor([e.logprob for e in entries])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        values, top_ids = torch.topk(expected, 5, dim=-1)
        assert [[t.token_id for t in e.top] for e in entries] == top_ids.tolist()
        got_top = torch.tensor([[t.logprob for t in e.top] for e in entries])
        torch.testing.assert_close(got_top, values, rtol=1e-4, atol=1e-5)
    typed = token_logprobs(response.logprobs)
    assert [e.token_id for e in typed] == list(response.token_ids) and len(typed[0].top) == 5


def test_greedy_top1_is_the_token_and_no_request_no_logprobs(acme: LoraServeClient) -> None:
    response = acme.generate(PROMPT, max_new_tokens=6, logprobs=True, top_logprobs=1)
    assert all(e.top[0].token_id == e.token_id for e in response.logprobs)
    assert all(e.top[0].logprob == e.logprob for e in response.logprobs)
    plain = acme.generate(PROMPT, max_new_tokens=6)
    assert plain.token_ids == response.token_ids
    assert not plain.logprobs and not plain.prompt_logprobs
    only = acme.generate(PROMPT, max_new_tokens=2, logprobs=True)
    assert len(only.logprobs) == len(only.token_ids) and all(not e.top for e in only.logprobs)


def test_stream_messages_carry_their_own_entries(acme: LoraServeClient, scorer: str) -> None:
    options = {"adapter": scorer, "max_new_tokens": 24, "ignore_eos": True}
    full = acme.generate(PROMPT, **options)
    assert len(full.text) > 6
    # A stop sequence from the middle of the text: its prefixes hold text back for a while.
    stop = full.text[4:7]
    unary = acme.generate(
        PROMPT, stop=[stop], logprobs=True, top_logprobs=2, prompt_logprobs=True, **options
    )
    assert unary.finish_reason == inference_pb2.FINISH_REASON_STOP
    chunks = list(
        acme.generate_stream(
            PROMPT, stop=[stop], logprobs=True, top_logprobs=2, prompt_logprobs=True, **options
        )
    )
    assert any(not c.text for c in chunks), "some messages hold their text back"
    for chunk in chunks:
        assert _ids(chunk.logprobs) == list(chunk.token_ids)
    assert list(chunks[0].prompt_logprobs) == list(unary.prompt_logprobs)
    assert len(unary.prompt_logprobs) == unary.usage.prompt_tokens - 1
    assert all(not c.prompt_logprobs for c in chunks[1:])
    merged = merge_stream(chunks)
    assert list(merged.logprobs) == list(unary.logprobs)
    assert list(merged.prompt_logprobs) == list(unary.prompt_logprobs)
    assert merged.text == unary.text


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs: 21 is not in 0..20"),
        ({"top_logprobs": 3}, "top_logprobs: set logprobs or prompt_logprobs too"),
    ],
)
def test_bad_top_logprobs_is_invalid_argument(
    acme: LoraServeClient, server: BackgroundServer, fields: dict, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as unary:
        acme.generate(PROMPT, max_new_tokens=2, **fields)
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in unary.value.details()
    with pytest.raises(grpc.RpcError) as stream:
        list(acme.generate_stream(PROMPT, max_new_tokens=2, **fields))
    assert stream.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in stream.value.details()
    # The server keeps serving, this tenant and the others.
    assert acme.generate(PROMPT, max_new_tokens=2, logprobs=True).logprobs
    with client_for(server, "globex") as globex:
        assert len(globex.generate(PROMPT, max_new_tokens=2).token_ids) == 2


def test_final_assistant_message_is_scored_as_rendered(acme: LoraServeClient, tokenizer) -> None:
    turns = [("user", "Hi there"), ("assistant", "Hello, how are you?")]
    scored = acme.generate(turns, max_new_tokens=1, prompt_logprobs=True)
    rendered = tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in turns], tokenize=False, add_generation_prompt=False
    )
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert _ids(scored.prompt_logprobs) == ids[1:]
    # Without prompt_logprobs the generation prompt is appended, as for any chat request.
    plain = acme.generate(turns, max_new_tokens=1)
    assert plain.usage.prompt_tokens > scored.usage.prompt_tokens


def test_cli_generate_logprobs(
    server: BackgroundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--target", server.target, "--api-key", KEYS["acme"], "generate", PROMPT]
    flags = ["--max-new-tokens", "4", "--ignore-eos", "--logprobs", "3"]
    assert main([*base, *flags, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["logprobs"]) == 4 and len(out["logprobs"][0]["top"]) == 3
    assert [e["token_id"] for e in out["logprobs"]] == out["token_ids"]
    assert "prompt_logprobs" not in out
    assert main([*base, *flags, "--stream", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["logprobs"] == out["logprobs"]
    for mode in ([], ["--stream"]):
        assert main([*base, *flags, *mode]) == 0
        lines = capsys.readouterr().out.splitlines()
        header = next(
            i for i, line in enumerate(lines) if line.split()[:3] == ["token", "logprob", "top"]
        )
        table = lines[header + 1 :]
        assert [int(line.split()[0]) for line in table] == out["token_ids"]
        assert all(len(line.split()) == 2 + 3 for line in table)
    assert main([*base, "--logprobs", "21"]) == 2
    assert "0..20" in capsys.readouterr().err


def test_async_client_returns_the_same_entries(server: BackgroundServer, acme) -> None:
    import asyncio

    from loraserve.client.aio import AsyncLoraServeClient
    from loraserve.client.config import ClientConfig

    options = {"max_new_tokens": 5, "logprobs": True, "top_logprobs": 2, "prompt_logprobs": True}
    expected = acme.generate(PROMPT, **options)

    async def run() -> tuple[inference_pb2.GenerateResponse, list]:
        config = ClientConfig(target=server.target, api_key=KEYS["acme"], timeout_s=60)
        async with AsyncLoraServeClient(config) as client:
            unary = await client.generate(PROMPT, **options)
            chunks = [c async for c in client.generate_stream(PROMPT, **options)]
        return unary, chunks

    unary, chunks = asyncio.run(run())
    assert list(unary.logprobs) == list(expected.logprobs)
    assert list(unary.prompt_logprobs) == list(expected.prompt_logprobs)
    assert list(merge_stream(chunks).logprobs) == list(expected.logprobs)
