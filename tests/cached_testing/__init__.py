"""Test scaffolding shared by the tests, the benchmarks and the demo, kept out of the `cached` package:
real tiny models and images built in code (`fixtures`), and a `cached serve` subprocess on private
paths (`harness`). Tests find it on pytest's path; scripts put `tests/` on sys.path."""
