"""The tests mirror the package: tests/<layer>/test_<module>.py checks wsss/<layer>/<module>.py
(layers: ops, datasets, methods, platform, tuning). Files at this level check what crosses
layers: the CLI, the import direction, the demo, the documented example, benchmark scripts,
S3, the cluster, credentials, the GPU bundle. Fixtures are in conftest.py; other shared code
in helpers/. A test file imports no other test file."""
