"""`edtalk serve`: trained models behind an HTTP API on Ray Serve (docs/serving.md).

config.py holds the `serve:` section of params.yaml; engine.py turns one request's uploads into an mp4 with
pipelines/generate.py (so a served video equals `edtalk generate`'s for the same inputs and seed); app.py is the
Ray Serve deployment (routes, limits, token, queue); start.py starts it on local Ray or a cluster.
"""
