"""End to end through the real gRPC server and the real client: upload, generate, stream,
list, get, delete, tenant isolation, batching across tenants, re-upload versions."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
from serving_support import client_for

from loraserve.client.sync import LoraServeClient
from loraserve.server.background import BackgroundServer
from loraserve.v1 import inference_pb2


def _code(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return excinfo.value.code()


def test_upload_list_get_generate_delete(
    acme: LoraServeClient, adapter_dirs: dict[str, Path]
) -> None:
    info = acme.upload_adapter(adapter_dirs["qv"], "support-bot", description="first try")
    assert (info.name, info.tenant, info.version, info.rank) == ("support-bot", "acme", 1, 8)
    assert info.alpha == 16 and not info.use_rslora
    assert len(info.target_modules) == 8  # q_proj and v_proj in 4 layers
    assert [a.name for a in acme.list_adapters()] == ["support-bot"]
    assert acme.get_adapter("support-bot").sha256 == info.sha256

    base = acme.generate("Tell me a fact", max_new_tokens=12, ignore_eos=True)
    tuned = acme.generate(
        "Tell me a fact", adapter="support-bot", max_new_tokens=12, ignore_eos=True
    )
    assert base.adapter_version == 0 and tuned.adapter_version == 1
    assert len(tuned.token_ids) == 12 and tuned.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert tuned.token_ids != base.token_ids, "the adapter must change the output"
    assert tuned.usage.prompt_tokens > 0 and tuned.usage.completion_tokens == 12
    assert 0 <= tuned.usage.queue_seconds <= tuned.usage.time_to_first_token_seconds
    assert tuned.usage.time_to_first_token_seconds <= tuned.usage.total_seconds

    deleted = acme.delete_adapter("support-bot")
    assert deleted.name == "support-bot"
    assert acme.list_adapters() == []
    with pytest.raises(grpc.RpcError) as err:
        acme.generate("Tell me a fact", adapter="support-bot")
    assert _code(err) == grpc.StatusCode.NOT_FOUND


def test_stream_matches_unary(acme: LoraServeClient, adapter_dirs: dict[str, Path]) -> None:
    acme.upload_adapter(adapter_dirs["mlp"], "streamer")
    unary = acme.generate(
        "Once upon a time", adapter="streamer", max_new_tokens=16, ignore_eos=True
    )
    chunks = list(
        acme.generate_stream(
            "Once upon a time", adapter="streamer", max_new_tokens=16, ignore_eos=True
        )
    )
    # Tokens queued together leave as one message (server.api.stream_pacing), so a stream
    # has at most one message per token; together they are the unary answer.
    assert 1 < len(chunks) <= 16
    assert all(c.token_ids for c in chunks[:-1])
    assert all(c.finish_reason == 0 for c in chunks[:-1])
    assert chunks[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == 16
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert "".join(c.text for c in chunks) == unary.text
    assert len({c.request_id for c in chunks}) == 1
    acme.delete_adapter("streamer")


def test_stop_sequence_and_seeded_sampling(acme: LoraServeClient) -> None:
    full = acme.generate("The river", max_new_tokens=24, ignore_eos=True)
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = acme.generate("The river", max_new_tokens=24, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == inference_pb2.FINISH_REASON_STOP
    assert cut.text == full.text[: full.text.find(stop)]
    a = acme.generate("The river", max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=5)
    b = acme.generate("The river", max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=5)
    assert a.token_ids == b.token_ids


def test_chat_messages_use_the_chat_template(acme: LoraServeClient) -> None:
    chat = acme.generate([("user", "Hi there")], max_new_tokens=4, ignore_eos=True)
    prompt = acme.generate(
        "<|user|>\nHi there<|endoftext|>\n<|assistant|>\n", max_new_tokens=4, ignore_eos=True
    )
    assert chat.token_ids == prompt.token_ids
    assert chat.usage.prompt_tokens == prompt.usage.prompt_tokens


def test_tenant_isolation(
    server: BackgroundServer,
    acme: LoraServeClient,
    globex: LoraServeClient,
    admin: LoraServeClient,
    adapter_dirs: dict[str, Path],
) -> None:
    acme.upload_adapter(adapter_dirs["qv"], "secret-sauce")
    # Another tenant cannot see, use, read or delete it, and is not told it exists.
    assert globex.list_adapters() == []
    for call in (
        lambda: globex.generate("hi", adapter="secret-sauce"),
        lambda: globex.get_adapter("secret-sauce"),
        lambda: globex.delete_adapter("secret-sauce"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert _code(err) == grpc.StatusCode.NOT_FOUND
        assert "secret-sauce" in err.value.details() and "acme" not in err.value.details()
    # A tenant cannot reach into another tenant's namespace; an admin can.
    with pytest.raises(grpc.RpcError) as err:
        globex.list_adapters(tenant="acme")
    assert _code(err) == grpc.StatusCode.PERMISSION_DENIED
    assert [a.name for a in admin.list_adapters(tenant="acme")] == ["secret-sauce"]
    # No key, or a wrong key: UNAUTHENTICATED on every service.
    for tenant in (None, "not-a-key"):
        with client_for(server, tenant) as stranger:
            for call in (
                lambda c=stranger: c.generate("hi"),
                lambda c=stranger: c.list_adapters(),
                lambda c=stranger: c.server_info(),
                lambda c=stranger: c.upload_adapter(adapter_dirs["qv"], "x"),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert _code(err) == grpc.StatusCode.UNAUTHENTICATED
    admin.delete_adapter("secret-sauce", tenant="acme")
    assert acme.list_adapters() == []


def test_reupload_creates_new_version_and_serves_it(
    acme: LoraServeClient, adapter_dirs: dict[str, Path]
) -> None:
    acme.upload_adapter(adapter_dirs["qv"], "evolving")
    first = acme.generate("abc", adapter="evolving", max_new_tokens=8, ignore_eos=True)
    info = acme.upload_adapter(adapter_dirs["mlp"], "evolving")
    assert info.version == 2 and info.rank == 4
    second = acme.generate("abc", adapter="evolving", max_new_tokens=8, ignore_eos=True)
    assert second.adapter_version == 2 and first.adapter_version == 1
    assert second.token_ids != first.token_ids
    acme.delete_adapter("evolving")


def test_concurrent_tenants_share_batches(
    server: BackgroundServer,
    acme: LoraServeClient,
    globex: LoraServeClient,
    adapter_dirs: dict[str, Path],
) -> None:
    acme.upload_adapter(adapter_dirs["qv"], "a1")
    globex.upload_adapter(adapter_dirs["wide"], "g1")
    solo = {
        ("acme", "a1"): acme.generate("batch me", adapter="a1", max_new_tokens=24, ignore_eos=True),
        ("globex", "g1"): globex.generate(
            "batch me", adapter="g1", max_new_tokens=24, ignore_eos=True
        ),
        ("acme", ""): acme.generate("batch me", max_new_tokens=24, ignore_eos=True),
    }
    scheduler = server.server.runtime.engine.scheduler  # type: ignore[union-attr]
    scheduler.decode_sizes = []  # bounded history: start afresh to read just this burst
    results: dict[int, inference_pb2.GenerateResponse] = {}
    plan = [("acme", "a1"), ("globex", "g1"), ("acme", "")] * 4

    def run(i: int, tenant: str, adapter: str) -> None:
        client = acme if tenant == "acme" else globex
        results[i] = client.generate(
            "batch me", adapter=adapter, max_new_tokens=24, ignore_eos=True
        )

    threads = [threading.Thread(target=run, args=(i, *p)) for i, p in enumerate(plan)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sizes = scheduler.decode_sizes
    assert max(sizes) >= 3, f"concurrent requests were not decoded together: {sizes}"
    # Sharing a batch with other tenants' adapters does not change anyone's output.
    for i, key in enumerate(plan):
        assert results[i].token_ids == solo[key].token_ids
    acme.delete_adapter("a1")
    globex.delete_adapter("g1")


def test_server_info(acme: LoraServeClient, admin: LoraServeClient, default_model: Path) -> None:
    info = acme.server_info()
    # A tenant sees the model's name; only an admin sees where it lives on the server's disk.
    assert info.model_path == "" and info.model_name == default_model.name
    assert admin.server_info().model_path == str(default_model)
    assert info.model_type == "llama" and info.architecture == "LlamaForCausalLM"
    assert info.device == "cpu" and info.dtype == "float32"
    assert info.max_lora_rank == 32 and info.max_new_tokens == 256
    assert info.tenant == "acme" and info.has_chat_template
    assert "q_proj" in info.target_modules and "lm_head" not in info.target_modules


def test_adapters_survive_restart(
    default_model: Path, tenants_file: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from loraserve.server.config import ServerConfig

    config = ServerConfig(
        model_path=default_model,
        port=0,
        metrics_port=None,
        data_dir=tmp_path,
        tenants_file=tenants_file,
    )
    first = BackgroundServer(config).start()
    with client_for(first, "acme") as c:
        c.upload_adapter(adapter_dirs["mlp"], "keeper")
        before = c.generate("persist", adapter="keeper", max_new_tokens=8, ignore_eos=True)
    first.stop()
    second = BackgroundServer(config).start()
    try:
        with client_for(second, "acme") as c:
            assert [(a.name, a.version) for a in c.list_adapters()] == [("keeper", 1)]
            after = c.generate("persist", adapter="keeper", max_new_tokens=8, ignore_eos=True)
        assert after.token_ids == before.token_ids
    finally:
        second.stop()
