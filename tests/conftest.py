"""Shared test settings: make tests/ importable for support modules."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
