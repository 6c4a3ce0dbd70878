"""Copies TFDS builds from a local data_dir to a gs:// one (each build's dataset_info.json last).

  python -m skipclick_jax.data.upload --from ~/.cache/skipclick_jax/tfds --to gs://BUCKET/tfds

Builds already complete on gs:// (their dataset_info.json present) are skipped unless
--overwrite. Training and eval.py with `data_dir` on gs:// also build and upload what is missing
by themselves; this command copies builds made earlier (e.g. on a workstation).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from skipclick_jax import storage
from skipclick_jax.data.builders import (DEFAULT_DATA_DIR, INFO_FILE, SkipclickEval,
                                         SkipclickTrain, upload_build)


def local_builds(root: pathlib.Path) -> list[str]:
    """'<builder>/<config>/<version>' of every complete build below `root`."""
    found = []
    for cls in (SkipclickEval, SkipclickTrain):
        infos = (root / cls.name).glob(f"*/*/{INFO_FILE}")
        found += sorted(info.parent.relative_to(root).as_posix() for info in infos)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="src", default=str(DEFAULT_DATA_DIR), help="local data_dir")
    parser.add_argument("--to", required=True, help="gs:// data_dir")
    parser.add_argument("--overwrite", action="store_true", help="replace builds already on gs://")
    args = parser.parse_args(argv)
    if not storage.is_remote(args.to):
        parser.error(f"--to {args.to}: expected a gs:// path")
    src = pathlib.Path(args.src).expanduser()
    if not src.is_dir():
        parser.error(f"--from {src}: no such folder")
    try:
        dst = storage.check_access(args.to, write=True, what="--to")
    except storage.StorageError as e:
        parser.error(str(e))
    builds = local_builds(src)
    if not builds:
        parser.error(f"--from {src}: no complete TFDS builds (*/<config>/<version>/{INFO_FILE})")
    for rel in builds:
        if (dst / rel / INFO_FILE).is_file() and not args.overwrite:
            print(f"{rel}: already on {dst}, skipped")
            continue
        files = upload_build(src / rel, dst / rel)
        print(f"{rel}: {len(files)} files copied to {dst / rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
