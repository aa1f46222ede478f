"""The HTTP shell: the aiohttp app and its lifetime, forwarding, the preflight fast path, the connection protocol."""
