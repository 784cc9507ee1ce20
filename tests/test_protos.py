"""The public API protos: committed stubs match a fresh regeneration; every field is commented."""

from __future__ import annotations

import filecmp
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos" / "loraserve" / "v1"
STUB_DIR = ROOT / "loraserve" / "v1"
PROTOS = sorted(PROTO_DIR.glob("*.proto"))

_BLOCK = re.compile(r"^\s*(message|enum|oneof|service)\s+\w+\s*\{")
_FIELD = re.compile(
    r"^\s*(?:optional\s+|repeated\s+)?(?:map<[^>]+>|[A-Za-z_][\w.]*)\s+[A-Za-z_]\w*\s*=\s*\d+"
)


def _stub_names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if re.fullmatch(r".*_pb2(_grpc)?\.pyi?", p.name)}


def test_committed_stubs_match_regeneration(tmp_path: Path) -> None:
    # Run the project's own script so the test and the script cannot drift apart; the
    # interpreter running the tests (with its grpcio-tools) is the `python` it finds.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
    )
    generated = tmp_path / "loraserve" / "v1"
    names = _stub_names(generated)
    assert len(names) == 3 * len(PROTOS), names  # _pb2.py, _pb2.pyi, _pb2_grpc.py per proto
    assert _stub_names(STUB_DIR) == names
    for name in sorted(names):
        assert filecmp.cmp(generated / name, STUB_DIR / name, shallow=False), (
            f"loraserve/v1/{name} differs from a fresh scripts/gen_protos.sh run; regenerate it"
        )


def uncommented_fields(text: str) -> tuple[int, list[str]]:
    """(fields seen, the fields of messages whose line directly above is not a // comment)."""
    blocks: list[str] = []
    lines = text.splitlines()
    seen = 0
    missing: list[str] = []
    for i, line in enumerate(lines):
        code = line.split("//", 1)[0]
        if opened := _BLOCK.match(code):
            blocks.append(opened.group(1))
        elif blocks and blocks[-1] in ("message", "oneof") and _FIELD.match(code):
            seen += 1
            if i == 0 or not lines[i - 1].strip().startswith("//"):
                missing.append(f"line {i + 1}: {line.strip()}")
        # Counting braces also handles a block opened and closed on one line (`message E {}`).
        for _ in range(code.count("}")):
            blocks.pop()
    return seen, missing


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_every_message_field_has_a_comment_above(proto: Path) -> None:
    seen, missing = uncommented_fields(proto.read_text())
    assert seen > 0, f"no fields parsed in {proto.name}: the parser is broken"
    assert not missing, f"{proto.name}: fields without a comment line directly above: {missing}"


def test_comment_check_catches_a_bare_field() -> None:
    text = """
message Empty {}
message A {
  // Documented.
  string a = 1;
  repeated uint32 b = 2;
  oneof part {
    // Documented.
    Empty c = 3;
    Empty d = 4;
  }
  map<string, int32> e = 5;
}
enum E {
  E_UNSPECIFIED = 0;
}
"""
    seen, missing = uncommented_fields(text)
    assert seen == 5
    assert [m.split(":")[0] for m in missing] == ["line 6", "line 10", "line 12"]
