"""`loraserve demo`: two tenants fine-tune, upload and use their own adapters, end to end.

Builds the embedded base model, trains one adapter per tenant on the made-up facts shipped as
package data (loraserve/finetune/data), starts a real server with two tenants, uploads each
adapter with its own tenant's key, then shows side by side that each adapter answers its own
tenant's questions while the base model and the other tenant's adapter do not, that a tenant
cannot use the other's adapter, and which per-tenant metrics moved. Runs on loopback only, in a
temporary directory.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA_DIR = Path(__file__).resolve().parent / "data"
TENANTS = {"acme": "acme_facts.jsonl", "globex": "globex_facts.jsonl"}
QUESTIONS_SHOWN = 3


def _metric(text: str, name: str, tenant: str) -> float:
    prefix = f'{name}{{tenant="{tenant}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def run_demo(work: Path, epochs: int | None = None, out=sys.stdout) -> dict[str, float]:
    """Runs the whole demo in `work`; returns each tenant's accuracy on its own questions."""
    import grpc

    from loraserve.client.config import ClientConfig
    from loraserve.client.sync import LoraServeClient
    from loraserve.finetune.datasets import load_jsonl
    from loraserve.finetune.train import TrainConfig, train_adapter
    from loraserve.server.background import BackgroundServer
    from loraserve.server.config import ServerConfig
    from loraserve.server.tenants import hash_key
    from loraserve.testing.tiny_model import default_model_path

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    started = time.monotonic()
    model = default_model_path()
    say(f"base model: {model}")
    adapters: dict[str, Path] = {}
    for tenant, data in TENANTS.items():
        say(f"training {tenant}'s adapter on {data} ...")
        options = {} if epochs is None else {"epochs": epochs}
        result = train_adapter(
            TrainConfig(
                data_path=DATA_DIR / data,
                out_dir=work / f"{tenant}-adapter",
                progress=False,
                write_plot=False,
                **options,  # type: ignore[arg-type]
            )
        )
        adapters[tenant] = result.out_dir
        say(
            f"  loss {result.initial_train_loss:.2f} -> {result.final_train_loss:.2f} "
            f"in {result.seconds:.0f} s"
        )

    keys = {tenant: secrets.token_urlsafe(16) for tenant in TENANTS}
    tenants_file = work / "tenants.toml"
    tenants_file.write_text(
        "".join(f'[tenants.{t}]\napi_keys = ["{hash_key(k)}"]\n\n' for t, k in keys.items())
    )
    config = ServerConfig(
        model_path=model,
        port=0,
        metrics_port=0,  # a free port, reported by the server
        data_dir=work / "data",
        tenants_file=tenants_file,
        access_log="",
        price_per_device_hour=3.6,
    )
    running = BackgroundServer(config).start()
    target = running.target
    say(f"server on {target} with tenants {', '.join(TENANTS)}")
    clients = {
        t: LoraServeClient(ClientConfig(target=target, api_key=k, timeout_s=60))
        for t, k in keys.items()
    }
    scores: dict[str, float] = {}
    try:
        for tenant, client in clients.items():
            info = client.upload_adapter(adapters[tenant], f"{tenant}-facts")
            say(f"{tenant} uploaded '{info.name}' (version {info.version}, rank {info.rank})")
        tenants = list(TENANTS)
        for tenant in tenants:
            other = tenants[1 - tenants.index(tenant)]
            rows = load_jsonl(DATA_DIR / TENANTS[tenant])
            say()
            say(f"{tenant}'s questions: base model | {tenant}'s adapter | {other}'s adapter")
            right = 0
            for i, row in enumerate(rows):
                prompt = row.prompt  # type: ignore[union-attr]
                expected = row.completion.strip()  # type: ignore[union-attr]
                own = clients[tenant].generate(prompt, adapter=f"{tenant}-facts", max_new_tokens=16)
                right += int(own.text.strip() == expected)
                if i < QUESTIONS_SHOWN:
                    base = clients[tenant].generate(prompt, max_new_tokens=16)
                    theirs = clients[other].generate(
                        prompt, adapter=f"{other}-facts", max_new_tokens=16
                    )
                    say(f"  {prompt.splitlines()[0]}  (expected: {expected})")
                    say(f"    base: {base.text.strip()!r} | {tenant}: {own.text.strip()!r} | "
                        f"{other}: {theirs.text.strip()!r}")  # fmt: skip
            scores[tenant] = right / len(rows)
            say(f"  {tenant}'s adapter answers {right}/{len(rows)} of its own questions exactly")
        say()
        try:
            clients["acme"].generate("Q: hello\nA:", adapter="globex-facts")
            say("UNEXPECTED: acme used globex's adapter")
        except grpc.RpcError as exc:
            say(f"acme using globex's adapter: {exc.code().name}: {exc.details()}")
        try:
            clients["acme"].list_adapters(tenant="globex")
            say("UNEXPECTED: acme listed globex's adapters")
        except grpc.RpcError as exc:
            say(f"acme listing globex's adapters: {exc.code().name}: {exc.details()}")
        with urllib.request.urlopen(
            f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10
        ) as response:
            metrics = response.read().decode()
        say()
        say("metrics that moved (per tenant):")
        for tenant in TENANTS:
            say(
                f"  {tenant}: generated tokens "
                f"{_metric(metrics, 'loraserve_generated_tokens_total', tenant):.0f}, "
                f"compute {_metric(metrics, 'loraserve_tenant_compute_seconds_total', tenant):.2f}"
                f" s, cost {_metric(metrics, 'loraserve_tenant_cost_total', tenant):.5f} USD"
            )
        say(f"demo finished in {time.monotonic() - started:.0f} s")
    finally:
        for client in clients.values():
            client.close()
        running.stop()
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraserve demo", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="override training epochs")
    parser.add_argument("--keep", type=Path, default=None, help="work in DIR and keep it")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        run_demo(args.keep, args.epochs)
        return 0
    with tempfile.TemporaryDirectory(prefix="loraserve-demo-") as tmp:
        run_demo(Path(tmp), args.epochs)
    return 0
