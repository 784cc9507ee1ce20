"""Typed Python client (sync and asyncio) for every loraserve RPC.

    from loraserve.client.config import ClientConfig
    from loraserve.client.sync import LoraServeClient          # or client.aio.AsyncLoraServeClient

    with LoraServeClient(ClientConfig(target="host:50051", api_key="...")) as c:
        c.wait_until_serving(60)
        c.upload_adapter(Path("my-adapter"), "support-bot")
        print(c.generate("Hello", adapter="support-bot", max_new_tokens=32).text)

Modules: config (ClientConfig), channel (channels, bearer metadata), request (Sampling,
GenerateRequest building), upload (adapter directory checks and the upload stream), health
(wait until SERVING), results (JSON-able views, merging a stream), sync and aio (the clients).
Server errors raise grpc.RpcError; read .code() and .details().
"""
