"""`usf-bios` without installing the package: python3 scripts/gpu/usf.py train spec.yaml --quiet"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from usf_bios.cli import app  # noqa: E402

if __name__ == "__main__":
    app(prog_name="usf-bios")
