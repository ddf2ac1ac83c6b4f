"""``tipr serve``: search a gallery from a web page and a JSON API, safe by default.

- :mod:`~tipr.serve.app`: the FastAPI application (routes, limits, errors);
- :mod:`~tipr.serve.guard`: requests in flight, the access token, body size, security headers;
- :mod:`~tipr.serve.batching`: dynamic batching of concurrent queries on the model;
- :mod:`~tipr.serve.images`: uploads checked before decoding, gallery files by row id;
- :mod:`~tipr.serve.loadtest`: a bounded load generator (the tests, ``experiments/bench_serve.py``);
- :mod:`~tipr.serve.command`: the ``tipr serve`` options.

FastAPI and uvicorn are optional (``pip install "tipr[serve]"``); nothing else in tipr imports this package.
"""
