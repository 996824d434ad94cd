"""Fuzzers for attnc (issue 15).

- `tests.fuzz.specs`: mutants of the example specs (examples/specs/*.attn) and of Python front-end calls (the
  decorator and flex mods), each run through attnc.parse, `attnc check` and planning in a worker process with a
  time limit; anything but an AttncError is a traceback, a worker that dies is a crash, a mutant past 2 s of CPU is
  a hang. `python -m tests.fuzz --n 50000` runs it locally; tests/test_fuzz.py runs a CI share.
- `tests.fuzz.index`: adversarial index data (page ids, lengths, offsets) for the serving kernels;
  `python -m tests.fuzz.index --n 1000`, with a CI share in tests/test_index_safety.py.
"""
