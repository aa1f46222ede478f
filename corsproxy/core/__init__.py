"""The pure core: origins, header lists, forwarding header rules, settings values, the decision engine, origin-safety
policy, outcomes, explain, the regex importer and the origin line format.

Nothing here imports aiohttp, lmdb, yaml or gunicorn (a test walks the package to hold that): every rule that decides
an answer can be tested without sockets, a store or a file.
"""
