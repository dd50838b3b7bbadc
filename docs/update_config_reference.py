"""Rewrite the README's pipeline config table from the code (``ssam-pipeline config-reference``).

.venv/bin/python docs/update_config_reference.py
"""

from pathlib import Path

from ssam.pipeline.config import config_reference

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = "| key | type | default | description |"
ANCHOR = "### Config reference"  # the pipeline table is the first table after this heading


def main() -> None:
    lines = README.read_text().splitlines()
    start = lines.index(HEADER, lines.index(ANCHOR))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    lines[start:end] = [HEADER, "|---|---|---|---|", *config_reference()]
    README.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
