"""Throughput and latency benchmark of tlsrelay (and of Postfix on the same load).

``python -m bench.run`` measures tlsrelay; ``python -m bench.compare`` runs the same load through
tlsrelay and a private Postfix instance. See ``bench/README.md``.
"""
