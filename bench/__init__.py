"""The benchmarks and the study: modules run from the repository root as ``python -m bench.NAME``
(each prints one JSON line; see docs/performance.md and docs/study.md), and the GPU check's
scripts (``bench/gpu_check.sh``)."""
