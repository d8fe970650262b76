"""The load benchmark (bench/README.md). ``python bench/run.py`` is the entry point; the
modules are importable as ``bench.<module>`` so that tests can reach their parsers."""
