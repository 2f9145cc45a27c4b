"""Experiments: the demo and the benchmarks, built on the library and never imported by it.

``settings`` holds the demo's quick and full sizes, ``stages`` the reuse of finished stages
and the shared base; the demo runs the merge, SAGE and cross-modal benches at a small size.
"""
