"""Seals a checkpoint directory that has no integrity digests, after you confirm you trust it.

    python -m skipclick_jax.seal DIR [--yes]

Every load checks `SHA256SUMS.json` (size and SHA-256 of each file, `skipclick_jax.checkpoint`)
and refuses a directory without it: its save may not have completed, or it was written before
digests existed or by another tool. If you know the files are complete and yours (e.g. a
checkpoint from an older version of this project that loaded before), this records their current
digests so that loads accept them from now on. It changes no other file; a directory that
already has digests is only verified.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from skipclick_jax.checkpoint import DIGESTS, CorruptCheckpointError, verify_digests, write_digests


def seal(directory: str | pathlib.Path) -> pathlib.Path:
    """Writes DIGESTS for the files now in `directory` (which must have none); -> its path."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    if (directory / DIGESTS).exists():
        raise FileExistsError(f"{directory / DIGESTS} exists: the checkpoint is sealed already")
    if not any(p.is_file() for p in directory.rglob("*")):
        raise ValueError(f"{directory}: holds no files; nothing to seal")
    return write_digests(directory)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skipclick_jax.seal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="checkpoint directory (a project checkpoint, or one "
                                          "train.py step: <workdir>/checkpoints/<step>)")
    parser.add_argument("--yes", action="store_true", help="confirm without the prompt")
    args = parser.parse_args(argv)
    directory = pathlib.Path(args.directory)
    if (directory / DIGESTS).is_file():
        try:
            verify_digests(directory)
        except CorruptCheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{directory}: sealed already, and every file matches its digest")
        return 0
    files = [p for p in directory.rglob("*") if p.is_file()] if directory.is_dir() else []
    size = sum(p.stat().st_size for p in files)
    print(f"{directory}: {len(files)} files, {size / 2**20:.1f} MiB, no {DIGESTS}. Sealing records "
          "their current contents as trusted; do it only if the save completed and the files are yours.")
    if not args.yes:
        if not sys.stdin.isatty():
            print("error: not confirmed (pass --yes, or run it in a terminal)", file=sys.stderr)
            return 2
        if input("type 'yes' to seal: ").strip() != "yes":
            print("not sealed")
            return 2
    try:
        path = seal(directory)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
