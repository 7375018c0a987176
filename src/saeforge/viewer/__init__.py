"""Feature viewer: a per-SAE feature database (SQLite), an HTTP API and pages, a live activation box,
a map of the dictionary.

index.py    streams corpus windows through LM + SAE into stats.py's accumulators, then db.py
stats.py    bounded-memory per-feature accumulators (top-k contexts, decoder-projection top-k, reservoir, histograms)
lens.py     logit lens (decoder row -> final norm -> unembedding) and decoder-cosine neighbours
db.py       the SQLite schema, its writer and a read-only reader
dmap.py     the dictionary map: 2-D layout of decoder rows and their cosine cluster tree (index time)
metadb.py   a meta-SAE's latents per feature (table meta_latents) and who shares them
maproutes.py  the map's API: map points, tree nodes, PCA of chosen features
live.py     runs text through the LM and SAEs for the live box
featurejson.py  the served feature JSON; its index-time part stored per feature at index time
server.py   FastAPI app (pages + JSON API); fastapi/uvicorn are imported only there
export.py   Neuronpedia upload files
explain.py  explanation tables, baseline explainer, simulation / detection scores
llm.py      OpenAI-compatible chat client (retries, budget, cache) and the LLM prompts
explain_run.py  `saeforge explain`: explain and score features into the database, resumable
commands.py `saeforge index | serve | export-neuronpedia | explain | map | meta`
"""
