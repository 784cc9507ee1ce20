"""Unit tests for server.engine.slots.SlotTable: loading, pinning, LRU eviction and deletion.

The table drives real MultiLoRALinear layers (small nn.Linear) and a fake loader that counts its
loads. After every call the whole observable state is checked: resident versions and pins, free
capacity (via fits), ranks, bytes, and what each layer's slots actually hold.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from adapters.config import LoraAdapterConfig
from adapters.weights import AdapterWeights
from server.engine.lora import LoRAContext, MultiLoRALinear
from server.engine.slots import SlotTable
from server.engine.types import AdapterKey, EngineError, ErrorKind

LAYER_SHAPES = {"l0": (8, 6), "l1": (8, 4), "l2": (5, 8)}
"""Layer name -> (d_in, d_out)."""
NUM_SLOTS = 2
MAX_RANK = 4


def key(name: str, version: int = 1, tenant: str = "t") -> AdapterKey:
    return AdapterKey(tenant, name, version)


A, B, C = key("a"), key("b"), key("c")


@dataclass
class FakeLoader:
    """Builds deterministic adapter weights per key and counts loads."""

    targets: dict[str, list[str]] = field(default_factory=dict)
    """Adapter name -> layers it targets (default: l0 and l1)."""
    ranks: dict[str, int] = field(default_factory=dict)
    loads: Counter[AdapterKey] = field(default_factory=Counter)
    fail_with: Exception | None = None

    def rank(self, k: AdapterKey) -> int:
        return self.ranks.get(k.name, 2)

    def weights(self, k: AdapterKey) -> AdapterWeights:
        rank = self.rank(k)
        targets = self.targets.get(k.name, ["l0", "l1"])
        seed = sum(map(ord, f"{k.tenant}/{k.name}/{k.version}"))
        generator = torch.Generator().manual_seed(seed)
        modules = {}
        for name in targets:
            d_in, d_out = LAYER_SHAPES[name]
            a = torch.randn(rank, d_in, generator=generator)  # (r, d_in)
            b = torch.randn(d_out, rank, generator=generator)  # (d_out, r)
            modules[name] = (a, b)
        config = LoraAdapterConfig(
            rank=rank, alpha=2.0 * rank, use_rslora=False, target_modules=targets, raw={}
        )
        return AdapterWeights(config=config, modules=modules)

    def __call__(self, k: AdapterKey) -> AdapterWeights:
        if self.fail_with is not None:
            raise self.fail_with
        self.loads[k] += 1
        return self.weights(k)


def make_table(loader: FakeLoader) -> tuple[SlotTable, dict[str, MultiLoRALinear]]:
    torch.manual_seed(0)
    context = LoRAContext()
    layers = {
        name: MultiLoRALinear(
            nn.Linear(d_in, d_out), context=context, num_slots=NUM_SLOTS, max_rank=MAX_RANK
        )
        for name, (d_in, d_out) in LAYER_SHAPES.items()
    }
    return SlotTable(layers, NUM_SLOTS, loader), layers


def check_state(
    table: SlotTable,
    layers: dict[str, MultiLoRALinear],
    loader: FakeLoader,
    expected: dict[AdapterKey, int],
) -> None:
    """The table holds exactly `expected` (key -> pins); the layers hold exactly their weights."""
    assert table.resident() == expected
    assert table.resident_bytes() == sum(loader.weights(k).nbytes for k in expected)
    slots = {k: table.slot_of(k) for k in expected}
    assert all(s is not None and 1 <= s <= NUM_SLOTS for s in slots.values()), slots
    assert len(set(slots.values())) == len(slots), "two versions share a slot"
    # Free capacity, as fits() reports it for adapters that are not loaded.
    available = NUM_SLOTS - sum(1 for pins in expected.values() if pins > 0)
    fresh = [key(f"fresh{i}") for i in range(NUM_SLOTS + 1)]
    assert table.fits(fresh[:available])
    assert not table.fits(fresh[: available + 1])
    # What every layer's slots hold.
    for name, layer in layers.items():
        want: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for k, slot in slots.items():
            assert slot is not None
            weights = loader.weights(k)
            assert table.rank_of(slot) == weights.config.rank
            if name in weights.modules:
                a, b = weights.modules[name]
                want[slot] = (a, b, weights.config.scale)
        assert layer.occupied == set(want), name
        if not expected:
            assert layer.lora_a is None and layer.lora_b is None, f"{name} memory not released"
            continue
        if layer.lora_a is None:
            assert not want
            continue
        assert layer.lora_b is not None
        for slot in range(NUM_SLOTS + 1):
            if slot in want:
                a, b, scale = want[slot]
                rank = a.shape[0]
                torch.testing.assert_close(layer.lora_a[slot, :rank], a)
                torch.testing.assert_close(layer.lora_b[slot, :, :rank], b * scale)
                assert not layer.lora_a[slot, rank:].any()
                assert not layer.lora_b[slot, :, rank:].any()
            else:
                assert not layer.lora_a[slot].any(), (name, slot)
                assert not layer.lora_b[slot].any(), (name, slot)


@pytest.fixture
def loader() -> FakeLoader:
    return FakeLoader(targets={"c": ["l2"]}, ranks={"b": 4, "c": 3})


def test_empty_table(loader: FakeLoader) -> None:
    table, layers = make_table(loader)
    assert table.num_slots == NUM_SLOTS
    assert table.slot_of(A) is None
    check_state(table, layers, loader, {})
    assert table.fits([])


def test_acquire_loads_once_pins_and_release_keeps_warm(loader: FakeLoader) -> None:
    table, layers = make_table(loader)

    slot = table.acquire(A)
    assert loader.loads == {A: 1}
    assert table.slot_of(A) == slot
    check_state(table, layers, loader, {A: 1})

    assert table.acquire(A) == slot
    assert loader.loads == {A: 1}, "a resident adapter must not be reloaded"
    check_state(table, layers, loader, {A: 2})

    table.release(A)
    check_state(table, layers, loader, {A: 1})
    table.release(A)
    check_state(table, layers, loader, {A: 0})  # warm: still loaded, unpinned

    assert table.acquire(A) == slot
    assert loader.loads == {A: 1}, "a warm adapter must not be reloaded"
    check_state(table, layers, loader, {A: 1})


def test_full_table_evicts_least_recently_used_unpinned(loader: FakeLoader) -> None:
    table, layers = make_table(loader)
    slot_a = table.acquire(A)
    check_state(table, layers, loader, {A: 1})
    slot_b = table.acquire(B)
    check_state(table, layers, loader, {A: 1, B: 1})
    table.release(B)  # B unpinned first, so B is least recently used
    check_state(table, layers, loader, {A: 1, B: 0})
    table.release(A)
    check_state(table, layers, loader, {A: 0, B: 0})
    table.acquire(A)  # touching A again makes B the older one
    table.release(A)
    check_state(table, layers, loader, {A: 0, B: 0})

    slot_c = table.acquire(C)
    assert slot_c == slot_b, "C must take the least recently used slot (B's)"
    assert table.slot_of(B) is None
    assert table.slot_of(A) == slot_a
    check_state(table, layers, loader, {A: 0, C: 1})  # B's l0/l1 slots zeroed, C in l2

    table.acquire(B)  # now A is the only unpinned slot: it goes
    assert loader.loads == {A: 1, B: 2, C: 1}
    check_state(table, layers, loader, {B: 1, C: 1})


def test_all_pinned_raises_resource_exhausted(loader: FakeLoader) -> None:
    table, layers = make_table(loader)
    table.acquire(A)
    table.acquire(B)
    check_state(table, layers, loader, {A: 1, B: 1})
    with pytest.raises(EngineError) as caught:
        table.acquire(C)
    assert caught.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    assert C not in loader.loads, "nothing should be loaded when no slot can take it"
    check_state(table, layers, loader, {A: 1, B: 1})
    # A resident key can still be pinned again.
    table.acquire(A)
    check_state(table, layers, loader, {A: 2, B: 1})


def test_fits_counts_resident_keys_as_free(loader: FakeLoader) -> None:
    table, layers = make_table(loader)
    table.acquire(A)
    table.acquire(B)
    check_state(table, layers, loader, {A: 1, B: 1})
    assert table.fits([A, B])
    assert table.fits([A])
    assert not table.fits([C])
    assert not table.fits([A, C])
    table.release(B)
    check_state(table, layers, loader, {A: 1, B: 0})
    assert table.fits([A, B])
    assert table.fits([C])
    assert table.fits([A, C])


def test_fits_does_not_count_a_warm_key_in_the_set_as_evictable(loader: FakeLoader) -> None:
    """A warm (unpinned) key that the set itself needs cannot also make room for a new key."""
    table, layers = make_table(loader)
    table.acquire(A)
    table.acquire(B)
    table.release(A)
    table.release(B)
    check_state(table, layers, loader, {A: 0, B: 0})
    assert table.fits([A, B])
    assert table.fits([A, C])  # C evicts B
    # A, B and C need three slots; there are two. Pinning them all must fail, so fits() must say no.
    assert not table.fits([A, B, C])
    table.acquire(A)
    table.acquire(B)
    with pytest.raises(EngineError):
        table.acquire(C)


def test_forget_dooms_versions_below_and_collect_frees_unpinned(loader: FakeLoader) -> None:
    table, layers = make_table(loader)
    old, new = key("a", version=1), key("a", version=2)
    table.acquire(old)
    table.release(old)
    table.acquire(new)
    check_state(table, layers, loader, {old: 0, new: 1})

    table.forget("t", "a", below_version=2)
    check_state(table, layers, loader, {old: 0, new: 1})  # doomed, not freed until collect()
    table.collect()
    check_state(table, layers, loader, {new: 1})

    # A deleted adapter's pinned version stays for its running request, then goes on release.
    table.forget("t", "a")
    table.collect()
    check_state(table, layers, loader, {new: 1})
    table.release(new)
    check_state(table, layers, loader, {})


def test_forget_matches_tenant_name_and_version_exactly(loader: FakeLoader) -> None:
    table, layers = make_table(loader)
    v1, v3 = key("a", version=1), key("a", version=3)
    other_tenant = key("a", version=1, tenant="u")
    table.acquire(v3)
    table.acquire(other_tenant)
    check_state(table, layers, loader, {v3: 1, other_tenant: 1})
    table.forget("t", "a", below_version=3)  # v3 is the replacement: kept
    table.forget("t", "b")  # another adapter: no effect
    for k in (v3, other_tenant):
        table.release(k)
    table.collect()
    check_state(table, layers, loader, {v3: 0, other_tenant: 0})

    table.acquire(v1)  # evicts v3 (LRU); v1 then is the only "a" of tenant t
    check_state(table, layers, loader, {v1: 1, other_tenant: 0})
    table.forget("t", "a", below_version=2)
    table.release(v1)  # doomed and unpinned: freed on release
    check_state(table, layers, loader, {other_tenant: 0})


def test_pinned_doomed_slot_survives_collect_and_is_freed_on_last_release(
    loader: FakeLoader,
) -> None:
    table, layers = make_table(loader)
    table.acquire(A)
    table.acquire(A)
    table.acquire(C)
    table.forget("t", "a")
    table.collect()
    check_state(table, layers, loader, {A: 2, C: 1})
    table.release(A)
    table.collect()
    check_state(table, layers, loader, {A: 1, C: 1})
    table.release(A)
    check_state(table, layers, loader, {C: 1})
    assert layers["l0"].lora_a is not None, "C is still resident: stacks stay allocated"


def test_evicting_everything_releases_layer_memory(loader: FakeLoader) -> None:
    table, layers = make_table(loader)
    table.acquire(A)
    table.acquire(C)
    assert all(layer.lora_a is not None for layer in layers.values())
    table.release(A)
    table.release(C)
    table.forget("t", "a")
    table.forget("t", "c")
    table.collect()
    check_state(table, layers, loader, {})  # asserts lora_a/lora_b are None everywhere
    # And the table works again afterwards.
    table.acquire(B)
    check_state(table, layers, loader, {B: 1})


def test_loader_error_propagates_and_leaves_table_unchanged(loader: FakeLoader) -> None:
    table, layers = make_table(loader)
    table.acquire(A)
    table.acquire(B)
    table.release(B)
    check_state(table, layers, loader, {A: 1, B: 0})
    loader.fail_with = EngineError(ErrorKind.NOT_FOUND, "gone")
    with pytest.raises(EngineError) as caught:
        table.acquire(C)
    assert caught.value.kind is ErrorKind.NOT_FOUND
    check_state(table, layers, loader, {A: 1, B: 0})  # B was not evicted for nothing

    loader.fail_with = ValueError("corrupt file")
    with pytest.raises(ValueError, match="corrupt"):
        table.acquire(C)
    check_state(table, layers, loader, {A: 1, B: 0})

    loader.fail_with = None
    table.acquire(C)
    check_state(table, layers, loader, {A: 1, C: 1})
