"""Hard-links the torch installed in this interpreter's environment into another venv.

`scripts/setup_lowest.sh` runs it with ./.venv's python so that ./.venv-lowest gets the same torch
without unpacking a second 750 MB copy (CI machines have run out of disk on that copy). Only the
files torch's own RECORD lists are linked (its packages and its dist-info, not its scripts); pip in
the target then sees torch as installed and adds only its small dependencies.

    .venv/bin/python scripts/link_torch.py .venv-lowest

Exits non-zero, having linked nothing it could not finish, when the two venvs are on different
file systems or the target already has a torch; the caller then installs torch with pip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path


def target_site_packages(venv: Path) -> Path:
    """The target venv's purelib directory, as its own interpreter reports it."""
    query = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", query],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def torch_files() -> list[Path]:
    """torch's installed files inside site-packages (RECORD entries that leave it are skipped)."""
    files = metadata.distribution("torch").files or []
    return [Path(str(f)) for f in files if not str(f).startswith("..")]


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: link_torch.py TARGET_VENV", file=sys.stderr)
        return 2
    source = Path(sysconfig.get_paths()["purelib"])
    target = target_site_packages(Path(sys.argv[1]))
    if (target / "torch").exists():
        print(f"link_torch: {target} already has torch", file=sys.stderr)
        return 1
    files = torch_files()
    tops = sorted({f.parts[0] for f in files})
    try:
        for rel in files:
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(source / rel, dest)
    except OSError as exc:
        # Leave no half-linked torch behind for pip to trip over.
        for top in tops:
            shutil.rmtree(target / top, ignore_errors=True)
        print(f"link_torch: could not link ({exc}); pip installs torch instead", file=sys.stderr)
        return 1
    version = metadata.version("torch")
    print(f"link_torch: linked {len(files)} files of torch {version} into {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
