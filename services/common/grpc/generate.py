"""Generate the Python gRPC stubs from ``protos/distillery/v1/*.proto``.

Run ``python -m services.common.grpc.generate`` (or ``make protos``) after changing a proto,
and commit the result: a test regenerates into a temporary folder and fails when the
committed stubs differ.
"""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = ROOT / "protos"
PROTO_PACKAGE = Path("distillery") / "v1"
DEFAULT_OUT = Path(__file__).resolve().parent
IMPORT_PREFIX = "services.common.grpc"
ABSOLUTE_IMPORT = re.compile(r"^from distillery(\.\S+)? import ", re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))


def _run_protoc(out_dir: Path, protos: list[Path]) -> None:
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {', '.join(p.name for p in protos)}")


def _rewrite_imports(path: Path) -> None:
    """``from distillery.v1 import x_pb2`` → ``from services.common.grpc.distillery.v1 import x_pb2``."""
    text = path.read_text()
    fixed = ABSOLUTE_IMPORT.sub(lambda m: f"from {IMPORT_PREFIX}.distillery{m.group(1) or ''} import ", text)
    if fixed != text:
        path.write_text(fixed)


def _write_package_markers(out_dir: Path) -> None:
    for package in (out_dir / "distillery", out_dir / PROTO_PACKAGE):
        (package / "__init__.py").write_text("")


def generate(out_dir: Path) -> None:
    """Write ``distillery/v1/*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` under ``out_dir``."""
    protos = proto_files()
    if not protos:
        raise RuntimeError(f"no .proto files under {PROTO_ROOT / PROTO_PACKAGE}")
    (out_dir / PROTO_PACKAGE).mkdir(parents=True, exist_ok=True)
    _run_protoc(out_dir, protos)
    for path in sorted((out_dir / PROTO_PACKAGE).glob("*_pb2*.py*")):
        _rewrite_imports(path)
    _write_package_markers(out_dir)


def main() -> int:
    generate(DEFAULT_OUT)
    print(f"generated stubs for {len(proto_files())} proto file(s) in {DEFAULT_OUT / PROTO_PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
