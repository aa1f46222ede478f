"""What the tests share, in one place: config documents, ports and waits, raw-socket and blocking HTTP clients, the
loopback upstreams, the proxy served in-process by its :class:`~corsproxy.http.protocol.ProxyRunner`, and
``corsproxy serve`` as a real subprocess. Fixtures built on these live in ``tests/conftest.py``; test modules import
helpers from here, never from each other.
"""
