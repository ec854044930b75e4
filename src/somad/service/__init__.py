"""somad serve: the HTTP inspection service (FastAPI + uvicorn), one model loaded per worker."""
