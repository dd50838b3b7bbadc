"""Rewrite the README's pipeline config table from the code (``ssam-pipeline config-reference``).

.venv/bin/python docs/update_config_reference.py
"""

from pathlib import Path

from ssam.pipeline.config import config_reference

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = "| key | type | default | description |"


def main() -> None:
    lines = README.read_text().splitlines()
    start = lines.index(HEADER)  # the first table with this header is the pipeline's
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    lines[start:end] = config_reference()
    README.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
