"""Example `python` task: count words of an input file, write the counts as JSON."""

import collections
import json
import pathlib
import sys

text = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "inputs/text").read_text()
counts = collections.Counter(text.split())
out = pathlib.Path("outputs")
out.mkdir(exist_ok=True)
(out / "counts.json").write_text(json.dumps(counts.most_common(10)))
print(f"{sum(counts.values())} words, {len(counts)} distinct")
