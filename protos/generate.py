"""Generate the Python code for the .proto files with grpcio-tools, reproducibly.

    python -m protos.generate          # rewrite protos/codestream/v1/*_pb2*.py and *.pyi
    python -m protos.generate --check  # exit 1 if the committed code differs from a fresh build

The generated code is committed so that the gateway image and clients need no grpcio-tools. Paths are
relative to the repository root (`-I .`), so generated imports read `from protos.codestream.v1 ...`.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "codestream" / "v1"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc into out_dir; return the generated files (relative to out_dir)."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    gen = out_dir / "protos" / "codestream" / "v1"
    return sorted(p.relative_to(gen) for p in gen.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        files = generate(out)
        gen = out / "protos" / "codestream" / "v1"
        stale = [f for f in files if not (PROTO_DIR / f).exists() or not filecmp.cmp(gen / f, PROTO_DIR / f, False)]
        committed = {p.name for p in PROTO_DIR.iterdir() if "_pb2" in p.name}
        extra = sorted(committed - {f.name for f in files})
        if args.check:
            for f in stale:
                print(f"stale: protos/codestream/v1/{f}")
            for name in extra:
                print(f"not generated from any .proto: protos/codestream/v1/{name}")
            return 1 if stale or extra else 0
        for f in stale:
            (PROTO_DIR / f).write_bytes((gen / f).read_bytes())
            print(f"wrote protos/codestream/v1/{f}")
        for name in extra:
            (PROTO_DIR / name).unlink()
            print(f"removed protos/codestream/v1/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
