"""API latency under load and page weight of the feature viewer (not a test).

    python bench/viewer_api.py DB [--clients 32] [--seconds 10] [--features N]

Starts `saeforge serve DB --no-live` on a free loopback port (a separate process, as users run it),
then 32 concurrent clients (one asyncio loop, keep-alive connections) request random features'
/api/feature JSON for 10 s; reports requests/s, latency p50/p99 and the server process's CPU time per
request (from /proc: the server's own cost, which other work on the machine does not inflate). The load generator runs on the
same machine and competes with the server for its cores: the figures are a floor, not a ceiling.
`--client raw` (the default) speaks HTTP/1.1 over asyncio streams (uvloop when installed) and costs a
few tens of microseconds per request; `--client httpx` uses httpx, whose per-request cost (~1 ms of
Python) is larger than the server's, so on 2 cores it measures mostly itself.
Page weight: the bytes a browser fetches to show one feature page (HTML, script, stylesheet, JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import time

import httpx


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc): the server's own cost, whatever else shares the cores."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def raw_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> int:
    """One keep-alive HTTP/1.1 GET; returns the status. The server answers with Content-Length (no chunking)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def load_raw(
    base: str, model: str, sae: str, d_sae: int, clients: int, seconds: float
) -> tuple[list[float], int]:
    host, port = base.removeprefix("http://").split(":")
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    rng = random.Random(0)

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            status = await raw_get(reader, writer, f"/api/feature/{model}/{sae}/{rng.randrange(d_sae)}")
            lat.append(time.perf_counter() - t0)
            errors += status != 200
        writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return lat, errors


async def load(base: str, model: str, sae: str, d_sae: int, clients: int, seconds: float) -> tuple[list[float], int]:
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    rng = random.Random(0)

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = await c.get(f"/api/feature/{model}/{sae}/{rng.randrange(d_sae)}")
            lat.append(time.perf_counter() - t0)
            errors += r.status_code != 200

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    return lat, errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("db")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--features", type=int, default=0, help="draw from the first N features only (0: all)")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw", help="the load generator (see above)")
    args = ap.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "saeforge.cli", "serve", args.db, "--no-live", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                saes = httpx.get(f"{base}/api/saes").json()["saes"]
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise SystemExit("server did not start")
        s = saes[0]
        model, sae, d_sae = s["model_id"], s["sae_id"], s["d_sae"]
        d_sae = min(d_sae, args.features) if args.features else d_sae  # a small hot set: answers from the cache
        cpu0 = cpu_seconds(proc.pid)
        run = load_raw if args.client == "raw" else load
        try:
            import uvloop  # the viewer extra installs it for uvicorn; the clients use it too when present

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        lat, errors = runner(run(base, model, sae, d_sae, args.clients, args.seconds))
        cpu = cpu_seconds(proc.pid) - cpu0
        lat.sort()
        q = statistics.quantiles(lat, n=100)
        print(
            f"{args.client} client: {len(lat)} requests in {args.seconds:.0f} s from {args.clients} clients: {len(lat) / args.seconds:,.0f} req/s, "
            f"errors {errors}; latency p50 {q[49] * 1e3:.1f} ms, p99 {q[98] * 1e3:.1f} ms, max {lat[-1] * 1e3:.1f} ms; "
            f"server CPU {cpu * 1e3 / len(lat):.2f} ms per request"
        )

        idx = httpx.get(f"{base}/api/features/{model}/{sae}?limit=1").json()["features"][0]["index"]
        parts = {
            "feature page HTML": f"/feature/{model}/{sae}/{idx}",
            "app.js": "/static/app.js",
            "style.css": "/static/style.css",
            "feature JSON": f"/api/feature/{model}/{sae}/{idx}",
        }
        sizes = {k: len(httpx.get(base + u).content) for k, u in parts.items()}
        print(
            "page weight (densest feature, uncompressed): "
            + ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in sizes.items())
            + f"; total {sum(sizes.values()) / 1024:.1f} KiB in {len(sizes)} requests"
        )
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
